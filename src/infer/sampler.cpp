#include "subllm/sampler.h"

#include <algorithm>
#include <cmath>

#include "kernels/select_kernels.h"

namespace subllm {

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
  if (opt_.temperature <= 0) return kernels::argmax(logits.data(), V);
  // The k highest, ties by token id, so the order (and the sample) does not depend on the sort.
  const int k = opt_.top_k > 0 ? std::min(opt_.top_k, V) : V;
  std::vector<int32_t> idx(k);
  kernels::top_k(logits.data(), V, k, idx.data());
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
