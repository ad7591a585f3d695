// Inference loads map F32 checkpoints instead of copying them: same logits as a copy, resident
// memory well below the file's size, a copy where the file cannot be mapped.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "subllm/export.h"
#include "subllm/generate.h"
#include "test_util.h"

namespace subllm {
namespace mapped_tests {

namespace fs = std::filesystem;
using testing::error_of;
using testing::TempDir;

long rss_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

TEST(Mapped, InferenceLoadMapsTheFileKeepsResidentMemoryLowAndComputesAsACopy) {
  TempDir tmp;
  const std::string data = testing::prepare_tiny(tmp);
  ModelConfig c;
  c.vocab_size = 400, c.dim = 512, c.ffn_dim = 1376, c.n_heads = 8, c.n_kv_heads = 2, c.context = 64;
  c.n_layers = 6, c.structure = "TT(TT)TT", c.retentions = {0.5f};
  const fs::path dir = tmp.path() / "model";
  fs::create_directories(dir);
  {
    Model m(c);
    m.init_weights(5);
    save_config(c, (dir / "config.json").string());
    m.save((dir / "model.safetensors").string());
  }
  fs::copy_file(fs::path(data) / "tokenizer.model", dir / "tokenizer.model");
  const double file_kb = (double)fs::file_size(dir / "model.safetensors") / 1024.0;
  ASSERT_GT(file_kb, 60e3);

  const long before = rss_kb();
  LoadedModel lm = load_model_dir(dir.string());
  const long after = rss_kb();
  ASSERT_TRUE(lm.model->weights().mapped());
  EXPECT_LT((double)(after - before), 0.25 * file_kb) << "resident memory grew by " << after - before << " kB for a "
                                                      << file_kb << " kB file";

  Model copy(c);
  copy.load((dir / "model.safetensors").string());
  const std::vector<int32_t> ids = {2, 40, 7, 300, 11, 99, 5, 17};
  const int T = (int)ids.size();
  std::vector<float> a((size_t)T * c.vocab_size), b(a.size());
  lm.model->forward(ids.data(), nullptr, 1, T, a.data(), Mode::Inference);
  copy.forward(ids.data(), nullptr, 1, T, b.data(), Mode::Inference);
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), sizeof(float) * a.size()));
  SequenceCache cache = lm.model->new_cache();
  lm.model->forward_cached(cache, ids.data(), T, a.data(), true);
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), sizeof(float) * a.size()));

  // Read-only: no training through it.
  std::vector<int32_t> targets(ids);
  EXPECT_NE(error_of([&] { lm.model->forward_backward(ids.data(), targets.data(), 1, T); }).find("loaded for inference"),
            std::string::npos);

  // A file that cannot be mapped (BF16, the authors' layout) loads as a copy.
  ModelConfig plain = c;
  plain.n_kv_heads = 0;
  const fs::path pdir = tmp.path() / "plain";
  fs::create_directories(pdir);
  {
    Model m(plain);
    m.init_weights(6);
    save_config(plain, (pdir / "config.json").string());
    m.save((pdir / "model.safetensors").string());
  }
  fs::copy_file(fs::path(data) / "tokenizer.model", pdir / "tokenizer.model");
  ExportOptions bf16;
  bf16.dtype = DType::BF16;
  export_authors_model(pdir.string(), (tmp.path() / "authors").string(), bf16);
  LoadedModel authors = load_model_dir((tmp.path() / "authors").string());
  EXPECT_FALSE(authors.model->weights().mapped());
  std::vector<float> l((size_t)T * c.vocab_size);
  authors.model->forward(ids.data(), nullptr, 1, T, l.data(), Mode::Inference);
  for (float x : l) ASSERT_TRUE(std::isfinite(x));
}

}  // namespace mapped_tests
}  // namespace subllm
