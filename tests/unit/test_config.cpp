#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "subllm/config.h"
#include "subllm/error.h"
#include "test_util.h"

namespace subllm {
namespace config_tests {

namespace fs = std::filesystem;

// The authors' published config for subllm-1.3B-keep0p4-4k, including keys we ignore.
const char* kPaper13B = R"({
  "num_embeddings": 32000,
  "decoder_embed_dim": 2048,
  "decoder_ffn_embed_dim": 5504,
  "hidden_size": 2048,
  "decoder_layers": 24,
  "decoder_attention_heads": 16,
  "norm_name": "rmsnorm",
  "mlp_name": "swiglu",
  "qk_bias": false,
  "use_fused": false,
  "attn_type": "vanilla",
  "tokens_per_sample": 4096,
  "n_positions": 4096,
  "padding_idx": 0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "scale_token_embedding": false,
  "downsampling_factor_denominator": "0.64",
  "tie_weights": false,
  "structure": "TTTTT(TTTTT(TTTT)TTTTT)TTTTT"
}
)";

using testing::error_of;
using testing::TempDir;

std::string from_text_error(const std::string& text) {
  return error_of([&] { config_from_json_text(text, "cfg.json"); });
}

std::string validate_error(const ModelConfig& c) {
  return error_of([&] { c.validate(); });
}

#define EXPECT_CONTAINS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "message: " << (haystack)

TEST(Config, PaperConfigLoads) {
  ModelConfig c = config_from_json_text(kPaper13B, "config.json");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.dim, 2048);
  EXPECT_EQ(c.ffn_dim, 5504);
  EXPECT_EQ(c.n_layers, 24);
  EXPECT_EQ(c.n_heads, 16);
  EXPECT_EQ(c.head_dim(), 128);
  EXPECT_EQ(c.context, 4096);
  EXPECT_EQ(c.padding_idx, 0);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_FALSE(c.tie_weights);
  EXPECT_EQ(c.structure, "TTTTT(TTTTT(TTTT)TTTTT)TTTTT");
  ASSERT_EQ(c.retentions.size(), 1u);
  EXPECT_FLOAT_EQ(c.retentions[0], 0.64f);
  // Keys the paper's file lacks keep our defaults (eps: the authors' 1e-5).
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_base, 10000.0f);
  Structure st = c.parse();
  EXPECT_EQ(st.num_subsamplers, 2);
  EXPECT_FLOAT_EQ(st.segments[2].retention, 0.64f);
}

TEST(Config, MissingKeysKeepDefaults) {
  ModelConfig c = config_from_json_text("{}", "cfg.json");
  ModelConfig d;
  EXPECT_EQ(c.vocab_size, d.vocab_size);
  EXPECT_EQ(c.dim, d.dim);
  EXPECT_EQ(c.n_layers, d.n_layers);
  EXPECT_EQ(c.layout(), std::string(static_cast<size_t>(d.n_layers), 'T'));
  EXPECT_TRUE(c.parse().is_plain());
}

TEST(Config, OwnKeysAndAllMappings) {
  ModelConfig c = config_from_json_text(R"({"num_embeddings": 100, "decoder_embed_dim": 64,
      "decoder_ffn_embed_dim": 96, "decoder_layers": 3, "decoder_attention_heads": 4,
      "tokens_per_sample": 77, "padding_idx": 5, "bos_token_id": 6, "eos_token_id": 7,
      "tie_weights": true, "norm_eps": 1e-5, "rope_base": 500000, "structure": "T(T)T",
      "downsampling_factor_denominator": 0.5})",
                                        "cfg.json");
  EXPECT_EQ(c.vocab_size, 100);
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.ffn_dim, 96);
  EXPECT_EQ(c.n_layers, 3);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.context, 77);
  EXPECT_EQ(c.padding_idx, 5);
  EXPECT_EQ(c.bos_token_id, 6);
  EXPECT_EQ(c.eos_token_id, 7);
  EXPECT_TRUE(c.tie_weights);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_base, 500000.0f);
  ASSERT_EQ(c.retentions.size(), 1u);
  EXPECT_FLOAT_EQ(c.retentions[0], 0.5f);
}

TEST(Config, RetentionForms) {
  const std::string head = R"({"decoder_layers": 5, "structure": "T(T(T)T)T", "downsampling_factor_denominator": )";
  auto load = [&](const std::string& value) { return config_from_json_text(head + value + "}", "cfg.json").retentions; };
  EXPECT_EQ(load("0.64"), (std::vector<float>{0.64f}));
  EXPECT_EQ(load("\"0.64\""), (std::vector<float>{0.64f}));
  EXPECT_EQ(load("\"0.64,0.5\""), (std::vector<float>{0.64f, 0.5f}));
  EXPECT_EQ(load("\" 0.64 , 0.5 \""), (std::vector<float>{0.64f, 0.5f}));
  EXPECT_EQ(load("[0.64, 0.5]"), (std::vector<float>{0.64f, 0.5f}));
  EXPECT_EQ(load("[\"0.8\", 0.5]"), (std::vector<float>{0.8f, 0.5f}));
  EXPECT_EQ(load("[1]"), (std::vector<float>{1.0f}));

  EXPECT_CONTAINS(from_text_error(head + "\"0.6x\"}"), "\"0.6x\" is not a number");
  EXPECT_CONTAINS(from_text_error(head + "\"0.5,,0.5\"}"), "is not a number");
  EXPECT_CONTAINS(from_text_error(head + "[true]}"), "downsampling_factor_denominator must be");
  EXPECT_CONTAINS(from_text_error(head + "{}}"), "downsampling_factor_denominator must be");
  // Range and length are checked by the structure parser, reported with the file name.
  std::string too_many = from_text_error(head + "\"0.5,0.5,0.5\"}");
  EXPECT_CONTAINS(too_many, "cfg.json: ");
  EXPECT_CONTAINS(too_many, "has 3 values");
  EXPECT_CONTAINS(from_text_error(head + "\"1.5\"}"), "outside (0, 1]");
  // A subsampled layout without retentions is an error naming the key.
  EXPECT_CONTAINS(from_text_error(R"({"decoder_layers": 3, "structure": "T(T)T"})"), "downsampling_factor_denominator");
}

TEST(Config, WrongTypesNameTheKey) {
  std::string s = from_text_error(R"({"decoder_layers": "12"})");
  EXPECT_CONTAINS(s, "cfg.json: decoder_layers must be an integer");
  EXPECT_CONTAINS(s, "string");
  EXPECT_CONTAINS(from_text_error(R"({"num_embeddings": 1.5})"), "num_embeddings must be an integer");
  EXPECT_CONTAINS(from_text_error(R"({"num_embeddings": 99999999999})"), "num_embeddings must be an integer");
  EXPECT_CONTAINS(from_text_error(R"({"tie_weights": 1})"), "tie_weights must be true or false");
  EXPECT_CONTAINS(from_text_error(R"({"structure": 5})"), "structure must be a string");
  EXPECT_CONTAINS(from_text_error(R"({"norm_eps": "small"})"), "norm_eps must be a number");
  EXPECT_CONTAINS(from_text_error("[1, 2]"), "top level must be a JSON object");
  // Whole numbers written as floats are accepted.
  EXPECT_EQ(config_from_json_text(R"({"decoder_embed_dim": 256.0})", "cfg.json").dim, 256);
}

TEST(Config, ValidateRejectsInconsistentSizes) {
  ModelConfig c;
  c.dim = 500;
  c.n_heads = 8;
  EXPECT_EQ(validate_error(c),
            "config.json: decoder_embed_dim (500) is not divisible by decoder_attention_heads (8): choose sizes with "
            "dim % heads == 0");

  c = ModelConfig();
  c.dim = 24;
  c.n_heads = 8;  // head_dim 3
  EXPECT_CONTAINS(validate_error(c), "is odd");

  const std::pair<int ModelConfig::*, const char*> sizes[] = {
      {&ModelConfig::vocab_size, "num_embeddings"},  {&ModelConfig::dim, "decoder_embed_dim"},
      {&ModelConfig::ffn_dim, "decoder_ffn_embed_dim"}, {&ModelConfig::n_layers, "decoder_layers"},
      {&ModelConfig::n_heads, "decoder_attention_heads"}, {&ModelConfig::context, "tokens_per_sample"}};
  for (const auto& [field, key] : sizes) {
    for (int bad : {0, -4}) {
      c = ModelConfig();
      c.*field = bad;
      std::string msg = validate_error(c);
      EXPECT_CONTAINS(msg, std::string(key) + " (" + std::to_string(bad) + ") must be positive");
    }
  }

  const std::pair<int ModelConfig::*, const char*> ids[] = {{&ModelConfig::padding_idx, "padding_idx"},
                                                             {&ModelConfig::bos_token_id, "bos_token_id"},
                                                             {&ModelConfig::eos_token_id, "eos_token_id"}};
  for (const auto& [field, key] : ids) {
    for (int bad : {-1, 8192}) {
      c = ModelConfig();
      c.*field = bad;
      EXPECT_CONTAINS(validate_error(c), std::string(key) + " (" + std::to_string(bad) + ") is outside [0");
    }
  }

  c = ModelConfig();
  c.norm_name = "layernorm";
  EXPECT_CONTAINS(validate_error(c), "norm_name \"layernorm\" is not supported: only \"rmsnorm\"");
  c = ModelConfig();
  c.mlp_name = "gelu";
  EXPECT_CONTAINS(validate_error(c), "mlp_name \"gelu\" is not supported: only \"swiglu\"");
  c = ModelConfig();
  c.norm_eps = 0.0f;
  EXPECT_CONTAINS(validate_error(c), "norm_eps");
  c = ModelConfig();
  c.rope_base = -1.0f;
  EXPECT_CONTAINS(validate_error(c), "rope_base");

  c = ModelConfig();
  c.structure = "TTT(T";
  EXPECT_CONTAINS(validate_error(c), "unbalanced '('");
  c.structure = "TTTTTTTTTT";
  EXPECT_CONTAINS(validate_error(c), "structure has 10 'T' blocks but decoder_layers is 8: make them equal");

  EXPECT_EQ(validate_error(ModelConfig()), "");
}

TEST(Config, FileErrorsNameTheFile) {
  TempDir dir;
  std::string missing = dir.file("nope.json");
  std::string m = error_of([&] { load_config(missing); });
  EXPECT_CONTAINS(m, missing);
  EXPECT_CONTAINS(m, "No such file");

  std::string bad = dir.file("bad.json");
  testing::write_file(bad, "{\"decoder_layers\": 8,,}");
  std::string b = error_of([&] { load_config(bad); });
  EXPECT_CONTAINS(b, bad + ": invalid JSON");
  EXPECT_CONTAINS(b, "parse error");

  std::string typed = dir.file("typed.json");
  testing::write_file(typed, R"({"decoder_attention_heads": [8]})");
  EXPECT_CONTAINS(error_of([&] { load_config(typed); }), typed + ": decoder_attention_heads must be an integer");

  std::string inconsistent = dir.file("inconsistent.json");
  testing::write_file(inconsistent, R"({"decoder_embed_dim": 500})");
  EXPECT_CONTAINS(error_of([&] { load_config(inconsistent); }), inconsistent + ": decoder_embed_dim (500)");

  EXPECT_CONTAINS(error_of([&] { load_config(dir.file("")); }), "cannot read config");
}

TEST(Config, JsonTextUsesOfficialKeys) {
  ModelConfig c = config_from_json_text(kPaper13B, "config.json");
  auto j = nlohmann::json::parse(config_to_json_text(c));
  EXPECT_EQ(j["num_embeddings"], 32000);
  EXPECT_EQ(j["decoder_embed_dim"], 2048);
  EXPECT_EQ(j["decoder_ffn_embed_dim"], 5504);
  EXPECT_EQ(j["decoder_layers"], 24);
  EXPECT_EQ(j["decoder_attention_heads"], 16);
  EXPECT_EQ(j["tokens_per_sample"], 4096);
  EXPECT_EQ(j["downsampling_factor_denominator"], "0.64");
  EXPECT_EQ(j["structure"], "TTTTT(TTTTT(TTTT)TTTTT)TTTTT");
  EXPECT_EQ(j["norm_name"], "rmsnorm");
  EXPECT_EQ(j["mlp_name"], "swiglu");
  EXPECT_EQ(j["tie_weights"], false);
  EXPECT_DOUBLE_EQ(j["norm_eps"].get<double>(), 1e-5);
  EXPECT_DOUBLE_EQ(j["rope_base"].get<double>(), 10000.0);
  EXPECT_FALSE(j.contains("dim"));

  ModelConfig plain;
  auto p = nlohmann::json::parse(config_to_json_text(plain));
  EXPECT_FALSE(p.contains("downsampling_factor_denominator"));
  EXPECT_EQ(p["structure"], "TTTTTTTT");

  ModelConfig two = c;
  two.retentions = {0.64f, 0.5f};
  // One number for the authors' parser, the fractions per subsampler as their factors.
  const auto jt = nlohmann::json::parse(config_to_json_text(two));
  EXPECT_EQ(jt["downsampling_factor_denominator"], "0.64");
  EXPECT_EQ(jt["downsampling_factor"], nlohmann::json::array({1.0 / 0.64f, 2.0}));
  // Pretty-printed with two-space indentation.
  EXPECT_NE(config_to_json_text(c).find("\n  \"num_embeddings\": 32000"), std::string::npos);
}

TEST(Config, SaveLoadRoundTripIsAtomic) {
  TempDir dir;
  std::string path = dir.file("config.json");
  ModelConfig c;
  c.vocab_size = 1000;
  c.dim = 96;
  c.ffn_dim = 256;
  c.n_layers = 5;
  c.n_heads = 6;
  c.context = 333;
  c.padding_idx = 3;
  c.bos_token_id = 4;
  c.eos_token_id = 5;
  c.tie_weights = true;
  c.structure = "T(T(T)T)T";
  c.retentions = {0.7f, 0.3f};
  c.norm_eps = 1e-5f;
  c.rope_base = 123456.0f;
  save_config(c, path);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  ModelConfig r = load_config(path);
  EXPECT_EQ(r.vocab_size, c.vocab_size);
  EXPECT_EQ(r.dim, c.dim);
  EXPECT_EQ(r.ffn_dim, c.ffn_dim);
  EXPECT_EQ(r.n_layers, c.n_layers);
  EXPECT_EQ(r.n_heads, c.n_heads);
  EXPECT_EQ(r.context, c.context);
  EXPECT_EQ(r.padding_idx, c.padding_idx);
  EXPECT_EQ(r.bos_token_id, c.bos_token_id);
  EXPECT_EQ(r.eos_token_id, c.eos_token_id);
  EXPECT_EQ(r.tie_weights, c.tie_weights);
  EXPECT_EQ(r.structure, c.structure);
  EXPECT_EQ(r.retentions, c.retentions);
  EXPECT_EQ(r.norm_eps, c.norm_eps);
  EXPECT_EQ(r.rope_base, c.rope_base);

  // A failed save leaves the old file in place: a directory blocks the temp path.
  fs::create_directory(path + ".tmp");
  ModelConfig other = c;
  other.dim = 48;
  std::string msg = error_of([&] { save_config(other, path); });
  EXPECT_CONTAINS(msg, "cannot write '" + path + "'");
  EXPECT_EQ(load_config(path).dim, 96);
  EXPECT_TRUE(fs::is_directory(path + ".tmp"));

  EXPECT_CONTAINS(error_of([&] { save_config(c, dir.file("no/such/dir/config.json")); }), "cannot write");
  fs::remove(path + ".tmp");

  // The temp file was written but cannot be renamed over a directory: it must not linger.
  std::string blocked = dir.file("blocked");
  fs::create_directory(blocked);
  EXPECT_CONTAINS(error_of([&] { save_config(c, blocked); }), "cannot write '" + blocked + "'");
  EXPECT_FALSE(fs::exists(blocked + ".tmp"));
  EXPECT_TRUE(fs::is_directory(blocked));

  // Writing the temp file itself fails (a full device behind it): the old file survives and
  // the temp entry is removed.
  if (fs::exists("/dev/full")) {
    fs::create_symlink("/dev/full", path + ".tmp");
    EXPECT_CONTAINS(error_of([&] { save_config(other, path); }), "No space left on device");
    EXPECT_FALSE(fs::exists(fs::symlink_status(path + ".tmp")));
    ASSERT_FALSE(fs::is_symlink(path));  // reading through to /dev/full would never end
    EXPECT_EQ(load_config(path).dim, 96);
  }
}

TEST(Config, ShippedConfigsLoad) {
#ifdef SUBLLM_SOURCE_DIR
  const fs::path source_dir = SUBLLM_SOURCE_DIR;
#else
  // Built outside CMake: find the tree from this file's path.
  const fs::path source_dir = fs::path(__FILE__).parent_path() / ".." / "..";
#endif
  if (!fs::exists(source_dir / "configs")) GTEST_SKIP() << "configs/ not found under " << source_dir;
  const std::string root = (source_dir / "configs").string() + "/";
  ModelConfig paper = load_config(root + "subllm-1.3B-keep0p4-4k.json");
  EXPECT_EQ(paper.dim, 2048);
  EXPECT_EQ(paper.parse().num_subsamplers, 2);

  ModelConfig l8 = load_config(root + "llama-d512-l8.json");
  EXPECT_EQ(l8.n_layers, 8);
  EXPECT_EQ(l8.context, 1024);
  EXPECT_TRUE(l8.parse().is_plain());

  ModelConfig s24 = load_config(root + "subllm-d512-l24.json");
  EXPECT_EQ(s24.n_layers, 24);
  EXPECT_EQ(s24.vocab_size, 8192);
  EXPECT_EQ(s24.context, 2048);
  EXPECT_EQ(s24.parse().num_subsamplers, 2);
  EXPECT_EQ(s24.retentions, (std::vector<float>{0.64f}));

  ModelConfig l24 = load_config(root + "llama-d512-l24.json");
  EXPECT_EQ(l24.n_layers, 24);
  EXPECT_EQ(l24.dim, s24.dim);
  EXPECT_EQ(l24.ffn_dim, s24.ffn_dim);
  EXPECT_EQ(l24.context, s24.context);
  EXPECT_TRUE(l24.parse().is_plain());
}

}  // namespace config_tests
}  // namespace subllm
