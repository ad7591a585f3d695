#include "subllm/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace subllm {

namespace {

constexpr int kScanBlock = 64;  // values tested at once before looking at them one by one

// Whether some value of x[b..e) is above `floor` (or equal to it, when `equal`).
inline bool any_at_least(const float* x, int b, int e, float floor, bool equal) {
  int hit = 0;
#pragma omp simd reduction(| : hit)
  for (int i = b; i < e; ++i) hit |= equal ? x[i] == floor : x[i] > floor;
  return hit != 0;
}

}  // namespace

int32_t argmax(const float* x, int n) {
  if (n <= 0) return 0;
  float mx = x[0];
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int i = 0; i < n; ++i) {
    mx = std::max(mx, x[i]);
    nan |= x[i] != x[i];
  }
  if (nan) return (int32_t)(std::max_element(x, x + n) - x);  // the comparisons' own rule for NaN
  for (int b = 0; b < n; b += kScanBlock) {
    const int e = std::min(n, b + kScanBlock);
    if (!any_at_least(x, b, e, mx, true)) continue;
    for (int i = b; i < e; ++i)
      if (x[i] == mx) return i;
  }
  return 0;
}

int32_t Sampler::sample(std::vector<float>& logits, const std::vector<int32_t>& history) {
  const int V = (int)logits.size();
  if (opt_.repeat_penalty != 1.0f) {
    // Each recent token is penalised once, however often it occurred.
    std::vector<char> seen(V, 0);
    const size_t from = history.size() > (size_t)opt_.repeat_last_n ? history.size() - opt_.repeat_last_n : 0;
    for (size_t i = from; i < history.size(); ++i) {
      const int32_t t = history[i];
      if (t < 0 || t >= V || seen[t]) continue;
      seen[t] = 1;
      logits[t] = logits[t] > 0 ? logits[t] / opt_.repeat_penalty : logits[t] * opt_.repeat_penalty;
    }
  }
  if (opt_.temperature <= 0) return argmax(logits.data(), V);
  const int k = opt_.top_k > 0 ? std::min(opt_.top_k, V) : V;
  // Ties are broken by token id so the order (and the sample) does not depend on the sort.
  auto higher = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::vector<int32_t> idx(k);
  std::iota(idx.begin(), idx.end(), 0);
  if (k < V) {
    // The k highest in one pass: a heap of the best so far with the lowest on top. A later
    // token enters only above the lowest's value (on a tie, its larger id ranks it below),
    // so blocks of values without one are passed over at once.
    std::make_heap(idx.begin(), idx.end(), higher);
    float floor = logits[idx.front()];
    for (int b = k; b < V; b += kScanBlock) {
      const int e = std::min(V, b + kScanBlock);
      if (!any_at_least(logits.data(), b, e, floor, false)) continue;
      for (int i = b; i < e; ++i) {
        if (!(logits[i] > floor)) continue;
        std::pop_heap(idx.begin(), idx.end(), higher);
        idx.back() = i;
        std::push_heap(idx.begin(), idx.end(), higher);
        floor = logits[idx.front()];
      }
    }
  }
  std::sort(idx.begin(), idx.end(), higher);
  std::vector<double> p(k);
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int i = 0; i < k; ++i) {
    p[i] = std::exp((logits[idx[i]] - mx) / opt_.temperature);
    sum += p[i];
  }
  int keep = k;
  if (opt_.top_p < 1.0f) {
    double acc = 0;
    for (int i = 0; i < k; ++i) {
      acc += p[i] / sum;
      if (acc >= opt_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double total = 0;
  for (int i = 0; i < keep; ++i) total += p[i];
  double u = rng_.uniform() * total;
  for (int i = 0; i < keep; ++i) {
    u -= p[i];
    if (u <= 0) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace subllm
