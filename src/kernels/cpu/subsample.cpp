// Row movement and SUBLLM's subsampler, upsampler and bypass on the CPU.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/for_rows.h"
#include "kernels/kernels.h"

namespace subllm::kernels {

namespace {
inline float clamp01(float s) { return std::clamp(s, 0.0f, 1.0f); }
}  // namespace

void gather_rows(const void* src, int64_t ld_src, const int32_t* idx, void* dst, int64_t ld_dst, int64_t n, int cols) {
  const auto* s = static_cast<const uint32_t*>(src);
  auto* d = static_cast<uint32_t*>(dst);
  for_rows(n, n * cols > 4096,
           [&](int64_t i) { std::memcpy(d + i * ld_dst, s + (int64_t)idx[i] * ld_src, sizeof(uint32_t) * cols); });
}

void scatter_add_rows(const float* src, int64_t ld_src, const int32_t* idx, float* dst, int64_t ld_dst, int64_t n,
                      int cols) {
  for_rows(n, n * cols > 4096, [&](int64_t i) {
    float* d = dst + (int64_t)idx[i] * ld_dst;
    const float* s = src + i * ld_src;
#pragma omp simd
    for (int c = 0; c < cols; ++c) d[c] += s[c];
  });
}

void copy_rows(const void* src, int64_t ld_src, void* dst, int64_t ld_dst, int64_t rows, int cols) {
  const auto* s = static_cast<const uint32_t*>(src);
  auto* d = static_cast<uint32_t*>(dst);
  if (ld_src == cols && ld_dst == cols) {
    std::memcpy(d, s, sizeof(uint32_t) * rows * cols);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) std::memcpy(d + r * ld_dst, s + r * ld_src, sizeof(uint32_t) * cols);
}

void fill_positions(int32_t* pos, int B, int T, int offset) {
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) pos[(int64_t)b * T + t] = offset + t;
}

void select_top(const float* scores, int B, int Tp, int Tc, bool flip, int32_t* kept, int32_t* partner, float* w,
                int32_t* scratch) {
  int32_t* order = scratch;
  int32_t* rank_of = scratch + Tp;
  for (int b = 0; b < B; ++b) {
    const float* s = scores + (int64_t)b * Tp;
    for (int t = 0; t < Tp; ++t) order[t] = t;
    // Highest scores first; equal scores keep sequence order.
    std::stable_sort(order, order + Tp, [&](int32_t u, int32_t v) { return s[u] > s[v]; });
    for (int r = 0; r < Tp; ++r) rank_of[order[r]] = r;
    int32_t* kb = kept + (int64_t)b * Tc;
    std::copy(order, order + Tc, kb);
    std::sort(kb, kb + Tc);
    for (int i = 0; i < Tc; ++i) {
      const int t = kb[i], r = rank_of[t];
      const int dr = Tc + (flip ? Tc - 1 - r : r);
      const int64_t row = (int64_t)b * Tp + t;
      kb[i] = (int32_t)row;
      partner[(int64_t)b * Tc + i] = dr < Tp ? (int32_t)((int64_t)b * Tp + order[dr]) : -1;
      w[(int64_t)b * Tc + i] = clamp01(scores[row]) - (dr < Tp ? clamp01(s[order[dr]]) : 0.0f);
    }
  }
}

int select_threshold(const float* scores, const int32_t* tokens, int n, float threshold, int pad, int32_t* kept,
                     float* w) {
  int k = 0;
  for (int t = 0; t < n; ++t)
    if (scores[t] > threshold && tokens[t] != pad) {
      kept[k] = t;
      w[k] = clamp01(scores[t]);
      ++k;
    }
  return k;
}

void upsample_bypass_forward(const float* x, const float* y, const int32_t* kept, const float* w, const float* c,
                             float* out, int64_t rows, int C) {
  for_rows(rows, rows * C > 4096, [&](int64_t i) {
    float* o = out + (int64_t)kept[i] * C;
    const float* xi = x + (int64_t)kept[i] * C;
    const float* yi = y + i * C;
    const float wi = w[i];
    for (int ch = 0; ch < C; ++ch) o[ch] = xi[ch] + c[ch] * wi * (yi[ch] - xi[ch]);
  });
}

void upsample_bypass_backward(const float* x, const float* y, const int32_t* kept, const float* w, const float* c,
                              float* dout, float* dy, float* dw, float* dc, int64_t rows, int C, float* scratch) {
  int nthreads = 1;
#pragma omp parallel
  {
#pragma omp single
    nthreads = omp_get_num_threads();
    float* dcp = scratch + (size_t)omp_get_thread_num() * C;
    std::fill(dcp, dcp + C, 0.f);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      float* d = dout + (int64_t)kept[i] * C;
      const float* xi = x + (int64_t)kept[i] * C;
      const float* yi = y + i * C;
      float* dyi = dy + i * C;
      const float wi = w[i];
      float dwi = 0.f;
      for (int ch = 0; ch < C; ++ch) {
        const float diff = yi[ch] - xi[ch];
        dyi[ch] = d[ch] * c[ch] * wi;
        dwi += d[ch] * c[ch] * diff;
        dcp[ch] += d[ch] * wi * diff;
        d[ch] *= 1.0f - c[ch] * wi;
      }
      dw[i] = dwi;
    }
  }
  std::fill(dc, dc + C, 0.f);
  for (int t = 0; t < nthreads; ++t)
    for (int ch = 0; ch < C; ++ch) dc[ch] += scratch[(size_t)t * C + ch];
}

void selection_backward(const float* dw, const int32_t* kept, const int32_t* partner, int64_t rows,
                        const float* scores, float* dscores, int64_t np) {
  std::fill(dscores, dscores + np, 0.f);
  // A parent row is kept or discarded, never both, and each discarded row has one partner, so
  // every row receives at most one term.
  for (int64_t i = 0; i < rows; ++i) {
    dscores[kept[i]] += dw[i];
    if (partner && partner[i] >= 0) dscores[partner[i]] -= dw[i];
  }
  for (int64_t n = 0; n < np; ++n)
    if (!(scores[n] >= 0.f && scores[n] <= 1.f)) dscores[n] = 0.f;
}

void bypass_limit_accumulate(const float* dc, const float* c, float lo, float hi, bool limit, float* gc, int C) {
  for (int ch = 0; ch < C; ++ch) {
    float d = dc[ch];
    if (limit) {
      if (d > 0 && c[ch] < lo) d = -d;
      if (d < 0 && c[ch] > hi) d = -d;
    }
    gc[ch] += d;
  }
}

void score_stats(const float* scores, int64_t n, const int32_t* kept, int64_t nkept, float threshold, double* out) {
  double sq = 0, w = 0;
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) {
    sq += (double)scores[i] * scores[i];
    above += scores[i] > threshold;
  }
  for (int64_t i = 0; i < nkept; ++i) w += clamp01(scores[kept[i]]);
  out[0] = n ? (double)above / n : 0.0;
  out[1] = n ? std::sqrt(sq / n) : 0.0;
  out[2] = nkept ? w / nkept : 0.0;
}

}  // namespace subllm::kernels
