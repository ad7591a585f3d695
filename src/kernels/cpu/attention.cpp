// Causal multi-head attention on the CPU, FlashAttention-2 style: 64x64 tiles, online
// softmax, no T x T matrix. The tile products run on two AVX-512 register-blocked
// micro-kernels (6 rows x 4 zmm of accumulators):
//   tile_bcast_x64: C(rows, 64)   = A(rows, K) * Bt(K, 64)    A broadcast, Bt row vectors
//   tile_acc      : C(rows, cols) (+)= a(rows, n) * X(n, cols) a broadcast, X row vectors
// Layouts are chosen so that neither kernel needs a transpose inside the inner loops:
// the forward keeps scores key-major (St[j][i]) so the softmax statistics of 64 queries
// are 4 vectors, and the backward transposes K and V once per key tile.
// Tiles are gathered from the strided fused buffers into contiguous scratch, in groups so
// each gather serves several tile pairs (see copy_rows for why).

// Built where AVX-512 is available; attention_portable.cpp serves every other target.
#ifdef __AVX512F__

// GCC 12 reports the intrinsics' internal _mm512_undefined_ps() placeholder as (maybe-)
// uninitialized once they are inlined; the placeholder is never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>

#include "kernels/kernels.h"

namespace subllm::kernels {
namespace {

constexpr int kBlk = 64;  // query and key tile size; also the 4-zmm width of tile_bcast_x64
constexpr int kMr = 6;    // register-block rows: 6 x 4 accumulators + 4 operands fit in 32 zmm
constexpr int kNoClip = 1 << 29;
constexpr int kFwdGroup = 4;  // query tiles per forward task
constexpr int kBwdGroup = 4;  // key tiles sharing one pass over the query tiles in backward

inline int round_up16(int x) { return (x + 15) & ~15; }
inline __mmask16 tail_mask(int n) { return (n % 16) ? (__mmask16)((1u << (n % 16)) - 1) : (__mmask16)0xFFFF; }

// Scores are kept in base-2 units (log2(e) is folded into the Q or K scaling), so the
// softmax needs 2^x: x = n + f with f = x - round(x) in [-1/2, 1/2] from one vreduceps,
// 2^f = e^(f ln2) by a degree-7 Taylor polynomial (relative error ~5e-9), then scalef by
// 2^n. Inputs below -200 give exactly 0 (scalef underflows), which is how masked (-inf)
// scores vanish; NaN propagates so bugs stay visible.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 n = _mm512_sub_ps(x, f);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// ---- micro-kernel 1: C[r][0..64) = sum_k A[r*lda + k] * Bt[k*64 + 0..64), r < R ----------
template <int R>
inline void bcast_x64(const float* __restrict A, int lda, const float* __restrict Bt, int K, float* __restrict C,
                      int ldc) {
  __m512 c[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) c[r][v] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const float* b = Bt + (size_t)k * kBlk;
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16), b2 = _mm512_load_ps(b + 32),
                 b3 = _mm512_load_ps(b + 48);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[(size_t)r * lda + k]);
      c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
      c[r][2] = _mm512_fmadd_ps(a, b2, c[r][2]);
      c[r][3] = _mm512_fmadd_ps(a, b3, c[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_store_ps(C + (size_t)r * ldc + v * 16, c[r][v]);
}

// C(rows, 64) = A(rows, K) * Bt(K, 64); Bt and C 64-byte aligned with row stride 64 / ldc.
void tile_bcast_x64(const float* A, int lda, int rows, const float* Bt, int K, float* C, int ldc) {
  int r = 0;
  for (; r + kMr <= rows; r += kMr) bcast_x64<kMr>(A + (size_t)r * lda, lda, Bt, K, C + (size_t)r * ldc, ldc);
  const float* a = A + (size_t)r * lda;
  float* c = C + (size_t)r * ldc;
  switch (rows - r) {
    case 1: bcast_x64<1>(a, lda, Bt, K, c, ldc); break;
    case 2: bcast_x64<2>(a, lda, Bt, K, c, ldc); break;
    case 3: bcast_x64<3>(a, lda, Bt, K, c, ldc); break;
    case 4: bcast_x64<4>(a, lda, Bt, K, c, ldc); break;
    case 5: bcast_x64<5>(a, lda, Bt, K, c, ldc); break;
    default: break;
  }
}

// ---- micro-kernel 2: C[r][v*16..] = C*rs[r] (kScale) or C, += sum_{k0<=k<k1} a(r,k) X[k][v*16..]
// a(r,k) = kAT ? a[k*lda + r] : a[r*lda + k]. The last of the NV vectors is loaded/stored
// under `last`, so C may be an output whose head width is not a multiple of 16.
template <int R, int NV, bool kAT, bool kScale>
inline void acc_block(const float* __restrict a, int lda, int k0, int k1, const float* __restrict X, int ldx,
                      float* __restrict C, int ldc, __mmask16 last, const float* __restrict rs) {
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      c[r][v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : (__mmask16)0xFFFF, C + (size_t)r * ldc + v * 16);
      if constexpr (kScale) c[r][v] = _mm512_mul_ps(c[r][v], _mm512_set1_ps(rs[r]));
    }
  }
  for (int k = k0; k < k1; ++k) {
    const float* x = X + (size_t)k * ldx;
    __m512 xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(x + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(kAT ? a[(size_t)k * lda + r] : a[(size_t)r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(av, xv[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(C + (size_t)r * ldc + v * 16, v == NV - 1 ? last : (__mmask16)0xFFFF, c[r][v]);
}

template <int R, bool kAT, bool kScale>
inline void acc_block_nv(int nv, const float* a, int lda, int k0, int k1, const float* X, int ldx, float* C, int ldc,
                         __mmask16 last, const float* rs) {
  switch (nv) {
    case 1: acc_block<R, 1, kAT, kScale>(a, lda, k0, k1, X, ldx, C, ldc, last, rs); break;
    case 2: acc_block<R, 2, kAT, kScale>(a, lda, k0, k1, X, ldx, C, ldc, last, rs); break;
    case 3: acc_block<R, 3, kAT, kScale>(a, lda, k0, k1, X, ldx, C, ldc, last, rs); break;
    default: acc_block<R, 4, kAT, kScale>(a, lda, k0, k1, X, ldx, C, ldc, last, rs); break;
  }
}

// C(rows, cols) (*= rs) += a(rows, n) * X(n, cols16), cols16 = round_up16(cols); X zero-padded
// (or simply readable) up to cols16. Causality lets row group [r0, r0+R) skip reduction
// indices outside [r0 - lo_off, r0 + R + hi_off): their coefficients are zero anyway.
template <bool kAT, bool kScale>
void tile_acc(const float* a, int lda, int rows, int n, int lo_off, int hi_off, const float* X, int ldx, int cols,
              float* C, int ldc, const float* rs) {
  const int cols16 = round_up16(cols);
  for (int c0 = 0; c0 < cols16; c0 += 64) {
    const int nv = std::min(4, (cols16 - c0) / 16);
    const __mmask16 last = (c0 + nv * 16 >= cols16) ? tail_mask(cols) : (__mmask16)0xFFFF;
    for (int r = 0; r < rows; r += kMr) {
      const int R = std::min(kMr, rows - r);
      const int k0 = std::max(0, r - lo_off);
      const int k1 = std::min(n, r + R + hi_off);
      const float* ar = kAT ? a + r : a + (size_t)r * lda;
      const float* xr = X + c0;
      float* cr = C + (size_t)r * ldc + c0;
      const float* rsr = rs ? rs + r : nullptr;
      switch (R) {
        case 1: acc_block_nv<1, kAT, kScale>(nv, ar, lda, k0, k1, xr, ldx, cr, ldc, last, rsr); break;
        case 2: acc_block_nv<2, kAT, kScale>(nv, ar, lda, k0, k1, xr, ldx, cr, ldc, last, rsr); break;
        case 3: acc_block_nv<3, kAT, kScale>(nv, ar, lda, k0, k1, xr, ldx, cr, ldc, last, rsr); break;
        case 4: acc_block_nv<4, kAT, kScale>(nv, ar, lda, k0, k1, xr, ldx, cr, ldc, last, rsr); break;
        case 5: acc_block_nv<5, kAT, kScale>(nv, ar, lda, k0, k1, xr, ldx, cr, ldc, last, rsr); break;
        default: acc_block_nv<6, kAT, kScale>(nv, ar, lda, k0, k1, xr, ldx, cr, ldc, last, rsr); break;
      }
    }
  }
}

// Per-thread scratch is a 64-byte aligned slice of the caller's; every section size is a
// multiple of 16 floats.

// Rows [0, rows) of a head slice copied into a contiguous, zero-padded (rows, hdp) block.
// Reading the fused buffer in place would be cheaper on paper, but its row stride (3C floats,
// a multiple of 1 KiB in practice) maps a tile's rows onto a handful of L1 sets, and the
// micro-kernels re-read these rows many times; the same aliasing leaves a head only a
// fraction of L2. With C in the hundreds every row also sits on its own 4 KiB page, so the
// loads are TLB- and latency-bound: `next` (the same rows of the tile gathered next, or
// null) is prefetched one tile ahead.
inline void copy_rows(const float* src, int ld, int rows, int hd, int hdp, float* dst, const float* next) {
  const __mmask16 tail = tail_mask(hd);
  for (int r = 0; r < rows; ++r) {
    const float* s = src + (size_t)r * ld;
    float* d = dst + (size_t)r * hdp;
    if (next)
      for (int c = 0; c < hd; c += 16)
        _mm_prefetch(reinterpret_cast<const char*>(next + (size_t)r * ld + c), _MM_HINT_T0);
    for (int c = 0; c < hdp; c += 16)
      _mm512_store_ps(d + c, _mm512_maskz_loadu_ps(c + 16 >= hdp ? tail : (__mmask16)0xFFFF, s + c));
  }
}

// dst(hdp, 64) = transpose of rows [0, rows) of a head slice, times mul; zero elsewhere so
// padded keys/queries and padded head dims contribute nothing.
inline void transpose_rows(const float* src, int ld, int rows, int hd, int hdp, float mul, float* dst) {
  std::fill(dst, dst + (size_t)hdp * kBlk, 0.0f);
  for (int r = 0; r < rows; ++r) {
    const float* s = src + (size_t)r * ld;
    for (int d = 0; d < hd; ++d) dst[(size_t)d * kBlk + r] = s[d] * mul;
  }
}

size_t fwd_scratch_floats(int hdp) {
  return (size_t)hdp * kBlk * (2 + 2 * kFwdGroup) + (size_t)kBlk * kBlk + kBlk + 2 * kBlk * kFwdGroup;
}
size_t bwd_scratch_floats(int hdp) {
  return (size_t)hdp * kBlk * (5 * kBwdGroup + 3) + (size_t)kBlk * kBlk * 2 + kBlk;
}

// One key tile against one query tile: scores, online-softmax update, Oa += P V.
// Qt (hdp, 64) queries times scale * log2(e), transposed; Ks, Vs (64, hdp); ml: running max
// m (64, base-2 units) then running sum l (64).
// off = i0 - j0: key j may be seen by query i only if i + off >= j.
void fwd_tile(const float* Qt, const float* Ks, const float* Vs, int nq, int nk, int off, int hdp, float* St,
              float* alpha, float* ml, float* Oa) {
  tile_bcast_x64(Ks, hdp, nk, Qt, hdp, St, kBlk);  // St[j][i]: 64 queries along the lanes

  const float neg_inf = -std::numeric_limits<float>::infinity();
  __m512 m[4], mx[4], l[4], ls[4];
  for (int u = 0; u < 4; ++u) {
    m[u] = mx[u] = _mm512_load_ps(ml + u * 16);
    l[u] = _mm512_load_ps(ml + kBlk + u * 16);
    ls[u] = _mm512_setzero_ps();
  }
  if (off < nk - 1) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int j = 0; j < nk; ++j) {
      const __m512i jv = _mm512_set1_epi32(j);
      for (int u = 0; u < 4; ++u) {
        const __mmask16 ok = _mm512_cmpge_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(off + u * 16)), jv);
        float* sp = St + (size_t)j * kBlk + u * 16;
        const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(neg_inf), ok, _mm512_load_ps(sp));
        _mm512_store_ps(sp, sv);
        mx[u] = _mm512_max_ps(mx[u], sv);
      }
    }
  } else {
    for (int j = 0; j < nk; ++j)
      for (int u = 0; u < 4; ++u) mx[u] = _mm512_max_ps(mx[u], _mm512_load_ps(St + (size_t)j * kBlk + u * 16));
  }
  for (int u = 0; u < 4; ++u) {
    const __m512 al = exp2_ps(_mm512_sub_ps(m[u], mx[u]));
    _mm512_store_ps(alpha + u * 16, al);
    l[u] = _mm512_mul_ps(l[u], al);
  }
  for (int j = 0; j < nk; ++j) {
    for (int u = 0; u < 4; ++u) {
      float* sp = St + (size_t)j * kBlk + u * 16;
      const __m512 pv = exp2_ps(_mm512_sub_ps(_mm512_load_ps(sp), mx[u]));
      _mm512_store_ps(sp, pv);
      ls[u] = _mm512_add_ps(ls[u], pv);
    }
  }
  for (int u = 0; u < 4; ++u) {
    _mm512_store_ps(ml + u * 16, mx[u]);
    _mm512_store_ps(ml + kBlk + u * 16, _mm512_add_ps(l[u], ls[u]));
  }
  // Oa(i, :) = Oa(i, :) * alpha_i + sum_j P(i, j) V(j, :), P read from St[j][i].
  tile_acc<true, true>(St, kBlk, nq, nk, kNoClip, off, Vs, hdp, hdp, Oa, hdp, alpha);
}

}  // namespace

// Working memory per thread in bytes (tiles only; independent of T). For benchmarks.
size_t attention_scratch_bytes(int hd, bool backward) {
  const int hdp = round_up16(hd);
  return (backward ? bwd_scratch_floats(hdp) : fwd_scratch_floats(hdp)) * sizeof(float);
}

// q: (B*T, ld_qkv) slices of H heads, k, v: of Hkv heads (query head h reads key/value head
// h / (H / Hkv)); o: (B*T, ld_o); lse: (B, H, T).
// A task is a group of kFwdGroup consecutive query tiles of one head: each key/value tile is
// gathered from the strided fused buffer once and used by the whole group.
void attention_forward(const float* q, const float* k, const float* v, int ld_qkv, float* o, int ld_o, float* lse,
                       int B, int T, int H, int Hkv, int hd, float* scratch) {
  if (B <= 0 || T <= 0 || H <= 0 || Hkv <= 0 || hd <= 0) return;
  const int group = H / Hkv;  // query heads per key/value head
  const int hdp = round_up16(hd);
  const float scale = 1.0f / std::sqrt((float)hd);
  const int nqb = (T + kBlk - 1) / kBlk;
  const int ngr = (nqb + kFwdGroup - 1) / kFwdGroup;
  const int nbh = B * H;
  const long ntasks = (long)ngr * nbh;
  const __mmask16 otail = tail_mask(hd);
  const size_t tile = (size_t)hdp * kBlk;

#pragma omp parallel
  {
    // (64, hdp): key tile, contiguous and zero-padded
    float* Ks = scratch + (size_t)omp_get_thread_num() * fwd_scratch_floats(hdp);
    float* Vs = Ks + tile;                   // (64, hdp)
    float* St = Vs + tile;                   // (64 keys, 64 queries): scores, then probabilities
    float* alpha = St + (size_t)kBlk * kBlk; // (64): per-query rescale of Oa for this key tile
    float* Qt = alpha + kBlk;                // kFwdGroup x (hdp, 64): scaled queries, transposed
    float* Oa = Qt + kFwdGroup * tile;       // kFwdGroup x (64, hdp): unnormalised outputs
    float* ml = Oa + kFwdGroup * tile;       // kFwdGroup x (2, 64): running max and sum

    // Consecutive tasks stay on one head; within a head the largest groups come first so the
    // dynamic schedule ends with short tasks.
#pragma omp for schedule(dynamic)
    for (long task = 0; task < ntasks; ++task) {
      const int bh = (int)(task / ngr);
      const int g = ngr - 1 - (int)(task % ngr);
      const int b = bh / H, h = bh % H;
      const int qb0 = g * kFwdGroup, ng = std::min(kFwdGroup, nqb - qb0);
      const size_t head = (size_t)b * T * ld_qkv + (size_t)h * hd;
      const size_t kvhead = (size_t)b * T * ld_qkv + (size_t)(h / group) * hd;
      const int iend = std::min(T, (qb0 + ng) * kBlk);

      for (int gi = 0; gi < ng; ++gi) {
        const int i0 = (qb0 + gi) * kBlk;
        transpose_rows(q + head + (size_t)i0 * ld_qkv, ld_qkv, std::min(kBlk, T - i0), hd, hdp, scale * kLog2e,
                       Qt + gi * tile);
        std::fill(Oa + gi * tile, Oa + (gi + 1) * tile, 0.0f);
        std::fill(ml + gi * 2 * kBlk, ml + gi * 2 * kBlk + kBlk, -std::numeric_limits<float>::infinity());
        std::fill(ml + gi * 2 * kBlk + kBlk, ml + (gi + 1) * 2 * kBlk, 0.0f);
      }

      for (int j0 = 0; j0 < iend; j0 += kBlk) {
        const int nk = std::min(kBlk, T - j0);
        const bool more = j0 + kBlk < iend;
        const size_t koff = kvhead + (size_t)j0 * ld_qkv, knext = koff + (size_t)kBlk * ld_qkv;
        copy_rows(k + koff, ld_qkv, nk, hd, hdp, Ks, more ? k + knext : nullptr);
        copy_rows(v + koff, ld_qkv, nk, hd, hdp, Vs, more ? v + knext : nullptr);
        for (int gi = 0; gi < ng; ++gi) {
          const int i0 = (qb0 + gi) * kBlk;
          if (j0 > i0) continue;  // tiles are aligned: key tile j0 is past every query of tile i0
          fwd_tile(Qt + gi * tile, Ks, Vs, std::min(kBlk, T - i0), nk, i0 - j0, hdp, St, alpha, ml + gi * 2 * kBlk,
                   Oa + gi * tile);
        }
      }

      for (int gi = 0; gi < ng; ++gi) {
        const int i0 = (qb0 + gi) * kBlk, nq = std::min(kBlk, T - i0);
        const float* mrow = ml + gi * 2 * kBlk;
        const float* lrow = mrow + kBlk;
        float* lse_bh = lse + (size_t)bh * T + i0;
        float* ob = o + ((size_t)b * T + i0) * ld_o + (size_t)h * hd;
        for (int i = 0; i < nq; ++i) {
          lse_bh[i] = mrow[i] * kLn2 + std::log(lrow[i]);  // m is in base-2 units
          const __m512 inv = _mm512_set1_ps(1.0f / lrow[i]);
          const float* src = Oa + gi * tile + (size_t)i * hdp;
          float* dst = ob + (size_t)i * ld_o;
          for (int c = 0; c < hdp; c += 16)
            _mm512_mask_storeu_ps(dst + c, c + 16 >= hdp ? otail : (__mmask16)0xFFFF,
                                  _mm512_mul_ps(_mm512_load_ps(src + c), inv));
        }
      }
    }
  }
}

// Each (b, key/value head) is one task, with every query head of its group: dq of those heads
// and dk/dv of the key/value head have a single writer, and dk/dv sum over the group's query
// heads in head order, so the result is race-free and independent of the thread count.
// Within a head, key tiles go in groups of kBwdGroup: each query tile (and its dout, D and
// dq) is gathered from the strided buffers once per group rather than once per key tile.
void attention_backward(const float* q, const float* k, const float* v, int ld_qkv, const float* o, int ld_o,
                        const float* dout, const float* lse, float* dq, float* dk, float* dv, int ld_dqkv, int B,
                        int T, int H, int Hkv, int hd, float* scratch) {
  if (B <= 0 || T <= 0 || H <= 0 || Hkv <= 0 || hd <= 0) return;
  const int group = H / Hkv;  // query heads per key/value head
  const int hdp = round_up16(hd);
  const float scale = 1.0f / std::sqrt((float)hd);
  const int nbkv = B * Hkv;
  const int nkb = (T + kBlk - 1) / kBlk;
  const __mmask16 tail = tail_mask(hd);
  const size_t tile = (size_t)hdp * kBlk;

#pragma omp parallel
  {
    // Per key tile of the group, 5 tiles: Kt (hdp, 64) scaled keys transposed, Vt (hdp, 64),
    // Ks (64, hdp) contiguous keys, dKa and dVa (64, hdp) gradient accumulators.
    float* grp = scratch + (size_t)omp_get_thread_num() * bwd_scratch_floats(hdp);
    float* Qs = grp + 5 * kBwdGroup * tile;  // (64, hdp): query tile; also staging for Vt
    float* dOs = Qs + tile;                  // (64, hdp)
    float* dQa = dOs + tile;                 // (64, hdp): dq of the query tile over the group
    float* P = dQa + tile;                   // (64 queries, 64 keys)
    float* dS = P + (size_t)kBlk * kBlk;     // (64, 64): dP, then scale * dS
    float* Drow = dS + (size_t)kBlk * kBlk;  // (64): D_i = dout_i . o_i
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);

#pragma omp for schedule(dynamic)
    for (int bkv = 0; bkv < nbkv; ++bkv) {
      const int b = bkv / Hkv, kvh = bkv % Hkv;
      const size_t kvhead = (size_t)b * T * ld_qkv + (size_t)kvh * hd;
      float* dkh = dk + (size_t)b * T * ld_dqkv + (size_t)kvh * hd;
      float* dvh = dv + (size_t)b * T * ld_dqkv + (size_t)kvh * hd;
      for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        float* dqh = dq + (size_t)b * T * ld_dqkv + (size_t)h * hd;
        for (int t = 0; t < T; ++t) std::fill(dqh + (size_t)t * ld_dqkv, dqh + (size_t)t * ld_dqkv + hd, 0.0f);
      }

      for (int kb0 = 0; kb0 < nkb; kb0 += kBwdGroup) {
        const int ng = std::min(kBwdGroup, nkb - kb0);
        for (int gi = 0; gi < ng; ++gi) {
          float* Kt = grp + (5 * gi) * tile;
          const int j0 = (kb0 + gi) * kBlk, nk = std::min(kBlk, T - j0);
          const size_t koff = kvhead + (size_t)j0 * ld_qkv;
          const bool more = gi + 1 < ng;
          // Gather first, then transpose from the contiguous copy: the gather is the
          // latency-bound part and runs with prefetches; the transpose then hits L1.
          copy_rows(k + koff, ld_qkv, nk, hd, hdp, Kt + 2 * tile, more ? k + koff + (size_t)kBlk * ld_qkv : nullptr);
          transpose_rows(Kt + 2 * tile, hdp, nk, hd, hdp, scale * kLog2e, Kt);
          copy_rows(v + koff, ld_qkv, nk, hd, hdp, Qs, more ? v + koff + (size_t)kBlk * ld_qkv : nullptr);
          transpose_rows(Qs, hdp, nk, hd, hdp, 1.0f, Kt + tile);
          std::fill(Kt + 3 * tile, Kt + 5 * tile, 0.0f);
        }

        // The query heads of the group, in order, each over its query tiles; query tiles are
        // aligned with key tiles, so the first that sees key tile kb0 starts there.
        for (int h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int i0 = kb0 * kBlk; i0 < T; i0 += kBlk) {
          const size_t head = (size_t)b * T * ld_qkv + (size_t)h * hd;
          const size_t ohead = (size_t)b * T * ld_o + (size_t)h * hd;
          float* dqh = dq + (size_t)b * T * ld_dqkv + (size_t)h * hd;
          const float* lse_bh = lse + ((size_t)b * H + h) * T;
          const int nq = std::min(kBlk, T - i0);
          const bool more = i0 + kBlk < T;
          const size_t qoff = head + (size_t)i0 * ld_qkv, ooff = ohead + (size_t)i0 * ld_o;
          copy_rows(q + qoff, ld_qkv, nq, hd, hdp, Qs, more ? q + qoff + (size_t)kBlk * ld_qkv : nullptr);
          copy_rows(dout + ooff, ld_o, nq, hd, hdp, dOs, more ? dout + ooff + (size_t)kBlk * ld_o : nullptr);
          for (int i = 0; i < nq; ++i) {
            const float* orow = o + ooff + (size_t)i * ld_o;
            if (more)
              for (int c = 0; c < hd; c += 16)
                _mm_prefetch(reinterpret_cast<const char*>(orow + (size_t)kBlk * ld_o + c), _MM_HINT_T0);
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < hdp; c += 16) {
              const __mmask16 mk = c + 16 >= hdp ? tail : (__mmask16)0xFFFF;
              const __m512 ov = _mm512_maskz_loadu_ps(mk, orow + c);
              acc = _mm512_fmadd_ps(ov, _mm512_load_ps(dOs + (size_t)i * hdp + c), acc);
            }
            Drow[i] = _mm512_reduce_add_ps(acc);
          }
          std::fill(dQa, dQa + tile, 0.0f);

          for (int gi = 0; gi < ng; ++gi) {
            const int j0 = (kb0 + gi) * kBlk;
            if (j0 > i0) break;  // aligned tiles: every later key is past every query here
            const int nk = std::min(kBlk, T - j0), off = i0 - j0;
            const float* Kt = grp + (5 * gi) * tile;
            const float* Vt = Kt + tile;
            const float* Ks = Kt + 2 * tile;
            float* dKa = grp + (5 * gi + 3) * tile;
            float* dVa = dKa + tile;

            // S = scale * Q K^T, then P = exp(S - lse) under the causal mask (j <= i + off) and
            // the end of the sequence (j < nk); S and lse both in base-2 units here.
            tile_bcast_x64(Qs, hdp, nq, Kt, hdp, P, kBlk);
            for (int i = 0; i < nq; ++i) {
              const __m512 li = _mm512_set1_ps(lse_bh[i0 + i] * kLog2e);
              const __m512i lim = _mm512_set1_epi32(std::min(i + off, nk - 1));
              for (int u = 0; u < 4; ++u) {
                float* p = P + (size_t)i * kBlk + u * 16;
                const __mmask16 ok = _mm512_cmple_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(u * 16)), lim);
                _mm512_store_ps(p, _mm512_maskz_mov_ps(ok, exp2_ps(_mm512_sub_ps(_mm512_load_ps(p), li))));
              }
            }

            // dV(j, :) += sum_i P(i, j) dO(i, :)
            tile_acc<true, false>(P, kBlk, nk, nq, off, kNoClip, dOs, hdp, hdp, dVa, hdp, nullptr);

            // dP = dO V^T; dS = scale * P * (dP - D)
            tile_bcast_x64(dOs, hdp, nq, Vt, hdp, dS, kBlk);
            const __m512 sc = _mm512_set1_ps(scale);
            for (int i = 0; i < nq; ++i) {
              const __m512 di = _mm512_set1_ps(Drow[i]);
              for (int u = 0; u < 4; ++u) {
                float* ds = dS + (size_t)i * kBlk + u * 16;
                const __m512 pv = _mm512_load_ps(P + (size_t)i * kBlk + u * 16);
                _mm512_store_ps(ds, _mm512_mul_ps(_mm512_mul_ps(pv, sc), _mm512_sub_ps(_mm512_load_ps(ds), di)));
              }
            }

            // dQ(i, :) += sum_j dS(i, j) K(j, :)
            tile_acc<false, false>(dS, kBlk, nq, nk, kNoClip, off, Ks, hdp, hdp, dQa, hdp, nullptr);
            // dK(j, :) += sum_i dS(i, j) Q(i, :)
            tile_acc<true, false>(dS, kBlk, nk, nq, off, kNoClip, Qs, hdp, hdp, dKa, hdp, nullptr);
          }

          for (int i = 0; i < nq; ++i) {
            float* dqr = dqh + (size_t)(i0 + i) * ld_dqkv;
            for (int c = 0; c < hdp; c += 16) {
              const __mmask16 mk = c + 16 >= hdp ? tail : (__mmask16)0xFFFF;
              _mm512_mask_storeu_ps(dqr + c, mk,
                                    _mm512_add_ps(_mm512_maskz_loadu_ps(mk, dqr + c),
                                                  _mm512_load_ps(dQa + (size_t)i * hdp + c)));
            }
          }
        }

        for (int gi = 0; gi < ng; ++gi) {
          const int j0 = (kb0 + gi) * kBlk, nk = std::min(kBlk, T - j0);
          const float* dKa = grp + (5 * gi + 3) * tile;
          const float* dVa = dKa + tile;
          for (int j = 0; j < nk; ++j) {
            float* dkr = dkh + (size_t)(j0 + j) * ld_dqkv;
            float* dvr = dvh + (size_t)(j0 + j) * ld_dqkv;
            for (int c = 0; c < hdp; c += 16) {
              const __mmask16 mk = c + 16 >= hdp ? tail : (__mmask16)0xFFFF;
              _mm512_mask_storeu_ps(dkr + c, mk, _mm512_load_ps(dKa + (size_t)j * hdp + c));
              _mm512_mask_storeu_ps(dvr + c, mk, _mm512_load_ps(dVa + (size_t)j * hdp + c));
            }
          }
        }
      }
    }
  }
}

}  // namespace subllm::kernels

#endif  // __AVX512F__
