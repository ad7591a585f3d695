// The CPU backend through the Backend interface: the registry, views, and each kernel method
// against a naive reference written here or against finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "backend/backend.h"
#include "grad_check.h"
#include "kernels/kernels.h"
#include "subllm/error.h"
#include "subllm/rng.h"
#include "test_util.h"

namespace subllm {
namespace backend_tests {

using testing::error_of;
using testing::expect_grad_matches;
using testing::random_vec;

float clamp01(float s) { return std::min(std::max(s, 0.0f), 1.0f); }

// Owned backend scratch of the requested size.
struct OwnedScratch {
  std::shared_ptr<void> mem;
  Scratch s;
  OwnedScratch(Backend& be, size_t bytes) : mem(be.alloc_shared(bytes)), s{mem.get(), bytes} {}
};

// ---- 1. registry --------------------------------------------------------------------------

TEST(BackendRegistry, CpuIsTheCpuBackendAndUnknownDevicesAreNamed) {
  Backend& be = cpu_backend();
  EXPECT_EQ(&backend_for("cpu"), &be);
  EXPECT_STREQ(be.name(), "cpu");
  const auto names = backend_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "cpu"), names.end());
  EXPECT_THROW(backend_for("tpu"), Error);
  const std::string msg = error_of([] { backend_for("tpu"); });
  EXPECT_NE(msg.find("tpu"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cpu"), std::string::npos) << msg;
}

// ---- 2. views -----------------------------------------------------------------------------

TEST(BackendViews, ViewOfColsAtRowsAtAndDtypeChecks) {
  Backend& be = cpu_backend();
  Tensor t1 = be.zeros({7});
  View v1 = view_of(t1);
  EXPECT_EQ(v1.data, t1.raw());
  EXPECT_EQ(v1.dtype, DType::F32);
  EXPECT_EQ(v1.rows, 7);
  EXPECT_EQ(v1.cols, 1);
  EXPECT_EQ(v1.ld, 1);
  EXPECT_EQ(v1.numel(), 7);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(v1.f32()[i], 0.0f);  // zeros() zero-fills

  Tensor t2 = be.zeros({3, 4});
  View v2 = view_of(t2);
  EXPECT_EQ(v2.rows, 3);
  EXPECT_EQ(v2.cols, 4);
  EXPECT_EQ(v2.ld, 4);
  Tensor t3 = be.zeros({2, 3, 5}, DType::I32);
  View v3 = view_of(t3);
  EXPECT_EQ(v3.dtype, DType::I32);
  EXPECT_EQ(v3.rows, 6);
  EXPECT_EQ(v3.cols, 5);
  EXPECT_EQ(v3.ld, 5);

  std::vector<float> m(5 * 9);
  std::iota(m.begin(), m.end(), 0.0f);
  View a = mat(m.data(), 5, 9);
  EXPECT_EQ(a.ld, 9);
  View c = a.cols_at(2, 3);
  EXPECT_EQ(c.rows, 5);
  EXPECT_EQ(c.cols, 3);
  EXPECT_EQ(c.ld, 9);
  EXPECT_EQ(c.f32(), m.data() + 2);
  View r = a.rows_at(1, 3);
  EXPECT_EQ(r.rows, 3);
  EXPECT_EQ(r.cols, 9);
  EXPECT_EQ(r.ld, 9);
  EXPECT_EQ(r.f32(), m.data() + 9);
  View rc = a.rows_at(3, 2).cols_at(4, 2);
  EXPECT_EQ(rc.f32()[0], 3 * 9 + 4);
  EXPECT_EQ(rc.f32()[rc.ld + 1], 4 * 9 + 5);
  // Byte offsets follow the dtype.
  std::vector<double> d(12);
  View dv{d.data(), DType::F64, 3, 4, 4};
  EXPECT_EQ(dv.rows_at(2, 1).cols_at(1, 2).f64(), d.data() + 9);
  View iv = v3.rows_at(1, 2).cols_at(3, 1);
  EXPECT_EQ(iv.i32(), static_cast<int32_t*>(t3.raw()) + 8);

  // A kernel given the wrong dtype is refused.
  std::vector<int32_t> ints(6, 1);
  std::vector<double> out(1);
  EXPECT_THROW(be.scale(ivec(ints.data(), 6), 2.0f), Error);
  EXPECT_NE(error_of([&] { be.scale(ivec(ints.data(), 6), 2.0f); }).find("I32"), std::string::npos)
      << error_of([&] { be.scale(ivec(ints.data(), 6), 2.0f); });
  EXPECT_THROW(be.sum_squares(vec(m.data(), 6), vec(m.data(), 1)), Error);  // out must be F64
  EXPECT_THROW(be.fill_positions(vec(m.data(), 6), 2, 3, 0), Error);
  EXPECT_THROW(be.gather_rows(vec(m.data(), 6), ivec(ints.data(), 2), ivec(ints.data() + 2, 2)), Error);
  EXPECT_THROW(be.copy_rows(dvec(out.data(), 1), dvec(out.data(), 1)), Error);  // 8-byte elements
  EXPECT_EQ(ints, std::vector<int32_t>(6, 1));
}

// ---- 3. rows ------------------------------------------------------------------------------

TEST(BackendRows, GatherScatterCopyAndPositionsMatchNaiveLoops) {
  Backend& be = cpu_backend();
  const int Np = 9, n = 6, C = 5, ld_src = 11, ld_dst = 8, c0_src = 3, c0_dst = 2;
  const float sentinel = -123.0f;
  auto src = random_vec((size_t)Np * ld_src, 11);
  std::vector<int32_t> idx = {4, 0, 8, 4, 2, 7};  // gather may repeat
  std::vector<float> dst((size_t)n * ld_dst, sentinel);
  be.gather_rows(mat(src.data(), Np, ld_src).cols_at(c0_src, C), ivec(idx.data(), n),
                 mat(dst.data(), n, ld_dst).cols_at(c0_dst, C));
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < ld_dst; ++c) {
      const float want = (c >= c0_dst && c < c0_dst + C) ? src[(size_t)idx[i] * ld_src + c0_src + c - c0_dst]
                                                          : sentinel;
      EXPECT_EQ(dst[(size_t)i * ld_dst + c], want) << i << "," << c;
    }

  // int32 values (one column)
  std::vector<int32_t> ival(Np), iout(n, -1);
  for (int i = 0; i < Np; ++i) ival[i] = 1000 + 7 * i;
  be.gather_rows(ivec(ival.data(), Np), ivec(idx.data(), n), ivec(iout.data(), n));
  for (int i = 0; i < n; ++i) EXPECT_EQ(iout[i], ival[idx[i]]);

  // scatter_add_rows: dst(idx[i]) += src(i), strided both sides, distinct idx
  std::vector<int32_t> sidx = {5, 1, 8, 0};
  const int ns = (int)sidx.size();
  auto s_src = random_vec((size_t)ns * ld_dst, 12);
  auto s_dst = random_vec((size_t)Np * ld_src, 13);
  auto ref = s_dst;
  for (int i = 0; i < ns; ++i)
    for (int c = 0; c < C; ++c)
      ref[(size_t)sidx[i] * ld_src + c0_src + c] += s_src[(size_t)i * ld_dst + c0_dst + c];
  be.scatter_add_rows(mat(s_src.data(), ns, ld_dst).cols_at(c0_dst, C), ivec(sidx.data(), ns),
                      mat(s_dst.data(), Np, ld_src).cols_at(c0_src, C));
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(s_dst[i], ref[i]) << i;

  // copy_rows, strided (and the contiguous fast path)
  std::vector<float> cdst((size_t)Np * ld_dst, sentinel);
  be.copy_rows(mat(src.data(), Np, ld_src).cols_at(c0_src, C), mat(cdst.data(), Np, ld_dst).cols_at(c0_dst, C));
  for (int r = 0; r < Np; ++r)
    for (int c = 0; c < ld_dst; ++c) {
      const float want =
          (c >= c0_dst && c < c0_dst + C) ? src[(size_t)r * ld_src + c0_src + c - c0_dst] : sentinel;
      EXPECT_EQ(cdst[(size_t)r * ld_dst + c], want) << r << "," << c;
    }
  std::vector<float> flat((size_t)Np * ld_src, sentinel);
  be.copy_rows(mat(src.data(), 4, ld_src), mat(flat.data(), 4, ld_src));
  for (size_t i = 0; i < flat.size(); ++i) EXPECT_EQ(flat[i], i < 4u * ld_src ? src[i] : sentinel) << i;

  // fill_positions
  const int B = 3, T = 4, offset = 5;
  std::vector<int32_t> pos(B * T, -1);
  be.fill_positions(ivec(pos.data(), B * T), B, T, offset);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) EXPECT_EQ(pos[b * T + t], offset + t);
}

// ---- 4. select_top ------------------------------------------------------------------------

struct TopRef {
  std::vector<int32_t> kept, partner;
  std::vector<float> w;
};

// Rank of t in a stable descending sort: higher scores first, equal scores in sequence order.
TopRef naive_select_top(const std::vector<float>& s, int B, int Tp, int Tc, bool flip) {
  TopRef ref;
  for (int b = 0; b < B; ++b) {
    const float* sb = s.data() + (size_t)b * Tp;
    std::vector<int> rank(Tp), at_rank(Tp);
    for (int t = 0; t < Tp; ++t) {
      int r = 0;
      for (int u = 0; u < Tp; ++u) r += sb[u] > sb[t] || (sb[u] == sb[t] && u < t);
      rank[t] = r;
      at_rank[r] = t;
    }
    for (int t = 0; t < Tp; ++t) {  // ascending sequence order
      const int r = rank[t];
      if (r >= Tc) continue;
      const int dr = flip ? Tc + (Tc - 1 - r) : Tc + r;
      const int p = dr < Tp ? b * Tp + at_rank[dr] : -1;
      ref.kept.push_back(b * Tp + t);
      ref.partner.push_back(p);
      ref.w.push_back(clamp01(sb[t]) - (p >= 0 ? clamp01(s[p]) : 0.0f));
    }
  }
  return ref;
}

TEST(BackendSelect, SelectTopMatchesNaiveStableRanking) {
  Backend& be = cpu_backend();
  const int B = 3, Tp = 13;
  Rng rng(21);
  std::vector<float> scores((size_t)B * Tp);
  // Quarter steps in [-0.75, 1.75]: many ties, and values on both sides of the clamp.
  for (auto& x : scores) x = (float)((int)rng.below(11) - 3) * 0.25f;
  scores[4] = scores[9] = scores[2];  // a deliberate three-way tie in sequence 0
  int ties = 0;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < Tp; ++t)
      for (int u = t + 1; u < Tp; ++u) ties += scores[b * Tp + t] == scores[b * Tp + u];
  ASSERT_GT(ties, 10);

  OwnedScratch sc(be, be.select_top_scratch_bytes(Tp));
  for (int Tc : {5, 8}) {  // with Tc = 8, ranks past Tp leave partners at -1
    for (bool flip : {false, true}) {
      SCOPED_TRACE("Tc " + std::to_string(Tc) + (flip ? " flip" : ""));
      const TopRef ref = naive_select_top(scores, B, Tp, Tc, flip);
      std::vector<int32_t> kept(B * Tc, -7), partner(B * Tc, -7);
      std::vector<float> w(B * Tc, 99.f);
      be.select_top(vec(scores.data(), B * Tp), B, Tc, flip, ivec(kept.data(), B * Tc),
                    ivec(partner.data(), B * Tc), vec(w.data(), B * Tc), sc.s);
      EXPECT_EQ(kept, ref.kept);
      EXPECT_EQ(partner, ref.partner);
      for (int i = 0; i < B * Tc; ++i) EXPECT_FLOAT_EQ(w[i], ref.w[i]) << i;
      for (int b = 0; b < B; ++b)
        for (int i = 1; i < Tc; ++i) EXPECT_LT(kept[b * Tc + i - 1], kept[b * Tc + i]);
      if (Tc == 8) {
        EXPECT_NE(std::count(partner.begin(), partner.end(), -1), 0);
      }
    }
  }
  // Too little scratch is refused.
  std::vector<int32_t> kept(B * 5), partner(B * 5);
  std::vector<float> w(B * 5);
  Scratch small{sc.s.data, be.select_top_scratch_bytes(Tp) - 1};
  EXPECT_THROW(be.select_top(vec(scores.data(), B * Tp), B, 5, false, ivec(kept.data(), B * 5),
                             ivec(partner.data(), B * 5), vec(w.data(), B * 5), small),
               Error);
}

// ---- 5. select_threshold ------------------------------------------------------------------

TEST(BackendSelect, SelectThresholdKeepsScoresAboveThresholdExceptPad) {
  Backend& be = cpu_backend();
  const int n = 40, pad = 3;
  const float threshold = 0.3f;
  auto scores = random_vec(n, 31, 0.8f);
  scores[5] = threshold;  // equal is not above
  std::vector<int32_t> tokens(n);
  Rng rng(32);
  for (auto& t : tokens) t = (int32_t)rng.below(6);
  std::vector<int32_t> ref_kept;
  std::vector<float> ref_w;
  for (int t = 0; t < n; ++t)
    if (scores[t] > threshold && tokens[t] != pad) {
      ref_kept.push_back(t);
      ref_w.push_back(clamp01(scores[t]));
    }
  ASSERT_GT(ref_kept.size(), 3u);
  ASSERT_LT(ref_kept.size(), (size_t)n);
  std::vector<int32_t> kept(n, -5), count(1, -1);
  std::vector<float> w(n, 99.f);
  be.select_threshold(vec(scores.data(), n), ivec(tokens.data(), n), threshold, pad, ivec(kept.data(), n),
                      vec(w.data(), n), ivec(count.data(), 1));
  ASSERT_EQ(count[0], (int)ref_kept.size());
  for (int i = 0; i < count[0]; ++i) {
    EXPECT_EQ(kept[i], ref_kept[i]) << i;
    EXPECT_EQ(w[i], ref_w[i]) << i;
  }
  // The count must be an I32 view.
  std::vector<float> fcount(1);
  EXPECT_THROW(be.select_threshold(vec(scores.data(), n), ivec(tokens.data(), n), threshold, pad,
                                   ivec(kept.data(), n), vec(w.data(), n), vec(fcount.data(), 1)),
               Error);
}

// ---- 6. upsample + bypass -----------------------------------------------------------------

struct BypassProblem {
  int Np = 10, rows = 4, C = 6;
  std::vector<int32_t> kept = {1, 4, 5, 9};
  std::vector<float> x, y, w, c, R;
  BypassProblem() {
    x = random_vec((size_t)Np * C, 41);
    y = random_vec((size_t)rows * C, 42);
    w = random_vec(rows, 43, 0.5f);
    c = random_vec(C, 44, 0.7f);
    R = random_vec((size_t)Np * C, 45);
  }
  // out = x, then the formula on kept rows, in double.
  std::vector<double> naive_out() const {
    std::vector<double> out(x.begin(), x.end());
    for (int i = 0; i < rows; ++i)
      for (int ch = 0; ch < C; ++ch) {
        const size_t p = (size_t)kept[i] * C + ch;
        out[p] = (double)x[p] + (double)c[ch] * w[i] * ((double)y[(size_t)i * C + ch] - x[p]);
      }
    return out;
  }
  double loss() const {
    const auto out = naive_out();
    double s = 0;
    for (size_t i = 0; i < out.size(); ++i) s += out[i] * R[i];
    return s;
  }
};

TEST(BackendBypass, UpsampleBypassForwardMatchesFormulaAndWorksInPlace) {
  Backend& be = cpu_backend();
  BypassProblem pb;
  const int Np = pb.Np, rows = pb.rows, C = pb.C;
  const auto ref = pb.naive_out();
  const float sentinel = 77.0f;
  std::vector<float> out((size_t)Np * C, sentinel);
  be.upsample_bypass_forward(mat(pb.x.data(), Np, C), mat(pb.y.data(), rows, C), ivec(pb.kept.data(), rows),
                             vec(pb.w.data(), rows), vec(pb.c.data(), C), mat(out.data(), Np, C));
  for (int r = 0; r < Np; ++r) {
    const bool is_kept = std::count(pb.kept.begin(), pb.kept.end(), r) > 0;
    for (int ch = 0; ch < C; ++ch) {
      const size_t p = (size_t)r * C + ch;
      if (is_kept) {
        EXPECT_NEAR(out[p], ref[p], 1e-5) << r << "," << ch;
      } else {
        EXPECT_EQ(out[p], sentinel) << r << "," << ch;  // untouched
      }
    }
  }
  // In place: out is x.
  std::vector<float> xin = pb.x;
  be.upsample_bypass_forward(mat(xin.data(), Np, C), mat(pb.y.data(), rows, C), ivec(pb.kept.data(), rows),
                             vec(pb.w.data(), rows), vec(pb.c.data(), C), mat(xin.data(), Np, C));
  for (size_t p = 0; p < xin.size(); ++p) EXPECT_NEAR(xin[p], ref[p], 1e-5) << p;
}

TEST(BackendBypass, UpsampleBypassBackwardMatchesFiniteDifferences) {
  Backend& be = cpu_backend();
  BypassProblem pb;
  const int Np = pb.Np, rows = pb.rows, C = pb.C;
  std::vector<float> dout = pb.R;  // d(out) of L = sum(out * R)
  std::vector<float> dy((size_t)rows * C, 7.f), dw(rows, 7.f), dc(C, 7.f);
  OwnedScratch sc(be, be.upsample_bypass_scratch_bytes(C));
  be.upsample_bypass_backward(mat(pb.x.data(), Np, C), mat(pb.y.data(), rows, C), ivec(pb.kept.data(), rows),
                              vec(pb.w.data(), rows), vec(pb.c.data(), C), mat(dout.data(), Np, C),
                              mat(dy.data(), rows, C), vec(dw.data(), rows), vec(dc.data(), C), sc.s);
  auto loss = [&] { return pb.loss(); };
  // dout now holds dL/dx: (1 - c w) R on kept rows, R elsewhere.
  expect_grad_matches("dx", pb.x, dout, loss, 1e-2f, 1e-3, 1000);
  expect_grad_matches("dy", pb.y, dy, loss, 1e-2f, 1e-3, 1000);
  expect_grad_matches("dw", pb.w, dw, loss, 1e-2f, 1e-3, 1000);
  expect_grad_matches("dc", pb.c, dc, loss, 1e-2f, 1e-3, 1000);
  // Rows that are not kept pass d(out) through unchanged.
  for (int r : {0, 2, 3, 6, 7, 8})
    for (int ch = 0; ch < C; ++ch) EXPECT_EQ(dout[(size_t)r * C + ch], pb.R[(size_t)r * C + ch]);
}

// ---- 7. selection_backward ----------------------------------------------------------------

TEST(BackendSelect, SelectionBackwardMatchesFiniteDifferences) {
  Backend& be = cpu_backend();
  const int B = 2, Tp = 13, Tc = 8, np = B * Tp, rows = B * Tc;  // Tc = 8: some partners are -1
  Rng rng(51);
  std::vector<float> scores(np);
  for (auto& s : scores) {
    s = (float)(rng.uniform() * 2.0 - 0.5);  // [-0.5, 1.5]
    if (std::fabs(s) < 0.05f) s += 0.1f;     // keep clear of the clamp's kinks at 0 and 1
    if (std::fabs(s - 1.0f) < 0.05f) s -= 0.1f;
  }
  std::vector<int32_t> kept(rows), partner(rows);
  std::vector<float> w(rows);
  OwnedScratch sc(be, be.select_top_scratch_bytes(Tp));
  be.select_top(vec(scores.data(), np), B, Tc, false, ivec(kept.data(), rows), ivec(partner.data(), rows),
                vec(w.data(), rows), sc.s);
  ASSERT_NE(std::count(partner.begin(), partner.end(), -1), 0);
  int inside = 0, outside = 0;
  for (float s : scores) (s > 0 && s < 1 ? inside : outside)++;
  ASSERT_GT(inside, 5);
  ASSERT_GT(outside, 3);

  const auto dw = random_vec(rows, 52);
  for (bool with_partner : {true, false}) {
    SCOPED_TRACE(with_partner ? "with partners" : "no partners");
    // L = sum_i dw[i] * (clamp(s[kept[i]]) - clamp(s[partner[i]])) with the selection held fixed.
    auto loss = [&] {
      double L = 0;
      for (int i = 0; i < rows; ++i) {
        double wi = clamp01(scores[kept[i]]);
        if (with_partner && partner[i] >= 0) wi -= clamp01(scores[partner[i]]);
        L += dw[i] * wi;
      }
      return L;
    };
    std::vector<float> ds(np, 9.f);
    be.selection_backward(vec(dw.data(), rows), ivec(kept.data(), rows),
                          with_partner ? ivec(partner.data(), rows) : View{}, vec(scores.data(), np),
                          vec(ds.data(), np));
    expect_grad_matches("dscores", scores, ds, loss, 1e-2f, 1e-3, 1000);
    for (int n = 0; n < np; ++n)
      if (scores[n] < 0 || scores[n] > 1) {
        EXPECT_EQ(ds[n], 0.f) << n;
      }
  }
}

// ---- 8. bypass limit and score stats ------------------------------------------------------

TEST(BackendStats, BypassLimitAccumulateMatchesNaiveReference) {
  Backend& be = cpu_backend();
  const float lo = 0.1f, hi = 0.9f;
  // c below, inside and above [lo, hi], each with a positive and a negative dc.
  std::vector<float> c = {-0.5f, -0.5f, 0.5f, 0.5f, 1.4f, 1.4f, 0.05f, 0.95f};
  std::vector<float> dc = {0.3f, -0.2f, 0.4f, -0.6f, 0.7f, -0.1f, -0.25f, 0.15f};
  const int C = (int)c.size();
  const auto g0 = random_vec(C, 61);
  for (bool limit : {false, true}) {
    SCOPED_TRACE(limit ? "limit" : "no limit");
    std::vector<float> gc = g0, ref = g0;
    for (int ch = 0; ch < C; ++ch) {
      const bool pushes_out = (dc[ch] > 0 && c[ch] < lo) || (dc[ch] < 0 && c[ch] > hi);
      ref[ch] += limit && pushes_out ? -dc[ch] : dc[ch];
    }
    be.bypass_limit_accumulate(vec(dc.data(), C), vec(c.data(), C), lo, hi, limit, vec(gc.data(), C));
    for (int ch = 0; ch < C; ++ch) EXPECT_EQ(gc[ch], ref[ch]) << ch;
  }
}

TEST(BackendStats, ScoreStatsMatchesNaiveReference) {
  Backend& be = cpu_backend();
  const int n = 37;
  const float threshold = 0.2f;
  const auto scores = random_vec(n, 71, 0.9f);
  std::vector<int32_t> kept = {0, 3, 4, 10, 11, 20, 29, 36};
  const int nk = (int)kept.size();
  double above = 0, sq = 0, wsum = 0;
  for (float s : scores) {
    above += s > threshold;
    sq += (double)s * s;
  }
  for (int i : kept) wsum += clamp01(scores[i]);
  std::vector<double> out(3, -1.0);
  be.score_stats(vec(scores.data(), n), ivec(kept.data(), nk), threshold, dvec(out.data(), 3));
  EXPECT_NEAR(out[0], above / n, 1e-12);
  EXPECT_NEAR(out[1], std::sqrt(sq / n), 1e-9);
  EXPECT_NEAR(out[2], wsum / nk, 1e-9);
  EXPECT_GT(out[0], 0.0);
  EXPECT_LT(out[0], 1.0);
}

// ---- 9. cached attention ------------------------------------------------------------------

TEST(BackendAttention, CachedQueriesMatchTheLastRowsOfFullAttention) {
  Backend& be = cpu_backend();
  const int L = 23, m = 5, H = 3, hd = 16, C = H * hd;
  // Fused q|k|v rows like the model: (L, 3C), viewed with cols_at.
  Tensor qkv_t = be.zeros({L, 3 * C});
  const auto vals = random_vec((size_t)L * 3 * C, 81);
  std::memcpy(qkv_t.f32(), vals.data(), sizeof(float) * vals.size());
  View qkv = view_of(qkv_t);
  View q = qkv.cols_at(0, C), k = qkv.cols_at(C, C), v = qkv.cols_at(2 * C, C);

  Tensor o_t = be.zeros({L, C}), lse_t = be.zeros({1, H, L});
  OwnedScratch fs(be, be.attention_scratch_bytes(1, L, H, hd, false));
  be.attention_forward(q, k, v, view_of(o_t), view_of(lse_t), 1, L, H, fs.s);

  Tensor out_t = be.zeros({m, C});
  OwnedScratch cs(be, be.attention_cached_scratch_bytes(m, L, H, hd));
  be.attention_cached(q.rows_at(L - m, m), k, v, view_of(out_t), H, cs.s);
  const float* o = o_t.f32();
  const float* out = out_t.f32();
  double worst = 0;
  for (int i = 0; i < m; ++i)
    for (int c = 0; c < C; ++c) {
      const double e = std::fabs(out[(size_t)i * C + c] - o[(size_t)(L - m + i) * C + c]);
      worst = std::max(worst, e);
      EXPECT_NEAR(out[(size_t)i * C + c], o[(size_t)(L - m + i) * C + c], 1e-5) << i << "," << c;
    }
  RecordProperty("worst_abs_err", std::to_string(worst));
  // The first full row attends only to itself: its output is v of row 0 (sanity of the reference).
  for (int c = 0; c < C; ++c) EXPECT_NEAR(o[c], vals[2 * C + c], 1e-5);
}

// ---- 10. output head, reductions, AdamW ---------------------------------------------------

TEST(BackendOptim, LmHeadXentSumSquaresAndAdamwMatchTheKernels) {
  Backend& be = cpu_backend();
  const int N = 9, Cd = 12, V = 17, chunk_rows = 4;
  const auto x = random_vec((size_t)N * Cd, 91), w = random_vec((size_t)V * Cd, 92, 0.5f);
  std::vector<int32_t> targets = {3, -1, 0, 16, 5, 5, -1, 11, 2};

  // Raw kernel.
  std::vector<float> kdx((size_t)N * Cd), kdw((size_t)V * Cd, 0.f), klog((size_t)N * V), kchunk((size_t)chunk_rows * V);
  int64_t kcount = 0;
  const double kloss = kernels::lm_head_xent(x.data(), w.data(), targets.data(), N, Cd, V, 0.5f, kdx.data(),
                                             kdw.data(), klog.data(), kchunk.data(), chunk_rows, &kcount);
  // Backend.
  std::vector<float> dx((size_t)N * Cd, 5.f), dw((size_t)V * Cd, 0.f), logits((size_t)N * V), chunk((size_t)chunk_rows * V);
  std::vector<double> out(2, -1.0);
  be.lm_head_xent(mat(x.data(), N, Cd), mat(w.data(), V, Cd), ivec(targets.data(), N), 0.5f, mat(dx.data(), N, Cd),
                  mat(dw.data(), V, Cd), mat(logits.data(), N, V), mat(chunk.data(), chunk_rows, V),
                  dvec(out.data(), 2));
  EXPECT_NEAR(out[0], kloss, 1e-12 * std::fabs(kloss));  // an OpenMP reduction: order may vary
  EXPECT_EQ(out[1], (double)kcount);
  EXPECT_EQ(out[1], 7.0);
  EXPECT_EQ(dx, kdx);
  EXPECT_EQ(dw, kdw);
  EXPECT_EQ(logits, klog);
  // And against a naive double cross-entropy.
  double ref = 0;
  for (int r = 0; r < N; ++r) {
    if (targets[r] < 0) continue;
    std::vector<double> l(V);
    double mx = -1e300;
    for (int j = 0; j < V; ++j) {
      double s = 0;
      for (int c = 0; c < Cd; ++c) s += (double)x[(size_t)r * Cd + c] * w[(size_t)j * Cd + c];
      l[j] = s;
      mx = std::max(mx, s);
    }
    double z = 0;
    for (double lj : l) z += std::exp(lj - mx);
    ref += mx + std::log(z) - l[targets[r]];
  }
  EXPECT_NEAR(out[0], ref, 1e-4 * std::max(1.0, std::fabs(ref)));
  // Without gradients: loss and count only.
  std::vector<double> out2(2, -1.0);
  be.lm_head_xent(mat(x.data(), N, Cd), mat(w.data(), V, Cd), ivec(targets.data(), N), 1.0f, View{}, View{}, View{},
                  mat(chunk.data(), chunk_rows, V), dvec(out2.data(), 2));
  EXPECT_NEAR(out2[0], kloss, 1e-9 * std::fabs(kloss));
  EXPECT_EQ(out2[1], 7.0);

  // sum_squares into an F64 (1) view.
  const auto big = random_vec(10000, 93);
  double ss = 0;
  for (float v : big) ss += (double)v * v;
  std::vector<double> sq(1, -1.0);
  be.sum_squares(vec(big.data(), (int64_t)big.size()), dvec(sq.data(), 1));
  EXPECT_NEAR(sq[0], ss, 1e-5 * ss);
  EXPECT_NEAR(sq[0], kernels::sum_squares(big.data(), (int64_t)big.size()), 1e-12 * ss);

  // adamw_step on views equals the kernel bitwise, over a few steps.
  const int n = 1000;
  auto p1 = random_vec(n, 94), g = random_vec(n, 95);
  std::vector<float> m1(n, 0.f), v1(n, 0.f);
  auto p2 = p1, m2 = m1, v2 = v1;
  for (int step = 1; step <= 3; ++step) {
    be.adamw_step(vec(p1.data(), n), vec(g.data(), n), vec(m1.data(), n), vec(v1.data(), n), 1e-2f, 0.9f, 0.95f,
                  1e-8f, 0.1f, step);
    kernels::adamw_step(p2.data(), g.data(), m2.data(), v2.data(), n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
  }
  EXPECT_EQ(std::memcmp(p1.data(), p2.data(), sizeof(float) * n), 0);
  EXPECT_EQ(std::memcmp(m1.data(), m2.data(), sizeof(float) * n), 0);
  EXPECT_EQ(std::memcmp(v1.data(), v2.data(), sizeof(float) * n), 0);
  EXPECT_NE(p1, random_vec(n, 94));  // the step moved p
}


TEST(BackendMemory, CommitKeepsWhatTheMemoryHolds) {
  Backend& be = cpu_backend();
  // A small buffer (4 KB pages) and a large one (2 MB pages), committed in unaligned parts.
  for (size_t bytes : {(size_t)300000, (size_t)6 << 20}) {
    std::shared_ptr<void> buf = be.alloc_shared(bytes);
    auto* b = static_cast<unsigned char*>(buf.get());
    const size_t half = bytes / 2 + 17;
    for (size_t i = 0; i < half; ++i) b[i] = (unsigned char)(i * 131);
    be.commit(b + 5, half - 5);  // pages already written
    be.commit(b + half, bytes - half);  // pages never touched
    bool kept = true;
    for (size_t i = 0; i < half; ++i) kept &= b[i] == (unsigned char)(i * 131);
    EXPECT_TRUE(kept) << bytes << " bytes";
    std::memset(b + half, 7, bytes - half);
    EXPECT_EQ(b[bytes - 1], 7);
  }
}

}  // namespace backend_tests
}  // namespace subllm
