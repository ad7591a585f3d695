// `bench paper` end to end on tiny configs: every figure present and consistent.
#include <gtest/gtest.h>

#include "subllm/bench.h"
#include "subllm/threads.h"
#include "test_util.h"

namespace subllm {
namespace bench_tests {

// A tiny config (d 32, 4 blocks, vocab 128) written into tmp as NAME.json, laid out as
// `structure` (its subsamplers keep half the tokens); its path.
std::string tiny_config(const testing::TempDir& tmp, const std::string& name, const std::string& structure) {
  const std::string path = tmp.file(name + ".json");
  testing::write_file(path, R"({"num_embeddings": 128, "decoder_embed_dim": 32, "decoder_ffn_embed_dim": 64,
                               "decoder_layers": 4, "decoder_attention_heads": 4, "tokens_per_sample": 64,
                               "downsampling_factor_denominator": "0.5", "structure": ")" +
                                structure + "\"}");
  return path;
}

TEST(Bench, PaperTablesOnTinyConfigs) {
  testing::TempDir tmp("bench");
  PaperBenchOptions o;
  o.llama_config = tiny_config(tmp, "llama", "TTTT");
  o.subllm_config = tiny_config(tmp, "subllm", "T(TT)T");
  o.lengths = {16, 32};
  o.tokens_per_step = 64;
  o.train_steps = 1;
  o.gen = 4;
  nlohmann::json r = bench_paper(o);
  ASSERT_EQ(r["rows"].size(), 2u);
  for (const auto& row : r["rows"]) {
    EXPECT_GT(row["train_speedup"].get<double>(), 0);
    // Half the tokens in half the blocks: FLOPs fall, so the ideal speed-up exceeds 1.
    EXPECT_GT(row["train_ideal_speedup"].get<double>(), 1.0);
    EXPECT_LT(row["train_memory_ratio"].get<double>(), 1.0);
    EXPECT_LT(row["kv_cache_ratio"].get<double>(), 1.0);
    EXPECT_NEAR(row["subllm_infer"]["retention"][0].get<double>(), 0.5, 0.1);
    EXPECT_EQ(row["llama_train"]["batch"].get<int>() * row["length"].get<int>(), 64);
  }
  const std::string md = paper_markdown(r);
  EXPECT_NE(md.find("| 16 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| 32 |"), std::string::npos) << md;
  EXPECT_NE(md.find("first token"), std::string::npos);
}

// `bench infer --streams`: several sequences decoding together, through the CLI, in JSON.
TEST(Bench, InferStreamsOnATinyConfig) {
  testing::TempDir tmp("bench_streams");
  const std::string config = tiny_config(tmp, "subllm", "T(TT)T");
  InferBenchOptions o;
  o.prompt_len = 12;
  o.gen = 3;
  for (int n : {1, 3}) {
    nlohmann::json r = measure_streams(config, o, n);
    EXPECT_EQ(r["streams"].get<int>(), n);
    EXPECT_GT(r["decode_tokens_per_s"].get<double>(), 0);
    EXPECT_GT(r["prefill_tokens_per_s"].get<double>(), 0);
    EXPECT_NEAR(r["retention"][0].get<double>(), 0.5, 0.25);
  }
  EXPECT_NE(testing::error_of([&] { measure_streams(config, o, 0); }).find("--streams"),
            std::string::npos);
}

// `bench infer` with a baseline measures the two side by side: here one config as q8 against
// itself as f32 (--baseline-dtype), through the CLI, in JSON, and batched (--streams), where
// each side keeps its own types (the cache's too).
TEST(Bench, InferAgainstTheSameModelInAnotherType) {
  testing::TempDir tmp("bench_pair");
  const std::string config = tiny_config(tmp, "subllm", "T(TT)T");
  const testing::CliResult r = testing::run_cli_line("bench infer --config " + config +
                                                     " --prompt-len 12 --gen 8 -t 1 --dtype q8 --baseline-dtype f32 --json");
  ASSERT_EQ(r.code, 0) << r.output;
  const nlohmann::json j = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  const nlohmann::json& base = j["baseline"];
  EXPECT_EQ(j["dtype"], "q8");
  EXPECT_EQ(base["dtype"], "f32");
  EXPECT_EQ(j["config"], base["config"]);
  EXPECT_GT(j["decode_tokens_per_s"].get<double>(), 0);
  EXPECT_GT(base["decode_tokens_per_s"].get<double>(), 0);
  // q8 reads 1.125 bytes a weight where f32 reads 4; the same cache; the same FLOPs.
  EXPECT_GT(j["ideal_decode_speedup"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(j["ideal_first_token_speedup"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(j["kv_cache_ratio"].get<double>(), 1.0);
  EXPECT_NEAR(j["decode_speedup"].get<double>(),
              j["decode_tokens_per_s"].get<double>() / base["decode_tokens_per_s"].get<double>(), 1e-9);
  // Probes before, between and after the alternating stretches (8 tokens: 2 stretches each).
  EXPECT_EQ(j["read_bandwidth_probes_gbs"].size(), 5u);

  const testing::CliResult b = testing::run_cli_line("bench infer --config " + config +
                                                     " --prompt-len 12 --gen 8 -t 1 --streams 2 --dtype q8"
                                                     " --baseline-dtype f32 --baseline-kv-dtype bf16 --json");
  ASSERT_EQ(b.code, 0) << b.output;
  const nlohmann::json row = nlohmann::json::parse(b.output.substr(b.output.find('{')))["streams"][0];
  EXPECT_EQ(row["streams"], 2);
  EXPECT_EQ(row["dtype"], "q8");
  EXPECT_EQ(row["kv_dtype"], "f32");
  EXPECT_EQ(row["baseline"]["dtype"], "f32");
  EXPECT_EQ(row["baseline"]["kv_dtype"], "bf16");
  EXPECT_NEAR(row["decode_speedup"].get<double>(),
              row["decode_tokens_per_s"].get<double>() / row["baseline"]["decode_tokens_per_s"].get<double>(), 1e-9);
}

}  // namespace bench_tests
}  // namespace subllm
