#pragma once
// Shared by the model's sources (training passes and cached inference); not part of the API.

namespace subllm {

// Where one block pass keeps its intermediates (rows of C, 3C, 2F or F floats).
struct BlockIO {
  float *n1, *qkv, *att, *h, *gu, *a, *rstd1, *rstd2;
};

}  // namespace subllm
