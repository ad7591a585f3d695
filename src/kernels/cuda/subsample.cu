// The CUDA backend's SUBLLM kernels (SUBLLM.md §2, §4, §7): the score layer, top-k and
// threshold selection, upsampling with the learned bypass, the selection's backward, the
// score balancer, the bypass-scale limit and the score statistics. The CPU kernels
// (kernels/cpu/subsample.cpp, balancer.cpp) are the specification: same tie rules, pairing and
// clamps. Every reduction runs in a fixed order (per-block partials, fixed trees), so results do
// not depend on scheduling.
#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/cuda/common.cuh"

namespace subllm {

namespace {

using cuda::bf16;
using cuda::load;
using cuda::store;
using cuda::fail;
using cuda::vec_len;
using cuda::need_len;
using cuda::need_mat;

// ---- view checks (host) -------------------------------------------------------------------


void need_view(const View& v, const char* op, const char* operand) {
  if (!v) fail(op, std::string(operand) + " is empty");
}




// An operand that must share x's (compute) dtype.
void same_dtype(const View& x, const View& v, const char* op, const char* operand) {
  if (v.dtype != x.dtype)
    fail(op, std::string(operand) + " must be of x's dtype " + dtype_name(x.dtype) + ", got " + dtype_name(v.dtype));
}

void need_scratch(const Scratch& s, size_t bytes, const char* op) {
  if (bytes && (!s.data || s.bytes < bytes))
    fail(op, "scratch of " + std::to_string(s.bytes) + " bytes, needs " + std::to_string(bytes));
}

// Enough blocks of `threads` to cover n elements, capped near a few waves of the GPU (the
// kernels loop over the rest).
unsigned capped_grid(int64_t n, int threads, int sm_count) {
  const int64_t cap = (int64_t)std::max(sm_count, 1) * 16;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(cuda::grid_for(n, threads), cap));
}

// ---- device helpers -----------------------------------------------------------------------

constexpr unsigned kFull = 0xffffffffu;

// std::clamp(s, 0, 1) exactly (a NaN stays NaN, as on the CPU).
__device__ __forceinline__ float clamp01(float s) { return s < 0.0f ? 0.0f : (1.0f < s ? 1.0f : s); }

// Sum over the warp by a fixed butterfly; every lane gets the total.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024) in a fixed order; every
// thread gets the total. `sh` holds 32 values; calls may follow one another with the same sh.
template <class T>
__device__ T block_sum(T v, T* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers of sh are done
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  T r = lane < nw ? sh[lane] : T(0);
  return warp_sum(r);
}

// Exclusive prefix sum of `flag` over the block in thread order; *total = the block's sum.
// `sh` holds 32 ints; calls may follow one another with the same sh.
__device__ int block_exclusive_scan(int flag, int* sh, int* total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int incl = flag;  // inclusive scan within the warp
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) sh[wid] = incl;
  __syncthreads();
  int before = 0, all = 0;
  for (int k = 0; k < nw; ++k) {
    const int s = sh[k];
    if (k < wid) before += s;
    all += s;
  }
  *total = all;
  return before + incl - flag;
}

// ---- score layer --------------------------------------------------------------------------

constexpr int kWarpRowsThreads = 256;  // 8 warps, one row each

// scores(N) = x(N, C) · w(C): one warp per row, f32 accumulation.
template <class T>
__global__ void score_forward_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ w,
                                     float* __restrict__ scores, int64_t N, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // this warp's row
  if (row >= N) return;
  const T* xr = x + row * ldx;
  float acc = 0.0f;
  for (int c = lane; c < C; c += 32) acc += load(xr + c) * load(w + c);
  acc = warp_sum(acc);
  if (lane == 0) scores[row] = acc;
}

// dx(N, C) (=|+=) dscores(N) ⊗ w(C), one thread per element (grid-stride).
template <class T>
__global__ void score_dx_kernel(const float* __restrict__ ds, const T* __restrict__ w, T* __restrict__ dx,
                                int64_t lddx, int64_t N, int C, bool accumulate) {
  const int64_t n = N * C, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t i = e / C;
    const int c = (int)(e - i * C);  // row and column of flat element e
    T* p = dx + i * lddx + c;
    const float g = ds[i] * load(w + c);
    store(p, accumulate ? load(p) + g : g);
  }
}

// dw(C) += dscores(N)^T · x(N, C). Block (32, 32): threadIdx.x picks a column of this block's
// 32, threadIdx.y a row phase (rows y, y + 32, ... in order); the 32 phase sums are added in
// phase order. Deterministic, no scratch.
template <class T>
__global__ void score_dw_kernel(const T* __restrict__ x, int64_t ldx, const float* __restrict__ ds,
                                float* __restrict__ dw, int64_t N, int C) {
  __shared__ float part[32][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.0f;
  if (c < C)
    for (int64_t i = threadIdx.y; i < N; i += 32) acc += ds[i] * load(x + i * ldx + c);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = 0.0f;
    for (int k = 0; k < 32; ++k) s += part[k][threadIdx.x];
    dw[c] += s;
  }
}

// ---- top-k selection ----------------------------------------------------------------------

constexpr int kSelectThreads = 1024;

// A key whose unsigned order is the score order: -0 equals +0, and a NaN sorts below every
// number (NaNs among themselves by position). The CPU's sort has no defined order for NaNs.
__device__ __forceinline__ uint32_t order_key(float s) {
  uint32_t b = __float_as_uint(s);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN
  if ((b & 0x7fffffffu) == 0u) b = 0u;               // -0 -> +0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // negatives reversed below positives
}

// One block per sequence b = b0 + blockIdx.x of scores (B, Tp). Rank of position i = how many
// positions beat it (j beats i: higher score, or equal score and j < i), which is the CPU's
// stable sort. The top Tc ranks are kept, in sequence order; kept rank r is paired with the
// discarded rank Tc + r (Tc + Tc-1-r when flip). Working memory: 2*Tp int32, either the dynamic
// shared memory (area == nullptr) or the caller's scratch (one sequence per launch).
//   kept, partner, w: (B*Tc), written at b*Tc + (index among the sequence's kept positions).
__global__ void select_top_kernel(const float* __restrict__ scores, int Tp, int Tc, bool flip, int b0,
                                  int32_t* __restrict__ kept, int32_t* __restrict__ partner, float* __restrict__ w,
                                  int32_t* global_area) {
  extern __shared__ int32_t dyn_area[];
  __shared__ int scan_sh[32];
  int32_t* area = global_area ? global_area : dyn_area;
  int32_t* order = area;                                  // order[r]: position of rank r
  uint32_t* key = reinterpret_cast<uint32_t*>(area + Tp);  // first: key of each position
  int32_t* rank_of = area + Tp;                           // then (same memory): rank of each position
  const int b = b0 + blockIdx.x;
  const float* s = scores + (int64_t)b * Tp;
  const int tid = threadIdx.x, bd = blockDim.x;

  for (int t = tid; t < Tp; t += bd) key[t] = order_key(s[t]);
  __syncthreads();
  for (int i = tid; i < Tp; i += bd) {
    const uint32_t ki = key[i];
    int r = 0;
    for (int j = 0; j < i; ++j) r += key[j] >= ki;       // earlier: an equal score ranks first
    for (int j = i + 1; j < Tp; ++j) r += key[j] > ki;   // later: only a higher score does
    order[r] = i;
  }
  __syncthreads();  // every key read is done: rank_of may overwrite them
  for (int r = tid; r < Tp; r += bd) rank_of[order[r]] = r;
  __syncthreads();

  int base = 0;  // kept positions before this tile
  for (int t0 = 0; t0 < Tp; t0 += bd) {
    const int t = t0 + tid;
    const int r = t < Tp ? rank_of[t] : Tp;
    const int flag = r < Tc ? 1 : 0;
    int total;
    const int i = base + block_exclusive_scan(flag, scan_sh, &total);  // index among kept positions
    if (flag) {
      const int dr = Tc + (flip ? Tc - 1 - r : r);  // the discarded rank paired with kept rank r
      const int64_t o = (int64_t)b * Tc + i;
      kept[o] = (int32_t)((int64_t)b * Tp + t);
      const float sk = clamp01(s[t]);
      if (dr < Tp) {
        const int pt = order[dr];
        partner[o] = (int32_t)((int64_t)b * Tp + pt);
        w[o] = sk - clamp01(s[pt]);
      } else {
        partner[o] = -1;
        w[o] = sk - 0.0f;
      }
    }
    base += total;
  }
}

// ---- threshold selection ------------------------------------------------------------------

// One block: keep t when scores[t] > threshold and tokens[t] != pad, in order.
//   scores, tokens (n); kept, w (count); count (1).
__global__ void select_threshold_kernel(const float* __restrict__ scores, const int32_t* __restrict__ tokens, int n,
                                        float threshold, int pad, int32_t* __restrict__ kept, float* __restrict__ w,
                                        int32_t* __restrict__ count) {
  __shared__ int scan_sh[32];
  int base = 0;
  for (int t0 = 0; t0 < n; t0 += blockDim.x) {
    const int t = t0 + threadIdx.x;
    const int flag = (t < n && scores[t] > threshold && tokens[t] != pad) ? 1 : 0;
    int total;
    const int i = base + block_exclusive_scan(flag, scan_sh, &total);
    if (flag) {
      kept[i] = t;
      w[i] = clamp01(scores[t]);
    }
    base += total;
  }
  if (threadIdx.x == 0) *count = base;
}

// ---- upsampling and bypass ----------------------------------------------------------------

// out[kept[i]] = x[kept[i]] + c ⊙ w[i] · (y[i] - x[kept[i]]) for i < rows, one thread per
// element (grid-stride). out may be x: each element is read and written by one thread.
//   x, out (parent rows, C); y (rows, C); kept, w (rows); c (C).
template <class T>
__global__ void upsample_forward_kernel(const T* x, int64_t ldx, const T* __restrict__ y, int64_t ldy,
                                        const int32_t* __restrict__ kept, const float* __restrict__ w,
                                        const T* __restrict__ c, T* out, int64_t ldo, int64_t rows, int C) {
  const int64_t n = rows * C, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t i = e / C;
    const int ch = (int)(e - i * C);  // kept row and channel of flat element e
    const int64_t k = kept[i];
    const float xv = load(x + k * ldx + ch);
    store(out + k * ldo + ch, xv + load(c + ch) * w[i] * (load(y + i * ldy + ch) - xv));
  }
}

constexpr int kBypassParts = 64;  // row phases of dc's partial sums

// dc partials: part[p][ch] = sum over kept rows i ≡ p (mod kBypassParts), in order, of
// dout[kept[i]] · w[i] · (y[i] - x[kept[i]]). Grid (ceil(C / 256), kBypassParts). Runs before
// dout is overwritten.
template <class T>
__global__ void bypass_dc_partial_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ y, int64_t ldy,
                                         const int32_t* __restrict__ kept, const float* __restrict__ w,
                                         const T* __restrict__ dout, int64_t ldd, int64_t rows, int C,
                                         float* __restrict__ part) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = blockIdx.y;
  if (ch >= C) return;
  float acc = 0.0f;
  for (int64_t i = p; i < rows; i += kBypassParts) {
    const int64_t k = kept[i];
    const float xv = load(x + k * ldx + ch);
    acc += load(dout + k * ldd + ch) * w[i] * (load(y + i * ldy + ch) - xv);
  }
  part[(int64_t)p * C + ch] = acc;
}

// One block per kept row i: dy[i] = d · c · w[i]; dw[i] = sum_ch d · c · (y - x);
// d[kept[i]] *= 1 - c · w[i], where d = dout[kept[i]].
template <class T>
__global__ void bypass_rows_backward_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ y, int64_t ldy,
                                            const int32_t* __restrict__ kept, const float* __restrict__ w,
                                            const T* __restrict__ c, T* dout, int64_t ldd, T* dy, int64_t lddy,
                                            float* __restrict__ dw, int C) {
  __shared__ float sh[32];
  const int64_t i = blockIdx.x, k = kept[i];
  const float wi = w[i];
  float dwi = 0.0f;
  for (int ch = threadIdx.x; ch < C; ch += blockDim.x) {
    T* dp = dout + k * ldd + ch;
    const float d = load(dp), cv = load(c + ch);
    const float diff = load(y + i * ldy + ch) - load(x + k * ldx + ch);
    store(dy + i * lddy + ch, d * cv * wi);
    dwi += d * cv * diff;
    store(dp, d * (1.0f - cv * wi));
  }
  dwi = block_sum(dwi, sh);
  if (threadIdx.x == 0) dw[i] = dwi;
}

// dc(C) = sum over p in order of part[p][ch].
__global__ void bypass_dc_final_kernel(const float* __restrict__ part, float* __restrict__ dc, int C) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= C) return;
  float s = 0.0f;
  for (int p = 0; p < kBypassParts; ++p) s += part[(int64_t)p * C + ch];
  dc[ch] = s;
}

// ---- selection backward -------------------------------------------------------------------

// dscores (zeroed before) [kept[i]] += dw[i], [partner[i]] -= dw[i], skipping rows whose score
// is outside [0, 1] (their gradient through the clamp is 0). Every parent row receives at most
// one term (kept rows are distinct, each discarded row has one partner), so the atomics never
// meet and the result is exact.
__global__ void selection_backward_kernel(const float* __restrict__ dw, const int32_t* __restrict__ kept,
                                          const int32_t* __restrict__ partner, int64_t rows,
                                          const float* __restrict__ scores, float* __restrict__ dscores) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const float g = dw[i];
  const int32_t k = kept[i];
  const float sk = scores[k];
  if (sk >= 0.0f && sk <= 1.0f) atomicAdd(dscores + k, g);
  if (partner) {
    const int32_t p = partner[i];
    if (p >= 0) {
      const float sp = scores[p];
      if (sp >= 0.0f && sp <= 1.0f) atomicAdd(dscores + p, -g);
    }
  }
}

// ---- balancer -----------------------------------------------------------------------------

constexpr int kBalThreads = 256, kBalBlocks = 256;

struct BalancerSums {
  double sum, sum_sq, sum_abs_d;
  long long with_grad, positive;
};
struct BalancerState {
  double mean, sd, m, rms, dm, dr, dm_sign, mean_abs_d, scale;
  int active, var_live, rms_live;
};
// Scratch layout: BalancerSums[kBalBlocks], double[kBalBlocks] (g² partials), BalancerState.
constexpr size_t kBalSumsOff = 0;
constexpr size_t kBalGsqOff = kBalSumsOff + sizeof(BalancerSums) * kBalBlocks;
constexpr size_t kBalStateOff = kBalGsqOff + sizeof(double) * kBalBlocks;
constexpr size_t kBalBytes = kBalStateOff + (sizeof(BalancerState) + 63) / 64 * 64;

// Per-block sums over a grid-stride share of x, d (n): sum x, sum x², sum |d|, #(d != 0), #(x > 0).
__global__ void balancer_sums_kernel(const float* __restrict__ x, const float* __restrict__ d, int64_t n,
                                     BalancerSums* __restrict__ part) {
  __shared__ double shd[32];
  __shared__ long long shl[32];
  double sum = 0, sum_sq = 0, sum_abs_d = 0;
  long long with_grad = 0, positive = 0;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float xv = x[i], dv = d[i];
    sum += xv;
    sum_sq += (double)xv * xv;
    sum_abs_d += fabs((double)dv);
    with_grad += dv != 0.0f;
    positive += xv > 0;
  }
  sum = block_sum(sum, shd);
  sum_sq = block_sum(sum_sq, shd);
  sum_abs_d = block_sum(sum_abs_d, shd);
  with_grad = block_sum(with_grad, shl);
  positive = block_sum(positive, shl);
  if (threadIdx.x == 0) part[blockIdx.x] = BalancerSums{sum, sum_sq, sum_abs_d, with_grad, positive};
}

__device__ __forceinline__ double max_d(double a, double b) { return a < b ? b : a; }  // std::max

// One block: the statistics from the partials, and the loss derivatives dm, dr (balancer.cpp).
__global__ void balancer_stats_kernel(const BalancerSums* __restrict__ part, int nparts, int64_t n, double m_min,
                                      double m_max, double r_min, double r_max, double p_target, double p_window,
                                      BalancerState* __restrict__ st) {
  __shared__ double shd[32];
  __shared__ long long shl[32];
  const int t = threadIdx.x;  // blockDim.x >= nparts
  const bool has = t < nparts;
  const double sum = block_sum(has ? part[t].sum : 0.0, shd);
  const double sum_sq = block_sum(has ? part[t].sum_sq : 0.0, shd);
  const double sum_abs_d = block_sum(has ? part[t].sum_abs_d : 0.0, shd);
  const long long with_grad = block_sum(has ? part[t].with_grad : 0ll, shl);
  const long long positive = block_sum(has ? part[t].positive : 0ll, shl);
  if (t != 0) return;
  const double nd = (double)n;
  const double mean = sum / nd, uvar = sum_sq / nd;
  const double excess = uvar - __dmul_rn(mean, mean);  // no fused multiply-add: as the CPU rounds
  const double var = max_d(excess, 1e-20), sd = sqrt(var), rms = sqrt(max_d(uvar, 1e-20));
  const double m = mean / sd;
  const bool counted = p_target >= 0;
  double dm;
  if (counted) {
    const double v = ((double)positive / nd - p_target) / p_window;
    dm = v < -1.0 ? -1.0 : (1.0 < v ? 1.0 : v);  // std::clamp(v, -1, 1)
  } else {
    dm = m > m_max ? 1.0 : (m < m_min ? -1.0 : 0.0);
  }
  const double dr = rms > r_max ? 1.0 / rms : (rms < r_min ? -1.0 / rms : 0.0);
  BalancerState s;
  s.mean = mean;
  s.sd = sd;
  s.m = m;
  s.rms = rms;
  s.dm = dm;
  s.dr = dr;
  s.dm_sign = dm > 0 ? 1.0 : (dm < 0 ? -1.0 : 0.0);
  s.mean_abs_d = with_grad ? sum_abs_d / (double)with_grad : 0.0;
  s.scale = 0.0;
  s.active = !(dm == 0.0 && dr == 0.0);
  s.var_live = excess > 1e-20;
  s.rms_live = uvar > 1e-20;
  *st = s;
}

// The mean/std term's gradient at x and the RMS term's (balancer.cpp's gm[i] and gr(i)).
__device__ __forceinline__ double balancer_gm(const BalancerState& s, float x, int64_t n) {
  return s.var_live ? (1.0 - s.m * ((double)x - s.mean) / s.sd) / ((double)n * s.sd) : 1.0 / ((double)n * s.sd);
}
__device__ __forceinline__ double balancer_gr(const BalancerState& s, float x, int64_t n) {
  return s.dr * (s.rms_live ? (double)x / ((double)n * s.rms) : 0.0);
}

// Per-block sums of g² with g = sign(dm) · gm + gr, when the balancer acts.
__global__ void balancer_gsq_kernel(const float* __restrict__ x, int64_t n, const BalancerState* __restrict__ stp,
                                    double* __restrict__ part) {
  __shared__ double shd[32];
  const BalancerState s = *stp;
  if (!s.active) return;  // uniform over the grid
  double acc = 0;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double g = s.dm_sign * balancer_gm(s, x[i], n) + balancer_gr(s, x[i], n);
    acc += g * g;
  }
  acc = block_sum(acc, shd);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

// One block: scale = grad_scale / max(RMS of g, 1e-20).
__global__ void balancer_scale_kernel(const double* __restrict__ part, int nparts, int64_t n, double grad_scale,
                                      BalancerState* __restrict__ st) {
  __shared__ double shd[32];
  if (!st->active) return;
  const double g_sq = block_sum(threadIdx.x < nparts ? part[threadIdx.x] : 0.0, shd);
  if (threadIdx.x == 0) st->scale = grad_scale / max_d(sqrt(g_sq / (double)n), 1e-20);
}

// The edit of d (n), one thread per element.
__global__ void balancer_apply_kernel(const float* __restrict__ x, float* __restrict__ d, int64_t n, bool counted,
                                      const BalancerState* __restrict__ stp) {
  const BalancerState s = *stp;
  if (!s.active) return;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float xv = x[i], dv = d[i];
    const double ad = fabs((double)dv), gm = balancer_gm(s, xv, n), gr = balancer_gr(s, xv, n);
    if (counted)
      d[i] = (float)(dv + (s.mean_abs_d * s.dm * gm + ad * gr) * s.scale);
    else
      d[i] = (float)(dv + ad * (s.dm * gm + gr) * s.scale);
  }
}

// ---- bypass limit, statistics -------------------------------------------------------------

// gc(C) += dc, reversed first where it would push c further outside [lo, hi] (if limit).
__global__ void bypass_limit_kernel(const float* __restrict__ dc, const float* __restrict__ c, float lo, float hi,
                                    bool limit, float* __restrict__ gc, int64_t C) {
  const int64_t ch = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= C) return;
  float d = dc[ch];
  if (limit) {
    if (d > 0 && c[ch] < lo) d = -d;
    if (d < 0 && c[ch] > hi) d = -d;
  }
  gc[ch] += d;
}

// One block: out(3) = {fraction of scores > threshold, RMS of scores, mean clamp01 over kept}.
__global__ void score_stats_kernel(const float* __restrict__ scores, int64_t n, const int32_t* __restrict__ kept,
                                   int64_t nkept, float threshold, double* __restrict__ out) {
  __shared__ double shd[32];
  __shared__ long long shl[32];
  double sq = 0, wsum = 0;
  long long above = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float s = scores[i];
    sq += (double)s * s;
    above += s > threshold;
  }
  for (int64_t i = threadIdx.x; i < nkept; i += blockDim.x) wsum += clamp01(scores[kept[i]]);
  sq = block_sum(sq, shd);
  wsum = block_sum(wsum, shd);
  above = block_sum(above, shl);
  if (threadIdx.x == 0) {
    out[0] = n ? (double)above / (double)n : 0.0;
    out[1] = n ? sqrt(sq / (double)n) : 0.0;
    out[2] = nkept ? wsum / (double)nkept : 0.0;
  }
}

}  // namespace

// ---- score layer ----------------------------------------------------------------------------

void CudaBackend::score_forward(View x, View w, View scores) {
  const char* op = "score_forward";
  need_view(x, op, "x");
  need_view(w, op, "w");
  need_view(scores, op, "scores");
  const int64_t N = x.rows, C = x.cols;
  need_mat(x, N, C, op, "x");
  same_dtype(x, w, op, "w");
  need_len(w, C, op, "w");
  cuda::expect(scores, DType::F32, op, "scores");
  need_len(scores, N, op, "scores");
  if (N == 0) return;
  cuda::dispatch_float(x.dtype, op, [&](auto t) {
    using T = decltype(t);
    const unsigned blocks = (unsigned)((N + kWarpRowsThreads / 32 - 1) / (kWarpRowsThreads / 32));
    score_forward_kernel<T><<<blocks, kWarpRowsThreads, 0, stream_>>>(cuda::ptr<const T>(x), x.ld, cuda::ptr<const T>(w),
                                                                       scores.f32(), N, (int)C);
  });
  cuda_check_launch(op);
}

void CudaBackend::score_backward(View x, View w, View dscores, View dx, View dw, bool accumulate_dx) {
  const char* op = "score_backward";
  need_view(x, op, "x");
  need_view(w, op, "w");
  need_view(dscores, op, "dscores");
  const int64_t N = x.rows, C = x.cols;
  need_mat(x, N, C, op, "x");
  same_dtype(x, w, op, "w");
  need_len(w, C, op, "w");
  cuda::expect(dscores, DType::F32, op, "dscores");
  need_len(dscores, N, op, "dscores");
  if (dx) {
    same_dtype(x, dx, op, "dx");
    need_mat(dx, N, C, op, "dx");
  }
  if (dw) {
    cuda::expect(dw, DType::F32, op, "dw");
    need_len(dw, C, op, "dw");
  }
  if (N == 0 || C == 0) return;
  cuda::dispatch_float(x.dtype, op, [&](auto t) {
    using T = decltype(t);
    if (dx) {
      score_dx_kernel<T><<<capped_grid(N * C, 256, sm_count_), 256, 0, stream_>>>(
          dscores.f32(), cuda::ptr<const T>(w), cuda::ptr<T>(dx), dx.ld, N, (int)C, accumulate_dx);
      cuda_check_launch("score_backward (dx)");
    }
    if (dw) {
      score_dw_kernel<T><<<(unsigned)((C + 31) / 32), dim3(32, 32), 0, stream_>>>(cuda::ptr<const T>(x), x.ld,
                                                                                  dscores.f32(), dw.f32(), N, (int)C);
      cuda_check_launch("score_backward (dw)");
    }
  });
}

// ---- selection ------------------------------------------------------------------------------

size_t CudaBackend::select_top_scratch_bytes(int Tp) const { return sizeof(int32_t) * 2 * (size_t)std::max(Tp, 0); }

void CudaBackend::select_top(View scores, int B, int Tc, bool flip, View kept, View partner, View w, Scratch s) {
  const char* op = "select_top";
  need_view(scores, op, "scores");
  cuda::expect(scores, DType::F32, op, "scores");
  if (B <= 0) fail(op, "B must be positive, got " + std::to_string(B));
  const int64_t np = vec_len(scores, op, "scores");
  if (np % B) fail(op, std::to_string(np) + " scores do not split into " + std::to_string(B) + " sequences");
  const int64_t Tp64 = np / B;
  if (Tp64 > INT32_MAX) fail(op, "sequences are too long");
  const int Tp = (int)Tp64;
  if (Tc < 0 || Tc > Tp) fail(op, "Tc = " + std::to_string(Tc) + " is outside [0, " + std::to_string(Tp) + "]");
  const int64_t rows = (int64_t)B * Tc;
  const auto output = [&](const View& v, const char* name, DType dt) {
    need_view(v, op, name);
    cuda::expect(v, dt, op, name);
    need_len(v, rows, op, name);
  };
  output(kept, "kept", DType::I32);
  output(partner, "partner", DType::I32);
  output(w, "w", DType::F32);
  const size_t bytes = select_top_scratch_bytes(Tp);
  need_scratch(s, bytes, op);
  if (rows == 0) return;
  // Whole sequences in shared memory when they fit (one block each, all at once); otherwise one
  // sequence at a time in the caller's scratch.
  const size_t optin = (size_t)props_.sharedMemPerBlockOptin;
  if (bytes + 1024 <= optin) {
    if (bytes > 48 * 1024)
      cuda_check(cudaFuncSetAttribute(select_top_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
                 "select_top (cudaFuncSetAttribute)");
    select_top_kernel<<<(unsigned)B, kSelectThreads, bytes, stream_>>>(scores.f32(), Tp, Tc, flip, 0, kept.i32(),
                                                                       partner.i32(), w.f32(), nullptr);
    cuda_check_launch(op);
  } else {
    for (int b = 0; b < B; ++b) {
      select_top_kernel<<<1, kSelectThreads, 0, stream_>>>(scores.f32(), Tp, Tc, flip, b, kept.i32(), partner.i32(),
                                                           w.f32(), static_cast<int32_t*>(s.data));
      cuda_check_launch(op);
    }
  }
}

void CudaBackend::select_threshold(View scores, View tokens, float threshold, int pad, View kept, View w,
                                   View count) {
  const char* op = "select_threshold";
  need_view(scores, op, "scores");
  need_view(tokens, op, "tokens");
  need_view(kept, op, "kept");
  need_view(w, op, "w");
  need_view(count, op, "count");
  cuda::expect(scores, DType::F32, op, "scores");
  cuda::expect(tokens, DType::I32, op, "tokens");
  cuda::expect(kept, DType::I32, op, "kept");
  cuda::expect(w, DType::F32, op, "w");
  cuda::expect(count, DType::I32, op, "count");
  const int64_t n = vec_len(scores, op, "scores");
  if (n > INT32_MAX) fail(op, "too many scores");
  need_len(tokens, n, op, "tokens");
  if (vec_len(kept, op, "kept") < n) fail(op, "kept has fewer elements than scores");
  if (vec_len(w, op, "w") < n) fail(op, "w has fewer elements than scores");
  if (vec_len(count, op, "count") < 1) fail(op, "count is empty");
  select_threshold_kernel<<<1, 1024, 0, stream_>>>(scores.f32(), tokens.i32(), (int)n, threshold, pad, kept.i32(),
                                                   w.f32(), count.i32());
  cuda_check_launch(op);
}

// ---- upsampling and bypass ----------------------------------------------------------------

void CudaBackend::upsample_bypass_forward(View x, View y, View kept, View w, View c, View out) {
  const char* op = "upsample_bypass_forward";
  need_view(x, op, "x");
  need_view(y, op, "y");
  need_view(kept, op, "kept");
  need_view(w, op, "w");
  need_view(c, op, "c");
  need_view(out, op, "out");
  const int64_t C = x.cols, rows = vec_len(kept, op, "kept");
  cuda::expect(kept, DType::I32, op, "kept");
  cuda::expect(w, DType::F32, op, "w");
  need_len(w, rows, op, "w");
  need_mat(x, x.rows, C, op, "x");
  need_mat(out, x.rows, C, op, "out");
  need_mat(y, rows, C, op, "y");
  need_len(c, C, op, "c");
  same_dtype(x, y, op, "y");
  same_dtype(x, c, op, "c");
  same_dtype(x, out, op, "out");
  if (rows == 0 || C == 0) return;
  cuda::dispatch_float(x.dtype, op, [&](auto t) {
    using T = decltype(t);
    upsample_forward_kernel<T><<<capped_grid(rows * C, 256, sm_count_), 256, 0, stream_>>>(
        cuda::ptr<const T>(x), x.ld, cuda::ptr<const T>(y), y.ld, kept.i32(), w.f32(), cuda::ptr<const T>(c),
        cuda::ptr<T>(out), out.ld, rows, (int)C);
  });
  cuda_check_launch(op);
}

size_t CudaBackend::upsample_bypass_scratch_bytes(int C) const {
  return sizeof(float) * (size_t)kBypassParts * (size_t)std::max(C, 0);
}

void CudaBackend::upsample_bypass_backward(View x, View y, View kept, View w, View c, View dout, View dy, View dw,
                                           View dc, Scratch s) {
  const char* op = "upsample_bypass_backward";
  need_view(x, op, "x");
  need_view(y, op, "y");
  need_view(kept, op, "kept");
  need_view(w, op, "w");
  need_view(c, op, "c");
  need_view(dout, op, "dout");
  need_view(dy, op, "dy");
  need_view(dw, op, "dw");
  need_view(dc, op, "dc");
  const int64_t C = x.cols, rows = vec_len(kept, op, "kept");
  cuda::expect(kept, DType::I32, op, "kept");
  cuda::expect(w, DType::F32, op, "w");
  cuda::expect(dw, DType::F32, op, "dw");
  cuda::expect(dc, DType::F32, op, "dc");
  need_len(w, rows, op, "w");
  need_len(dw, rows, op, "dw");
  need_len(dc, C, op, "dc");
  need_len(c, C, op, "c");
  need_mat(x, x.rows, C, op, "x");
  need_mat(dout, x.rows, C, op, "dout");
  need_mat(y, rows, C, op, "y");
  need_mat(dy, rows, C, op, "dy");
  same_dtype(x, y, op, "y");
  same_dtype(x, c, op, "c");
  same_dtype(x, dout, op, "dout");
  same_dtype(x, dy, op, "dy");
  need_scratch(s, upsample_bypass_scratch_bytes((int)C), op);
  if (C == 0) return;
  float* part = static_cast<float*>(s.data);
  cuda::dispatch_float(x.dtype, op, [&](auto t) {
    using T = decltype(t);
    const T *xp = cuda::ptr<const T>(x), *yp = cuda::ptr<const T>(y), *cp = cuda::ptr<const T>(c);
    // dc's partials read dout before the row kernel overwrites it.
    bypass_dc_partial_kernel<T><<<dim3((unsigned)((C + 255) / 256), kBypassParts), 256, 0, stream_>>>(
        xp, x.ld, yp, y.ld, kept.i32(), w.f32(), cuda::ptr<const T>(dout), dout.ld, rows, (int)C, part);
    cuda_check_launch("upsample_bypass_backward (dc partials)");
    if (rows > 0) {
      bypass_rows_backward_kernel<T><<<(unsigned)rows, 256, 0, stream_>>>(xp, x.ld, yp, y.ld, kept.i32(), w.f32(), cp,
                                                                          cuda::ptr<T>(dout), dout.ld, cuda::ptr<T>(dy),
                                                                          dy.ld, dw.f32(), (int)C);
      cuda_check_launch("upsample_bypass_backward (rows)");
    }
  });
  bypass_dc_final_kernel<<<(unsigned)((C + 255) / 256), 256, 0, stream_>>>(part, dc.f32(), (int)C);
  cuda_check_launch("upsample_bypass_backward (dc)");
}

void CudaBackend::selection_backward(View dw, View kept, View partner, View scores, View dscores) {
  const char* op = "selection_backward";
  need_view(dw, op, "dw");
  need_view(kept, op, "kept");
  need_view(scores, op, "scores");
  need_view(dscores, op, "dscores");
  cuda::expect(dw, DType::F32, op, "dw");
  cuda::expect(kept, DType::I32, op, "kept");
  cuda::expect(scores, DType::F32, op, "scores");
  cuda::expect(dscores, DType::F32, op, "dscores");
  const int64_t rows = vec_len(kept, op, "kept"), np = vec_len(scores, op, "scores");
  need_len(dw, rows, op, "dw");
  need_len(dscores, np, op, "dscores");
  if (partner) {
    cuda::expect(partner, DType::I32, op, "partner");
    need_len(partner, rows, op, "partner");
  }
  if (np == 0) return;
  cuda_check(cudaMemsetAsync(dscores.data, 0, sizeof(float) * (size_t)np, stream_), "selection_backward (zero)");
  if (rows == 0) return;
  selection_backward_kernel<<<cuda::grid_for(rows, 256), 256, 0, stream_>>>(
      dw.f32(), kept.i32(), partner ? partner.i32() : nullptr, rows, scores.f32(), dscores.f32());
  cuda_check_launch(op);
}

// ---- balancer -------------------------------------------------------------------------------

size_t CudaBackend::balancer_scratch_bytes(int64_t) const { return kBalBytes; }

void CudaBackend::balancer_backward(View scores, View dscores, double m_min, double m_max, double r_min, double r_max,
                                    double grad_scale, double p_target, double p_window, Scratch s) {
  const char* op = "balancer_backward";
  need_view(scores, op, "scores");
  need_view(dscores, op, "dscores");
  cuda::expect(scores, DType::F32, op, "scores");
  cuda::expect(dscores, DType::F32, op, "dscores");
  const int64_t n = vec_len(scores, op, "scores");
  need_len(dscores, n, op, "dscores");
  need_scratch(s, balancer_scratch_bytes(n), op);
  if (n == 0) return;
  char* base = static_cast<char*>(s.data);
  auto* sums = reinterpret_cast<BalancerSums*>(base + kBalSumsOff);
  auto* gsq = reinterpret_cast<double*>(base + kBalGsqOff);
  auto* st = reinterpret_cast<BalancerState*>(base + kBalStateOff);
  // The grid depends on n only, so the summation order does too.
  const int blocks = (int)std::min<int64_t>(cuda::grid_for(n, kBalThreads), kBalBlocks);
  const float* x = scores.f32();
  float* d = dscores.f32();
  balancer_sums_kernel<<<blocks, kBalThreads, 0, stream_>>>(x, d, n, sums);
  cuda_check_launch("balancer_backward (sums)");
  balancer_stats_kernel<<<1, kBalBlocks, 0, stream_>>>(sums, blocks, n, m_min, m_max, r_min, r_max, p_target,
                                                       p_window, st);
  cuda_check_launch("balancer_backward (statistics)");
  balancer_gsq_kernel<<<blocks, kBalThreads, 0, stream_>>>(x, n, st, gsq);
  cuda_check_launch("balancer_backward (gradient norm)");
  balancer_scale_kernel<<<1, kBalBlocks, 0, stream_>>>(gsq, blocks, n, grad_scale, st);
  cuda_check_launch("balancer_backward (scale)");
  balancer_apply_kernel<<<capped_grid(n, 256, sm_count_), 256, 0, stream_>>>(x, d, n, p_target >= 0, st);
  cuda_check_launch("balancer_backward (apply)");
}

// ---- bypass limit, statistics ---------------------------------------------------------------

void CudaBackend::bypass_limit_accumulate(View dc, View c, float lo, float hi, bool limit, View gc) {
  const char* op = "bypass_limit_accumulate";
  need_view(dc, op, "dc");
  need_view(c, op, "c");
  need_view(gc, op, "gc");
  cuda::expect(dc, DType::F32, op, "dc");
  cuda::expect(c, DType::F32, op, "c");
  cuda::expect(gc, DType::F32, op, "gc");
  const int64_t C = vec_len(dc, op, "dc");
  need_len(c, C, op, "c");
  need_len(gc, C, op, "gc");
  if (C == 0) return;
  bypass_limit_kernel<<<cuda::grid_for(C, 256), 256, 0, stream_>>>(dc.f32(), c.f32(), lo, hi, limit, gc.f32(), C);
  cuda_check_launch(op);
}

void CudaBackend::score_stats(View scores, View kept, float threshold, View out) {
  const char* op = "score_stats";
  need_view(scores, op, "scores");
  need_view(out, op, "out");
  cuda::expect(scores, DType::F32, op, "scores");
  cuda::expect(out, DType::F64, op, "out");
  const int64_t n = vec_len(scores, op, "scores");
  int64_t nkept = 0;
  if (kept) {
    cuda::expect(kept, DType::I32, op, "kept");
    nkept = vec_len(kept, op, "kept");
  }
  if (vec_len(out, op, "out") < 3) fail(op, "out needs 3 elements");
  score_stats_kernel<<<1, 1024, 0, stream_>>>(scores.f32(), n, nkept ? kept.i32() : nullptr, nkept, threshold,
                                              out.f64());
  cuda_check_launch(op);
}

}  // namespace subllm
