// The whole model against an independent PyTorch implementation written from the spec
// (tests/oracle/reference.py, run under Debian's python3-torch): same weights and batch give
// the same loss, logits, every parameter gradient and the weights after one AdamW step.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "subllm/model.h"
#include "subllm/optim.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"

namespace subllm {
namespace oracle_tests {

namespace fs = std::filesystem;

double max_rel_err(const float* got, const float* want, int64_t n) {
  double scale = 0, worst = 0;
  for (int64_t i = 0; i < n; ++i) scale = std::max(scale, (double)std::fabs(want[i]));
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs((double)got[i] - want[i]) / std::max(scale, 1e-30));
  return worst;
}

struct OracleCase {
  ModelConfig cfg;
  int B = 2, T = 17;
  long step = 0;            // global training step (schedules of the balancer and bypass limit)
  float balancer_prob = 0;  // chance each subsampler's balancer acts
  float limit_prob = 0;     // chance each bypass limit acts
};

void run_oracle(const OracleCase& oc, const std::string& tag) {
  fs::path dir = fs::temp_directory_path() / ("subllm_oracle_" + tag + "_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  Model m(oc.cfg);
  m.init_weights(11);
  // Perturb the gains away from 1 so their gradients are exercised with generic values.
  Rng r(12);
  for (const auto& p : m.params())
    if (p.shape.size() == 1)
      for (int64_t i = 0; i < p.numel; ++i) m.param_data()[p.offset + i] = (float)(1.0 + 0.1 * r.normal());
  save_config(oc.cfg, (dir / "config.json").string());
  m.save((dir / "model.safetensors").string());
  const int N = oc.B * oc.T;
  std::vector<int32_t> tokens(N), targets(N);
  for (int i = 0; i < N; ++i) {
    tokens[i] = (int32_t)r.below(oc.cfg.vocab_size);
    targets[i] = (i % 5 == 4) ? -1 : (int32_t)r.below(oc.cfg.vocab_size);
  }
  // The random choices of this training pass (which subsamplers flip their pairing, which
  // balancers and bypass limits act) are handed to the reference, which selects tokens itself.
  m.knobs().balancer_prob = ScheduledFloat(oc.balancer_prob);
  m.knobs().balancer_counted = false;  // the reference implements the paper's balancer
  m.knobs().balancer_grad_scale = 0.04f;
  m.knobs().bypass_limit_prob = oc.limit_prob;
  m.set_train_context(oc.step, 5);
  m.forward(tokens.data(), targets.data(), oc.B, oc.T, nullptr, Mode::Train);
  const auto traces = m.last_traces();
  std::vector<std::vector<int32_t>> flags;
  const int32_t step_i = (int32_t)oc.step;
  std::vector<SafetensorsOut> batch = {{"tokens", DType::I32, {oc.B, oc.T}, tokens.data()},
                                       {"targets", DType::I32, {oc.B, oc.T}, targets.data()},
                                       {"step", DType::I32, {1}, &step_i}};
  for (const auto& t : traces) flags.push_back({t.flipped, t.balancer_on, t.limit_on});
  for (size_t j = 0; j < traces.size(); ++j)
    batch.push_back({"choices/" + std::to_string(j), DType::I32, {3}, flags[j].data()});
  write_safetensors((dir / "batch.safetensors").string(), batch);
  AdamWOptions opt;
  opt.beta1 = 0.9f;
  opt.beta2 = 0.95f;
  opt.eps = 1e-8f;
  opt.weight_decay = 0.1f;
  opt.grad_clip = 0.5f;
  const float lr = 1e-3f;
  std::ofstream(dir / "optim.json") << "{\"lr\": " << lr << ", \"beta1\": 0.9, \"beta2\": 0.95, \"eps\": 1e-8, "
                                    << "\"weight_decay\": 0.1, \"grad_clip\": 0.5}\n";
  const std::string cmd = "/usr/bin/python3 " SUBLLM_SOURCE_DIR "/tests/oracle/reference.py " + dir.string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "reference failed: " << cmd << " (is python3-torch installed? run scripts/setup.sh)";
  SafetensorsFile ref((dir / "reference.safetensors").string());

  for (size_t j = 0; j < traces.size(); ++j) {
    const int Tc = traces[j].kept_per_seq;
    const SafetensorsEntry& e = ref.get("kept/" + std::to_string(j));
    ASSERT_EQ(e.shape, (Shape{oc.B, Tc})) << "subsampler " << j << " keeps a different number of tokens";
    const int32_t* rk = static_cast<const int32_t*>(e.data);
    EXPECT_EQ(std::vector<int32_t>(rk, rk + (size_t)oc.B * Tc), traces[j].kept) << "subsampler " << j;
  }
  std::vector<float> logits((size_t)N * oc.cfg.vocab_size);
  float loss_fwd = m.forward(tokens.data(), targets.data(), oc.B, oc.T, logits.data(), Mode::Train);
  m.zero_grad();
  float loss = m.forward_backward(tokens.data(), targets.data(), oc.B, oc.T);
  float ref_loss = 0;
  ref.read_f32("loss", {1}, &ref_loss);
  EXPECT_NEAR(loss, ref_loss, 1e-5 * std::fabs(ref_loss));
  EXPECT_NEAR(loss_fwd, ref_loss, 1e-5 * std::fabs(ref_loss));
  std::vector<float> ref_logits(logits.size());
  ref.read_f32("logits", {oc.B, oc.T, oc.cfg.vocab_size}, ref_logits.data());
  EXPECT_LT(max_rel_err(logits.data(), ref_logits.data(), (int64_t)logits.size()), 1e-4);
  for (const auto& p : m.params()) {
    std::vector<float> g(p.numel);
    ref.read_f32("grad/" + p.name, p.shape, g.data());
    double err = max_rel_err(m.grad_data() + p.offset, g.data(), p.numel);
    EXPECT_LT(err, 1e-4) << "gradient of " << p.name;
  }
  AdamW adam(m, opt);
  adam.step(m, lr);
  // A first Adam step moves each weight by about lr * sign(g), so an entry whose gradient is
  // at float rounding size may legitimately differ by a fraction of lr.
  for (const auto& p : m.params()) {
    std::vector<float> w(p.numel);
    ref.read_f32("updated/" + p.name, p.shape, w.data());
    double scale = 0, worst = 0;
    for (int64_t i = 0; i < p.numel; ++i) scale = std::max(scale, (double)std::fabs(w[i]));
    for (int64_t i = 0; i < p.numel; ++i)
      worst = std::max(worst, std::fabs((double)m.param_data()[p.offset + i] - w[i]) / (1e-4 * scale + 2e-2 * lr));
    EXPECT_LT(worst, 1.0) << "weights after AdamW: " << p.name;
  }
  fs::remove_all(dir);
}

ModelConfig oracle_config() {
  ModelConfig c;
  c.vocab_size = 64;
  c.dim = 32;
  c.ffn_dim = 48;
  c.n_layers = 2;
  c.n_heads = 4;
  c.context = 32;
  return c;
}

TEST(Oracle, LlamaMatchesPyTorch) { run_oracle({oracle_config()}, "llama"); }

ModelConfig nested_config() {
  ModelConfig c = oracle_config();
  c.n_layers = 5;
  c.structure = "T(T(T)T)T";
  c.retentions = {0.6f, 0.5f};
  return c;
}

TEST(Oracle, NestedSubllmMatchesPyTorch) {
  OracleCase oc{nested_config()};
  run_oracle(oc, "subllm");
}

TEST(Oracle, NestedSubllmWithBalancerAndBypassLimitMatchesPyTorch) {
  OracleCase oc{nested_config()};
  oc.step = 1500;
  oc.balancer_prob = 1.0f;
  oc.limit_prob = 1.0f;
  run_oracle(oc, "subllm_balanced");
}

TEST(Oracle, GroupedQueryLlamaMatchesPyTorch) {
  ModelConfig c = oracle_config();
  c.n_kv_heads = 2;
  run_oracle({c}, "gqa");
}

TEST(Oracle, MultiQueryNestedSubllmMatchesPyTorch) {
  ModelConfig c = nested_config();
  c.n_kv_heads = 1;
  run_oracle({c}, "mqa_subllm");
}

TEST(Oracle, TiedLlamaMatchesPyTorch) {
  ModelConfig c = oracle_config();
  c.tie_weights = true;
  run_oracle({c}, "tied");
}

}  // namespace oracle_tests
}  // namespace subllm
