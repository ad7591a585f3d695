#pragma once
// The decoder-only transformer (LLaMA layout; SUBLLM segments build on the same blocks).
// `Weights` are the parameters on one backend (device), in one flat buffer with every named
// tensor a view into it; any number of `Session`s run passes over one `Weights`, each with its
// own workspace, knobs, traces and caches, so several requests can share one loaded model.
// `Model` is Weights + a gradient buffer + one Session: what training and single-user tools use.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "subllm/config.h"
#include "subllm/scheduled_float.h"
#include "subllm/tensor.h"

namespace subllm {

class Backend;  // the device; chosen by name (backend_names() lists them)
class SafetensorsFile;  // subllm/safetensors.h
std::vector<std::string> backend_names();
// Whether `device` names a backend this build has and this machine can run; `why` says what
// is missing when it cannot.
bool backend_available(const std::string& device, std::string* why = nullptr);

struct ParamInfo {
  std::string name;   // official SUBLLM checkpoint name
  // The name subllm gave it before format 2 (bypasses numbered by their `(`), when different.
  std::string legacy_name;
  Shape shape;
  int64_t offset = 0; // into the flat parameter / gradient buffers (elements)
  int64_t numel = 0;
  bool decay = true;  // weight decay applies (matrices yes, gains and scales no)
  float lr_scale = 1.0f;
};


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

// Offsets of one transformer block's tensors in the flat buffers; q, k, v are adjacent, and
// so are the q and k biases (qk_bias; -1 without them).
struct BlockOffsets {
  int64_t attn_norm, wqkv, wo, ffn_norm, w12, w3;
  int64_t qk_bias = -1;
};

// Cached key or value rows of one block in backend memory, in the session's KV dtype.
// Memory is reserved without being initialised and growth doubles, so appending stays
// amortised O(1). What a reserve asks for is committed (Backend::commit) at once, growth
// beyond it an eighth ahead at a time, so a decoded token's new rows meet no page faults and
// spare capacity costs little RSS.
class KVRows {
 public:
  KVRows() = default;
  KVRows(Backend* backend, DType dtype) : backend_(backend), dtype_(dtype) {}
  KVRows(const KVRows& o) { *this = o; }
  KVRows& operator=(const KVRows& o);
  KVRows(KVRows&&) = default;
  KVRows& operator=(KVRows&&) = default;
  // Makes room for `elements` in total, keeping the elements in use.
  void reserve(size_t elements);
  void set_used(size_t elements) { used_ = elements; }
  void* data() const { return buf_.get(); }
  DType dtype() const { return dtype_; }
  size_t capacity() const { return cap_; }

 private:
  Backend* backend_ = nullptr;
  DType dtype_ = DType::F32;
  std::shared_ptr<void> buf_;
  size_t cap_ = 0, used_ = 0, committed_ = 0;  // elements
};

// The incremental state of one sequence in inference mode: the key/value cache of every
// block (a block inside subsamplers holds only the tokens they all kept), the tokens
// consumed, and how many tokens each subsampler saw and kept.
struct SequenceCache {
  std::vector<KVRows> k, v;              // per block: (rows, C), grown as tokens arrive
  std::vector<int> rows;                 // per block
  int length = 0;                        // tokens consumed (root positions used)
  int width = 0;                         // elements per cached row (kv_heads * head_dim)
  size_t element_bytes = 4;              // bytes per cached element (the KV dtype's)
  std::vector<int64_t> seen, kept;       // per subsampler
  size_t bytes() const;                  // key/value bytes in use
};

// The parameters of one model on one backend. Immutable to sessions; training changes them
// through the optimizers only.
class Weights {
 public:
  Weights(ModelConfig cfg, Backend& backend);  // validates the config; parameters start at zero
  // For inference: the weights of the safetensors file `path`. On the CPU backend, when every
  // tensor of the file is one of this model's, F32, and q|k|v (and the q|k biases) lie back to
  // back, the weights point into the file's read-only mapping instead of a copy: pages are read
  // on first use and stay shared with the page cache, so a model larger than the free memory
  // loads (the load still scans every value for NaN, dropping each scanned range from this
  // process's resident set). Otherwise they are allocated and loaded as load() does. Mapped
  // weights are never written: no training, no load(), no params_changed().
  Weights(ModelConfig cfg, Backend& backend, const std::string& path);
  bool mapped() const { return mapping_ != nullptr; }
  ~Weights();
  Weights(const Weights&) = delete;
  Weights& operator=(const Weights&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const Structure& structure() const { return structure_; }
  const std::vector<ParamInfo>& params() const { return params_; }
  const ParamInfo& param_info(const std::string& name) const;  // error names the tensor
  int64_t num_params() const { return num_params_; }
  Backend& backend() const { return *backend_; }
  // The fp32 master weights, (num_params) in backend memory: what optimizers update and
  // checkpoints hold. After changing them, call params_changed().
  float* data() const { return buf_.f32(); }
  // The copy kernels read: the master weights in the backend's compute dtype (the master
  // itself when that is F32, as on the CPU).
  DType compute_dtype() const { return compute_dtype_; }
  void* compute_data() const { return compute_buf_.raw() ? compute_buf_.raw() : buf_.raw(); }
  // Refreshes the compute copy from the master weights (init and load call it themselves).
  void params_changed();

  // ---- inference weight types ----------------------------------------------------------
  // The matrices (q|k|v, out_proj, w12 and w3 of every block, the output head, the embedding)
  // as kernels read them in inference: F32 (the compute copy; the default), BF16, or Q8 (int8
  // with one F32 scale per group of 32 along a row; an untied embedding is BF16 then, see
  // DESIGN.md). Set it before init() or load(), on a backend that takes the type. The master
  // buffer then holds only the other tensors (norms, score weights, bypass scales; its matrix
  // pages are never touched, so they take no memory): such weights are for inference, save()
  // writes the typed file `subllm quantize` makes, and training refuses them. A typed file
  // (`subllm_weight_type` in its metadata) loads only into weights of its type.
  void set_weight_dtype(DType dt);
  DType weight_dtype() const { return weight_dtype_; }
  // The typed copy of the matrix tensor whose first element is at `offset` (its dtype in *dt),
  // or null when kernels read that tensor from the compute copy.
  const void* matrix_data(int64_t offset, DType* dt) const;
  // The authors' initialisation (SUBLLM.md §3), seeded; drawn on the host, then uploaded.
  void init(uint64_t seed);
  // Safetensors with the official names; load checks every name and shape against the
  // config and converts BF16/F16 to fp32. It reads the bypass numbering the file says
  // (metadata subllm_format) or the config says (config().bypass_numbering), ignores the
  // authors' `*.inv_freq` RoPE buffers once checked against rope_base, and accepts a tied
  // model's `decoder.output_projection.weight` when it equals the embedding.
  void load(const std::string& path);
  void save(const std::string& path) const;

  // Where each tensor sits in the flat buffer (elements).
  const BlockOffsets& block(int i) const { return blocks_[i]; }
  // The span [first, last) of the flat buffer holding a group of tensors (with their padding):
  // block i, subsampler j's score weights, its bypass scales, the final norm, the embedding
  // (with the head when tied) and the untied head (empty when tied). The spans tile the buffer.
  struct Span {
    int64_t first = 0, last = 0;
  };
  Span block_span(int i) const { return block_span_[i]; }
  Span score_span(int j) const { return score_span_[j]; }
  Span bypass_span(int j) const { return bypass_span_[j]; }
  Span final_norm_span() const { return final_norm_span_; }
  Span embed_span() const { return embed_span_; }
  Span head_span() const { return head_span_; }
  // Bytes kernels read for the tensors in `s` (typed matrices at their size, with scales).
  double read_bytes(Span s) const;
  int64_t score_offset(int j) const { return score_offset_[j]; }
  int64_t bypass_offset(int j) const { return bypass_offset_[j]; }
  int64_t embed_offset() const { return embed_offset_; }
  int64_t final_norm_offset() const { return final_norm_offset_; }
  int64_t head_offset() const { return cfg_.tie_weights ? embed_offset_ : head_offset_; }
  // RoPE cos/sin tables, (context, head_dim / 2) each, in backend memory.
  const Tensor& rope_cos() const { return rope_cos_; }
  const Tensor& rope_sin() const { return rope_sin_; }

 private:
  ModelConfig cfg_;
  Structure structure_;
  Backend* backend_;
  std::vector<ParamInfo> params_;
  std::vector<BlockOffsets> blocks_;
  std::vector<int64_t> score_offset_, bypass_offset_;  // per subsampler j
  int64_t embed_offset_ = 0, final_norm_offset_ = 0, head_offset_ = 0;
  std::vector<Span> block_span_, score_span_, bypass_span_;
  Span final_norm_span_, embed_span_, head_span_;
  int64_t num_params_ = 0;
  DType compute_dtype_ = DType::F32;
  Tensor buf_, compute_buf_, rope_cos_, rope_sin_;  // compute_buf_ empty when it would equal buf_
  std::shared_ptr<const void> mapping_;  // the mapped file buf_ points into (mapped weights only)

  enum class Buffer { allocate, none };
  Weights(ModelConfig cfg, Backend& backend, Buffer buffer);  // the layout; the buffer if asked
  bool map_file(const std::string& path);  // weights_mapped.cpp: points buf_ into the file, or false

  // Inference weight types (weight_types.cpp): the typed matrices, by offset, in typed_buf_.
  struct TypedMatrix {
    int64_t offset = 0, rows = 0, cols = 0;
    DType dtype = DType::F32;
    size_t byte_offset = 0, bytes = 0;
  };
  DType weight_dtype_ = DType::F32;
  std::vector<TypedMatrix> typed_;
  Tensor typed_buf_;
  const TypedMatrix* typed_at(int64_t offset) const;
  // Host fp32 parameters (num_params) into the master buffer, or, with typed matrices, the
  // matrices into their typed copies and the rest into the master buffer.
  void upload(const std::vector<float>& host);
  // A typed file (subllm quantize): true when `f` is one and has been loaded.
  bool load_typed(const SafetensorsFile& f);
  void save_typed(const std::string& path) const;
};

// The inference weight type a model.safetensors holds: "bf16" or "q8" when `subllm quantize`
// wrote it (metadata subllm_weight_type), else "f32".
std::string weight_file_type(const std::string& safetensors_path);

struct SessionState;  // plans, workspaces and traces; private to the model's sources

// One user of a Weights: runs training and inference passes with its own activation plans
// (cached per batch, length and mode), workspaces, knobs, random context, traces and
// retention counts. Sessions on one Weights may run concurrently on different threads.
class Session {
 public:
  explicit Session(const Weights& weights);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const Weights& weights() const { return w_; }

  // tokens, targets: (B, T) row-major host arrays; targets < 0 are ignored. Returns the mean
  // loss over counted targets. Gradients of (mean loss * grad_multiplier) are ADDED to
  // `grads` (backend memory in the weights' layout), so micro-batches accumulate.
  float forward_backward(float* grads, const int32_t* tokens, const int32_t* targets, int B, int T,
                         float grad_multiplier = 1.0f);
  // Forward only. Writes the (B, T, V) logits to host memory when `logits` is given; returns
  // the mean loss when targets are given (else 0). Inference mode runs one sequence at a time.
  float forward(const int32_t* tokens, const int32_t* targets, int B, int T, float* logits = nullptr,
                Mode mode = Mode::Inference);

  // The global training step and seed: they fix the schedules and every random choice of
  // the next training-mode passes (the same context gives the same choices).
  void set_train_context(long step, uint64_t seed);
  SubllmKnobs& knobs() { return knobs_; }
  const SubllmKnobs& knobs() const { return knobs_; }
  // The keep threshold of subsampler j (knobs().keep_thresholds[j] if set, else keep_threshold).
  float keep_threshold(int j) const;
  // The last pass's choices at each subsampler, read from the backend on request.
  std::vector<SubsamplerTrace> last_traces() const;
  // Statistics of the last pass's scores, reduced on the backend.
  std::vector<ScoreStats> score_stats() const;
  // Tokens seen and kept at each subsampler over inference-mode passes since the last reset.
  void reset_retention_stats();
  std::vector<double> retention() const;

  // Inference with a cache: runs n new tokens of one sequence (positions cache.length ..)
  // and appends to the cache. Writes the logits (host memory) of all n rows, or of the last
  // row only. Equals the inference-mode forward() over the whole sequence, token for token.
  // `reserve_tokens`: room made up front for this many tokens in every block (a hint).
  SequenceCache new_cache(int reserve_tokens = 0) const;
  // The dtype new caches hold keys and values in (every block's, SUBLLM's inner ones too): the
  // compute dtype by default; BF16 under F32 compute on a backend that reads it (the CPU).
  void set_kv_dtype(DType dt);
  DType kv_dtype() const { return kv_dtype_set_ ? kv_dtype_ : w_.compute_dtype(); }
  void forward_cached(SequenceCache& cache, const int32_t* tokens, int n, float* logits, bool all_rows);
  // One step of several sequences at once (continuous batching): step i runs steps[i].n new
  // tokens of its own cache (a decode step is n = 1, a prefill chunk n > 1). Logits are
  // written to host memory step after step: n rows for an all_rows step, else its last row,
  // (sum of those rows, V) in all. Each step gives what forward_cached would give it alone
  // (with its own keep thresholds); the caches must be distinct.
  struct CachedStep {
    SequenceCache* cache = nullptr;
    const int32_t* tokens = nullptr;  // (n) host
    int n = 0;
    bool all_rows = false;
    // This sequence's keep threshold per subsampler (host, num_subsamplers values); null: the
    // session's (keep_threshold(j)).
    const float* keep_thresholds = nullptr;
    // Optional out (n) host: how deep each new token went, the number of nested subsamplers
    // that kept it on its deepest path (0: dropped by the first one it met, or no subsamplers).
    uint8_t* depth = nullptr;
  };
  void forward_cached_batch(const std::vector<CachedStep>& steps, float* logits);

  // Bytes of planned activation memory for (B, T) in training.
  size_t activation_bytes(int B, int T) const;

  // Called during forward_backward each time a span of the gradient buffer has received the
  // pass's last contribution (offsets in elements, in the weights' layout): block by block
  // in backward order, each subsampler after its inner blocks, then the final norm and head,
  // the embedding last. A data-parallel trainer starts the all-reduce of the span there, so
  // communication overlaps the rest of the backward; with micro-batches only the last
  // pass's calls matter. The spans of one pass tile the buffer.
  using GradReady = std::function<void(int64_t first, int64_t last)>;
  void on_grad_ready(GradReady fn) { grad_ready_ = std::move(fn); }

 private:
  const Weights& w_;
  SubllmKnobs knobs_;
  long train_step_ = 0;
  uint64_t train_seed_ = 0;
  std::vector<int64_t> seen_, kept_;
  GradReady grad_ready_;
  DType kv_dtype_ = DType::F32;
  bool kv_dtype_set_ = false;
  std::unique_ptr<SessionState> st_;
  friend struct Pass;
};

class Model {
 public:
  // Validates the config; parameters start at zero. `device` names the backend ("cpu").
  explicit Model(ModelConfig cfg, const std::string& device = "cpu");
  // For inference: the weights of `weights_path` (mapped where Weights' file constructor can),
  // and no gradient buffer, so training passes are refused.
  Model(ModelConfig cfg, const std::string& device, const std::string& weights_path);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  Weights& weights() { return weights_; }
  const Weights& weights() const { return weights_; }
  Session& session() { return *session_; }
  Backend& backend() const { return weights_.backend(); }

  const ModelConfig& config() const { return weights_.config(); }
  const std::vector<ParamInfo>& params() const { return weights_.params(); }
  const ParamInfo& param_info(const std::string& name) const { return weights_.param_info(name); }
  int64_t num_params() const { return weights_.num_params(); }
  // Backend memory (host memory on the CPU backend).
  float* param_data() { return weights_.data(); }
  // The gradient buffer, allocated on first use (inference never touches it).
  float* grad_data();
  Tensor param(const std::string& name);
  Tensor grad(const std::string& name);

  void init_weights(uint64_t seed) { weights_.init(seed); }
  void load(const std::string& path) { weights_.load(path); }
  void save(const std::string& path) const { weights_.save(path); }

  void zero_grad();
  float forward_backward(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_multiplier = 1.0f) {
    return session_->forward_backward(grad_data(), tokens, targets, B, T, grad_multiplier);
  }
  float forward(const int32_t* tokens, const int32_t* targets, int B, int T, float* logits = nullptr,
                Mode mode = Mode::Inference) {
    return session_->forward(tokens, targets, B, T, logits, mode);
  }

  void set_train_context(long step, uint64_t seed) { session_->set_train_context(step, seed); }
  SubllmKnobs& knobs() { return session_->knobs(); }
  std::vector<SubsamplerTrace> last_traces() const { return session_->last_traces(); }
  std::vector<ScoreStats> score_stats() const { return session_->score_stats(); }
  void reset_retention_stats() { session_->reset_retention_stats(); }
  std::vector<double> retention() const { return session_->retention(); }
  const Structure& structure() const { return weights_.structure(); }

  SequenceCache new_cache(int reserve_tokens = 0) const { return session_->new_cache(reserve_tokens); }
  void set_kv_dtype(DType dt) { session_->set_kv_dtype(dt); }
  void forward_cached(SequenceCache& cache, const int32_t* tokens, int n, float* logits, bool all_rows) {
    session_->forward_cached(cache, tokens, n, logits, all_rows);
  }
  float keep_threshold(int j) const { return session_->keep_threshold(j); }

  size_t activation_bytes(int B, int T) const { return session_->activation_bytes(B, T); }
  // Matmul FLOPs per trained token at length T: 6 * (matrix params of each block, weighted by
  // the fraction of tokens its segment sees) + causal attention + the output projection.
  double train_flops_per_token(int T) const;
  // Tokens per sequence at each segment in training mode (segment 0 = T).
  std::vector<int> segment_lengths(int T) const;

 private:
  Weights weights_;
  Tensor grads_;
  std::unique_ptr<Session> session_;
};

}  // namespace subllm
