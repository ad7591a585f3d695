// The CUDA backend's row movement (rows.cu) and embedding, RMSNorm, RoPE and SwiGLU kernels
// (elementwise.cu) against the CPU backend on the same random inputs, in both compute dtypes:
// "cuda:fp32" (F32, tight tolerances) and "cuda" (BF16: inputs rounded to bf16 for the CPU side,
// bf16 outputs compared at ~1e-2 relative). Odd sizes (N = 37, C = 96, 100, 37, F = 72, 75) reach
// both the 16-byte vector and the scalar paths; strided views (ld > cols, column offsets) where
// the CPU op supports them. Each test is skipped without a CUDA build or a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "backend/backend.h"
#include "cuda_test_util.h"
#include "subllm/error.h"
#include "subllm/rng.h"

namespace subllm {
namespace cuda_elementwise_tests {

using test::all_close;
using test::bf16_round;
using test::download;
using test::download_as;
using test::OwnedScratch;
using test::random_floats;
using test::random_ints;
using test::upload;
using test::upload_i32;

// v with every element rounded to bf16 when bf: the values a BF16 input really holds.
std::vector<float> rounded(std::vector<float> v, bool bf) {
  if (bf)
    for (float& x : v) x = bf16_round(x);
  return v;
}

// The first n of a random permutation of [0, m): row indices without repeats.
std::vector<int32_t> random_distinct(size_t n, int32_t m, uint64_t seed) {
  std::vector<int32_t> p((size_t)m);
  std::iota(p.begin(), p.end(), 0);
  Rng rng(seed);
  for (size_t i = p.size(); i > 1; --i) std::swap(p[i - 1], p[(size_t)rng.below(i)]);
  p.resize(n);
  return p;
}

// Columns [off, off + cols) of a (rows, ld) tensor.
View sub(const Tensor& t, int64_t off, int64_t cols) { return view_of(t).cols_at(off, cols); }

// ---- rows -------------------------------------------------------------------------------------

// Gather of compute-dtype rows and of int32 rows, dense and strided: an exact copy; dst
// columns outside the view stay as they were.
CUDA_TEST_BOTH(CudaRows, GatherRowsIsAnExactStridedCopy) {
  const bool bf = dt == DType::BF16;
  const int64_t R = 50, n = 37;
  const std::vector<int32_t> idx = random_ints(n, (int32_t)R, 11);  // repeats allowed
  Tensor idx_d = upload_i32(gpu, idx);
  for (int64_t cols : {37, 96, 100})
    for (int64_t pad : {0, 3}) {
      SCOPED_TRACE(::testing::Message() << "cols " << cols << " pad " << pad);
      const int64_t lds = cols + pad, ldd = cols + 2 * pad, off = pad ? 1 : 0;
      // compute dtype
      const std::vector<float> src = rounded(random_floats((size_t)(R * lds), 1), bf);
      const std::vector<float> dst0 = rounded(random_floats((size_t)(n * ldd), 2), bf);
      Tensor s = upload(gpu, src, {R, lds}, dt), d = upload(gpu, dst0, {n, ldd}, dt);
      gpu.gather_rows(sub(s, off, cols), view_of(idx_d), sub(d, off, cols));
      std::vector<float> want = dst0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < cols; ++c) want[(size_t)(i * ldd + off + c)] = src[(size_t)(idx[(size_t)i] * lds + off + c)];
      EXPECT_EQ(download(gpu, d), want);
      // int32 values
      std::vector<int32_t> isrc((size_t)(R * lds)), idst0((size_t)(n * ldd), -7);
      std::iota(isrc.begin(), isrc.end(), 1000);
      Tensor si = upload_i32(gpu, isrc), di = upload_i32(gpu, idst0);
      const View vsi{si.raw(), DType::I32, R, lds, lds}, vdi{di.raw(), DType::I32, n, ldd, ldd};
      gpu.gather_rows(vsi.cols_at(off, cols), view_of(idx_d), vdi.cols_at(off, cols));
      std::vector<int32_t> iwant = idst0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < cols; ++c)
          iwant[(size_t)(i * ldd + off + c)] = isrc[(size_t)(idx[(size_t)i] * lds + off + c)];
      EXPECT_EQ(download_as<int32_t>(gpu, di), iwant);
    }
}

// dst(idx[i]) += src(i) with distinct idx, strided, against the CPU backend.
CUDA_TEST_BOTH(CudaRows, ScatterAddRowsMatchesCpu) {
  const bool bf = dt == DType::BF16;
  Backend& cpu = cpu_backend();
  const int64_t R = 50, n = 37;
  const std::vector<int32_t> idx = random_distinct(n, (int32_t)R, 21);
  Tensor idx_d = upload_i32(gpu, idx), idx_c = upload_i32(cpu, idx);
  for (int64_t cols : {37, 96, 100}) {
    SCOPED_TRACE(::testing::Message() << "cols " << cols);
    const int64_t lds = cols + 5, ldd = cols + 3;
    const std::vector<float> src = rounded(random_floats((size_t)(n * lds), 3), bf);
    const std::vector<float> dst0 = rounded(random_floats((size_t)(R * ldd), 4), bf);
    Tensor sg = upload(gpu, src, {n, lds}, dt), dg = upload(gpu, dst0, {R, ldd}, dt);
    Tensor sc = upload(cpu, src, {n, lds}), dc = upload(cpu, dst0, {R, ldd});
    gpu.scatter_add_rows(sub(sg, 2, cols), view_of(idx_d), sub(dg, 1, cols));
    cpu.scatter_add_rows(sub(sc, 2, cols), view_of(idx_c), sub(dc, 1, cols));
    // F32: one float addition, exact; BF16: the sum rounded to bf16.
    EXPECT_TRUE(bf ? all_close(download(gpu, dg), download(cpu, dc), 1e-3f, 1e-2f)
                   : all_close(download(gpu, dg), download(cpu, dc), 1e-7f, 1e-7f));
  }
}

CUDA_TEST_BOTH(CudaRows, CopyRowsIsAnExactStridedCopy) {
  const bool bf = dt == DType::BF16;
  const int64_t rows = 37;
  for (int64_t cols : {37, 96, 100})
    for (int64_t pad : {0, 4}) {
      SCOPED_TRACE(::testing::Message() << "cols " << cols << " pad " << pad);
      const int64_t lds = cols + pad, ldd = cols + 2 * pad, off = pad ? 3 : 0;
      const std::vector<float> src = rounded(random_floats((size_t)(rows * lds), 5), bf);
      const std::vector<float> dst0 = rounded(random_floats((size_t)(rows * ldd), 6), bf);
      Tensor s = upload(gpu, src, {rows, lds}, dt), d = upload(gpu, dst0, {rows, ldd}, dt);
      gpu.copy_rows(sub(s, off, cols), sub(d, off, cols));
      std::vector<float> want = dst0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) want[(size_t)(r * ldd + off + c)] = src[(size_t)(r * lds + off + c)];
      EXPECT_EQ(download(gpu, d), want);
      // The KV-cache use: k columns of a fused qkv block into rows of a cache.
      std::vector<int32_t> isrc((size_t)(rows * lds));
      std::iota(isrc.begin(), isrc.end(), -500);
      Tensor si = upload_i32(gpu, isrc), di = upload_i32(gpu, std::vector<int32_t>((size_t)(rows * ldd), 9));
      const View vsi{si.raw(), DType::I32, rows, lds, lds}, vdi{di.raw(), DType::I32, rows, ldd, ldd};
      gpu.copy_rows(vsi.cols_at(off, cols), vdi.cols_at(0, cols));
      std::vector<int32_t> iwant((size_t)(rows * ldd), 9);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) iwant[(size_t)(r * ldd + c)] = isrc[(size_t)(r * lds + off + c)];
      EXPECT_EQ(download_as<int32_t>(gpu, di), iwant);
    }
}

CUDA_TEST_BOTH(CudaRows, FillPositions) {
  (void)dt;
  const int B = 3, T = 37, offset = 5;
  Tensor pos = gpu.empty({(int64_t)B * T}, DType::I32);
  gpu.fill_positions(view_of(pos), B, T, offset);
  std::vector<int32_t> want((size_t)B * T);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) want[(size_t)(b * T + t)] = offset + t;
  EXPECT_EQ(download_as<int32_t>(gpu, pos), want);
}

TEST(CudaRows, RejectsMismatchedViews) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  Tensor f = gpu.zeros({8, 4}), b = gpu.zeros({8, 4}, DType::BF16), i = gpu.zeros({8}, DType::I32);
  Tensor d = gpu.zeros({8, 4}, DType::F64);
  EXPECT_THROW(gpu.gather_rows(view_of(f), view_of(i), view_of(b)), Error);        // dtypes differ
  EXPECT_THROW(gpu.gather_rows(view_of(d), view_of(i), view_of(d)), Error);        // 8-byte elements
  EXPECT_THROW(gpu.gather_rows(view_of(f), view_of(f).cols_at(0, 1), view_of(f)), Error);  // F32 indices
  EXPECT_THROW(gpu.gather_rows(view_of(f), view_of(i).rows_at(0, 5), view_of(f)), Error);  // 5 indices, 8 rows
  EXPECT_THROW(gpu.scatter_add_rows(view_of(i), view_of(i), view_of(i)), Error);   // int32 data
  EXPECT_THROW(gpu.copy_rows(view_of(f), view_of(f).cols_at(0, 3)), Error);        // shapes differ
  EXPECT_THROW(gpu.fill_positions(view_of(i), 3, 3, 0), Error);                    // 8 entries, B*T = 9
  gpu.sync();
}

// ---- embedding ----------------------------------------------------------------------------------

CUDA_TEST_BOTH(CudaElementwise, EmbeddingForwardGathersRows) {
  const bool bf = dt == DType::BF16;
  const int64_t V = 50, N = 37;
  const std::vector<int32_t> tok = random_ints(N, (int32_t)V, 31);
  Tensor tok_d = upload_i32(gpu, tok);
  for (int64_t C : {96, 100}) {
    SCOPED_TRACE(::testing::Message() << "C " << C);
    const std::vector<float> table = random_floats((size_t)(V * C), 7);
    const std::vector<float> tr = rounded(table, bf);
    Tensor t = upload(gpu, tr, {V, C}, dt), out = gpu.empty({N, C}, dt);
    gpu.embedding_forward(view_of(tok_d), view_of(t), view_of(out));
    std::vector<float> want((size_t)(N * C));
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < C; ++c) want[(size_t)(i * C + c)] = tr[(size_t)(tok[(size_t)i] * C + c)];
    EXPECT_EQ(download(gpu, out), want);
    // Across dtypes (the converting kernel): an F32 table into BF16 rows, a BF16 table into F32 rows.
    Tensor t32 = upload(gpu, table, {V, C}), out2 = gpu.empty({N, C}, DType::BF16);
    Tensor tb = upload(gpu, table, {V, C}, DType::BF16), out3 = gpu.empty({N, C}, DType::F32);
    gpu.embedding_forward(view_of(tok_d), view_of(t32), view_of(out2));
    gpu.embedding_forward(view_of(tok_d), view_of(tb), view_of(out3));
    std::vector<float> want2((size_t)(N * C));
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < C; ++c) want2[(size_t)(i * C + c)] = bf16_round(table[(size_t)(tok[(size_t)i] * C + c)]);
    EXPECT_EQ(download(gpu, out2), want2);
    EXPECT_EQ(download(gpu, out3), want2);
  }
}

// Repeated tokens accumulate into one dtable row (float atomics: order-dependent rounding only).
CUDA_TEST_BOTH(CudaElementwise, EmbeddingBackwardAccumulatesRepeatedTokens) {
  const bool bf = dt == DType::BF16;
  Backend& cpu = cpu_backend();
  const int64_t V = 7, N = 37;  // each token ~5 times
  const std::vector<int32_t> tok = random_ints(N, (int32_t)V, 41);
  Tensor tok_d = upload_i32(gpu, tok), tok_c = upload_i32(cpu, tok);
  for (int64_t C : {96, 100}) {
    SCOPED_TRACE(::testing::Message() << "C " << C);
    const std::vector<float> dout = rounded(random_floats((size_t)(N * C), 8), bf);
    const std::vector<float> dt0 = random_floats((size_t)(V * C), 9);
    Tensor dg = upload(gpu, dout, {N, C}, dt), tg = upload(gpu, dt0, {V, C});
    Tensor dc = upload(cpu, dout, {N, C}), tc = upload(cpu, dt0, {V, C});
    gpu.embedding_backward(view_of(tok_d), view_of(dg), view_of(tg));
    cpu.embedding_backward(view_of(tok_c), view_of(dc), view_of(tc));
    EXPECT_TRUE(all_close(download(gpu, tg), download(cpu, tc), 1e-5f, 1e-5f));  // F32 sums of ~6 terms
  }
}

// ---- RMSNorm ------------------------------------------------------------------------------------

CUDA_TEST_BOTH(CudaElementwise, RmsnormForwardMatchesCpu) {
  const bool bf = dt == DType::BF16;
  Backend& cpu = cpu_backend();
  const int64_t N = 37;
  const float eps = 1e-5f;
  for (int64_t C : {96, 100, 37})
    for (int64_t pad : {0, 8})
      for (DType gdt : {dt, DType::F32}) {
        SCOPED_TRACE(::testing::Message() << "C " << C << " pad " << pad << " g " << dtype_name(gdt));
        const int64_t ld = C + pad;
        const std::vector<float> x = rounded(random_floats((size_t)(N * ld), 10, 2.0f), bf);
        const std::vector<float> g = rounded(random_floats((size_t)C, 11), bf || gdt == DType::BF16);
        // The GPU reads a strided view when pad > 0; the CPU kernel takes dense rows.
        std::vector<float> xd((size_t)(N * C));
        for (int64_t r = 0; r < N; ++r)
          for (int64_t c = 0; c < C; ++c) xd[(size_t)(r * C + c)] = x[(size_t)(r * ld + pad / 2 + c)];
        Tensor xg = upload(gpu, x, {N, ld}, dt), gg = upload(gpu, g, {C}, gdt), yg = gpu.empty({N, C}, dt),
               rg = gpu.empty({N});
        Tensor xc = upload(cpu, xd, {N, C}), gc = upload(cpu, g, {C}), yc = cpu.empty({N, C}), rc = cpu.empty({N});
        gpu.rmsnorm_forward(sub(xg, pad / 2, C), view_of(gg), view_of(yg), view_of(rg), eps);
        cpu.rmsnorm_forward(view_of(xc), view_of(gc), view_of(yc), view_of(rc), eps);
        EXPECT_TRUE(all_close(download(gpu, rg), download(cpu, rc), 1e-7f, 1e-5f));
        EXPECT_TRUE(bf ? all_close(download(gpu, yg), download(cpu, yc), 1e-3f, 1e-2f)
                       : all_close(download(gpu, yg), download(cpu, yc), 1e-6f, 1e-5f));
      }
}

CUDA_TEST_BOTH(CudaElementwise, RmsnormBackwardMatchesCpu) {
  const bool bf = dt == DType::BF16;
  Backend& cpu = cpu_backend();
  const float eps = 1e-5f;
  for (int64_t N : {37, 600})  // 600 rows: several rows per dg row-block
    for (int64_t C : {96, 100, 37})
      for (bool acc : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "N " << N << " C " << C << " accumulate " << acc);
        const std::vector<float> x = rounded(random_floats((size_t)(N * C), 12, 2.0f), bf);
        const std::vector<float> g = rounded(random_floats((size_t)C, 13), bf);
        const std::vector<float> dy = rounded(random_floats((size_t)(N * C), 14), bf);
        const std::vector<float> dx0 = rounded(random_floats((size_t)(N * C), 15), bf);
        const std::vector<float> dg0 = random_floats((size_t)C, 16);
        Tensor xc = upload(cpu, x, {N, C}), gc = upload(cpu, g, {C}), dyc = upload(cpu, dy, {N, C});
        Tensor dxc = upload(cpu, dx0, {N, C}), dgc = upload(cpu, dg0, {C}), rc = cpu.empty({N}), yc = cpu.empty({N, C});
        cpu.rmsnorm_forward(view_of(xc), view_of(gc), view_of(yc), view_of(rc), eps);
        const std::vector<float> rstd = download(cpu, rc);
        OwnedScratch sc(cpu, cpu.rmsnorm_scratch_bytes((int)C));
        cpu.rmsnorm_backward(view_of(xc), view_of(gc), view_of(rc), view_of(dyc), view_of(dxc), view_of(dgc), acc, sc.s);

        Tensor xg = upload(gpu, x, {N, C}, dt), gg = upload(gpu, g, {C}, dt), dyg = upload(gpu, dy, {N, C}, dt);
        Tensor dxg = upload(gpu, dx0, {N, C}, dt), dgg = upload(gpu, dg0, {C}), rg = upload(gpu, rstd, {N});
        OwnedScratch sg(gpu, gpu.rmsnorm_scratch_bytes((int)C));
        gpu.rmsnorm_backward(view_of(xg), view_of(gg), view_of(rg), view_of(dyg), view_of(dxg), view_of(dgg), acc, sg.s);
        const std::vector<float> dx_gpu = download(gpu, dxg), dg_gpu = download(gpu, dgg);
        EXPECT_TRUE(bf ? all_close(dx_gpu, download(cpu, dxc), 2e-3f, 1e-2f)
                       : all_close(dx_gpu, download(cpu, dxc), 1e-5f, 1e-4f));
        EXPECT_TRUE(all_close(dg_gpu, download(cpu, dgc), 2e-4f, 1e-4f));  // F32 either way

        // Deterministic: the same call again gives the same bits.
        Tensor dxg2 = upload(gpu, dx0, {N, C}, dt), dgg2 = upload(gpu, dg0, {C});
        gpu.rmsnorm_backward(view_of(xg), view_of(gg), view_of(rg), view_of(dyg), view_of(dxg2), view_of(dgg2), acc,
                             sg.s);
        EXPECT_EQ(download(gpu, dxg2), dx_gpu);
        EXPECT_EQ(download(gpu, dgg2), dg_gpu);
        // dx may be dy itself (overwriting): the same dx and dg.
        if (!acc) {
          Tensor dyg3 = upload(gpu, dy, {N, C}, dt), dgg3 = upload(gpu, dg0, {C});
          gpu.rmsnorm_backward(view_of(xg), view_of(gg), view_of(rg), view_of(dyg3), view_of(dyg3), view_of(dgg3),
                               false, sg.s);
          EXPECT_EQ(download(gpu, dyg3), dx_gpu);
          EXPECT_EQ(download(gpu, dgg3), dg_gpu);
        }
      }
}

TEST(CudaElementwise, RmsnormBackwardRefusesSmallScratch) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  Backend& gpu = backend_for("cuda:fp32");
  const int64_t N = 4, C = 8;
  Tensor x = gpu.zeros({N, C}), g = gpu.zeros({C}), r = gpu.zeros({N}), dy = gpu.zeros({N, C}), dx = gpu.zeros({N, C});
  Tensor dg = gpu.zeros({C});
  OwnedScratch s(gpu, gpu.rmsnorm_scratch_bytes((int)C) / 2);
  EXPECT_THROW(gpu.rmsnorm_backward(view_of(x), view_of(g), view_of(r), view_of(dy), view_of(dx), view_of(dg), false, s.s),
               Error);
  Tensor gi = gpu.zeros({C}, DType::I32);
  EXPECT_THROW(gpu.rmsnorm_forward(view_of(x), view_of(gi), view_of(dx), view_of(r), 1e-5f), Error);
  gpu.sync();
}

// ---- RoPE -----------------------------------------------------------------------------------------

CUDA_TEST_BOTH(CudaElementwise, RopeTableMatchesCpu) {
  (void)dt;
  Backend& cpu = cpu_backend();
  struct Case { int hd; float base; int64_t max_pos; };
  for (const Case& k : {Case{32, 10000.0f, 70}, Case{64, 500000.0f, 300}, Case{20, 10000.0f, 37}}) {
    SCOPED_TRACE(::testing::Message() << "head_dim " << k.hd << " base " << k.base);
    const int64_t half = k.hd / 2;
    Tensor cg = gpu.empty({k.max_pos, half}), sg = gpu.empty({k.max_pos, half});
    Tensor cc = cpu.empty({k.max_pos, half}), sc = cpu.empty({k.max_pos, half});
    gpu.rope_table(view_of(cg), view_of(sg), k.hd, k.base);
    cpu.rope_table(view_of(cc), view_of(sc), k.hd, k.base);
    EXPECT_TRUE(all_close(download(gpu, cg), download(cpu, cc), 1e-6f, 0.f));
    EXPECT_TRUE(all_close(download(gpu, sg), download(cpu, sc), 1e-6f, 0.f));
  }
}

// q and k column views of a fused qkv block (as the model rotates them), forward against the
// CPU, v untouched; the inverse rotation undoes the forward.
CUDA_TEST_BOTH(CudaElementwise, RopeApplyOnQkvColumnViews) {
  const bool bf = dt == DType::BF16;
  Backend& cpu = cpu_backend();
  const int64_t N = 37, max_pos = 70;
  struct Case { int H, hd; };
  for (const Case& k : {Case{3, 32}, Case{6, 16}, Case{5, 20}}) {
    const int64_t C = (int64_t)k.H * k.hd, half = k.hd / 2;
    SCOPED_TRACE(::testing::Message() << "H " << k.H << " head_dim " << k.hd);
    Tensor cc = cpu.empty({max_pos, half}), sc = cpu.empty({max_pos, half});
    cpu.rope_table(view_of(cc), view_of(sc), k.hd, 10000.0f);
    Tensor cg = upload(gpu, download(cpu, cc), {max_pos, half}), sg = upload(gpu, download(cpu, sc), {max_pos, half});
    const std::vector<int32_t> pos = random_ints(N, (int32_t)max_pos, 51);
    Tensor pg = upload_i32(gpu, pos), pc = upload_i32(cpu, pos);
    const std::vector<float> qkv = rounded(random_floats((size_t)(N * 3 * C), 17), bf);
    Tensor xg = upload(gpu, qkv, {N, 3 * C}, dt), xc = upload(cpu, qkv, {N, 3 * C});
    for (int64_t part : {0, 1}) {
      gpu.rope_apply(sub(xg, part * C, C), view_of(pg), view_of(cg), view_of(sg), k.hd, false);
      cpu.rope_apply(sub(xc, part * C, C), view_of(pc), view_of(cc), view_of(sc), k.hd, false);
    }
    const std::vector<float> fwd = download(cpu, xc);
    EXPECT_TRUE(bf ? all_close(download(gpu, xg), fwd, 2e-3f, 1e-2f) : all_close(download(gpu, xg), fwd, 1e-5f, 1e-5f));
    const std::vector<float> got = download(gpu, xg);
    for (int64_t r = 0; r < N; ++r)  // v columns exactly as they were
      for (int64_t c = 2 * C; c < 3 * C; ++c) ASSERT_EQ(got[(size_t)(r * 3 * C + c)], qkv[(size_t)(r * 3 * C + c)]);
    for (int64_t part : {0, 1}) gpu.rope_apply(sub(xg, part * C, C), view_of(pg), view_of(cg), view_of(sg), k.hd, true);
    EXPECT_TRUE(bf ? all_close(download(gpu, xg), qkv, 3e-2f, 2e-2f) : all_close(download(gpu, xg), qkv, 1e-5f, 1e-5f));
  }
}

// ---- SwiGLU -----------------------------------------------------------------------------------------

CUDA_TEST_BOTH(CudaElementwise, SwigluForwardAndBackwardMatchCpu) {
  const bool bf = dt == DType::BF16;
  Backend& cpu = cpu_backend();
  const int64_t N = 37;
  for (int64_t F : {72, 75}) {
    SCOPED_TRACE(::testing::Message() << "F " << F);
    const std::vector<float> gu = rounded(random_floats((size_t)(N * 2 * F), 18, 3.0f), bf);
    const std::vector<float> da = rounded(random_floats((size_t)(N * F), 19), bf);
    Tensor gug = upload(gpu, gu, {N, 2 * F}, dt), ag = gpu.empty({N, F}, dt), dag = upload(gpu, da, {N, F}, dt);
    Tensor dgug = gpu.empty({N, 2 * F}, dt);
    Tensor guc = upload(cpu, gu, {N, 2 * F}), ac = cpu.empty({N, F}), dac = upload(cpu, da, {N, F});
    Tensor dguc = cpu.empty({N, 2 * F});
    gpu.swiglu_forward(view_of(gug), view_of(ag));
    cpu.swiglu_forward(view_of(guc), view_of(ac));
    gpu.swiglu_backward(view_of(gug), view_of(dag), view_of(dgug));
    cpu.swiglu_backward(view_of(guc), view_of(dac), view_of(dguc));
    // F32: expf against the CPU's exp approximation (relative error < 2e-7).
    EXPECT_TRUE(bf ? all_close(download(gpu, ag), download(cpu, ac), 1e-3f, 1e-2f)
                   : all_close(download(gpu, ag), download(cpu, ac), 1e-6f, 1e-5f));
    EXPECT_TRUE(bf ? all_close(download(gpu, dgug), download(cpu, dguc), 1e-3f, 1e-2f)
                   : all_close(download(gpu, dgug), download(cpu, dguc), 1e-5f, 1e-5f));
  }
}

}  // namespace cuda_elementwise_tests
}  // namespace subllm
