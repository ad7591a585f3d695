// Checks of a sentencepiece model file that sentencepiece itself does not make.
#pragma once

#include <string>
#include <string_view>

namespace subllm {

// Why sentencepiece would read outside the model's bytes while loading or normalising text
// with `model` (a sentencepiece ModelProto, serialized), or "" when no text can make it: a
// broken normalisation or denormalisation table (precompiled_charsmap), or bytes that are not
// a protocol buffer at all.
std::string sentencepiece_model_problem(std::string_view model);

}  // namespace subllm
