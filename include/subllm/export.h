#pragma once
// `subllm export`: a model folder in the authors' format, for their PyTorch code.
#include <cstdint>
#include <string>

#include "subllm/tensor.h"

namespace subllm {

struct ExportOptions {
  DType dtype = DType::F32;  // of the weights: F32, BF16 or F16 (rounded to nearest even)
  bool buffers = false;      // also write each block's RoPE `inv_freq` buffer (F32), as their state dict has
};

// Reads the model folder (or run folder: its newest checkpoint) `model_dir` and writes `out_dir`:
// config.json with exactly the keys of the authors' config class (their bypass numbering, qk_bias
// false), model.safetensors with their tensor names (a tied model's output projection written
// too, as their state dict names it), and tokenizer.model. The folder appears whole or not at
// all; an existing non-empty `out_dir` is refused. Returns notes for the user (empty or lines
// ending in '\n'), e.g. on a norm_eps their code does not use.
std::string export_authors_model(const std::string& model_dir, const std::string& out_dir, const ExportOptions& opt);

// Round to nearest even, as torch's .to(torch.bfloat16) / .to(torch.float16) do.
uint16_t float_to_bf16_bits(float f);
uint16_t float_to_f16_bits(float f);

}  // namespace subllm
