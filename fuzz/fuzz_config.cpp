// libFuzzer target: config.json parsing and validation (src/model/config.cpp), which parses
// the structure string (src/model/structure.cpp), and the structure parser on its own. Only
// parsing: building a model from the config is not part of this target.
#include <cstdint>
#include <string>

#include "subllm/config.h"
#include "subllm/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    subllm::ModelConfig c = subllm::config_from_json_text(text, "config.json");
    // What a loaded config is used for before any model exists: the layout and a round trip.
    c.parse();
    subllm::config_from_json_text(subllm::config_to_json_text(c), "config.json (written back)");
  } catch (const subllm::Error&) {
  }
  // The same bytes as a structure string, with a few retention lists.
  try {
    subllm::parse_structure(text, 4, {0.5f});
  } catch (const subllm::Error&) {
  }
  try {
    subllm::parse_structure(text, static_cast<int>(size % 7), {0.64f, 0.5f, 1.0f});
  } catch (const subllm::Error&) {
  }
  return 0;
}
