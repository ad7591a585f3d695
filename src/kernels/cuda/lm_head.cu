// The CUDA backend's output head: the fused projection and softmax cross-entropy
// (kernels/cpu/xent_adamw.cpp's lm_head_xent is the specification). Rows go through in chunks:
// logits = x_rows · w^T by cuBLASLt, a row kernel (max, log-sum-exp, loss of the target, and the
// gradient (softmax - onehot) · grad_scale in place of the logits), then dx_rows = chunk · w and
// dw += chunk^T · x_rows.
//
// The summed loss and the counted rows are accumulated without scratch and deterministically:
// each row adds its loss as a 64-bit fixed-point integer (units of 2^-24 nats) to out's first
// word and 1 to the second with integer atomics (integer addition does not depend on order);
// a last one-thread kernel turns the two words into the F64 {loss, count}. A row whose loss is
// not finite or not representable (|loss| >= 2^38) makes the summed loss NaN.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/cuda/common.cuh"

namespace subllm {

namespace {

using cuda::bf16;
using cuda::load;
using cuda::store;
using cuda::fail;
using cuda::vec_len;
using cuda::need_mat;




constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowThreads = 512;
constexpr double kLossUnit = 16777216.0;                   // 2^24 fixed-point units per nat
constexpr double kLossLimit = 4611686018427387904.0;      // 2^62 units: 2^38 nats, a row's largest
constexpr unsigned long long kNonFinite = 1ull << 48;      // added to the count word by a bad row

// Max / sum over the block (blockDim.x a multiple of 32, at most 1024) by fixed trees; every
// thread gets the result. `sh` holds 32 floats; calls may follow one another with the same sh.
__device__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float r = lane < nw ? sh[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) r = fmaxf(r, __shfl_xor_sync(kFull, r, o));
  return r;
}
__device__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float r = lane < nw ? sh[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(kFull, r, o);
  return r;
}

// One block per row r of a chunk. src (rows, V): the row's logits (F32 logits, or the chunk);
// targets (rows) or nullptr (every row ignored). A row with target >= 0 adds its loss
// lse - logit[target] and 1 to acc (see the file comment). With want_grad, grad (rows, V)
// receives (softmax - onehot(target)) · grad_scale, or 0 for an ignored row. grad may be src:
// every read of the row precedes the block reductions' barriers, and each thread rewrites only
// the elements it reads after them.
template <class S, class G>
__global__ void xent_rows_kernel(const S* src, int64_t lds, G* grad, int64_t ldg, const int32_t* __restrict__ targets,
                                 int V, float grad_scale, bool want_grad, unsigned long long* __restrict__ acc) {
  __shared__ float sh[32];
  const int64_t r = blockIdx.x;
  const S* l = src + r * lds;
  const int tgt = targets ? targets[r] : -1;
  const float lt = tgt >= 0 ? load(l + tgt) : 0.0f;  // read before the row is overwritten
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, load(l + j));
  mx = block_max(mx, sh);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < V; j += blockDim.x) sum += expf(load(l + j) - mx);
  sum = block_sum(sum, sh);
  const float lse = mx + logf(sum);
  if (threadIdx.x == 0 && tgt >= 0) {
    const float loss = lse - lt;
    const double q = (double)loss * kLossUnit;
    if (fabs(q) < kLossLimit)  // false for inf and NaN too
      atomicAdd(acc, (unsigned long long)__double2ll_rn(q));
    else
      atomicAdd(acc + 1, kNonFinite);
    atomicAdd(acc + 1, 1ull);
  }
  if (!want_grad) return;
  G* g = grad + r * ldg;
  if (tgt < 0) {
    for (int j = threadIdx.x; j < V; j += blockDim.x) store(g + j, 0.0f);
  } else {
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      float v = expf(load(l + j) - lse) * grad_scale;
      if (j == tgt) v -= grad_scale;
      store(g + j, v);
    }
  }
}

// One thread: the accumulator words {fixed-point loss, count (+ bad rows · 2^48)} become
// out(2) F64 = {summed loss, counted rows}, in place.
__global__ void xent_finish_kernel(unsigned long long* acc) {
  const unsigned long long a0 = acc[0], a1 = acc[1];
  double* out = reinterpret_cast<double*>(acc);
  out[0] = a1 >= kNonFinite ? (double)NAN : (double)(long long)a0 / kLossUnit;
  out[1] = (double)(long long)(a1 & (kNonFinite - 1));
}

}  // namespace

void CudaBackend::lm_head_xent(View x, View w, View targets, float grad_scale, View dx, View dw, View logits,
                               View chunk, View out) {
  const char* op = "lm_head_xent";
  if (!x) fail(op, "x is empty");
  if (!w) fail(op, "w is empty");
  if (!chunk) fail(op, "chunk is empty");
  if (!out) fail(op, "out is empty");
  const int64_t N = x.rows, C = x.cols, V = w.rows;
  if (C < 1 || V < 1) fail(op, "x needs columns and w rows");
  if (V > INT32_MAX) fail(op, "the vocabulary is too large");
  need_mat(x, N, C, op, "x");
  need_mat(w, V, C, op, "w");
  if (w.dtype != x.dtype) fail(op, std::string("w must be of x's dtype ") + dtype_name(x.dtype));
  if (chunk.dtype != x.dtype) fail(op, std::string("chunk must be of x's dtype ") + dtype_name(x.dtype));
  if (chunk.rows < 1) fail(op, "chunk has no rows");
  need_mat(chunk, chunk.rows, V, op, "chunk");
  if (targets) {
    cuda::expect(targets, DType::I32, op, "targets");
    if (vec_len(targets, op, "targets") != N) fail(op, "targets must have one element per row of x");
  }
  if (dx) {
    if (dx.dtype != x.dtype) fail(op, std::string("dx must be of x's dtype ") + dtype_name(x.dtype));
    need_mat(dx, N, C, op, "dx");
  }
  if (dw) {
    cuda::expect(dw, DType::F32, op, "dw");
    need_mat(dw, V, C, op, "dw");
  }
  if (logits) {
    cuda::expect(logits, DType::F32, op, "logits");
    need_mat(logits, N, V, op, "logits");
  }
  cuda::expect(out, DType::F64, op, "out");
  if (vec_len(out, op, "out") != 2) fail(op, "out must have 2 elements");

  auto* acc = static_cast<unsigned long long*>(out.data);
  cuda_check(cudaMemsetAsync(acc, 0, 2 * sizeof(unsigned long long), stream_), "lm_head_xent (zero out)");
  // As on the CPU: the row kernel runs when there is a loss or a gradient; the gradient (dx, and
  // dw with it) only with dx.
  const bool want_rows = targets || dx, want_grad = (bool)dx;
  const int32_t* tg = targets ? targets.i32() : nullptr;
  cuda::dispatch_float(x.dtype, op, [&](auto t) {
    using T = decltype(t);
    for (int64_t r0 = 0; r0 < N; r0 += chunk.rows) {
      const int64_t rows = std::min<int64_t>(chunk.rows, N - r0);
      const View xr = x.rows_at(r0, rows), ch = chunk.rows_at(0, rows);
      // Logits asked for: straight into them in F32 (the row kernel then reads them there).
      const View lv = logits ? logits.rows_at(r0, rows) : View{};
      gemm(xr, false, w, true, logits ? lv : ch, 1.0f, 0.0f);
      if (!want_rows) continue;
      if (logits)
        xent_rows_kernel<float, T><<<(unsigned)rows, kRowThreads, 0, stream_>>>(
            lv.f32(), lv.ld, cuda::ptr<T>(ch), ch.ld, tg ? tg + r0 : nullptr, (int)V, grad_scale, want_grad, acc);
      else
        xent_rows_kernel<T, T><<<(unsigned)rows, kRowThreads, 0, stream_>>>(
            cuda::ptr<const T>(ch), ch.ld, cuda::ptr<T>(ch), ch.ld, tg ? tg + r0 : nullptr, (int)V, grad_scale,
            want_grad, acc);
      cuda_check_launch("lm_head_xent (rows)");
      if (!want_grad) continue;
      gemm(ch, false, w, false, dx.rows_at(r0, rows), 1.0f, 0.0f);  // dx_rows = chunk · w
      if (dw) gemm(ch, true, xr, false, dw, 1.0f, 1.0f);           // dw += chunk^T · x_rows
    }
  });
  xent_finish_kernel<<<1, 1, 0, stream_>>>(acc);
  cuda_check_launch("lm_head_xent (finish)");
}

}  // namespace subllm
