// Causal attention kernel against a naive double-precision reference and against
// central finite differences of L = sum(o * R), on the fused-buffer layout the model uses.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "kernels/kernels.h"

namespace attention_tests {

using subllm::kernels::attention_backward;
using subllm::kernels::attention_forward;

constexpr float kSentinel = 12345.0f;

struct SplitMix {
  uint64_t s;
  double uniform() {  // [0, 1)
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
  }
  float sym(float a) { return (float)((2.0 * uniform() - 1.0) * a); }
};

// One attention problem laid out like the model: q|k|v at column offsets 0, C, 2C of a fused
// (B*T, ld_qkv) buffer, o/dout with stride ld_o, dq|dk|dv in a fused (B*T, ld_d) buffer.
// Extra padding columns (pad_*) hold NaN in inputs (must never be read) and a sentinel in
// outputs (must never be written).
struct Problem {
  int B, T, H, hd, C, ld_qkv, ld_o, ld_d;
  std::vector<float> qkv, R, o, lse, dqkv;

  Problem(int B_, int T_, int H_, int hd_, uint64_t seed, float mag = 1.0f, int pad_qkv = 0, int pad_o = 0,
          int pad_d = 0)
      : B(B_), T(T_), H(H_), hd(hd_), C(H_ * hd_), ld_qkv(3 * C + pad_qkv), ld_o(C + pad_o), ld_d(3 * C + pad_d) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const size_t N = (size_t)B * T;
    SplitMix rng{seed};
    qkv.assign(N * ld_qkv, nan);
    R.assign(N * ld_o, nan);
    for (size_t r = 0; r < N; ++r) {
      for (int c = 0; c < 3 * C; ++c) qkv[r * ld_qkv + c] = rng.sym(mag);
      for (int c = 0; c < C; ++c) R[r * ld_o + c] = rng.sym(1.0f);
    }
    o.assign(N * ld_o, kSentinel);
    dqkv.assign(N * ld_d, kSentinel);
    for (size_t r = 0; r < N; ++r) {
      std::fill(o.begin() + r * ld_o, o.begin() + r * ld_o + C, nan);
      std::fill(dqkv.begin() + r * ld_d, dqkv.begin() + r * ld_d + 3 * C, nan);
    }
    lse.assign((size_t)B * H * T, nan);
  }

  void forward() {
    attention_forward(qkv.data(), qkv.data() + C, qkv.data() + 2 * C, ld_qkv, o.data(), ld_o, lse.data(), B, T, H,
                      H, hd, scratch(false));
  }
  // dout = R, so dqkv is the gradient of L = sum(o * R).
  void backward() {
    attention_backward(qkv.data(), qkv.data() + C, qkv.data() + 2 * C, ld_qkv, o.data(), ld_o, R.data(), lse.data(),
                       dqkv.data(), dqkv.data() + C, dqkv.data() + 2 * C, ld_d, B, T, H, H, hd, scratch(true));
  }
  // The kernels' working memory, from the CPU backend as the model gets it.
  float* scratch(bool backward) {
    scratch_mem = subllm::cpu_backend().alloc_shared(subllm::cpu_backend().attention_scratch_bytes(B, T, H, hd, backward));
    return static_cast<float*>(scratch_mem.get());
  }
  std::shared_ptr<void> scratch_mem;
};

// Double-precision reference for one (b, h); x is the fused qkv buffer in double.
struct RefHead {
  std::vector<double> o, lse, p;  // o (T, hd), lse (T), p (T, T) lower triangle

  void forward(const std::vector<double>& x, const Problem& pb, int b, int h) {
    const int T = pb.T, hd = pb.hd;
    const double scale = 1.0 / std::sqrt((double)hd);
    auto at = [&](int t, int which, int i) { return x[((size_t)b * T + t) * pb.ld_qkv + which * pb.C + h * hd + i]; };
    o.assign((size_t)T * hd, 0.0);
    lse.assign(T, 0.0);
    p.assign((size_t)T * T, 0.0);
    for (int t = 0; t < T; ++t) {
      double mx = -1e300;
      for (int j = 0; j <= t; ++j) {
        double s = 0;
        for (int i = 0; i < hd; ++i) s += at(t, 0, i) * at(j, 1, i);
        p[(size_t)t * T + j] = s * scale;
        mx = std::max(mx, s * scale);
      }
      double sum = 0;
      for (int j = 0; j <= t; ++j) sum += std::exp(p[(size_t)t * T + j] - mx);
      lse[t] = mx + std::log(sum);
      for (int j = 0; j <= t; ++j) {
        const double pj = std::exp(p[(size_t)t * T + j] - lse[t]);
        p[(size_t)t * T + j] = pj;
        for (int i = 0; i < hd; ++i) o[(size_t)t * hd + i] += pj * at(j, 2, i);
      }
    }
  }

  double loss(const Problem& pb, int b, int h) const {
    double L = 0;
    for (int t = 0; t < pb.T; ++t)
      for (int i = 0; i < pb.hd; ++i)
        L += o[(size_t)t * pb.hd + i] * pb.R[((size_t)b * pb.T + t) * pb.ld_o + h * pb.hd + i];
    return L;
  }

  // Gradient of loss() into g, a fused (B*T, 3C) double buffer (this head's columns).
  void backward(const std::vector<double>& x, const Problem& pb, int b, int h, std::vector<double>& g) const {
    const int T = pb.T, hd = pb.hd, C = pb.C;
    const double scale = 1.0 / std::sqrt((double)hd);
    auto at = [&](int t, int which, int i) { return x[((size_t)b * T + t) * pb.ld_qkv + which * C + h * hd + i]; };
    auto gat = [&](int t, int which, int i) -> double& {
      return g[((size_t)b * T + t) * 3 * C + which * C + h * hd + i];
    };
    auto dout = [&](int t, int i) { return (double)pb.R[((size_t)b * T + t) * pb.ld_o + h * hd + i]; };
    for (int t = 0; t < T; ++t) {
      double D = 0;
      for (int i = 0; i < hd; ++i) D += dout(t, i) * o[(size_t)t * hd + i];
      for (int j = 0; j <= t; ++j) {
        const double pj = p[(size_t)t * T + j];
        double dp = 0;
        for (int i = 0; i < hd; ++i) {
          dp += dout(t, i) * at(j, 2, i);
          gat(j, 2, i) += pj * dout(t, i);
        }
        const double ds = pj * (dp - D) * scale;
        for (int i = 0; i < hd; ++i) {
          gat(t, 0, i) += ds * at(j, 1, i);
          gat(j, 1, i) += ds * at(t, 0, i);
        }
      }
    }
  }
};

std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// Runs forward + backward and checks them against the reference; returns nothing, records
// the worst relative errors. fd_samples < 0 means every element.
void check_problem(Problem& pb, int fd_samples, double tol_fwd = 2e-6, double tol_bwd = 2e-5) {
  pb.forward();
  pb.backward();
  const int B = pb.B, T = pb.T, H = pb.H, hd = pb.hd, C = pb.C;
  const size_t N = (size_t)B * T;

  // Every head column written, every padding column untouched.
  for (size_t r = 0; r < N; ++r) {
    for (int c = 0; c < pb.ld_o; ++c) {
      const float x = pb.o[r * pb.ld_o + c];
      if (c < C)
        ASSERT_TRUE(std::isfinite(x)) << "o not written at row " << r << " col " << c;
      else
        ASSERT_EQ(x, kSentinel) << "o padding overwritten at row " << r << " col " << c;
    }
    for (int c = 0; c < pb.ld_d; ++c) {
      const float x = pb.dqkv[r * pb.ld_d + c];
      if (c < 3 * C)
        ASSERT_TRUE(std::isfinite(x)) << "dqkv not written at row " << r << " col " << c;
      else
        ASSERT_EQ(x, kSentinel) << "dqkv padding overwritten at row " << r << " col " << c;
    }
  }
  for (float x : pb.lse) ASSERT_TRUE(std::isfinite(x));

  const std::vector<double> x = to_double(pb.qkv);
  std::vector<double> ref_o(N * C), ref_lse((size_t)B * H * T), ref_g(N * 3 * C, 0.0);
  std::vector<RefHead> heads(B * H);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      RefHead& rh = heads[b * H + h];
      rh.forward(x, pb, b, h);
      rh.backward(x, pb, b, h, ref_g);
      for (int t = 0; t < T; ++t) {
        ref_lse[((size_t)b * H + h) * T + t] = rh.lse[t];
        for (int i = 0; i < hd; ++i) ref_o[((size_t)b * T + t) * C + h * hd + i] = rh.o[(size_t)t * hd + i];
      }
    }

  double e_o = 0, e_lse = 0, e_g[3] = {0, 0, 0}, m_g[3] = {0, 0, 0};
  for (size_t r = 0; r < N; ++r)
    for (int c = 0; c < C; ++c) e_o = std::max(e_o, std::fabs(pb.o[r * pb.ld_o + c] - ref_o[r * C + c]));
  for (size_t i = 0; i < ref_lse.size(); ++i)
    e_lse = std::max(e_lse, std::fabs(pb.lse[i] - ref_lse[i]) / std::max(1.0, std::fabs(ref_lse[i])));
  for (size_t r = 0; r < N; ++r)
    for (int c = 0; c < 3 * C; ++c) {
      const double ref = ref_g[r * 3 * C + c];
      e_g[c / C] = std::max(e_g[c / C], std::fabs(pb.dqkv[r * pb.ld_d + c] - ref));
      m_g[c / C] = std::max(m_g[c / C], std::fabs(ref));
    }
  const double rel_o = e_o / std::max(1e-30, max_abs(ref_o));
  EXPECT_LT(rel_o, tol_fwd) << "o";
  EXPECT_LT(e_lse, tol_fwd) << "lse";
  const char* names[3] = {"dq", "dk", "dv"};
  for (int w = 0; w < 3; ++w) {
    // Floor at 1% of the largest gradient: with T == 1, dq = dk = 0 up to rounding.
    const double rel = e_g[w] / std::max(m_g[w], 1e-2 * std::max({m_g[0], m_g[1], m_g[2]}));
    EXPECT_LT(rel, tol_bwd) << names[w];
    ::testing::Test::RecordProperty(std::string(names[w]) + "_rel_err", std::to_string(rel));
  }
  ::testing::Test::RecordProperty("o_rel_err", std::to_string(rel_o));

  // Central finite differences in double of L = sum(o * R) on the reference forward; a
  // perturbation in head (b, h) only changes that head's loss.
  if (fd_samples == 0) return;
  const size_t total = N * 3 * C;
  const size_t stride = fd_samples < 0 || total <= (size_t)fd_samples ? 1 : total / fd_samples;
  const double step = 1e-4;
  double worst_ref = 0, worst_kernel = 0;
  std::vector<double> xp = x;
  const double gscale = std::max({m_g[0], m_g[1], m_g[2]});
  for (size_t e = 0; e < total; e += stride) {
    const size_t r = e / (3 * C);
    const int c = (int)(e % (3 * C));
    const int b = (int)(r / T), h = (c % C) / hd;
    double& xe = xp[r * pb.ld_qkv + c];
    const double keep = xe;
    RefHead rh;
    xe = keep + step;
    rh.forward(xp, pb, b, h);
    const double lp = rh.loss(pb, b, h);
    xe = keep - step;
    rh.forward(xp, pb, b, h);
    const double lm = rh.loss(pb, b, h);
    xe = keep;
    const double fd = (lp - lm) / (2 * step);
    worst_ref = std::max(worst_ref, std::fabs(fd - ref_g[r * 3 * C + c]) / gscale);
    worst_kernel = std::max(worst_kernel, std::fabs(fd - pb.dqkv[r * pb.ld_d + c]) / gscale);
  }
  EXPECT_LT(worst_ref, 1e-6) << "reference backward disagrees with finite differences";
  EXPECT_LT(worst_kernel, tol_bwd) << "kernel backward disagrees with finite differences";
}

TEST(Attention, SmallHeadFullFiniteDifferences) {
  Problem pb(2, 17, 2, 8, 1);
  check_problem(pb, -1);
}

TEST(Attention, SingleToken) {
  Problem pb(2, 1, 2, 8, 2);
  check_problem(pb, -1);
  // One key: o = v, lse = scale * q.k, dq = dk = 0, dv = dout.
  for (int b = 0; b < 2; ++b)
    for (int c = 0; c < pb.C; ++c) {
      EXPECT_EQ(pb.o[b * pb.ld_o + c], pb.qkv[b * pb.ld_qkv + 2 * pb.C + c]);
      EXPECT_NEAR(pb.dqkv[b * pb.ld_d + c], 0.0f, 1e-6f);
      EXPECT_NEAR(pb.dqkv[b * pb.ld_d + pb.C + c], 0.0f, 1e-6f);
      EXPECT_FLOAT_EQ(pb.dqkv[b * pb.ld_d + 2 * pb.C + c], pb.R[b * pb.ld_o + c]);
    }
}

TEST(Attention, PartialTilesHd8) {
  Problem pb(2, 130, 4, 8, 3);
  check_problem(pb, 400);
}

TEST(Attention, OneRowPastTileHd64) {
  Problem pb(2, 65, 2, 64, 4);
  check_problem(pb, 300);
}

TEST(Attention, ThreeTilesHd64PaddedStrides) {
  // Padding columns around every buffer: NaN in inputs, sentinel in outputs.
  Problem pb(2, 130, 2, 64, 5, 1.0f, 7, 5, 3);
  check_problem(pb, 300);
}

TEST(Attention, OddHeadDims) {
  for (int hd : {1, 3, 24, 40}) {
    SCOPED_TRACE("hd=" + std::to_string(hd));
    Problem pb(1, 70, 2, hd, 10 + hd, 1.0f, 1, 2, 1);
    check_problem(pb, 150);
  }
}

TEST(Attention, Hd128TwoColumnChunks) {
  Problem pb(1, 200, 2, 128, 6);
  check_problem(pb, 100);
}

TEST(Attention, LargeScoresStayStable) {
  // |scores| up to ~40: online softmax must rescale instead of overflowing. Float rounding of
  // scores that large alone costs ~|s| * 6e-8 relative, hence the looser bounds.
  Problem pb(1, 150, 2, 64, 7, 5.0f);
  check_problem(pb, 100, 2e-5, 1e-4);
}

TEST(Attention, ResultsIndependentOfThreadCount) {
  Problem p1(2, 150, 2, 64, 8), p2(2, 150, 2, 64, 8);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  p1.forward();
  p1.backward();
  omp_set_num_threads(std::max(2, saved));
  p2.forward();
  p2.backward();
  omp_set_num_threads(saved);
  EXPECT_EQ(0, std::memcmp(p1.o.data(), p2.o.data(), p1.o.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(p1.lse.data(), p2.lse.data(), p1.lse.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(p1.dqkv.data(), p2.dqkv.data(), p1.dqkv.size() * sizeof(float)));
}

}  // namespace attention_tests
