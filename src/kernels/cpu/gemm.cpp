// The single entry point to BLAS. Everything that multiplies matrices goes through here so
// a GPU backend replaces one file.
#include <cblas.h>

#include <algorithm>
#include <cstdint>
#if defined(__AVX512F__)
// GCC 12 flags the deliberately undefined pass-through operand of its own AVX-512 reductions
// once register-pinned values reach them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

#include "kernels/cpu/row_parts.h"
#include "kernels/cpu/team.h"
#include "kernels/kernels.h"

namespace subllm::kernels {

void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha,
              A, lda, B, ldb, beta, C, ldc);
}

#if defined(__AVX512F__)
namespace {

// A product takes the few-rows path up to this many rows of x, and from this many elements
// of W: there BLAS's packing copy of W costs about what the product does, while a small W
// sits in cache and BLAS serves it well.
constexpr int kFewRows = 32;
constexpr int64_t kFewRowsMinWeights = 1 << 16;

// y[r][o] (+)= x_r · w_o for RW rows of w from o0 and RX rows of x from r0, over `in`.
template <int RW, int RX>
void few_rows_tile(const float* x, const float* w, float* y, int in, int out, int o0, int r0, bool accumulate) {
  __m512 acc[RW][RX];
  for (int i = 0; i < RW; ++i)
    for (int j = 0; j < RX; ++j) acc[i][j] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= in; k += 16) {
    __m512 xv[RX];
    for (int j = 0; j < RX; ++j) {
      xv[j] = _mm512_loadu_ps(x + (int64_t)(r0 + j) * in + k);
      // Held in a register: folded into each FMA instead (as the compiler likes to), x would
      // be loaded RW times, and loads, not FMAs, would bound the loop.
      __asm__("" : "+v"(xv[j]));
    }
    for (int i = 0; i < RW; ++i) {
      __m512 wv = _mm512_loadu_ps(w + (int64_t)(o0 + i) * in + k);
      __asm__("" : "+v"(wv));  // the same for W's row
      for (int j = 0; j < RX; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
  if (k < in) {
    const __mmask16 m = (__mmask16)((1u << (in - k)) - 1);
    __m512 xv[RX];
    for (int j = 0; j < RX; ++j) xv[j] = _mm512_maskz_loadu_ps(m, x + (int64_t)(r0 + j) * in + k);
    for (int i = 0; i < RW; ++i) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, w + (int64_t)(o0 + i) * in + k);
      for (int j = 0; j < RX; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RW; ++i)
    for (int j = 0; j < RX; ++j) {
      float& dst = y[(int64_t)(r0 + j) * out + o0 + i];
      const float v = _mm512_reduce_add_ps(acc[i][j]);
      dst = accumulate ? dst + v : v;
    }
}

template <int RW>
void few_rows_strip(const float* x, const float* w, float* y, int n, int in, int out, int o0, bool accumulate) {
  int r0 = 0;
  for (; r0 + 4 <= n; r0 += 4) few_rows_tile<RW, 4>(x, w, y, in, out, o0, r0, accumulate);
  switch (n - r0) {
    case 3: few_rows_tile<RW, 3>(x, w, y, in, out, o0, r0, accumulate); break;
    case 2: few_rows_tile<RW, 2>(x, w, y, in, out, o0, r0, accumulate); break;
    case 1: few_rows_tile<RW, 1>(x, w, y, in, out, o0, r0, accumulate); break;
    default: break;
  }
}

// A few rows (a batched decoding step): W is read once, a strip of 4 of its rows at a time
// against every row of x (which stays in cache), without BLAS's packing copies.
void linear_few_rows(const float* x, const float* w, float* y, int n, int in, int out, bool accumulate) {
  const int strips = (out + 3) / 4;
  parallel([&] {
#pragma omp for schedule(static)
    for (int s = 0; s < strips; ++s) {
      const int o0 = 4 * s;
      switch (std::min(4, out - o0)) {
        case 4: few_rows_strip<4>(x, w, y, n, in, out, o0, accumulate); break;
        case 3: few_rows_strip<3>(x, w, y, n, in, out, o0, accumulate); break;
        case 2: few_rows_strip<2>(x, w, y, n, in, out, o0, accumulate); break;
        default: few_rows_strip<1>(x, w, y, n, in, out, o0, accumulate); break;
      }
    }
  });
}

// One x row (decoding): y[o] (+)= x · w_o for rows [r0, r1) of W, streamed in order, one
// row at a time with four accumulators over 64 columns.
void matvec_rows(const float* x, const float* w, float* y, int in, int r0, int r1, bool accumulate) {
  const int in64 = in / 64 * 64;
  for (int r = r0; r < r1; ++r) {
    const float* row = w + (int64_t)r * in;
    __m512 acc[4];
    for (auto& a : acc) a = _mm512_setzero_ps();
    int c = 0;
    for (; c < in64; c += 64)
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(row + c + 16 * j), _mm512_loadu_ps(x + c + 16 * j), acc[j]);
    for (; c < in; c += 16) {
      const __mmask16 m = in - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (in - c)) - 1);
      acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row + c), _mm512_maskz_loadu_ps(m, x + c), acc[0]);
    }
    const float v = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    y[r] = accumulate ? y[r] + v : v;
  }
}

// matvec_rows for rows a + i and b + i, i < n, in lockstep: two streams, each x load serving
// both rows, two accumulators per row over 32 columns.
void matvec_row_pairs(const float* x, const float* w, float* y, int in, int a, int b, int n, bool accumulate) {
  const int in32 = in / 32 * 32;
  for (int i = 0; i < n; ++i) {
    const float* ra = w + (int64_t)(a + i) * in;
    const float* rb = w + (int64_t)(b + i) * in;
    __m512 acc_a[2], acc_b[2];
    for (int j = 0; j < 2; ++j) acc_a[j] = acc_b[j] = _mm512_setzero_ps();
    int c = 0;
    for (; c < in32; c += 32)
      for (int j = 0; j < 2; ++j) {
        const __m512 xv = _mm512_loadu_ps(x + c + 16 * j);
        acc_a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(ra + c + 16 * j), xv, acc_a[j]);
        acc_b[j] = _mm512_fmadd_ps(_mm512_loadu_ps(rb + c + 16 * j), xv, acc_b[j]);
      }
    for (; c < in; c += 16) {
      const __mmask16 m = in - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (in - c)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + c);
      acc_a[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, ra + c), xv, acc_a[0]);
      acc_b[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, rb + c), xv, acc_b[0]);
    }
    const float va = _mm512_reduce_add_ps(_mm512_add_ps(acc_a[0], acc_a[1]));
    const float vb = _mm512_reduce_add_ps(_mm512_add_ps(acc_b[0], acc_b[1]));
    y[a + i] = accumulate ? y[a + i] + va : va;
    y[b + i] = accumulate ? y[b + i] + vb : vb;
  }
}

// A matrix-vector product bound by reading W once: each thread streams a contiguous part of
// W (as two streams: for_row_parts), which keeps closer to the machine's read bandwidth than
// interleaved strips (or BLAS's sgemv) do. A W that fits in cache is left to the calling thread.
void linear_matvec(const float* x, const float* w, float* y, int in, int out, bool accumulate) {
  if ((int64_t)out * in < kFewRowsMinWeights) {
    matvec_rows(x, w, y, in, 0, out, accumulate);
    return;
  }
  for_row_parts(
      out, row_chunk((int64_t)in * sizeof(float)),
      [&](int r0, int r1) { matvec_rows(x, w, y, in, r0, r1, accumulate); },
      [&](int a, int b, int n) { matvec_row_pairs(x, w, y, in, a, b, n, accumulate); });
}

}  // namespace
#endif

// x: (n, in), w: (out, in), y: (n, out)
void linear_forward(const float* x, const float* w, float* y, int n, int in, int out, bool accumulate) {
  // One row (decoding) is a matrix-vector product, bound by reading W once.
  if (n == 1) {
#if defined(__AVX512F__)
    linear_matvec(x, w, y, in, out, accumulate);
#else
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, accumulate ? 1.0f : 0.0f, y, 1);
#endif
    return;
  }
#if defined(__AVX512F__)
  if (n <= kFewRows && (int64_t)out * in >= kFewRowsMinWeights) {
    linear_few_rows(x, w, y, n, in, out, accumulate);
    return;
  }
#endif
  gemm(false, true, n, out, in, 1.0f, x, in, w, in, accumulate ? 1.0f : 0.0f, y, out);
}

// dy: (n, out) -> dx: (n, in), dw: (out, in)
void linear_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int in, int out,
                     bool accumulate_dx) {
  if (dx) gemm(false, false, n, in, out, 1.0f, dy, out, w, in, accumulate_dx ? 1.0f : 0.0f, dx, in);
  if (dw) gemm(true, false, out, in, n, 1.0f, dy, out, x, in, 1.0f, dw, in);
}

}  // namespace subllm::kernels
