#pragma once
// Kernels of the ScaledAdam optimizer (src/train/scaled_adam.cpp) on raw pointers. The CPU
// implementations live in kernels/cpu/optimizer.cpp.
//
// The flat parameter, gradient and state buffers are split into chunks: chunk c covers the
// absolute element indices [chunk_begin[c], chunk_end[c]) of tensor chunk_tensor[c]. A chunk
// never spans two tensors. The split is fixed by the caller, so the reductions below sum per
// chunk and then in chunk order and give the same result for any thread count.
#include <cstddef>
#include <cstdint>

namespace subllm::kernels {

// Doubles of scratch that optim_chunk_sums needs for n_chunks chunks (n_chunks * 3).
size_t optim_chunk_sums_scratch(int n_chunks);

// Per-tensor sums of the chunks' elements, as doubles:
//   out(n_tensors, 3): [t*3 + 0] = sum g^2, [t*3 + 1] = sum p*g, [t*3 + 2] = sum p^2
//   (the last is 0 unless want_param_sq). Overwritten; tensors without chunks get zeros.
// params, grads: the flat buffers; chunk_*(n_chunks) as above, tensor indices in
// [0, n_tensors); scratch: optim_chunk_sums_scratch(n_chunks) doubles. Allocates nothing.
void optim_chunk_sums(const float* params, const float* grads, const int32_t* chunk_tensor,
                      const int64_t* chunk_begin, const int64_t* chunk_end, int n_chunks, int n_tensors,
                      bool want_param_sq, double* out, double* scratch);

// grads[i] *= factor over every chunk, in place. factor == 0 writes exact zeros (a product
// with 0 would keep NaN and Inf).
void optim_scale_chunks(float* grads, const int64_t* chunk_begin, const int64_t* chunk_end, int n_chunks,
                        float factor);

// The elementwise ScaledAdam update of every chunk; p, g, v (exp_avg_sq), m (momentum) are
// the flat buffers. With t = chunk_tensor[c], per element of the chunk:
//   v = b2 v + (1 - b2) g^2
//   d = step_coef[t] g / (sqrt(v inv_bc2) + eps) + p scale_step[t]
//   m = b1 m + (1 - b1) d;  p += m
// then, when clamp_tensor[t] != 0 (a scalar tensor, numel 1), p[chunk_begin] is clamped to
// [-clamp_max, clamp_max]. step_coef, scale_step, clamp_tensor: (n_tensors) per tensor.
void optim_scaled_adam_update(float* p, const float* g, float* v, float* m, const int32_t* chunk_tensor,
                              const int64_t* chunk_begin, const int64_t* chunk_end, int n_chunks,
                              const float* step_coef, const float* scale_step, const uint8_t* clamp_tensor,
                              float clamp_max, float inv_bc2, float b1, float one_minus_b1, float b2,
                              float one_minus_b2, float eps);

}  // namespace subllm::kernels
