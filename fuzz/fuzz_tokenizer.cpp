// libFuzzer target: the tokenizer loader (src/tokenizer/tokenizer.cpp) on arbitrary
// sentencepiece model bytes, then what every command does next with a loaded tokenizer:
// encode, decode and the streaming decoder. sentencepiece itself is not instrumented, so the
// fuzzer mostly mutates the seed models blindly there.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "subllm/error.h"
#include "subllm/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = subllm::fuzz::write_input("tokenizer.model", data, size);
  try {
    const subllm::Tokenizer tok = subllm::Tokenizer::load(path);
    const std::vector<int32_t> ids = tok.encode("Call me Ishmael. 1851 \xE2\x80\x94 caf\xC3\xA9");
    tok.decode(ids);
    subllm::StreamDecoder stream(tok);
    for (int32_t id : ids) stream.push(id);
    for (int32_t id = 0; id < tok.vocab_size() && id < 300; ++id) stream.push(id);
    stream.flush();
  } catch (const subllm::Error&) {
  }
  return 0;
}
