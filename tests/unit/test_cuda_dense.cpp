// The CUDA backend's core against the CPU backend on the same inputs: memory and conversion,
// the linear layer (cuBLASLt) forward and backward, and the reductions and optimizers.
// Without a CUDA build or a usable GPU every test reports itself skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "cuda_test_util.h"
#include "subllm/error.h"
#include "test_util.h"
#ifdef SUBLLM_HAVE_CUDA
#include "kernels/cuda/cublaslt.h"
#endif

namespace subllm {
namespace cuda_dense_tests {

using test::all_close;
using test::bf16_round;
using test::download;
using test::download_as;
using test::from_bf16_bits;
using test::random_floats;
using test::to_bf16_bits;
using test::upload;

std::vector<float> rounded(std::vector<float> v) {
  for (auto& x : v) x = bf16_round(x);
  return v;
}
std::vector<float> rnd(size_t n, uint64_t seed, float scale, DType dt) {
  auto v = random_floats(n, seed, scale);
  return dt == DType::BF16 ? rounded(std::move(v)) : v;
}

// A rows x cols matrix on the GPU, dense or (strided) at column `off` of a (rows, ld) buffer
// whose other columns hold random padding that no op may touch.
struct DevMat {
  Tensor t;
  View v;
  std::vector<float> full;  // the whole buffer as uploaded (bf16-exact when BF16)
  int64_t rows = 0, cols = 0, ld = 0, off = 0;
};

DevMat dev_mat(Backend& be, const std::vector<float>& dense, int64_t rows, int64_t cols, DType dt, bool strided,
               uint64_t seed) {
  DevMat m;
  m.rows = rows;
  m.cols = cols;
  m.off = strided ? 8 : 0;
  m.ld = strided ? cols + 16 : cols;
  m.full = rnd((size_t)(rows * m.ld), seed, 3.0f, dt);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) m.full[(size_t)(r * m.ld + m.off + c)] = dense[(size_t)(r * cols + c)];
  m.t = upload(be, m.full, {rows, m.ld}, dt);
  m.v = View{static_cast<char*>(m.t.raw()) + m.off * (int64_t)dtype_size(dt), dt, rows, cols, m.ld};
  return m;
}

// The matrix part of a DevMat as dense floats; `padding_ok` says whether the rest is unchanged.
std::vector<float> read(Backend& be, const DevMat& m, bool* padding_ok = nullptr) {
  const std::vector<float> full = download(be, m.t);
  std::vector<float> out((size_t)(m.rows * m.cols));
  bool ok = true;
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.ld; ++c) {
      const size_t i = (size_t)(r * m.ld + c);
      if (c >= m.off && c < m.off + m.cols) out[(size_t)(r * m.cols + c - m.off)] = full[i];
      else if (std::memcmp(&full[i], &m.full[i], 4) != 0) ok = false;
    }
  if (padding_ok) *padding_ok = ok;
  return out;
}

::testing::AssertionResult doubles_close(const std::vector<double>& a, const std::vector<double>& b, double atol,
                                         double rtol) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  for (size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(a[i] - b[i]) <= atol + rtol * std::fabs(b[i])))
      return ::testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

template <class T>
Tensor upload_as(Backend& be, const std::vector<T>& host, DType dt) {
  Tensor t = be.empty({(int64_t)host.size()}, dt);
  be.to_device(t.raw(), host.data(), host.size() * sizeof(T));
  return t;
}

// ---- memory and conversion ----------------------------------------------------------------

TEST(CudaDense, ConvertRoundTripsMatchCpuBf16RoundingExactly) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  Backend& be = backend_for("cuda");
  const int64_t rows = 37, cols = 53;
  std::vector<float> x = random_floats((size_t)(rows * cols), 7, 10.0f);
  // Values that exercise the rounding: ties, denormals, signed zero, overflow to infinity.
  const float specials[] = {0.0f, -0.0f, 1e-40f, -3e-39f, 1.00390625f, 1.01171875f, -2.00781250f,
                            3.39e38f, -3.4e38f, std::numeric_limits<float>::infinity(), 65504.0f, 1e-20f};
  for (size_t i = 0; i < std::size(specials); ++i) x[i * 3] = specials[i];

  for (bool strided : {false, true}) {
    SCOPED_TRACE(strided ? "strided" : "dense");
    DevMat src = dev_mat(be, x, rows, cols, DType::F32, strided, 1);
    DevMat mid = dev_mat(be, std::vector<float>(x.size(), 0.f), rows, cols, DType::BF16, strided, 2);
    DevMat back = dev_mat(be, std::vector<float>(x.size(), 0.f), rows, cols, DType::F32, strided, 3);
    be.convert(src.v, mid.v);
    be.convert(mid.v, back.v);
    bool pad_mid = false, pad_back = false;
    const std::vector<float> m = read(be, mid, &pad_mid), b = read(be, back, &pad_back);
    EXPECT_TRUE(pad_mid);
    EXPECT_TRUE(pad_back);
    size_t bad = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const uint16_t want = to_bf16_bits(x[i]);
      if (to_bf16_bits(m[i]) != want) ++bad;  // m[i] is bf16-exact: its bits are the stored ones
      const float wf = from_bf16_bits(want);
      if (std::memcmp(&b[i], &wf, 4) != 0) ++bad;
    }
    EXPECT_EQ(bad, 0u);

    // Same dtype: a strided copy, exact.
    DevMat copy32 = dev_mat(be, std::vector<float>(x.size(), 0.f), rows, cols, DType::F32, strided, 4);
    be.convert(src.v, copy32.v);
    bool pad_copy = false;
    const std::vector<float> c = read(be, copy32, &pad_copy);
    EXPECT_TRUE(pad_copy);
    EXPECT_EQ(std::memcmp(c.data(), x.data(), x.size() * 4), 0);
    DevMat copy16 = dev_mat(be, std::vector<float>(x.size(), 0.f), rows, cols, DType::BF16, strided, 5);
    be.convert(mid.v, copy16.v);
    const std::vector<float> c16 = read(be, copy16);
    EXPECT_EQ(std::memcmp(c16.data(), m.data(), m.size() * 4), 0);
  }
  // NaN stays NaN.
  Tensor n32 = upload(be, {std::nanf(""), 1.0f}, {2});
  Tensor n16 = be.empty({2}, DType::BF16);
  be.convert(view_of(n32), view_of(n16));
  const auto got = download(be, n16);
  EXPECT_TRUE(std::isnan(got[0]));
  EXPECT_EQ(got[1], 1.0f);
  // Mismatched shapes are refused.
  Tensor a = be.zeros({3, 4}), b = be.zeros({4, 3}, DType::BF16);
  EXPECT_THROW(be.convert(view_of(a), view_of(b)), Error);
}

TEST(CudaDense, MemoryCopiesZeroAndOutOfMemory) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& be = backend_for("cuda:fp32");
  const std::vector<float> x = random_floats(1000, 3);
  Tensor a = upload(be, x, {1000});
  Tensor b = be.empty({1000});
  be.copy(b.raw(), a.raw(), 1000 * 4);
  EXPECT_EQ(download(be, b), x);
  be.zero(static_cast<float*>(b.raw()) + 100, 50 * 4);
  std::vector<float> want = x;
  for (int i = 100; i < 150; ++i) want[i] = 0.f;
  EXPECT_EQ(download(be, b), want);
  Tensor empty = be.empty({0});
  EXPECT_NE(empty.raw(), nullptr);
  // An impossible allocation is an Error that says what to do, and the backend still works.
  try {
    be.alloc(size_t(1) << 52);
    ADD_FAILURE() << "a 4 PiB allocation succeeded";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("out of GPU memory"), std::string::npos) << msg;
    EXPECT_NE(msg.find("reduce batch size"), std::string::npos) << msg;
  }
  be.copy(b.raw(), a.raw(), 1000 * 4);
  be.sync();
  EXPECT_EQ(download(be, b), x);
}

// ---- linear layer -------------------------------------------------------------------------

struct LinearCase {
  int N, in, out;
};
const LinearCase kCases[] = {{37, 53, 71}, {1, 5, 3}, {128, 64, 96}, {3, 200, 1}};

// The GPU's linear_forward against the CPU's on the same (bf16-exact when BF16) inputs.
void check_forward(const char* device, DType dt, const LinearCase& cs, bool strided, bool accumulate, float atol,
                   float rtol) {
  SCOPED_TRACE(std::string(device) + " " + std::to_string(cs.N) + "x" + std::to_string(cs.in) + "x" +
               std::to_string(cs.out) + (strided ? " strided" : " dense") + (accumulate ? " accumulate" : ""));
  Backend& be = backend_for(device);
  Backend& cpu = cpu_backend();
  const auto x = rnd((size_t)cs.N * cs.in, 11, 1.0f, dt);
  const auto w = rnd((size_t)cs.out * cs.in, 12, 0.2f, dt);
  const auto y0 = rnd((size_t)cs.N * cs.out, 13, 1.0f, dt);
  std::vector<float> y_ref = y0;
  cpu.linear_forward(mat(x.data(), cs.N, cs.in), mat(w.data(), cs.out, cs.in), mat(y_ref.data(), cs.N, cs.out),
                     accumulate);
  DevMat X = dev_mat(be, x, cs.N, cs.in, dt, strided, 21), W = dev_mat(be, w, cs.out, cs.in, dt, strided, 22);
  DevMat Y = dev_mat(be, y0, cs.N, cs.out, dt, strided, 23);
  be.linear_forward(X.v, W.v, Y.v, accumulate);
  bool pad = false;
  EXPECT_TRUE(all_close(read(be, Y, &pad), y_ref, atol, rtol));
  EXPECT_TRUE(pad);
}

// linear_backward: dx (dtype dt) and dw (F32, accumulated), or one of them alone.
void check_backward(const char* device, DType dt, const LinearCase& cs, bool strided, bool accumulate_dx,
                    bool want_dx, bool want_dw, float atol_dx, float rtol_dx, float atol_dw, float rtol_dw) {
  SCOPED_TRACE(std::string(device) + " " + std::to_string(cs.N) + "x" + std::to_string(cs.in) + "x" +
               std::to_string(cs.out) + (strided ? " strided" : " dense") + (accumulate_dx ? " accumulate_dx" : "") +
               (want_dx ? " dx" : "") + (want_dw ? " dw" : ""));
  Backend& be = backend_for(device);
  Backend& cpu = cpu_backend();
  const auto x = rnd((size_t)cs.N * cs.in, 31, 1.0f, dt);
  const auto w = rnd((size_t)cs.out * cs.in, 32, 0.2f, dt);
  const auto dy = rnd((size_t)cs.N * cs.out, 33, 1.0f, dt);
  const auto dx0 = rnd((size_t)cs.N * cs.in, 34, 1.0f, dt);
  const auto dw0 = rnd((size_t)cs.out * cs.in, 35, 1.0f, DType::F32);
  std::vector<float> dx_ref = dx0, dw_ref = dw0;
  cpu.linear_backward(mat(x.data(), cs.N, cs.in), mat(w.data(), cs.out, cs.in), mat(dy.data(), cs.N, cs.out),
                      want_dx ? mat(dx_ref.data(), cs.N, cs.in) : View{},
                      want_dw ? mat(dw_ref.data(), cs.out, cs.in) : View{}, accumulate_dx);
  DevMat X = dev_mat(be, x, cs.N, cs.in, dt, strided, 41), W = dev_mat(be, w, cs.out, cs.in, dt, strided, 42);
  DevMat DY = dev_mat(be, dy, cs.N, cs.out, dt, strided, 43);
  DevMat DX = dev_mat(be, dx0, cs.N, cs.in, dt, strided, 44);
  DevMat DW = dev_mat(be, dw0, cs.out, cs.in, DType::F32, strided, 45);
  be.linear_backward(X.v, W.v, DY.v, want_dx ? DX.v : View{}, want_dw ? DW.v : View{}, accumulate_dx);
  bool pad_dx = false, pad_dw = false;
  EXPECT_TRUE(all_close(read(be, DX, &pad_dx), dx_ref, atol_dx, rtol_dx)) << "dx";
  EXPECT_TRUE(all_close(read(be, DW, &pad_dw), dw_ref, atol_dw, rtol_dw)) << "dw";
  EXPECT_TRUE(pad_dx);
  EXPECT_TRUE(pad_dw);
}

// F32: pure fp32 accumulation (no TF32), so 1e-4 relative with a 1e-4 floor.
TEST(CudaDense, LinearForwardF32MatchesCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  for (const auto& cs : kCases)
    for (bool strided : {false, true})
      for (bool acc : {false, true}) check_forward("cuda:fp32", DType::F32, cs, strided, acc, 1e-4f, 1e-4f);
}

TEST(CudaDense, LinearBackwardF32MatchesCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  for (const auto& cs : kCases)
    for (bool strided : {false, true})
      for (bool acc : {false, true}) check_backward("cuda:fp32", DType::F32, cs, strided, acc, true, true, 1e-4f, 1e-4f, 1e-4f, 1e-4f);
  // One output at a time; the other is left alone.
  check_backward("cuda:fp32", DType::F32, kCases[0], false, false, true, false, 1e-4f, 1e-4f, 1e-4f, 1e-4f);
  check_backward("cuda:fp32", DType::F32, kCases[0], true, true, false, true, 1e-4f, 1e-4f, 1e-4f, 1e-4f);
}

// BF16: the inputs are bf16-exact on both sides and products accumulate in fp32; outputs of
// the compute dtype round to bf16 (half an ulp is 0.4 %): 2e-2 relative with a 1e-2 floor.
// dw is F32: 2e-3 relative with a 2e-3 floor.
TEST(CudaDense, LinearForwardBf16MatchesCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  for (const auto& cs : kCases)
    for (bool strided : {false, true})
      for (bool acc : {false, true}) check_forward("cuda", DType::BF16, cs, strided, acc, 1e-2f, 2e-2f);
}

TEST(CudaDense, LinearBackwardBf16MatchesCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  for (const auto& cs : kCases)
    for (bool strided : {false, true})
      for (bool acc : {false, true}) check_backward("cuda", DType::BF16, cs, strided, acc, true, true, 1e-2f, 2e-2f, 2e-3f, 2e-3f);
  check_backward("cuda", DType::BF16, kCases[0], false, false, true, false, 1e-2f, 2e-2f, 2e-3f, 2e-3f);
  check_backward("cuda", DType::BF16, kCases[0], true, true, false, true, 1e-2f, 2e-2f, 2e-3f, 2e-3f);
}

TEST(CudaDense, LinearRefusesBadShapesAndIgnoresEmptyBatches) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& be = backend_for("cuda:fp32");
  Tensor x = be.zeros({4, 8}), w = be.zeros({6, 8}), y = be.zeros({4, 5}), w16 = be.zeros({6, 8}, DType::BF16);
  EXPECT_THROW(be.linear_forward(view_of(x), view_of(w), view_of(y)), Error);
  Tensor y_ok = be.zeros({4, 6});
  EXPECT_THROW(be.linear_forward(view_of(x), view_of(w16), view_of(y_ok)), Error);
  Tensor dw16 = be.zeros({6, 8}, DType::BF16);
  EXPECT_THROW(be.linear_backward(view_of(x), view_of(w), view_of(y_ok), View{}, view_of(dw16)), Error);
  // N = 0: nothing to do.
  const View x0{x.raw(), DType::F32, 0, 8, 8}, y0{y_ok.raw(), DType::F32, 0, 6, 6};
  Tensor dw = be.zeros({6, 8});
  EXPECT_NO_THROW(be.linear_forward(x0, view_of(w), y0));
  EXPECT_NO_THROW(be.linear_backward(x0, view_of(w), y0, x0, view_of(dw)));
  be.sync();
  for (float v : download(be, dw)) EXPECT_EQ(v, 0.f);
}

// ---- reductions and optimizers ------------------------------------------------------------

TEST(CudaDense, ScaleAndSumSquaresMatchCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& be = backend_for("cuda:fp32");
  Backend& cpu = cpu_backend();
  for (size_t n : {size_t(1), size_t(1000), size_t(1000003)}) {
    SCOPED_TRACE(n);
    std::vector<float> x = random_floats(n, 50 + n, 2.0f);
    Tensor t = upload(be, x, {(int64_t)n});
    Tensor out = be.zeros({1}, DType::F64);
    be.sum_squares(view_of(t), view_of(out));
    double want_cpu = 0, exact = 0;
    cpu.sum_squares(vec(x.data(), (int64_t)n), dvec(&want_cpu, 1));
    for (float v : x) exact += (double)v * v;
    // The GPU sums in doubles: 1e-9 relative to a double sum; the CPU sums blocks of 4096 in
    // float: 1e-4 relative to it.
    const double got = download_as<double>(be, out)[0];
    EXPECT_NEAR(got, exact, 1e-9 * exact);
    EXPECT_NEAR(got, want_cpu, 1e-4 * want_cpu);
    // The same input gives the same bits.
    be.sum_squares(view_of(t), view_of(out));
    EXPECT_EQ(download_as<double>(be, out)[0], got);

    // Scaling: one float multiply per element on both sides, exact.
    be.scale(view_of(t), 0.731f);
    cpu.scale(vec(x.data(), (int64_t)n), 0.731f);
    EXPECT_EQ(download(be, t), x);
  }
  // Strided: only the view's elements.
  const int64_t rows = 37, cols = 53;
  const auto x = random_floats((size_t)(rows * cols), 9);
  DevMat m = dev_mat(be, x, rows, cols, DType::F32, true, 10);
  Tensor out = be.zeros({1}, DType::F64);
  be.sum_squares(m.v, view_of(out));
  double want = 0;
  for (float v : x) want += (double)v * v;
  EXPECT_NEAR(download_as<double>(be, out)[0], want, 1e-9 * want);
  be.scale(m.v, -1.5f);
  bool pad = false;
  const auto got = read(be, m, &pad);
  EXPECT_TRUE(pad);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(got[i], x[i] * -1.5f) << i;
}

TEST(CudaDense, AdamWStepMatchesCpuOverThreeSteps) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& be = backend_for("cuda:fp32");
  Backend& cpu = cpu_backend();
  const int64_t n = 10007;
  std::vector<float> p = random_floats((size_t)n, 60), m((size_t)n, 0.f), v((size_t)n, 0.f);
  Tensor P = upload(be, p, {n}), M = be.zeros({n}), V = be.zeros({n}), G = be.zeros({n});
  for (int step = 1; step <= 3; ++step) {
    const auto g = random_floats((size_t)n, 70 + step, 0.1f);
    be.to_device(G.raw(), g.data(), (size_t)n * 4);
    be.adamw_step(view_of(P), view_of(G), view_of(M), view_of(V), 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
    cpu.adamw_step(vec(p.data(), n), vec(g.data(), n), vec(m.data(), n), vec(v.data(), n), 3e-3f, 0.9f, 0.95f,
                   1e-8f, 0.1f, step);
  }
  // Elementwise float arithmetic in the CPU's order: 1e-5 relative, 1e-7 floor.
  EXPECT_TRUE(all_close(download(be, P), p, 1e-7f, 1e-5f)) << "p";
  EXPECT_TRUE(all_close(download(be, M), m, 1e-7f, 1e-5f)) << "m";
  EXPECT_TRUE(all_close(download(be, V), v, 1e-9f, 1e-5f)) << "v";
  EXPECT_THROW(be.adamw_step(view_of(P), view_of(G), view_of(M), view_of(V), 1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 0),
               Error);
}

// A chunk layout as ScaledAdam makes it (4096-element chunks, never spanning two tensors),
// over tensors of these sizes laid out back to back; one more tensor index has no chunks.
struct ChunkLayout {
  std::vector<int64_t> numel = {1, 5000, 4096, 9000, 1, 300, 12289};
  int n_tensors = 8;
  int64_t total = 0;
  std::vector<int32_t> tensor;
  std::vector<int64_t> begin, end;
  std::vector<uint8_t> clamp;
  ChunkLayout() {
    for (size_t t = 0; t < numel.size(); ++t) {
      for (int64_t b = total; b < total + numel[t]; b += 4096) {
        tensor.push_back((int32_t)t);
        begin.push_back(b);
        end.push_back(std::min(b + 4096, total + numel[t]));
      }
      clamp.push_back(numel[t] == 1 ? 1 : 0);
      total += numel[t];
    }
    clamp.push_back(0);  // the tensor without chunks
  }
  Backend::Chunks host() {
    const int64_t n = (int64_t)tensor.size();
    return {View{tensor.data(), DType::I32, n, 1, 1}, View{begin.data(), DType::I64, n, 1, 1},
            View{end.data(), DType::I64, n, 1, 1}};
  }
};

struct DevChunks {
  Tensor tensor, begin, end;
  Backend::Chunks views() const { return {view_of(tensor), view_of(begin), view_of(end)}; }
};
DevChunks upload_chunks(Backend& be, const ChunkLayout& l) {
  return {upload_as(be, l.tensor, DType::I32), upload_as(be, l.begin, DType::I64), upload_as(be, l.end, DType::I64)};
}

TEST(CudaDense, ScaledAdamChunkSumsMatchCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& be = backend_for("cuda:fp32");
  Backend& cpu = cpu_backend();
  ChunkLayout l;
  const auto p = random_floats((size_t)l.total, 80), g = random_floats((size_t)l.total, 81, 0.01f);
  Tensor P = upload(be, p, {l.total}), G = upload(be, g, {l.total});
  DevChunks dc = upload_chunks(be, l);
  const int nc = (int)l.tensor.size();
  Tensor scratch = be.zeros({(int64_t)be.optim_sums_scratch_bytes(nc)}, DType::U8);
  std::vector<double> cpu_scratch(cpu.optim_sums_scratch_bytes(nc) / sizeof(double));
  for (bool want_param_sq : {true, false}) {
    SCOPED_TRACE(want_param_sq);
    Tensor out = be.empty({l.n_tensors, 3}, DType::F64);
    std::vector<double> want((size_t)l.n_tensors * 3, -1.0);
    be.optim_chunk_sums(view_of(P), view_of(G), dc.views(), l.n_tensors, want_param_sq, view_of(out),
                        scratch_of(scratch));
    cpu.optim_chunk_sums(vec(p.data(), l.total), vec(g.data(), l.total), l.host(), l.n_tensors, want_param_sq,
                         View{want.data(), DType::F64, l.n_tensors, 3, 3},
                         Scratch{cpu_scratch.data(), cpu_scratch.size() * sizeof(double)});
    const auto got = download_as<double>(be, out);
    // Double sums in another order: 1e-10 relative, 1e-12 floor.
    EXPECT_TRUE(doubles_close(got, want, 1e-12, 1e-10));
    for (int j = 0; j < 3; ++j) EXPECT_EQ(got[(size_t)(l.n_tensors - 1) * 3 + j], 0.0);  // no chunks
    if (!want_param_sq) {
      for (int t = 0; t < l.n_tensors; ++t) EXPECT_EQ(got[(size_t)t * 3 + 2], 0.0);
    }
    // Deterministic: the same bits again.
    be.optim_chunk_sums(view_of(P), view_of(G), dc.views(), l.n_tensors, want_param_sq, view_of(out),
                        scratch_of(scratch));
    EXPECT_EQ(download_as<double>(be, out), got);
  }
  // Too little scratch is refused.
  Tensor out = be.empty({l.n_tensors, 3}, DType::F64);
  EXPECT_THROW(be.optim_chunk_sums(view_of(P), view_of(G), dc.views(), l.n_tensors, true, view_of(out),
                                   Scratch{scratch.raw(), 8}),
               Error);
}

TEST(CudaDense, ScaledAdamScaleChunksMatchesCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& be = backend_for("cuda:fp32");
  Backend& cpu = cpu_backend();
  ChunkLayout l;
  std::vector<float> g = random_floats((size_t)l.total, 90);
  g[3] = std::numeric_limits<float>::infinity();
  g[5000] = std::nanf("");
  Tensor G = upload(be, g, {l.total});
  DevChunks dc = upload_chunks(be, l);
  be.optim_scale_chunks(view_of(G), dc.views(), 0.37f);
  cpu.optim_scale_chunks(vec(g.data(), l.total), l.host(), 0.37f);
  const auto got = download(be, G);
  for (size_t i = 0; i < g.size(); ++i)
    if (!std::isnan(g[i])) {
      ASSERT_EQ(got[i], g[i]) << i;  // one multiply: exact
    }
  EXPECT_TRUE(std::isnan(got[5000]));
  // Factor 0 writes exact zeros, even over Inf and NaN.
  be.optim_scale_chunks(view_of(G), dc.views(), 0.f);
  for (float v : download(be, G)) ASSERT_EQ(v, 0.f);
}

TEST(CudaDense, ScaledAdamUpdateMatchesCpuOverThreeSteps) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& be = backend_for("cuda:fp32");
  Backend& cpu = cpu_backend();
  ChunkLayout l;
  std::vector<float> p = random_floats((size_t)l.total, 100, 0.5f), v((size_t)l.total, 0.f), m((size_t)l.total, 0.f);
  // The scalar tensors start outside [-clamp_max, clamp_max] and are clamped back.
  p[0] = 0.6f;
  p[(size_t)(1 + 5000 + 4096 + 9000)] = -0.7f;
  Tensor P = upload(be, p, {l.total}), V = be.zeros({l.total}), M = be.zeros({l.total}), G = be.zeros({l.total});
  DevChunks dc = upload_chunks(be, l);
  std::vector<float> step_coef, scale_step;
  for (int t = 0; t < l.n_tensors; ++t) {
    step_coef.push_back(-1e-2f * (1.0f + 0.5f * (float)t));
    scale_step.push_back(t % 3 == 1 ? 0.01f * (float)t : (t % 3 == 2 ? -0.005f : 0.0f));
  }
  Tensor SC = upload(be, step_coef, {l.n_tensors}), SS = upload(be, scale_step, {l.n_tensors});
  Tensor CL = upload_as(be, l.clamp, DType::U8);
  const float b1 = 0.9f, b2 = 0.98f, eps = 1e-8f, clamp_max = 0.5f;
  for (int s = 0; s < 3; ++s) {
    const auto g = random_floats((size_t)l.total, 110 + s, 0.3f);
    be.to_device(G.raw(), g.data(), g.size() * 4);
    const float inv_bc2 = (float)(1.0 / (1.0 - std::pow((double)b2, s + 1)));
    be.scaled_adam_update(view_of(P), view_of(G), view_of(V), view_of(M), dc.views(), view_of(SC), view_of(SS),
                          view_of(CL), clamp_max, inv_bc2, b1, 1.0f - b1, b2, 1.0f - b2, eps);
    cpu.scaled_adam_update(vec(p.data(), l.total), vec(g.data(), l.total), vec(v.data(), l.total),
                           vec(m.data(), l.total), l.host(), vec(step_coef.data(), l.n_tensors),
                           vec(scale_step.data(), l.n_tensors), View{l.clamp.data(), DType::U8, l.n_tensors, 1, 1},
                           clamp_max, inv_bc2, b1, 1.0f - b1, b2, 1.0f - b2, eps);
  }
  // Elementwise float arithmetic in the CPU's order: 1e-5 relative with small floors.
  const auto gp = download(be, P);
  EXPECT_TRUE(all_close(gp, p, 1e-7f, 1e-5f)) << "p";
  EXPECT_TRUE(all_close(download(be, V), v, 1e-10f, 1e-5f)) << "v";
  EXPECT_TRUE(all_close(download(be, M), m, 1e-8f, 1e-5f)) << "m";
  EXPECT_LE(std::fabs(gp[0]), clamp_max);
  EXPECT_LE(std::fabs(gp[(size_t)(1 + 5000 + 4096 + 9000)]), clamp_max);
}

// cuBLASLt (over 500 MB) is loaded by the CUDA backend when it first needs it, not by every
// process at start: the CLI's start, as the dynamic loader lists it, does not name it. Loading
// needs the library only, no GPU, so every function the backend calls resolves here.
TEST(CudaLibraries, CublasLtLoadsAtFirstUseNotAtStart) {
#ifndef SUBLLM_HAVE_CUDA
  GTEST_SKIP() << "this build has no CUDA backend";
#else
  ::setenv("LD_DEBUG", "files", 1);
  const testing::CliResult r = testing::run_cli({"--help"});
  ::unsetenv("LD_DEBUG");
  EXPECT_EQ(r.code, 0) << r.output;
  ASSERT_NE(r.output.find("libcudart"), std::string::npos) << "the loader's listing names what the CLI loads:\n"
                                                           << r.output;
  EXPECT_EQ(r.output.find("libcublasLt"), std::string::npos) << r.output;
  // A resolved function answers as the library does: a text of its own for each status.
  const CublasLt& lt = cublaslt();
  const std::string success = lt.GetStatusString(CUBLAS_STATUS_SUCCESS);
  const std::string unsupported = lt.GetStatusString(CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_FALSE(unsupported.empty());
  EXPECT_NE(unsupported, success);
  EXPECT_NE(unsupported.find("not supported"), std::string::npos) << unsupported;
#endif
}

}  // namespace cuda_dense_tests
}  // namespace subllm
