// Dense algebra on the GPU: CudaBackend::gemm (one cuBLASLt matmul on row-major views) and the
// linear layer's forward and backward built on it.
//
// Row-major to column-major: cuBLASLt is column-major, and a row-major r x c matrix with row
// stride ld is, read column-major, its c x r transpose with leading dimension ld. So for
// D = op(A) op(B) (row-major) we ask cuBLASLt for D^T = op(B)^T op(A)^T: its first operand is
// our B buffer (transposed when trans_b), its second our A buffer (transposed when trans_a),
// and its output our D buffer read as n x m.
//
// Each distinct problem (shapes, strides, dtypes, transposes, beta == 0, pointer alignments)
// gets a plan (descriptors and the heuristic's algorithm) made once and cached, so a training
// step does not rerun the heuristics.
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cublaslt.h"

namespace subllm {

namespace {

void lt_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("gemm: ") + what + " failed (" + cublaslt().GetStatusString(s) + ")");
}

cudaDataType_t cuda_type(DType dt) { return dt == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F; }

// The largest power of two (at most 256) dividing the address: cuBLASLt picks kernels by the
// alignment of each buffer.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al /= 2;
  return al;
}

struct GemmKey {
  const void* owner;                // the CudaBackend (plans hold its algorithm choices)
  int64_t m, n, k, lda, ldb, ldd;  // row-major problem
  uint8_t trans_a, trans_b, dt_ab, dt_d, beta_zero;
  uint32_t align_a, align_b, align_d;
  bool operator==(const GemmKey& o) const {
    return owner == o.owner && m == o.m && n == o.n && k == o.k && lda == o.lda && ldb == o.ldb && ldd == o.ldd &&
           trans_a == o.trans_a && trans_b == o.trans_b && dt_ab == o.dt_ab && dt_d == o.dt_d &&
           beta_zero == o.beta_zero && align_a == o.align_a && align_b == o.align_b && align_d == o.align_d;
  }
};

struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](uint64_t v) {
      h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    };
    mix(reinterpret_cast<uintptr_t>(k.owner));
    mix((uint64_t)k.m);
    mix((uint64_t)k.n);
    mix((uint64_t)k.k);
    mix((uint64_t)k.lda);
    mix((uint64_t)k.ldb);
    mix((uint64_t)k.ldd);
    mix((uint64_t)k.trans_a | (uint64_t)k.trans_b << 8 | (uint64_t)k.dt_ab << 16 | (uint64_t)k.dt_d << 24 |
        (uint64_t)k.beta_zero << 32);
    mix((uint64_t)k.align_a | (uint64_t)k.align_b << 16 | (uint64_t)k.align_d << 32);
    return (size_t)h;
  }
};

// What one cuBLASLt call needs, in cuBLASLt's naming: its A is our B buffer, its B our A
// buffer, C = D is our D buffer.
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t lt_a = nullptr, lt_b = nullptr, lt_d = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

void destroy(GemmPlan& p) {
  if (p.lt_d) cublaslt().MatrixLayoutDestroy(p.lt_d);
  if (p.lt_b) cublaslt().MatrixLayoutDestroy(p.lt_b);
  if (p.lt_a) cublaslt().MatrixLayoutDestroy(p.lt_a);
  if (p.desc) cublaslt().MatmulDescDestroy(p.desc);
  p = GemmPlan{};
}

struct PlanCache {
  std::mutex mu;
  std::unordered_map<GemmKey, GemmPlan, GemmKeyHash> plans;
};
// Never destroyed: backends are destroyed at exit in an order unknown to this file.
PlanCache& plan_cache() {
  static PlanCache* c = new PlanCache;
  return *c;
}

std::string shape_of(const View& v) {
  return std::to_string(v.rows) + "x" + std::to_string(v.cols) + " (ld " + std::to_string(v.ld) + ")";
}

}  // namespace

// Declared in cuda_backend.cpp: the destructor's release of this backend's plans.
void cuda_gemm_release(const void* owner) {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto it = c.plans.begin(); it != c.plans.end();) {
    if (it->first.owner == owner) {
      destroy(it->second);
      it = c.plans.erase(it);
    } else {
      ++it;
    }
  }
}

void CudaBackend::gemm(View a, bool trans_a, View b, bool trans_b, View d, float alpha, float beta) {
  // ---- validation -------------------------------------------------------------------------
  if (a.dtype != b.dtype)
    throw Error(std::string("gemm: A and B must share a dtype, got ") + dtype_name(a.dtype) + " and " +
                dtype_name(b.dtype));
  if (a.dtype != DType::F32 && a.dtype != DType::BF16)
    throw Error(std::string("gemm: A and B must be F32 or BF16, got ") + dtype_name(a.dtype));
  if (d.dtype != DType::F32 && d.dtype != a.dtype)
    throw Error(std::string("gemm: D must be F32 or of A's dtype (") + dtype_name(a.dtype) + "), got " +
                dtype_name(d.dtype));
  const int64_t m = d.rows, n = d.cols;
  const int64_t k = trans_a ? a.rows : a.cols;
  const int64_t a_m = trans_a ? a.cols : a.rows;
  const int64_t b_k = trans_b ? b.cols : b.rows, b_n = trans_b ? b.rows : b.cols;
  if (a_m != m || b_k != k || b_n != n)
    throw Error("gemm: shapes do not match: op(A) of A " + shape_of(a) + (trans_a ? " transposed" : "") +
                ", op(B) of B " + shape_of(b) + (trans_b ? " transposed" : "") + ", D " + shape_of(d));
  for (const View* v : {&a, &b, &d})
    if (v->rows < 0 || v->cols < 0 || v->ld < v->cols || v->ld < 1)
      throw Error("gemm: a row stride is smaller than its row: " + shape_of(*v));
  if (m == 0 || n == 0) return;
  if (!a.data || !b.data || !d.data) throw Error("gemm: a null operand");
  if (k == 0) {
    // An empty sum: D = beta D.
    if (beta == 0.f) {
      const size_t es = dtype_size(d.dtype);
      cuda_check(cudaMemset2DAsync(d.data, (size_t)d.ld * es, 0, (size_t)n * es, (size_t)m, stream_),
                 "gemm (cudaMemset2DAsync)");
    } else if (beta != 1.f) {
      throw Error("gemm: an empty inner dimension (k = 0) with beta other than 0 or 1 is not supported");
    }
    return;
  }

  // ---- the plan ---------------------------------------------------------------------------
  const GemmKey key{this,
                    m,
                    n,
                    k,
                    a.ld,
                    b.ld,
                    d.ld,
                    (uint8_t)trans_a,
                    (uint8_t)trans_b,
                    (uint8_t)a.dtype,
                    (uint8_t)d.dtype,
                    (uint8_t)(beta == 0.f),
                    alignment_of(a.data),
                    alignment_of(b.data),
                    alignment_of(d.data)};
  GemmPlan plan;
  PlanCache& cache = plan_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.plans.find(key);
    if (it != cache.plans.end()) plan = it->second;
  }
  if (!plan.desc) {
    GemmPlan p;
    cublasLtMatmulPreference_t pref = nullptr;
    try {
      const cudaDataType_t tab = cuda_type(a.dtype), td = cuda_type(d.dtype);
      // Pure fp32 accumulation (CUBLAS_COMPUTE_32F never uses TF32), fp32 alpha and beta.
      lt_check(cublaslt().MatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
      const cublasOperation_t op_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's A: our B
      const cublasOperation_t op_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's B: our A
      lt_check(cublaslt().MatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a),
               "cublasLtMatmulDescSetAttribute(TRANSA)");
      lt_check(cublaslt().MatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b),
               "cublasLtMatmulDescSetAttribute(TRANSB)");
      // A row-major r x c buffer is a column-major c x r matrix with the same leading dimension.
      lt_check(cublaslt().MatrixLayoutCreate(&p.lt_a, tab, (uint64_t)b.cols, (uint64_t)b.rows, b.ld),
               "cublasLtMatrixLayoutCreate(B)");
      lt_check(cublaslt().MatrixLayoutCreate(&p.lt_b, tab, (uint64_t)a.cols, (uint64_t)a.rows, a.ld),
               "cublasLtMatrixLayoutCreate(A)");
      lt_check(cublaslt().MatrixLayoutCreate(&p.lt_d, td, (uint64_t)n, (uint64_t)m, d.ld),
               "cublasLtMatrixLayoutCreate(D)");

      lt_check(cublaslt().MatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
      const uint64_t ws = lt_workspace_bytes_;
      lt_check(cublaslt().MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
               "cublasLtMatmulPreferenceSetAttribute(workspace)");
      const uint32_t al_a = key.align_b, al_b = key.align_a, al_d = key.align_d;  // cuBLASLt's naming
      lt_check(cublaslt().MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                                       sizeof al_a),
               "cublasLtMatmulPreferenceSetAttribute(alignment A)");
      lt_check(cublaslt().MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                                       sizeof al_b),
               "cublasLtMatmulPreferenceSetAttribute(alignment B)");
      lt_check(cublaslt().MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d,
                                                       sizeof al_d),
               "cublasLtMatmulPreferenceSetAttribute(alignment C)");
      lt_check(cublaslt().MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d,
                                                       sizeof al_d),
               "cublasLtMatmulPreferenceSetAttribute(alignment D)");

      cublasLtMatmulHeuristicResult_t result{};
      int returned = 0;
      lt_check(cublaslt().MatmulAlgoGetHeuristic(lt_, p.desc, p.lt_a, p.lt_b, p.lt_d, p.lt_d, pref, 1, &result,
                                                 &returned),
               "cublasLtMatmulAlgoGetHeuristic");
      if (returned < 1 || result.state != CUBLAS_STATUS_SUCCESS)
        throw Error("gemm: cuBLASLt has no algorithm for D " + shape_of(d) + " = A " + shape_of(a) +
                    (trans_a ? "^T" : "") + " * B " + shape_of(b) + (trans_b ? "^T" : "") + " with " +
                    dtype_name(a.dtype) + " inputs and " + dtype_name(d.dtype) + " output");
      p.algo = result.algo;
      cublaslt().MatmulPreferenceDestroy(pref);
      pref = nullptr;
    } catch (...) {
      if (pref) cublaslt().MatmulPreferenceDestroy(pref);
      destroy(p);
      throw;
    }
    std::lock_guard<std::mutex> lock(cache.mu);
    auto [it, inserted] = cache.plans.emplace(key, p);
    if (!inserted) destroy(p);  // another thread made the same plan meanwhile
    plan = it->second;
  }

  // ---- the call ---------------------------------------------------------------------------
  lt_check(cublaslt().Matmul(lt_, plan.desc, &alpha, b.data, plan.lt_a, a.data, plan.lt_b, &beta, d.data, plan.lt_d,
                             d.data, plan.lt_d, &plan.algo, lt_workspace_, lt_workspace_bytes_, stream_),
           "cublasLtMatmul");
}

void CudaBackend::linear_forward(View x, View w, View y, bool accumulate) {
  if (x.dtype != w.dtype)
    throw Error(std::string("linear_forward: x and w must share a dtype, got ") + dtype_name(x.dtype) + " and " +
                dtype_name(w.dtype));
  if (x.cols != w.cols || y.rows != x.rows || y.cols != w.rows)
    throw Error("linear_forward: shapes do not match: x " + shape_of(x) + ", w " + shape_of(w) + ", y " +
                shape_of(y) + " (want x (N, in), w (out, in), y (N, out))");
  if (x.rows == 0) return;
  // y(N, out) = x(N, in) w(out, in)^T (+ y)
  gemm(x, false, w, true, y, 1.f, accumulate ? 1.f : 0.f);
}

void CudaBackend::linear_backward(View x, View w, View dy, View dx, View dw, bool accumulate_dx) {
  if (x.dtype != w.dtype || dy.dtype != x.dtype)
    throw Error(std::string("linear_backward: x, w and dy must share a dtype, got ") + dtype_name(x.dtype) + ", " +
                dtype_name(w.dtype) + " and " + dtype_name(dy.dtype));
  if (x.cols != w.cols || dy.rows != x.rows || dy.cols != w.rows)
    throw Error("linear_backward: shapes do not match: x " + shape_of(x) + ", w " + shape_of(w) + ", dy " +
                shape_of(dy) + " (want x (N, in), w (out, in), dy (N, out))");
  if (dx && (dx.rows != x.rows || dx.cols != x.cols))
    throw Error("linear_backward: dx " + shape_of(dx) + " must have x's shape " + shape_of(x));
  if (dw && (dw.rows != w.rows || dw.cols != w.cols))
    throw Error("linear_backward: dw " + shape_of(dw) + " must have w's shape " + shape_of(w));
  if (dw && dw.dtype != DType::F32)
    throw Error(std::string("linear_backward: dw must be F32 (parameter gradients are F32), got ") +
                dtype_name(dw.dtype));
  if (x.rows == 0) return;
  // dx(N, in) (=|+=) dy(N, out) w(out, in)
  if (dx) gemm(dy, false, w, false, dx, 1.f, accumulate_dx ? 1.f : 0.f);
  // dw(out, in) += dy(N, out)^T x(N, in)
  if (dw) gemm(dy, true, x, false, dw, 1.f, 1.f);
}

}  // namespace subllm
