#pragma once
// The kernel layer: every op the model needs, as forward/backward pairs on raw device
// pointers. This header is device-neutral; the CPU implementations live in kernels/cpu/.
// Layers above this one call only these functions and never look at the device.
//
// Conventions: activations are row-major matrices of N = B*T rows; `ld` is the row stride
// in elements. Backward functions ACCUMULATE (+=) into parameter gradients and overwrite
// activation gradients unless stated otherwise.
#include <cstddef>
#include <cstdint>

namespace subllm::kernels {

// ---- GEMM (the only entry to BLAS) ------------------------------------------------------
// C(M,N) = alpha * op(A) * op(B) + beta * C, row-major. op(X) = X or X^T.
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc);

// Y(N,out) = X(N,in) * W(out,in)^T (+ Y if accumulate)
void linear_forward(const float* x, const float* w, float* y, int n, int in, int out, bool accumulate = false);
// dX(N,in) (=|+=) dY * W ; dW(out,in) += dY^T * X
void linear_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int in, int out,
                     bool accumulate_dx = false);

// ---- embedding --------------------------------------------------------------------------
// out(N,C) = table[tokens[i]]; tokens must be in [0, V) (checked by the caller).
void embedding_forward(const int32_t* tokens, const float* table, float* out, int n, int C);
// dtable(V,C) += scatter of dout rows.
void embedding_backward(const int32_t* tokens, const float* dout, float* dtable, int n, int C, int V);

// ---- RMSNorm ----------------------------------------------------------------------------
// y = x * rstd * g, rstd(N) = 1/sqrt(mean(x^2) + eps)
void rmsnorm_forward(const float* x, const float* g, float* y, float* rstd, int n, int C, float eps);
// dx (=|+=) ; dg += ; uses saved rstd
void rmsnorm_backward(const float* x, const float* g, const float* rstd, const float* dy, float* dx, float* dg, int n,
                      int C, bool accumulate_dx);

// ---- RoPE (rotate-half, explicit positions) ---------------------------------------------
// Precomputed cos/sin for positions [0, max_pos) and head_dim; angle = pos * base^(-2i/hd).
struct RopeTable {
  int head_dim = 0;
  int max_pos = 0;
  float* cos = nullptr;  // (max_pos, head_dim/2)
  float* sin = nullptr;
};
void rope_table_fill(RopeTable& t, float base);
// In place on n rows of `nheads` heads each (row stride ld); pos(n) original positions.
// inverse=true rotates by the negative angle (the backward of the forward rotation).
void rope_apply(float* x, int ld, int n, int nheads, const int32_t* pos, const RopeTable& t, bool inverse);

// ---- causal attention (tiled, online softmax; O(T*hd) memory per head) ----------------
// q, k, v: rows of matrices with row stride ld_qkv; sequence b, token t, head h lives at
//   q[(b*T + t)*ld_qkv + h*hd .. + hd). Causal within each sequence of length T.
// o: (B*T, ld_o) same head layout; lse: (B, H, T) log-sum-exp of the scaled scores.
// scale = 1/sqrt(hd).
void attention_forward(const float* q, const float* k, const float* v, int ld_qkv, float* o, int ld_o, float* lse,
                       int B, int T, int H, int hd);
// Recomputes the scores; writes (overwrites) dq, dk, dv with row stride ld_dqkv.
void attention_backward(const float* q, const float* k, const float* v, int ld_qkv, const float* o, int ld_o,
                        const float* dout, const float* lse, float* dq, float* dk, float* dv, int ld_dqkv, int B,
                        int T, int H, int hd);

// New queries against a cache: q (m, ld_q) are the last m of L positions, k/v (L, ld_kv) the
// cache including them; query i attends to cache rows [0, L - m + i]. Forward only.
void attention_cached(const float* q, int ld_q, int m, const float* k, const float* v, int ld_kv, int L, int H, int hd,
                      float* out, int ld_o);

// Per-thread working memory of the attention kernels in bytes (independent of T).
size_t attention_scratch_bytes(int hd, bool backward);

// ---- balancer (SUBLLM.md §7): a backward-only edit of the gradient d of n values x seen as
// one channel: d += |d| * g, g = d(constraint loss)/dx rescaled to RMS grad_scale. The loss
// keeps mean/std in [m_min, m_max] and the RMS in [r_min, r_max]; inside both, d is unchanged.
// With p_target >= 0 the mean/std term is driven by the counted fraction p of positive x
// instead: its gradient is weighted by clamp((p - p_target) / p_window, -1, 1) (full strength
// at the window's edges and beyond, none at the target) and multiplied by the mean |d| of the
// elements whose d is not 0, rather than each element's own |d|, so it also moves values whose
// own gradient is 0.
void balancer_backward(const float* x, float* d, int64_t n, double m_min, double m_max, double r_min, double r_max,
                       double grad_scale, double p_target = -1, double p_window = 0);
// The paper's mean/std bound for a positive fraction p: 0.814 * atanh(2p - 1), which
// approximates erfinv(2p - 1). (A normal variable positive with probability p has a mean/std
// sqrt(2) times that, so the bounds admit fewer positive values than p.)
double proportion_positive_to_mean(double p);

// ---- SwiGLU on the packed w12 output ----------------------------------------------------
// gu(N, 2F) = [gate | up]; a(N,F) = silu(gate) * up
void swiglu_forward(const float* gu, float* a, int n, int F);
// dgu(N,2F) overwritten from da(N,F)
void swiglu_backward(const float* gu, const float* da, float* dgu, int n, int F);

// ---- elementwise ------------------------------------------------------------------------
void scale_inplace(float* y, float s, int64_t n);
double sum_squares(const float* x, int64_t n);

// ---- output projection + softmax cross-entropy, fused and chunked ----------------------
// x(N,C) final hidden states, w(V,C) output weight, targets(N) (negative = ignored).
// Returns the summed loss over non-ignored rows; `count` gets their number.
// If dx != nullptr: also computes the gradient of (sum loss) * grad_scale:
//   dx(N,C) overwritten, dw(V,C) accumulated.
// If logits != nullptr, the full (N,V) logits are written there (tests, evaluation).
// `scratch` must hold chunk_rows * V floats; rows are processed chunk_rows at a time so the
// full (N,V) logits never exist during training.
double lm_head_xent(const float* x, const float* w, const int32_t* targets, int n, int C, int V, float grad_scale,
                    float* dx, float* dw, float* logits, float* scratch, int chunk_rows, int64_t* count);

// ---- AdamW (decoupled weight decay, bias correction, like torch.optim.AdamW) -----------
void adamw_step(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, int step);

}  // namespace subllm::kernels
