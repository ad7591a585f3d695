// Reductions and optimizers on the GPU: scale, sum_squares, AdamW and the ScaledAdam chunk
// kernels (kernels/optimizer_kernels.h; the CPU versions in kernels/cpu/optimizer.cpp and
// xent_adamw.cpp are the specification). All views are F32 except the chunk tables (I32 / I64),
// the clamp flags (U8) and the sums (F64).
//
// Reductions are deterministic: every sum has a fixed split into per-thread partials (doubles),
// combined by a fixed shared-memory tree, then per-block partials combined in a fixed order by
// a second kernel. The elementwise updates use explicitly rounded operations (__fmul_rn, ...)
// so no multiply-add is contracted and each element rounds as the CPU's separate operations.
#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/cuda/common.cuh"

namespace subllm {

namespace {

constexpr int kThreads = 256;
// sum_squares: the number of first-pass blocks (and of partials), in the backend's reduce buffer.
constexpr int kSumBlocks = 1024;
static_assert(kSumBlocks * sizeof(double) <= CudaBackend::kReduceBytes, "sum_squares partials fit the reduce buffer");

// Sum over the block of each thread's v[0..N), by a fixed tree; the result is valid in thread 0.
// sh: N * blockDim.x doubles of shared memory; blockDim.x a power of two.
template <int N>
__device__ void block_sum(double (&v)[N], double* sh) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int j = 0; j < N; ++j) sh[j * nt + tid] = v[j];
  __syncthreads();
  for (int half = nt / 2; half > 0; half /= 2) {
    if (tid < half)
      for (int j = 0; j < N; ++j) sh[j * nt + tid] += sh[j * nt + tid + half];
    __syncthreads();
  }
  if (tid == 0)
    for (int j = 0; j < N; ++j) v[j] = sh[j * nt];
}

// x(rows, cols) *= s, row stride ld. Flat element i is row i / cols, column i % cols.
template <bool Dense>
__global__ void scale_kernel(float* __restrict__ x, int64_t rows, int64_t cols, int64_t ld, float s) {
  const int64_t n = rows * cols, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t at = i;
    if (!Dense) {
      const int64_t r = i / cols;
      at = r * ld + (i - r * cols);  // element (r, i % cols)
    }
    x[at] = __fmul_rn(x[at], s);
  }
}

// First pass of sum_squares: partial[blockIdx.x] = sum of x² over the elements this block's
// threads visit (thread t of block b visits flat elements b * blockDim + t, then every
// gridDim * blockDim after). x(rows, cols) with row stride ld.
template <bool Dense>
__global__ void sum_squares_partial_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, int64_t ld,
                                           double* __restrict__ partial) {
  __shared__ double sh[kThreads];
  const int64_t n = rows * cols, stride = (int64_t)gridDim.x * blockDim.x;
  double acc[1] = {0.0};
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t at = i;
    if (!Dense) {
      const int64_t r = i / cols;
      at = r * ld + (i - r * cols);  // element (r, i % cols)
    }
    const double v = x[at];
    acc[0] += v * v;
  }
  block_sum(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc[0];
}

// Second pass: out[0] = sum of partial[0..n) (thread t sums t, t + blockDim, ...; then a tree).
// One block.
__global__ void sum_partials_kernel(const double* __restrict__ partial, int n, double* __restrict__ out) {
  __shared__ double sh[kThreads];
  double acc[1] = {0.0};
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc[0] += partial[i];
  block_sum(acc, sh);
  if (threadIdx.x == 0) out[0] = acc[0];
}

// torch.optim.AdamW on flat p, g, m, v (n): exactly kernels::adamw_step's per-element formula,
// with its step-dependent constants computed on the host.
__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, int64_t n, float beta1, float one_minus_beta1, float beta2,
                             float one_minus_beta2, float eps, float step_size, float decay, float bc2_sqrt) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gi = g[i];
    // m = beta1 m + (1 - beta1) g;  v = beta2 v + ((1 - beta2) g) g
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_beta1, gi));
    const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    // p = p decay - (step_size m) / (sqrt(v) / bc2_sqrt + eps)
    const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fdiv_rn(__fmul_rn(step_size, mi), den));
  }
}

// ScaledAdam sums, first pass: one block per chunk c (grid n_chunks). scratch[c*3 + 0..2] =
// sums over [begin[c], end[c]) of g², p·g and (want_param_sq) p², in doubles.
__global__ void chunk_sums_kernel(const float* __restrict__ p, const float* __restrict__ g,
                                  const int64_t* __restrict__ begin, const int64_t* __restrict__ end,
                                  bool want_param_sq, double* __restrict__ scratch) {
  __shared__ double sh[3 * kThreads];
  const int c = blockIdx.x;
  const int64_t b = begin[c], e = end[c];
  double acc[3] = {0.0, 0.0, 0.0};
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    const double gi = g[i], pi = p[i];
    acc[0] += gi * gi;
    acc[1] += pi * gi;
    if (want_param_sq) acc[2] += pi * pi;
  }
  block_sum(acc, sh);
  if (threadIdx.x == 0) {
    scratch[(int64_t)c * 3 + 0] = acc[0];
    scratch[(int64_t)c * 3 + 1] = acc[1];
    scratch[(int64_t)c * 3 + 2] = acc[2];
  }
}

// ScaledAdam sums, second pass: one block per tensor t (grid n_tensors). out[t*3 + 0..2] = sum of
// scratch rows of the chunks c with tensor[c] == t (thread j takes chunks j, j + blockDim, ...
// in order; then a tree). A tensor without chunks gets zeros.
__global__ void tensor_sums_kernel(const double* __restrict__ scratch, const int32_t* __restrict__ tensor,
                                   int n_chunks, double* __restrict__ out) {
  __shared__ double sh[3 * kThreads];
  const int t = blockIdx.x;
  double acc[3] = {0.0, 0.0, 0.0};
  for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
    if (tensor[c] != t) continue;
    acc[0] += scratch[(int64_t)c * 3 + 0];
    acc[1] += scratch[(int64_t)c * 3 + 1];
    acc[2] += scratch[(int64_t)c * 3 + 2];
  }
  block_sum(acc, sh);
  if (threadIdx.x == 0) {
    out[(int64_t)t * 3 + 0] = acc[0];
    out[(int64_t)t * 3 + 1] = acc[1];
    out[(int64_t)t * 3 + 2] = acc[2];
  }
}

// g *= factor over chunk blockIdx.x's elements [begin, end); factor 0 writes exact zeros.
__global__ void scale_chunks_kernel(float* __restrict__ g, const int64_t* __restrict__ begin,
                                    const int64_t* __restrict__ end, float factor) {
  const int c = blockIdx.x;
  const int64_t b = begin[c], e = end[c];
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) g[i] = factor == 0.f ? 0.f : __fmul_rn(g[i], factor);
}

// The ScaledAdam update of chunk blockIdx.x (kernels::optim_scaled_adam_update), t = its tensor:
//   v = b2 v + (1 - b2) g²;  d = step_coef[t] g / (sqrt(v inv_bc2) + eps) + p scale_step[t]
//   m = b1 m + (1 - b1) d;   p += m
// then p[begin] clamped to [-clamp_max, clamp_max] when clamp[t]; the thread that updates
// element begin also clamps it, so no other thread touches it.
__global__ void scaled_adam_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ v,
                                   float* __restrict__ m, const int32_t* __restrict__ tensor,
                                   const int64_t* __restrict__ begin, const int64_t* __restrict__ end,
                                   const float* __restrict__ step_coef, const float* __restrict__ scale_step,
                                   const uint8_t* __restrict__ clamp, float clamp_max, float inv_bc2, float b1,
                                   float one_minus_b1, float b2, float one_minus_b2, float eps) {
  const int c = blockIdx.x;
  const int t = tensor[c];
  const int64_t b = begin[c], e = end[c];
  const float sc = step_coef[t], ss = scale_step[t];
  const bool clamp_first = clamp[t] != 0;
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    const float gi = g[i];
    const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(one_minus_b2, __fmul_rn(gi, gi)));
    v[i] = vi;
    const float den = __fadd_rn(__fsqrt_rn(__fmul_rn(vi, inv_bc2)), eps);
    const float pi = p[i];
    const float d = __fadd_rn(__fdiv_rn(__fmul_rn(sc, gi), den), __fmul_rn(pi, ss));
    const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(one_minus_b1, d));
    m[i] = mi;
    float pn = __fadd_rn(pi, mi);
    // As std::clamp: a NaN stays NaN.
    if (clamp_first && i == b) pn = pn < -clamp_max ? -clamp_max : (clamp_max < pn ? clamp_max : pn);
    p[i] = pn;
  }
}

// ---- host-side checks ---------------------------------------------------------------------

std::string shape_of(const View& v) {
  return std::to_string(v.rows) + "x" + std::to_string(v.cols) + " (ld " + std::to_string(v.ld) + ")";
}

// A flat F32 buffer: dense rows (ld = cols, or a single row).
void expect_flat_f32(const View& v, const char* op, const char* operand) {
  cuda::expect(v, DType::F32, op, operand);
  if (v.rows > 1 && v.ld != v.cols)
    throw Error(std::string(op) + ": " + operand + " must be dense (row stride = columns), got " + shape_of(v));
}

void expect_numel(const View& v, int64_t n, const char* op, const char* operand) {
  if (v.numel() != n)
    throw Error(std::string(op) + ": " + operand + " has " + std::to_string(v.numel()) + " elements, expected " +
                std::to_string(n));
}

void expect_strided(const View& v, const char* op, const char* operand) {
  if (v.rows < 0 || v.cols < 0 || (v.rows > 1 && v.ld < v.cols))
    throw Error(std::string(op) + ": " + operand + " has a row stride smaller than its row: " + shape_of(v));
}

// The chunk tables; returns the number of chunks.
int check_chunks(const Backend::Chunks& ch, const char* op, bool need_tensor) {
  if (need_tensor) cuda::expect(ch.tensor, DType::I32, op, "chunk tensor indices");
  cuda::expect(ch.begin, DType::I64, op, "chunk begins");
  cuda::expect(ch.end, DType::I64, op, "chunk ends");
  const int64_t n = ch.begin.numel();
  if (ch.end.numel() != n || (need_tensor && ch.tensor.numel() != n))
    throw Error(std::string(op) + ": the chunk tables differ in length (tensor " + std::to_string(ch.tensor.numel()) +
                ", begin " + std::to_string(n) + ", end " + std::to_string(ch.end.numel()) + ")");
  if (n > 0x7fffffff) throw Error(std::string(op) + ": too many chunks (" + std::to_string(n) + ")");
  return (int)n;
}

}  // namespace

void CudaBackend::scale(View x, float s) {
  cuda::expect(x, DType::F32, "scale", "x");
  expect_strided(x, "scale", "x");
  const int64_t n = x.numel();
  if (n == 0) return;
  const unsigned blocks = (unsigned)std::min<int64_t>(cuda::grid_for(n, kThreads), (int64_t)sm_count_ * 32);
  if (x.rows <= 1 || x.ld == x.cols)
    scale_kernel<true><<<blocks, kThreads, 0, stream_>>>(x.f32(), x.rows, x.cols, x.ld, s);
  else
    scale_kernel<false><<<blocks, kThreads, 0, stream_>>>(x.f32(), x.rows, x.cols, x.ld, s);
  cuda_check_launch("scale");
}

// dst(n) += src(n)
__global__ void add_kernel(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] += src[i];
}

void CudaBackend::add(View dst, View src) {
  expect_flat_f32(dst, "add", "dst");
  expect_flat_f32(src, "add", "src");
  const int64_t n = dst.numel();
  expect_numel(src, n, "add", "src");
  if (n == 0) return;
  const unsigned blocks = (unsigned)std::min<int64_t>(cuda::grid_for(n, kThreads), (int64_t)sm_count_ * 32);
  add_kernel<<<blocks, kThreads, 0, stream_>>>(dst.f32(), src.f32(), n);
  cuda_check_launch("add");
}

void CudaBackend::sum_squares(View x, View out) {
  cuda::expect(x, DType::F32, "sum_squares", "x");
  cuda::expect(out, DType::F64, "sum_squares", "out");
  expect_strided(x, "sum_squares", "x");
  if (out.numel() < 1) throw Error("sum_squares: out must hold one F64 value");
  const int64_t n = x.numel();
  // A fixed split: the block count depends only on n, so the result is the same on every run.
  const int blocks = (int)std::clamp<int64_t>(cuda::grid_for(n, kThreads * 4), 1, kSumBlocks);
  double* partial = static_cast<double*>(reduce_buffer());
  if (x.rows <= 1 || x.ld == x.cols)
    sum_squares_partial_kernel<true><<<blocks, kThreads, 0, stream_>>>(x.f32(), x.rows, x.cols, x.ld, partial);
  else
    sum_squares_partial_kernel<false><<<blocks, kThreads, 0, stream_>>>(x.f32(), x.rows, x.cols, x.ld, partial);
  cuda_check_launch("sum_squares (partials)");
  sum_partials_kernel<<<1, kThreads, 0, stream_>>>(partial, blocks, out.f64());
  cuda_check_launch("sum_squares (total)");
}

void CudaBackend::adamw_step(View p, View g, View m, View v, float lr, float beta1, float beta2, float eps,
                             float weight_decay, int step) {
  const char* op = "adamw_step";
  expect_flat_f32(p, op, "p");
  expect_flat_f32(g, op, "g");
  expect_flat_f32(m, op, "m");
  expect_flat_f32(v, op, "v");
  const int64_t n = p.numel();
  expect_numel(g, n, op, "g");
  expect_numel(m, n, op, "m");
  expect_numel(v, n, op, "v");
  if (step < 1) throw Error("adamw_step: step must be >= 1 (got " + std::to_string(step) + ")");
  if (n == 0) return;
  // The step's constants exactly as kernels::adamw_step computes them (float arithmetic).
  const float bc1 = 1.0f - std::pow(beta1, (float)step);
  const float bc2_sqrt = std::sqrt(1.0f - std::pow(beta2, (float)step));
  const float step_size = lr / bc1;
  const float decay = 1.0f - lr * weight_decay;
  const unsigned blocks = (unsigned)std::min<int64_t>(cuda::grid_for(n, kThreads), (int64_t)sm_count_ * 32);
  adamw_kernel<<<blocks, kThreads, 0, stream_>>>(p.f32(), g.f32(), m.f32(), v.f32(), n, beta1, 1.0f - beta1, beta2,
                                                 1.0f - beta2, eps, step_size, decay, bc2_sqrt);
  cuda_check_launch("adamw_step");
}

size_t CudaBackend::optim_sums_scratch_bytes(int n_chunks) const {
  return sizeof(double) * 3 * (size_t)std::max(n_chunks, 0);
}

void CudaBackend::optim_chunk_sums(View p, View g, const Chunks& ch, int n_tensors, bool want_param_sq, View out,
                                   Scratch s) {
  const char* op = "optim_chunk_sums";
  expect_flat_f32(p, op, "p");
  expect_flat_f32(g, op, "g");
  expect_numel(g, p.numel(), op, "g");
  cuda::expect(out, DType::F64, op, "out");
  if (n_tensors < 0) throw Error("optim_chunk_sums: negative tensor count");
  if (out.numel() < (int64_t)n_tensors * 3)
    throw Error("optim_chunk_sums: out has " + std::to_string(out.numel()) + " elements, needs (" +
                std::to_string(n_tensors) + ", 3)");
  if (out.rows > 1 && out.ld != out.cols) throw Error("optim_chunk_sums: out must be dense");
  const int n_chunks = check_chunks(ch, op, true);
  const size_t need = optim_sums_scratch_bytes(n_chunks);
  if (s.bytes < need || (need && !s.data))
    throw Error("optim_chunk_sums: scratch of " + std::to_string(s.bytes) + " bytes, needs " + std::to_string(need));
  if (n_tensors == 0) return;
  if (n_chunks == 0) {
    cuda_check(cudaMemsetAsync(out.data, 0, sizeof(double) * 3 * (size_t)n_tensors, stream_),
               "optim_chunk_sums (cudaMemsetAsync)");
    return;
  }
  double* scratch = static_cast<double*>(s.data);
  chunk_sums_kernel<<<n_chunks, kThreads, 0, stream_>>>(p.f32(), g.f32(), ch.begin.i64(), ch.end.i64(), want_param_sq,
                                                        scratch);
  cuda_check_launch("optim_chunk_sums (chunks)");
  tensor_sums_kernel<<<n_tensors, kThreads, 0, stream_>>>(scratch, ch.tensor.i32(), n_chunks, out.f64());
  cuda_check_launch("optim_chunk_sums (tensors)");
}

void CudaBackend::optim_scale_chunks(View g, const Chunks& ch, float factor) {
  const char* op = "optim_scale_chunks";
  expect_flat_f32(g, op, "g");
  const int n_chunks = check_chunks(ch, op, false);
  if (n_chunks == 0) return;
  scale_chunks_kernel<<<n_chunks, kThreads, 0, stream_>>>(g.f32(), ch.begin.i64(), ch.end.i64(), factor);
  cuda_check_launch("optim_scale_chunks");
}

void CudaBackend::scaled_adam_update(View p, View g, View v, View m, const Chunks& ch, View step_coef,
                                     View scale_step, View clamp, float clamp_max, float inv_bc2, float b1,
                                     float one_minus_b1, float b2, float one_minus_b2, float eps) {
  const char* op = "scaled_adam_update";
  expect_flat_f32(p, op, "p");
  expect_flat_f32(g, op, "g");
  expect_flat_f32(v, op, "v (exp_avg_sq)");
  expect_flat_f32(m, op, "m (momentum)");
  const int64_t n = p.numel();
  expect_numel(g, n, op, "g");
  expect_numel(v, n, op, "v (exp_avg_sq)");
  expect_numel(m, n, op, "m (momentum)");
  cuda::expect(step_coef, DType::F32, op, "step_coef");
  cuda::expect(scale_step, DType::F32, op, "scale_step");
  cuda::expect(clamp, DType::U8, op, "clamp");
  if (scale_step.numel() != step_coef.numel() || clamp.numel() != step_coef.numel())
    throw Error("scaled_adam_update: step_coef, scale_step and clamp must have one entry per tensor (" +
                std::to_string(step_coef.numel()) + ", " + std::to_string(scale_step.numel()) + ", " +
                std::to_string(clamp.numel()) + ")");
  const int n_chunks = check_chunks(ch, op, true);
  if (n_chunks == 0) return;
  scaled_adam_kernel<<<n_chunks, kThreads, 0, stream_>>>(p.f32(), g.f32(), v.f32(), m.f32(), ch.tensor.i32(),
                                                         ch.begin.i64(), ch.end.i64(), step_coef.f32(),
                                                         scale_step.f32(), clamp.u8(), clamp_max, inv_bc2, b1,
                                                         one_minus_b1, b2, one_minus_b2, eps);
  cuda_check_launch("scaled_adam_update");
}

}  // namespace subllm
