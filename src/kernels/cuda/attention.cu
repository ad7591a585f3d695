// Causal multi-head attention on the GPU (CudaBackend::attention_forward / attention_backward).
//
// Layout (backend.h): q is (B*T, H*hd), k and v (B*T, Hkv*hd) (grouped-query attention: query
// head h reads key/value head h / G, G = H / Hkv), column views of a fused qkv matrix sharing one
// row stride; row b*T + t, head h lives at columns [h*hd, (h+1)*hd). o and dout (B*T, H*hd) with
// their own stride; lse (B, H, T) F32 holds the natural-log log-sum-exp of the scaled scores
// s = q·k / sqrt(hd) of each query row (as the CPU kernels store it). Backward overwrites dq, dk,
// dv (one shared stride).
//
// Two implementations:
//  - BF16 views, hd 64 or 128, 16-byte aligned rows: FlashAttention-2 on tensor cores
//    (mma.sync m16n8k16 bf16 -> f32, inline PTX). Forward: a CTA of 4 warps per (64-query tile,
//    b, h), each warp owning 16 query rows; K/V tiles of 64 rows double-buffered in shared
//    memory by cp.async; online softmax in f32 in base-2 units. Backward (deterministic, no
//    atomics): D = rowsum(dO ∘ O) into scratch, then one kernel per 64-key tile accumulating dK,
//    dV over the query tiles and one kernel per 64-query tile accumulating dQ over the key tiles,
//    both recomputing P from lse.
//  - Everything else (F32 views, or BF16 with another head size up to 256, or misaligned
//    views): simple warp-per-row kernels with the math in f32, the reference-grade path that
//    `cuda:fp32` uses to be checked tightly against the CPU.
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
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxHeadDim = 256;  // the simple kernels keep hd / 32 <= 8 values per lane

// =====================================================================================
// Tensor-core helpers (bf16 mma.sync m16n8k16, f32 accumulate).
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16x16, row-major): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..2t+1],
//                         reg2 = A[g][2t+8..2t+9], reg3 = A[g+8][2t+8..2t+9]
//   B (16x8, "col"):      reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C (16x8, f32):        c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// In a packed register the lower-indexed element sits in the low 16 bits.
// =====================================================================================

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a packed bf16x2 register: lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (lower address), .y = hi
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two adjacent bf16 of shared memory (even element index) as one register.
__device__ __forceinline__ uint32_t lds32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A fragment of rows [r0, r0+16), cols [c0, c0+16) of a row-major bf16 tile with stride lds.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* s, int lds, int r0, int c0, int g, int t) {
  const bf16* p = s + (r0 + g) * lds + c0 + 2 * t;
  a[0] = lds32(p);
  a[1] = lds32(p + 8 * lds);
  a[2] = lds32(p + 8);
  a[3] = lds32(p + 8 * lds + 8);
}

// B fragment with B[k][n] = M[n0 + n][k0 + k], M row-major with stride lds ("n-major": the rows
// of M are the columns of B, e.g. K in S = Q K^T).
__device__ __forceinline__ void load_b_nmajor(uint32_t& b0, uint32_t& b1, const bf16* s, int lds, int n0, int k0,
                                              int g, int t) {
  const bf16* p = s + (n0 + g) * lds + k0 + 2 * t;
  b0 = lds32(p);
  b1 = lds32(p + 8);
}

// B fragments of two adjacent n-tiles with B[k][n] = M[k0 + k][n0 + n], M row-major with stride
// lds ("k-major", e.g. V in O = P V): (b[0], b[1]) for columns [n0, n0+8), (b[2], b[3]) for
// [n0+8, n0+16). ldmatrix.x4.trans: lane l gives the address of row (l % 8) of 8x8 matrix l / 8;
// matrices are (k0, n0), (k0+8, n0), (k0, n0+8), (k0+8, n0+8); transposed, lane (g, t) receives
// M[row 2t, 2t+1][col g] of each, which is exactly B's reg0 / reg1 layout.
__device__ __forceinline__ void load_b_kmajor_x2(uint32_t (&b)[4], const bf16* s, int lds, int k0, int n0, int lane) {
#ifndef SUBLLM_ATTN_NO_LDMATRIX
  const int mi = lane >> 3, rr = lane & 7;
  const bf16* p = s + (k0 + rr + (mi & 1) * 8) * lds + n0 + (mi >> 1) * 8;
  const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(addr));
#else
  // The same fragments element by element (debugging aid; slower).
  const int g = lane >> 2, t = lane & 3;
  auto pair = [&](int k, int n) {
    const unsigned short lo = *reinterpret_cast<const unsigned short*>(s + k * lds + n);
    const unsigned short hi = *reinterpret_cast<const unsigned short*>(s + (k + 1) * lds + n);
    return (uint32_t)lo | ((uint32_t)hi << 16);
  };
  b[0] = pair(k0 + 2 * t, n0 + g);
  b[1] = pair(k0 + 8 + 2 * t, n0 + g);
  b[2] = pair(k0 + 2 * t, n0 + 8 + g);
  b[3] = pair(k0 + 8 + 2 * t, n0 + 8 + g);
#endif
}

// 16-byte global -> shared copy; src_bytes 0 writes zeros (rows past the end).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Rows [0, rows) of a (rows, HD) tile whose row r is at g + r * ld (bf16), into shared memory
// with stride HD + 8; rows in [valid, rows) are zero-filled and never read from global memory.
template <int HD>
__device__ __forceinline__ void tile_to_smem(bf16* s, const bf16* g, int64_t ld, int rows, int valid) {
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < rows * kChunks; c += blockDim.x) {
    const int r = c / kChunks, cc = c % kChunks;
    const bool ok = r < valid;
    cp_async16(s + r * (HD + 8) + cc * 8, ok ? g + (int64_t)r * ld + cc * 8 : g, ok);
  }
}

// Max / sum over the 4 lanes of a quad (the lanes holding one row of a C fragment).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// =====================================================================================
// Tensor-core forward.
// Queries: Tq rows per batch entry at absolute positions q_off + r; keys: Tk rows per batch
// entry; query at position p sees keys [0, p]. Training: Tq = Tk = T, q_off = 0. (The cached
// path of attention_cached.cu reuses it with B = 1, Tq = m, Tk = L, q_off = L - m.)
// =====================================================================================
struct FwdArgs {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  bf16* o;
  float* lse;  // (B, H, Tq) or null
  int64_t ldq, ldkv, ldo;
  int Tq, Tk, q_off, H;
  int G;             // query heads per key/value head (grouped-query attention; 1 without)
  float scale_log2;  // log2(e) / sqrt(hd)
};

constexpr int kFwdBr = 64, kFwdBc = 64, kFwdThreads = 128;

template <int HD>
constexpr size_t fwd_smem_bytes() {
  return sizeof(bf16) * 4 * kFwdBc * (HD + 8);  // [K0][V0][K1][V1]; Q staged in [K1][V1]
}

// grid (B*H, n_qtiles), 128 threads. blockIdx.y = 0 is the last (heaviest) query tile.
template <int HD>
__global__ void __launch_bounds__(kFwdThreads) flash_fwd_kernel(FwdArgs p) {
  constexpr int LDS = HD + 8;  // padded smem row: 8 consecutive rows hit distinct banks
  constexpr int kTile = kFwdBc * LDS;
  constexpr int KC = HD / 16;      // k-chunks of the head dim
  constexpr int NT = kFwdBc / 8;   // n-tiles of a key tile (S columns)
  constexpr int DT = HD / 8;       // n-tiles of the head dim (O columns)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sm = reinterpret_cast<bf16*>(smem_raw);
  bf16* const Qs = sm + 2 * kTile;  // aliases buffer 1; consumed into registers before it is reused

  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kFwdBr;  // heavy (late) tiles first
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nq = min(kFwdBr, p.Tq - q0);
  // Keys seen by any query of the tile: [0, kend).
  const int kend = min(p.Tk, p.q_off + q0 + nq);
  const int n_kt = (kend + kFwdBc - 1) / kFwdBc;

  const bf16* qg = p.q + ((int64_t)b * p.Tq + q0) * p.ldq + h * HD;
  const bf16* kg = p.k + (int64_t)b * p.Tk * p.ldkv + (h / p.G) * HD;
  const bf16* vg = p.v + (int64_t)b * p.Tk * p.ldkv + (h / p.G) * HD;

  tile_to_smem<HD>(Qs, qg, p.ldq, kFwdBr, nq);
  tile_to_smem<HD>(sm, kg, p.ldkv, kFwdBc, min(kFwdBc, p.Tk));
  tile_to_smem<HD>(sm + kTile, vg, p.ldkv, kFwdBc, min(kFwdBc, p.Tk));
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t qf[KC][4];  // this warp's 16 query rows as A fragments
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) load_a(qf[kc], Qs, LDS, warp * 16, kc * 16, g, t);

  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY;  // running max (base 2) of rows g and g + 8
  float l_a = 0.f, l_b = 0.f;              // this lane's part of the running sums
  const int pos_a = p.q_off + q0 + warp * 16 + g, pos_b = pos_a + 8;  // absolute query positions

  for (int kt = 0; kt < n_kt; ++kt) {
    if (kt > 0) cp_async_wait_all();  // tile kt (issued last iteration) has landed
    __syncthreads();                  // ...for every thread; and buffer (kt+1)&1 is free
    if (kt + 1 < n_kt) {
      const int k1 = (kt + 1) * kFwdBc;
      bf16* nb = sm + ((kt + 1) & 1) * 2 * kTile;
      tile_to_smem<HD>(nb, kg + (int64_t)k1 * p.ldkv, p.ldkv, kFwdBc, min(kFwdBc, p.Tk - k1));
      tile_to_smem<HD>(nb + kTile, vg + (int64_t)k1 * p.ldkv, p.ldkv, kFwdBc, min(kFwdBc, p.Tk - k1));
      cp_async_commit();
    }
    const bf16* Ks = sm + (kt & 1) * 2 * kTile;
    const bf16* Vs = Ks + kTile;
    const int k0 = kt * kFwdBc;

    // S = Q K^T for 16 rows x 64 keys.
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        uint32_t b0, b1;
        load_b_nmajor(b0, b1, Ks, LDS, n * 8, kc * 16, g, t);
        mma_bf16(s[n], qf[kc], b0, b1);
      }
    }

    // Scale to base-2 units; mask keys past the causal diagonal or past the sequence.
    const bool need_mask = (k0 + kFwdBc - 1 > p.q_off + q0) || (k0 + kFwdBc > p.Tk);
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * p.scale_log2;
        if (need_mask) {
          const int j = k0 + n * 8 + 2 * t + (e & 1);  // key of element e
          const int pos = e < 2 ? pos_a : pos_b;
          if (j > pos || j >= p.Tk) x = -INFINITY;
        }
        s[n][e] = x;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
    }
    // Key 0 is in tile 0 and visible to every row, so after tile 0 the running max is finite
    // and exp2(-inf - finite) = 0 handles masked entries and the first rescale.
    const float mn_a = fmaxf(m_a, quad_max(mx_a)), mn_b = fmaxf(m_b, quad_max(mx_b));
    const float al_a = exp2f(m_a - mn_a), al_b = exp2f(m_b - mn_b);
    m_a = mn_a;
    m_b = mn_b;
    float rs_a = 0.f, rs_b = 0.f;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      s[n][0] = exp2f(s[n][0] - mn_a);
      s[n][1] = exp2f(s[n][1] - mn_a);
      s[n][2] = exp2f(s[n][2] - mn_b);
      s[n][3] = exp2f(s[n][3] - mn_b);
      rs_a += s[n][0] + s[n][1];
      rs_b += s[n][2] + s[n][3];
    }
    l_a = l_a * al_a + rs_a;
    l_b = l_b * al_b + rs_b;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= al_a;
      o[d][1] *= al_a;
      o[d][2] *= al_b;
      o[d][3] *= al_b;
    }

    // O += P V: P's C fragments of key columns [16kk, 16kk+16) are the A fragment of chunk kk.
#pragma unroll
    for (int kk = 0; kk < kFwdBc / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int d = 0; d < DT; d += 2) {
        uint32_t bv[4];
        load_b_kmajor_x2(bv, Vs, LDS, kk * 16, d * 8, lane);
        mma_bf16(o[d], a, bv[0], bv[1]);
        mma_bf16(o[d + 1], a, bv[2], bv[3]);
      }
    }
  }

  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  const float inv_a = 1.f / l_a, inv_b = 1.f / l_b;
  const int r_a = q0 + warp * 16 + g, r_b = r_a + 8;  // rows within the batch entry
  bf16* og = p.o + (int64_t)b * p.Tq * p.ldo + h * HD + 2 * t;
#pragma unroll
  for (int d = 0; d < DT; ++d) {
    if (r_a < p.Tq)
      *reinterpret_cast<uint32_t*>(og + (int64_t)r_a * p.ldo + d * 8) = pack_bf16(o[d][0] * inv_a, o[d][1] * inv_a);
    if (r_b < p.Tq)
      *reinterpret_cast<uint32_t*>(og + (int64_t)r_b * p.ldo + d * 8) = pack_bf16(o[d][2] * inv_b, o[d][3] * inv_b);
  }
  if (p.lse && t == 0) {
    float* lrow = p.lse + (int64_t)bh * p.Tq;
    if (r_a < p.Tq) lrow[r_a] = m_a * kLn2 + logf(l_a);  // m is in base-2 units
    if (r_b < p.Tq) lrow[r_b] = m_b * kLn2 + logf(l_b);
  }
}

// =====================================================================================
// Tensor-core backward.
// =====================================================================================
struct BwdArgs {
  const bf16 *q, *k, *v, *dout;
  const float* lse;  // (B, H, T)
  const float* D;    // (B, H, T): rowsum(dout ∘ o)
  bf16 *dq, *dk, *dv;
  int64_t ldqkv, ldo, ldd;
  int T, H;
  int G;  // query heads per key/value head (grouped-query attention; 1 without)
  float scale, scale_log2;
};

constexpr int kBwdThreads = 128;
// Query rows per step of the dK/dV kernel and key rows per step of the dQ kernel: 32 at
// hd = 128 keeps the S / dP fragments small enough for the dK, dV (or dQ) accumulators.
template <int HD>
constexpr int bwd_step() {
  return HD <= 64 ? 64 : 32;
}
template <int HD>
constexpr size_t bwd_smem_bytes() {
  // 64 resident rows of two tensors + two buffers of bwd_step rows of two tensors, + 2 x 2 x step floats.
  return sizeof(bf16) * (2 * 64 + 4 * bwd_step<HD>()) * (HD + 8) + sizeof(float) * 4 * bwd_step<HD>();
}

// dK, dV of 64 keys of one (b, key/value head); grid (B*H/G, n_ktiles), 128 threads; warp w owns
// keys k0 + 16w .. +15. Loops over the G query heads of the group, in order, and for each over
// query blocks of BQ rows from k0 to T (earlier queries cannot see these keys), accumulating
// into the same registers: dk, dv sum over the group in a fixed order. blockIdx.y = 0 is key
// tile 0, which sees the most queries.
template <int HD>
__global__ void __launch_bounds__(kBwdThreads) flash_bwd_dkdv_kernel(BwdArgs p) {
  constexpr int BQ = bwd_step<HD>();
  constexpr int LDS = HD + 8;
  constexpr int KC = HD / 16, NT = BQ / 8, DT = HD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* const Ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* const Vs = Ks + 64 * LDS;
  bf16* const QB = Vs + 64 * LDS;                 // 2 buffers x {Q (BQ rows), dO (BQ rows)}
  float* const FB = reinterpret_cast<float*>(QB + 4 * BQ * LDS);  // 2 buffers x {lse2 (BQ), D (BQ)}

  const int Hkv = p.H / p.G;
  const int bkv = blockIdx.x, b = bkv / Hkv, kvh = bkv % Hkv;
  const int k0 = blockIdx.y * 64;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int T = p.T;
  const int64_t row0 = (int64_t)b * T;  // first row of this batch entry
  const int n_blk = (T - k0 + BQ - 1) / BQ;  // query blocks per head
  const int n_it = n_blk * p.G;             // over the group's heads

  // Issues the loads of step `it` (query head kvh*G + it / n_blk, block it % n_blk) into buffer
  // it & 1 (cp.async for Q, dO; plain for lse, D).
  auto issue = [&](int it) {
    const int h = kvh * p.G + it / n_blk, bh = b * p.H + h;
    const bf16* qg = p.q + row0 * p.ldqkv + h * HD;
    const bf16* dog = p.dout + row0 * p.ldo + h * HD;
    const float* lseg = p.lse + (int64_t)bh * T;
    const float* Dg = p.D + (int64_t)bh * T;
    const int i0 = k0 + (it % n_blk) * BQ, valid = min(BQ, T - i0);
    bf16* qb = QB + (it & 1) * 2 * BQ * LDS;
    tile_to_smem<HD>(qb, qg + (int64_t)i0 * p.ldqkv, p.ldqkv, BQ, valid);
    tile_to_smem<HD>(qb + BQ * LDS, dog + (int64_t)i0 * p.ldo, p.ldo, BQ, valid);
    cp_async_commit();
    float* fb = FB + (it & 1) * 2 * BQ;
    for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
      fb[r] = r < valid ? lseg[i0 + r] * kLog2e : 0.f;
      fb[BQ + r] = r < valid ? Dg[i0 + r] : 0.f;
    }
  };

  tile_to_smem<HD>(Ks, p.k + row0 * p.ldqkv + (int64_t)k0 * p.ldqkv + kvh * HD, p.ldqkv, 64, min(64, T - k0));
  tile_to_smem<HD>(Vs, p.v + row0 * p.ldqkv + (int64_t)k0 * p.ldqkv + kvh * HD, p.ldqkv, 64, min(64, T - k0));
  issue(0);  // commits K, V and block 0 as one group

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.f;
  const int j_a = k0 + warp * 16 + g, j_b = j_a + 8;  // this lane's two keys

  for (int it = 0; it < n_it; ++it) {
    cp_async_wait_all();
    __syncthreads();  // block it visible to all; buffer (it+1)&1 no longer read
    if (it + 1 < n_it) issue(it + 1);
    const int i0 = k0 + (it % n_blk) * BQ;
    // Queries of this block all precede this warp's first key: nothing to add (warp-uniform).
    if (i0 + BQ - 1 < k0 + warp * 16) continue;
    const bf16* Qs = QB + (it & 1) * 2 * BQ * LDS;
    const bf16* dOs = Qs + BQ * LDS;
    const float* lse2 = FB + (it & 1) * 2 * BQ;
    const float* Ds = lse2 + BQ;

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x BQ queries.
    float st[NT][4], dpt[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      uint32_t ak[4], av[4];
      load_a(ak, Ks, LDS, warp * 16, kc * 16, g, t);
      load_a(av, Vs, LDS, warp * 16, kc * 16, g, t);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        uint32_t b0, b1;
        load_b_nmajor(b0, b1, Qs, LDS, n * 8, kc * 16, g, t);
        mma_bf16(st[n], ak, b0, b1);
        load_b_nmajor(b0, b1, dOs, LDS, n * 8, kc * 16, g, t);
        mma_bf16(dpt[n], av, b0, b1);
      }
    }
    // P^T = exp2(S^T scale log2e - lse log2e) where query i >= key j and i < T, else 0;
    // dS^T = P^T (dP^T - D_i) (times scale at the end).
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ci = n * 8 + 2 * t + (e & 1);  // query index within the block
        const int i = i0 + ci, j = e < 2 ? j_a : j_b;
        const float pv = (i >= j && i < T) ? exp2f(st[n][e] * p.scale_log2 - lse2[ci]) : 0.f;
        st[n][e] = pv;
        dpt[n][e] = pv * (dpt[n][e] - Ds[ci]);
      }
    }
    // dV += P^T dO, dK += dS^T Q: C fragments of query columns [16kk, 16kk+16) as A fragments.
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t ap[4], as[4];
      ap[0] = pack_bf16(st[2 * kk][0], st[2 * kk][1]);
      ap[1] = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
      ap[2] = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[3] = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      as[0] = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]);
      as[1] = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
      as[2] = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      as[3] = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
      for (int d = 0; d < DT; d += 2) {
        uint32_t bo[4], bq[4];
        load_b_kmajor_x2(bo, dOs, LDS, kk * 16, d * 8, lane);
        mma_bf16(dv[d], ap, bo[0], bo[1]);
        mma_bf16(dv[d + 1], ap, bo[2], bo[3]);
        load_b_kmajor_x2(bq, Qs, LDS, kk * 16, d * 8, lane);
        mma_bf16(dk[d], as, bq[0], bq[1]);
        mma_bf16(dk[d + 1], as, bq[2], bq[3]);
      }
    }
  }

  bf16* dkg = p.dk + row0 * p.ldd + kvh * HD + 2 * t;
  bf16* dvg = p.dv + row0 * p.ldd + kvh * HD + 2 * t;
#pragma unroll
  for (int d = 0; d < DT; ++d) {
    if (j_a < T) {
      *reinterpret_cast<uint32_t*>(dkg + (int64_t)j_a * p.ldd + d * 8) =
          pack_bf16(dk[d][0] * p.scale, dk[d][1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvg + (int64_t)j_a * p.ldd + d * 8) = pack_bf16(dv[d][0], dv[d][1]);
    }
    if (j_b < T) {
      *reinterpret_cast<uint32_t*>(dkg + (int64_t)j_b * p.ldd + d * 8) =
          pack_bf16(dk[d][2] * p.scale, dk[d][3] * p.scale);
      *reinterpret_cast<uint32_t*>(dvg + (int64_t)j_b * p.ldd + d * 8) = pack_bf16(dv[d][2], dv[d][3]);
    }
  }
}

// dQ of 64 queries of one (b, h); grid (B*H, n_qtiles), 128 threads; warp w owns queries
// q0 + 16w .. +15. Loops over key blocks of BK rows up to the diagonal. Heavy tiles first.
template <int HD>
__global__ void __launch_bounds__(kBwdThreads) flash_bwd_dq_kernel(BwdArgs p) {
  constexpr int BK = bwd_step<HD>();
  constexpr int LDS = HD + 8;
  constexpr int KC = HD / 16, NT = BK / 8, DT = HD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* const Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* const dOs = Qs + 64 * LDS;
  bf16* const KB = dOs + 64 * LDS;  // 2 buffers x {K (BK rows), V (BK rows)}

  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * 64;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int T = p.T;
  const int64_t row0 = (int64_t)b * T;
  const int nq = min(64, T - q0);
  const int kend = q0 + nq;  // keys [0, kend) are seen by some query of the tile
  const int n_kt = (kend + BK - 1) / BK;
  const bf16* kg = p.k + row0 * p.ldqkv + (h / p.G) * HD;
  const bf16* vg = p.v + row0 * p.ldqkv + (h / p.G) * HD;

  auto issue = [&](int kt) {
    const int j0 = kt * BK, valid = min(BK, T - j0);
    bf16* kb = KB + (kt & 1) * 2 * BK * LDS;
    tile_to_smem<HD>(kb, kg + (int64_t)j0 * p.ldqkv, p.ldqkv, BK, valid);
    tile_to_smem<HD>(kb + BK * LDS, vg + (int64_t)j0 * p.ldqkv, p.ldqkv, BK, valid);
    cp_async_commit();
  };
  tile_to_smem<HD>(Qs, p.q + (row0 + q0) * p.ldqkv + h * HD, p.ldqkv, 64, nq);
  tile_to_smem<HD>(dOs, p.dout + (row0 + q0) * p.ldo + h * HD, p.ldo, 64, nq);
  issue(0);  // one group with Q, dO and key block 0

  const int i_a = q0 + warp * 16 + g, i_b = i_a + 8;  // this lane's two queries
  const float* lseg = p.lse + (int64_t)bh * T;
  const float* Dg = p.D + (int64_t)bh * T;
  const float lse_a = i_a < T ? lseg[i_a] * kLog2e : 0.f, lse_b = i_b < T ? lseg[i_b] * kLog2e : 0.f;
  const float D_a = i_a < T ? Dg[i_a] : 0.f, D_b = i_b < T ? Dg[i_b] : 0.f;

  float dq[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;

  for (int kt = 0; kt < n_kt; ++kt) {
    cp_async_wait_all();
    __syncthreads();
    if (kt + 1 < n_kt) issue(kt + 1);
    const int j0 = kt * BK;
    if (j0 > q0 + warp * 16 + 15) continue;  // every key after this warp's last query (warp-uniform)
    const bf16* Ks = KB + (kt & 1) * 2 * BK * LDS;
    const bf16* Vs = Ks + BK * LDS;

    // S = Q K^T, dP = dO V^T: 16 queries x BK keys.
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      uint32_t aq[4], ao[4];
      load_a(aq, Qs, LDS, warp * 16, kc * 16, g, t);
      load_a(ao, dOs, LDS, warp * 16, kc * 16, g, t);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        uint32_t b0, b1;
        load_b_nmajor(b0, b1, Ks, LDS, n * 8, kc * 16, g, t);
        mma_bf16(s[n], aq, b0, b1);
        load_b_nmajor(b0, b1, Vs, LDS, n * 8, kc * 16, g, t);
        mma_bf16(dp[n], ao, b0, b1);
      }
    }
    // dS = P (dP - D_i), P = exp2(S scale log2e - lse log2e) where key j <= query i < T.
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = j0 + n * 8 + 2 * t + (e & 1);
        const int i = e < 2 ? i_a : i_b;
        const float pv = (j <= i && i < T) ? exp2f(s[n][e] * p.scale_log2 - (e < 2 ? lse_a : lse_b)) : 0.f;
        dp[n][e] = pv * (dp[n][e] - (e < 2 ? D_a : D_b));
      }
    }
    // dQ += dS K.
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack_bf16(dp[2 * kk][0], dp[2 * kk][1]);
      a[1] = pack_bf16(dp[2 * kk][2], dp[2 * kk][3]);
      a[2] = pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      a[3] = pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int d = 0; d < DT; d += 2) {
        uint32_t bk[4];
        load_b_kmajor_x2(bk, Ks, LDS, kk * 16, d * 8, lane);
        mma_bf16(dq[d], a, bk[0], bk[1]);
        mma_bf16(dq[d + 1], a, bk[2], bk[3]);
      }
    }
  }

  bf16* dqg = p.dq + row0 * p.ldd + h * HD + 2 * t;
#pragma unroll
  for (int d = 0; d < DT; ++d) {
    if (i_a < T)
      *reinterpret_cast<uint32_t*>(dqg + (int64_t)i_a * p.ldd + d * 8) =
          pack_bf16(dq[d][0] * p.scale, dq[d][1] * p.scale);
    if (i_b < T)
      *reinterpret_cast<uint32_t*>(dqg + (int64_t)i_b * p.ldd + d * 8) =
          pack_bf16(dq[d][2] * p.scale, dq[d][3] * p.scale);
  }
}

// =====================================================================================
// Simple kernels (any dtype, any hd <= 256): a warp per row, lane holds dims lane + 32 r.
// =====================================================================================

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class T>
struct SimpleArgs {
  const T *q, *k, *v, *o, *dout;
  T *out, *dq, *dk, *dv;
  float* lse_out;
  const float *lse, *D;
  int64_t ldqkv, ldo, ldd;
  int B, T_, H, hd;
  int G;    // query heads per key/value head (grouped-query attention; 1 without)
  int bh0;  // first (b, h) of this launch: blockIdx.y = bh - bh0 (launches of <= 65535 heads)
  float scale;
};

constexpr int kMaxGridY = 65535;

// Forward: grid (ceil(T / 4), heads of this launch), 128 threads; warp w computes query row t of (b, h) with an
// online softmax over keys 0..t in f32 (exp / log as the CPU's portable kernel does).
template <class T, int EPL>
__global__ void __launch_bounds__(128) simple_fwd_kernel(SimpleArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nrb = gridDim.x;
  const int tq = (nrb - 1 - blockIdx.x) * 4 + warp;  // long rows first
  if (tq >= a.T_) return;
  const int bh = a.bh0 + (int)blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int64_t base = (int64_t)b * a.T_;
  float qv[EPL], acc[EPL];
  const T* qr = a.q + (base + tq) * a.ldqkv + h * a.hd;
#pragma unroll
  for (int r = 0; r < EPL; ++r) {
    const int d = lane + 32 * r;
    qv[r] = d < a.hd ? load(qr + d) : 0.f;
    acc[r] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j <= tq; ++j) {
    const T* kr = a.k + (base + j) * a.ldqkv + (h / a.G) * a.hd;
    const T* vr = a.v + (base + j) * a.ldqkv + (h / a.G) * a.hd;
    float part = 0.f;
#pragma unroll
    for (int r = 0; r < EPL; ++r) {
      const int d = lane + 32 * r;
      if (d < a.hd) part += qv[r] * load(kr + d);
    }
    const float s = warp_sum(part) * a.scale;
    const float mn = fmaxf(m, s);
    const float alpha = expf(m - mn), pj = expf(s - mn);
    l = l * alpha + pj;
#pragma unroll
    for (int r = 0; r < EPL; ++r) {
      const int d = lane + 32 * r;
      acc[r] = acc[r] * alpha + (d < a.hd ? pj * load(vr + d) : 0.f);
    }
    m = mn;
  }
  T* orow = a.out + (base + tq) * a.ldo + h * a.hd;
  const float inv = 1.f / l;
#pragma unroll
  for (int r = 0; r < EPL; ++r) {
    const int d = lane + 32 * r;
    if (d < a.hd) store(orow + d, acc[r] * inv);
  }
  if (lane == 0) a.lse_out[(int64_t)bh * a.T_ + tq] = m + logf(l);
}

// D(b, h, t) = sum_d dout · o over the head's dims: one warp per (row, head); grid
// (ceil(B*T / 4), H), 128 threads.
template <class T>
__global__ void __launch_bounds__(128) rowdot_kernel(const T* dout, const T* o, int64_t ldo, float* D, int BT, int T_,
                                                     int H, int hd) {
  const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31, h = blockIdx.y;
  if (row >= BT) return;
  const T* dr = dout + (int64_t)row * ldo + h * hd;
  const T* orow = o + (int64_t)row * ldo + h * hd;
  float s = 0.f;
  for (int d = lane; d < hd; d += 32) s += load(dr + d) * load(orow + d);
  s = warp_sum(s);
  const int b = row / T_, t = row % T_;
  if (lane == 0) D[((int64_t)b * H + h) * T_ + t] = s;
}

// dq of query row i: grid (ceil(T / 4), heads of this launch), 128 threads, a warp per row; loops keys 0..i.
template <class T, int EPL>
__global__ void __launch_bounds__(128) simple_dq_kernel(SimpleArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int i = (gridDim.x - 1 - blockIdx.x) * 4 + warp;
  if (i >= a.T_) return;
  const int bh = a.bh0 + (int)blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int64_t base = (int64_t)b * a.T_;
  const T* qr = a.q + (base + i) * a.ldqkv + h * a.hd;
  const T* dor = a.dout + (base + i) * a.ldo + h * a.hd;
  float qv[EPL], dov[EPL], acc[EPL];
#pragma unroll
  for (int r = 0; r < EPL; ++r) {
    const int d = lane + 32 * r;
    qv[r] = d < a.hd ? load(qr + d) : 0.f;
    dov[r] = d < a.hd ? load(dor + d) : 0.f;
    acc[r] = 0.f;
  }
  const float lse = a.lse[(int64_t)bh * a.T_ + i], Di = a.D[(int64_t)bh * a.T_ + i];
  for (int j = 0; j <= i; ++j) {
    const T* kr = a.k + (base + j) * a.ldqkv + (h / a.G) * a.hd;
    const T* vr = a.v + (base + j) * a.ldqkv + (h / a.G) * a.hd;
    float ps = 0.f, pd = 0.f, kv[EPL];
#pragma unroll
    for (int r = 0; r < EPL; ++r) {
      const int d = lane + 32 * r;
      kv[r] = d < a.hd ? load(kr + d) : 0.f;
      ps += qv[r] * kv[r];
      pd += d < a.hd ? dov[r] * load(vr + d) : 0.f;
    }
    const float s = warp_sum(ps), dpv = warp_sum(pd);
    const float pj = expf(s * a.scale - lse);
    const float ds = pj * (dpv - Di) * a.scale;
#pragma unroll
    for (int r = 0; r < EPL; ++r) acc[r] += ds * kv[r];
  }
  T* out = a.dq + (base + i) * a.ldd + h * a.hd;
#pragma unroll
  for (int r = 0; r < EPL; ++r) {
    const int d = lane + 32 * r;
    if (d < a.hd) store(out + d, acc[r]);
  }
}

// dk, dv of key row j of one (b, key/value head): grid (ceil(T / 4), key/value heads of this
// launch), 128 threads, a warp per row; loops the group's query heads in order, each over queries
// j..T-1, so dk, dv sum over the group in a fixed order.
template <class T, int EPL>
__global__ void __launch_bounds__(128) simple_dkdv_kernel(SimpleArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int j = blockIdx.x * 4 + warp;  // early keys (most queries) first
  if (j >= a.T_) return;
  const int Hkv = a.H / a.G;
  const int bkv = a.bh0 + (int)blockIdx.y, b = bkv / Hkv, kvh = bkv % Hkv;
  const int64_t base = (int64_t)b * a.T_;
  const T* kr = a.k + (base + j) * a.ldqkv + kvh * a.hd;
  const T* vr = a.v + (base + j) * a.ldqkv + kvh * a.hd;
  float kv[EPL], vv[EPL], dk[EPL], dv[EPL];
#pragma unroll
  for (int r = 0; r < EPL; ++r) {
    const int d = lane + 32 * r;
    kv[r] = d < a.hd ? load(kr + d) : 0.f;
    vv[r] = d < a.hd ? load(vr + d) : 0.f;
    dk[r] = dv[r] = 0.f;
  }
  for (int h = kvh * a.G; h < (kvh + 1) * a.G; ++h) {
    const int64_t bh = (int64_t)b * a.H + h;
    for (int i = j; i < a.T_; ++i) {
      const T* qr = a.q + (base + i) * a.ldqkv + h * a.hd;
      const T* dor = a.dout + (base + i) * a.ldo + h * a.hd;
      float ps = 0.f, pd = 0.f, qv[EPL], dov[EPL];
#pragma unroll
      for (int r = 0; r < EPL; ++r) {
        const int d = lane + 32 * r;
        qv[r] = d < a.hd ? load(qr + d) : 0.f;
        dov[r] = d < a.hd ? load(dor + d) : 0.f;
        ps += qv[r] * kv[r];
        pd += dov[r] * vv[r];
      }
      const float s = warp_sum(ps), dpv = warp_sum(pd);
      const float pj = expf(s * a.scale - a.lse[bh * a.T_ + i]);
      const float ds = pj * (dpv - a.D[bh * a.T_ + i]) * a.scale;
#pragma unroll
      for (int r = 0; r < EPL; ++r) {
        dv[r] += pj * dov[r];
        dk[r] += ds * qv[r];
      }
    }
  }
  T* dko = a.dk + (base + j) * a.ldd + kvh * a.hd;
  T* dvo = a.dv + (base + j) * a.ldd + kvh * a.hd;
#pragma unroll
  for (int r = 0; r < EPL; ++r) {
    const int d = lane + 32 * r;
    if (d < a.hd) {
      store(dko + d, dk[r]);
      store(dvo + d, dv[r]);
    }
  }
}

// Calls f(std::integral_constant<int, EPL>) with the smallest EPL in {1, 2, 4, 8} >= ceil(hd / 32).
template <class F>
void dispatch_epl(int hd, F&& f) {
  if (hd <= 32) f(std::integral_constant<int, 1>{});
  else if (hd <= 64) f(std::integral_constant<int, 2>{});
  else if (hd <= 128) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }
bool aligned4(const void* p) { return ((uintptr_t)p & 3u) == 0; }

// Views a strided (rows, cols) view must match.
void expect_shape(const View& v, int64_t rows, int64_t cols, const char* op, const char* operand) {
  if (!v.data) throw Error(std::string(op) + ": " + operand + " is empty");
  if (v.rows != rows || v.cols != cols || v.ld < v.cols)
    throw Error(std::string(op) + ": " + operand + " must be (" + std::to_string(rows) + ", " + std::to_string(cols) +
                ") with ld >= cols, got (" + std::to_string(v.rows) + ", " + std::to_string(v.cols) + ") ld " +
                std::to_string(v.ld));
}
void expect_lse(const View& lse, int64_t n, const char* op) {
  expect(lse, DType::F32, op, "lse");
  if (!lse.data || lse.numel() != n || (lse.rows > 1 && lse.ld != lse.cols))
    throw Error(std::string(op) + ": lse must be a contiguous F32 (B, H, T) of " + std::to_string(n) +
                " elements, got (" + std::to_string(lse.rows) + ", " + std::to_string(lse.cols) + ") ld " +
                std::to_string(lse.ld));
}
int head_dim_of(const View& q, int B, int T, int H, const char* op) {
  if (B <= 0 || T <= 0 || H <= 0) throw Error(std::string(op) + ": B, T and H must be positive");
  if (q.cols % H != 0)
    throw Error(std::string(op) + ": q has " + std::to_string(q.cols) + " columns, not a multiple of H = " +
                std::to_string(H));
  const int hd = (int)(q.cols / H);
  if (hd < 1 || hd > kMaxHeadDim)
    throw Error(std::string(op) + ": head dim " + std::to_string(hd) + " is not supported (1..256; fast: 64, 128)");
  return hd;
}

}  // namespace

// ---- shared with attention_cached.cu -------------------------------------------------------
// The tensor-core forward over Tq queries at positions q_off.. against Tk keys (B = 1 or the
// training layout); returns false (nothing launched) when the shape or alignment does not fit
// (then the caller uses another kernel).
bool flash_forward_bf16(cudaStream_t stream, const View& q, const View& k, const View& v, const View& o, float* lse,
                        int B, int Tq, int Tk, int q_off, int H, int hd, int G) {
  if (hd != 64 && hd != 128) return false;
  if ((Tq + kFwdBr - 1) / kFwdBr > 65535) return false;  // query tiles on gridDim.y
  if (q.dtype != DType::BF16 || k.dtype != DType::BF16 || v.dtype != DType::BF16 || o.dtype != DType::BF16)
    return false;
  if (k.ld != v.ld || q.ld % 8 || k.ld % 8 || o.ld % 2) return false;
  if (!aligned16(q.data) || !aligned16(k.data) || !aligned16(v.data) || !aligned4(o.data)) return false;
  FwdArgs a{ptr<const bf16>(q), ptr<const bf16>(k), ptr<const bf16>(v), ptr<bf16>(o), lse, q.ld, k.ld, o.ld,
            Tq, Tk, q_off, H, G, kLog2e / std::sqrt((float)hd)};
  const dim3 grid((unsigned)(B * H), (unsigned)((Tq + kFwdBr - 1) / kFwdBr));
  if (hd == 64) {
    constexpr size_t smem = fwd_smem_bytes<64>();
    cuda_check(cudaFuncSetAttribute(flash_fwd_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
               "attention_forward: shared memory size");
    flash_fwd_kernel<64><<<grid, kFwdThreads, smem, stream>>>(a);
  } else {
    constexpr size_t smem = fwd_smem_bytes<128>();
    cuda_check(cudaFuncSetAttribute(flash_fwd_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
               "attention_forward: shared memory size");
    flash_fwd_kernel<128><<<grid, kFwdThreads, smem, stream>>>(a);
  }
  cuda_check_launch("attention_forward (flash bf16)");
  return true;
}

}  // namespace cuda

using cuda::bf16;

size_t CudaBackend::attention_scratch_bytes(int B, int T, int H, int, bool backward) const {
  // Backward: D = rowsum(dout ∘ o), (B, H, T) floats. Forward: none.
  return backward ? sizeof(float) * (size_t)B * H * T : 0;
}

void CudaBackend::attention_forward(View q, View k, View v, View o, View lse, int B, int T, int H, Scratch s) {
  const char* op = "attention_forward";
  (void)s;
  const int hd = cuda::head_dim_of(q, B, T, H, op);
  const int Hkv = attention_kv_heads(q, k, v, H, op), G = H / Hkv;
  const int64_t N = (int64_t)B * T, C = (int64_t)H * hd, KV = (int64_t)Hkv * hd;
  cuda::expect_shape(q, N, C, op, "q");
  cuda::expect_shape(k, N, KV, op, "k");
  cuda::expect_shape(v, N, KV, op, "v");
  cuda::expect_shape(o, N, C, op, "o");
  if (k.dtype != q.dtype || v.dtype != q.dtype || o.dtype != q.dtype)
    throw Error("attention_forward: q, k, v and o must share one dtype");
  if (k.ld != q.ld || v.ld != q.ld) throw Error("attention_forward: q, k and v must share one row stride");
  cuda::expect_lse(lse, N * H, op);

  if (cuda::flash_forward_bf16(stream(), q, k, v, o, lse.f32(), B, T, T, 0, H, hd, G)) return;
  cuda::dispatch_float(q.dtype, op, [&](auto tag) {
    using Tp = decltype(tag);
    cuda::SimpleArgs<Tp> a{};
    a.q = cuda::ptr<const Tp>(q);
    a.k = cuda::ptr<const Tp>(k);
    a.v = cuda::ptr<const Tp>(v);
    a.out = cuda::ptr<Tp>(o);
    a.lse_out = lse.f32();
    a.ldqkv = q.ld;
    a.ldo = o.ld;
    a.B = B, a.T_ = T, a.H = H, a.hd = hd, a.G = G;
    a.scale = 1.0f / std::sqrt((float)hd);
    // gridDim.y <= 65535: the heads in launches of at most that many.
    for (int bh0 = 0; bh0 < B * H; bh0 += cuda::kMaxGridY) {
      a.bh0 = bh0;
      const dim3 grid((unsigned)((T + 3) / 4), (unsigned)std::min(B * H - bh0, cuda::kMaxGridY));
      cuda::dispatch_epl(hd, [&](auto epl) {
        cuda::simple_fwd_kernel<Tp, decltype(epl)::value><<<grid, 128, 0, stream()>>>(a);
      });
      cuda_check_launch("attention_forward (simple)");
    }
  });
}

void CudaBackend::attention_backward(View q, View k, View v, View o, View dout, View lse, View dq, View dk, View dv,
                                     int B, int T, int H, Scratch s) {
  const char* op = "attention_backward";
  const int hd = cuda::head_dim_of(q, B, T, H, op);
  const int Hkv = attention_kv_heads(q, k, v, H, op), G = H / Hkv;
  const int64_t N = (int64_t)B * T, C = (int64_t)H * hd, KV = (int64_t)Hkv * hd;
  cuda::expect_shape(q, N, C, op, "q");
  cuda::expect_shape(k, N, KV, op, "k");
  cuda::expect_shape(v, N, KV, op, "v");
  cuda::expect_shape(o, N, C, op, "o");
  cuda::expect_shape(dout, N, C, op, "dout");
  cuda::expect_shape(dq, N, C, op, "dq");
  cuda::expect_shape(dk, N, KV, op, "dk");
  cuda::expect_shape(dv, N, KV, op, "dv");
  const DType dt = q.dtype;
  if (k.dtype != dt || v.dtype != dt || o.dtype != dt || dout.dtype != dt || dq.dtype != dt || dk.dtype != dt ||
      dv.dtype != dt)
    throw Error("attention_backward: q, k, v, o, dout, dq, dk and dv must share one dtype");
  if (k.ld != q.ld || v.ld != q.ld) throw Error("attention_backward: q, k and v must share one row stride");
  if (dk.ld != dq.ld || dv.ld != dq.ld) throw Error("attention_backward: dq, dk and dv must share one row stride");
  if (dout.ld != o.ld) throw Error("attention_backward: o and dout must share one row stride");
  cuda::expect_lse(lse, N * H, op);
  const size_t need = attention_scratch_bytes(B, T, H, hd, true);
  if (!s.data || s.bytes < need)
    throw Error("attention_backward: scratch of " + std::to_string(s.bytes) + " bytes, need " + std::to_string(need));
  float* D = static_cast<float*>(s.data);
  const float scale = 1.0f / std::sqrt((float)hd);

  cuda::dispatch_float(dt, op, [&](auto tag) {
    using Tp = decltype(tag);
    const dim3 g((unsigned)((N + 3) / 4), (unsigned)H);
    cuda::rowdot_kernel<Tp><<<g, 128, 0, stream()>>>(cuda::ptr<const Tp>(dout), cuda::ptr<const Tp>(o), o.ld, D,
                                                     (int)N, T, H, hd);
    cuda_check_launch("attention_backward (D = rowsum(dout * o))");
  });

  const bool flash = dt == DType::BF16 && (hd == 64 || hd == 128) && (T + 63) / 64 <= 65535 && q.ld % 8 == 0 &&
                     o.ld % 8 == 0 && dq.ld % 2 == 0 && cuda::aligned16(q.data) && cuda::aligned16(k.data) &&
                     cuda::aligned16(v.data) && cuda::aligned16(dout.data) && cuda::aligned4(dq.data) &&
                     cuda::aligned4(dk.data) && cuda::aligned4(dv.data);
  if (flash) {
    cuda::BwdArgs a{cuda::ptr<const bf16>(q), cuda::ptr<const bf16>(k), cuda::ptr<const bf16>(v),
                    cuda::ptr<const bf16>(dout), lse.f32(), D, cuda::ptr<bf16>(dq), cuda::ptr<bf16>(dk),
                    cuda::ptr<bf16>(dv), q.ld, o.ld, dq.ld, T, H, G, scale, scale * cuda::kLog2e};
    const dim3 grid((unsigned)(B * H), (unsigned)((T + 63) / 64));
    const dim3 grid_kv((unsigned)(B * Hkv), (unsigned)((T + 63) / 64));  // dk, dv: one block per key/value head
    auto launch = [&](auto hd_tag) {
      constexpr int HD = decltype(hd_tag)::value;
      constexpr size_t smem = cuda::bwd_smem_bytes<HD>();
      cuda_check(cudaFuncSetAttribute(cuda::flash_bwd_dkdv_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)smem),
                 "attention_backward: shared memory size");
      cuda_check(cudaFuncSetAttribute(cuda::flash_bwd_dq_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)smem),
                 "attention_backward: shared memory size");
      cuda::flash_bwd_dkdv_kernel<HD><<<grid_kv, cuda::kBwdThreads, smem, stream()>>>(a);
      cuda_check_launch("attention_backward (flash dk, dv)");
      cuda::flash_bwd_dq_kernel<HD><<<grid, cuda::kBwdThreads, smem, stream()>>>(a);
      cuda_check_launch("attention_backward (flash dq)");
    };
    if (hd == 64) launch(std::integral_constant<int, 64>{});
    else launch(std::integral_constant<int, 128>{});
    return;
  }

  cuda::dispatch_float(dt, op, [&](auto tag) {
    using Tp = decltype(tag);
    cuda::SimpleArgs<Tp> a{};
    a.q = cuda::ptr<const Tp>(q);
    a.k = cuda::ptr<const Tp>(k);
    a.v = cuda::ptr<const Tp>(v);
    a.dout = cuda::ptr<const Tp>(dout);
    a.dq = cuda::ptr<Tp>(dq);
    a.dk = cuda::ptr<Tp>(dk);
    a.dv = cuda::ptr<Tp>(dv);
    a.lse = lse.f32();
    a.D = D;
    a.ldqkv = q.ld;
    a.ldo = o.ld;
    a.ldd = dq.ld;
    a.B = B, a.T_ = T, a.H = H, a.hd = hd, a.G = G;
    a.scale = scale;
    // gridDim.y <= 65535: the heads in launches of at most that many (dq: query heads; dk, dv:
    // key/value heads).
    for (int bh0 = 0; bh0 < B * H; bh0 += cuda::kMaxGridY) {
      a.bh0 = bh0;
      const dim3 grid((unsigned)((T + 3) / 4), (unsigned)std::min(B * H - bh0, cuda::kMaxGridY));
      cuda::dispatch_epl(hd, [&](auto epl) {
        cuda::simple_dq_kernel<Tp, decltype(epl)::value><<<grid, 128, 0, stream()>>>(a);
        cuda_check_launch("attention_backward (simple dq)");
      });
    }
    for (int bh0 = 0; bh0 < B * Hkv; bh0 += cuda::kMaxGridY) {
      a.bh0 = bh0;
      const dim3 grid((unsigned)((T + 3) / 4), (unsigned)std::min(B * Hkv - bh0, cuda::kMaxGridY));
      cuda::dispatch_epl(hd, [&](auto epl) {
        cuda::simple_dkdv_kernel<Tp, decltype(epl)::value><<<grid, 128, 0, stream()>>>(a);
        cuda_check_launch("attention_backward (simple dk, dv)");
      });
    }
  });
}

}  // namespace subllm
