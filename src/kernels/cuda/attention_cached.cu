// Attention of m new queries against a key/value cache on the GPU (CudaBackend::attention_cached):
// q (m, H*hd) are the last m of L positions; k, v (L, Hkv*hd) the cache (one shared row stride;
// query head h reads key/value head h / G, G = H / Hkv);
// query i sees cache rows [0, L - m + i]; out (m, H*hd). Scale 1/sqrt(hd), math in f32.
//
// Decoding (small m) runs "flash-decoding": a CTA of 4 warps per (query, head, slice of keys),
// each warp an online softmax over its part of the slice (keys 8 at a time, lanes over the head
// dims), the 4 warps merged in shared memory into a partial (max, sum, unnormalised o) in
// scratch; a second kernel merges the slices in a fixed order (deterministic). With one slice
// the first kernel writes the output directly and no scratch is needed. Chunked prefill with
// m >= 64 BF16 queries of head dim 64 or 128 reuses the tensor-core forward of attention.cu.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/cuda/common.cuh"

namespace subllm {
namespace cuda {

// Defined in attention.cu: the tensor-core forward of Tq queries at positions q_off.. against Tk
// keys; false when the shape, dtype or alignment does not fit it (nothing launched).
bool flash_forward_bf16(cudaStream_t stream, const View& q, const View& k, const View& v, const View& o, float* lse,
                        int B, int Tq, int Tk, int q_off, int H, int hd, int G);

namespace {

constexpr int kWarps = 4;          // warps per CTA of the partial kernel
constexpr int kChunk = 8;          // keys per step of a warp
constexpr int kMinSliceKeys = 256; // keys per slice at least
constexpr int kMaxSplits = 64;
constexpr int kFlashMinRows = 64;  // from this many BF16 queries on, the tensor-core forward

// Slices of the keys per (query, head): enough CTAs to fill the GPU (about 4 per SM), slices
// of at least kMinSliceKeys keys. A pure function of the shape, so scratch sizing and the launch
// agree.
int cached_splits(int m, int L, int H, int sms) {
  const int64_t rows = (int64_t)m * H;
  const int64_t want = (4 * (int64_t)std::max(sms, 1) + rows - 1) / rows;
  const int64_t most = (L + kMinSliceKeys - 1) / kMinSliceKeys;
  return (int)std::max<int64_t>(1, std::min<int64_t>({want, most, (int64_t)kMaxSplits}));
}

template <class T>
struct CachedArgs {
  const T *q, *k, *v;
  T* out;
  float* part;  // (m, H, n_split, hd + 2): {max, sum, o[hd]} per slice; null when n_split == 1
  int64_t ldq, ldkv, ldo;
  int m, L, H, hd, n_split;
  int G;  // query heads per key/value head (grouped-query attention; 1 without)
  float scale;
};

// grid (n_split, H, m), 128 threads. Slice s of query i covers keys
// [s * slice, min((s + 1) * slice, n_i)), n_i = L - m + i + 1; warp w takes a contiguous quarter.
// Lane l holds head dims l + 32 r, r < EPL.
template <class T, int EPL>
__global__ void __launch_bounds__(kWarps * 32) cached_partial_kernel(CachedArgs<T> a) {
  __shared__ float sm_m[kWarps], sm_l[kWarps];
  __shared__ float sm_o[kWarps][EPL * 32];
  const int s = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n_i = a.L - a.m + i + 1;  // keys this query sees
  const int slice = (a.L + a.n_split - 1) / a.n_split;
  const int js = s * slice, je = min(js + slice, n_i);
  const int sub = (slice + kWarps - 1) / kWarps;
  const int wj0 = js + warp * sub, wj1 = min(wj0 + sub, je);  // this warp's keys [wj0, wj1)

  const T* qr = a.q + (int64_t)i * a.ldq + h * a.hd;
  const T* kh = a.k + (h / a.G) * a.hd;
  const T* vh = a.v + (h / a.G) * a.hd;
  float qv[EPL], acc[EPL];
#pragma unroll
  for (int r = 0; r < EPL; ++r) {
    const int d = lane + 32 * r;
    qv[r] = d < a.hd ? load(qr + d) * a.scale : 0.f;  // scale folded into q
    acc[r] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j0 = wj0; j0 < wj1; j0 += kChunk) {
    float sc[kChunk];
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      float part = 0.f;
      if (j0 + c < wj1) {  // warp-uniform
        const T* kr = kh + (int64_t)(j0 + c) * a.ldkv;
#pragma unroll
        for (int r = 0; r < EPL; ++r) {
          const int d = lane + 32 * r;
          if (d < a.hd) part += qv[r] * load(kr + d);
        }
      }
      sc[c] = part;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int c = 0; c < kChunk; ++c) sc[c] += __shfl_xor_sync(0xffffffffu, sc[c], o);
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      if (j0 + c >= wj1) sc[c] = -INFINITY;
      mx = fmaxf(mx, sc[c]);
    }
    const float mn = fmaxf(m, mx);  // finite: key j0 < wj1 is valid
    const float alpha = expf(m - mn);  // 0 on the first chunk (m = -inf)
    l *= alpha;
#pragma unroll
    for (int r = 0; r < EPL; ++r) acc[r] *= alpha;
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      if (j0 + c < wj1) {
        const float pj = expf(sc[c] - mn);
        l += pj;
        const T* vr = vh + (int64_t)(j0 + c) * a.ldkv;
#pragma unroll
        for (int r = 0; r < EPL; ++r) {
          const int d = lane + 32 * r;
          if (d < a.hd) acc[r] += pj * load(vr + d);
        }
      }
    }
    m = mn;
  }

  // Merge the warps: weights exp(m_w - M); an empty warp (m_w = -inf) weighs 0.
#pragma unroll
  for (int r = 0; r < EPL; ++r) sm_o[warp][lane + 32 * r] = acc[r];
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm_m[w]);
  float wt[kWarps], lsum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    wt[w] = sm_m[w] == -INFINITY ? 0.f : expf(sm_m[w] - M);
    lsum += wt[w] * sm_l[w];
  }
  if (a.n_split == 1) {
    // One slice: the whole softmax is here (n_i >= 1, so M is finite and lsum > 0).
    T* orow = a.out + (int64_t)i * a.ldo + h * a.hd;
    const float inv = 1.f / lsum;
    for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += wt[w] * sm_o[w][d];
      store(orow + d, o * inv);
    }
  } else {
    float* pp = a.part + (((int64_t)i * a.H + h) * a.n_split + s) * (a.hd + 2);
    if (threadIdx.x == 0) {
      pp[0] = M;  // -inf for an empty slice (keys past this query)
      pp[1] = lsum;
    }
    for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += wt[w] * sm_o[w][d];
      pp[2 + d] = o;
    }
  }
}

// grid (H, m), 128 threads: out(i, h) = sum_s w_s o_s / sum_s w_s l_s, w_s = exp(M_s - max M),
// slices in order. Slice 0 always holds key 0, so max M is finite.
template <class T>
__global__ void __launch_bounds__(128) cached_combine_kernel(CachedArgs<T> a) {
  const int h = blockIdx.x, i = blockIdx.y;
  const float* pp = a.part + ((int64_t)i * a.H + h) * a.n_split * (a.hd + 2);
  const int stride = a.hd + 2;
  float M = -INFINITY;
  for (int s = 0; s < a.n_split; ++s) M = fmaxf(M, pp[s * stride]);
  float lsum = 0.f;
  for (int s = 0; s < a.n_split; ++s) {
    const float ms = pp[s * stride];
    if (ms != -INFINITY) lsum += expf(ms - M) * pp[s * stride + 1];
  }
  const float inv = 1.f / lsum;
  T* orow = a.out + (int64_t)i * a.ldo + h * a.hd;
  for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < a.n_split; ++s) {
      const float ms = pp[s * stride];
      if (ms != -INFINITY) o += expf(ms - M) * pp[s * stride + 2 + d];
    }
    store(orow + d, o * inv);
  }
}

}  // namespace
}  // namespace cuda

size_t CudaBackend::attention_cached_scratch_bytes(int m, int L, int H, int hd) const {
  if (m <= 0 || L <= 0 || H <= 0 || hd <= 0) return 0;
  const int ns = cuda::cached_splits(m, L, H, sm_count());
  // Partials only exist with more than one slice (the tensor-core path needs none either).
  return ns > 1 ? sizeof(float) * (size_t)m * H * ns * (hd + 2) : 0;
}

void CudaBackend::attention_cached(View q, View k, View v, View out, int H, Scratch s) {
  const char* op = "attention_cached";
  if (H <= 0) throw Error("attention_cached: H must be positive");
  if (!q.data || !k.data || !v.data || !out.data) throw Error("attention_cached: an operand is empty");
  if (q.cols % H != 0)
    throw Error("attention_cached: q has " + std::to_string(q.cols) + " columns, not a multiple of H = " +
                std::to_string(H));
  const int hd = (int)(q.cols / H);
  if (hd < 1 || hd > 256)
    throw Error("attention_cached: head dim " + std::to_string(hd) + " is not supported (1..256; fast: 64, 128)");
  const int m = (int)q.rows, L = (int)k.rows;
  if (m < 1 || m > L)
    throw Error("attention_cached: q has " + std::to_string(m) + " rows; need 1..L, L = " + std::to_string(L));
  const int Hkv = attention_kv_heads(q, k, v, H, op), G = H / Hkv;
  if (v.rows != L) throw Error("attention_cached: k and v must both be (L, Hkv*hd)");
  if (out.rows != m || out.cols != q.cols) throw Error("attention_cached: out must be shaped like q");
  if (k.dtype != q.dtype || v.dtype != q.dtype || out.dtype != q.dtype)
    throw Error("attention_cached: q, k, v and out must share one dtype");
  if (k.ld != v.ld) throw Error("attention_cached: the key and value caches share one row stride");
  if (q.ld < q.cols || k.ld < k.cols || out.ld < out.cols) throw Error("attention_cached: a row stride is below cols");

  if (m >= cuda::kFlashMinRows &&
      cuda::flash_forward_bf16(stream(), q, k, v, out, nullptr, 1, m, L, L - m, H, hd, G))
    return;
  // The slice kernels put the queries on gridDim.z (and the combine on gridDim.y).
  if (m > 65535)
    throw Error("attention_cached: " + std::to_string(m) + " queries; at most 65535 outside the BF16 hd 64/128 path");

  const int ns = cuda::cached_splits(m, L, H, sm_count());
  const size_t need = attention_cached_scratch_bytes(m, L, H, hd);
  if (need > 0 && (!s.data || s.bytes < need))
    throw Error("attention_cached: scratch of " + std::to_string(s.bytes) + " bytes, need " + std::to_string(need));

  cuda::dispatch_float(q.dtype, op, [&](auto tag) {
    using Tp = decltype(tag);
    cuda::CachedArgs<Tp> a{};
    a.q = cuda::ptr<const Tp>(q);
    a.k = cuda::ptr<const Tp>(k);
    a.v = cuda::ptr<const Tp>(v);
    a.out = cuda::ptr<Tp>(out);
    a.part = ns > 1 ? static_cast<float*>(s.data) : nullptr;
    a.ldq = q.ld;
    a.ldkv = k.ld;
    a.ldo = out.ld;
    a.m = m, a.L = L, a.H = H, a.hd = hd, a.n_split = ns, a.G = G;
    a.scale = 1.0f / std::sqrt((float)hd);
    const dim3 grid((unsigned)ns, (unsigned)H, (unsigned)m);
    auto launch = [&](auto epl) {
      cuda::cached_partial_kernel<Tp, decltype(epl)::value><<<grid, cuda::kWarps * 32, 0, stream()>>>(a);
    };
    if (hd <= 32) launch(std::integral_constant<int, 1>{});
    else if (hd <= 64) launch(std::integral_constant<int, 2>{});
    else if (hd <= 128) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 8>{});
    cuda_check_launch("attention_cached (slices)");
    if (ns > 1) {
      cuda::cached_combine_kernel<Tp><<<dim3((unsigned)H, (unsigned)m), 128, 0, stream()>>>(a);
      cuda_check_launch("attention_cached (combine)");
    }
  });
}

}  // namespace subllm
