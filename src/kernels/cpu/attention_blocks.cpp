// Attention of query rows against their caches in blocks of cache rows (kernels.h,
// attention_cached_blocks). A block gives per head the max of its scores, the sum of their
// exponentials and the values weighted by them; a row's blocks are combined in order. The
// arithmetic of a row is the same whether one thread walks all its blocks or its blocks are
// shared out, so one sequence decoding alone and the same sequence in a batch agree exactly.
// Every cached row is read whole (all heads) and in order, so a thread streams its blocks.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/vec_math.h"
#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"
#include "kernels/cpu/team.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define SUBLLM_BLOCKS_X86 1
#define SUBLLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

namespace subllm::kernels {

#ifdef SUBLLM_BLOCKS_X86
namespace {

constexpr int kBlock = 64;  // the most rows a block holds

// Rows per block for a query row that sees n cache rows: n cut into a multiple of 4 blocks,
// at least 4 and as few as hold at most kBlock rows each, so that 2 or 4 threads get equal
// shares (blocks of a sixteenth, cut in multiples of 16, left one thread a block more at
// some lengths, and their short streams read an F32 cache 5-15 % slower at 96-200 rows). It
// depends on n alone, so a row is cut the same way however rows and blocks are shared out.
inline int block_rows(int n) {
  const int blocks = (std::max(4, (n + kBlock - 1) / kBlock) + 3) / 4 * 4;
  return (n + blocks - 1) / blocks;
}

// The most blocks of a query row that sees at most L cache rows (at most 3 above L / kBlock).
inline int max_row_blocks(int L) { return std::max(4, (L + kBlock - 1) / kBlock + 3); }

// 16 cached values as F32.
SUBLLM_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SUBLLM_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// A row's partial over one block, per head h: part[h] the max score, part[H + h] the sum of
// exp(score - max), part[2 H + h hd ..] the values weighted by those exponentials.
struct Partial {
  float* p;
  int H, hd;
  float& max(int h) const { return p[h]; }
  float& sum(int h) const { return p[H + h]; }
  float* acc(int h) const { return p + 2 * H + (size_t)h * hd; }
  static size_t floats(int H, int hd) { return (size_t)H * (hd + 2); }
};

// Query row q (H heads of hd) against cache rows [j0, j1) (j1 - j0 <= kBlock); s: H * kBlock.
template <class T>
SUBLLM_AVX512 void block_partial(const float* q, const T* k, const T* v, int64_t ld, int j0, int j1, int H, int group,
                                 int hd, float scale, const Partial& out, float* s) {
  const int nb = j1 - j0, chunks = hd / 16;
  for (int j = 0; j < nb; ++j) {
    const T* kj = k + (int64_t)(j0 + j) * ld;
    for (int h = 0; h < H; ++h) {
      const float* qh = q + (size_t)h * hd;
      const T* kh = kj + (size_t)(h / group) * hd;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int c = 0;
      for (; c + 2 <= chunks; c += 2) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), load16(kh + 16 * c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c + 16), load16(kh + 16 * c + 16), a1);
      }
      if (c < chunks) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), load16(kh + 16 * c), a0);
      s[h * kBlock + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
    }
  }
  for (int h = 0; h < H; ++h) {
    float* sh = s + h * kBlock;
    float mx = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < nb; ++j) mx = std::max(mx, sh[j]);
    float sum = 0.f;
    for (int j = 0; j < nb; ++j) {
      sh[j] = exp_approx(sh[j] - mx);
      sum += sh[j];
    }
    out.max(h) = mx;
    out.sum(h) = sum;
    std::fill(out.acc(h), out.acc(h) + hd, 0.f);
  }
  for (int j = 0; j < nb; ++j) {
    const T* vj = v + (int64_t)(j0 + j) * ld;
    for (int h = 0; h < H; ++h) {
      const __m512 p = _mm512_set1_ps(s[h * kBlock + j]);
      const T* vh = vj + (size_t)(h / group) * hd;
      float* a = out.acc(h);
      for (int c = 0; c < chunks; ++c)
        _mm512_storeu_ps(a + 16 * c, _mm512_fmadd_ps(p, load16(vh + 16 * c), _mm512_loadu_ps(a + 16 * c)));
    }
  }
}

// Heads [h0, h1) of o (H heads of hd) from a row's `blocks` partials, in block order.
SUBLLM_AVX512 void combine(float* parts, int blocks, int H, int hd, int h0, int h1, float* o) {
  auto part = [&](int b) { return Partial{parts + b * Partial::floats(H, hd), H, hd}; };
  for (int h = h0; h < h1; ++h) {
    float top = -std::numeric_limits<float>::infinity();
    for (int b = 0; b < blocks; ++b) top = std::max(top, part(b).max(h));
    float den = 0.f;
    float* oh = o + (size_t)h * hd;
    std::fill(oh, oh + hd, 0.f);
    for (int b = 0; b < blocks; ++b) {
      const Partial p = part(b);
      const float w = exp_approx(p.max(h) - top);
      den += w * p.sum(h);
      const __m512 wv = _mm512_set1_ps(w);
      for (int c = 0; c < hd; c += 16)
        _mm512_storeu_ps(oh + c, _mm512_fmadd_ps(wv, _mm512_loadu_ps(p.acc(h) + c), _mm512_loadu_ps(oh + c)));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / den);
    for (int c = 0; c < hd; c += 16) _mm512_storeu_ps(oh + c, _mm512_mul_ps(_mm512_loadu_ps(oh + c), inv));
  }
}

// Query row i of item `item`: the cache rows it sees, its block size and blocks.
struct Row {
  int item, i, n, rows_per_block, blocks;
};

template <class T>
void attend_blocks(const CachedAttentionItem* items, int count, int H, int Hkv, int hd, float* scratch) {
  const int group = H / Hkv;
  const float scale = 1.0f / std::sqrt((float)hd);
  const size_t pf = Partial::floats(H, hd);
  // The calling thread's lists (one call per block and token when decoding: no allocation
  // once they have grown), shared with the team.
  thread_local std::vector<Row> rows_store;
  thread_local std::vector<size_t> first_store;
  std::vector<Row>& rows = rows_store;
  rows.clear();
  int max_L = 0;
  for (int b = 0; b < count; ++b) {
    max_L = std::max(max_L, items[b].L);
    for (int i = 0; i < items[b].m; ++i) {
      const int n = items[b].L - items[b].m + i + 1;
      const int per = block_rows(n);
      rows.push_back({b, i, n, per, (n + per - 1) / per});
    }
  }
  const int R = (int)rows.size();
  if (R == 0) return;
  // scratch (attention_blocks_scratch_floats): each thread's scores, then the partials.
  const int nt = omp_get_max_threads();
  const size_t scores = (size_t)H * kBlock;
  float* partials = scratch + (size_t)nt * scores;
  const size_t thread_partials = 2 * (size_t)max_row_blocks(max_L) * pf;
  auto part_of = [&](float* base, size_t at) { return Partial{base + at * pf, H, hd}; };
  auto run_block = [&](const Row& r, int blk, const Partial& out, float* s) {
    const CachedAttentionItem& it = items[r.item];
    const int j0 = blk * r.rows_per_block, j1 = std::min(r.n, j0 + r.rows_per_block);
    block_partial(it.q + (int64_t)r.i * it.ld_q, static_cast<const T*>(it.k), static_cast<const T*>(it.v), it.ld_kv,
                  j0, j1, H, group, hd, scale, out, s);
  };
  auto out_of = [&](const Row& r) { return items[r.item].out + (int64_t)r.i * items[r.item].ld_o; };
  if (R >= 2 * nt) {
    // Many rows (a batch of sequences): a thread takes a row at a time, all its blocks.
    parallel([&] {
      const int t = omp_get_thread_num();
      float* s = scratch + t * scores;
      float* parts = partials + t * thread_partials;
#pragma omp for schedule(dynamic, 1)
      for (int x = 0; x < R; ++x) {
        const Row& r = rows[x];
        for (int blk = 0; blk < r.blocks; ++blk) run_block(r, blk, part_of(parts, blk), s);
        combine(parts, r.blocks, H, hd, 0, H, out_of(r));
      }
    });
    return;
  }
  // Few rows (one sequence decoding): the rows' blocks shared out in order, so each thread
  // streams a contiguous run of the cache; then each row's blocks combined. Fewer than 2 nt
  // rows of at most max_row_blocks blocks each fit the nt threads' partials.
  std::vector<size_t>& first = first_store;  // a row's first partial
  first.assign(R + 1, 0);
  for (int x = 0; x < R; ++x) first[x + 1] = first[x] + rows[x].blocks;
  const size_t tasks = first[R];
  parallel([&] {
    float* s = scratch + omp_get_thread_num() * scores;
    int x = 0;
#pragma omp for schedule(static)
    for (size_t t = 0; t < tasks; ++t) {
      while (first[x + 1] <= t) ++x;
      run_block(rows[x], (int)(t - first[x]), part_of(partials, t), s);
    }
    // Each row's heads in nt parts, so one row alone is combined by every thread.
    const int team = omp_get_num_threads();
#pragma omp for schedule(static) nowait
    for (int y = 0; y < R * team; ++y) {
      const Row& r = rows[y / team];
      const int part = y % team, h0 = H * part / team, h1 = H * (part + 1) / team;
      combine(partials + first[y / team] * pf, r.blocks, H, hd, h0, h1, out_of(r));
    }
  });
}

}  // namespace
#endif

bool attention_blocks_take(int hd) {
#ifdef SUBLLM_BLOCKS_X86
  return fast_kernels_active() && hd % 16 == 0 && hd > 0;
#else
  (void)hd;
  return false;
#endif
}

size_t attention_blocks_scratch_floats(int max_L, int H, int hd, int workers) {
#ifdef SUBLLM_BLOCKS_X86
  return (size_t)workers * ((size_t)H * kBlock + 2 * (size_t)max_row_blocks(max_L) * Partial::floats(H, hd));
#else
  (void)max_L, (void)H, (void)hd, (void)workers;
  return 0;
#endif
}

void attention_cached_blocks(const CachedAttentionItem* items, int count, int H, int Hkv, int hd, bool bf16_cache,
                             float* scratch) {
#ifdef SUBLLM_BLOCKS_X86
  if (bf16_cache) attend_blocks<uint16_t>(items, count, H, Hkv, hd, scratch);
  else attend_blocks<float>(items, count, H, Hkv, hd, scratch);
#else
  (void)items, (void)count, (void)H, (void)Hkv, (void)hd, (void)bf16_cache, (void)scratch;
#endif
}

}  // namespace subllm::kernels
