// Whole-model checks of the LLaMA path: gradients against finite differences, loss
// bookkeeping, checkpoint round trips and input errors.
#include <gtest/gtest.h>

#include <filesystem>

#include "grad_check.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/safetensors.h"

namespace subllm {
namespace model_tests {

ModelConfig tiny_config(bool tie = false) {
  ModelConfig c;
  c.vocab_size = 11;
  c.dim = 16;
  c.ffn_dim = 24;
  c.n_layers = 2;
  c.n_heads = 2;
  c.context = 16;
  c.tie_weights = tie;
  return c;
}

// Larger random weights than the real init so every path carries a visible gradient.
void randomize(Model& m, uint64_t seed) {
  Rng r(seed);
  for (const auto& p : m.params()) {
    float* w = m.param_data() + p.offset;
    for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(p.shape.size() == 1 ? 1.0 + 0.2 * r.normal() : 0.3 * r.normal());
  }
}

struct Batch {
  int B = 2, T = 7;
  std::vector<int32_t> tokens, targets;
};

Batch make_batch(int vocab, uint64_t seed) {
  Batch b;
  Rng r(seed);
  for (int i = 0; i < b.B * b.T; ++i) {
    b.tokens.push_back((int32_t)r.below(vocab));
    b.targets.push_back((int32_t)r.below(vocab));
  }
  b.targets[3] = -1;  // ignored position
  return b;
}

void check_model_gradients(bool tie) {
  Model m(tiny_config(tie));
  randomize(m, 1);
  Batch b = make_batch(11, 2);
  m.zero_grad();
  m.forward_backward(b.tokens.data(), b.targets.data(), b.B, b.T);
  for (const auto& p : m.params()) {
    std::vector<float> x(m.param_data() + p.offset, m.param_data() + p.offset + p.numel);
    std::vector<float> g(m.grad_data() + p.offset, m.grad_data() + p.offset + p.numel);
    auto loss = [&] {
      std::copy(x.begin(), x.end(), m.param_data() + p.offset);
      return (double)m.forward(b.tokens.data(), b.targets.data(), b.B, b.T);
    };
    testing::expect_grad_matches(p.name, x, g, loss, 1e-2f, 3e-2, 24, 2e-3);
    std::copy(x.begin(), x.end(), m.param_data() + p.offset);
  }
}

TEST(Model, GradientsMatchFiniteDifferences) { check_model_gradients(false); }
TEST(Model, TiedGradientsMatchFiniteDifferences) { check_model_gradients(true); }

TEST(Model, ForwardAndTrainingLossAgreeAndGradientsAccumulate) {
  Model m(tiny_config());
  m.init_weights(3);
  Batch b = make_batch(11, 4);
  float l1 = m.forward(b.tokens.data(), b.targets.data(), b.B, b.T);
  m.zero_grad();
  float l2 = m.forward_backward(b.tokens.data(), b.targets.data(), b.B, b.T);
  EXPECT_FLOAT_EQ(l1, l2);
  EXPECT_NEAR(l1, std::log(11.0), 0.05);  // the authors' init gives near-uniform outputs
  std::vector<float> once(m.grad_data(), m.grad_data() + m.num_params());
  m.zero_grad();
  m.forward_backward(b.tokens.data(), b.targets.data(), b.B, b.T, 0.5f);
  m.forward_backward(b.tokens.data(), b.targets.data(), b.B, b.T, 0.5f);
  for (int64_t i = 0; i < m.num_params(); i += 7) EXPECT_NEAR(m.grad_data()[i], once[i], 1e-6 + 1e-5 * std::fabs(once[i]));
}

TEST(Model, InitFollowsTheAuthorsScheme) {
  ModelConfig c = tiny_config();
  c.dim = 64;
  c.n_heads = 4;
  c.vocab_size = 500;
  c.ffn_dim = 96;
  c.n_layers = 3;
  Model m(c);
  m.init_weights(7);
  auto stats = [&](const std::string& name) {
    Tensor t = m.param(name);
    double s = 0, mx = 0;
    for (int64_t i = 0; i < t.numel(); ++i) {
      s += (double)t.f32()[i] * t.f32()[i];
      mx = std::max(mx, (double)std::fabs(t.f32()[i]));
    }
    return std::pair<double, double>{std::sqrt(s / t.numel()), mx};
  };
  auto [emb_rms, emb_max] = stats("decoder.embed_tokens.weight");
  EXPECT_NEAR(emb_rms, 1.0 / 8.0, 0.01);
  for (int c2 = 0; c2 < 64; ++c2) EXPECT_EQ(m.param("decoder.embed_tokens.weight").f32()[c2], 0.f);  // padding row
  auto [q_rms, q_max] = stats("decoder.layers.0.self_attn.q_proj.weight");
  EXPECT_LE(q_max, 0.018 + 1e-6);
  EXPECT_NEAR(q_rms, 0.006 * 0.986, 0.0005);  // a normal cut at ±3σ has std 0.986σ
  auto [o_rms, o_max] = stats("decoder.layers.2.self_attn.out_proj.weight");
  EXPECT_NEAR(o_rms, 0.006 / std::sqrt(6.0) * 0.986, 0.0003);
  auto [h_rms, h_max] = stats("decoder.output_projection.weight");
  EXPECT_LE(h_max, 1.0 / 8.0);
  EXPECT_NEAR(h_rms, 1.0 / 8.0 / std::sqrt(3.0), 0.005);
  EXPECT_EQ(m.param("decoder.layer_norm.weight").f32()[5], 1.0f);
}

TEST(Model, SaveLoadRoundTripAndMismatchErrors) {
  auto dir = std::filesystem::temp_directory_path() / ("subllm_model_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "model.safetensors").string();
  Model a(tiny_config());
  a.init_weights(5);
  a.save(path);
  Model b(tiny_config());
  b.load(path);
  for (int64_t i = 0; i < a.num_params(); ++i) ASSERT_EQ(a.param_data()[i], b.param_data()[i]);
  SafetensorsFile f(path);
  EXPECT_TRUE(f.has("decoder.layers.1.feedforward.swiglu.w12.weight"));
  EXPECT_EQ(f.get("decoder.layers.1.feedforward.swiglu.w12.weight").shape, (Shape{48, 16}));

  ModelConfig wider = tiny_config();
  wider.dim = 32;
  Model c(wider);
  try {
    c.load(path);
    FAIL() << "loading a mismatched checkpoint must fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("decoder.embed_tokens.weight"), std::string::npos) << e.what();
  }
  Model tied(tiny_config(true));
  try {
    tied.load(path);
    FAIL() << "an extra tensor must be reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("output_projection"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(Model, BadInputsAreClearErrors) {
  Model m(tiny_config());
  std::vector<int32_t> tok = {1, 2, 11}, tgt = {1, 2, 3};
  try {
    m.forward(tok.data(), tgt.data(), 1, 3);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 11"), std::string::npos) << e.what();
  }
  std::vector<int32_t> long_tok(17, 1);
  EXPECT_THROW(m.forward(long_tok.data(), nullptr, 1, 17), Error);
  ModelConfig bad = tiny_config();
  bad.structure = "TT(T";
  EXPECT_THROW(Model{bad}, Error);
}

}  // namespace model_tests
}  // namespace subllm
