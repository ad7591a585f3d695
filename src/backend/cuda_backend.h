#pragma once
// The CUDA backend: one GPU and one stream. Its kernels live under src/kernels/cuda/, one op
// family per file, each file defining the CudaBackend methods of its family; cuBLASLt does the
// GEMMs (gemm.cu). Compiled only when the build has CUDA (SUBLLM_CUDA).
//
// Every method enqueues on stream() and returns without waiting, except those that hand a value
// to the host (to_host) and sync(). Kernels accept the dtypes of backend.h's role table:
// activations and the weights' compute copy in F32 or BF16 (BF16 math accumulates in F32),
// statistics, gradients of parameters and optimizer state in F32.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>
#include <unordered_map>

#include "backend/backend.h"

namespace subllm {

// Throws an Error naming `what` and CUDA's message when `e` is not cudaSuccess.
void cuda_check(cudaError_t e, const char* what);
// The same after a kernel launch (cudaGetLastError).
void cuda_check_launch(const char* what);

class CudaBackend final : public Backend {
 public:
  // `compute` is BF16 (the default device "cuda") or F32 ("cuda:fp32").
  CudaBackend(int device, DType compute);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return compute_ == DType::BF16 ? "cuda" : "cuda:fp32"; }
  DType compute_dtype() const override { return compute_; }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  int sm_count() const { return sm_count_; }
  const cudaDeviceProp& props() const { return props_; }

  // D(m, n) = alpha · op(A) · op(B) + beta · D, row-major views; op = transpose when the flag
  // is set. A and B share a dtype (F32 or BF16); D is F32 or of A's dtype. Accumulates in F32
  // (F32 inputs: full fp32, no TF32). One cuBLASLt call on stream() with the backend's workspace.
  void gemm(View a, bool trans_a, View b, bool trans_b, View d, float alpha, float beta);
  // Device memory for the partial sums of reductions that take no scratch (sum_squares):
  // kReduceBytes right after the cuBLASLt workspace, in the same allocation. Everything runs on
  // one stream, so a matmul and a reduction never use their parts at the same time.
  static constexpr size_t kReduceBytes = size_t(64) << 10;
  void* reduce_buffer() const { return static_cast<char*>(lt_workspace_) + lt_workspace_bytes_; }

  size_t device_bytes_in_use() const override { return in_use_; }
  size_t device_peak_bytes() const override { return peak_; }
  void reset_device_peak() override { peak_ = in_use_; }

  // ---- memory (memory.cu) --------------------------------------------------------------
  void* alloc(size_t bytes) override;
  void free(void* p) override;
  void to_device(void* dst, const void* host_src, size_t bytes) override;
  void to_host(void* host_dst, const void* src, size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override;
  void zero(void* p, size_t bytes) override;
  void sync() override;
  void convert(View src, View dst) override;

  // ---- dense algebra (gemm.cu) -------------------------------------------------------------
  void linear_forward(View x, View w, View y, bool accumulate) override;
  void linear_backward(View x, View w, View dy, View dx, View dw, bool accumulate_dx) override;
  // ---- score layer (subsample.cu) ----------------------------------------------------------
  void score_forward(View x, View w, View scores) override;
  void score_backward(View x, View w, View dscores, View dx, View dw, bool accumulate_dx) override;

  // ---- rows (rows.cu) ----------------------------------------------------------------------
  void gather_rows(View src, View idx, View dst) override;
  void scatter_add_rows(View src, View idx, View dst) override;
  void copy_rows(View src, View dst) override;
  void fill_positions(View pos, int B, int T, int offset) override;

  // ---- embedding, norms, RoPE, SwiGLU (elementwise.cu) -------------------------------------
  void embedding_forward(View tokens, View table, View out) override;
  void embedding_backward(View tokens, View dout, View dtable) override;
  void rmsnorm_forward(View x, View g, View y, View rstd, float eps) override;
  size_t rmsnorm_scratch_bytes(int C) const override;
  void rmsnorm_backward(View x, View g, View rstd, View dy, View dx, View dg, bool accumulate_dx, Scratch s) override;
  void rope_table(View cos, View sin, int head_dim, float base) override;
  void rope_apply(View x, View pos, View cos, View sin, int head_dim, bool inverse) override;
  void swiglu_forward(View gu, View a) override;
  void swiglu_backward(View gu, View da, View dgu) override;

  // ---- attention (attention.cu, attention_cached.cu) ---------------------------------------
  size_t attention_scratch_bytes(int B, int T, int H, int hd, bool backward) const override;
  void attention_forward(View q, View k, View v, View o, View lse, int B, int T, int H, Scratch s) override;
  void attention_backward(View q, View k, View v, View o, View dout, View lse, View dq, View dk, View dv, int B,
                          int T, int H, Scratch s) override;
  size_t attention_cached_scratch_bytes(int m, int L, int H, int hd) const override;
  void attention_cached(View q, View k, View v, View out, int H, Scratch s) override;

  // ---- output head (lm_head.cu) ------------------------------------------------------------
  void lm_head_xent(View x, View w, View targets, float grad_scale, View dx, View dw, View logits, View chunk,
                    View out) override;

  // ---- SUBLLM (subsample.cu) ---------------------------------------------------------------
  size_t select_top_scratch_bytes(int Tp) const override;
  void select_top(View scores, int B, int Tc, bool flip, View kept, View partner, View w, Scratch s) override;
  void select_threshold(View scores, View tokens, float threshold, int pad, View kept, View w, View count) override;
  void upsample_bypass_forward(View x, View y, View kept, View w, View c, View out) override;
  size_t upsample_bypass_scratch_bytes(int C) const override;
  void upsample_bypass_backward(View x, View y, View kept, View w, View c, View dout, View dy, View dw, View dc,
                                Scratch s) override;
  void selection_backward(View dw, View kept, View partner, View scores, View dscores) override;
  size_t balancer_scratch_bytes(int64_t n) const override;
  void balancer_backward(View scores, View dscores, double m_min, double m_max, double r_min, double r_max,
                         double grad_scale, double p_target, double p_window, Scratch s) override;
  void bypass_limit_accumulate(View dc, View c, float lo, float hi, bool limit, View gc) override;
  void score_stats(View scores, View kept, float threshold, View out) override;

  // ---- reductions and optimizers (optimizer.cu) --------------------------------------------
  void scale(View x, float s) override;
  void add(View dst, View src) override;
  void sum_squares(View x, View out) override;
  void adamw_step(View p, View g, View m, View v, float lr, float beta1, float beta2, float eps, float weight_decay,
                  int step) override;
  size_t optim_sums_scratch_bytes(int n_chunks) const override;
  void optim_chunk_sums(View p, View g, const Chunks& ch, int n_tensors, bool want_param_sq, View out,
                        Scratch s) override;
  void optim_scale_chunks(View g, const Chunks& ch, float factor) override;
  void scaled_adam_update(View p, View g, View v, View m, const Chunks& ch, View step_coef, View scale_step,
                          View clamp, float clamp_max, float inv_bc2, float b1, float one_minus_b1, float b2,
                          float one_minus_b2, float eps) override;

 private:
  int device_ = 0;
  DType compute_ = DType::BF16;
  cudaStream_t stream_ = nullptr;
  cudaDeviceProp props_{};
  int sm_count_ = 0;
  cublasLtHandle_t lt_ = nullptr;
  void* lt_workspace_ = nullptr;
  size_t lt_workspace_bytes_ = 0;
  size_t in_use_ = 0, peak_ = 0;
  std::unordered_map<void*, size_t> sizes_;  // live allocations
};

// Number of CUDA devices this process can use (0 when the driver or a GPU is missing), and why
// none when 0.
int cuda_device_count(std::string* why = nullptr);

}  // namespace subllm
