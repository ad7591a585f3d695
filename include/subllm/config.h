#pragma once
// The model description, read from and written to `config.json` with the official SUBLLM
// key names, and the parsed layout (structure string).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace subllm {

// One level of the layout tree. Segment 0 is the whole model; every other segment is the
// span between a subsampler `(` and its upsampler `)`.
struct SegmentItem {
  bool is_block = true;  // true: transformer block `index`; false: child segment `index`
  int index = 0;
};
struct Segment {
  int parent = -1;          // -1 for the root
  int depth = 0;            // 0 for the root
  int subsampler = -1;      // index j of `decoder.downsamplers.j` (the j-th `(`); -1 for the root
  int bypass = -1;          // index k of `decoder.bypasses.k`: the k-th `)` of the string, as the
                            // authors number them (an inner segment closes first); -1 for the root
  float retention = 1.0f;   // fraction r of the parent's tokens kept (1 for the root)
  std::vector<SegmentItem> items;  // in execution order
};
struct Structure {
  std::vector<Segment> segments;  // segments[0] is the root
  int num_blocks = 0;
  int num_subsamplers = 0;
  bool is_plain() const { return num_subsamplers == 0; }
};

// Parses e.g. "TTT(TTT(TTT)TTT)TTT". Subsamplers are numbered by the order of their `(`,
// their bypasses by the order of their `)`.
// `retentions` holds either one value for every subsampler or one per subsampler (in that
// order); an empty list means 1.0 is not allowed when subsamplers exist (error).
// Throws subllm::Error pointing at the offending character for: unknown characters,
// unbalanced parentheses, an empty segment "()", a T count different from `expected_blocks`,
// a retention outside (0, 1], a retention list of the wrong length.
Structure parse_structure(const std::string& text, int expected_blocks, const std::vector<float>& retentions);

struct ModelConfig {
  int vocab_size = 8192;          // num_embeddings
  int dim = 512;                  // decoder_embed_dim
  int ffn_dim = 1376;             // decoder_ffn_embed_dim
  int n_layers = 8;               // decoder_layers
  int n_heads = 8;                // decoder_attention_heads
  // Key/value heads (`decoder_kv_heads`): grouped-query attention when fewer than n_heads
  // (query head h reads key/value head h / (n_heads / kv heads)), multi-query at 1.
  // 0 means n_heads (plain multi-head attention); must divide n_heads.
  int n_kv_heads = 0;
  int context = 1024;             // tokens_per_sample
  int padding_idx = 0;
  int bos_token_id = 1;
  int eos_token_id = 2;
  bool tie_weights = false;
  // q_proj and k_proj carry biases (added before RoPE). A config.json without the key means
  // true, the default of the authors' config class; files we write always state it.
  bool qk_bias = false;
  std::string structure;          // empty means "T" * n_layers
  std::vector<float> retentions;  // downsampling_factor_denominator: one value or one per subsampler
  float norm_eps = 1e-5f;          // the authors' RMSNorm always uses 1e-5 (LayerNorm's default)
  float rope_base = 10000.0f;
  std::string norm_name = "rmsnorm";
  std::string mlp_name = "swiglu";
  // How the weights file that goes with this config numbers `decoder.bypasses.k` (`subllm_format`
  // in config.json): 2 = by `)`, as the authors do; 1 = by `(`, as subllm did before format 2;
  // 0 = not known (a config that says neither). A config is always written as 2.
  int bypass_numbering = 2;
  // RoPE positions of the tokens of a subsampled segment (`rope_positions` in config.json):
  // true ("parent", the authors' rule) = a kept token's row index within the sequence its
  // subsampler received (the parent segment's kept tokens); false ("original", subllm before
  // the key existed) = its position in the full sequence. The two differ only in nested
  // segments. New models and the authors' configs use "parent"; our configs without the key,
  // "original"; a config is always written with the key.
  bool rope_parent_positions = true;
  // Keys this program does not use (the authors' keys that do not change the math, and keys
  // unknown to both), as JSON text in the order read; written back as they were.
  std::vector<std::pair<std::string, std::string>> kept_keys;
  // Where the values came from (a file path, or the flags that set them), for error
  // messages; not written to config.json.
  std::string source = "config.json";

  int head_dim() const { return dim / n_heads; }
  int kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  // Width of the k (and of the v) projection: kv_heads * head_dim (= dim without GQA).
  int kv_dim() const { return kv_heads() * head_dim(); }
  // Width of the fused q|k|v projection: dim + 2 * kv_dim.
  int qkv_dim() const { return dim + 2 * kv_dim(); }
  std::string layout() const;     // structure, or "T" * n_layers when empty
  Structure parse() const;        // parse_structure(layout(), n_layers, retentions)
  // Elements of the flat parameter buffer (tensors with their padding), counted with overflow
  // checks: throws naming the keys when the count does not fit in 64 bits.
  int64_t param_count() const;
  // Throws subllm::Error naming the key and the fix for any inconsistent value
  // (dim not divisible by heads, odd head_dim, non-positive sizes, sizes beyond the limits
  // below, bad structure, ...). Errors start with `source`.
  void validate() const;
  // Structural limits: more blocks than any trained transformer has by far, and widths whose
  // fused weights (3 x dim rows of q|k|v, 2 x ffn_dim of w12) still index with 32-bit ints.
  static constexpr int kMaxLayers = 10000;
  static constexpr int kMaxDim = 0x7fffffff / 3;
  static constexpr int kMaxFfnDim = 0x7fffffff / 2;
};

// Reads config.json (docs/DESIGN.md, "The authors' model format", lists every key). Unknown
// keys are kept; keys whose values would change the math beyond this model are refused;
// missing keys keep the defaults above, except qk_bias, which is true when absent (the
// authors' class default) unless the file is subllm's own (norm_eps, rope_base or
// subllm_format present: subllm had no biases before it wrote the key).
// `downsampling_factor_denominator` may be a number, a string ("0.64"), a comma-separated
// string ("0.64,0.5") or a JSON list; the authors' `downsampling_factor` (a list of factors
// 1/r, one per subsampler) takes precedence. Errors name the file and the key.
ModelConfig load_config(const std::string& path);
ModelConfig config_from_json_text(const std::string& json_text, const std::string& source_name);
// Every key of the authors' config class with this model's values, then ours (norm_eps,
// rope_base, subllm_format, rope_positions) unless `authors_keys_only`, then the kept keys.
std::string config_to_json_text(const ModelConfig& c, bool authors_keys_only = false);
// Written atomically (temp file + rename).
void save_config(const ModelConfig& c, const std::string& path);

}  // namespace subllm
