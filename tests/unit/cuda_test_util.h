#pragma once
// GPU tests: every CUDA kernel against the CPU kernel on the same random inputs. Built always;
// without a CUDA build or a GPU each test reports itself skipped with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "subllm/rng.h"

namespace subllm::test {

// Skips the test unless `device` ("cuda" or "cuda:fp32") can run here.
#define SUBLLM_REQUIRE_DEVICE(device)                                            \
  do {                                                                          \
    std::string why_;                                                           \
    if (!::subllm::backend_available(device, &why_)) GTEST_SKIP() << why_;      \
  } while (0)

// A test body run on "cuda:fp32" (dt F32) and on "cuda" (dt BF16); each half skips itself
// where its device cannot run.
#define CUDA_TEST_BOTH(Suite, Name)                       \
  void Suite##_##Name(Backend& gpu, DType dt);            \
  TEST(Suite, Name##F32) {                                \
    SUBLLM_REQUIRE_DEVICE("cuda:fp32");                   \
    Suite##_##Name(backend_for("cuda:fp32"), DType::F32); \
  }                                                       \
  TEST(Suite, Name##BF16) {                               \
    SUBLLM_REQUIRE_DEVICE("cuda");                        \
    Suite##_##Name(backend_for("cuda"), DType::BF16);     \
  }                                                       \
  void Suite##_##Name(Backend& gpu, DType dt)

inline uint16_t to_bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b | 0x00400000u) >> 16);
  b += 0x7fffu + ((b >> 16) & 1u);
  return (uint16_t)(b >> 16);
}
inline float from_bf16_bits(uint16_t h) {
  const uint32_t b = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
// x rounded to bf16 and back: the value a BF16 input really holds.
inline float bf16_round(float x) { return from_bf16_bits(to_bf16_bits(x)); }

// Host floats into a new tensor of `dt` (F32 or BF16) on `be`.
inline Tensor upload(Backend& be, const std::vector<float>& host, Shape shape, DType dt = DType::F32) {
  Tensor t = be.empty(std::move(shape), dt);
  if (dt == DType::BF16) {
    std::vector<uint16_t> h(host.size());
    for (size_t i = 0; i < host.size(); ++i) h[i] = to_bf16_bits(host[i]);
    be.to_device(t.raw(), h.data(), h.size() * 2);
  } else {
    be.to_device(t.raw(), host.data(), host.size() * 4);
  }
  return t;
}
inline Tensor upload_i32(Backend& be, const std::vector<int32_t>& host) {
  Tensor t = be.empty({(int64_t)host.size()}, DType::I32);
  be.to_device(t.raw(), host.data(), host.size() * 4);
  return t;
}
// A tensor of F32 or BF16 back as host floats.
inline std::vector<float> download(Backend& be, const Tensor& t) {
  be.sync();
  std::vector<float> out((size_t)t.numel());
  if (t.dtype() == DType::BF16) {
    std::vector<uint16_t> h(out.size());
    be.to_host(h.data(), t.raw(), h.size() * 2);
    for (size_t i = 0; i < h.size(); ++i) out[i] = from_bf16_bits(h[i]);
  } else {
    be.to_host(out.data(), t.raw(), out.size() * 4);
  }
  return out;
}
template <class T>
std::vector<T> download_as(Backend& be, const Tensor& t) {
  be.sync();
  std::vector<T> out((size_t)(t.nbytes() / sizeof(T)));
  be.to_host(out.data(), t.raw(), t.nbytes());
  return out;
}

// Scratch memory from a backend, kept alive with its view (64 bytes when none is asked).
struct OwnedScratch {
  std::shared_ptr<void> mem;
  Scratch s;
  OwnedScratch(Backend& be, size_t bytes) : mem(be.alloc_shared(bytes ? bytes : 64)), s{mem.get(), bytes} {}
};

// n ints drawn uniformly from [0, below).
inline std::vector<int32_t> random_ints(size_t n, int32_t below, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = (int32_t)rng.below((uint64_t)below);
  return v;
}

inline std::vector<float> random_floats(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = (float)rng.normal() * scale;
  return v;
}

// max |a - b| / (atol + rtol |b|) <= 1 everywhere; reports the worst element.
inline ::testing::AssertionResult all_close(const std::vector<float>& a, const std::vector<float>& b, float atol,
                                           float rtol) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs((double)a[i] - b[i]) / (atol + rtol * std::fabs((double)b[i]));
    if (std::isnan(e)) return ::testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs " << b[i];
    if (e > worst) { worst = e; at = i; }
  }
  if (worst <= 1.0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "element " << at << ": " << a[at] << " vs " << b[at] << " (atol " << atol
                                       << ", rtol " << rtol << ")";
}

}  // namespace subllm::test
