// Causal attention for targets without AVX-512: the same contract as attention.cpp, one
// query row at a time with an online softmax, so memory stays O(hd) per thread.
#ifndef __AVX512F__

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/kernels.h"

namespace subllm::kernels {

size_t attention_scratch_bytes(int hd, bool /*backward*/) { return sizeof(float) * (size_t)hd; }

void attention_forward(const float* q, const float* k, const float* v, int ld_qkv, float* o, int ld_o, float* lse,
                       int B, int T, int H, int Hkv, int hd, float* scratch) {
  const float scale = 1.0f / std::sqrt((float)hd);
  const int group = H / Hkv;  // query heads per key/value head
#pragma omp parallel
  {
    float* acc = scratch + (size_t)omp_get_thread_num() * hd;
#pragma omp for collapse(2) schedule(dynamic, 16)
    for (int bh = 0; bh < B * H; ++bh) {
      for (int t = 0; t < T; ++t) {
        const int b = bh / H, h = bh % H;
        const float* qt = q + (size_t)(b * T + t) * ld_qkv + h * hd;
        float m = -std::numeric_limits<float>::infinity(), l = 0.f;
        std::fill(acc, acc + hd, 0.f);
        for (int j = 0; j <= t; ++j) {
          const float* kj = k + (size_t)(b * T + j) * ld_qkv + (h / group) * hd;
          const float* vj = v + (size_t)(b * T + j) * ld_qkv + (h / group) * hd;
          float s = 0.f;
          for (int i = 0; i < hd; ++i) s += qt[i] * kj[i];
          s *= scale;
          const float m_new = std::max(m, s);
          const float alpha = std::exp(m - m_new), p = std::exp(s - m_new);
          l = l * alpha + p;
          for (int i = 0; i < hd; ++i) acc[i] = acc[i] * alpha + p * vj[i];
          m = m_new;
        }
        float* ot = o + (size_t)(b * T + t) * ld_o + h * hd;
        for (int i = 0; i < hd; ++i) ot[i] = acc[i] / l;
        lse[(size_t)bh * T + t] = m + std::log(l);
      }
    }
  }
}

void attention_backward(const float* q, const float* k, const float* v, int ld_qkv, const float* o, int ld_o,
                        const float* dout, const float* lse, float* dq, float* dk, float* dv, int ld_dqkv, int B,
                        int T, int H, int Hkv, int hd, float* /*scratch*/) {
  const float scale = 1.0f / std::sqrt((float)hd);
  const int group = H / Hkv;  // query heads per key/value head
  // One (b, key/value head) per task, with the query heads of its group in order: it alone
  // writes those heads' columns of dq and its own of dk, dv.
#pragma omp parallel for schedule(dynamic, 1)
  for (int bkv = 0; bkv < B * Hkv; ++bkv) {
    const int b = bkv / Hkv, kvh = bkv % Hkv;
    auto kv_row = [&](const float* base, int t) { return base + (size_t)(b * T + t) * ld_qkv + kvh * hd; };
    auto kv_grad_row = [&](float* base, int t) { return base + (size_t)(b * T + t) * ld_dqkv + kvh * hd; };
    for (int t = 0; t < T; ++t) {
      std::fill(kv_grad_row(dk, t), kv_grad_row(dk, t) + hd, 0.f);
      std::fill(kv_grad_row(dv, t), kv_grad_row(dv, t) + hd, 0.f);
    }
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
    const int bh = b * H + h;
    auto row = [&](const float* base, int ld, int t) { return base + (size_t)(b * T + t) * ld + h * hd; };
    auto grad_row = [&](float* base, int t) { return base + (size_t)(b * T + t) * ld_dqkv + h * hd; };
    for (int t = 0; t < T; ++t) std::fill(grad_row(dq, t), grad_row(dq, t) + hd, 0.f);
    for (int t = 0; t < T; ++t) {
      const float* qt = row(q, ld_qkv, t);
      const float* dot = row(dout, ld_o, t);
      const float* ot = row(o, ld_o, t);
      float* dqt = grad_row(dq, t);
      float D = 0.f;
      for (int i = 0; i < hd; ++i) D += dot[i] * ot[i];
      const float l = lse[(size_t)bh * T + t];
      for (int j = 0; j <= t; ++j) {
        const float* kj = kv_row(k, j);
        const float* vj = kv_row(v, j);
        float s = 0.f, dp = 0.f;
        for (int i = 0; i < hd; ++i) {
          s += qt[i] * kj[i];
          dp += dot[i] * vj[i];
        }
        const float p = std::exp(s * scale - l);
        const float ds = p * (dp - D) * scale;
        float* dkj = kv_grad_row(dk, j);
        float* dvj = kv_grad_row(dv, j);
        for (int i = 0; i < hd; ++i) {
          dvj[i] += p * dot[i];
          dqt[i] += ds * kj[i];
          dkj[i] += ds * qt[i];
        }
      }
    }
    }
  }
}

}  // namespace subllm::kernels

#endif  // !__AVX512F__
