// libFuzzer target: the data manifest and token shard reader (src/tokenizer/dataset.cpp).
// The input holds a manifest.json and the bytes of one shard, separated by the line
// "--shard--"; the shard is written as train_000.bin beside the manifest, which a seed's
// manifest names (a mutated one may name anything).
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.h"
#include "subllm/dataset.h"
#include "subllm/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::string_view sep = "\n--shard--\n";
  const size_t at = input.find(sep);
  const std::string_view manifest = input.substr(0, at);
  const std::string_view shard = at == std::string_view::npos ? std::string_view() : input.substr(at + sep.size());
  const auto* m = reinterpret_cast<const uint8_t*>(manifest.data());
  const auto* s = reinterpret_cast<const uint8_t*>(shard.data());
  const std::string manifest_path = subllm::fuzz::write_input("manifest.json", m, manifest.size());
  subllm::fuzz::write_input("train_000.bin", s, shard.size());
  try {
    subllm::TokenDataset ds(manifest_path, "train");
    // Training reads windows anywhere in the stream: read the first and the last tokens.
    std::vector<int32_t> out(16);
    const int64_t n = std::min<int64_t>(16, ds.num_tokens());
    ds.read(0, n, out.data());
    ds.read(ds.num_tokens() - n, n, out.data());
  } catch (const subllm::Error&) {
  }
  // The shard alone, as `subllm` opens it.
  try {
    subllm::TokenShard t(subllm::fuzz::scratch_dir() + "/train_000.bin");
    std::vector<int32_t> out(8);
    t.read(0, std::min<int64_t>(8, t.num_tokens()), out.data());
  } catch (const subllm::Error&) {
  }
  return 0;
}
