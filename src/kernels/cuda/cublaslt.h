// cuBLASLt, loaded when the CUDA backend first needs it rather than when a program starts.
// Its library is over 500 MB; linking it made every subllm process (a `subllm --help`, each
// test) map and relocate it at start, 0.4-0.7 s and 25 000 page faults on a 2-core virtual
// machine, whether or not it ever used a GPU. The functions the CUDA backend calls are looked
// up once, by their names in cublasLt.h, so their types are the header's.
#pragma once

#include <cublasLt.h>

namespace subllm {

// The functions the CUDA backend calls, by their names without the cublasLt prefix.
#define SUBLLM_CUBLASLT_FUNCTIONS(X)                                                                   \
  X(Create) X(Destroy) X(GetStatusString) X(Matmul) X(MatmulAlgoGetHeuristic) X(MatmulDescCreate)     \
  X(MatmulDescDestroy) X(MatmulDescSetAttribute) X(MatmulPreferenceCreate) X(MatmulPreferenceDestroy) \
  X(MatmulPreferenceSetAttribute) X(MatrixLayoutCreate) X(MatrixLayoutDestroy)

struct CublasLt {
#define SUBLLM_CUBLASLT_FIELD(name) decltype(&::cublasLt##name) name;
  SUBLLM_CUBLASLT_FUNCTIONS(SUBLLM_CUBLASLT_FIELD)
#undef SUBLLM_CUBLASLT_FIELD
};

// The library's functions, loaded on the first call (thread-safe); throws subllm::Error naming
// the library and the fix when it cannot be loaded or lacks a function.
const CublasLt& cublaslt();

}  // namespace subllm
