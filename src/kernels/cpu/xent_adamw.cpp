// Output projection fused with softmax cross-entropy, and the AdamW update.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/vec_math.h"
#include "kernels/kernels.h"

namespace subllm::kernels {

// x: (n, C), w: (V, C), targets: (n) or null, scratch: (chunk_rows, V)
// The logits of one chunk live only in `scratch`: they become probabilities, then the
// chunk's gradient, which is multiplied out into dx and dw before the next chunk.
double lm_head_xent(const float* x, const float* w, const int32_t* targets, int n, int C, int V, float grad_scale,
                    float* dx, float* dw, float* logits, float* scratch, int chunk_rows, int64_t* count) {
  double total = 0.0;
  int64_t counted = 0;
  for (int r0 = 0; r0 < n; r0 += chunk_rows) {
    const int rows = std::min(chunk_rows, n - r0);
    const float* xc = x + (int64_t)r0 * C;
    linear_forward(xc, w, scratch, rows, C, V);
    if (logits) std::memcpy(logits + (int64_t)r0 * V, scratch, sizeof(float) * rows * V);
    if (!targets && !dx) continue;  // logits only: no loss to count
    double chunk_loss = 0.0;
    int64_t chunk_count = 0;
#pragma omp parallel for schedule(static) reduction(+ : chunk_loss, chunk_count)
    for (int r = 0; r < rows; ++r) {
      float* l = scratch + (int64_t)r * V;
      const int32_t tgt = targets ? targets[r0 + r] : -1;
      const float lse = log_sum_exp(l, V);
      if (tgt >= 0) {
        chunk_loss += (double)(lse - l[tgt]);
        chunk_count += 1;
      }
      if (dx) {
        if (tgt < 0) {
          std::memset(l, 0, sizeof(float) * V);
        } else {
#pragma omp simd
          for (int j = 0; j < V; ++j) l[j] = exp_approx(l[j] - lse) * grad_scale;
          l[tgt] -= grad_scale;
        }
      }
    }
    total += chunk_loss;
    counted += chunk_count;
    if (dx) linear_backward(xc, w, scratch, dx + (int64_t)r0 * C, dw, rows, C, V);
  }
  if (count) *count = counted;
  return total;
}

// torch.optim.AdamW: p *= 1 - lr*wd; m,v moments; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
void adamw_step(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2, float eps,
                float weight_decay, int step) {
  const float bc1 = 1.0f - std::pow(beta1, (float)step);
  const float bc2_sqrt = std::sqrt(1.0f - std::pow(beta2, (float)step));
  const float step_size = lr / bc1;
  const float decay = 1.0f - lr * weight_decay;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
  }
}

}  // namespace subllm::kernels
