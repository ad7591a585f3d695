#pragma once
// Shared device helpers of the CUDA kernels: element loads and stores for F32 and BF16
// activations (math in F32), dtype dispatch, launch geometry.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "backend/cuda_backend.h"
#include "subllm/error.h"

namespace subllm::cuda {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

// Calls f(T{}) with T = float or bf16 for the view's dtype; another dtype is an Error naming op.
template <class F>
void dispatch_float(DType dt, const char* op, F&& f) {
  if (dt == DType::F32) f(float{});
  else if (dt == DType::BF16) f(bf16{});
  else throw Error(std::string(op) + ": the CUDA backend takes F32 or BF16 here, got " + dtype_name(dt));
}

// The typed pointer of a view whose dtype dispatch_float chose.
template <class T>
T* ptr(const View& v) { return static_cast<T*>(v.data); }

inline unsigned grid_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// Throws with op's name when a view is not of dtype dt.
inline void expect(const View& v, DType dt, const char* op, const char* operand) {
  if (v.dtype != dt)
    throw Error(std::string(op) + ": " + operand + " must be " + dtype_name(dt) + ", got " + dtype_name(v.dtype));
}

// ---- view checks (host): an Error naming the op and the operand --------------------------

[[noreturn]] inline void fail(const char* op, const std::string& what) { throw Error(std::string(op) + ": " + what); }

// The element count of a vector view: (n, 1) with contiguous elements, or (1, n).
inline int64_t vec_len(const View& v, const char* op, const char* operand) {
  if (v.rows != 1 && v.cols != 1)
    fail(op, std::string(operand) + " must be a vector, got " + std::to_string(v.rows) + "x" + std::to_string(v.cols));
  if (v.cols == 1 && v.rows > 1 && v.ld != 1)
    fail(op, std::string(operand) + " must have contiguous elements (row stride 1), got " + std::to_string(v.ld));
  return v.numel();
}

inline void need_len(const View& v, int64_t n, const char* op, const char* operand) {
  const int64_t len = vec_len(v, op, operand);
  if (len != n) fail(op, std::string(operand) + " has " + std::to_string(len) + " elements, expected " + std::to_string(n));
}

// A (rows, cols) matrix view with a row stride of at least cols.
inline void need_mat(const View& v, int64_t rows, int64_t cols, const char* op, const char* operand) {
  if (v.rows != rows || v.cols != cols)
    fail(op, std::string(operand) + " is " + std::to_string(v.rows) + "x" + std::to_string(v.cols) + ", expected " +
                 std::to_string(rows) + "x" + std::to_string(cols));
  if (v.ld < v.cols)
    fail(op, std::string(operand) + " has row stride " + std::to_string(v.ld) + " below its " + std::to_string(v.cols) +
                 " columns");
}

}  // namespace subllm::cuda
