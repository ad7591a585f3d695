// The step's team of threads (kernels/cpu/team.h): kernels handed to it compute what their
// own parallel regions compute, every thread takes part, errors reach the caller.
#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/team.h"
#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"
#include "subllm/rng.h"

namespace subllm::team_tests {

// Runs a test body with `n` OpenMP threads, restoring the count after.
struct Threads {
  int before;
  explicit Threads(int n) : before(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~Threads() { omp_set_num_threads(before); }
};

std::vector<float> random_floats(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = (float)rng.normal();
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

TEST(Team, KernelsOnTheStepsTeamEqualTheirOwnRegions) {
  Threads threads(2);
  const int in = 1024, out = 3072, H = 8, hd = 128, L = 300;
  const std::vector<float> w = random_floats((size_t)out * in, 1), x = random_floats(4 * (size_t)in, 2);
  std::vector<uint8_t> wq(kernels::q8_row_bytes(in) * out);
  kernels::quantize_q8(w.data(), out, in, wq.data());
  std::vector<uint16_t> wb(w.size());
  kernels::f32_to_bf16(w.data(), wb.data(), (int64_t)w.size());
  const std::vector<float> q = random_floats((size_t)H * hd, 3), k = random_floats((size_t)L * H * hd, 4),
                           v = random_floats((size_t)L * H * hd, 5);
  std::vector<float> scratch(kernels::attention_blocks_scratch_floats(L, H, hd, 2) + 1);
  // Every kernel a decoded token runs in parallel: the typed and F32 products of 1 and 3 rows,
  // and attention over a cache.
  auto run = [&] {
    std::vector<std::vector<float>> ys;
    for (int n : {1, 3}) {
      std::vector<float> y((size_t)n * out);
      kernels::linear_forward_q8(x.data(), in, wq.data(), y.data(), out, n, in, out, false);
      ys.push_back(y);
      kernels::linear_forward_bf16(x.data(), in, wb.data(), in, y.data(), out, n, in, out, false);
      ys.push_back(y);
      kernels::linear_forward(x.data(), w.data(), y.data(), n, in, out, false);
      ys.push_back(y);
    }
    if (kernels::attention_blocks_take(hd)) {
      std::vector<float> o((size_t)H * hd);
      const kernels::CachedAttentionItem item{q.data(), H * hd, 1, k.data(), v.data(), H * hd, L, o.data(), H * hd};
      kernels::attention_cached_blocks(&item, 1, H, H, hd, false, scratch.data());
      ys.push_back(o);
    }
    return ys;
  };
  const auto alone = run();
  std::vector<std::vector<float>> teamed;
  kernels::run_in_team([&] { teamed = run(); });
  ASSERT_EQ(alone.size(), teamed.size());
  for (size_t i = 0; i < alone.size(); ++i) EXPECT_TRUE(same_bits(alone[i], teamed[i])) << "output " << i;
}

TEST(Team, EveryThreadRunsEachKernelAndErrorsReachTheCaller) {
  Threads threads(2);
  std::atomic<int> calls{0};
  std::vector<int> seen(2, 0);
  kernels::run_in_team([&] {
    for (int i = 0; i < 2000; ++i)
      kernels::parallel([&] {
        calls.fetch_add(1);
        seen[omp_get_thread_num()] += omp_get_num_threads() == 2;
      });
    // A step inside a step runs on the same team.
    kernels::run_in_team([&] { kernels::parallel([&] { calls.fetch_add(1); }); });
  });
  EXPECT_EQ(calls.load(), 2 * 2001);
  EXPECT_EQ(seen[0], 2000);
  EXPECT_EQ(seen[1], 2000);
  // An error ends the step and reaches the caller; the next step runs as usual.
  EXPECT_THROW(kernels::run_in_team([&] {
                 kernels::parallel([&] { calls.fetch_add(1); });
                 throw std::runtime_error("a failing step");
               }),
               std::runtime_error);
  calls = 0;
  kernels::run_in_team([&] { kernels::parallel([&] { calls.fetch_add(1); }); });
  EXPECT_EQ(calls.load(), 2);
}

}  // namespace subllm::team_tests
