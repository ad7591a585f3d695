// Row movement on the GPU: gather, scatter-add, strided copy and position filling (the CUDA
// side of kernels/cpu/subsample.cpp's row kernels).
#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/cuda/common.cuh"

namespace subllm {

namespace {

using cuda::bf16;

constexpr int kThreads = 256;

// Grid for a grid-stride loop over `total` items: enough blocks to fill the GPU, never 0.
unsigned grid_capped(int64_t total, int sm_count) {
  const int64_t want = (int64_t)cuda::grid_for(total, kThreads);
  const int64_t cap = (int64_t)std::max(sm_count, 1) * 32;
  return (unsigned)std::max<int64_t>(1, std::min(want, cap));
}

// The length of an I32 index vector: (n, 1) with unit stride, or (1, n).
int64_t index_len(const View& v, const char* op, const char* operand) {
  cuda::expect(v, DType::I32, op, operand);
  if (v.rows > 1 && v.cols > 1)
    throw Error(std::string(op) + ": " + operand + " must be a vector, got " + std::to_string(v.rows) + " x " +
                std::to_string(v.cols));
  if (v.cols == 1 && v.rows > 1 && v.ld != 1)
    throw Error(std::string(op) + ": " + operand + " must be contiguous (row stride 1), got " + std::to_string(v.ld));
  return v.numel();
}

void need_ld(const View& v, const char* op, const char* operand) {
  if (v.rows > 1 && v.ld < v.cols)
    throw Error(std::string(op) + ": " + operand + " has row stride " + std::to_string(v.ld) + " below its " +
                std::to_string(v.cols) + " columns");
}

// dst(r, :) = src(idx ? idx[r] : r, :) for r < n; a row is `units` items of U (U = 2..16 bytes),
// row strides ld_src, ld_dst in units of U. One thread per (row, unit), grid-stride.
template <class U>
__global__ void copy_rows_kernel(const U* __restrict__ src, int64_t ld_src, const int32_t* __restrict__ idx,
                                 U* __restrict__ dst, int64_t ld_dst, int64_t n, int64_t units) {
  const int64_t total = n * units;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / units, u = i - r * units;  // destination row and unit within it
    const int64_t sr = idx ? (int64_t)idx[r] : r;
    dst[r * ld_dst + u] = src[sr * ld_src + u];
  }
}

// Picks the widest unit (16, 8, 4 or 2 bytes) dividing the row length, both row strides and
// both base addresses, and launches copy_rows_kernel with it.
void launch_copy_rows(const View& src, const int32_t* idx, const View& dst, int64_t n, cudaStream_t st, int sms,
                      const char* op) {
  const int64_t esz = (int64_t)dtype_size(src.dtype);
  const int64_t row_bytes = src.cols * esz;
  if (n == 0 || row_bytes == 0) return;
  const uintptr_t a = (uintptr_t)src.data | (uintptr_t)dst.data;
  auto fits = [&](int64_t u) {
    return row_bytes % u == 0 && (src.ld * esz) % u == 0 && (dst.ld * esz) % u == 0 && a % (uintptr_t)u == 0;
  };
  auto go = [&](auto unit) {
    using U = decltype(unit);
    constexpr int64_t ub = (int64_t)sizeof(U);
    const int64_t units = row_bytes / ub;
    copy_rows_kernel<U><<<grid_capped(n * units, sms), kThreads, 0, st>>>(
        static_cast<const U*>(src.data), src.ld * esz / ub, idx, static_cast<U*>(dst.data), dst.ld * esz / ub, n,
        units);
  };
  if (fits(16)) go(uint4{});
  else if (fits(8)) go(uint2{});
  else if (fits(4)) go(uint32_t{});
  else go(uint16_t{});
  cuda_check_launch(op);
}

// dst(idx[i], :) += src(i, :) for i < n, cols columns; idx has no repeats, so each destination
// element has one writer. One thread per (row, column), grid-stride; the add is in F32.
template <class TS, class TD>
__global__ void scatter_add_rows_kernel(const TS* __restrict__ src, int64_t ld_src, const int32_t* __restrict__ idx,
                                        TD* __restrict__ dst, int64_t ld_dst, int64_t n, int64_t cols) {
  const int64_t total = n * cols;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;  // source row and column
    TD* d = dst + (int64_t)idx[r] * ld_dst + c;
    cuda::store(d, cuda::load(d) + cuda::load(src + r * ld_src + c));
  }
}

// pos(b*T + t) = offset + t over total = B*T entries.
__global__ void fill_positions_kernel(int32_t* __restrict__ pos, int64_t total, int T, int offset) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    pos[i] = offset + (int32_t)(i % T);
}

}  // namespace

void CudaBackend::gather_rows(View src, View idx, View dst) {
  const char* op = "gather_rows";
  const int64_t n = index_len(idx, op, "idx");
  const size_t esz = dtype_size(src.dtype);
  if (esz != 2 && esz != 4)
    throw Error(std::string(op) + ": src must have 2- or 4-byte elements, got " + dtype_name(src.dtype));
  if (dst.dtype != src.dtype)
    throw Error(std::string(op) + ": dst must be of src's dtype " + dtype_name(src.dtype) + ", got " +
                dtype_name(dst.dtype));
  if (dst.rows != n) throw Error(std::string(op) + ": dst has " + std::to_string(dst.rows) + " rows, idx " + std::to_string(n));
  if (dst.cols != src.cols)
    throw Error(std::string(op) + ": dst has " + std::to_string(dst.cols) + " columns, src " + std::to_string(src.cols));
  need_ld(src, op, "src");
  need_ld(dst, op, "dst");
  // Indices are not range-checked on the device (that would need a host round trip), as on
  // the CPU: every idx[i] must lie in [0, src.rows).
  launch_copy_rows(src, static_cast<const int32_t*>(idx.data), dst, n, stream(), sm_count(), op);
}

void CudaBackend::scatter_add_rows(View src, View idx, View dst) {
  const char* op = "scatter_add_rows";
  const int64_t n = index_len(idx, op, "idx");
  if (src.rows != n) throw Error(std::string(op) + ": src has " + std::to_string(src.rows) + " rows, idx " + std::to_string(n));
  if (dst.cols != src.cols)
    throw Error(std::string(op) + ": dst has " + std::to_string(dst.cols) + " columns, src " + std::to_string(src.cols));
  need_ld(src, op, "src");
  need_ld(dst, op, "dst");
  if (n == 0 || src.cols == 0) {
    cuda::dispatch_float(src.dtype, op, [](auto) {});  // still refuse a wrong dtype
    cuda::dispatch_float(dst.dtype, op, [](auto) {});
    return;
  }
  cuda::dispatch_float(src.dtype, op, [&](auto s_tag) {
    using TS = decltype(s_tag);
    cuda::dispatch_float(dst.dtype, op, [&](auto d_tag) {
      using TD = decltype(d_tag);
      scatter_add_rows_kernel<TS, TD><<<grid_capped(n * src.cols, sm_count()), kThreads, 0, stream()>>>(
          cuda::ptr<const TS>(src), src.ld, static_cast<const int32_t*>(idx.data), cuda::ptr<TD>(dst), dst.ld, n,
          src.cols);
      cuda_check_launch(op);
    });
  });
}

void CudaBackend::copy_rows(View src, View dst) {
  const char* op = "copy_rows";
  const size_t esz = dtype_size(src.dtype);
  if (esz != 2 && esz != 4)
    throw Error(std::string(op) + ": src must have 2- or 4-byte elements, got " + dtype_name(src.dtype));
  if (dst.dtype != src.dtype)
    throw Error(std::string(op) + ": dst must be of src's dtype " + dtype_name(src.dtype) + ", got " +
                dtype_name(dst.dtype));
  if (dst.rows != src.rows || dst.cols != src.cols)
    throw Error(std::string(op) + ": dst is " + std::to_string(dst.rows) + " x " + std::to_string(dst.cols) +
                ", src " + std::to_string(src.rows) + " x " + std::to_string(src.cols));
  need_ld(src, op, "src");
  need_ld(dst, op, "dst");
  launch_copy_rows(src, nullptr, dst, src.rows, stream(), sm_count(), op);
}

void CudaBackend::fill_positions(View pos, int B, int T, int offset) {
  const char* op = "fill_positions";
  const int64_t n = index_len(pos, op, "pos");
  if (B < 0 || T < 0) throw Error(std::string(op) + ": B and T must not be negative");
  const int64_t total = (int64_t)B * T;
  if (n != total)
    throw Error(std::string(op) + ": pos has " + std::to_string(n) + " entries, B*T = " + std::to_string(total));
  if (total == 0) return;
  fill_positions_kernel<<<grid_capped(total, sm_count()), kThreads, 0, stream()>>>(static_cast<int32_t*>(pos.data),
                                                                                     total, T, offset);
  cuda_check_launch(op);
}

}  // namespace subllm
