// Hugging Face LLaMA checkpoints in and out (`subllm convert`) against a PyTorch model written
// from the Hugging Face LLaMA definition (tests/oracle/hf_llama.py), and --init-from.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "subllm/error.h"
#include "subllm/generate.h"
#include "subllm/safetensors.h"
#include "subllm/trainer.h"
#include "model_util.h"
#include "test_util.h"

namespace subllm {
namespace hf_tests {

namespace fs = std::filesystem;
using testing::error_of;
using testing::rel_diff;
using testing::run_cli;
using testing::TempDir;

const std::string kHf = "/usr/bin/python3 " SUBLLM_SOURCE_DIR "/tests/oracle/hf_llama.py ";

// A Hugging Face LLaMA folder of hf_llama.py with the tokenizer of `data`.
std::string make_hf(const TempDir& tmp, const std::string& data, const std::string& name, const std::string& flags) {
  const std::string dir = (tmp.path() / name).string();
  const std::string cmd = kHf + "make " + dir + " " + flags;
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << " (is python3-torch installed? run scripts/setup.sh)";
  fs::copy_file(fs::path(data) / "tokenizer.model", fs::path(dir) / "tokenizer.model");
  return dir;
}

// Converts, compares the logits with the PyTorch model's, converts back and compares the tensors bit for bit.
void check_round_trip(const std::string& flags, const std::string& back_dtype) {
  TempDir tmp;
  const std::string tmp_s = tmp.path().string();
  const std::string data = testing::prepare_tiny(tmp);
  const std::string hf = make_hf(tmp, data, "hf", flags);
  const std::string ours = tmp_s + "/ours";
  auto r = run_cli({"convert", hf, "-o", ours});
  ASSERT_EQ(r.code, 0) << r.output;

  LoadedModel lm = load_model_dir(ours);
  const ModelConfig& c = lm.model->config();
  EXPECT_TRUE(c.parse().is_plain());
  const std::vector<int32_t> ids = {2, 17, 5, 230, 9, 41, 3, 77, 12, 301, 8, 64, 150};
  const int T = (int)ids.size(), V = c.vocab_size;
  std::vector<float> got((size_t)T * V), want((size_t)T * V);
  lm.model->forward(ids.data(), nullptr, 1, T, got.data(), Mode::Inference);
  {
    std::ofstream(tmp_s + "/ids.json") << nlohmann::json(ids).dump();
    const std::string cmd = kHf + "logits " + hf + " " + tmp_s + "/ids.json " + tmp_s + "/logits.bin";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    std::ifstream f(tmp_s + "/logits.bin", std::ios::binary);
    f.read(reinterpret_cast<char*>(want.data()), (std::streamsize)(sizeof(float) * want.size()));
    ASSERT_TRUE((bool)f);
  }
  EXPECT_LT(rel_diff(got.data(), want.data(), (int64_t)got.size()), 2e-5) << flags;
  // The cached path too (grouped-query attention's narrower cache).
  SequenceCache cache = lm.model->new_cache();
  std::vector<float> inc((size_t)T * V);
  lm.model->forward_cached(cache, ids.data(), T, inc.data(), true);
  EXPECT_LT(rel_diff(inc.data(), want.data(), (int64_t)inc.size()), 2e-5) << flags;

  const std::string back = tmp_s + "/back";
  r = run_cli({"convert", ours, "--to", "hf", "--dtype", back_dtype, "-o", back});
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string cmd = kHf + "same " + hf + " " + back;
  EXPECT_EQ(std::system(cmd.c_str()), 0) << "back-conversion differs: " << cmd;
  const nlohmann::json j = nlohmann::json::parse(testing::read_all(back + "/config.json"));
  const nlohmann::json o = nlohmann::json::parse(testing::read_all(hf + "/config.json"));
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id",
                          "eos_token_id", "max_position_embeddings"})
    EXPECT_EQ(j[key], o[key]) << key;
}

TEST(Hf, ShardedBf16GroupedQueryLlamaConvertsAndComesBackBitForBit) {
  check_round_trip("--dtype bf16 --shards 3 --kv 2", "bf16");
}

TEST(Hf, F32MultiQueryTiedLlamaConvertsAndComesBackBitForBit) {
  check_round_trip("--dtype f32 --kv 1 --tie --seed 4", "f32");
}

TEST(Hf, UnsupportedFeaturesAreRefusedNamingTheKeyAndWriteNothing) {
  TempDir tmp;
  const std::string tmp_s = tmp.path().string();
  const std::string data = testing::prepare_tiny(tmp);
  const std::pair<const char*, const char*> cases[] = {
      {"--rope-scaling", "rope_scaling"},
      {"--bias", "attention_bias true is not supported"},
      {"--act gelu", "hidden_act \"gelu\" is not supported"},
      {"--kv 3", "num_key_value_heads (3) must divide num_attention_heads (4)"},
  };
  int n = 0;
  for (const auto& [flags, message] : cases) {
    const std::string hf = make_hf(tmp, data, "hf" + std::to_string(n), flags);
    const std::string out = tmp_s + "/out" + std::to_string(n++);
    auto r = run_cli({"convert", hf, "-o", out});
    EXPECT_NE(r.code, 0) << flags;
    EXPECT_NE(r.output.find(message), std::string::npos) << flags << ": " << r.output;
    EXPECT_FALSE(fs::exists(out)) << flags;
    for (const auto& e : fs::directory_iterator(tmp.path()))
      EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  }
  // A bias tensor the config does not announce, and token ids the tokenizer does not have.
  const std::string hf = make_hf(tmp, data, "hf_ids", "--seed 2");
  nlohmann::json j = nlohmann::json::parse(testing::read_all(hf + "/config.json"));
  j["eos_token_id"] = 7;
  std::ofstream(hf + "/config.json") << j.dump();
  auto r = run_cli({"convert", hf, "-o", tmp_s + "/ids"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("eos_token_id is 7 but tokenizer.model's is 2"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(tmp_s + "/ids"));
  // A SUBLLM does not go to Hugging Face LLaMA.
  ModelConfig c;
  c.vocab_size = 400, c.dim = 32, c.ffn_dim = 40, c.n_heads = 4, c.context = 32, c.n_layers = 3;
  c.structure = "T(T)T", c.retentions = {0.5f};
  const fs::path sub = tmp.path() / "sub";
  fs::create_directories(sub);
  Model m(c);
  m.init_weights(1);
  save_config(c, (sub / "config.json").string());
  m.save((sub / "model.safetensors").string());
  fs::copy_file(fs::path(data) / "tokenizer.model", sub / "tokenizer.model");
  r = run_cli({"convert", sub.string(), "--to", "hf", "-o", tmp_s + "/subhf"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("it has subsamplers (structure T(T)T)"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(tmp_s + "/subhf"));
}

TEST(Hf, InitFromKeepsBlocksAndStartsSubsamplersFresh) {
  TempDir tmp;
  const std::string tmp_s = tmp.path().string();
  const std::string data = testing::prepare_tiny(tmp);
  const std::string hf = make_hf(tmp, data, "hf", "--kv 2");
  const std::string llama = tmp_s + "/llama";
  ASSERT_EQ(run_cli({"convert", hf, "-o", llama}).code, 0);

  // Through the library: blocks kept in place, the subsampler as a fresh model's.
  ModelConfig src = load_config(llama + "/config.json");
  ModelConfig dst = src;
  dst.structure = "T(TT)";
  dst.retentions = {0.5f};
  Model fresh(dst), seeded(dst);
  fresh.init_weights(9);
  seeded.init_weights(9);
  const std::string notes = init_from_model(seeded, llama);
  EXPECT_NE(notes.find("1 subsampler(s) (score layer and bypass scale) start fresh"), std::string::npos) << notes;
  LoadedModel from = load_model_dir(llama);
  for (const ParamInfo& p : seeded.params()) {
    const float* got = seeded.param_data() + p.offset;
    const bool new_tensor = p.name.find("downsamplers") != std::string::npos || p.name.find("bypasses") != std::string::npos;
    const float* want = new_tensor ? fresh.param_data() + p.offset
                                   : from.model->param_data() + from.model->param_info(p.name).offset;
    EXPECT_EQ(0, std::memcmp(got, want, sizeof(float) * p.numel)) << p.name;
  }

  // Refusals name what does not map.
  ModelConfig wide = dst;
  wide.dim = 64, wide.ffn_dim = 40;
  Model m_wide(wide);
  EXPECT_NE(error_of([&] { init_from_model(m_wide, llama); }).find("decoder_embed_dim is 32 there and 64 here"),
            std::string::npos);
  ModelConfig shallow = dst;
  shallow.structure = "T(T)", shallow.n_layers = 2;
  Model m_shallow(shallow);
  EXPECT_NE(error_of([&] { init_from_model(m_shallow, llama); }).find("has 3 blocks but this model only 2"),
            std::string::npos);

  // Through the CLI: continued training as SUBLLM from the converted LLaMA.
  const std::string run = tmp_s + "/run";
  auto r = run_cli({"train", "--data", data, "--init-from", llama, "--structure", "T(TT)", "--retention", "0.5",
                    "--steps", "2", "--batch", "2", "--seq", "16", "--eval-batches", "0", "-o", run, "-t", "2"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("init-from " + llama), std::string::npos) << r.output;
  const ModelConfig trained = load_config(find_checkpoint(run) + "/config.json");
  EXPECT_EQ(trained.layout(), "T(TT)");
  EXPECT_EQ(trained.kv_heads(), 2);
  EXPECT_EQ(trained.norm_eps, src.norm_eps);
  EXPECT_EQ(trained.rope_base, src.rope_base);
  // The same structure: fine-tuning with a fresh optimizer.
  r = run_cli({"train", "--data", data, "--init-from", llama, "--steps", "1", "--batch", "2", "--seq", "16",
               "--eval-batches", "0", "-o", tmp_s + "/tune", "-t", "2"});
  ASSERT_EQ(r.code, 0) << r.output;
  // Data tokenized with another tokenizer is refused.
  TempDir other;
  const std::string data2 = testing::prepare_tiny(other, 60, 10, 350);
  r = run_cli({"train", "--data", data2, "--init-from", llama, "--steps", "1", "--batch", "2", "--seq", "16",
               "--eval-batches", "0", "-o", tmp_s + "/bad", "-t", "2"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("not with the tokenizer of --init-from"), std::string::npos) << r.output;
  r = run_cli({"train", "--data", data, "--init-from", llama, "--resume", run, "--steps", "3"});
  EXPECT_NE(r.code, 0);
}

TEST(Hf, InitFromRefusesAQuantizedFolder) {
  TempDir tmp;
  ModelConfig c;
  c.vocab_size = 64, c.dim = 16, c.ffn_dim = 24, c.n_heads = 2, c.context = 16, c.n_layers = 2;
  Model m(c);
  m.init_weights(1);
  const std::string dir = tmp.path().string();
  save_config(c, dir + "/config.json");
  // One tensor stored as integers, as a quantized folder holds them.
  std::vector<SafetensorsOut> out;
  std::vector<int32_t> ints;
  for (const ParamInfo& p : m.params()) {
    if (p.name == "decoder.layers.0.self_attn.q_proj.weight") {
      ints.assign((size_t)p.numel, 3);
      out.push_back({p.name, DType::I32, p.shape, ints.data()});
    } else {
      out.push_back({p.name, DType::F32, p.shape, m.param_data() + p.offset});
    }
  }
  write_safetensors(dir + "/model.safetensors", out);
  Model target(c);
  EXPECT_NE(error_of([&] { init_from_model(target, dir); })
                .find("tensor 'decoder.layers.0.self_attn.q_proj.weight' is I32: a quantized model cannot seed training"),
            std::string::npos);
}

}  // namespace hf_tests
}  // namespace subllm
