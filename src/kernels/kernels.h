#pragma once
// The CPU kernels: every op the model needs, as forward/backward pairs on raw pointers,
// implemented in kernels/cpu/. The CPU backend (backend/cpu_backend.cpp) is their caller;
// layers above reach them only through the Backend interface (backend/backend.h).
//
// Conventions: activations are row-major matrices of N = B*T rows; `ld` is the row stride
// in elements. Backward functions ACCUMULATE (+=) into parameter gradients and overwrite
// activation gradients unless stated otherwise.
#include <cstddef>
#include <cstdint>
#include <functional>

namespace subllm::kernels {

// ---- threads ------------------------------------------------------------------------------
// Runs `step` on the calling thread with the kernels' threads kept in one team until it
// returns (kernels/cpu/team.h): a step of many short parallel kernels (decoding a token) then
// pays no parallel region per kernel. Exceptions from `step` reach the caller.
void run_in_team(const std::function<void()>& step);
// Whether a step over `rows` rows gains from run_in_team: every parallel kernel it calls runs
// on the team (matrix-vector products of up to 4 rows, cached attention), none falls back to
// a single thread, and no thread waits on another's core (no more threads than cores).
bool team_takes_step(int64_t rows);

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
// scratch: workers * C floats
void rmsnorm_backward(const float* x, const float* g, const float* rstd, const float* dy, float* dx, float* dg, int n,
                      int C, bool accumulate_dx, float* scratch);

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
// q has H heads, k and v Hkv (grouped-query attention; Hkv divides H): query head h reads
// key/value head h / (H / Hkv). Hkv = H is multi-head attention, Hkv = 1 multi-query.
// o: (B*T, ld_o) same head layout; lse: (B, H, T) log-sum-exp of the scaled scores.
// scale = 1/sqrt(hd).
// scratch: workers * attention_scratch_bytes(hd, false), 64-byte aligned.
void attention_forward(const float* q, const float* k, const float* v, int ld_qkv, float* o, int ld_o, float* lse,
                       int B, int T, int H, int Hkv, int hd, float* scratch);
// Recomputes the scores; writes (overwrites) dq, dk, dv with row stride ld_dqkv; dk and dv of
// a key/value head sum over the query heads of its group, in head order (deterministic).
void attention_backward(const float* q, const float* k, const float* v, int ld_qkv, const float* o, int ld_o,
                        const float* dout, const float* lse, float* dq, float* dk, float* dv, int ld_dqkv, int B,
                        int T, int H, int Hkv, int hd, float* scratch);

// New queries against a cache: q (m, ld_q) are the last m of L positions, k/v (L, ld_kv) the
// cache including them; query i attends to cache rows [0, L - m + i]. Forward only.
// scratch: workers * attention_cached_scratch_floats(L, hd) floats.
void attention_cached(const float* q, int ld_q, int m, const float* k, const float* v, int ld_kv, int L, int H,
                      int Hkv, int hd, float* out, int ld_o, float* scratch);
size_t attention_cached_scratch_floats(int L, int hd);
// attention_cached of several sequences, each against its own cache (query head h reading
// key/value head h / (H / Hkv)), in one parallel region
// (a batched decoding step). scratch: workers * attention_cached_many_scratch_floats(max_L, H,
// hd) floats, max_L the longest cache. k and v: F32 here; F32 or BF16 for attention_cached_blocks.
struct CachedAttentionItem {
  const float* q;
  int ld_q, m;
  const void *k, *v;
  int ld_kv, L;
  float* out;
  int ld_o;
};
void attention_cached_many(const CachedAttentionItem* items, int count, int max_L, int H, int Hkv, int hd,
                           float* scratch);
size_t attention_cached_many_scratch_floats(int max_L, int H, int hd);

// attention_cached of several sequences' query rows at once, in blocks of cache rows (16 to
// 64, about an eighth of the rows a query sees), the caches F32 or BF16, query
// head h reading key/value head h / (H / Hkv). Each block gives per head its max score, the
// sum of exponentials and the weighted values; a row's blocks are combined in order, so a
// row's result does not depend on how rows and blocks are shared among threads: many rows go
// a row per thread, a few (one sequence decoding) have their blocks shared out, each thread
// streaming a contiguous part of the cache. Runs where attention_blocks_take(hd) (AVX-512, hd
// a multiple of 16). scratch: attention_blocks_scratch_floats(max_L, H, hd, workers) floats,
// max_L the longest cache (each thread's scores, and the blocks' partials).
bool attention_blocks_take(int hd);
void attention_cached_blocks(const CachedAttentionItem* items, int count, int H, int Hkv, int hd, bool bf16_cache,
                             float* scratch);
size_t attention_blocks_scratch_floats(int max_L, int H, int hd, int workers);

// Per-thread working memory of the attention kernels in bytes (independent of T), a multiple of 64.
size_t attention_scratch_bytes(int hd, bool backward);

// ---- balancer (SUBLLM.md §7): a backward-only edit of the gradient d of n values x seen as
// one channel: d += |d| * g, g = d(constraint loss)/dx rescaled to RMS grad_scale. The loss
// keeps mean/std in [m_min, m_max] and the RMS in [r_min, r_max]; inside both, d is unchanged.
// With p_target >= 0 the mean/std term is driven by the counted fraction p of positive x
// instead: its gradient is weighted by clamp((p - p_target) / p_window, -1, 1) (full strength
// at the window's edges and beyond, none at the target) and multiplied by the mean |d| of the
// elements whose d is not 0, rather than each element's own |d|, so it also moves values whose
// own gradient is 0.
// scratch: n doubles.
void balancer_backward(const float* x, float* d, int64_t n, double* scratch, double m_min, double m_max, double r_min,
                       double r_max, double grad_scale, double p_target = -1, double p_window = 0);
// The paper's mean/std bound for a positive fraction p: 0.814 * atanh(2p - 1), which
// approximates erfinv(2p - 1). (A normal variable positive with probability p has a mean/std
// sqrt(2) times that, so the bounds admit fewer positive values than p.)
double proportion_positive_to_mean(double p);

// ---- SwiGLU on the packed w12 output ----------------------------------------------------
// gu(N, 2F) = [gate | up]; a(N,F) = silu(gate) * up
void swiglu_forward(const float* gu, float* a, int n, int F);
// dgu(N,2F) overwritten from da(N,F)
void swiglu_backward(const float* gu, const float* da, float* dgu, int n, int F);

// ---- rows -------------------------------------------------------------------------------
// dst(i, :) = src(idx[i], :) for i < n; elements of 4 bytes (floats or int32 values).
void gather_rows(const void* src, int64_t ld_src, const int32_t* idx, void* dst, int64_t ld_dst, int64_t n, int cols);
// dst(idx[i], :) += src(i, :); idx has no repeats.
void scatter_add_rows(const float* src, int64_t ld_src, const int32_t* idx, float* dst, int64_t ld_dst, int64_t n,
                      int cols);
// dst(r, :) = src(r, :) for r < rows; elements of 4 bytes.
void copy_rows(const void* src, int64_t ld_src, void* dst, int64_t ld_dst, int64_t rows, int cols);
// pos(b*T + t) = offset + t
void fill_positions(int32_t* pos, int B, int T, int offset);

// ---- SUBLLM subsampling, upsampling and bypass ------------------------------------------
// Training selection in B sequences of Tp scores: the top Tc of each (ties in sequence order),
// kept in sequence order; partner: the discarded rank paired with each kept rank (Tc + r, or
// Tc + (Tc-1-r) when flip), -1 past the end; w = clamp(s_kept) - clamp(s_partner).
// scratch: 2 * Tp int32.
void select_top(const float* scores, int B, int Tp, int Tc, bool flip, int32_t* kept, int32_t* partner, float* w,
                int32_t* scratch);
// Inference selection: rows t < n with scores[t] > threshold and tokens[t] != pad, ascending.
// Returns how many; w = clamp(s, 0, 1).
int select_threshold(const float* scores, const int32_t* tokens, int n, float threshold, int pad, int32_t* kept,
                     float* w);
// out[kept[i]] = x[kept[i]] + c * w[i] * (y[i] - x[kept[i]]) for i < rows; out may be x.
void upsample_bypass_forward(const float* x, const float* y, const int32_t* kept, const float* w, const float* c,
                             float* out, int64_t rows, int C);
// Backward of the above with out = x elsewhere: dout (parent rows, C) holds d(out) on entry and
// d(x) of the direct path on return; dy (rows, C) and dw (rows) are overwritten, dc (C) too.
// scratch: workers * C floats (per-thread partial sums of dc, added in thread order).
void upsample_bypass_backward(const float* x, const float* y, const int32_t* kept, const float* w, const float* c,
                              float* dout, float* dy, float* dw, float* dc, int64_t rows, int C, float* scratch);
// dscores(np) = d/ds of sum_i dw[i] * (clamp(s[kept[i]]) - clamp(s[partner[i]])), zero where
// the clamp is flat.
void selection_backward(const float* dw, const int32_t* kept, const int32_t* partner, int64_t rows,
                        const float* scores, float* dscores, int64_t np);
// gc += dc, with dc reversed first where it pushes c further outside [lo, hi] (when limit).
void bypass_limit_accumulate(const float* dc, const float* c, float lo, float hi, bool limit, float* gc, int C);
// out = {fraction of scores > threshold, RMS, mean clamp(scores[kept[i]], 0, 1)}
void score_stats(const float* scores, int64_t n, const int32_t* kept, int64_t nkept, float threshold, double* out);

// ---- elementwise ------------------------------------------------------------------------
void scale_inplace(float* y, float s, int64_t n);
double sum_squares(const float* x, int64_t n);

// ---- output projection + softmax cross-entropy, fused and chunked ----------------------
// x(N,C) final hidden states, w(V,C) output weight, targets(N) (negative = ignored; null: none).
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
