// The single entry point to BLAS. Everything that multiplies matrices goes through here so
// a GPU backend replaces one file.
#include <cblas.h>

#include "kernels/kernels.h"

namespace subllm::kernels {

void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha,
              A, lda, B, ldb, beta, C, ldc);
}

// x: (n, in), w: (out, in), y: (n, out)
void linear_forward(const float* x, const float* w, float* y, int n, int in, int out, bool accumulate) {
  // One row (decoding) is a matrix-vector product, bound by reading W once.
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, accumulate ? 1.0f : 0.0f, y, 1);
    return;
  }
  gemm(false, true, n, out, in, 1.0f, x, in, w, in, accumulate ? 1.0f : 0.0f, y, out);
}

// dy: (n, out) -> dx: (n, in), dw: (out, in)
void linear_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int in, int out,
                     bool accumulate_dx) {
  if (dx) gemm(false, false, n, in, out, 1.0f, dy, out, w, in, accumulate_dx ? 1.0f : 0.0f, dx, in);
  if (dw) gemm(true, false, out, in, n, 1.0f, dy, out, x, in, 1.0f, dw, in);
}

}  // namespace subllm::kernels
