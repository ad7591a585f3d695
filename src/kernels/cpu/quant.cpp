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
#include <type_traits>
#include <vector>

#include "kernels/cpu/aligned_vector.h"
#include "kernels/cpu/row_parts.h"
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
#define SUBLLM_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

namespace subllm::kernels {

namespace {

std::atomic<bool> g_portable_forced{false};
std::atomic<bool> g_vnni_off{false};

bool machine_has_avx512() {
#ifdef SUBLLM_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

bool machine_has_vnni() {
#ifdef SUBLLM_X86_DISPATCH
  static const bool has = machine_has_avx512() && __builtin_cpu_supports("avx512vnni");
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

bool fast_active() {
  return machine_has_avx512() && !env_portable() && !g_portable_forced.load(std::memory_order_relaxed);
}
// Whether Q8 products take the int8 dot-product path.
bool vnni_active() { return fast_active() && machine_has_vnni() && !g_vnni_off.load(std::memory_order_relaxed); }

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

// Up to this many x rows are matrix-vector products that stream W; more go through the GEMM.
constexpr int kMaxGemvRows = 4;

// ---- the Q8 row layout (quant_kernels.h) --------------------------------------------------
// Blocks of 16 groups; a block of n groups is 8 chunks of 4 n bytes (chunk c: values 4c .. 4c + 3
// of each of its groups in turn), then the n scales.
constexpr int kBlockGroups = 16, kChunksPerBlock = 8;
constexpr size_t kBlockBytes = (size_t)kBlockGroups * (kQ8Group + sizeof(float));

// Where group g of a row of G groups lies: value e at values + (e / 4) * stride + e % 4.
struct Q8GroupPlace {
  size_t values, stride, scale;
};
inline int block_groups(int G, int b) { return std::min(kBlockGroups, G - kBlockGroups * b); }
inline Q8GroupPlace q8_group_place(int G, int g) {
  const int b = g / kBlockGroups, j = g % kBlockGroups, n = block_groups(G, b);
  const size_t block = (size_t)b * kBlockBytes;
  return {block + 4 * (size_t)j, 4 * (size_t)n, block + (size_t)n * kQ8Group + sizeof(float) * j};
}
// Group g's 32 values, in order, and its scale.
inline float load_group_q8(const uint8_t* row, int G, int g, int8_t (&q)[kQ8Group]) {
  const Q8GroupPlace p = q8_group_place(G, g);
  for (int c = 0; c < kChunksPerBlock; ++c) std::memcpy(q + 4 * c, row + p.values + c * p.stride, 4);
  return load_f32(row + p.scale);
}
// The inverse: group g's 32 values and its scale into the row.
inline void store_group_q8(uint8_t* row, int G, int g, const int8_t (&q)[kQ8Group], float scale) {
  const Q8GroupPlace p = q8_group_place(G, g);
  for (int c = 0; c < kChunksPerBlock; ++c) std::memcpy(row + p.values + c * p.stride, q + 4 * c, 4);
  std::memcpy(row + p.scale, &scale, sizeof scale);
}

// One row of cols F32 values (cols % 32 == 0) into the Q8 row layout.
void quantize_row_q8(const float* x, int cols, uint8_t* row) {
  const int G = cols / kQ8Group;
  for (int g = 0; g < G; ++g) {
    float amax = 0.f;
    for (int e = 0; e < kQ8Group; ++e) amax = std::max(amax, std::fabs(x[g * kQ8Group + e]));
    const float s = amax / 127.0f;
    const float inv = s > 0.f ? 1.0f / s : 0.f;
    int8_t q[kQ8Group];
    for (int e = 0; e < kQ8Group; ++e)
      q[e] = (int8_t)std::clamp(std::nearbyint(x[g * kQ8Group + e] * inv), -127.0f, 127.0f);
    store_group_q8(row, G, g, q, s);
  }
}

// The F32 values a Q8 row stands for: out[c] = s[c / 32] * q[c].
void dequant_row_q8(const uint8_t* row, int cols, float* out) {
  const int G = cols / kQ8Group;
  int8_t q[kQ8Group];
  for (int g = 0; g < G; ++g) {
    const float s = load_group_q8(row, G, g, q);
#pragma omp simd
    for (int e = 0; e < kQ8Group; ++e) out[g * kQ8Group + e] = s * (float)q[e];
  }
}

// ---- portable matrix-vector rows --------------------------------------------------------
// y(i, r) for x rows i < nx and weight rows r in [r0, r1); each weight element is dequantized
// as the F32 kernels would see it (s * q, or the bf16 bits widened) before it multiplies x.

void q8_rows_portable(const float* x, int64_t ldx, int nx, const uint8_t* w, int in, int r0, int r1, float* y,
                      int64_t ldy, bool accumulate) {
  const size_t rb = q8_row_bytes(in);
  const int G = in / kQ8Group;
  float sums[kMaxGemvRows];
  int8_t q[kQ8Group];
  float wv[kQ8Group];
  for (int r = r0; r < r1; ++r) {
    const uint8_t* row = w + (size_t)r * rb;
    std::fill(sums, sums + nx, 0.f);
    for (int g = 0; g < G; ++g) {
      const float s = load_group_q8(row, G, g, q);
      for (int e = 0; e < kQ8Group; ++e) wv[e] = s * (float)q[e];
      for (int i = 0; i < nx; ++i) {
        const float* xi = x + i * ldx + g * kQ8Group;
        float sum = sums[i];
#pragma omp simd reduction(+ : sum)
        for (int e = 0; e < kQ8Group; ++e) sum += wv[e] * xi[e];
        sums[i] = sum;
      }
    }
    for (int i = 0; i < nx; ++i) {
      float& out = y[i * ldy + r];
      out = accumulate ? out + sums[i] : sums[i];
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

// ---- Q8 activations ----------------------------------------------------------------------
// Q8 products quantize each x row as the weights are (quantize_row_q8), on every path:
// y = dequant(quant(x)) · dequant(W)^T.

// One group of 32 x values as quantize_row_q8 rounds it (the same operations, vectorized:
// bit for bit its values and scale): q gets the int8 values, *sum their sum; returns the scale.
#ifdef SUBLLM_X86_DISPATCH
SUBLLM_AVX512 float quantize_group_q8(const float* x, int8_t* q, int* sum) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const float s = amax / 127.0f;
  const __m512 inv = _mm512_set1_ps(s > 0.f ? 1.0f / s : 0.f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  // Round to nearest even (the default rounding mode, as nearbyint), then clamp.
  const __m512i qa = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), lo), hi);
  const __m512i qb = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv)), lo), hi);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  return s;
}
#else
float quantize_group_q8(const float* x, int8_t* q, int* sum) {
  uint8_t row[kQ8Group + sizeof(float)];  // a one-group row: its 32 values, then its scale
  quantize_row_q8(x, kQ8Group, row);
  std::memcpy(q, row, kQ8Group);
  *sum = 0;
  for (int e = 0; e < kQ8Group; ++e) *sum += q[e];
  return load_f32(row + kQ8Group);
}
#endif

// x rows (n, in) as the Q8 products multiply them: each quantized as a weight row and
// dequantized, into out (n, in).
void round_rows_q8(const float* x, int64_t ldx, int n, int in, float* out) {
#pragma omp parallel if ((int64_t)n * in > (1 << 14))
  {
    std::vector<uint8_t> row(q8_row_bytes(in));
#pragma omp for schedule(static)
    for (int i = 0; i < n; ++i) {
      quantize_row_q8(x + i * ldx, in, row.data());
      dequant_row_q8(row.data(), in, out + (size_t)i * in);
    }
  }
}

// The x rows as the Q8 paths read them. `deq` holds them dequantized for the F32 paths; the
// int8 dot-product path reads, per x row i and block b of 16 groups (zero past the row's end):
//   xq (i, b, 8, 64) the int8 values, as a weight block's chunks hold them but each chunk
//                    64 bytes wide (group j of the block in bytes 4j .. 4j + 3);
//   sx (i, b, 16)    F32 group scales and
//   u  (i, b, 16)    F32 −128 × scale × (sum of the group's values).
struct Q8Activations {
  int blocks = 0;
  AlignedVector<float> deq, sx, u;
  AlignedVector<int8_t> xq;

  void prepare(const float* x, int64_t ldx, int nx, int in, bool for_vnni) {
    if (!for_vnni) {
      deq.resize((size_t)nx * in);
      round_rows_q8(x, ldx, nx, in, deq.data());
      return;
    }
    const int G = in / kQ8Group;
    blocks = (G + kBlockGroups - 1) / kBlockGroups;
    xq.assign((size_t)nx * blocks * 512, 0);
    sx.assign((size_t)nx * blocks * 16, 0.f);
    u.assign((size_t)nx * blocks * 16, 0.f);
    int8_t q[kQ8Group];
    for (int i = 0; i < nx; ++i)
      for (int g = 0; g < G; ++g) {
        int sum = 0;
        const float s = quantize_group_q8(x + i * ldx + g * kQ8Group, q, &sum);
        const size_t at = (size_t)i * blocks + g / kBlockGroups;
        const int j = g % kBlockGroups;
        for (int c = 0; c < kChunksPerBlock; ++c) std::memcpy(xq.data() + at * 512 + 64 * c + 4 * j, q + 4 * c, 4);
        sx[at * 16 + j] = s;
        u[at * 16 + j] = -128.0f * s * (float)sum;
      }
  }
};

// ---- AVX-512 matrix-vector rows ---------------------------------------------------------
#ifdef SUBLLM_X86_DISPATCH
// y(i, r) (=|+=) the sum of the lanes of a[i] (+ b[i]) for the NX x rows.
template <int NX>
SUBLLM_AVX512 inline void put_row_sums(const __m512 (&a)[NX], const __m512 (&b)[NX], float* y, int64_t ldy, int r,
                                       bool accumulate) {
  for (int i = 0; i < NX; ++i) {
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(a[i], b[i]));
    float& out = y[i * ldy + r];
    out = accumulate ? out + sum : sum;
  }
}

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
    alignas(64) int8_t q[kQ8Group];
    for (int g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(load_group_q8(row, G, g, q));
      const __m128i q0 = _mm_load_si128(reinterpret_cast<const __m128i*>(q));
      const __m128i q1 = _mm_load_si128(reinterpret_cast<const __m128i*>(q + 16));
      const __m512 w0 = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
      const __m512 w1 = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
      for (int i = 0; i < NX; ++i) {
        const float* xi = x + i * ldx + g * kQ8Group;
        a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), a0[i]);
        a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), a1[i]);
      }
    }
    put_row_sums<NX>(a0, a1, y, ldy, r, accumulate);
  }
}

// One block of 32 BF16 weights h (bits) against the block at column c of each x row, into
// that row's even and odd accumulators.
template <int NX>
SUBLLM_AVX512 inline void bf16_block(__m512i h, const float* xs, int64_t ldxs, int c, __m512 (&even)[NX],
                                     __m512 (&odd)[NX]) {
  const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32((int)0xffff0000u)));
  for (int i = 0; i < NX; ++i) {
    const float* xi = xs + i * ldxs + c;
    even[i] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xi), even[i]);
    odd[i] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xi + 16), odd[i]);
  }
}

// BF16 rows against x rows split by column parity: 32 BF16 weights are 16 32-bit words whose
// high halves (columns c + 2 l + 1) are F32 values once the low halves are masked off, and
// whose low halves (columns c + 2 l) are F32 values once shifted up, so widening costs one
// integer operation per 16 weights. `xs` holds each x row as blocks of 32 columns: its 16
// even columns, then its 16 odd ones (zero past the row's end); row i at xs + i * ldxs.
template <int NX>
SUBLLM_AVX512 void bf16_rows_avx512(const float* xs, int64_t ldxs, const uint16_t* w, int64_t ldw, int in, int r0,
                                    int r1, float* y, int64_t ldy, bool accumulate) {
  const int in32 = in / 32 * 32;
  for (int r = r0; r < r1; ++r) {
    const uint16_t* row = w + (int64_t)r * ldw;
    // Two blocks per step, four FMA chains per x row: with two, the chains' latency, not the
    // reads, paced the loop, and fewer weight loads were in flight than streaming needs.
    __m512 even[NX], odd[NX], even2[NX], odd2[NX];
    for (int i = 0; i < NX; ++i) even[i] = odd[i] = even2[i] = odd2[i] = _mm512_setzero_ps();
    int c = 0;
    for (; c + 64 <= in; c += 64) {
      __m512i h = _mm512_loadu_si512(row + c), h2 = _mm512_loadu_si512(row + c + 32);
      __asm__("" : "+v"(h), "+v"(h2));
      bf16_block<NX>(h, xs, ldxs, c, even, odd);
      bf16_block<NX>(h2, xs, ldxs, c + 32, even2, odd2);
    }
    for (; c < in; c += 32) {
      const __m512i h = c < in32 ? _mm512_loadu_si512(row + c)
                                 : _mm512_maskz_loadu_epi16((__mmask32)((1ull << (in - c)) - 1ull), row + c);
      bf16_block<NX>(h, xs, ldxs, c, even, odd);
    }
    for (int i = 0; i < NX; ++i) {
      even[i] = _mm512_add_ps(even[i], even2[i]);
      odd[i] = _mm512_add_ps(odd[i], odd2[i]);
    }
    put_row_sums<NX>(even, odd, y, ldy, r, accumulate);
  }
}

// bf16_rows_avx512 two weight rows at a time, sharing each x load (the panels of the
// many-rows product, where W sits in cache).
template <int NX>
SUBLLM_AVX512 void bf16_rows2_avx512(const float* xs, int64_t ldxs, const uint16_t* w, int64_t ldw, int in, int r0,
                                     int r1, float* y, int64_t ldy, bool accumulate) {
  const int in32 = in / 32 * 32;
  int r = r0;
  for (; r + 2 <= r1; r += 2) {
    const uint16_t* row_a = w + (int64_t)r * ldw;
    const uint16_t* row_b = row_a + ldw;
    __m512 even_a[NX], odd_a[NX], even_b[NX], odd_b[NX];
    for (int i = 0; i < NX; ++i) even_a[i] = odd_a[i] = even_b[i] = odd_b[i] = _mm512_setzero_ps();
    int c = 0;
    for (; c < in32; c += 32) {
      bf16_block<NX>(_mm512_loadu_si512(row_a + c), xs, ldxs, c, even_a, odd_a);
      bf16_block<NX>(_mm512_loadu_si512(row_b + c), xs, ldxs, c, even_b, odd_b);
    }
    if (c < in) {
      const __mmask32 m = (__mmask32)((1ull << (in - c)) - 1ull);
      bf16_block<NX>(_mm512_maskz_loadu_epi16(m, row_a + c), xs, ldxs, c, even_a, odd_a);
      bf16_block<NX>(_mm512_maskz_loadu_epi16(m, row_b + c), xs, ldxs, c, even_b, odd_b);
    }
    put_row_sums<NX>(even_a, odd_a, y, ldy, r, accumulate);
    put_row_sums<NX>(even_b, odd_b, y, ldy, r + 1, accumulate);
  }
  if (r < r1) bf16_rows_avx512<NX>(xs, ldxs, w, ldw, in, r, r1, y, ldy, accumulate);
}

// bf16_rows_avx512 for one x row against weight rows ra + i and rb + i, i < n, in lockstep:
// two streams, each x load serving both rows.
SUBLLM_AVX512 void bf16_row_pairs_avx512(const float* xs, const uint16_t* w, int64_t ldw, int in, int ra, int rb, int n,
                                         float* y, bool accumulate) {
  const int in32 = in / 32 * 32;
  for (int i = 0; i < n; ++i) {
    const uint16_t* row_a = w + (int64_t)(ra + i) * ldw;
    const uint16_t* row_b = w + (int64_t)(rb + i) * ldw;
    __m512 even_a[1], odd_a[1], even_b[1], odd_b[1];
    even_a[0] = odd_a[0] = even_b[0] = odd_b[0] = _mm512_setzero_ps();
    for (int c = 0; c < in; c += 32) {
      const __mmask32 m = c < in32 ? ~0u : (__mmask32)((1ull << (in - c)) - 1ull);
      __m512i ha = _mm512_maskz_loadu_epi16(m, row_a + c), hb = _mm512_maskz_loadu_epi16(m, row_b + c);
      __asm__("" : "+v"(ha), "+v"(hb));
      bf16_block<1>(ha, xs, 0, c, even_a, odd_a);
      bf16_block<1>(hb, xs, 0, c, even_b, odd_b);
    }
    put_row_sums<1>(even_a, odd_a, y, 0, ra + i, accumulate);
    put_row_sums<1>(even_b, odd_b, y, 0, rb + i, accumulate);
  }
}

// Q8 rows against Q8-quantized x rows with the int8 dot product (vpdpbusd: unsigned bytes ×
// signed bytes, four products summed into each int32 lane). The weight bytes w become unsigned
// as w + 128 (the sign bit flipped); the x side's u takes the offset back out. A block's chunk
// c holds bytes 4c .. 4c + 3 of each of its groups, so lane j of the 8 chunks' dot products
// sums group j exactly, in int32; the block's scales follow its chunks, and the row streams
// once, in order, through one load per 64 weight bytes and one per 64 x bytes (shared by the
// two rows of a pair).

// acc[p][i] += block b (n groups) of weight row p, at blocks[p], against x row i; lane j holds
// group j. Whole blocks (kWhole) read their chunks at fixed offsets.
template <int NX, int P, bool kWhole>
SUBLLM_AVX512_VNNI __attribute__((always_inline)) inline void q8_block(const uint8_t* const (&blocks)[P], int n, int b,
                                                                     const Q8Activations& a, __m512 (&acc)[P][NX]) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const size_t stride = kWhole ? 64 : 4 * (size_t)n;
  const __mmask64 part = kWhole ? ~0ull : (1ull << (4 * n)) - 1ull;
  auto chunk = [&](int p, int c) {
    const uint8_t* at = blocks[p] + stride * c;
    return _mm512_xor_si512(kWhole ? _mm512_loadu_si512(at) : _mm512_maskz_loadu_epi8(part, at), flip);
  };
  // Two chains of dot products per weight row and x row: their latency, not the loads, would
  // pace one.
  __m512i s0[P][NX], s1[P][NX];
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < NX; ++i) s0[p][i] = s1[p][i] = _mm512_setzero_si512();
  for (int c = 0; c < kChunksPerBlock; c += 2) {
    __m512i w0[P], w1[P];
    for (int p = 0; p < P; ++p) w0[p] = chunk(p, c), w1[p] = chunk(p, c + 1);
    for (int i = 0; i < NX; ++i) {
      const int8_t* xc = a.xq.data() + ((size_t)i * a.blocks + b) * 512 + 64 * c;
      const __m512i x0 = _mm512_load_si512(xc), x1 = _mm512_load_si512(xc + 64);
      for (int p = 0; p < P; ++p) {
        s0[p][i] = _mm512_dpbusd_epi32(s0[p][i], w0[p], x0);
        s1[p][i] = _mm512_dpbusd_epi32(s1[p][i], w1[p], x1);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    const float* scales = reinterpret_cast<const float*>(blocks[p] + (size_t)n * kQ8Group);
    const __m512 sw = kWhole ? _mm512_loadu_ps(scales) : _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), scales);
    for (int i = 0; i < NX; ++i) {
      const size_t at = ((size_t)i * a.blocks + b) * 16;
      const __m512 xs = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0[p][i], s1[p][i])),
                                        _mm512_load_ps(a.sx.data() + at), _mm512_load_ps(a.u.data() + at));
      acc[p][i] = _mm512_fmadd_ps(xs, sw, acc[p][i]);
    }
  }
}

// acc[p][i] = weight row p (rows[p]) against x row i, lane j summing group j of each block.
template <int NX, int P>
SUBLLM_AVX512_VNNI __attribute__((always_inline)) inline void q8_row_dots(const uint8_t* const (&rows)[P], int G,
                                                                        const Q8Activations& a,
                                                                        __m512 (&acc)[P][NX]) {
  const int whole = G / kBlockGroups, rest = G % kBlockGroups;
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < NX; ++i) acc[p][i] = _mm512_setzero_ps();
  const uint8_t* blocks[P];
  for (int b = 0; b < whole; ++b) {
    for (int p = 0; p < P; ++p) blocks[p] = rows[p] + b * kBlockBytes;
    q8_block<NX, P, true>(blocks, kBlockGroups, b, a, acc);
  }
  if (rest) {
    for (int p = 0; p < P; ++p) blocks[p] = rows[p] + whole * kBlockBytes;
    q8_block<NX, P, false>(blocks, rest, whole, a, acc);
  }
}

// Rows [r0, r1) of W against NX x rows, P weight rows at a time sharing each x load (P = 2 in
// the panels of the many-rows product, where W sits in cache).
template <int NX, int P = 1>
SUBLLM_AVX512_VNNI void q8_rows_vnni(const Q8Activations& a, const uint8_t* w, int in, int r0, int r1, float* y,
                                     int64_t ldy, bool accumulate) {
  const size_t rb = q8_row_bytes(in);
  __m512 zero[NX];
  for (int i = 0; i < NX; ++i) zero[i] = _mm512_setzero_ps();
  int r = r0;
  for (; r + P <= r1; r += P) {
    const uint8_t* rows[P];
    for (int p = 0; p < P; ++p) rows[p] = w + (size_t)(r + p) * rb;
    __m512 acc[P][NX];
    q8_row_dots<NX, P>(rows, in / kQ8Group, a, acc);
    for (int p = 0; p < P; ++p) put_row_sums<NX>(acc[p], zero, y, ldy, r + p, accumulate);
  }
  if constexpr (P > 1)
    if (r < r1) q8_rows_vnni<NX, 1>(a, w, in, r, r1, y, ldy, accumulate);
}

// The loop of the many-rows products: W's `out` rows in panels of about 128 KB (`row_bytes`
// each), which the threads take in turn, each panel (in L2) against every group of up to 4 of
// the n x rows: rows(r0, r1, g, nx) with nx as a compile-time constant (std::integral_constant).
template <class Rows>
void for_panels(int n, int out, size_t row_bytes, Rows rows) {
  const int panel = std::max(2, (int)(((size_t)128 << 10) / row_bytes) / 2 * 2);
  const int panels = (out + panel - 1) / panel, groups = (n + kMaxGemvRows - 1) / kMaxGemvRows;
#pragma omp parallel for schedule(dynamic, 1)
  for (int p = 0; p < panels; ++p) {
    const int r0 = p * panel, r1 = std::min(out, r0 + panel);
    for (int g = 0; g < groups; ++g) {
      switch (std::min(kMaxGemvRows, n - g * kMaxGemvRows)) {
        case 1: rows(r0, r1, g, std::integral_constant<int, 1>{}); break;
        case 2: rows(r0, r1, g, std::integral_constant<int, 2>{}); break;
        case 3: rows(r0, r1, g, std::integral_constant<int, 3>{}); break;
        default: rows(r0, r1, g, std::integral_constant<int, 4>{}); break;
      }
    }
  }
}

// y(n, out) (=|+=) the many-rows product with the int8 dot product: x quantized in groups of
// 4 rows, as the matrix-vector path quantizes its own, then for_panels.
SUBLLM_AVX512_VNNI void q8_gemm_vnni(const float* x, int64_t ldx, const uint8_t* w, float* y, int64_t ldy, int n,
                                     int in, int out, bool accumulate) {
  const int groups = (n + kMaxGemvRows - 1) / kMaxGemvRows;
  thread_local std::vector<Q8Activations> xs;
  std::vector<Q8Activations>& xg = xs;  // the calling thread's, for every thread
  if ((int)xg.size() < groups) xg.resize(groups);
#pragma omp parallel for schedule(static)
  for (int g = 0; g < groups; ++g)
    xg[g].prepare(x + (int64_t)g * kMaxGemvRows * ldx, ldx, std::min(kMaxGemvRows, n - g * kMaxGemvRows), in, true);
  for_panels(n, out, q8_row_bytes(in), [&](int r0, int r1, int g, auto nx) {
    q8_rows_vnni<nx(), 2>(xg[g], w, in, r0, r1, y + (int64_t)g * kMaxGemvRows * ldy, ldy, accumulate);
  });
}

// One x row against weight rows ra + i and rb + i, i < n, in lockstep (two streams).
SUBLLM_AVX512_VNNI void q8_row_pairs_vnni(const Q8Activations& a, const uint8_t* w, int in, int ra, int rb, int n,
                                          float* y, bool accumulate) {
  const size_t bytes = q8_row_bytes(in);
  const __m512 zero[1] = {_mm512_setzero_ps()};
  for (int i = 0; i < n; ++i) {
    const uint8_t* rows[2] = {w + (size_t)(ra + i) * bytes, w + (size_t)(rb + i) * bytes};
    __m512 acc[2][1];
    q8_row_dots<1, 2>(rows, in / kQ8Group, a, acc);
    put_row_sums<1>(acc[0], zero, y, 0, ra + i, accumulate);
    put_row_sums<1>(acc[1], zero, y, 0, rb + i, accumulate);
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

// x rows by column parity within blocks of 32, as bf16_rows_avx512 reads them.
struct Bf16Activations {
  AlignedVector<float> split;
  int64_t lds = 0;
  void prepare(const float* x, int64_t ldx, int nx, int in) {
    lds = (in + 31) / 32 * 32;
    split.assign((size_t)nx * lds, 0.f);
    float* s = split.data();
    auto row = [&](int i) {
      for (int c = 0; c < in; ++c) s[i * lds + c / 32 * 32 + (c % 2) * 16 + (c % 32) / 2] = x[i * ldx + c];
    };
    if (nx <= kMaxGemvRows) {  // a decoding step's: no parallel region
      for (int i = 0; i < nx; ++i) row(i);
      return;
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < nx; ++i) row(i);
  }
};

// Rows [r0, r1) of up to 4 x rows, on the path the machine takes (`a`: x prepared for the
// AVX-512 one).
void bf16_rows(const float* x, int64_t ldx, const Bf16Activations& a, int nx, const uint16_t* w, int64_t ldw, int in,
               int r0, int r1, float* y, int64_t ldy, bool accumulate) {
#ifdef SUBLLM_X86_DISPATCH
  if (fast_kernels_active()) {
    switch (nx) {
      case 1: return bf16_rows_avx512<1>(a.split.data(), a.lds, w, ldw, in, r0, r1, y, ldy, accumulate);
      case 2: return bf16_rows_avx512<2>(a.split.data(), a.lds, w, ldw, in, r0, r1, y, ldy, accumulate);
      case 3: return bf16_rows_avx512<3>(a.split.data(), a.lds, w, ldw, in, r0, r1, y, ldy, accumulate);
      default: return bf16_rows_avx512<4>(a.split.data(), a.lds, w, ldw, in, r0, r1, y, ldy, accumulate);
    }
  }
#endif
  bf16_rows_portable(x, ldx, nx, w, ldw, in, r0, r1, y, ldy, accumulate);
}

// Dequantized tiles for the GEMM path: kTileRows weight rows by kTileK columns, 64 KiB of F32
// on the stack of the thread that owns the tile.
constexpr int kTileRows = 64, kTileK = 256;

// tile (R, K) = W rows [r0, r0 + R), columns [k0, k0 + K) as F32 (k0, K multiples of 32 for Q8).
void dequant_tile_q8(const uint8_t* w, int in, int r0, int R, int k0, int K, float* tile) {
  const size_t rb = q8_row_bytes(in);
  const int G = in / kQ8Group;
  int8_t q[kQ8Group];
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = w + (size_t)(r0 + r) * rb;
    float* t = tile + (int64_t)r * K;
    for (int g = k0 / kQ8Group; g < (k0 + K) / kQ8Group; ++g) {
      const float s = load_group_q8(row, G, g, q);
      float* tg = t + g * kQ8Group - k0;
#pragma omp simd
      for (int e = 0; e < kQ8Group; ++e) tg[e] = s * (float)q[e];
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
// GEMM for more. `rows(x, nx, r0, r1, y)` and `tile(r0, R, k0, K, t)` know W's type;
// `row_bytes` is the size of one of W's rows.
template <class Rows, class Pairs, class Tile>
void linear_forward_typed(const float* x, int64_t ldx, float* y, int64_t ldy, int n, int in, int out, bool accumulate,
                          int64_t row_bytes, Rows rows, Pairs pairs, Tile tile) {
  if (n <= 0 || out <= 0) return;
  if (n <= kMaxGemvRows) {
    // A contiguous part of W per thread, each streamed once as two streams (chunks balance the
    // parts). `pairs(a, b, count)` takes two streams' rows in lockstep for one x row.
    for_row_parts(
        out, row_chunk(row_bytes), [&](int r0, int r1) { rows(x, n, r0, r1, y, accumulate); },
        [&](int a, int b, int count) {
          if (n == 1 && pairs(a, b, count)) return;
          rows(x, n, a, a + count, y, accumulate);
          rows(x, n, b, b + count, y, accumulate);
        });
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
      chunk_loss += (double)(log_sum_exp(l, V) - l[tgt]);
      chunk_count += 1;
    }
    total += chunk_loss;
    counted += chunk_count;
  }
  if (count) *count = counted;
  return total;
}

}  // namespace

bool fast_kernels_active() { return fast_active(); }
void set_portable_kernels(bool portable) { g_portable_forced.store(portable, std::memory_order_relaxed); }
void set_vnni_kernels(bool allowed) { g_vnni_off.store(!allowed, std::memory_order_relaxed); }

void quantize_q8(const float* src, int64_t rows, int cols, void* dst) {
  const size_t rb = q8_row_bytes(cols);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) quantize_row_q8(src + r * cols, cols, static_cast<uint8_t*>(dst) + (size_t)r * rb);
}

void pack_q8(const int8_t* values, const float* scales, int64_t rows, int cols, void* dst) {
  const int G = cols / kQ8Group;
  const size_t rb = q8_row_bytes(cols);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = static_cast<uint8_t*>(dst) + (size_t)r * rb;
    for (int g = 0; g < G; ++g) {
      int8_t q[kQ8Group];
      std::memcpy(q, values + r * cols + g * kQ8Group, kQ8Group);
      store_group_q8(row, G, g, q, scales[r * G + g]);
    }
  }
}

void unpack_q8(const void* src, int64_t rows, int cols, int8_t* values, float* scales) {
  const int G = cols / kQ8Group;
  const size_t rb = q8_row_bytes(cols);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = static_cast<const uint8_t*>(src) + (size_t)r * rb;
    for (int g = 0; g < G; ++g) {
      int8_t q[kQ8Group];
      scales[r * G + g] = load_group_q8(row, G, g, q);
      std::memcpy(values + r * cols + g * kQ8Group, q, kQ8Group);
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
  const bool vnni = vnni_active();
#ifdef SUBLLM_X86_DISPATCH
  if (vnni && n > kMaxGemvRows) return q8_gemm_vnni(x, ldx, wq, y, ldy, n, in, out, accumulate);
#endif
  // Without VNNI, more rows than the matrix-vector path takes go through the F32 GEMM: their
  // x rows are quantized and dequantized here, as the matrix-vector path quantizes its own.
  thread_local std::vector<float> x_rounded;
  if (n > kMaxGemvRows) {
    x_rounded.resize((size_t)n * in);
    round_rows_q8(x, ldx, n, in, x_rounded.data());
    x = x_rounded.data();
    ldx = in;
  }
  // The matrix-vector path's x, quantized once on the calling thread for every thread's rows.
  // (A thread_local named inside the lambda would be each worker's own: capture a reference.)
  thread_local Q8Activations prepared;
  Q8Activations& a = prepared;
  if (n <= kMaxGemvRows) a.prepare(x, ldx, n, in, vnni);
  linear_forward_typed(
      x, ldx, y, ldy, n, in, out, accumulate, (int64_t)q8_row_bytes(in),
      [&](const float*, int nx, int r0, int r1, float* ys, bool acc) {
#ifdef SUBLLM_X86_DISPATCH
        if (vnni) {
          switch (nx) {
            case 1: return q8_rows_vnni<1>(a, wq, in, r0, r1, ys, ldy, acc);
            case 2: return q8_rows_vnni<2>(a, wq, in, r0, r1, ys, ldy, acc);
            case 3: return q8_rows_vnni<3>(a, wq, in, r0, r1, ys, ldy, acc);
            default: return q8_rows_vnni<4>(a, wq, in, r0, r1, ys, ldy, acc);
          }
        }
#endif
        q8_rows(a.deq.data(), in, nx, wq, in, r0, r1, ys, ldy, acc);
      },
      [&](int ra, int rb, int count) {
#ifdef SUBLLM_X86_DISPATCH
        if (vnni) {
          q8_row_pairs_vnni(a, wq, in, ra, rb, count, y, accumulate);
          return true;
        }
#endif
        return false;
      },
      [&](int r0, int R, int k0, int K, float* t) { dequant_tile_q8(wq, in, r0, R, k0, K, t); });
}

#ifdef SUBLLM_X86_DISPATCH
// y(n, out) (=|+=) the many-rows product of BF16 rows against x split by column parity (xs),
// through for_panels, two weight rows at a time.
void bf16_gemm_avx512(const Bf16Activations& xs, const uint16_t* w, int64_t ldw, float* y, int64_t ldy, int n, int in,
                      int out, bool accumulate) {
  for_panels(n, out, ldw * sizeof(uint16_t), [&](int r0, int r1, int g, auto nx) {
    bf16_rows2_avx512<nx()>(xs.split.data() + (size_t)g * kMaxGemvRows * xs.lds, xs.lds, w, ldw, in, r0, r1,
                            y + (int64_t)g * kMaxGemvRows * ldy, ldy, accumulate);
  });
}
#endif

void linear_forward_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, float* y, int64_t ldy, int n,
                         int in, int out, bool accumulate) {
  // x split by column parity for the AVX-512 kernels, prepared once on the calling thread for
  // every thread's rows. (A thread_local named inside the lambda would be each worker's own:
  // capture a reference.)
  thread_local Bf16Activations prepared;
  Bf16Activations& a = prepared;
  const bool fast = fast_kernels_active();
  if (fast) a.prepare(x, ldx, n, in);
#ifdef SUBLLM_X86_DISPATCH
  if (fast && n > kMaxGemvRows) return bf16_gemm_avx512(a, w, ldw, y, ldy, n, in, out, accumulate);
#endif
  linear_forward_typed(
      x, ldx, y, ldy, n, in, out, accumulate, ldw * (int64_t)sizeof(uint16_t),
      [&](const float* xs, int nx, int r0, int r1, float* ys, bool acc) {
        bf16_rows(xs, ldx, a, nx, w, ldw, in, r0, r1, ys, ldy, acc);
      },
      [&](int ra, int rb, int count) {
#ifdef SUBLLM_X86_DISPATCH
        if (fast) {
          bf16_row_pairs_avx512(a.split.data(), w, ldw, in, ra, rb, count, y, accumulate);
          return true;
        }
#endif
        return false;
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
