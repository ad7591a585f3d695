#pragma once
// The decoder-only transformer (LLaMA layout; SUBLLM segments build on the same blocks).
// Parameters and their gradients each live in one flat buffer, so optimizers, clipping and
// checkpoint I/O walk plain arrays; every named tensor is a view into it.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "subllm/config.h"
#include "subllm/schedule.h"
#include "subllm/tensor.h"

namespace subllm {
namespace kernels {
struct RopeTable;
}

struct ParamInfo {
  std::string name;   // official SUBLLM checkpoint name
  Shape shape;
  int64_t offset = 0; // into the flat parameter / gradient buffers (elements)
  int64_t numel = 0;
  bool decay = true;  // weight decay applies (matrices yes, gains and scales no)
  float lr_scale = 1.0f;
};

struct ModelActivations;  // planned per (batch, length); defined in the model's source

// Training mode selects a fixed ceil(T * r) tokens per sequence at each subsampler (top
// scores); inference mode keeps every token whose score exceeds the keep threshold, so
// lengths differ per sequence. Without subsamplers both modes compute the same thing.
enum class Mode { Train, Inference };

// The scheduled knobs of SUBLLM's training machinery (SUBLLM.md §4, §5, §7).
struct SubllmKnobs {
  ScheduledFloat balancer_prob{{{0.0, 1.0}, {8000.0, 0.25}}};  // chance the score balancer acts on a step
  // Count the positive fraction and steer it to r (false: judge it from mean/std, as the
  // paper's balancer does; see kernels::balancer_backward).
  bool balancer_counted = true;
  float balancer_grad_scale = 0.1f;  // the paper's balancer uses 0.04
  float balancer_window = 0.05f;     // positive fraction kept in [r - w, r + w]
  float balancer_min_abs = 1.0f, balancer_max_abs = 4.0f;
  ScheduledFloat bypass_min{{{0.0, 0.9}, {20000.0, 0.2}}};     // lower limit of the bypass scale
  float bypass_max = 1.0f;
  float bypass_limit_prob = 0.6f;    // chance the bypass gradient limit acts on a step
  float keep_threshold = 0.0f;       // inference: keep tokens with score > this
  std::vector<float> keep_thresholds;  // per subsampler, overriding keep_threshold when set
};

// The choices the last pass made at subsampler j (the flags are training-mode only).
struct SubsamplerTrace {
  bool flipped = false;        // discarded weights paired in reverse order
  bool balancer_on = false;
  bool limit_on = false;       // bypass gradient limit
  int kept_per_seq = 0;
  std::vector<int32_t> kept;   // (B, kept_per_seq): positions within the parent sequence, ascending
  std::vector<float> scores;   // (B, parent length): the scores the choice was made from
};

// Summary of the scores of subsampler j's last pass: the fraction above the keep threshold
// (the retention inference mode would give on these tokens), their RMS, and the mean
// clamp(s, 0, 1) of the tokens the pass kept.
struct ScoreStats {
  double above = 0, rms = 0, kept_weight = 0;
};

// Offsets of one transformer block's tensors in the flat buffers; q, k, v are adjacent.
struct BlockOffsets {
  int64_t attn_norm, wqkv, wo, ffn_norm, w12, w3;
};

struct BlockIO;  // where one block pass keeps its intermediates; private to the model's sources

// Cached key or value rows of one block. Memory is reserved without being initialised, so
// untouched capacity costs no RSS, and growth doubles so appending stays amortised O(1).
class KVRows {
 public:
  KVRows() = default;
  KVRows(const KVRows& o) { *this = o; }
  KVRows& operator=(const KVRows& o);
  KVRows(KVRows&&) = default;
  KVRows& operator=(KVRows&&) = default;
  // Makes room for `floats` in total, keeping the floats in use.
  void reserve(size_t floats);
  void set_used(size_t floats) { used_ = floats; }
  float* data() { return buf_.get(); }
  const float* data() const { return buf_.get(); }
  size_t capacity() const { return cap_; }

 private:
  std::unique_ptr<float[]> buf_;
  size_t cap_ = 0, used_ = 0;
};

// The incremental state of one sequence in inference mode: the key/value cache of every
// block (a block inside subsamplers holds only the tokens they all kept), the tokens
// consumed, and how many tokens each subsampler saw and kept.
struct SequenceCache {
  std::vector<KVRows> k, v;              // per block: (rows, C), grown as tokens arrive
  std::vector<int> rows;                 // per block
  int length = 0;                        // tokens consumed (root positions used)
  int width = 0;                         // floats per cached row (the model width)
  std::vector<int64_t> seen, kept;       // per subsampler
  size_t bytes() const;                  // key/value bytes in use
};

class Model {
 public:
  explicit Model(ModelConfig cfg);  // validates the config; parameters start at zero
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const std::vector<ParamInfo>& params() const { return params_; }
  const ParamInfo& param_info(const std::string& name) const;  // error names the tensor
  int64_t num_params() const { return num_params_; }
  float* param_data() { return params_buf_.f32(); }
  float* grad_data() { return grads_buf_.f32(); }
  Tensor param(const std::string& name);
  Tensor grad(const std::string& name);

  // The authors' initialisation (SUBLLM.md §3), seeded.
  void init_weights(uint64_t seed);
  // Safetensors with the official names; load checks every name and shape against the
  // config and converts BF16/F16 to fp32.
  void load(const std::string& path);
  void save(const std::string& path) const;

  void zero_grad();
  // tokens, targets: (B, T) row-major; targets < 0 are ignored. Returns the mean loss over
  // counted targets. With backward, gradients of (mean loss * grad_multiplier) are ADDED to
  // the gradient buffer, so micro-batches accumulate.
  float forward_backward(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_multiplier = 1.0f);
  // Forward only. Writes the (B, T, V) logits when `logits` is given; returns the mean loss
  // when targets are given (else 0). Inference mode runs one sequence at a time.
  float forward(const int32_t* tokens, const int32_t* targets, int B, int T, float* logits = nullptr,
                Mode mode = Mode::Inference);

  // The global training step and seed: they fix the schedules and every random choice of
  // the next training-mode passes (the same context gives the same choices).
  void set_train_context(long step, uint64_t seed);
  SubllmKnobs& knobs() { return knobs_; }
  const std::vector<SubsamplerTrace>& last_traces() const { return traces_; }
  std::vector<ScoreStats> score_stats() const;
  // Tokens seen and kept at each subsampler over inference-mode passes since the last reset.
  void reset_retention_stats();
  std::vector<double> retention() const;
  const Structure& structure() const { return structure_; }

  // Inference with a cache: runs n new tokens of one sequence (positions cache.length ..)
  // and appends to the cache. Writes the logits of all n rows, or of the last row only.
  // Equals the inference-mode forward() over the whole sequence, token for token.
  // `reserve_tokens`: room made up front for this many tokens in every block (a hint).
  SequenceCache new_cache(int reserve_tokens = 0) const;
  void forward_cached(SequenceCache& cache, const int32_t* tokens, int n, float* logits, bool all_rows);
  // The keep threshold of subsampler j (knobs().keep_thresholds[j] if set, else keep_threshold).
  float keep_threshold(int j) const;

  // Bytes of planned activation memory for (B, T) in training.
  size_t activation_bytes(int B, int T);
  // Matmul FLOPs per trained token at length T: 6 * (matrix params of each block, weighted by
  // the fraction of tokens its segment sees) + causal attention + the output projection.
  double train_flops_per_token(int T) const;
  // Tokens per sequence at each segment in training mode (segment 0 = T).
  std::vector<int> segment_lengths(int T) const;

 private:
  void check_tokens(const int32_t* tokens, const int32_t* targets, int64_t n) const;
  ModelActivations& plan(int B, int T, Mode mode);
  double run(const int32_t* tokens, const int32_t* targets, int B, int T, Mode mode, bool backward,
             float grad_multiplier, float* logits, int64_t* count);
  void segment_forward(ModelActivations& a, int seg, const int32_t* tokens, Mode mode);
  void segment_backward(ModelActivations& a, int seg);
  void block_core(int blk, const float* x, float* y, int rows, const int32_t* pos, const BlockIO& io,
                  const std::function<void()>& attend);
  void block_forward(ModelActivations& a, int blk, int seg, const float* x, float* y);
  void segment_cached(SequenceCache& cache, int seg, float* x, int rows, const int32_t* pos, const int32_t* tokens);
  void block_backward(ModelActivations& a, int blk, int seg, const float* x, float* dres);
  void subsample_forward(ModelActivations& a, int child, const float* x, const int32_t* tokens, Mode mode);
  void upsample_backward_pre(ModelActivations& a, int child, const float* x);
  void subsample_backward_post(ModelActivations& a, int child, const float* x);

  ModelConfig cfg_;
  std::vector<ParamInfo> params_;
  std::vector<BlockOffsets> blocks_;
  Structure structure_;
  std::vector<int64_t> score_offset_, bypass_offset_;  // per subsampler j
  int64_t embed_offset_ = 0, final_norm_offset_ = 0, head_offset_ = 0;  // the head may be the embedding
  SubllmKnobs knobs_;
  long train_step_ = 0;
  uint64_t train_seed_ = 0;
  std::vector<SubsamplerTrace> traces_;
  std::vector<int64_t> seen_, kept_;
  std::vector<float> rope_cos_, rope_sin_;
  std::vector<float> infer_ws_;  // block workspace of forward_cached
  std::unique_ptr<kernels::RopeTable> rope_;
  int64_t num_params_ = 0;
  Tensor params_buf_, grads_buf_;
  std::unique_ptr<ModelActivations> acts_;
};

}  // namespace subllm
