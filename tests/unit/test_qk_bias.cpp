// q/k projection biases (`qk_bias`, the authors' q_proj.bias / k_proj.bias, added before
// RoPE) end to end, and right-padded batches in full passes against the authors' key mask.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "grad_check.h"
#include "subllm/config.h"
#include "subllm/model.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"
#include "test_util.h"

namespace subllm {
namespace qk_bias_tests {

using testing::TempDir;

ModelConfig tiny(bool qk_bias, const std::string& structure = "") {
  ModelConfig c;
  c.vocab_size = 64;
  c.dim = 32;
  c.ffn_dim = 48;
  c.n_layers = structure.empty() ? 2 : (int)std::count(structure.begin(), structure.end(), 'T');
  c.n_heads = 4;
  c.context = 32;
  c.structure = structure;
  if (!structure.empty()) c.retentions = {0.6f, 0.5f};
  c.qk_bias = qk_bias;
  return c;
}

// Weights large enough that every path, the biases included, moves the outputs visibly.
void randomize(Model& m, uint64_t seed) {
  Rng r(seed);
  for (const auto& p : m.params()) {
    float* w = m.param_data() + p.offset;
    const bool bias = p.name.size() > 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0;
    for (int64_t i = 0; i < p.numel; ++i)
      w[i] = p.shape.size() == 1 ? (float)((bias ? 0.0 : 1.0) + (bias ? 0.5 : 0.1) * r.normal()) : (float)(0.3 * r.normal());
  }
  m.weights().params_changed();
}

std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = 3 + (int32_t)r.below(vocab - 3);  // no padding, bos or eos
  return t;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, (double)std::fabs(a[i] - b[i]));
  return d;
}

// ---- config -----------------------------------------------------------------------------

TEST(QkBias, MissingKeyMeansTrueAsInTheAuthorsConfigClass) {
  const std::string base = R"({"num_embeddings": 64, "decoder_embed_dim": 32, "decoder_ffn_embed_dim": 48,
    "decoder_layers": 2, "decoder_attention_heads": 4)";
  EXPECT_TRUE(config_from_json_text(base + "}", "c.json").qk_bias);
  EXPECT_FALSE(config_from_json_text(base + R"(, "qk_bias": false})", "c.json").qk_bias);
  EXPECT_TRUE(config_from_json_text(base + R"(, "qk_bias": true})", "c.json").qk_bias);
  const std::string err = testing::error_of([&] { config_from_json_text(base + R"(, "qk_bias": "no"})", "c.json"); });
  EXPECT_NE(err.find("c.json: qk_bias must be true or false"), std::string::npos) << err;
  // subllm wrote no qk_bias key before it supported biases: its files (norm_eps, rope_base) had none.
  EXPECT_FALSE(config_from_json_text(base + R"(, "norm_eps": 1e-6, "rope_base": 10000})", "c.json").qk_bias);
}

TEST(QkBias, ConfigJsonAlwaysStatesTheKey) {
  for (bool b : {false, true}) {
    const std::string text = config_to_json_text(tiny(b));
    EXPECT_NE(text.find(std::string("\"qk_bias\": ") + (b ? "true" : "false")), std::string::npos) << text;
    EXPECT_EQ(config_from_json_text(text, "c.json").qk_bias, b);
  }
}

// ---- parameters -------------------------------------------------------------------------

TEST(QkBias, BlocksHoldZeroInitialisedUndecayedQAndKBiases) {
  Model m(tiny(true));
  m.init_weights(3);
  for (int i = 0; i < 2; ++i) {
    for (const char* proj : {"q_proj", "k_proj"}) {
      const ParamInfo& p = m.param_info("decoder.layers." + std::to_string(i) + ".self_attn." + proj + ".bias");
      EXPECT_EQ(p.shape, (Shape{32}));
      EXPECT_FALSE(p.decay) << p.name;  // a vector: AdamW leaves it undecayed
      EXPECT_EQ(p.lr_scale, 1.0f);
      for (int64_t k = 0; k < p.numel; ++k) ASSERT_EQ(m.param_data()[p.offset + k], 0.0f) << p.name;
    }
  }
  // No v or out biases, as in the authors' model (their bias flag is off).
  EXPECT_FALSE(testing::error_of([&] { m.param_info("decoder.layers.0.self_attn.v_proj.bias"); }).empty());
  EXPECT_EQ(m.num_params(), m.config().param_count());
  EXPECT_GT(m.num_params(), Model(tiny(false)).num_params());
}

// ---- passes -----------------------------------------------------------------------------

// Finite differences of the loss with respect to every q and k bias entry.
TEST(QkBias, BiasGradientsMatchFiniteDifferences) {
  Model m(tiny(true));
  randomize(m, 5);
  const int B = 2, T = 9;
  const auto tokens = random_tokens(B * T, 64, 6), targets = random_tokens(B * T, 64, 7);
  m.zero_grad();
  m.forward_backward(tokens.data(), targets.data(), B, T);
  for (int i = 0; i < 2; ++i) {
    for (const char* proj : {"q_proj", "k_proj"}) {
      const ParamInfo& p = m.param_info("decoder.layers." + std::to_string(i) + ".self_attn." + proj + ".bias");
      std::vector<float> x(m.param_data() + p.offset, m.param_data() + p.offset + p.numel);
      const std::vector<float> g(m.grad_data() + p.offset, m.grad_data() + p.offset + p.numel);
      double norm = 0;
      for (float v : g) norm += (double)v * v;
      EXPECT_GT(norm, 1e-8) << p.name << " gets no gradient";
      testing::expect_grad_matches(p.name, x, g, [&] {
        std::copy(x.begin(), x.end(), m.param_data() + p.offset);
        m.weights().params_changed();
        return (double)m.forward(tokens.data(), targets.data(), B, T, nullptr, Mode::Train);
      }, 0.1f, 2e-2, 64, 2e-3);
      std::copy(x.begin(), x.end(), m.param_data() + p.offset);
      m.weights().params_changed();
    }
  }
}

TEST(QkBias, BiasesChangeTheOutputs) {
  Model m(tiny(true));
  randomize(m, 8);
  const int T = 12;
  const auto tokens = random_tokens(T, 64, 9);
  std::vector<float> with((size_t)T * 64), without((size_t)T * 64);
  m.forward(tokens.data(), nullptr, 1, T, with.data());
  for (const auto& p : m.params())
    if (p.name.find("_proj.bias") != std::string::npos) std::fill_n(m.param_data() + p.offset, p.numel, 0.f);
  m.weights().params_changed();
  m.forward(tokens.data(), nullptr, 1, T, without.data());
  EXPECT_GT(max_abs_diff(with, without), 1e-3);
}

TEST(QkBias, CachedDecodingEqualsTheFullPass) {
  for (const std::string structure : {"", "T(T(T)T)T"}) {
    Model m(tiny(true, structure));
    randomize(m, 10);
    const int T = 20;
    const auto tokens = random_tokens(T, 64, 11);
    std::vector<float> full((size_t)T * 64), cached((size_t)T * 64);
    m.forward(tokens.data(), nullptr, 1, T, full.data(), Mode::Inference);
    SequenceCache cache = m.new_cache();
    m.forward_cached(cache, tokens.data(), 7, cached.data(), true);  // a chunk, then one at a time
    for (int t = 7; t < T; ++t) m.forward_cached(cache, tokens.data() + t, 1, cached.data() + (size_t)t * 64, true);
    EXPECT_LT(max_abs_diff(full, cached), 2e-4) << "structure '" << structure << "'";
  }
}

TEST(QkBias, CheckpointSavesAndLoads) {
  TempDir tmp("qkb_ckpt");
  Model a(tiny(true, "T(T(T)T)T"));
  randomize(a, 12);
  save_config(a.config(), tmp.file("config.json"));
  a.save(tmp.file("model.safetensors"));
  SafetensorsFile f(tmp.file("model.safetensors"));
  EXPECT_TRUE(f.has("decoder.layers.4.self_attn.q_proj.bias"));
  EXPECT_TRUE(f.has("decoder.layers.4.self_attn.k_proj.bias"));
  Model b(load_config(tmp.file("config.json")));
  ASSERT_TRUE(b.config().qk_bias);
  b.load(tmp.file("model.safetensors"));
  for (const auto& p : a.params())
    for (int64_t i = 0; i < p.numel; ++i) ASSERT_EQ(a.param_data()[p.offset + i], b.param_data()[p.offset + i]) << p.name;
  const auto tokens = random_tokens(10, 64, 13);
  std::vector<float> la(10 * 64), lb(10 * 64);
  a.forward(tokens.data(), nullptr, 1, 10, la.data());
  b.forward(tokens.data(), nullptr, 1, 10, lb.data());
  EXPECT_EQ(max_abs_diff(la, lb), 0.0);
}

TEST(QkBias, MismatchedCheckpointNamesTheKeyToFix) {
  TempDir tmp("qkb_mismatch");
  Model with(tiny(true));
  with.save(tmp.file("with.safetensors"));
  Model without(tiny(false));
  without.save(tmp.file("without.safetensors"));
  std::string err = testing::error_of([&] { without.load(tmp.file("with.safetensors")); });
  EXPECT_NE(err.find("_proj.bias' has no place"), std::string::npos) << err;
  EXPECT_NE(err.find("\"qk_bias\": true"), std::string::npos) << err;
  err = testing::error_of([&] { with.load(tmp.file("without.safetensors")); });
  EXPECT_NE(err.find("q_proj.bias' is missing"), std::string::npos) << err;
  EXPECT_NE(err.find("\"qk_bias\": false"), std::string::npos) << err;
}

// The CPU backend's linear layer takes strided operands (the bias add writes the q|k columns
// of the fused qkv rows), giving what dense operands give.
TEST(QkBias, CpuLinearTakesStridedOperands) {
  Backend& be = cpu_backend();
  const int N = 5, in = 3, out = 4, ld = 9;
  auto x = testing::random_vec(N * in, 1), w = testing::random_vec(out * in, 2), dy = testing::random_vec(N * out, 3);
  std::vector<float> y(N * out), dx(N * in), dw(out * in, 0.f);
  be.linear_forward(mat(x.data(), N, in), mat(w.data(), out, in), mat(y.data(), N, out));
  be.linear_backward(mat(x.data(), N, in), mat(w.data(), out, in), mat(dy.data(), N, out), mat(dx.data(), N, in),
                     mat(dw.data(), out, in));
  // The same numbers, each matrix embedded at column 2 of wider rows.
  auto wide = [&](const std::vector<float>& v, int rows, int cols) {
    std::vector<float> o((size_t)rows * ld, 7.f);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) o[(size_t)r * ld + 2 + c] = v[(size_t)r * cols + c];
    return o;
  };
  auto xs = wide(x, N, in), ws = wide(w, out, in), dys = wide(dy, N, out);
  std::vector<float> ys((size_t)N * ld, 7.f), dxs((size_t)N * ld, 7.f), dws = wide(std::vector<float>(out * in, 0.f), out, in);
  be.linear_forward(mat(xs.data() + 2, N, in, ld), mat(ws.data() + 2, out, in, ld), mat(ys.data() + 2, N, out, ld));
  be.linear_backward(mat(xs.data() + 2, N, in, ld), mat(ws.data() + 2, out, in, ld), mat(dys.data() + 2, N, out, ld),
                     mat(dxs.data() + 2, N, in, ld), mat(dws.data() + 2, out, in, ld));
  for (int r = 0; r < N; ++r) {
    for (int c = 0; c < out; ++c) EXPECT_NEAR(ys[(size_t)r * ld + 2 + c], y[(size_t)r * out + c], 1e-5);
    for (int c = 0; c < in; ++c) EXPECT_NEAR(dxs[(size_t)r * ld + 2 + c], dx[(size_t)r * in + c], 1e-5);
    EXPECT_EQ(ys[(size_t)r * ld], 7.f);  // columns outside the view stay untouched
  }
  for (int r = 0; r < out; ++r)
    for (int c = 0; c < in; ++c) EXPECT_NEAR(dws[(size_t)r * ld + 2 + c], dw[(size_t)r * in + c], 1e-5);
}

// The GPU backend gets the biases through its own linear layer (fp32 compute, so the CPU's
// numbers within rounding). Skipped where no GPU can run it.
TEST(QkBias, CudaMatchesCpu) {
  std::string why;
  if (!backend_available("cuda:fp32", &why)) GTEST_SKIP() << why;
  Model cpu(tiny(true, "T(T(T)T)T")), gpu(tiny(true, "T(T(T)T)T"), "cuda:fp32");
  randomize(cpu, 21);
  gpu.backend().to_device(gpu.param_data(), cpu.param_data(), sizeof(float) * cpu.num_params());
  gpu.weights().params_changed();
  const int B = 2, T = 12;
  const auto tokens = random_tokens(B * T, 64, 22), targets = random_tokens(B * T, 64, 23);
  cpu.zero_grad();
  gpu.zero_grad();
  cpu.set_train_context(0, 5);
  gpu.set_train_context(0, 5);
  EXPECT_NEAR(cpu.forward_backward(tokens.data(), targets.data(), B, T),
              gpu.forward_backward(tokens.data(), targets.data(), B, T), 1e-4);
  std::vector<float> g((size_t)gpu.num_params());
  gpu.backend().to_host(g.data(), gpu.grad_data(), sizeof(float) * g.size());
  const ParamInfo& p = cpu.param_info("decoder.layers.2.self_attn.k_proj.bias");
  for (int64_t i = 0; i < p.numel; ++i)
    EXPECT_NEAR(g[p.offset + i], cpu.grad_data()[p.offset + i], 1e-4) << p.name << "[" << i << "]";
}

// ---- against the PyTorch reference (tests/oracle/reference.py) ---------------------------

// Writes the model and batch, runs the reference and returns its outputs.
// A training pass's random choices (which subsamplers flipped their pairing) go with it.
SafetensorsFile run_reference(const TempDir& dir, const Model& m, const std::vector<int32_t>& tokens,
                              const std::vector<int32_t>& targets, int B, int T, bool mask_padding) {
  save_config(m.config(), dir.file("config.json"));
  m.save(dir.file("model.safetensors"));
  const int32_t mask = mask_padding ? 1 : 0;
  std::vector<SafetensorsOut> batch = {{"tokens", DType::I32, {B, T}, tokens.data()},
                                       {"targets", DType::I32, {B, T}, targets.data()},
                                       {"mask_padding", DType::I32, {1}, &mask}};
  const auto traces = m.last_traces();
  std::vector<std::vector<int32_t>> flags;
  for (const auto& t : traces) flags.push_back({t.flipped, 0, 0});
  for (size_t j = 0; j < traces.size(); ++j)
    batch.push_back({"choices/" + std::to_string(j), DType::I32, {3}, flags[j].data()});
  write_safetensors(dir.file("batch.safetensors"), batch);
  const std::string cmd = "/usr/bin/python3 " SUBLLM_SOURCE_DIR "/tests/oracle/reference.py " + dir.path().string();
  EXPECT_EQ(std::system(cmd.c_str()), 0) << "reference failed: " << cmd;
  return SafetensorsFile(dir.file("reference.safetensors"));
}

double max_rel_err(const float* got, const std::vector<float>& want) {
  double scale = 0, worst = 0;
  for (float v : want) scale = std::max(scale, (double)std::fabs(v));
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs((double)got[i] - want[i]) / scale);
  return worst;
}

// Loss, logits and every gradient, biases included, of a training pass.
void expect_matches_reference(const ModelConfig& cfg, const std::string& tag) {
  TempDir dir("qkb_oracle_" + tag);
  Model m(cfg);
  randomize(m, 14);
  const int B = 2, T = 17, V = cfg.vocab_size;
  const auto tokens = random_tokens(B * T, V, 15);
  auto targets = random_tokens(B * T, V, 16);
  targets[4] = -1;
  m.set_train_context(0, 5);  // no balancer or bypass limit: their probability is 0 below
  m.knobs().balancer_prob = ScheduledFloat(0.0f);
  m.knobs().bypass_limit_prob = 0.0f;
  m.zero_grad();
  const float loss = m.forward_backward(tokens.data(), targets.data(), B, T);
  std::vector<float> logits((size_t)B * T * V);
  m.forward(tokens.data(), targets.data(), B, T, logits.data(), Mode::Train);
  SafetensorsFile ref = run_reference(dir, m, tokens, targets, B, T, false);
  float ref_loss = 0;
  ref.read_f32("loss", {1}, &ref_loss);
  EXPECT_NEAR(loss, ref_loss, 1e-5 * std::fabs(ref_loss));
  std::vector<float> ref_logits(logits.size());
  ref.read_f32("logits", {B, T, V}, ref_logits.data());
  EXPECT_LT(max_rel_err(logits.data(), ref_logits), 1e-4);
  for (const auto& p : m.params()) {
    std::vector<float> g(p.numel);
    ref.read_f32("grad/" + p.name, p.shape, g.data());
    EXPECT_LT(max_rel_err(m.grad_data() + p.offset, g), 1e-4) << "gradient of " << p.name;
  }
}

TEST(QkBias, LlamaMatchesPyTorch) { expect_matches_reference(tiny(true), "llama"); }
TEST(QkBias, NestedSubllmMatchesPyTorch) { expect_matches_reference(tiny(true, "T(T(T)T)T"), "subllm"); }

// ---- right-padded batches -----------------------------------------------------------------

// Two sequences of different lengths, the shorter right-padded with padding_idx (0).
struct PaddedBatch {
  int B = 2, T = 14;
  std::vector<int> lengths{14, 9};
  std::vector<int32_t> tokens, targets;
};
PaddedBatch padded_batch(int vocab) {
  PaddedBatch pb;
  pb.tokens = random_tokens(pb.B * pb.T, vocab, 17);
  pb.targets = random_tokens(pb.B * pb.T, vocab, 18);
  for (int b = 0; b < pb.B; ++b)
    for (int t = pb.lengths[b]; t < pb.T; ++t) {
      pb.tokens[(size_t)b * pb.T + t] = 0;
      pb.targets[(size_t)b * pb.T + t] = -1;
    }
  return pb;
}

// The authors mask padded keys; with right padding a real token never sees one (keys after
// it are causally hidden anyway), so our unmasked full pass gives their logits on real rows.
TEST(QkBias, RightPaddedBatchGivesTheMaskedReferenceOnRealTokens) {
  TempDir dir("qkb_pad");
  Model m(tiny(true));
  randomize(m, 19);
  const int V = m.config().vocab_size;
  const PaddedBatch pb = padded_batch(V);
  std::vector<float> logits((size_t)pb.B * pb.T * V);
  m.forward(pb.tokens.data(), pb.targets.data(), pb.B, pb.T, logits.data(), Mode::Inference);
  SafetensorsFile ref = run_reference(dir, m, pb.tokens, pb.targets, pb.B, pb.T, true);
  std::vector<float> want(logits.size());
  ref.read_f32("logits", {pb.B, pb.T, V}, want.data());
  double scale = 0, worst = 0;
  for (float v : want) scale = std::max(scale, (double)std::fabs(v));
  for (int b = 0; b < pb.B; ++b)
    for (int t = 0; t < pb.lengths[b]; ++t)
      for (int v = 0; v < V; ++v) {
        const size_t i = ((size_t)b * pb.T + t) * V + v;
        worst = std::max(worst, std::fabs((double)logits[i] - want[i]) / scale);
      }
  EXPECT_LT(worst, 1e-4);
  // The reference's mask is real: the padded rows themselves differ from our unmasked ones.
  double pad_diff = 0;
  for (int t = pb.lengths[1] + 1; t < pb.T; ++t)
    for (int v = 0; v < V; ++v) {
      const size_t i = ((size_t)pb.T + t) * V + v;
      pad_diff = std::max(pad_diff, (double)std::fabs(logits[i] - want[i]));
    }
  EXPECT_GT(pad_diff, 1e-4);
}

// SUBLLM in inference mode: padding is never kept by a subsampler and real tokens never
// attend to later pads, so each real row equals the sequence run alone, unpadded.
TEST(QkBias, RightPaddedSubllmBatchEqualsUnpaddedSequences) {
  Model m(tiny(true, "T(T(T)T)T"));
  randomize(m, 20);
  const int V = m.config().vocab_size;
  const PaddedBatch pb = padded_batch(V);
  std::vector<float> batched((size_t)pb.B * pb.T * V);
  m.forward(pb.tokens.data(), pb.targets.data(), pb.B, pb.T, batched.data(), Mode::Inference);
  for (int b = 0; b < pb.B; ++b) {
    const int n = pb.lengths[b];
    std::vector<float> alone((size_t)n * V);
    m.forward(pb.tokens.data() + (size_t)b * pb.T, nullptr, 1, n, alone.data(), Mode::Inference);
    const std::vector<float> rows(batched.begin() + (size_t)b * pb.T * V, batched.begin() + ((size_t)b * pb.T + n) * V);
    EXPECT_LT(max_abs_diff(rows, alone), 1e-4) << "sequence " << b;
  }
}

}  // namespace qk_bias_tests
}  // namespace subllm
