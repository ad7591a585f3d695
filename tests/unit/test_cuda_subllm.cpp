// The CUDA backend's SUBLLM kernels (subsample.cu) and fused LM head + cross-entropy
// (lm_head.cu) against the CPU backend on the same random inputs. Compute-dtype operands run in
// both compute dtypes: "cuda:fp32" (F32, tight tolerances) and "cuda" (BF16: inputs rounded to
// bf16 for the CPU side, bf16 outputs compared at ~1e-2 relative); the selection kernels, whose
// operands are all F32 or I32, run on "cuda:fp32" and must agree exactly (their rules are
// deterministic). Sizes are not multiples of the block sizes, and the GPU side reads strided
// views (ld > cols) where the CPU op takes dense rows only. Each test is skipped without a CUDA
// build or a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <vector>

#include "backend/backend.h"
#include "cuda_test_util.h"
#include "subllm/error.h"
#include "subllm/rng.h"

namespace subllm {
namespace cuda_subllm_tests {

using test::all_close;
using test::bf16_round;
using test::download;
using test::download_as;
using test::OwnedScratch;
using test::random_floats;
using test::random_ints;
using test::upload;
using test::upload_i32;

Backend& cpu() { return cpu_backend(); }

// v with every element rounded to bf16 when dt is BF16: the values such an input really holds.
std::vector<float> rounded(std::vector<float> v, DType dt) {
  if (dt == DType::BF16)
    for (float& x : v) x = bf16_round(x);
  return v;
}

std::vector<float> random_uniform(size_t n, float lo, float hi, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = (float)(lo + (hi - lo) * rng.uniform());
  return v;
}

// The first n of a random permutation of [0, m), sorted: distinct row indices in order.
std::vector<int32_t> random_rows(size_t n, int32_t m, uint64_t seed) {
  std::vector<int32_t> p((size_t)m);
  std::iota(p.begin(), p.end(), 0);
  Rng rng(seed);
  for (size_t i = p.size(); i > 1; --i) std::swap(p[i - 1], p[(size_t)rng.below(i)]);
  p.resize(n);
  std::sort(p.begin(), p.end());
  return p;
}

// Host views for the CPU backend (its memory is host memory).
View hmat(std::vector<float>& v, int64_t rows, int64_t cols) { return mat(v.data(), rows, cols); }
View hvec(std::vector<float>& v) { return vec(v.data(), (int64_t)v.size()); }
View hivec(std::vector<int32_t>& v) { return ivec(v.data(), (int64_t)v.size()); }

// A (rows, cols) matrix on the GPU inside a (rows, ld) buffer whose extra columns hold kPad;
// `v` views the first cols columns (row stride ld).
constexpr float kPad = 7.0f;  // exact in bf16
struct DevMat {
  Tensor t;
  View v;
  int64_t rows = 0, cols = 0, ld = 0;
};
DevMat upload_mat(Backend& be, const std::vector<float>& host, int64_t rows, int64_t cols, int64_t ld, DType dt) {
  std::vector<float> full((size_t)(rows * ld), kPad);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) full[(size_t)(r * ld + c)] = host[(size_t)(r * cols + c)];
  DevMat m;
  m.t = upload(be, full, {rows, ld}, dt);
  m.v = view_of(m.t).cols_at(0, cols);
  m.rows = rows;
  m.cols = cols;
  m.ld = ld;
  return m;
}
// Its (rows, cols) values back; the padding must be untouched.
std::vector<float> download_mat(Backend& be, const DevMat& m) {
  const std::vector<float> full = download(be, m.t);
  std::vector<float> out((size_t)(m.rows * m.cols));
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.ld; ++c) {
      const float v = full[(size_t)(r * m.ld + c)];
      if (c < m.cols) out[(size_t)(r * m.cols + c)] = v;
      else EXPECT_EQ(v, kPad) << "padding overwritten at row " << r << ", column " << c;
    }
  return out;
}

// all_close with the absolute tolerance rel · max |b| and relative tolerance rel.
::testing::AssertionResult close_scaled(const std::vector<float>& a, const std::vector<float>& b, float rel) {
  float mx = 0;
  for (float v : b) mx = std::max(mx, std::fabs(v));
  return all_close(a, b, rel * std::max(mx, 1e-30f), rel);
}

// |a - b| <= rel · max(1, |b|)
::testing::AssertionResult near_rel(double a, double b, double rel) {
  if (std::fabs(a - b) <= rel * std::max(1.0, std::fabs(b))) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << a << " vs " << b << " (relative tolerance " << rel << ")";
}

// Tolerance of outputs stored in the compute dtype (bf16 keeps 8 significant bits).
float out_tol(DType dt) { return dt == DType::BF16 ? 1e-2f : 1e-5f; }

// ---- score layer ------------------------------------------------------------------------------

// scores = x · w with w as (1, C) and as (C, 1); dx (=|+=) dscores ⊗ w; dw += dscores^T · x.
// Scores and dw are F32 sums of the same (rounded) inputs in either dtype: 1e-4 relative to the
// largest value; dx is a bf16 output in BF16.
CUDA_TEST_BOTH(CudaSubllm, ScoreLayer) {
  const int64_t N = 1000, C = 200;
  const auto x = rounded(random_floats((size_t)(N * C), 1), dt);
  const auto w = rounded(random_floats((size_t)C, 2, 0.1f), dt);
  auto ds = random_floats((size_t)N, 3);
  const auto dx0 = rounded(random_floats((size_t)(N * C), 4), dt);
  const auto dw0 = random_floats((size_t)C, 5);

  // CPU reference.
  std::vector<float> xc = x, wc = w, scores_c((size_t)N);
  cpu().score_forward(hmat(xc, N, C), hvec(wc), hvec(scores_c));

  const DevMat xg = upload_mat(gpu, x, N, C, C + 5, dt);
  const Tensor wg = upload(gpu, w, {C}, dt);
  for (bool row_vector : {false, true}) {
    SCOPED_TRACE(row_vector ? "w as (1, C)" : "w as (C, 1)");
    const View wv = row_vector ? View{wg.raw(), dt, 1, C, C} : view_of(wg);
    Tensor sg = gpu.empty({N});
    gpu.score_forward(xg.v, wv, view_of(sg));
    EXPECT_TRUE(close_scaled(download(gpu, sg), scores_c, 1e-4f));
  }

  for (bool accumulate : {false, true}) {
    SCOPED_TRACE(accumulate ? "accumulate dx" : "overwrite dx");
    std::vector<float> dxc = dx0, dwc = dw0;
    cpu().score_backward(hmat(xc, N, C), hvec(wc), hvec(ds), hmat(dxc, N, C), hvec(dwc), accumulate);
    const DevMat dxg = upload_mat(gpu, dx0, N, C, C + 3, dt);
    const Tensor dsg = upload(gpu, ds, {N}), dwg = upload(gpu, dw0, {C});
    gpu.score_backward(xg.v, view_of(wg), view_of(dsg), dxg.v, view_of(dwg), accumulate);
    EXPECT_TRUE(all_close(download_mat(gpu, dxg), dxc, 1e-6f, out_tol(dt)));
    EXPECT_TRUE(close_scaled(download(gpu, dwg), dwc, 1e-4f));
  }

  // dx may be left out.
  std::vector<float> dwc = dw0;
  cpu().score_backward(hmat(xc, N, C), hvec(wc), hvec(ds), View{}, hvec(dwc), false);
  const Tensor dsg = upload(gpu, ds, {N}), dwg = upload(gpu, dw0, {C});
  gpu.score_backward(xg.v, view_of(wg), view_of(dsg), View{}, view_of(dwg), false);
  EXPECT_TRUE(close_scaled(download(gpu, dwg), dwc, 1e-4f));
}

// ---- top-k selection --------------------------------------------------------------------------

// Scores of B sequences of Tp: distinct (a permutation spread over [-0.3, 1.3], so some fall
// outside the clamp), or with many ties (five levels, and -0 next to +0).
std::vector<float> selection_scores(int B, int Tp, bool ties, uint64_t seed) {
  const size_t n = (size_t)B * Tp;
  std::vector<float> s(n);
  Rng rng(seed);
  if (ties) {
    for (auto& v : s) {
      const int level = (int)rng.below(5);
      v = level == 1 && rng.below(2) ? -0.0f : 0.25f * (float)level - 0.25f;  // -0.25, 0 (or -0), 0.25, 0.5, 0.75
    }
  } else {
    std::vector<int32_t> p(n);
    std::iota(p.begin(), p.end(), 0);
    for (size_t i = n; i > 1; --i) std::swap(p[i - 1], p[(size_t)rng.below(i)]);
    for (size_t i = 0; i < n; ++i) s[i] = -0.3f + 1.6f * ((float)p[i] + 0.5f) / (float)n;
  }
  return s;
}

struct Selection {
  std::vector<int32_t> kept, partner;
  std::vector<float> w;
};

Selection select_cpu(std::vector<float> scores, int B, int Tc, bool flip) {
  const int Tp = (int)(scores.size() / B);
  Selection r;
  r.kept.resize((size_t)B * Tc);
  r.partner.resize((size_t)B * Tc);
  r.w.resize((size_t)B * Tc);
  OwnedScratch s(cpu(), cpu().select_top_scratch_bytes(Tp));
  cpu().select_top(hvec(scores), B, Tc, flip, hivec(r.kept), hivec(r.partner), hvec(r.w), s.s);
  return r;
}

Selection select_gpu(Backend& gpu, const std::vector<float>& scores, int B, int Tc, bool flip) {
  const int Tp = (int)(scores.size() / B);
  const int64_t rows = (int64_t)B * Tc;
  const Tensor sg = upload(gpu, scores, {(int64_t)scores.size()});
  Tensor kept = gpu.empty({rows}, DType::I32), partner = gpu.empty({rows}, DType::I32), w = gpu.empty({rows});
  OwnedScratch s(gpu, gpu.select_top_scratch_bytes(Tp));
  gpu.select_top(view_of(sg), B, Tc, flip, view_of(kept), view_of(partner), view_of(w), s.s);
  Selection r;
  r.kept = download_as<int32_t>(gpu, kept);
  r.partner = download_as<int32_t>(gpu, partner);
  r.w = download(gpu, w);
  return r;
}

// kept, partner and w equal exactly: the tie rule (earlier position first), the pairing and
// the clamp are deterministic.
TEST(CudaSubllm, SelectTopMatchesTheCpuExactly) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  const int B = 3;
  uint64_t seed = 100;
  for (int Tp : {37, 1000})
    for (double r : {0.25, 0.5, 0.9})
      for (bool ties : {false, true})
        for (bool flip : {false, true}) {
          const int Tc = (int)std::ceil(Tp * r);
          SCOPED_TRACE("Tp " + std::to_string(Tp) + ", Tc " + std::to_string(Tc) + (ties ? ", ties" : ", distinct") +
                       (flip ? ", flip" : ""));
          const auto scores = selection_scores(B, Tp, ties, ++seed);
          const Selection c = select_cpu(scores, B, Tc, flip), g = select_gpu(gpu, scores, B, Tc, flip);
          EXPECT_EQ(g.kept, c.kept);
          EXPECT_EQ(g.partner, c.partner);
          EXPECT_EQ(g.w, c.w);
        }
}

// Sequences too long for shared memory go one at a time through the caller's scratch.
TEST(CudaSubllm, SelectTopLongSequencesUseTheScratch) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  const int B = 2, Tp = 30000, Tc = 7500;  // 8 · Tp bytes exceed any GPU's shared memory per block
  for (bool ties : {false, true}) {
    SCOPED_TRACE(ties ? "ties" : "distinct");
    const auto scores = selection_scores(B, Tp, ties, ties ? 7 : 8);
    const Selection c = select_cpu(scores, B, Tc, true), g = select_gpu(gpu, scores, B, Tc, true);
    EXPECT_EQ(g.kept, c.kept);
    EXPECT_EQ(g.partner, c.partner);
    EXPECT_EQ(g.w, c.w);
  }
}

// ---- threshold selection ----------------------------------------------------------------------

TEST(CudaSubllm, SelectThresholdMatchesTheCpuExactly) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  const int n = 3000, pad = 0;
  auto scores = random_floats((size_t)n, 11, 0.5f);
  for (auto& s : scores) s += 0.3f;
  auto tokens = random_ints((size_t)n, 10, 12);  // about one in ten is padding
  const Tensor sg = upload(gpu, scores, {n});
  const Tensor tg = upload_i32(gpu, tokens);
  for (float threshold : {0.3f, 100.0f, -100.0f}) {
    SCOPED_TRACE("threshold " + std::to_string(threshold));
    std::vector<int32_t> kept_c((size_t)n), count_c(1);
    std::vector<float> w_c((size_t)n);
    cpu().select_threshold(hvec(scores), hivec(tokens), threshold, pad, hivec(kept_c), hvec(w_c), hivec(count_c));
    Tensor kept = gpu.empty({n}, DType::I32), w = gpu.empty({n}), count = gpu.empty({1}, DType::I32);
    gpu.select_threshold(view_of(sg), view_of(tg), threshold, pad, view_of(kept), view_of(w), view_of(count));
    const auto count_g = download_as<int32_t>(gpu, count);
    ASSERT_EQ(count_g[0], count_c[0]);
    const size_t k = (size_t)count_c[0];
    const auto kept_g = download_as<int32_t>(gpu, kept);
    const auto w_g = download(gpu, w);
    EXPECT_EQ(std::vector<int32_t>(kept_g.begin(), kept_g.begin() + k),
              std::vector<int32_t>(kept_c.begin(), kept_c.begin() + k));
    EXPECT_EQ(std::vector<float>(w_g.begin(), w_g.begin() + k), std::vector<float>(w_c.begin(), w_c.begin() + k));
  }
}

// ---- upsampling and bypass --------------------------------------------------------------------

// out[kept] = x + c · w · (y - x) with out a separate copy of x and with out = x; then the
// backward: dout (overwritten in place), dy, dw and dc. x and dout are strided on the GPU.
// dw and dc are F32 sums of the same rounded inputs: 1e-4 relative to the largest value.
CUDA_TEST_BOTH(CudaSubllm, UpsampleBypass) {
  const int64_t Np = 300, rows = 120, C = 70;
  const auto x = rounded(random_floats((size_t)(Np * C), 21), dt);
  const auto y = rounded(random_floats((size_t)(rows * C), 22), dt);
  auto kept = random_rows((size_t)rows, (int32_t)Np, 23);
  auto w = random_uniform((size_t)rows, -1.0f, 1.0f, 24);
  const auto c = rounded(random_uniform((size_t)C, 0.0f, 1.2f, 25), dt);
  const auto dout0 = rounded(random_floats((size_t)(Np * C), 26), dt);

  std::vector<float> xc = x, yc = y, cc = c, out_c = x;
  cpu().upsample_bypass_forward(hmat(xc, Np, C), hmat(yc, rows, C), hivec(kept), hvec(w), hvec(cc),
                                hmat(out_c, Np, C));

  const Tensor yg = upload(gpu, y, {rows, C}, dt), cg = upload(gpu, c, {C}, dt);
  const Tensor keptg = upload_i32(gpu, kept), wg = upload(gpu, w, {rows});
  {
    SCOPED_TRACE("out is a copy of x");
    const DevMat xg = upload_mat(gpu, x, Np, C, C + 2, dt), outg = upload_mat(gpu, x, Np, C, C + 6, dt);
    gpu.upsample_bypass_forward(xg.v, view_of(yg), view_of(keptg), view_of(wg), view_of(cg), outg.v);
    EXPECT_TRUE(all_close(download_mat(gpu, outg), out_c, 1e-5f, out_tol(dt)));
    EXPECT_EQ(download_mat(gpu, xg), x);  // x is only read
  }
  {
    SCOPED_TRACE("out is x");
    const DevMat xg = upload_mat(gpu, x, Np, C, C + 2, dt);
    gpu.upsample_bypass_forward(xg.v, view_of(yg), view_of(keptg), view_of(wg), view_of(cg), xg.v);
    EXPECT_TRUE(all_close(download_mat(gpu, xg), out_c, 1e-5f, out_tol(dt)));
  }

  // Backward.
  std::vector<float> dout_c = dout0, dy_c((size_t)(rows * C)), dw_c((size_t)rows), dc_c((size_t)C);
  {
    OwnedScratch s(cpu(), cpu().upsample_bypass_scratch_bytes((int)C));
    cpu().upsample_bypass_backward(hmat(xc, Np, C), hmat(yc, rows, C), hivec(kept), hvec(w), hvec(cc),
                                   hmat(dout_c, Np, C), hmat(dy_c, rows, C), hvec(dw_c), hvec(dc_c), s.s);
  }
  const DevMat xg = upload_mat(gpu, x, Np, C, C + 2, dt), doutg = upload_mat(gpu, dout0, Np, C, C + 9, dt);
  Tensor dyg = gpu.empty({rows, C}, dt), dwg = gpu.empty({rows});
  const Tensor dcg = upload(gpu, random_floats((size_t)C, 27), {C});  // overwritten
  OwnedScratch s(gpu, gpu.upsample_bypass_scratch_bytes((int)C));
  gpu.upsample_bypass_backward(xg.v, view_of(yg), view_of(keptg), view_of(wg), view_of(cg), doutg.v, view_of(dyg),
                               view_of(dwg), view_of(dcg), s.s);
  EXPECT_TRUE(all_close(download_mat(gpu, doutg), dout_c, 1e-5f, out_tol(dt)));
  EXPECT_TRUE(all_close(download(gpu, dyg), dy_c, 1e-5f, out_tol(dt)));
  EXPECT_TRUE(close_scaled(download(gpu, dwg), dw_c, 1e-4f));
  EXPECT_TRUE(close_scaled(download(gpu, dcg), dc_c, 1e-4f));

  // No kept rows: dc is zero and nothing else moves.
  const DevMat dout2 = upload_mat(gpu, dout0, Np, C, C, dt);
  gpu.upsample_bypass_backward(xg.v, View{yg.raw(), dt, 0, C, C}, View{keptg.raw(), DType::I32, 0, 1, 1},
                               View{wg.raw(), DType::F32, 0, 1, 1}, view_of(cg), dout2.v,
                               View{dyg.raw(), dt, 0, C, C}, View{dwg.raw(), DType::F32, 0, 1, 1}, view_of(dcg), s.s);
  EXPECT_EQ(download(gpu, dcg), std::vector<float>((size_t)C, 0.0f));
  EXPECT_EQ(download_mat(gpu, dout2), dout0);
}

// ---- selection backward -----------------------------------------------------------------------

// d(scores) from d(w) of a real selection, with and without partners; dscores starts as garbage
// and is overwritten. Each row gets one term, so the result is exact.
TEST(CudaSubllm, SelectionBackwardMatchesTheCpuExactly) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  const int B = 3, Tp = 100, Tc = 40;
  auto scores = selection_scores(B, Tp, true, 31);
  Selection sel = select_cpu(scores, B, Tc, false);
  auto dw = random_floats((size_t)B * Tc, 32);
  const Tensor sg = upload(gpu, scores, {B * Tp}), dwg = upload(gpu, dw, {B * Tc});
  const Tensor keptg = upload_i32(gpu, sel.kept), partnerg = upload_i32(gpu, sel.partner);
  for (bool with_partner : {true, false}) {
    SCOPED_TRACE(with_partner ? "with partners" : "without partners");
    std::vector<float> ds_c((size_t)B * Tp, 5.0f);
    cpu().selection_backward(hvec(dw), hivec(sel.kept), with_partner ? hivec(sel.partner) : View{}, hvec(scores),
                             hvec(ds_c));
    const Tensor dsg = upload(gpu, random_floats((size_t)B * Tp, 33), {B * Tp});
    gpu.selection_backward(view_of(dwg), view_of(keptg), with_partner ? view_of(partnerg) : View{}, view_of(sg),
                           view_of(dsg));
    EXPECT_EQ(download(gpu, dsg), ds_c);
  }
}

// ---- balancer ---------------------------------------------------------------------------------

// The balancer's edit over 5000 scores: counted (by the proportion positive) and by mean/std,
// with the RMS term, and a case where nothing is outside its range (dscores unchanged). Half of
// dscores are 0, as after the clamp. Statistics in double: 1e-5 relative.
TEST(CudaSubllm, BalancerMatchesTheCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  const int64_t n = 5000;
  auto scores = random_floats((size_t)n, 41, 0.6f);
  for (auto& s : scores) s += 0.4f;  // mean/std about 0.67, 75% positive, RMS about 0.72
  auto d0 = random_floats((size_t)n, 42, 0.05f);
  Rng rng(43);
  for (auto& v : d0)
    if (rng.below(2)) v = 0.0f;
  struct Case {
    const char* what;
    double m_min, m_max, r_min, r_max, p_target, p_window;
  };
  const Case cases[] = {
      {"counted, above the target", -1.0, 1.0, 0.1, 2.0, 0.5, 0.05},
      {"counted, with the RMS above its range", -1.0, 1.0, 0.1, 0.5, 0.7, 0.1},
      {"mean/std above its range", -0.5, 0.3, 0.1, 2.0, -1.0, 0.0},
      {"mean/std below its range, RMS below", 1.0, 2.0, 1.0, 2.0, -1.0, 0.0},
      {"everything inside", -1.0, 1.0, 0.1, 2.0, -1.0, 0.0},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    std::vector<float> d_c = d0;
    {
      OwnedScratch s(cpu(), cpu().balancer_scratch_bytes(n));
      cpu().balancer_backward(hvec(scores), hvec(d_c), k.m_min, k.m_max, k.r_min, k.r_max, 0.04, k.p_target,
                              k.p_window, s.s);
    }
    const Tensor sg = upload(gpu, scores, {n}), dg = upload(gpu, d0, {n});
    OwnedScratch s(gpu, gpu.balancer_scratch_bytes(n));
    gpu.balancer_backward(view_of(sg), view_of(dg), k.m_min, k.m_max, k.r_min, k.r_max, 0.04, k.p_target, k.p_window,
                          s.s);
    const auto d_g = download(gpu, dg);
    EXPECT_TRUE(all_close(d_g, d_c, 1e-7f, 1e-5f));
    if (std::string(k.what) == "everything inside") {
      EXPECT_EQ(d_c, d0);
      EXPECT_EQ(d_g, d0);
    } else {
      EXPECT_NE(d_c, d0);  // the case does exercise the edit
    }
  }
}

// ---- bypass limit, statistics -----------------------------------------------------------------

TEST(CudaSubllm, BypassLimitAccumulateMatchesTheCpuExactly) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  const int64_t C = 300;
  auto dc = random_floats((size_t)C, 51);
  auto c = random_uniform((size_t)C, -0.5f, 1.5f, 52);
  const auto gc0 = random_floats((size_t)C, 53);
  for (bool limit : {false, true}) {
    SCOPED_TRACE(limit ? "limit" : "no limit");
    std::vector<float> gc_c = gc0;
    cpu().bypass_limit_accumulate(hvec(dc), hvec(c), 0.2f, 1.0f, limit, hvec(gc_c));
    const Tensor dcg = upload(gpu, dc, {C}), cg = upload(gpu, c, {C}), gcg = upload(gpu, gc0, {C});
    gpu.bypass_limit_accumulate(view_of(dcg), view_of(cg), 0.2f, 1.0f, limit, view_of(gcg));
    EXPECT_EQ(download(gpu, gcg), gc_c);
  }
}

TEST(CudaSubllm, ScoreStatsMatchesTheCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  const int B = 3, Tp = 1000, Tc = 500;
  auto scores = random_floats((size_t)B * Tp, 61, 0.7f);
  for (auto& s : scores) s += 0.3f;
  Selection sel = select_cpu(scores, B, Tc, false);
  std::vector<double> out_c(3);
  cpu().score_stats(hvec(scores), hivec(sel.kept), 0.2f, dvec(out_c.data(), 3));
  const Tensor sg = upload(gpu, scores, {B * Tp}), keptg = upload_i32(gpu, sel.kept);
  Tensor out = gpu.empty({3}, DType::F64);
  gpu.score_stats(view_of(sg), view_of(keptg), 0.2f, view_of(out));
  const auto out_g = download_as<double>(gpu, out);
  EXPECT_EQ(out_g[0], out_c[0]);  // a count over n
  EXPECT_TRUE(near_rel(out_g[1], out_c[1], 1e-12));
  EXPECT_TRUE(near_rel(out_g[2], out_c[2], 1e-12));
}

// ---- views and dtypes -------------------------------------------------------------------------

TEST(CudaSubllm, RefusesOperandsOfTheWrongDtypeOrShape) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  Backend& gpu = backend_for("cuda");
  const Tensor x = gpu.zeros({8, 4}, DType::BF16), w = gpu.zeros({4}, DType::BF16);
  Tensor scores_bf = gpu.zeros({8}, DType::BF16), scores = gpu.zeros({7});
  EXPECT_THROW(gpu.score_forward(view_of(x), view_of(w), view_of(scores_bf)), Error);  // scores are F32
  EXPECT_THROW(gpu.score_forward(view_of(x), view_of(w), view_of(scores)), Error);     // 7 scores for 8 rows
  const Tensor s6 = gpu.zeros({6});
  Tensor k = gpu.zeros({4}, DType::I32), p = gpu.zeros({4}, DType::I32), ww = gpu.zeros({4});
  EXPECT_THROW(gpu.select_top(view_of(s6), 2, 4, false, view_of(k), view_of(p), view_of(ww), Scratch{}),
               Error);  // Tc above Tp
}

// ---- LM head ----------------------------------------------------------------------------------

// Fused projection + cross-entropy with V = 1000, N = 37 rows in chunks of 16 (the last one
// partial), every fifth target ignored; with and without dx/dw/logits and targets. x and dx are
// strided on the GPU. Loss: 1e-5 relative in F32; in BF16 the logits go through the bf16 chunk
// unless F32 logits are asked for, so 2e-3. Logits are F32 GEMMs of the same rounded inputs in
// either dtype (1e-4); dx, dw: 1e-4 (F32) and 2e-2 (BF16, from the bf16 gradient chunk) of the
// largest value.
CUDA_TEST_BOTH(CudaLmHead, XentMatchesTheCpu) {
  const int64_t N = 37, C = 64, V = 1000, chunk_rows = 16;
  const auto x = rounded(random_floats((size_t)(N * C), 71), dt);
  const auto w = rounded(random_floats((size_t)(V * C), 72, 0.1f), dt);
  auto targets = random_ints((size_t)N, (int32_t)V, 73);
  for (size_t i = 0; i < targets.size(); i += 5) targets[i] = -1;
  int64_t counted = 0;
  for (int32_t t : targets) counted += t >= 0;
  const float grad_scale = 1.0f / (float)counted;
  const auto dw0 = random_floats((size_t)(V * C), 74, 0.01f);

  const DevMat xg = upload_mat(gpu, x, N, C, C + 3, dt);
  const Tensor wg = upload(gpu, w, {V, C}, dt), tg = upload_i32(gpu, targets);
  Tensor chunk_g = gpu.empty({chunk_rows, V}, dt);
  const float loss_tol = dt == DType::BF16 ? 2e-3f : 1e-5f, grad_tol = dt == DType::BF16 ? 2e-2f : 1e-4f;

  struct Case {
    const char* what;
    bool targets, dx, logits;
  };
  const Case cases[] = {
      {"loss only", true, false, false},   {"loss and gradients", true, true, false},
      {"logits only", false, false, true}, {"loss, gradients and logits", true, true, true},
      {"gradients of no target", false, true, false}, {"loss and logits", true, false, true},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    // CPU reference.
    std::vector<float> xc = x, wc = w, chunk_c((size_t)(chunk_rows * V)), dx_c((size_t)(N * C), 0.0f), dw_c = dw0,
                       logits_c((size_t)(N * V), 0.0f);
    std::vector<double> out_c(2);
    cpu().lm_head_xent(hmat(xc, N, C), hmat(wc, V, C), k.targets ? hivec(targets) : View{}, grad_scale,
                       k.dx ? hmat(dx_c, N, C) : View{}, k.dx ? hmat(dw_c, V, C) : View{},
                       k.logits ? hmat(logits_c, N, V) : View{}, hmat(chunk_c, chunk_rows, V), dvec(out_c.data(), 2));
    // GPU.
    const DevMat dxg = upload_mat(gpu, random_floats((size_t)(N * C), 75), N, C, C + 5, dt);
    const Tensor dwg = upload(gpu, dw0, {V, C});
    Tensor logits_g = gpu.empty({N, V}), out_g = gpu.empty({2}, DType::F64);
    gpu.lm_head_xent(xg.v, view_of(wg), k.targets ? view_of(tg) : View{}, grad_scale, k.dx ? dxg.v : View{},
                     k.dx ? view_of(dwg) : View{}, k.logits ? view_of(logits_g) : View{}, view_of(chunk_g),
                     view_of(out_g));
    const auto out = download_as<double>(gpu, out_g);
    EXPECT_EQ(out[1], out_c[1]);
    EXPECT_EQ(out_c[1], k.targets ? (double)counted : 0.0);
    const float lt = k.logits && dt == DType::BF16 ? 1e-5f : loss_tol;  // F32 logits: no bf16 chunk rounding
    EXPECT_TRUE(near_rel(out[0], out_c[0], lt));
    if (k.logits) {
      EXPECT_TRUE(close_scaled(download(gpu, logits_g), logits_c, 1e-4f));
    }
    if (k.dx) {
      const auto dx = download_mat(gpu, dxg);
      if (k.targets) {
        EXPECT_TRUE(close_scaled(dx, dx_c, grad_tol));
        // dw: compare the increment, which is small next to dw0.
        const auto dw = download(gpu, dwg);
        std::vector<float> inc_g(dw.size()), inc_c(dw.size());
        for (size_t i = 0; i < dw.size(); ++i) {
          inc_g[i] = dw[i] - dw0[i];
          inc_c[i] = dw_c[i] - dw0[i];
        }
        EXPECT_TRUE(close_scaled(inc_g, inc_c, grad_tol));
      } else {
        EXPECT_EQ(dx, std::vector<float>(dx.size(), 0.0f));
        EXPECT_EQ(download(gpu, dwg), dw0);
      }
    }
  }
}

}  // namespace cuda_subllm_tests
}  // namespace subllm
