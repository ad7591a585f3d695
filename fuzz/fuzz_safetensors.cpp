// libFuzzer target: SafetensorsFile (src/model/safetensors.cpp) on arbitrary file bytes.
// A subllm::Error is the reader's answer to a bad file; anything else is a bug.
#include <cstdint>
#include <vector>

#include "fuzz_util.h"
#include "subllm/error.h"
#include "subllm/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = subllm::fuzz::write_input("model.safetensors", data, size);
  try {
    subllm::SafetensorsFile f(path);
    // Read back every float tensor as the weight loader would, so the entries' pointers and
    // sizes are exercised, not just the header.
    for (const std::string& name : f.names()) {
      const subllm::SafetensorsEntry& e = f.get(name);
      if (e.nbytes > (64u << 20)) continue;  // the size is checked against the file; skip giants
      std::vector<float> out(e.nbytes / 2 + 1);
      try {
        f.read_f32(name, e.shape, out.data());
      } catch (const subllm::Error&) {
        // I32 tensors: not floating point, refused with an Error.
      }
    }
  } catch (const subllm::Error&) {
  }
  return 0;
}
