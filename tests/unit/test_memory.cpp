#include <gtest/gtest.h>

#include <vector>

#include "kernels/memory_kernels.h"

namespace subllm {

TEST(Memory, ReadSumCountsEveryElementOnce) {
  for (size_t n : {size_t(0), size_t(7), size_t(4096), size_t(3 * 4096 + 17), size_t(5 * 4096 + 3), size_t(16 * 4096)}) {
    std::vector<float> x(n);
    double want = 0;
    for (size_t i = 0; i < n; ++i) {
      x[i] = (float)(i % 5);
      want += x[i];
    }
    EXPECT_EQ(kernels::read_sum(x.data(), n), want) << "n=" << n;
  }
}

}  // namespace subllm
