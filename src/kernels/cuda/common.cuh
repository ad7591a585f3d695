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

}  // namespace subllm::cuda
