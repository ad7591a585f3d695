// The authors' model format: their config keys, bypass numbering, RMSNorm eps, RoPE buffers,
// tied heads and retention encoding, checked against a module with their layout and semantics
// (tests/oracle/authors_reference.py, run under Debian's python3-torch), and `subllm export`.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "subllm/config.h"
#include "subllm/model.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"
#include "test_util.h"

namespace subllm {
namespace authors_format_tests {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::error_of;
using testing::TempDir;
using testing::write_file;

const std::string kAuthorsReference = "/usr/bin/python3 " SUBLLM_SOURCE_DIR "/tests/oracle/authors_reference.py ";

// A tiny config in the authors' own key set (as their published configs have it).
json authors_config(const std::string& structure, bool tied) {
  json j = {{"num_embeddings", 64},   {"decoder_embed_dim", 32}, {"decoder_ffn_embed_dim", 48},
            {"hidden_size", 32},      {"decoder_layers", (int)std::count(structure.begin(), structure.end(), 'T')},
            {"decoder_attention_heads", 4}, {"norm_name", "rmsnorm"}, {"mlp_name", "swiglu"},
            {"qk_bias", false},       {"use_fused", false},      {"attn_type", "vanilla"},
            {"tokens_per_sample", 64}, {"n_positions", 64},      {"padding_idx", 0},
            {"bos_token_id", 1},      {"eos_token_id", 2},       {"scale_token_embedding", false},
            {"tie_weights", tied},    {"structure", structure}};
  return j;
}

const std::vector<std::vector<int32_t>> kSequences = {{5, 9, 13, 3, 40, 41, 7, 22, 63, 8, 11, 30, 4},
                                                      {3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}};

double max_rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 0, worst = 0;
  for (float w : want) scale = std::max(scale, (double)std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs((double)got[i] - want[i]) / scale);
  return worst;
}

// Logits of each sequence from our model, one inference-mode pass per sequence.
std::vector<std::vector<float>> our_logits(Model& m) {
  std::vector<std::vector<float>> out;
  for (const auto& s : kSequences) {
    std::vector<float> lg(s.size() * (size_t)m.config().vocab_size);
    m.forward(s.data(), nullptr, 1, (int)s.size(), lg.data(), Mode::Inference);
    out.push_back(std::move(lg));
  }
  return out;
}

// Runs the authors' module on DIR (config.json, model.safetensors) with `flags`; its logits.
std::vector<std::vector<float>> their_logits(const fs::path& dir, const std::string& flags, int vocab) {
  write_file((dir / "tokens.json").string(), json(kSequences).dump());
  const std::string cmd = kAuthorsReference + dir.string() + " " + flags;
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << " (is python3-torch installed? run scripts/setup.sh)";
  std::vector<std::vector<float>> out;
  if (!fs::exists(dir / "logits.safetensors")) return out;
  SafetensorsFile f((dir / "logits.safetensors").string());
  for (size_t i = 0; i < kSequences.size(); ++i) {
    std::vector<float> lg(kSequences[i].size() * (size_t)vocab);
    f.read_f32("logits/" + std::to_string(i), {(int64_t)kSequences[i].size(), vocab}, lg.data());
    out.push_back(std::move(lg));
  }
  return out;
}

std::unique_ptr<Model> load_dir(const fs::path& dir) {
  auto m = std::make_unique<Model>(load_config((dir / "config.json").string()));
  m->load((dir / "model.safetensors").string());
  return m;
}

void expect_same_logits(Model& m, const std::vector<std::vector<float>>& want, double tol, const std::string& what) {
  const auto got = our_logits(m);
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) EXPECT_LE(max_rel_err(got[i], want[i]), tol) << what << ", sequence " << i;
}

// --- numbering --------------------------------------------------------------------------------

TEST(AuthorsFormat, BypassesAreNumberedByTheirClosingParenthesis) {
  ModelConfig c;
  c.vocab_size = 64, c.dim = 32, c.ffn_dim = 48, c.n_heads = 4, c.context = 32;
  c.n_layers = 7;
  c.structure = "TT(TT(T)T)T";
  c.retentions = {0.6f, 0.5f};
  Model m(c);
  // The inner segment (subsampler 1) closes first: its bypass is bypasses.0.
  EXPECT_EQ(m.param_info("decoder.bypasses.0.bypass_scale").offset, m.weights().bypass_offset(1));
  EXPECT_EQ(m.param_info("decoder.bypasses.1.bypass_scale").offset, m.weights().bypass_offset(0));
  EXPECT_EQ(m.param_info("decoder.downsamplers.0.to_scores.weight").offset, m.weights().score_offset(0));
  // Side by side: the numbering agrees with the order of ')'.
  Structure side = parse_structure("T(T)T(T)T", 5, {0.5f});
  EXPECT_EQ(side.segments[1].bypass, 0);
  EXPECT_EQ(side.segments[2].bypass, 1);
}

// --- fixtures in their layout -----------------------------------------------------------------

struct Fixture {
  std::string name;
  json config;
  std::string flags;  // for authors_reference.py --make
};

std::vector<Fixture> fixtures() {
  std::vector<Fixture> f;
  // Two nested subsamplers keeping different fractions, as their config class reads them.
  json nested = authors_config("TT(TT(T)T)T", true);
  nested["downsampling_factor_denominator"] = "0.6";
  nested["downsampling_factor"] = {1.0 / 0.6, 2.0};
  f.push_back({"nested tied, head and buffers present", nested, "--make 3"});
  f.push_back({"nested tied, head absent", nested, "--make 4 --no-head"});
  json untied = nested;
  untied["tie_weights"] = false;
  untied["norm_eps"] = 1e-5;  // their code ignores it; 1e-5 is what it uses
  untied["subllm_format"] = 2;
  untied["rope_positions"] = "parent";  // with subllm_format and no key it would read as ours before it
  f.push_back({"nested untied, norm_eps and subllm_format given, no buffers", untied, "--make 5 --no-buffers"});
  json one = authors_config("TTT(TT)T", false);
  one["downsampling_factor_denominator"] = "0.64";
  for (const char* optional : {"hidden_size", "use_fused", "attn_type", "n_positions", "scale_token_embedding"})
    one.erase(optional);
  f.push_back({"one subsampler, optional keys absent", one, "--make 6"});
  json plain = authors_config("TTT", true);
  plain["fix_zh"] = true;
  plain["some_future_key"] = {{"a", 1}};
  f.push_back({"plain, unknown keys", plain, "--make 7"});
  return f;
}

TEST(AuthorsFormat, FixturesInTheirLayoutGiveTheirLogits) {
  for (const Fixture& fx : fixtures()) {
    SCOPED_TRACE(fx.name);
    TempDir tmp("authors_fixture");
    write_file(tmp.file("config.json"), fx.config.dump(2));
    const auto want = their_logits(tmp.path(), fx.flags, 64);
    ASSERT_EQ(want.size(), kSequences.size());
    std::unique_ptr<Model> m;
    const std::string err = error_of([&] { m = load_dir(tmp.path()); });
    ASSERT_EQ(err, "");
    EXPECT_FLOAT_EQ(m->config().norm_eps, 1e-5f);
    expect_same_logits(*m, want, 1e-4, fx.name);
  }
}

TEST(AuthorsFormat, ConfigWithoutNormEpsMeansTheirs) {
  EXPECT_FLOAT_EQ(ModelConfig{}.norm_eps, 1e-5f);
  ModelConfig c = config_from_json_text(authors_config("TT", false).dump(), "c.json");
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
  // Ours always writes the key, so a config of ours never depends on the default.
  EXPECT_TRUE(json::parse(config_to_json_text(c)).contains("norm_eps"));
  c.norm_eps = 1e-6f;
  EXPECT_FLOAT_EQ(config_from_json_text(config_to_json_text(c), "c.json").norm_eps, 1e-6f);
}

// --- numbering that cannot be known, and the old one --------------------------------------------

TEST(AuthorsFormat, NestedModelOfUnknownNumberingIsRefused) {
  TempDir tmp("authors_unknown");
  json j = authors_config("TT(TT(T)T)T", false);
  j["downsampling_factor_denominator"] = "0.6";
  write_file(tmp.file("config.json"), j.dump());
  ASSERT_EQ(std::system((kAuthorsReference + tmp.path().string() + " --make 8 >/dev/null").c_str()), 0);
  // Neither the authors' own keys nor ours: nothing tells which numbering the file uses.
  for (const char* key : {"hidden_size", "qk_bias", "use_fused", "attn_type", "n_positions", "scale_token_embedding"})
    j.erase(key);
  write_file(tmp.file("config.json"), j.dump());
  const std::string err = error_of([&] { load_dir(tmp.path()); });
  EXPECT_NE(err.find("subllm_format"), std::string::npos) << err;
  EXPECT_NE(err.find("\"subllm_format\": 2"), std::string::npos) << err;
  // Saying so settles it.
  j["subllm_format"] = 2;
  write_file(tmp.file("config.json"), j.dump());
  EXPECT_EQ(error_of([&] { load_dir(tmp.path()); }), "");
  // A layout whose two numberings agree needs no answer.
  json side = authors_config("T(T)T(T)T", false);
  for (const char* key : {"hidden_size", "qk_bias", "use_fused", "attn_type", "n_positions", "scale_token_embedding"})
    side.erase(key);
  side["downsampling_factor_denominator"] = "0.6";
  ModelConfig sc = config_from_json_text(side.dump(), "side.json");
  EXPECT_EQ(sc.bypass_numbering, 0);
  Model ms(sc);
  ms.init_weights(1);
  ms.save(tmp.file("side.safetensors"));
  EXPECT_EQ(error_of([&] { ms.load(tmp.file("side.safetensors")); }), "");
}

ModelConfig nested_ours() {
  ModelConfig c;
  c.vocab_size = 64, c.dim = 32, c.ffn_dim = 48, c.n_heads = 4, c.context = 32;
  c.n_layers = 7;
  c.structure = "TT(TT(T)T)T";
  c.retentions = {0.6f, 0.5f};
  return c;
}

void randomize(Model& m, uint64_t seed) {
  m.init_weights(seed);
  Rng r(seed + 1);
  // Scores around zero and bypass scales apart, so a swap of the two bypasses shows.
  for (const auto& p : m.params()) {
    if (p.name.find("to_scores") != std::string::npos || p.name.find("bypass") != std::string::npos)
      for (int64_t i = 0; i < p.numel; ++i) m.param_data()[p.offset + i] = (float)r.normal();
  }
  m.weights().params_changed();
}

TEST(AuthorsFormat, ModelWrittenWithTheOldNumberingLoadsCorrectly) {
  TempDir tmp("authors_old");
  ModelConfig before = nested_ours();
  before.rope_parent_positions = false;  // subllm then placed nested tokens at original positions
  Model m(before);
  randomize(m, 21);
  const auto want = our_logits(m);
  // What subllm wrote before format 2: bypasses.j for the j-th '(', a config with our own keys
  // (norm_eps, rope_base), the retentions as one list string, and no format anywhere.
  std::vector<float> host(m.params().size() ? (size_t)m.num_params() : 0);
  std::copy(m.param_data(), m.param_data() + m.num_params(), host.begin());
  std::vector<SafetensorsOut> out;
  for (const auto& p : m.params())
    out.push_back({p.legacy_name.empty() ? p.name : p.legacy_name, DType::F32, p.shape, host.data() + p.offset});
  write_safetensors(tmp.file("model.safetensors"), out, {{"format", "pt"}});
  write_file(tmp.file("config.json"),
             R"({"num_embeddings": 64, "decoder_embed_dim": 32, "decoder_ffn_embed_dim": 48, "decoder_layers": 7,
                 "decoder_attention_heads": 4, "norm_name": "rmsnorm", "mlp_name": "swiglu", "tokens_per_sample": 32,
                 "padding_idx": 0, "bos_token_id": 1, "eos_token_id": 2, "downsampling_factor_denominator": "0.6,0.5",
                 "tie_weights": false, "structure": "TT(TT(T)T)T", "norm_eps": 1e-05, "rope_base": 10000.0})");
  auto old = load_dir(tmp.path());
  EXPECT_EQ(old->config().bypass_numbering, 1);
  EXPECT_FALSE(old->config().rope_parent_positions);
  const auto got = our_logits(*old);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i]) << "sequence " << i;
  // Written again, the files carry the authors' numbering and say so.
  save_config(old->config(), tmp.file("config.json"));
  old->save(tmp.file("model.safetensors"));
  EXPECT_EQ(json::parse(testing::read_all(tmp.file("config.json")))["subllm_format"], 2);
  SafetensorsFile f(tmp.file("model.safetensors"));
  EXPECT_EQ(f.metadata().at("subllm_format"), "2");
  std::vector<float> c0(32);
  f.read_f32("decoder.bypasses.1.bypass_scale", {32}, c0.data());
  EXPECT_EQ(c0[0], m.param_data()[m.weights().bypass_offset(0)]);
  expect_same_logits(*load_dir(tmp.path()), want, 0.0, "rewritten");
}

// --- buffers and tying ------------------------------------------------------------------------------

TEST(AuthorsFormat, RopeBuffersAreCheckedAgainstRopeBase) {
  TempDir tmp("authors_rope");
  write_file(tmp.file("config.json"), authors_config("TT", false).dump());
  ASSERT_EQ(std::system((kAuthorsReference + tmp.path().string() + " --make 9 >/dev/null").c_str()), 0);
  EXPECT_EQ(error_of([&] { load_dir(tmp.path()); }), "");
  json j = authors_config("TT", false);
  j["rope_base"] = 500000.0;
  write_file(tmp.file("config.json"), j.dump());
  const std::string err = error_of([&] { load_dir(tmp.path()); });
  EXPECT_NE(err.find("inv_freq"), std::string::npos) << err;
  EXPECT_NE(err.find("rope_base"), std::string::npos) << err;
}

TEST(AuthorsFormat, TiedHeadMustEqualTheEmbedding) {
  TempDir tmp("authors_tied");
  ModelConfig c = nested_ours();
  c.tie_weights = true;
  Model m(c);
  randomize(m, 3);
  std::vector<SafetensorsOut> out;
  std::vector<float> head(m.param_data(), m.param_data() + 64 * 32);
  for (const auto& p : m.params()) out.push_back({p.name, DType::F32, p.shape, m.param_data() + p.offset});
  out.push_back({"decoder.output_projection.weight", DType::F32, {64, 32}, head.data()});
  write_safetensors(tmp.file("same.safetensors"), out);
  EXPECT_EQ(error_of([&] { m.load(tmp.file("same.safetensors")); }), "");
  head[5] += 1.0f;
  write_safetensors(tmp.file("other.safetensors"), out);
  const std::string err = error_of([&] { m.load(tmp.file("other.safetensors")); });
  EXPECT_NE(err.find("differs from decoder.embed_tokens.weight"), std::string::npos) << err;
  EXPECT_NE(err.find("tie_weights"), std::string::npos) << err;
}

// --- config keys ------------------------------------------------------------------------------------

TEST(AuthorsFormat, ConfigKeysAreWrittenKeptOrRefused) {
  json j = authors_config("TTT(TT)T", false);
  j["downsampling_factor_denominator"] = "0.64";
  j["fix_zh"] = true;
  j["use_fused"] = true;
  j["architectures"] = {"SubllmModel"};
  const ModelConfig c = config_from_json_text(j.dump(), "c.json");
  const json w = json::parse(config_to_json_text(c));
  // Every key their config class reads, with our values; qk_bias written although false.
  for (const char* key : {"num_embeddings", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_layers",
                          "decoder_attention_heads", "norm_name", "mlp_name", "qk_bias", "use_fused", "use_flash",
                          "attn_type", "tokens_per_sample", "n_positions", "padding_idx", "bos_token_id", "eos_token_id",
                          "downsampling_factor_denominator", "scale_token_embedding", "qkv_pack", "tie_weights",
                          "fix_zh", "structure", "hidden_size", "norm_eps", "rope_base", "subllm_format"})
    EXPECT_TRUE(w.contains(key)) << key;
  EXPECT_EQ(w["qk_bias"], false);
  EXPECT_EQ(w["hidden_size"], 32);
  EXPECT_EQ(w["fix_zh"], true);
  EXPECT_EQ(w["use_fused"], true);
  EXPECT_EQ(w["architectures"], json({"SubllmModel"}));
  EXPECT_EQ(w["downsampling_factor_denominator"], "0.64");

  auto refused = [&](const char* key, const json& value, const std::string& says) {
    json bad = j;
    bad[key] = value;
    const std::string err = error_of([&] { config_from_json_text(bad.dump(), "c.json"); });
    EXPECT_NE(err.find(says), std::string::npos) << key << ": " << err;
    EXPECT_EQ(err.rfind("c.json: ", 0), 0u) << err;
  };
  refused("attn_type", "blocksparse", "attn_type \"blocksparse\"");
  refused("hidden_size", 64, "hidden_size (64) differs from decoder_embed_dim (32)");
  refused("bias", true, "bias true");
  refused("no_scale_embedding", false, "no_scale_embedding false");
  refused("use_fused", "yes", "use_fused must be true or false");
  refused("subllm_format", 3, "subllm_format 3 is not known");
  refused("downsampling_factor", json::array({0.5}), "downsampling_factor entry 0.5");
}

TEST(AuthorsFormat, SeveralRetentionsAreWrittenForTheirParser) {
  TempDir tmp("authors_retentions");
  ModelConfig c = nested_ours();
  save_config(c, tmp.file("config.json"));
  const json w = json::parse(testing::read_all(tmp.file("config.json")));
  // Their parser: one number (Python literal) as denominator, factors per subsampler overriding it.
  const std::string cmd = "/usr/bin/python3 -c \"import ast, json; c = json.load(open('" + tmp.file("config.json") +
                          "')); f = (1.0 / ast.literal_eval(c['downsampling_factor_denominator']),); "
                          "f = c.get('downsampling_factor', f); assert len(f) == 2 and abs(f[0] - 1 / 0.6) < 1e-6 "
                          "and abs(f[1] - 2.0) < 1e-6, f\"";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << w.dump();
  EXPECT_EQ(load_config(tmp.file("config.json")).retentions, (std::vector<float>{0.6f, 0.5f}));
  // Ours from before stays readable.
  json old = w;
  old.erase("downsampling_factor");
  old["downsampling_factor_denominator"] = "0.6,0.5";
  EXPECT_EQ(config_from_json_text(old.dump(), "old.json").retentions, (std::vector<float>{0.6f, 0.5f}));
  // One fraction for all is one number, as their configs write it.
  c.retentions = {0.64f};
  const json one = json::parse(config_to_json_text(c));
  EXPECT_EQ(one["downsampling_factor_denominator"], "0.64");
  EXPECT_FALSE(one.contains("downsampling_factor"));
}

// --- export -------------------------------------------------------------------------------------

// A model folder of ours: config, weights and the tiny tokenizer.
fs::path model_folder(const TempDir& tmp, const ModelConfig& c, uint64_t seed) {
  const std::string data = testing::prepare_tiny(tmp, 30, 10, 400);
  const fs::path dir = tmp.path() / "model";
  fs::create_directories(dir);
  Model m(c);
  randomize(m, seed);
  save_config(c, (dir / "config.json").string());
  m.save((dir / "model.safetensors").string());
  fs::copy_file(fs::path(data) / "tokenizer.model", dir / "tokenizer.model");
  return dir;
}

TEST(AuthorsFormat, ExportLoadsStrictlyInTheirModelAndRoundTrips) {
  TempDir tmp("authors_export");
  ModelConfig c = nested_ours();
  c.tie_weights = true;
  c.vocab_size = 416;  // room for the tiny tokenizer's pieces
  const fs::path dir = model_folder(tmp, c, 31);
  auto ours = load_dir(dir);
  const auto want = our_logits(*ours);

  const fs::path out = tmp.path() / "export";
  auto r = testing::run_cli({"export", "-m", dir.string(), "-o", out.string(), "--buffers"});
  ASSERT_EQ(r.code, 0) << r.output;
  const json cfg = json::parse(testing::read_all((out / "config.json").string()));
  EXPECT_EQ(cfg["qk_bias"], false);
  EXPECT_FALSE(cfg.contains("subllm_format"));
  EXPECT_FALSE(cfg.contains("rope_base"));
  EXPECT_TRUE(fs::exists(out / "tokenizer.model"));
  // Their module, strict load_state_dict (buffers and the tied head's second name included).
  const auto theirs = their_logits(out, "", c.vocab_size);
  ASSERT_EQ(theirs.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_LT(max_rel_err(want[i], theirs[i]), 1e-4) << "sequence " << i;
  // Back into ours: the same model exactly.
  expect_same_logits(*load_dir(out), want, 0.0, "round trip");

  for (const char* dtype : {"bf16", "f16"}) {
    const fs::path half = tmp.path() / (std::string("export_") + dtype);
    r = testing::run_cli({"export", "-m", dir.string(), "-o", half.string(), "--dtype", dtype, "--buffers"});
    ASSERT_EQ(r.code, 0) << r.output;
    SafetensorsFile f((half / "model.safetensors").string());
    EXPECT_EQ(f.get("decoder.layers.0.self_attn.q_proj.weight").dtype, dtype == std::string("bf16") ? DType::BF16 : DType::F16);
    EXPECT_EQ(f.get("decoder.layers.0.self_attn.position.inv_freq").dtype, DType::F32);
    // Every value as torch converts the fp32 export.
    const std::string cmd = kAuthorsReference + half.string() + " --compare " + (out / "model.safetensors").string();
    write_file((half / "tokens.json").string(), json(kSequences).dump());
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }
}

TEST(AuthorsFormat, ExportRefusesWhatTheirCodeCannotHoldAndLeavesNothing) {
  TempDir tmp("authors_export_bad");
  ModelConfig c = nested_ours();
  c.vocab_size = 416;
  const fs::path dir = model_folder(tmp, c, 32);
  // An existing, non-empty folder is never overwritten.
  write_file(tmp.file("full/keep.txt"), "mine");
  auto r = testing::run_cli({"export", "-m", dir.string(), "-o", tmp.file("full")});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("already exists and is not empty"), std::string::npos) << r.output;
  EXPECT_EQ(testing::read_all(tmp.file("full/keep.txt")), "mine");
  // A RoPE base their code does not have: refused, and no folder appears.
  c.rope_base = 500000.0f;
  save_config(c, (dir / "config.json").string());
  r = testing::run_cli({"export", "-m", dir.string(), "-o", tmp.file("out")});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("error: cannot export"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("RoPE base 10000"), std::string::npos) << r.output;
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().filename().string().find("out"), std::string::npos) << e.path();
  r = testing::run_cli({"export", "-m", dir.string(), "-o", tmp.file("out2"), "--dtype", "f64"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--dtype"), std::string::npos) << r.output;
}

}  // namespace authors_format_tests
}  // namespace subllm
