// Token embedding, RMSNorm, RoPE and SwiGLU on the GPU: the CUDA side of
// kernels/cpu/norm_embed.cpp and kernels/cpu/rope_swiglu.cpp, with the same formulas in the same
// float order. Activations and the weights' compute copy are F32 or BF16 (math in F32); rstd,
// the RoPE tables and parameter gradients are F32.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "kernels/cuda/common.cuh"

namespace subllm {

namespace {

using cuda::bf16;
using cuda::fail;

constexpr int kThreads = 256;        // elementwise and warp-per-row kernels
constexpr int kRmsPartials = 256;    // most row-blocks of rmsnorm_backward's dg partial sums
constexpr int kDgThreads = 128;      // columns per block of the dg partial kernel

// ---- host-side checks -------------------------------------------------------------------

std::string shape_of(const View& v) { return std::to_string(v.rows) + " x " + std::to_string(v.cols); }


void need_float(const View& v, const char* op, const char* operand) {
  if (v.dtype != DType::F32 && v.dtype != DType::BF16)
    fail(op, std::string(operand) + " must be F32 or BF16, got " + dtype_name(v.dtype));
}

void need_shape(const View& v, int64_t rows, int64_t cols, const char* op, const char* operand) {
  if (v.rows != rows || v.cols != cols)
    fail(op, std::string(operand) + " is " + shape_of(v) + ", expected " + std::to_string(rows) + " x " +
                 std::to_string(cols));
  if (v.rows > 1 && v.ld < v.cols)
    fail(op, std::string(operand) + " has row stride " + std::to_string(v.ld) + " below its " +
                 std::to_string(v.cols) + " columns");
  if (v.numel() > 0 && !v.data) fail(op, std::string(operand) + " is empty");
}

// The length of a contiguous vector view ((n, 1) with stride 1, or (1, n)) of dtype dt
// (dt F32 for "F32 or BF16" when any_float).
int64_t vec_len(const View& v, DType dt, bool any_float, const char* op, const char* operand) {
  if (any_float) need_float(v, op, operand);
  else cuda::expect(v, dt, op, operand);
  if (v.rows > 1 && v.cols > 1) fail(op, std::string(operand) + " must be a vector, got " + shape_of(v));
  if (v.cols == 1 && v.rows > 1 && v.ld != 1)
    fail(op, std::string(operand) + " must be contiguous (row stride 1), got " + std::to_string(v.ld));
  if (v.numel() > 0 && !v.data) fail(op, std::string(operand) + " is empty");
  return v.numel();
}

// Grid for a grid-stride loop over `total` items of `threads` per block: enough blocks to fill
// the GPU, never 0.
unsigned grid_capped(int64_t total, int threads, int sm_count) {
  const int64_t want = (int64_t)cuda::grid_for(total, threads);
  const int64_t cap = (int64_t)std::max(sm_count, 1) * 32;
  return (unsigned)std::max<int64_t>(1, std::min(want, cap));
}

// Whether rows of `cols` elements of size esz can be read as 16-byte vectors in every view:
// the row length and each row stride a multiple of 16 bytes and each base 16-byte aligned.
bool vec16_ok(int64_t cols, size_t esz, std::initializer_list<const View*> views) {
  if ((cols * (int64_t)esz) % 16 != 0) return false;
  for (const View* v : views) {
    if (v->rows > 1 && (v->ld * (int64_t)esz) % 16 != 0) return false;
    if ((uintptr_t)v->data % 16 != 0) return false;
  }
  return true;
}

// ---- device helpers ----------------------------------------------------------------------

// Elements per 16-byte vector of T.
template <class T>
constexpr int kVec = (int)(16 / sizeof(T));

// V consecutive elements at p as floats; V > 1: one 16-byte load (p 16-byte aligned).
template <int V, class T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[V]) {
  if constexpr (V == 1) {
    f[0] = cuda::load(p);
  } else {
    static_assert(V * sizeof(T) == 16, "a vector is 16 bytes");
    alignas(16) T e[V];
    *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = cuda::load(e + k);
  }
}
template <int V, class T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[V]) {
  if constexpr (V == 1) {
    cuda::store(p, f[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "a vector is 16 bytes");
    alignas(16) T e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) cuda::store(e + k, f[k]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(e);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The CPU's sigmoid_approx is exp-based with relative error < 2e-7; expf here is within 2 ulp.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// ---- embedding ---------------------------------------------------------------------------

// out(i, :) = table(tokens[i], :) converted to out's dtype; tokens (n), table (V, C), out (n, C).
// One thread per (row, column), grid-stride. (Same dtypes go through gather_rows instead.)
template <class TS, class TD>
__global__ void embedding_convert_kernel(const int32_t* __restrict__ tokens, const TS* __restrict__ table,
                                         int64_t ld_table, TD* __restrict__ out, int64_t ld_out, int64_t n, int64_t C) {
  const int64_t total = n * C;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;  // output row and column
    cuda::store(out + r * ld_out + c, cuda::load(table + (int64_t)tokens[r] * ld_table + c));
  }
}

// dtable(tokens[i], :) += dout(i, :); tokens (n) repeat, dout (n, C), dtable (V, C) F32.
// One thread per (row, column). Rows with the same token race on one dtable row, resolved with
// float atomicAdd: the sum is exact up to the order of additions, which is not deterministic
// (the one place in this file where run-to-run bitwise equality is not guaranteed).
template <class T>
__global__ void embedding_backward_kernel(const int32_t* __restrict__ tokens, const T* __restrict__ dout,
                                          int64_t ld_dout, float* __restrict__ dtable, int64_t ld_table, int64_t n,
                                          int64_t C) {
  const int64_t total = n * C;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;  // dout row and column
    atomicAdd(dtable + (int64_t)tokens[r] * ld_table + c, cuda::load(dout + r * ld_dout + c));
  }
}

// ---- RMSNorm -----------------------------------------------------------------------------

// x (n, C), g (C) -> y (n, C) = x · rstd · g, rstd (n) = 1 / sqrt(mean(x²) + eps).
// One warp per row (grid-stride over rows); lane l reads V-element vectors at columns
// l·V, l·V + 32·V, ...; F32 sums, reduced across the warp.
template <class T, class TG, int V>
__global__ void rmsnorm_forward_kernel(const T* __restrict__ x, int64_t ldx, const TG* __restrict__ g,
                                       T* __restrict__ y, int64_t ldy, float* __restrict__ rstd, int64_t n, int C,
                                       float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t r = warp; r < n; r += nwarps) {  // r is the same in all lanes: shuffles are warp-uniform
    const T* xr = x + r * ldx;
    float ss = 0.f;
    for (int c = lane * V; c < C; c += 32 * V) {
      float f[V];
      load_vec<V>(xr + c, f);
#pragma unroll
      for (int k = 0; k < V; ++k) ss += f[k] * f[k];
    }
    ss = warp_sum(ss);
    const float rs = 1.0f / sqrtf(ss / (float)C + eps);
    if (lane == 0) rstd[r] = rs;
    T* yr = y + r * ldy;
    for (int c = lane * V; c < C; c += 32 * V) {
      float f[V];
      load_vec<V>(xr + c, f);
#pragma unroll
      for (int k = 0; k < V; ++k) f[k] = f[k] * rs * cuda::load(g + c + k);
      store_vec<V>(yr + c, f);
    }
  }
}

// dg partial sums: part(b, c) = sum over rows r of row-block b of dy(r, c) · x(r, c) · rstd(r).
// Grid (ceil(C / kDgThreads), P): block (bx, b) covers columns bx·kDgThreads + thread and rows
// [b·chunk, min(n, (b+1)·chunk)), in row order (deterministic).
template <class T>
__global__ void rmsnorm_dg_partial_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ dy,
                                          int64_t ldd, const float* __restrict__ rstd, float* __restrict__ part,
                                          int64_t n, int C, int64_t chunk) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t r0 = (int64_t)blockIdx.y * chunk, r1 = min(n, r0 + chunk);
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) acc += cuda::load(dy + r * ldd + c) * cuda::load(x + r * ldx + c) * rstd[r];
  part[(int64_t)blockIdx.y * C + c] = acc;
}

// dg(c) += sum over b < P of part(b, c), b in order (deterministic). One thread per column.
__global__ void rmsnorm_dg_reduce_kernel(const float* __restrict__ part, int P, int C, float* __restrict__ dg) {
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int b = 0; b < P; ++b) s += part[(int64_t)b * C + c];
    dg[c] += s;
  }
}

// dx (=|+=) rstd · dy · g - x · rstd³ / C · sum(dy · g · x), per row; x, dy, dx (n, C), g (C).
// One warp per row as in the forward. dx may alias dy: each lane reads dy(r, c) before writing
// dx(r, c), and the row's dot product is complete (the warp shuffles) before any write.
template <class T, class TG, int V>
__global__ void rmsnorm_dx_kernel(const T* __restrict__ x, int64_t ldx, const TG* __restrict__ g,
                                  const float* __restrict__ rstd, const T* dy, int64_t ldd, T* dx, int64_t lddx,
                                  int64_t n, int C, bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t r = warp; r < n; r += nwarps) {  // warp-uniform row
    const T* xr = x + r * ldx;
    const T* dyr = dy + r * ldd;
    T* dxr = dx + r * lddx;
    const float rs = rstd[r];
    float dot = 0.f;
    for (int c = lane * V; c < C; c += 32 * V) {
      float fx[V], fd[V];
      load_vec<V>(xr + c, fx);
      load_vec<V>(dyr + c, fd);
#pragma unroll
      for (int k = 0; k < V; ++k) dot += fd[k] * cuda::load(g + c + k) * fx[k];
    }
    dot = warp_sum(dot);
    const float kk = dot * rs * rs * rs / (float)C;
    for (int c = lane * V; c < C; c += 32 * V) {
      float fx[V], fd[V], o[V];
      load_vec<V>(xr + c, fx);
      load_vec<V>(dyr + c, fd);
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = rs * fd[k] * cuda::load(g + c + k) - kk * fx[k];
      if (accumulate) {
        float old[V];
        load_vec<V>(dxr + c, old);
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = old[k] + o[k];
      }
      store_vec<V>(dxr + c, o);
    }
  }
}

// ---- RoPE ----------------------------------------------------------------------------------

// cos, sin (max_pos, half): angle p · inv_freq(i), inv_freq(i) = base^(-2i/head_dim) rounded to
// float, the angle and its cos/sin in double (as rope_table_fill). One thread per (p, i).
__global__ void rope_table_kernel(float* __restrict__ cs, int64_t ldc, float* __restrict__ sn, int64_t lds,
                                  int64_t max_pos, int half, int head_dim, double base) {
  const int64_t total = max_pos * half;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = t / half;
    const int i = (int)(t - p * half);  // frequency index within the half
    const float inv_freq = (float)(1.0 / pow(base, (2.0 * i) / head_dim));
    const double ang = (double)p * (double)inv_freq;
    double s, c;
    sincos(ang, &s, &c);
    cs[p * ldc + i] = (float)c;
    sn[p * lds + i] = (float)s;
  }
}

// x (n, nheads · 2·half) in place: in head h of row r, element i (< half) pairs with element
// i + half (the rotate-half layout of the CPU kernel): a' = a·cos - b·sin, b' = b·cos + a·sin,
// sin negated when inverse. One thread per (row, head, i).
template <class T>
__global__ void rope_apply_kernel(T* __restrict__ x, int64_t ldx, int64_t n, int nheads, int half,
                                  const int32_t* __restrict__ pos, const float* __restrict__ cs, int64_t ldc,
                                  const float* __restrict__ sn, int64_t lds, float sgn) {
  const int64_t total = n * nheads * half;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t rh = t / half;  // row · nheads + head
    const int i = (int)(t - rh * half);
    const int64_t r = rh / nheads;
    const int h = (int)(rh - r * nheads);
    const int64_t p = pos[r];
    const float c = cs[p * ldc + i], s = sgn * sn[p * lds + i];
    T* a = x + r * ldx + (int64_t)h * 2 * half + i;  // element i of head h; its partner is half further
    T* b = a + half;
    const float x1 = cuda::load(a), x2 = cuda::load(b);
    cuda::store(a, x1 * c - x2 * s);
    cuda::store(b, x2 * c + x1 * s);
  }
}

// ---- SwiGLU --------------------------------------------------------------------------------

// gu (n, 2F) = [gate | up] -> a (n, F) = silu(gate) · up. One thread per V-element vector of a
// row: r = t / (F/V), columns j..j+V.
template <class T, int V>
__global__ void swiglu_forward_kernel(const T* __restrict__ gu, int64_t ldgu, T* __restrict__ a, int64_t lda,
                                      int64_t n, int F) {
  const int64_t FU = F / V, total = n * FU;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / FU;
    const int j = (int)(t - r * FU) * V;  // first column of this vector
    float g[V], u[V], o[V];
    load_vec<V>(gu + r * ldgu + j, g);
    load_vec<V>(gu + r * ldgu + F + j, u);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = g[k] * sigmoid(g[k]) * u[k];
    store_vec<V>(a + r * lda + j, o);
  }
}

// dgu (n, 2F) = [d gate | d up] from da (n, F): d up = da · silu(g), d gate = da · up · s ·
// (1 + g (1 - s)) with s = sigmoid(g). Vectors as in the forward.
template <class T, int V>
__global__ void swiglu_backward_kernel(const T* gu, int64_t ldgu, const T* __restrict__ da, int64_t ldda, T* dgu,
                                       int64_t lddgu, int64_t n, int F) {
  const int64_t FU = F / V, total = n * FU;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / FU;
    const int j = (int)(t - r * FU) * V;  // first column of this vector
    float g[V], u[V], d[V], dg[V], du[V];
    load_vec<V>(gu + r * ldgu + j, g);
    load_vec<V>(gu + r * ldgu + F + j, u);
    load_vec<V>(da + r * ldda + j, d);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float s = sigmoid(g[k]);
      const float silu = g[k] * s;
      du[k] = d[k] * silu;
      dg[k] = d[k] * u[k] * s * (1.0f + g[k] * (1.0f - s));
    }
    store_vec<V>(dgu + r * lddgu + j, dg);
    store_vec<V>(dgu + r * lddgu + F + j, du);
  }
}

}  // namespace

// ---- embedding ---------------------------------------------------------------------------------

void CudaBackend::embedding_forward(View tokens, View table, View out) {
  const char* op = "embedding_forward";
  const int64_t n = vec_len(tokens, DType::I32, false, op, "tokens");
  need_float(table, op, "table");
  need_float(out, op, "out");
  need_shape(table, table.rows, table.cols, op, "table");
  need_shape(out, n, table.cols, op, "out");
  // Token ids are not range-checked on the device (as on the CPU; the model checks them on the
  // host): each must lie in [0, table.rows).
  if (table.dtype == out.dtype) {
    gather_rows(table, tokens, out);  // a plain row gather, 16-byte vectors where aligned
    return;
  }
  if (n == 0 || table.cols == 0) return;
  cuda::dispatch_float(table.dtype, op, [&](auto ts) {
    using TS = decltype(ts);
    cuda::dispatch_float(out.dtype, op, [&](auto td) {
      using TD = decltype(td);
      embedding_convert_kernel<TS, TD><<<grid_capped(n * table.cols, kThreads, sm_count()), kThreads, 0, stream()>>>(
          cuda::ptr<const int32_t>(tokens), cuda::ptr<const TS>(table), table.ld, cuda::ptr<TD>(out), out.ld, n,
          table.cols);
      cuda_check_launch(op);
    });
  });
}

void CudaBackend::embedding_backward(View tokens, View dout, View dtable) {
  const char* op = "embedding_backward";
  const int64_t n = vec_len(tokens, DType::I32, false, op, "tokens");
  need_float(dout, op, "dout");
  cuda::expect(dtable, DType::F32, op, "dtable");
  need_shape(dtable, dtable.rows, dtable.cols, op, "dtable");
  need_shape(dout, n, dtable.cols, op, "dout");
  if (n == 0 || dtable.cols == 0) return;
  cuda::dispatch_float(dout.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    embedding_backward_kernel<T><<<grid_capped(n * dtable.cols, kThreads, sm_count()), kThreads, 0, stream()>>>(
        cuda::ptr<const int32_t>(tokens), cuda::ptr<const T>(dout), dout.ld, dtable.f32(), dtable.ld, n, dtable.cols);
    cuda_check_launch(op);
  });
}

// ---- RMSNorm -----------------------------------------------------------------------------------

void CudaBackend::rmsnorm_forward(View x, View g, View y, View rstd, float eps) {
  const char* op = "rmsnorm_forward";
  need_float(x, op, "x");
  const int64_t n = x.rows, C = x.cols;
  need_shape(x, n, C, op, "x");
  if (vec_len(g, DType::F32, true, op, "g") != C) fail(op, "g has " + std::to_string(g.numel()) + " elements, x " + std::to_string(C) + " columns");
  if (y.dtype != x.dtype) fail(op, std::string("y must be of x's dtype ") + dtype_name(x.dtype) + ", got " + dtype_name(y.dtype));
  need_shape(y, n, C, op, "y");
  if (vec_len(rstd, DType::F32, false, op, "rstd") != n) fail(op, "rstd has " + std::to_string(rstd.numel()) + " elements, x " + std::to_string(n) + " rows");
  if (C > INT32_MAX) fail(op, "too many columns");
  if (n == 0) return;
  if (C == 0) fail(op, "x has no columns");
  const unsigned grid = grid_capped(n * 32, kThreads, sm_count());  // one warp per row
  cuda::dispatch_float(x.dtype, op, [&](auto xt) {
    using T = decltype(xt);
    cuda::dispatch_float(g.dtype, op, [&](auto gt) {
      using TG = decltype(gt);
      auto go = [&](auto v) {
        constexpr int V = decltype(v)::value;
        rmsnorm_forward_kernel<T, TG, V><<<grid, kThreads, 0, stream()>>>(cuda::ptr<const T>(x), x.ld,
                                                                          cuda::ptr<const TG>(g), cuda::ptr<T>(y),
                                                                          y.ld, rstd.f32(), n, (int)C, eps);
      };
      if (vec16_ok(C, sizeof(T), {&x, &y})) go(std::integral_constant<int, kVec<T>>{});
      else go(std::integral_constant<int, 1>{});
      cuda_check_launch(op);
    });
  });
}

size_t CudaBackend::rmsnorm_scratch_bytes(int C) const {
  return sizeof(float) * (size_t)kRmsPartials * (size_t)std::max(C, 0);
}

void CudaBackend::rmsnorm_backward(View x, View g, View rstd, View dy, View dx, View dg, bool accumulate_dx,
                                   Scratch s) {
  const char* op = "rmsnorm_backward";
  need_float(x, op, "x");
  const int64_t n = x.rows, C = x.cols;
  need_shape(x, n, C, op, "x");
  if (vec_len(g, DType::F32, true, op, "g") != C) fail(op, "g has " + std::to_string(g.numel()) + " elements, x " + std::to_string(C) + " columns");
  if (vec_len(rstd, DType::F32, false, op, "rstd") != n) fail(op, "rstd has " + std::to_string(rstd.numel()) + " elements, x " + std::to_string(n) + " rows");
  if (dy.dtype != x.dtype) fail(op, std::string("dy must be of x's dtype ") + dtype_name(x.dtype) + ", got " + dtype_name(dy.dtype));
  if (dx.dtype != x.dtype) fail(op, std::string("dx must be of x's dtype ") + dtype_name(x.dtype) + ", got " + dtype_name(dx.dtype));
  need_shape(dy, n, C, op, "dy");
  need_shape(dx, n, C, op, "dx");
  if (vec_len(dg, DType::F32, false, op, "dg") != C) fail(op, "dg has " + std::to_string(dg.numel()) + " elements, x " + std::to_string(C) + " columns");
  if (C > INT32_MAX) fail(op, "too many columns");
  const size_t need = rmsnorm_scratch_bytes((int)C);
  if (s.bytes < need || (need && !s.data))
    fail(op, "scratch of " + std::to_string(s.bytes) + " bytes, needs " + std::to_string(need));
  if (n == 0) return;
  if (C == 0) fail(op, "x has no columns");
  // Row-blocks of the dg partials: P <= kRmsPartials blocks of `chunk` rows, a function of n only.
  const int64_t chunk = (n + kRmsPartials - 1) / kRmsPartials;
  const int P = (int)((n + chunk - 1) / chunk);
  float* part = static_cast<float*>(s.data);
  const unsigned grid_rows = grid_capped(n * 32, kThreads, sm_count());  // one warp per row
  cuda::dispatch_float(x.dtype, op, [&](auto xt) {
    using T = decltype(xt);
    // dg first: it reads dy, which dx may alias.
    const dim3 pgrid((unsigned)((C + kDgThreads - 1) / kDgThreads), (unsigned)P);
    rmsnorm_dg_partial_kernel<T><<<pgrid, kDgThreads, 0, stream()>>>(cuda::ptr<const T>(x), x.ld, cuda::ptr<const T>(dy),
                                                                     dy.ld, rstd.f32(), part, n, (int)C, chunk);
    cuda_check_launch("rmsnorm_backward (dg partial sums)");
    rmsnorm_dg_reduce_kernel<<<grid_capped(C, kThreads, sm_count()), kThreads, 0, stream()>>>(part, P, (int)C,
                                                                                              dg.f32());
    cuda_check_launch("rmsnorm_backward (dg reduction)");
    cuda::dispatch_float(g.dtype, op, [&](auto gt) {
      using TG = decltype(gt);
      auto go = [&](auto v) {
        constexpr int V = decltype(v)::value;
        rmsnorm_dx_kernel<T, TG, V><<<grid_rows, kThreads, 0, stream()>>>(
            cuda::ptr<const T>(x), x.ld, cuda::ptr<const TG>(g), rstd.f32(), cuda::ptr<const T>(dy), dy.ld,
            cuda::ptr<T>(dx), dx.ld, n, (int)C, accumulate_dx);
      };
      if (vec16_ok(C, sizeof(T), {&x, &dy, &dx})) go(std::integral_constant<int, kVec<T>>{});
      else go(std::integral_constant<int, 1>{});
      cuda_check_launch("rmsnorm_backward (dx)");
    });
  });
}

// ---- RoPE --------------------------------------------------------------------------------------

void CudaBackend::rope_table(View cos, View sin, int head_dim, float base) {
  const char* op = "rope_table";
  if (head_dim <= 0 || head_dim % 2) fail(op, "head_dim must be positive and even, got " + std::to_string(head_dim));
  const int half = head_dim / 2;
  cuda::expect(cos, DType::F32, op, "cos");
  cuda::expect(sin, DType::F32, op, "sin");
  need_shape(cos, cos.rows, half, op, "cos");
  need_shape(sin, cos.rows, half, op, "sin");
  const int64_t max_pos = cos.rows;
  if (max_pos == 0) return;
  rope_table_kernel<<<grid_capped(max_pos * half, kThreads, sm_count()), kThreads, 0, stream()>>>(
      cos.f32(), cos.ld, sin.f32(), sin.ld, max_pos, half, head_dim, (double)base);
  cuda_check_launch(op);
}

void CudaBackend::rope_apply(View x, View pos, View cos, View sin, int head_dim, bool inverse) {
  const char* op = "rope_apply";
  if (head_dim <= 0 || head_dim % 2) fail(op, "head_dim must be positive and even, got " + std::to_string(head_dim));
  const int half = head_dim / 2;
  need_float(x, op, "x");
  need_shape(x, x.rows, x.cols, op, "x");
  if (x.cols % head_dim) fail(op, "x has " + std::to_string(x.cols) + " columns, not a multiple of head_dim " + std::to_string(head_dim));
  const int64_t n = x.rows;
  const int nheads = (int)(x.cols / head_dim);
  if (vec_len(pos, DType::I32, false, op, "pos") != n) fail(op, "pos has " + std::to_string(pos.numel()) + " entries, x " + std::to_string(n) + " rows");
  cuda::expect(cos, DType::F32, op, "cos");
  cuda::expect(sin, DType::F32, op, "sin");
  need_shape(cos, cos.rows, half, op, "cos");
  need_shape(sin, cos.rows, half, op, "sin");
  // Positions are not range-checked on the device (as on the CPU): each must lie in [0, cos.rows).
  if (n == 0 || nheads == 0) return;
  cuda::dispatch_float(x.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    rope_apply_kernel<T><<<grid_capped(n * nheads * half, kThreads, sm_count()), kThreads, 0, stream()>>>(
        cuda::ptr<T>(x), x.ld, n, nheads, half, cuda::ptr<const int32_t>(pos), cos.f32(), cos.ld, sin.f32(), sin.ld,
        inverse ? -1.0f : 1.0f);
    cuda_check_launch(op);
  });
}

// ---- SwiGLU ------------------------------------------------------------------------------------

void CudaBackend::swiglu_forward(View gu, View a) {
  const char* op = "swiglu_forward";
  need_float(gu, op, "gu");
  if (a.dtype != gu.dtype) fail(op, std::string("a must be of gu's dtype ") + dtype_name(gu.dtype) + ", got " + dtype_name(a.dtype));
  const int64_t n = gu.rows, F = a.cols;
  need_shape(gu, n, 2 * F, op, "gu");
  need_shape(a, n, F, op, "a");
  if (F > INT32_MAX / 2) fail(op, "too many columns");
  if (n == 0 || F == 0) return;
  cuda::dispatch_float(gu.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto v) {
      constexpr int V = decltype(v)::value;
      swiglu_forward_kernel<T, V><<<grid_capped(n * (F / V), kThreads, sm_count()), kThreads, 0, stream()>>>(
          cuda::ptr<const T>(gu), gu.ld, cuda::ptr<T>(a), a.ld, n, (int)F);
    };
    // F a whole number of vectors also keeps the up half (column F) 16-byte aligned.
    if (vec16_ok(F, sizeof(T), {&gu, &a})) go(std::integral_constant<int, kVec<T>>{});
    else go(std::integral_constant<int, 1>{});
    cuda_check_launch(op);
  });
}

void CudaBackend::swiglu_backward(View gu, View da, View dgu) {
  const char* op = "swiglu_backward";
  need_float(gu, op, "gu");
  if (da.dtype != gu.dtype) fail(op, std::string("da must be of gu's dtype ") + dtype_name(gu.dtype) + ", got " + dtype_name(da.dtype));
  if (dgu.dtype != gu.dtype) fail(op, std::string("dgu must be of gu's dtype ") + dtype_name(gu.dtype) + ", got " + dtype_name(dgu.dtype));
  const int64_t n = gu.rows, F = da.cols;
  need_shape(gu, n, 2 * F, op, "gu");
  need_shape(da, n, F, op, "da");
  need_shape(dgu, n, 2 * F, op, "dgu");
  if (F > INT32_MAX / 2) fail(op, "too many columns");
  if (n == 0 || F == 0) return;
  cuda::dispatch_float(gu.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto v) {
      constexpr int V = decltype(v)::value;
      swiglu_backward_kernel<T, V><<<grid_capped(n * (F / V), kThreads, sm_count()), kThreads, 0, stream()>>>(
          cuda::ptr<const T>(gu), gu.ld, cuda::ptr<const T>(da), da.ld, cuda::ptr<T>(dgu), dgu.ld, n, (int)F);
    };
    if (vec16_ok(F, sizeof(T), {&gu, &da, &dgu})) go(std::integral_constant<int, kVec<T>>{});
    else go(std::integral_constant<int, 1>{});
    cuda_check_launch(op);
  });
}

}  // namespace subllm
