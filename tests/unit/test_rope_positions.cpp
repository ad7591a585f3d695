// RoPE positions inside subsampled segments: "parent" (the authors' rule: a kept token sits at
// its row within the sequence its subsampler received) and "original" (its position in the
// full sequence, subllm before the config key existed). They differ only in nested segments.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "subllm/error.h"
#include "subllm/export.h"
#include "subllm/model.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"
#include "model_util.h"
#include "test_util.h"

namespace subllm {
namespace rope_positions_tests {

using nlohmann::json;
using testing::error_of;
using testing::random_tokens;
using testing::TempDir;
namespace fs = std::filesystem;

ModelConfig rope_config(const std::string& structure, std::vector<float> ret, bool parent) {
  ModelConfig c;
  c.vocab_size = 64;
  c.dim = 32;
  c.ffn_dim = 48;
  c.n_heads = 4;
  c.context = 96;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(ret);
  c.rope_parent_positions = parent;
  return c;
}

// Weights large enough that tokens interact, and score layers that spread scores around 0,
// so inference keeps some tokens at every level and drops others.
void randomize(Model& m, uint64_t seed) { testing::spread_weights(m, seed, {0.08, 1.5, 0.1}); }

double max_rel_err(const float* got, const float* want, int64_t n) {
  double scale = 0, worst = 0;
  for (int64_t i = 0; i < n; ++i) scale = std::max(scale, (double)std::fabs(want[i]));
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs((double)got[i] - want[i]));
  return worst / std::max(scale, 1e-30);
}

std::vector<float> logits_of(Model& m, const std::vector<int32_t>& tok, int B, Mode mode) {
  std::vector<float> out(tok.size() * (size_t)m.config().vocab_size);
  m.forward(tok.data(), nullptr, B, (int)tok.size() / B, out.data(), mode);
  return out;
}

// --- the passes -------------------------------------------------------------------------------

TEST(RopePositions, RulesDifferOnANestedLayoutAndAgreeOnOneLevel) {
  for (Mode mode : {Mode::Train, Mode::Inference}) {
    const int B = mode == Mode::Train ? 2 : 1;
    const auto tok = random_tokens(B * 24, 64, 7);
    std::vector<float> by_rule[2][2];  // [nested][parent]
    for (int nested = 0; nested < 2; ++nested) {
      for (int parent = 0; parent < 2; ++parent) {
        Model m(nested ? rope_config("T(T(T)T)T", {0.6f, 0.5f}, parent) : rope_config("TT(TT)T", {0.6f}, parent));
        randomize(m, 21);
        m.set_train_context(0, 3);
        by_rule[nested][parent] = logits_of(m, tok, B, mode);
      }
    }
    const int64_t n = (int64_t)by_rule[0][0].size();
    EXPECT_EQ(by_rule[0][0], by_rule[0][1]) << "one level: the parent segment is the full sequence";
    EXPECT_GT(max_rel_err(by_rule[1][1].data(), by_rule[1][0].data(), n), 1e-3)
        << "nested: the inner blocks must see other positions";
  }
}

// Prefill in two chunks, then one token at a time: every row's logits equal the full
// inference-mode pass's, under each rule; and the rule reaches the cached path.
TEST(RopePositions, CachedDecodingEqualsTheFullPassUnderBothRules) {
  const int T = 48, V = 64;
  const auto tok = random_tokens(T, V, 4);
  std::vector<float> cached_by_rule[2];
  for (int parent = 0; parent < 2; ++parent) {
    for (const char* layout : {"T(T(T)T)T", "(T(T(T)T)T)"}) {
      Model m(rope_config(layout, {0.6f}, parent));
      randomize(m, 3);
      m.knobs().keep_threshold = 0.f;
      const auto full = logits_of(m, tok, 1, Mode::Inference);
      std::vector<float> inc((size_t)T * V);
      SequenceCache c = m.new_cache();
      m.forward_cached(c, tok.data(), 9, inc.data(), true);
      m.forward_cached(c, tok.data() + 9, 11, inc.data() + (size_t)9 * V, true);
      for (int t = 20; t < T; ++t) m.forward_cached(c, tok.data() + t, 1, inc.data() + (size_t)t * V, false);
      EXPECT_LT(max_rel_err(inc.data(), full.data(), (int64_t)T * V), 1e-4)
          << layout << (parent ? " parent" : " original");
      // Positions differ between the rules only where the outer levels dropped tokens.
      for (size_t j = 0; j < c.kept.size(); ++j) {
        EXPECT_GT(c.kept[j], 0) << "the test should keep some tokens at level " << j;
        if (j < 2) {
          EXPECT_LT(c.kept[j], c.seen[j]) << "the test should drop some tokens at level " << j;
        }
      }
      if (std::string(layout) == "T(T(T)T)T") cached_by_rule[parent] = inc;
    }
  }
  EXPECT_GT(max_rel_err(cached_by_rule[1].data(), cached_by_rule[0].data(), (int64_t)T * V), 1e-3);
}

// A nested model under each rule against tests/oracle/reference.py (which reads the rule
// from config.json): same selection, loss, logits and every parameter gradient.
TEST(RopePositions, NestedModelMatchesThePyTorchReferenceUnderBothRules) {
  for (int parent = 0; parent < 2; ++parent) {
    SCOPED_TRACE(parent ? "parent" : "original");
    TempDir tmp(parent ? "rope_oracle_parent" : "rope_oracle_original");
    const ModelConfig c = rope_config("T(T(T)T)T", {0.6f, 0.5f}, parent);
    Model m(c);
    randomize(m, 11);
    save_config(c, tmp.file("config.json"));
    m.save(tmp.file("model.safetensors"));
    const int B = 2, T = 17, N = B * T, V = c.vocab_size;
    const auto tokens = random_tokens(N, V, 12);
    std::vector<int32_t> targets(N);
    for (int i = 0; i < N; ++i) targets[i] = (i % 5 == 4) ? -1 : tokens[(i + 1) % N];
    // Balancer and bypass limit off: other tests compare them; here only positions matter.
    m.knobs().balancer_prob = ScheduledFloat(0.f);
    m.knobs().bypass_limit_prob = 0.f;
    m.set_train_context(0, 5);
    m.forward(tokens.data(), targets.data(), B, T, nullptr, Mode::Train);
    const auto traces = m.last_traces();
    // The pass's random choices (pairing flips) go to the reference, which selects itself.
    std::vector<std::vector<int32_t>> flags;
    for (const auto& t : traces) flags.push_back({t.flipped, t.balancer_on, t.limit_on});
    std::vector<SafetensorsOut> batch = {{"tokens", DType::I32, {B, T}, tokens.data()},
                                         {"targets", DType::I32, {B, T}, targets.data()}};
    for (size_t j = 0; j < traces.size(); ++j)
      batch.push_back({"choices/" + std::to_string(j), DType::I32, {3}, flags[j].data()});
    write_safetensors(tmp.file("batch.safetensors"), batch);
    const std::string cmd = "/usr/bin/python3 " SUBLLM_SOURCE_DIR "/tests/oracle/reference.py " + tmp.path().string();
    ASSERT_EQ(std::system(cmd.c_str()), 0) << "reference failed: " << cmd;
    SafetensorsFile ref(tmp.file("reference.safetensors"));
    for (size_t j = 0; j < traces.size(); ++j) {
      const SafetensorsEntry& e = ref.get("kept/" + std::to_string(j));
      ASSERT_EQ(e.shape, (Shape{B, traces[j].kept_per_seq})) << "subsampler " << j;
      const int32_t* rk = static_cast<const int32_t*>(e.data);
      EXPECT_EQ(std::vector<int32_t>(rk, rk + (size_t)B * traces[j].kept_per_seq), traces[j].kept) << j;
    }
    std::vector<float> logits((size_t)N * V), want((size_t)N * V);
    m.forward(tokens.data(), targets.data(), B, T, logits.data(), Mode::Train);
    ref.read_f32("logits", {B, T, V}, want.data());
    EXPECT_LT(max_rel_err(logits.data(), want.data(), (int64_t)logits.size()), 1e-4);
    m.zero_grad();
    const float loss = m.forward_backward(tokens.data(), targets.data(), B, T);
    float ref_loss = 0;
    ref.read_f32("loss", {1}, &ref_loss);
    EXPECT_NEAR(loss, ref_loss, 1e-5 * std::fabs(ref_loss));
    for (const auto& p : m.params()) {
      std::vector<float> g(p.numel);
      ref.read_f32("grad/" + p.name, p.shape, g.data());
      EXPECT_LT(max_rel_err(m.grad_data() + p.offset, g.data(), p.numel), 1e-4) << "gradient of " << p.name;
    }
  }
}

// --- config.json ------------------------------------------------------------------------------

json authors_keys() {
  return json{{"num_embeddings", 64}, {"decoder_embed_dim", 32}, {"decoder_ffn_embed_dim", 48},
              {"hidden_size", 32},    {"decoder_layers", 5},      {"decoder_attention_heads", 4},
              {"qk_bias", false},     {"use_fused", false},       {"attn_type", "vanilla"},
              {"tie_weights", false}, {"structure", "T(T(T)T)T"}, {"downsampling_factor_denominator", "0.6"}};
}

TEST(RopePositions, ConfigKeyIsAlwaysWrittenAndAbsentKeyFollowsWhoWroteTheConfig) {
  // New models: the authors' rule, and the key is stated.
  ModelConfig fresh = rope_config("T(T(T)T)T", {0.6f}, true);
  EXPECT_TRUE(ModelConfig{}.rope_parent_positions);
  EXPECT_EQ(json::parse(config_to_json_text(fresh))["rope_positions"], "parent");
  fresh.rope_parent_positions = false;
  EXPECT_EQ(json::parse(config_to_json_text(fresh))["rope_positions"], "original");
  EXPECT_FALSE(config_from_json_text(config_to_json_text(fresh), "c.json").rope_parent_positions);
  // Only their keys in an export's config.
  EXPECT_FALSE(json::parse(config_to_json_text(fresh, true)).contains("rope_positions"));

  // The authors' config: their rule.
  json theirs = authors_keys();
  EXPECT_TRUE(config_from_json_text(theirs.dump(), "theirs.json").rope_parent_positions);
  // Ours from before the key (format 2, and format 1 recognised by our keys): original.
  json ours2 = authors_keys();
  ours2["norm_eps"] = 1e-5, ours2["rope_base"] = 10000.0, ours2["subllm_format"] = 2;
  EXPECT_FALSE(config_from_json_text(ours2.dump(), "ours2.json").rope_parent_positions);
  json ours1 = {{"num_embeddings", 64}, {"decoder_embed_dim", 32}, {"decoder_ffn_embed_dim", 48},
                {"decoder_layers", 3},  {"decoder_attention_heads", 4}, {"structure", "T(T)T"},
                {"downsampling_factor_denominator", "0.6"}, {"norm_eps", 1e-5}, {"rope_base", 10000.0}};
  EXPECT_FALSE(config_from_json_text(ours1.dump(), "ours1.json").rope_parent_positions);
  // The key decides when present.
  ours2["rope_positions"] = "parent";
  EXPECT_TRUE(config_from_json_text(ours2.dump(), "ours2.json").rope_parent_positions);
  theirs["rope_positions"] = "original";
  EXPECT_FALSE(config_from_json_text(theirs.dump(), "theirs.json").rope_parent_positions);

  // Bad values name the key and the valid ones.
  theirs["rope_positions"] = "relative";
  std::string err = error_of([&] { config_from_json_text(theirs.dump(), "bad.json"); });
  EXPECT_NE(err.find("bad.json"), std::string::npos) << err;
  EXPECT_NE(err.find("rope_positions \"relative\""), std::string::npos) << err;
  EXPECT_NE(err.find("\"parent\""), std::string::npos) << err;
  EXPECT_NE(err.find("\"original\""), std::string::npos) << err;
  theirs["rope_positions"] = 1;
  err = error_of([&] { config_from_json_text(theirs.dump(), "bad.json"); });
  EXPECT_NE(err.find("rope_positions"), std::string::npos) << err;
}

// --- export -----------------------------------------------------------------------------------

TEST(RopePositions, ExportRefusesANestedModelWithOriginalPositions) {
  TempDir tmp("rope_export");
  const std::string data = testing::prepare_tiny(tmp, 30, 10, 400);
  auto folder = [&](const std::string& name, const ModelConfig& c) {
    const fs::path dir = tmp.path() / name;
    fs::create_directories(dir);
    Model m(c);
    m.init_weights(5);
    save_config(c, (dir / "config.json").string());
    m.save((dir / "model.safetensors").string());
    fs::copy_file(fs::path(data) / "tokenizer.model", dir / "tokenizer.model");
    return dir.string();
  };
  ModelConfig nested = rope_config("T(T(T)T)T", {0.6f, 0.5f}, false);
  nested.vocab_size = 416;
  const std::string err = error_of([&] { export_authors_model(folder("nested", nested), tmp.file("out"), {}); });
  EXPECT_NE(err.find("cannot export"), std::string::npos) << err;
  EXPECT_NE(err.find("rope_positions"), std::string::npos) << err;
  EXPECT_NE(err.find("\"parent\""), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(tmp.file("out")));
  // Without nesting the rules agree: exported, and it reads back with the authors' rule.
  ModelConfig one = rope_config("TT(TT)T", {0.6f}, false);
  one.vocab_size = 416;
  EXPECT_EQ(error_of([&] { export_authors_model(folder("one", one), tmp.file("out_one"), {}); }), "");
  EXPECT_TRUE(load_config(tmp.file("out_one/config.json")).rope_parent_positions);
  // A nested model with the authors' rule exports.
  nested.rope_parent_positions = true;
  EXPECT_EQ(error_of([&] { export_authors_model(folder("nested_parent", nested), tmp.file("out_p"), {}); }), "");
}

}  // namespace rope_positions_tests
}  // namespace subllm
