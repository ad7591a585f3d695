// Causal attention on the CUDA backend in BF16 ("cuda"): forward and backward at the
// production shapes (H = 16, B * T = 16k tokens; hd 128 at T = 4096, hd 64 at T = 2048), on the
// fused qkv layout the model uses. Prints one JSON object per line:
//   {"op":"forward","B":4,"T":4096,"H":16,"hd":128,"ms":...,"tflops":...}
// FLOP convention (causal, the usual FlashAttention count): forward = 2 matmuls (QK^T, PV) of
// 2 * hd FLOPs per (query, key) pair over the T*T/2 visible pairs: 4 * B * H * (T*T/2) * hd;
// backward = 2.5 x forward (5 matmuls of the same size, recomputing S).
// Timing: be.sync() then std::chrono over 20 iterations after 3 warm-ups (no CUDA events, so
// this file needs no CUDA headers). Without a GPU it prints why and exits 0.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace {

using namespace subllm;

uint16_t bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b += 0x7fffu + ((b >> 16) & 1u);  // round to nearest even (inputs are finite)
  return (uint16_t)(b >> 16);
}

// n random bf16 values in [-1, 1) on the device.
Tensor random_bf16(Backend& be, Shape shape, uint32_t seed) {
  Tensor t = be.empty(std::move(shape), DType::BF16);
  std::vector<uint16_t> h((size_t)t.numel());
  uint32_t s = seed;
  for (auto& x : h) {
    s = s * 1664525u + 1013904223u;
    x = bf16_bits((float)((s >> 8) * (1.0 / 16777216.0) * 2.0 - 1.0));
  }
  be.to_device(t.raw(), h.data(), h.size() * 2);
  return t;
}

template <class F>
double time_ms(Backend& be, F&& f, int warmup = 3, int iters = 20) {
  for (int i = 0; i < warmup; ++i) f();
  be.sync();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) f();
  be.sync();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::milli>(t1 - t0).count() / iters;
}

void run(Backend& be, int B, int T, int H, int hd) {
  const int64_t N = (int64_t)B * T, C = (int64_t)H * hd;
  Tensor qkv = random_bf16(be, {N, 3 * C}, 1), dout = random_bf16(be, {N, C}, 2);
  Tensor o = be.empty({N, C}, DType::BF16), dqkv = be.empty({N, 3 * C}, DType::BF16);
  Tensor lse = be.empty({(int64_t)B, (int64_t)H, (int64_t)T});
  const size_t sf = be.attention_scratch_bytes(B, T, H, hd, false), sb = be.attention_scratch_bytes(B, T, H, hd, true);
  Tensor scratch = be.empty({(int64_t)std::max<size_t>(std::max(sf, sb), 64)}, DType::U8);
  const Scratch s = scratch_of(scratch);
  const View f = view_of(qkv), d = view_of(dqkv);
  const View q = f.cols_at(0, C), k = f.cols_at(C, C), v = f.cols_at(2 * C, C);

  const double fwd_flops = 4.0 * B * H * ((double)T * T / 2.0) * hd;
  const double ms_f = time_ms(be, [&] { be.attention_forward(q, k, v, view_of(o), view_of(lse), B, T, H, s); });
  std::printf("{\"op\":\"forward\",\"B\":%d,\"T\":%d,\"H\":%d,\"hd\":%d,\"ms\":%.4f,\"tflops\":%.2f}\n", B, T, H, hd,
              ms_f, fwd_flops / (ms_f * 1e-3) * 1e-12);
  const double ms_b = time_ms(be, [&] {
    be.attention_backward(q, k, v, view_of(o), view_of(dout), view_of(lse), d.cols_at(0, C), d.cols_at(C, C),
                          d.cols_at(2 * C, C), B, T, H, s);
  });
  std::printf("{\"op\":\"backward\",\"B\":%d,\"T\":%d,\"H\":%d,\"hd\":%d,\"ms\":%.4f,\"tflops\":%.2f}\n", B, T, H, hd,
              ms_b, 2.5 * fwd_flops / (ms_b * 1e-3) * 1e-12);
  std::fflush(stdout);
}

}  // namespace

int main() {
  std::string why;
  if (!subllm::backend_available("cuda", &why)) {
    std::printf("bench_cuda_attention: skipped, no CUDA device: %s\n", why.c_str());
    return 0;
  }
  try {
    subllm::Backend& be = subllm::backend_for("cuda");
    run(be, 4, 4096, 16, 128);
    run(be, 8, 2048, 16, 64);
  } catch (const std::exception& e) {
    std::printf("bench_cuda_attention: failed: %s\n", e.what());
    return 1;
  }
  return 0;
}
