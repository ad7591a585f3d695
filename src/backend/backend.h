#pragma once
// The device under the model: memory, copies, synchronisation and every kernel the model and
// the optimizers need. One instance per device and stream; `backend_for` (registry.cpp) is the
// only place in the code that chooses a device. Layers above call these methods on views and
// never look at tensor data themselves.
//
// Views carry pointer, dtype, shape and row stride. Conventions follow kernels.h: matrices are
// row-major with N = B*T rows; backward methods ACCUMULATE (+=) into parameter gradients and
// overwrite activation gradients unless stated otherwise. Methods that need working memory take
// caller-provided `Scratch` sized by the matching *_scratch_bytes query; no kernel allocates.
//
// Dtypes by role. A backend computes in its compute_dtype() (F32 on the CPU, BF16 on a GPU):
//  - activations (anything of B*T rows of features: streams, q/k/v, attention output, SwiGLU
//    input and output, their gradients, the KV cache, the head's logit chunk) and parameters
//    read by kernels (the compute copy of the weights) are of the compute dtype;
//  - parameter gradients, master weights, optimizer state, per-row statistics (rstd, lse,
//    scores and their gradients, subsampling weights), RoPE tables and the user-facing logits
//    are F32; indices are I32; reductions F64.
// A view of a dtype a kernel does not take is refused with a clear error.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "subllm/tensor.h"

namespace subllm {

// rows x cols elements of `dtype`, row stride `ld` elements. A vector is (n, 1) with ld 1.
struct View {
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 1, ld = 1;

  float* f32() const;
  int32_t* i32() const;
  double* f64() const;
  int64_t* i64() const;
  uint8_t* u8() const;
  int64_t numel() const { return rows * cols; }
  explicit operator bool() const { return data != nullptr; }
  // Columns [c0, c0 + n) of every row (e.g. the k part of a fused qkv matrix).
  View cols_at(int64_t c0, int64_t n) const;
  // Rows [r0, r0 + n).
  View rows_at(int64_t r0, int64_t n) const;
};

View mat(const float* p, int64_t rows, int64_t cols, int64_t ld = 0);  // ld 0: cols
View vec(const float* p, int64_t n);
View ivec(const int32_t* p, int64_t n);
View dvec(const double* p, int64_t n);
// A tensor as (elements / last dim, last dim); 1-D tensors as (n, 1).
View view_of(const Tensor& t);

struct Scratch {
  void* data = nullptr;
  size_t bytes = 0;
};
inline Scratch scratch_of(const Tensor& t) { return Scratch{t.raw(), t.nbytes()}; }

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // The dtype of activations and of the weights' compute copy (see above).
  virtual DType compute_dtype() const { return DType::F32; }
  // Inference weight types: whether linear_forward, embedding_forward and lm_head_xent without
  // gradients take weight matrices of `dt` (BF16 or Q8 read by F32-activation kernels on the
  // CPU). Every backend takes its compute dtype.
  virtual bool takes_weight_dtype(DType dt) const { return dt == compute_dtype(); }
  // Whether attention_cached reads key/value caches of `dt` (a BF16 cache under F32 compute on
  // the CPU). Every backend takes its compute dtype.
  virtual bool takes_kv_dtype(DType dt) const { return dt == compute_dtype(); }

  // ---- memory (device pointers; bytes) ---------------------------------------------------
  virtual void* alloc(size_t bytes) = 0;  // 64-byte aligned, uninitialised
  virtual void free(void* p) = 0;
  virtual void to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void zero(void* p, size_t bytes) = 0;
  // Readies [p, p + bytes) of an allocation for writing, keeping its contents: host memory gets
  // its pages mapped now rather than one fault at a time at first touch (device memory is
  // ready at alloc). A hint for memory about to be filled row by row, such as a cache.
  virtual void commit(void* p, size_t bytes) { (void)p, (void)bytes; }
  virtual void sync() = 0;
  // Runs `step`, the kernels of one forward step over `rows` rows. The CPU backend keeps its
  // threads in one team through a small step (decoding: dozens of kernels of microseconds
  // each), so its kernels do not start and end a parallel region each.
  virtual void run_step(int64_t rows, const std::function<void()>& step) { (void)rows, step(); }
  // Device memory allocated through this backend now and at its peak since the last reset
  // (0 on the CPU, whose memory is the process's RSS).
  virtual size_t device_bytes_in_use() const { return 0; }
  virtual size_t device_peak_bytes() const { return 0; }
  virtual void reset_device_peak() {}
  // Owned device memory released with the last reference.
  std::shared_ptr<void> alloc_shared(size_t bytes);
  Tensor empty(Shape shape, DType dt = DType::F32);  // uninitialised
  Tensor zeros(Shape shape, DType dt = DType::F32);

  // dst = src converted elementwise (F32 <-> compute dtype; same dtype: a copy); equal shapes,
  // both strided.
  virtual void convert(View src, View dst) = 0;

  // ---- dense algebra -------------------------------------------------------------------
  // y(N,out) = x(N,in) · w(out,in)^T (+ y if accumulate); w may be of an inference weight
  // type the backend takes (takes_weight_dtype)
  virtual void linear_forward(View x, View w, View y, bool accumulate = false) = 0;
  // dx(N,in) (=|+=) dy · w ; dw(out,in) += dy^T · x; either output may be empty
  virtual void linear_backward(View x, View w, View dy, View dx, View dw, bool accumulate_dx = false) = 0;

  // The subsampler's score layer: scores(N) = x(N,C) · w(C) (a one-output linear layer whose
  // scores are F32), and its backward: dx (=|+=) dscores ⊗ w, dw(C) += dscores^T · x.
  virtual void score_forward(View x, View w, View scores) = 0;
  virtual void score_backward(View x, View w, View dscores, View dx, View dw, bool accumulate_dx) = 0;

  // ---- rows --------------------------------------------------------------------------------
  // dst(n, cols) = src(idx[i]) for i < n; any 4-byte dtype (rows of floats, or int32 values)
  virtual void gather_rows(View src, View idx, View dst) = 0;
  // dst(idx[i]) += src(i); idx must not repeat
  virtual void scatter_add_rows(View src, View idx, View dst) = 0;
  // dst(rows, cols) = src(rows, cols), both strided
  virtual void copy_rows(View src, View dst) = 0;
  // pos(B*T) = offset + t for token t of each sequence
  virtual void fill_positions(View pos, int B, int T, int offset) = 0;

  // ---- embedding, norms, RoPE, SwiGLU --------------------------------------------------------
  virtual void embedding_forward(View tokens, View table, View out) = 0;
  virtual void embedding_backward(View tokens, View dout, View dtable) = 0;
  // y = x · rstd · g
  virtual void rmsnorm_forward(View x, View g, View y, View rstd, float eps) = 0;
  virtual size_t rmsnorm_scratch_bytes(int C) const = 0;
  virtual void rmsnorm_backward(View x, View g, View rstd, View dy, View dx, View dg, bool accumulate_dx,
                                Scratch s) = 0;
  // cos, sin: (max_pos, head_dim / 2)
  virtual void rope_table(View cos, View sin, int head_dim, float base) = 0;
  // x (n, nheads * head_dim) in place at positions pos(n); inverse rotates back
  virtual void rope_apply(View x, View pos, View cos, View sin, int head_dim, bool inverse) = 0;
  // gu(N, 2F) = [gate | up] -> a(N, F) = silu(gate) · up
  virtual void swiglu_forward(View gu, View a) = 0;
  virtual void swiglu_backward(View gu, View da, View dgu) = 0;

  // ---- attention -------------------------------------------------------------------------
  // q, o: (B*T, H*hd) strided views; k, v: (B*T, Hkv*hd), Hkv dividing H (grouped-query
  // attention: query head h reads key/value head h / (H / Hkv); the kernels take Hkv from k's
  // width, attention_kv_heads); lse (B, H, T). Causal within each sequence. In the backward,
  // dk and dv of a key/value head sum over its query heads, deterministically.
  virtual size_t attention_scratch_bytes(int B, int T, int H, int hd, bool backward) const = 0;
  virtual void attention_forward(View q, View k, View v, View o, View lse, int B, int T, int H, Scratch s) = 0;
  virtual void attention_backward(View q, View k, View v, View o, View dout, View lse, View dq, View dk, View dv,
                                  int B, int T, int H, Scratch s) = 0;
  // q (m, H*hd): the last m of the L cached rows of k, v (L, Hkv*hd); query i sees rows [0, L-m+i]
  virtual size_t attention_cached_scratch_bytes(int m, int L, int H, int hd) const = 0;
  virtual void attention_cached(View q, View k, View v, View out, int H, Scratch s) = 0;
  // attention_cached of several sequences, each against its own cache (a batched decoding
  // step): items[i] = {q (m_i, H*hd), k, v (L_i, H*hd), out (m_i, H*hd)}; max_m, max_L bound
  // every item's. The default is one attention_cached per item.
  struct CachedAttention {
    View q, k, v, out;
  };
  virtual size_t attention_cached_many_scratch_bytes(int max_m, int max_L, int H, int hd) const {
    return attention_cached_scratch_bytes(max_m, max_L, H, hd);
  }
  virtual void attention_cached_many(const CachedAttention* items, int count, int H, Scratch s) {
    for (int i = 0; i < count; ++i) attention_cached(items[i].q, items[i].k, items[i].v, items[i].out, H, s);
  }

  // ---- output head -------------------------------------------------------------------------
  // Fused projection + softmax cross-entropy over x(N,C), w(V,C), targets(N) (< 0: ignored;
  // an empty view: none, for logits only), `chunk` (chunk_rows, V) at a time. Writes out(2, f64) = {summed loss, counted rows}.
  // With dx: gradient of (sum loss) · grad_scale into dx (overwritten) and dw (+=).
  // With logits: the full (N, V) logits.
  virtual void lm_head_xent(View x, View w, View targets, float grad_scale, View dx, View dw, View logits,
                            View chunk, View out) = 0;

  // ---- SUBLLM: subsampling, upsampling, bypass (SUBLLM.md §2, §4, §7) ------------------------
  // Training selection: in each of B sequences of scores (B, Tp) keep the top Tc (equal scores
  // keep sequence order), in sequence order. kept (B*Tc): parent row; partner (B*Tc): parent row
  // of the discarded rank paired with it (kept rank r with Tc + r, or Tc + (Tc-1-r) when
  // `flip`), or -1; w (B*Tc) = clamp(s_kept) - clamp(s_partner).
  virtual size_t select_top_scratch_bytes(int Tp) const = 0;
  virtual void select_top(View scores, int B, int Tc, bool flip, View kept, View partner, View w, Scratch s) = 0;
  // Inference selection in one sequence: keep row t when scores[t] > threshold and
  // tokens[t] != pad. kept (n), w (n) = clamp(s, 0, 1); count(1, i32) = n.
  virtual void select_threshold(View scores, View tokens, float threshold, int pad, View kept, View w,
                                View count) = 0;
  // Upsample + bypass on kept rows: out[kept[i]] = x[kept[i]] + c ⊙ w[i] · (y[i] - x[kept[i]]).
  // Rows of out not kept are left as they are (the caller copies x there, or out is x).
  virtual void upsample_bypass_forward(View x, View y, View kept, View w, View c, View out) = 0;
  // Its backward. dout (parent rows, C) holds d(out) and becomes d(x) of the direct path;
  // dy (rows, C) = d(y); dw (rows) = d(w); dc (C) = d(c) (overwritten).
  virtual size_t upsample_bypass_scratch_bytes(int C) const = 0;
  virtual void upsample_bypass_backward(View x, View y, View kept, View w, View c, View dout, View dy, View dw,
                                        View dc, Scratch s) = 0;
  // d(w) of kept rows -> d(scores) over the parent rows through w = clamp(s_kept) - clamp(s_partner)
  virtual void selection_backward(View dw, View kept, View partner, View scores, View dscores) = 0;
  // The score balancer's edit of dscores (kernels::balancer_backward).
  virtual size_t balancer_scratch_bytes(int64_t n) const = 0;
  virtual void balancer_backward(View scores, View dscores, double m_min, double m_max, double r_min, double r_max,
                                 double grad_scale, double p_target, double p_window, Scratch s) = 0;
  // gc (C) += dc, where a dc that would push c further outside [lo, hi] is reversed first (if limit)
  virtual void bypass_limit_accumulate(View dc, View c, float lo, float hi, bool limit, View gc) = 0;
  // out(3, f64) = {fraction of scores > threshold, RMS of scores, mean clamp(s, 0, 1) over kept}
  // scores (B*Tp), kept (B*Tc) parent rows
  virtual void score_stats(View scores, View kept, float threshold, View out) = 0;

  // ---- reductions and optimizers -----------------------------------------------------------
  virtual void scale(View x, float s) = 0;
  // dst += src, elementwise over equal F32 vectors
  virtual void add(View dst, View src) = 0;
  // out(1, f64) = sum of x²
  virtual void sum_squares(View x, View out) = 0;
  // torch.optim.AdamW on flat p, g, m, v
  virtual void adamw_step(View p, View g, View m, View v, float lr, float beta1, float beta2, float eps,
                          float weight_decay, int step) = 0;
  // ScaledAdam over a fixed split of the flat buffers into chunks (kernels/optimizer_kernels.h):
  // per-tensor sums out(n_tensors, 3) f64 of g², p·g and (optionally) p²; gradient scaling;
  // the elementwise update with per-tensor step_coef, scale_step (f32) and clamp flags (u8).
  struct Chunks {
    View tensor, begin, end;  // (n) i32, i64, i64
  };
  virtual size_t optim_sums_scratch_bytes(int n_chunks) const = 0;
  virtual void optim_chunk_sums(View p, View g, const Chunks& ch, int n_tensors, bool want_param_sq, View out,
                                Scratch s) = 0;
  virtual void optim_scale_chunks(View g, const Chunks& ch, float factor) = 0;
  virtual void scaled_adam_update(View p, View g, View v, View m, const Chunks& ch, View step_coef, View scale_step,
                                  View clamp, float clamp_max, float inv_bc2, float b1, float one_minus_b1, float b2,
                                  float one_minus_b2, float eps) = 0;
};

// The balancer's mean/std bound for a positive fraction p: 0.814 * atanh(2p - 1), which
// approximates erfinv(2p - 1) (SUBLLM.md §7).
double balancer_mean_bound(double p);

// The key/value head count of an attention call: k's width over the head size q.cols / H,
// checked (equal k and v widths, a divisor of H); `op` names the call in errors.
int attention_kv_heads(const View& q, const View& k, const View& v, int H, const char* op);

// The backend for a --device value: "cpu", "cuda" (bf16 compute) or "cuda:fp32" (fp32 compute,
// for verification); an unknown or unavailable device is an Error naming the choices.
// Instances live for the program.
Backend& backend_for(const std::string& device);
std::vector<std::string> backend_names();
bool backend_available(const std::string& device, std::string* why);  // declared in subllm/model.h
// The CPU backend (the default device).
Backend& cpu_backend();

}  // namespace subllm
