// Kernels of the inference weight types: conversions, matrix-vector products that stream BF16
// or Q8 weights once (decoding: bound by memory bandwidth), small-batch and prefill products
// through the F32 GEMM on dequantized tiles, the output head's loss and the embedding lookup.
// Layouts and the run-time choice between the AVX-512 and the portable paths: quant_kernels.h.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/cpu/vec_math.h"
#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 flags the deliberately undefined pass-through operand of its own AVX-512 intrinsics
// (_mm512_undefined_*) when they are inlined into target-attribute functions.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define SUBLLM_X86_DISPATCH 1
#define SUBLLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

namespace subllm::kernels {

namespace {

std::atomic<bool> g_portable_forced{false};

bool machine_has_avx512() {
#ifdef SUBLLM_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

bool env_portable() {
  static const bool portable = [] {
    const char* e = std::getenv("SUBLLM_PORTABLE_KERNELS");
    return e != nullptr && *e != '\0' && std::string(e) != "0";
  }();
  return portable;
}

inline float load_f32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, sizeof f);
  return f;
}
inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits | 0x00400000u) >> 16);  // NaN stays quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

// ---- portable matrix-vector rows --------------------------------------------------------
// y(i, r) for x rows i < nx and weight rows r in [r0, r1); each weight element is dequantized
// as the F32 kernels would see it (s * q, or the bf16 bits widened) before it multiplies x.

void q8_rows_portable(const float* x, int64_t ldx, int nx, const uint8_t* w, int in, int r0, int r1, float* y,
                      int64_t ldy, bool accumulate) {
  const size_t rb = q8_row_bytes(in);
  const int G = in / kQ8Group;
  float wv[kQ8Group];
  for (int r = r0; r < r1; ++r) {
    const uint8_t* row = w + (size_t)r * rb;
    const auto* q = reinterpret_cast<const int8_t*>(row);
    for (int i = 0; i < nx; ++i) {
      const float* xi = x + i * ldx;
      float sum = 0.f;
      for (int g = 0; g < G; ++g) {
        const float s = load_f32(row + in + sizeof(float) * g);
        for (int e = 0; e < kQ8Group; ++e) wv[e] = s * (float)q[g * kQ8Group + e];
#pragma omp simd reduction(+ : sum)
        for (int e = 0; e < kQ8Group; ++e) sum += wv[e] * xi[g * kQ8Group + e];
      }
      float& out = y[i * ldy + r];
      out = accumulate ? out + sum : sum;
    }
  }
}

void bf16_rows_portable(const float* x, int64_t ldx, int nx, const uint16_t* w, int64_t ldw, int in, int r0, int r1,
                        float* y, int64_t ldy, bool accumulate) {
  for (int r = r0; r < r1; ++r) {
    const uint16_t* row = w + (int64_t)r * ldw;
    for (int i = 0; i < nx; ++i) {
      const float* xi = x + i * ldx;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int c = 0; c < in; ++c) sum += bf16_bits_to_f32(row[c]) * xi[c];
      float& out = y[i * ldy + r];
      out = accumulate ? out + sum : sum;
    }
  }
}

// ---- AVX-512 matrix-vector rows ---------------------------------------------------------
#ifdef SUBLLM_X86_DISPATCH
// Two accumulators per x row (one per half of a group) keep two FMA chains in flight.
template <int NX>
SUBLLM_AVX512 void q8_rows_avx512(const float* x, int64_t ldx, const uint8_t* w, int in, int r0, int r1, float* y,
                                  int64_t ldy, bool accumulate) {
  const size_t rb = q8_row_bytes(in);
  const int G = in / kQ8Group;
  for (int r = r0; r < r1; ++r) {
    const uint8_t* row = w + (size_t)r * rb;
    __m512 a0[NX], a1[NX];
    for (int i = 0; i < NX; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(load_f32(row + in + sizeof(float) * g));
      const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kQ8Group));
      const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kQ8Group + 16));
      const __m512 w0 = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
      const __m512 w1 = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
      for (int i = 0; i < NX; ++i) {
        const float* xi = x + i * ldx + g * kQ8Group;
        a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), a0[i]);
        a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), a1[i]);
      }
    }
    for (int i = 0; i < NX; ++i) {
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
      float& out = y[i * ldy + r];
      out = accumulate ? out + sum : sum;
    }
  }
}

SUBLLM_AVX512 inline __m512 widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int NX>
SUBLLM_AVX512 void bf16_rows_avx512(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, int in, int r0,
                                    int r1, float* y, int64_t ldy, bool accumulate) {
  const int in32 = in / 32 * 32;
  const int tail = in - in32;
  for (int r = r0; r < r1; ++r) {
    const uint16_t* row = w + (int64_t)r * ldw;
    __m512 a0[NX], a1[NX];
    for (int i = 0; i < NX; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    for (int c = 0; c < in32; c += 32) {
      const __m512 w0 = widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c)));
      const __m512 w1 = widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c + 16)));
      for (int i = 0; i < NX; ++i) {
        const float* xi = x + i * ldx + c;
        a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), a0[i]);
        a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), a1[i]);
      }
    }
    for (int c = in32; c < in; c += 16) {
      const int left = std::min(16, tail - (c - in32));
      const __mmask16 m = (__mmask16)((1u << left) - 1u);
      const __m512 w0 = widen_bf16(_mm256_maskz_loadu_epi16(m, row + c));
      for (int i = 0; i < NX; ++i) a0[i] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + i * ldx + c), a0[i]);
    }
    for (int i = 0; i < NX; ++i) {
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
      float& out = y[i * ldy + r];
      out = accumulate ? out + sum : sum;
    }
  }
}
#endif

// Rows [r0, r1) of up to 4 x rows, on the path the machine takes.
void q8_rows(const float* x, int64_t ldx, int nx, const uint8_t* w, int in, int r0, int r1, float* y, int64_t ldy,
             bool accumulate) {
#ifdef SUBLLM_X86_DISPATCH
  if (fast_kernels_active()) {
    switch (nx) {
      case 1: return q8_rows_avx512<1>(x, ldx, w, in, r0, r1, y, ldy, accumulate);
      case 2: return q8_rows_avx512<2>(x, ldx, w, in, r0, r1, y, ldy, accumulate);
      case 3: return q8_rows_avx512<3>(x, ldx, w, in, r0, r1, y, ldy, accumulate);
      default: return q8_rows_avx512<4>(x, ldx, w, in, r0, r1, y, ldy, accumulate);
    }
  }
#endif
  q8_rows_portable(x, ldx, nx, w, in, r0, r1, y, ldy, accumulate);
}

void bf16_rows(const float* x, int64_t ldx, int nx, const uint16_t* w, int64_t ldw, int in, int r0, int r1, float* y,
               int64_t ldy, bool accumulate) {
#ifdef SUBLLM_X86_DISPATCH
  if (fast_kernels_active()) {
    switch (nx) {
      case 1: return bf16_rows_avx512<1>(x, ldx, w, ldw, in, r0, r1, y, ldy, accumulate);
      case 2: return bf16_rows_avx512<2>(x, ldx, w, ldw, in, r0, r1, y, ldy, accumulate);
      case 3: return bf16_rows_avx512<3>(x, ldx, w, ldw, in, r0, r1, y, ldy, accumulate);
      default: return bf16_rows_avx512<4>(x, ldx, w, ldw, in, r0, r1, y, ldy, accumulate);
    }
  }
#endif
  bf16_rows_portable(x, ldx, nx, w, ldw, in, r0, r1, y, ldy, accumulate);
}

// Dequantized tiles for the GEMM path: kTileRows weight rows by kTileK columns, 64 KiB of F32
// on the stack of the thread that owns the tile.
constexpr int kTileRows = 64, kTileK = 256;
constexpr int kMaxGemvRows = 4;

// tile (R, K) = W rows [r0, r0 + R), columns [k0, k0 + K) as F32 (k0, K multiples of 32 for Q8).
void dequant_tile_q8(const uint8_t* w, int in, int r0, int R, int k0, int K, float* tile) {
  const size_t rb = q8_row_bytes(in);
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = w + (size_t)(r0 + r) * rb;
    const auto* q = reinterpret_cast<const int8_t*>(row);
    float* t = tile + (int64_t)r * K;
    for (int g = k0 / kQ8Group; g < (k0 + K) / kQ8Group; ++g) {
      const float s = load_f32(row + in + sizeof(float) * g);
      float* tg = t + g * kQ8Group - k0;
      const int8_t* qg = q + g * kQ8Group;
#pragma omp simd
      for (int e = 0; e < kQ8Group; ++e) tg[e] = s * (float)qg[e];
    }
  }
}
void dequant_tile_bf16(const uint16_t* w, int64_t ldw, int r0, int R, int k0, int K, float* tile) {
  for (int r = 0; r < R; ++r) {
    const uint16_t* row = w + (int64_t)(r0 + r) * ldw + k0;
    float* t = tile + (int64_t)r * K;
#pragma omp simd
    for (int c = 0; c < K; ++c) t[c] = bf16_bits_to_f32(row[c]);
  }
}

// y(n, out) (=|+=) x · W^T: matrix-vector rows for a few x rows, dequantized tiles into the
// GEMM for more. `rows(x, nx, r0, r1, y)` and `tile(r0, R, k0, K, t)` know W's type.
template <class Rows, class Tile>
void linear_forward_typed(const float* x, int64_t ldx, float* y, int64_t ldy, int n, int in, int out, bool accumulate,
                          Rows rows, Tile tile) {
  if (n <= 0 || out <= 0) return;
  if (n <= kMaxGemvRows) {
    // Contiguous halves of W per thread: each streams its part once.
#pragma omp parallel
    {
      const int nt = omp_get_num_threads(), t = omp_get_thread_num();
      const int per = (out + nt - 1) / nt;
      const int r0 = std::min(out, t * per), r1 = std::min(out, r0 + per);
      if (r0 < r1) rows(x, n, r0, r1, y, accumulate);
    }
    return;
  }
  const int tiles = (out + kTileRows - 1) / kTileRows;
  // Inside the parallel loop each GEMM runs on its calling thread.
#pragma omp parallel for schedule(dynamic, 1)
  for (int ti = 0; ti < tiles; ++ti) {
    alignas(64) float t[kTileRows * kTileK];
    const int r0 = ti * kTileRows, R = std::min(kTileRows, out - r0);
    for (int k0 = 0; k0 < in; k0 += kTileK) {
      const int K = std::min(kTileK, in - k0);
      tile(r0, R, k0, K, t);
      gemm(false, true, n, R, K, 1.0f, x + k0, (int)ldx, t, K, (k0 == 0 && !accumulate) ? 0.0f : 1.0f, y + r0,
           (int)ldy);
    }
  }
}

template <class Linear>
double lm_head_loss(const float* x, const int32_t* targets, int n, int C, int V, float* logits, float* scratch,
                    int chunk_rows, int64_t* count, Linear linear) {
  double total = 0.0;
  int64_t counted = 0;
  for (int r0 = 0; r0 < n; r0 += chunk_rows) {
    const int rows = std::min(chunk_rows, n - r0);
    linear(x + (int64_t)r0 * C, scratch, rows);
    if (logits) std::memcpy(logits + (int64_t)r0 * V, scratch, sizeof(float) * rows * V);
    if (!targets) continue;
    double chunk_loss = 0.0;
    int64_t chunk_count = 0;
#pragma omp parallel for schedule(static) reduction(+ : chunk_loss, chunk_count)
    for (int r = 0; r < rows; ++r) {
      const int32_t tgt = targets[r0 + r];
      if (tgt < 0) continue;
      const float* l = scratch + (int64_t)r * V;
      float mx = l[0];
#pragma omp simd reduction(max : mx)
      for (int j = 1; j < V; ++j) mx = std::max(mx, l[j]);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < V; ++j) sum += exp_approx(l[j] - mx);
      chunk_loss += (double)(mx + std::log(sum) - l[tgt]);
      chunk_count += 1;
    }
    total += chunk_loss;
    counted += chunk_count;
  }
  if (count) *count = counted;
  return total;
}

}  // namespace

bool fast_kernels_active() {
  return machine_has_avx512() && !env_portable() && !g_portable_forced.load(std::memory_order_relaxed);
}
void set_portable_kernels(bool portable) { g_portable_forced.store(portable, std::memory_order_relaxed); }

void quantize_q8(const float* src, int64_t rows, int cols, void* dst) {
  const size_t rb = q8_row_bytes(cols);
  const int G = cols / kQ8Group;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src + r * cols;
    uint8_t* row = static_cast<uint8_t*>(dst) + (size_t)r * rb;
    auto* q = reinterpret_cast<int8_t*>(row);
    for (int g = 0; g < G; ++g) {
      float amax = 0.f;
      for (int e = 0; e < kQ8Group; ++e) amax = std::max(amax, std::fabs(x[g * kQ8Group + e]));
      const float s = amax / 127.0f;
      const float inv = s > 0.f ? 1.0f / s : 0.f;
      for (int e = 0; e < kQ8Group; ++e) {
        const float v = std::nearbyint(x[g * kQ8Group + e] * inv);
        q[g * kQ8Group + e] = (int8_t)std::clamp(v, -127.0f, 127.0f);
      }
      std::memcpy(row + cols + sizeof(float) * g, &s, sizeof s);
    }
  }
}

void dequantize_q8(const void* src, int64_t rows, int cols, float* dst) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    dequant_tile_q8(static_cast<const uint8_t*>(src), cols, (int)r, 1, 0, cols, dst + r * cols);
}

void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16_bits(src[i]);
}
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_f32(src[i]);
}

void linear_forward_q8(const float* x, int64_t ldx, const void* w, float* y, int64_t ldy, int n, int in, int out,
                       bool accumulate) {
  const auto* wq = static_cast<const uint8_t*>(w);
  linear_forward_typed(
      x, ldx, y, ldy, n, in, out, accumulate,
      [&](const float* xs, int nx, int r0, int r1, float* ys, bool acc) {
        for (int i0 = 0; i0 < nx; i0 += kMaxGemvRows)
          q8_rows(xs + i0 * ldx, ldx, std::min(kMaxGemvRows, nx - i0), wq, in, r0, r1, ys + i0 * ldy, ldy, acc);
      },
      [&](int r0, int R, int k0, int K, float* t) { dequant_tile_q8(wq, in, r0, R, k0, K, t); });
}

void linear_forward_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, float* y, int64_t ldy, int n,
                         int in, int out, bool accumulate) {
  linear_forward_typed(
      x, ldx, y, ldy, n, in, out, accumulate,
      [&](const float* xs, int nx, int r0, int r1, float* ys, bool acc) {
        for (int i0 = 0; i0 < nx; i0 += kMaxGemvRows)
          bf16_rows(xs + i0 * ldx, ldx, std::min(kMaxGemvRows, nx - i0), w, ldw, in, r0, r1, ys + i0 * ldy, ldy, acc);
      },
      [&](int r0, int R, int k0, int K, float* t) { dequant_tile_bf16(w, ldw, r0, R, k0, K, t); });
}

double lm_head_loss_bf16(const float* x, const uint16_t* w, const int32_t* targets, int n, int C, int V,
                         float* logits, float* scratch, int chunk_rows, int64_t* count) {
  return lm_head_loss(x, targets, n, C, V, logits, scratch, chunk_rows, count, [&](const float* xc, float* l, int rows) {
    linear_forward_bf16(xc, C, w, C, l, V, rows, C, V, false);
  });
}
double lm_head_loss_q8(const float* x, const void* w, const int32_t* targets, int n, int C, int V, float* logits,
                       float* scratch, int chunk_rows, int64_t* count) {
  return lm_head_loss(x, targets, n, C, V, logits, scratch, chunk_rows, count, [&](const float* xc, float* l, int rows) {
    linear_forward_q8(xc, C, w, l, V, rows, C, V, false);
  });
}

void embedding_forward_bf16(const int32_t* tokens, const uint16_t* table, float* out, int n, int C) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; ++i) dequant_tile_bf16(table, C, tokens[i], 1, 0, C, out + (int64_t)i * C);
}
void embedding_forward_q8(const int32_t* tokens, const void* table, float* out, int n, int C) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; ++i)
    dequant_tile_q8(static_cast<const uint8_t*>(table), C, tokens[i], 1, 0, C, out + (int64_t)i * C);
}

}  // namespace subllm::kernels
