// CUDA attention kernels against the CPU backend on the same random inputs, on the fused-buffer
// layout the model uses: q | k | v are column views of one (B*T, 3C + pad) matrix, dq | dk | dv
// of another. F32 ("cuda:fp32", the simple f32 kernels) tightly; BF16 ("cuda", the tensor-core
// flash kernels for hd 64 / 128, the simple kernels otherwise) with inputs rounded to bf16 on
// the CPU side and tolerances stated per check.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "cuda_test_util.h"
#include "subllm/error.h"

namespace subllm::test {
namespace cuda_attention_tests {

// max |a - b| <= tol * max |b| (errors judged against the tensor's scale, as gradients of
// summed products have no meaningful per-element relative error near 0).
::testing::AssertionResult close_to_max(const std::vector<float>& a, const std::vector<float>& b, float tol) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  double mx = 0, worst = 0;
  size_t at = 0;
  for (float x : b) mx = std::max(mx, (double)std::fabs(x));
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs((double)a[i] - b[i]);
    if (std::isnan(a[i]) || std::isnan(b[i])) return ::testing::AssertionFailure() << "NaN at " << i;
    if (e > worst) { worst = e; at = i; }
  }
  if (worst <= tol * std::max(mx, 1e-6)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "element " << at << ": " << a[at] << " vs " << b[at] << ", max |ref| " << mx
                                       << ", tol " << tol;
}

// Columns [c0, c0 + n) of rows of a (rows, ld) host matrix, packed.
std::vector<float> cols_of(const std::vector<float>& m, int64_t rows, int64_t ld, int64_t c0, int64_t n) {
  std::vector<float> out((size_t)(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) out[(size_t)(r * n + c)] = m[(size_t)(r * ld + c0 + c)];
  return out;
}

struct Problem {
  int B, T, H, hd, C;
  int64_t N, ld, ld_o;
  std::vector<float> qkv, dout;  // (N, ld), (N, ld_o)
};

Problem make_problem(int B, int T, int H, int hd, bool bf16, uint64_t seed, int pad = 8) {
  Problem p{B, T, H, hd, H * hd, (int64_t)B * T, 3 * (int64_t)H * hd + pad, (int64_t)H * hd + pad, {}, {}};
  p.qkv = random_floats((size_t)(p.N * p.ld), seed);
  p.dout = random_floats((size_t)(p.N * p.ld_o), seed + 1);
  if (bf16) {
    for (auto& x : p.qkv) x = bf16_round(x);
    for (auto& x : p.dout) x = bf16_round(x);
  }
  return p;
}

struct Result {
  std::vector<float> o, lse, dq, dk, dv;  // packed (N, C) / (B*H*T)
};

Result run_cpu(const Problem& p) {
  Backend& cpu = cpu_backend();
  const int64_t C = p.C;
  std::vector<float> o((size_t)(p.N * p.ld_o), 0.f), lse((size_t)p.B * p.H * p.T), d((size_t)(p.N * 3 * C));
  const View q = mat(p.qkv.data(), p.N, C, p.ld), k = mat(p.qkv.data() + C, p.N, C, p.ld),
             v = mat(p.qkv.data() + 2 * C, p.N, C, p.ld);
  const View ov = mat(o.data(), p.N, C, p.ld_o), lv = vec(lse.data(), (int64_t)lse.size());
  const size_t fb = cpu.attention_scratch_bytes(p.B, p.T, p.H, p.hd, false);
  auto fs = cpu.alloc_shared(std::max<size_t>(fb, 64));
  cpu.attention_forward(q, k, v, ov, lv, p.B, p.T, p.H, Scratch{fs.get(), fb});
  const size_t bb = cpu.attention_scratch_bytes(p.B, p.T, p.H, p.hd, true);
  auto bs = cpu.alloc_shared(std::max<size_t>(bb, 64));
  cpu.attention_backward(q, k, v, ov, mat(p.dout.data(), p.N, C, p.ld_o), lv, mat(d.data(), p.N, C, 3 * C),
                         mat(d.data() + C, p.N, C, 3 * C), mat(d.data() + 2 * C, p.N, C, 3 * C), p.B, p.T, p.H,
                         Scratch{bs.get(), bb});
  return {cols_of(o, p.N, p.ld_o, 0, C), lse, cols_of(d, p.N, 3 * C, 0, C), cols_of(d, p.N, 3 * C, C, C),
          cols_of(d, p.N, 3 * C, 2 * C, C)};
}

Tensor scratch_tensor(Backend& be, size_t bytes) {
  return be.empty({(int64_t)std::max<size_t>(bytes, 64)}, DType::U8);
}

Result run_gpu(Backend& be, const Problem& p) {
  const DType dt = be.compute_dtype();
  const int64_t C = p.C, dld = 3 * C + 8;  // dq | dk | dv fused with a padded stride
  Tensor tqkv = upload(be, p.qkv, {p.N, p.ld}, dt);
  Tensor tdout = upload(be, p.dout, {p.N, p.ld_o}, dt);
  Tensor to = be.zeros({p.N, p.ld_o}, dt);
  Tensor tl = be.empty({(int64_t)p.B, (int64_t)p.H, (int64_t)p.T});
  Tensor td = be.zeros({p.N, dld}, dt);
  const View fused{tqkv.raw(), dt, p.N, p.ld, p.ld};
  const View q = fused.cols_at(0, C), k = fused.cols_at(C, C), v = fused.cols_at(2 * C, C);
  const View ov = View{to.raw(), dt, p.N, p.ld_o, p.ld_o}.cols_at(0, C);
  const View dov = View{tdout.raw(), dt, p.N, p.ld_o, p.ld_o}.cols_at(0, C);
  const View dfused{td.raw(), dt, p.N, dld, dld};
  const size_t fb = be.attention_scratch_bytes(p.B, p.T, p.H, p.hd, false);
  Tensor fs = scratch_tensor(be, fb);
  be.attention_forward(q, k, v, ov, view_of(tl), p.B, p.T, p.H, Scratch{fs.raw(), fs.nbytes()});
  const size_t bb = be.attention_scratch_bytes(p.B, p.T, p.H, p.hd, true);
  Tensor bs = scratch_tensor(be, bb);
  be.attention_backward(q, k, v, ov, dov, view_of(tl), dfused.cols_at(0, C), dfused.cols_at(C, C),
                        dfused.cols_at(2 * C, C), p.B, p.T, p.H, Scratch{bs.raw(), bs.nbytes()});
  const std::vector<float> o = download(be, to), d = download(be, td);
  return {cols_of(o, p.N, p.ld_o, 0, C), download(be, tl), cols_of(d, p.N, dld, 0, C), cols_of(d, p.N, dld, C, C),
          cols_of(d, p.N, dld, 2 * C, C)};
}

struct Tol {
  float o, lse, grad;
};

void check_full(const char* device, int hd, Tol tol) {
  Backend& be = backend_for(device);
  const bool bf16 = be.compute_dtype() == DType::BF16;
  for (int T : {1, 17, 64, 100, 129, 300}) {
    SCOPED_TRACE(std::string(device) + " hd " + std::to_string(hd) + " T " + std::to_string(T));
    const Problem p = make_problem(2, T, 3, hd, bf16, 1000 + 7 * T + hd);
    const Result ref = run_cpu(p), got = run_gpu(be, p);
    EXPECT_TRUE(all_close(got.o, ref.o, tol.o, tol.o)) << "o";
    EXPECT_TRUE(all_close(got.lse, ref.lse, tol.lse, tol.lse)) << "lse";
    EXPECT_TRUE(close_to_max(got.dq, ref.dq, tol.grad)) << "dq";
    EXPECT_TRUE(close_to_max(got.dk, ref.dk, tol.grad)) << "dk";
    EXPECT_TRUE(close_to_max(got.dv, ref.dv, tol.grad)) << "dv";
  }
}

// F32: o and lse within 1e-4 abs + rel; gradients within 1e-4 of their max magnitude.
constexpr Tol kF32Tol{1e-4f, 1e-4f, 1e-4f};
// BF16: outputs are bf16 (relative step 2^-8) and P, dS enter the tensor cores as bf16: o within
// 2e-2 abs + rel, lse (f32) within 1e-2, gradients within 5e-2 of their max magnitude.
constexpr Tol kBf16Tol{2e-2f, 1e-2f, 5e-2f};

TEST(CudaAttention, ForwardBackwardF32Hd64) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  check_full("cuda:fp32", 64, kF32Tol);
}
TEST(CudaAttention, ForwardBackwardF32Hd128) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  check_full("cuda:fp32", 128, kF32Tol);
}
TEST(CudaAttention, ForwardBackwardF32Hd40) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  check_full("cuda:fp32", 40, kF32Tol);
}
TEST(CudaAttention, ForwardBackwardBf16Hd64) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  check_full("cuda", 64, kBf16Tol);
}
TEST(CudaAttention, ForwardBackwardBf16Hd128) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  check_full("cuda", 128, kBf16Tol);
}
// A head size off the tensor-core path (the simple kernels in bf16).
TEST(CudaAttention, ForwardBackwardBf16Hd40) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  check_full("cuda", 40, kBf16Tol);
}

// Grouped-query attention (H query heads, Hkv key/value heads; query head h reads head
// h / (H / Hkv)) against the CPU backend: forward, backward (dk, dv summed over each group) and
// the cached path, on a fused (N, C + 2 KV) buffer.
void check_gqa(const char* device, int H, int Hkv, int hd, Tol tol) {
  Backend& be = backend_for(device);
  Backend& cpu = cpu_backend();
  const DType dt = be.compute_dtype();
  const bool bf16 = dt == DType::BF16;
  for (int T : {17, 129}) {
    SCOPED_TRACE(std::string(device) + " H " + std::to_string(H) + " Hkv " + std::to_string(Hkv) + " hd " +
                 std::to_string(hd) + " T " + std::to_string(T));
    const int B = 2, C = H * hd, KV = Hkv * hd;
    const int64_t N = (int64_t)B * T, ld = C + 2 * KV;
    std::vector<float> qkv = random_floats((size_t)(N * ld), 77 + T), dout = random_floats((size_t)(N * C), 78 + T);
    if (bf16) {
      for (auto& x : qkv) x = bf16_round(x);
      for (auto& x : dout) x = bf16_round(x);
    }
    // CPU reference.
    std::vector<float> o((size_t)(N * C)), lse((size_t)B * H * T), d((size_t)(N * ld));
    auto fs = cpu.alloc_shared(std::max<size_t>(cpu.attention_scratch_bytes(B, T, H, hd, true), 64));
    const Scratch cs{fs.get(), cpu.attention_scratch_bytes(B, T, H, hd, true)};
    cpu.attention_forward(mat(qkv.data(), N, C, ld), mat(qkv.data() + C, N, KV, ld), mat(qkv.data() + C + KV, N, KV, ld),
                          mat(o.data(), N, C), vec(lse.data(), (int64_t)lse.size()), B, T, H, cs);
    cpu.attention_backward(mat(qkv.data(), N, C, ld), mat(qkv.data() + C, N, KV, ld), mat(qkv.data() + C + KV, N, KV, ld),
                           mat(o.data(), N, C), mat(dout.data(), N, C), vec(lse.data(), (int64_t)lse.size()),
                           mat(d.data(), N, C, ld), mat(d.data() + C, N, KV, ld), mat(d.data() + C + KV, N, KV, ld), B,
                           T, H, cs);
    // The device.
    Tensor tqkv = upload(be, qkv, {N, ld}, dt), tdout = upload(be, dout, {N, (int64_t)C}, dt);
    Tensor to = be.zeros({N, (int64_t)C}, dt), tl = be.empty({(int64_t)B, (int64_t)H, (int64_t)T});
    Tensor td = be.zeros({N, ld}, dt);
    const View f{tqkv.raw(), dt, N, ld, ld}, fd{td.raw(), dt, N, ld, ld};
    const View ov{to.raw(), dt, N, C, C}, dov{tdout.raw(), dt, N, C, C};
    Tensor fsc = scratch_tensor(be, be.attention_scratch_bytes(B, T, H, hd, false));
    be.attention_forward(f.cols_at(0, C), f.cols_at(C, KV), f.cols_at(C + KV, KV), ov, view_of(tl), B, T, H,
                         Scratch{fsc.raw(), fsc.nbytes()});
    Tensor bsc = scratch_tensor(be, be.attention_scratch_bytes(B, T, H, hd, true));
    be.attention_backward(f.cols_at(0, C), f.cols_at(C, KV), f.cols_at(C + KV, KV), ov, dov, view_of(tl),
                          fd.cols_at(0, C), fd.cols_at(C, KV), fd.cols_at(C + KV, KV), B, T, H,
                          Scratch{bsc.raw(), bsc.nbytes()});
    const std::vector<float> go = download(be, to), gd = download(be, td);
    EXPECT_TRUE(all_close(go, o, tol.o, tol.o)) << "o";
    EXPECT_TRUE(all_close(download(be, tl), lse, tol.lse, tol.lse)) << "lse";
    EXPECT_TRUE(close_to_max(cols_of(gd, N, ld, 0, C), cols_of(d, N, ld, 0, C), tol.grad)) << "dq";
    EXPECT_TRUE(close_to_max(cols_of(gd, N, ld, C, KV), cols_of(d, N, ld, C, KV), tol.grad)) << "dk";
    EXPECT_TRUE(close_to_max(cols_of(gd, N, ld, C + KV, KV), cols_of(d, N, ld, C + KV, KV), tol.grad)) << "dv";
    // Cached: the last 5 queries of sequence 0 against its keys and values.
    const int m = 5;
    Tensor tc = be.zeros({(int64_t)m, (int64_t)C}, dt);
    Tensor csc = scratch_tensor(be, be.attention_cached_scratch_bytes(m, T, H, hd));
    be.attention_cached(f.cols_at(0, C).rows_at(T - m, m), f.cols_at(C, KV).rows_at(0, T),
                        f.cols_at(C + KV, KV).rows_at(0, T), View{tc.raw(), dt, m, C, C}, H,
                        Scratch{csc.raw(), csc.nbytes()});
    const std::vector<float> want(o.begin() + (size_t)(T - m) * C, o.begin() + (size_t)T * C);
    EXPECT_TRUE(all_close(download(be, tc), want, tol.o, tol.o)) << "cached";
  }
}

TEST(CudaAttention, GroupedQueryF32) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  check_gqa("cuda:fp32", 4, 2, 64, kF32Tol);
  check_gqa("cuda:fp32", 4, 1, 40, kF32Tol);
}
// hd 64 and 128: the tensor-core kernels; hd 40: the simple ones.
TEST(CudaAttention, GroupedQueryBf16) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  check_gqa("cuda", 4, 2, 64, kBf16Tol);
  check_gqa("cuda", 8, 2, 128, kBf16Tol);
  check_gqa("cuda", 4, 1, 40, kBf16Tol);
}

TEST(CudaAttention, RejectsMismatchedViews) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& be = backend_for("cuda:fp32");
  const int B = 1, T = 4, H = 2, hd = 8, C = H * hd;
  Tensor qkv = be.zeros({B * T, 3 * C}), o = be.zeros({B * T, C}), lse = be.zeros({B * H * T});
  const View f = view_of(qkv);
  Tensor small = be.zeros({(int64_t)B * H * T - 1});
  EXPECT_THROW(be.attention_forward(f.cols_at(0, C), f.cols_at(C, C), f.cols_at(2 * C, C), view_of(o),
                                    view_of(small), B, T, H, Scratch{}),
               Error);
  EXPECT_THROW(be.attention_forward(f.cols_at(0, C), f.cols_at(C, C), view_of(o), view_of(o), view_of(lse), B, T, H,
                                    Scratch{}),
               Error);
  EXPECT_THROW(be.attention_backward(f.cols_at(0, C), f.cols_at(C, C), f.cols_at(2 * C, C), view_of(o), view_of(o),
                                     view_of(lse), f.cols_at(0, C), f.cols_at(C, C), f.cols_at(2 * C, C), B, T, H,
                                     Scratch{}),
               Error)
      << "backward without scratch";
}

// ---- cached attention ---------------------------------------------------------------------
// One sequence of L rows in a fused (L, 3C + 8) buffer. Cached: q = its last m rows, k / v = all
// L rows of the k / v columns. Compared with the CPU cached kernel and with the last m rows of
// the device's own full forward over the L rows.
void check_cached(const char* device, int hd, int m, int L, float tol) {
  SCOPED_TRACE(std::string(device) + " hd " + std::to_string(hd) + " m " + std::to_string(m) + " L " +
               std::to_string(L));
  Backend& be = backend_for(device);
  const DType dt = be.compute_dtype();
  const int H = 3;
  const Problem p = make_problem(1, L, H, hd, dt == DType::BF16, 5000 + 13 * L + m + hd);
  const int64_t C = p.C;

  // CPU cached kernel.
  Backend& cpu = cpu_backend();
  std::vector<float> ref((size_t)(m * C));
  {
    const View q = mat(p.qkv.data() + (int64_t)(L - m) * p.ld, m, C, p.ld);
    const View k = mat(p.qkv.data() + C, L, C, p.ld), v = mat(p.qkv.data() + 2 * C, L, C, p.ld);
    const size_t sb = cpu.attention_cached_scratch_bytes(m, L, H, hd);
    auto s = cpu.alloc_shared(std::max<size_t>(sb, 64));
    cpu.attention_cached(q, k, v, mat(ref.data(), m, C), H, Scratch{s.get(), sb});
  }

  Tensor tqkv = upload(be, p.qkv, {p.N, p.ld}, dt);
  const View fused{tqkv.raw(), dt, p.N, p.ld, p.ld};
  const int64_t ldo = C + 8;
  Tensor tout = be.zeros({(int64_t)m, ldo}, dt);
  const View out = View{tout.raw(), dt, m, ldo, ldo}.cols_at(0, C);
  Tensor s = scratch_tensor(be, be.attention_cached_scratch_bytes(m, L, H, hd));
  be.attention_cached(fused.cols_at(0, C).rows_at(L - m, m), fused.cols_at(C, C), fused.cols_at(2 * C, C), out, H,
                      Scratch{s.raw(), s.nbytes()});
  const std::vector<float> got = cols_of(download(be, tout), m, ldo, 0, C);
  EXPECT_TRUE(all_close(got, ref, tol, tol)) << "vs the CPU cached kernel";

  // The device's full forward over all L rows; its last m rows.
  Tensor tfo = be.zeros({(int64_t)L, C}, dt);
  Tensor tl = be.empty({(int64_t)H, (int64_t)L});
  Tensor fs = scratch_tensor(be, be.attention_scratch_bytes(1, L, H, hd, false));
  be.attention_forward(fused.cols_at(0, C), fused.cols_at(C, C), fused.cols_at(2 * C, C), view_of(tfo), view_of(tl),
                       1, L, H, Scratch{fs.raw(), fs.nbytes()});
  const std::vector<float> full = download(be, tfo);
  const std::vector<float> last(full.end() - (int64_t)m * C, full.end());
  EXPECT_TRUE(all_close(got, last, tol, tol)) << "vs rows of the full forward";
}

TEST(CudaAttention, CachedF32) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  for (int hd : {64, 128})
    for (int L : {23, 700})
      for (int m : {1, 5}) check_cached("cuda:fp32", hd, m, L, 1e-4f);
  check_cached("cuda:fp32", 64, 100, 700, 1e-4f);
  check_cached("cuda:fp32", 40, 3, 300, 1e-4f);
}

// BF16: outputs bf16, so within 2e-2 abs + rel. m = 100 (>= 64) takes the tensor-core path with
// queries at positions 600..699, not aligned to its 64-row tiles.
TEST(CudaAttention, CachedBf16) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  for (int hd : {64, 128})
    for (int L : {23, 700})
      for (int m : {1, 5}) check_cached("cuda", hd, m, L, 2e-2f);
  check_cached("cuda", 64, 100, 700, 2e-2f);
  check_cached("cuda", 128, 100, 700, 2e-2f);
  check_cached("cuda", 128, 64, 64, 2e-2f);
  check_cached("cuda", 40, 3, 300, 2e-2f);
}

}  // namespace cuda_attention_tests
}  // namespace subllm::test
