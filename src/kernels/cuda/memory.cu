// The CUDA backend's memory: allocation with in-use and peak accounting, host <-> device and
// device copies, zeroing, synchronisation, and the F32 <-> BF16 conversion of strided views.
#include <algorithm>
#include <cstdio>
#include <string>

#include "kernels/cuda/common.cuh"

namespace subllm {

namespace {

using cuda::bf16;

// Sizes in bytes for messages, e.g. "1.25 GiB".
std::string human_bytes(size_t b) {
  char buf[64];
  if (b >= (size_t(1) << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", (double)b / (double)(size_t(1) << 30));
  else if (b >= (size_t(1) << 20)) std::snprintf(buf, sizeof buf, "%.2f MiB", (double)b / (double)(size_t(1) << 20));
  else std::snprintf(buf, sizeof buf, "%zu bytes", b);
  return buf;
}

// dst(rows, cols) = src(rows, cols) converted elementwise; both row-major with their own row
// strides. One thread per element in a grid-stride loop over the flat index i = r * cols + c.
template <class S, class D>
__global__ void convert_kernel(const S* __restrict__ src, int64_t lds, D* __restrict__ dst, int64_t ldd, int64_t rows,
                               int64_t cols) {
  const int64_t n = rows * cols;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / cols, c = i - r * cols;  // row and column of flat element i
    cuda::store(dst + r * ldd + c, cuda::load(src + r * lds + c));
  }
}

}  // namespace

void* CudaBackend::alloc(size_t bytes) {
  // Whole 256-byte units (cudaMalloc's alignment), at least one, so that every tensor, even an
  // empty one, has its own non-null pointer as on the CPU.
  const size_t rounded = bytes == 0 ? 256 : (bytes + 255) / 256 * 256;
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, rounded);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky: clear it so the next op does not report it
    size_t free_b = 0, total_b = props_.totalGlobalMem;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) cudaGetLastError();
    throw Error("out of GPU memory allocating " + std::to_string(bytes) + " bytes (" + human_bytes(in_use_) +
                " in use of " + human_bytes(total_b) + "): reduce batch size or context length");
  }
  cuda_check(e, "cudaMalloc");
  sizes_[p] = rounded;
  in_use_ += rounded;
  if (in_use_ > peak_) peak_ = in_use_;
  return p;
}

void CudaBackend::free(void* p) {
  if (!p) return;
  auto it = sizes_.find(p);
  if (it != sizes_.end()) {
    in_use_ -= it->second;
    sizes_.erase(it);
  }
  // Called from deleters: never throws. A failure leaves the error for cudaGetLastError, which
  // is cleared so that it is not blamed on the next kernel launch.
  if (cudaFree(p) != cudaSuccess) cudaGetLastError();
}

void CudaBackend::to_device(void* dst, const void* host_src, size_t bytes) {
  if (!bytes) return;
  cuda_check(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_), "to_device (cudaMemcpyAsync)");
  // The host buffer may be reused as soon as this returns.
  cuda_check(cudaStreamSynchronize(stream_), "to_device (cudaStreamSynchronize)");
}

void CudaBackend::to_host(void* host_dst, const void* src, size_t bytes) {
  if (!bytes) return;
  cuda_check(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "to_host (cudaMemcpyAsync)");
  cuda_check(cudaStreamSynchronize(stream_), "to_host (cudaStreamSynchronize)");
}

void CudaBackend::copy(void* dst, const void* src, size_t bytes) {
  if (!bytes || dst == src) return;
  cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy (cudaMemcpyAsync)");
}

void CudaBackend::zero(void* p, size_t bytes) {
  if (!bytes) return;
  cuda_check(cudaMemsetAsync(p, 0, bytes, stream_), "zero (cudaMemsetAsync)");
}

void CudaBackend::sync() {
  // Reports any error of a kernel that ran asynchronously since the last sync.
  cuda_check(cudaStreamSynchronize(stream_), "sync (an earlier kernel on the stream failed)");
}

void CudaBackend::convert(View src, View dst) {
  const char* op = "convert";
  if (src.rows != dst.rows || src.cols != dst.cols)
    throw Error("convert: source and destination shapes differ (" + std::to_string(src.rows) + "x" +
                std::to_string(src.cols) + " vs " + std::to_string(dst.rows) + "x" + std::to_string(dst.cols) + ")");
  if (src.rows < 0 || src.cols < 0 || src.ld < src.cols || dst.ld < dst.cols)
    throw Error("convert: a row stride is smaller than the row (source ld " + std::to_string(src.ld) +
                ", destination ld " + std::to_string(dst.ld) + ", " + std::to_string(src.cols) + " columns)");
  const int64_t rows = src.rows, cols = src.cols;
  if (rows == 0 || cols == 0) return;
  if (src.dtype == dst.dtype) {
    // Same dtype: a strided copy.
    cuda::dispatch_float(src.dtype, op, [&](auto) {});  // F32 or BF16 only
    const size_t es = dtype_size(src.dtype);
    if (src.data == dst.data && src.ld == dst.ld) return;  // the same elements
    if ((rows == 1 || src.ld == cols) && (rows == 1 || dst.ld == cols)) {
      // Contiguous on both sides (e.g. a flat (n, 1) buffer): one linear copy, rather than n
      // rows of one element, and no row pitch above the 2D copy's limit.
      cuda_check(cudaMemcpyAsync(dst.data, src.data, (size_t)rows * (size_t)cols * es, cudaMemcpyDeviceToDevice,
                                 stream_),
                 "convert (cudaMemcpyAsync)");
      return;
    }
    cuda_check(cudaMemcpy2DAsync(dst.data, (size_t)dst.ld * es, src.data, (size_t)src.ld * es, (size_t)cols * es,
                                 (size_t)rows, cudaMemcpyDeviceToDevice, stream_),
               "convert (cudaMemcpy2DAsync)");
    return;
  }
  const int threads = 256;
  // Enough blocks to fill the GPU; the grid-stride loop covers the rest.
  const unsigned blocks = (unsigned)std::min<int64_t>(cuda::grid_for(rows * cols, threads), (int64_t)sm_count_ * 32);
  cuda::dispatch_float(src.dtype, op, [&](auto s) {
    using S = decltype(s);
    cuda::dispatch_float(dst.dtype, op, [&](auto d) {
      using D = decltype(d);
      convert_kernel<S, D><<<blocks, threads, 0, stream_>>>(cuda::ptr<const S>(src), src.ld, cuda::ptr<D>(dst),
                                                             dst.ld, rows, cols);
    });
  });
  cuda_check_launch("convert");
}

}  // namespace subllm
