// The whole model on the GPU against the CPU backend: loss and every parameter gradient on the
// same weights (fp32 and bf16 compute), a short training run's loss curve, cached decoding
// against a full inference-mode pass, and checkpoints moving between the devices. Each test
// reports itself skipped where no GPU can run it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "backend/backend.h"
#include "cuda_test_util.h"
#include "subllm/model.h"
#include "subllm/prepare.h"
#include "subllm/trainer.h"
#include "test_util.h"

namespace subllm {
namespace cuda_model_tests {

namespace fs = std::filesystem;
using test::all_close;

// ---- without a GPU --------------------------------------------------------------------------

TEST(CudaRegistry, CudaIsUsableOrSaysWhyNot) {
  for (const char* device : {"cuda", "cuda:fp32"}) {
    std::string why;
    if (backend_available(device, &why)) {
      Backend& be = backend_for(device);
      EXPECT_STREQ(be.name(), device);
      EXPECT_EQ(be.compute_dtype(), std::string(device) == "cuda" ? DType::BF16 : DType::F32);
      continue;
    }
    EXPECT_NE(why.find(device), std::string::npos) << why;
    const std::string msg = testing::error_of([&] { backend_for(device); });
    EXPECT_EQ(msg, why);
  }
}

// ---- one pass on the same weights -------------------------------------------------------------

ModelConfig small_config(const std::string& structure, std::vector<float> retentions) {
  ModelConfig c;
  c.vocab_size = 301;
  c.dim = 128;
  c.ffn_dim = 344;
  c.n_heads = 2;  // head dim 64
  c.context = 256;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(retentions);
  return c;
}

// Random weights that carry gradient everywhere; score layers scaled so scores spread widely
// (kept sets far from ties, so bf16 rounding does not change them).
std::vector<float> random_weights(const Model& m, uint64_t seed) {
  Rng r(seed);
  std::vector<float> w((size_t)m.num_params(), 0.f);
  for (const auto& p : m.params()) {
    const bool score = p.name.find("to_scores") != std::string::npos;
    const bool bypass = p.name.find("bypass_scale") != std::string::npos;
    const double fan_in = p.shape.size() == 2 ? (double)p.shape[1] : 1.0;
    for (int64_t i = 0; i < p.numel; ++i) {
      float& x = w[(size_t)(p.offset + i)];
      if (bypass) x = (float)(0.5 + 0.2 * r.normal());
      else if (score) x = (float)(2.0 * r.normal() / std::sqrt(fan_in));
      else if (p.shape.size() == 1) x = (float)(1.0 + 0.2 * r.normal());
      else x = (float)(r.normal() / std::sqrt(fan_in));
    }
  }
  return w;
}

void set_weights(Model& m, const std::vector<float>& w) {
  m.backend().to_device(m.param_data(), w.data(), sizeof(float) * w.size());
  m.weights().params_changed();
}

std::vector<float> grads_of(Model& m) {
  std::vector<float> g((size_t)m.num_params());
  m.backend().sync();
  m.backend().to_host(g.data(), m.grad_data(), sizeof(float) * g.size());
  return g;
}

struct Batch {
  std::vector<int32_t> tokens, targets;
};
Batch random_batch(int B, int T, int V, uint64_t seed) {
  Rng r(seed);
  Batch b;
  for (int i = 0; i < B * T; ++i) {
    b.tokens.push_back((int32_t)r.below(V));
    b.targets.push_back(i % 7 == 3 ? -1 : (int32_t)r.below(V));  // some ignored targets
  }
  return b;
}

// ||a - b|| / ||b|| of one tensor.
double rel_err(const float* a, const float* b, int64_t n) {
  double d = 0, s = 0;
  for (int64_t i = 0; i < n; ++i) {
    d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    s += (double)b[i] * b[i];
  }
  return s > 0 ? std::sqrt(d / s) : std::sqrt(d);
}

// Loss and gradients of one training-mode pass on `device` against the CPU.
// fp32 compute: loss within 1e-5 relative, each tensor's gradient within 1e-4 (relative norm).
// bf16 compute: loss within 2e-2, each gradient within 8e-2 (bf16 holds 8 bits of mantissa;
// errors of a few ulps per op over a few blocks).
void check_pass(const std::string& device, const std::string& structure, std::vector<float> ret) {
  const ModelConfig cfg = small_config(structure, ret);
  Model cpu(cfg), gpu(cfg, device);
  const std::vector<float> w = random_weights(cpu, 5);
  set_weights(cpu, w);
  set_weights(gpu, w);
  const int B = 3, T = 100;
  const Batch b = random_batch(B, T, cfg.vocab_size, 9);
  for (Model* m : {&cpu, &gpu}) {
    m->set_train_context(40, 3);
    m->zero_grad();
  }
  const float loss_cpu = cpu.forward_backward(b.tokens.data(), b.targets.data(), B, T);
  const float loss_gpu = gpu.forward_backward(b.tokens.data(), b.targets.data(), B, T);
  const bool bf16 = gpu.weights().compute_dtype() == DType::BF16;
  EXPECT_NEAR(loss_gpu, loss_cpu, (bf16 ? 2e-2 : 1e-5) * std::fabs(loss_cpu)) << device << " " << structure;
  // The subsamplers kept the same tokens.
  const auto tc = cpu.last_traces(), tg = gpu.last_traces();
  ASSERT_EQ(tc.size(), tg.size());
  for (size_t j = 0; j < tc.size(); ++j) {
    EXPECT_EQ(tc[j].kept, tg[j].kept) << "subsampler " << j;
    EXPECT_EQ(tc[j].flipped, tg[j].flipped);
  }
  const std::vector<float> gc = grads_of(cpu), gg = grads_of(gpu);
  for (const auto& p : cpu.params()) {
    const double e = rel_err(gg.data() + p.offset, gc.data() + p.offset, p.numel);
    EXPECT_LT(e, bf16 ? 8e-2 : 1e-4) << device << " " << structure << ": gradient of " << p.name;
  }
}

TEST(CudaModel, LlamaLossAndGradientsMatchCpuInFp32) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  check_pass("cuda:fp32", "TTT", {});
}
TEST(CudaModel, NestedSubllmLossAndGradientsMatchCpuInFp32) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  check_pass("cuda:fp32", "T(T(TT)T)T", {0.6f, 0.5f});
}
TEST(CudaModel, LlamaLossAndGradientsMatchCpuInBf16) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  check_pass("cuda", "TTT", {});
}
TEST(CudaModel, NestedSubllmLossAndGradientsMatchCpuInBf16) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  check_pass("cuda", "T(T(TT)T)T", {0.6f, 0.5f});
}

// ---- inference ------------------------------------------------------------------------------

// Cached decoding (a prefill chunk, then token by token) gives the logits of one full
// inference-mode pass on the same device; and both track the CPU.
void check_cached(const std::string& device) {
  const ModelConfig cfg = small_config("T(T(TT)T)T", {0.6f, 0.5f});
  Model cpu(cfg), gpu(cfg, device);
  const std::vector<float> w = random_weights(cpu, 11);
  set_weights(cpu, w);
  set_weights(gpu, w);
  const int T = 90, V = cfg.vocab_size;
  const Batch b = random_batch(1, T, V, 13);
  std::vector<float> full((size_t)T * V), ref((size_t)T * V);
  gpu.forward(b.tokens.data(), nullptr, 1, T, full.data(), Mode::Inference);
  cpu.forward(b.tokens.data(), nullptr, 1, T, ref.data(), Mode::Inference);
  const bool bf16 = gpu.weights().compute_dtype() == DType::BF16;
  if (!bf16) {
    EXPECT_TRUE(all_close(full, ref, 1e-4f, 1e-4f)) << "full pass against the CPU";
  }
  SequenceCache cache = gpu.new_cache(16);
  std::vector<float> cached((size_t)T * V);
  const int prefill = 40;
  gpu.forward_cached(cache, b.tokens.data(), prefill, cached.data(), true);
  for (int t = prefill; t < T; ++t) gpu.forward_cached(cache, b.tokens.data() + t, 1, cached.data() + (size_t)t * V, false);
  // The same kernels on the same device: equal up to the order of accumulation.
  EXPECT_TRUE(all_close(cached, full, bf16 ? 3e-2f : 1e-4f, bf16 ? 3e-2f : 1e-4f)) << device;
  EXPECT_EQ(cache.length, T);
  EXPECT_EQ(cache.element_bytes, bf16 ? 2u : 4u);
}

TEST(CudaModel, CachedDecodingEqualsAFullInferencePassInFp32) {
  SUBLLM_REQUIRE_DEVICE("cuda:fp32");
  check_cached("cuda:fp32");
}
TEST(CudaModel, CachedDecodingEqualsAFullInferencePassInBf16) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  check_cached("cuda");
}

// ---- training ----------------------------------------------------------------------------------

using testing::prepare_tiny;

TrainOptions tiny_run(const std::string& data, const std::string& out, const std::string& device) {
  TrainOptions o;
  o.data_dir = data;
  o.out_dir = out;
  o.device = device;
  o.model.vocab_size = 400;
  o.model.dim = 64;
  o.model.ffn_dim = 128;
  o.model.n_layers = 3;
  o.model.n_heads = 1;  // head dim 64
  o.model.structure = "T(T)T";
  o.model.retentions = {0.5f};
  o.batch = 4;
  o.seq = 64;
  o.steps = 30;
  o.lr.base_lr = 3e-3f;
  o.lr.warmup_steps = 5;
  o.eval_every = 0;
  o.eval_batches = 2;
  o.ckpt_every = 10;
  o.keep_last = 5;
  o.quiet = true;
  return o;
}

std::vector<double> losses(const std::string& run) {
  std::vector<double> out;
  std::ifstream in(fs::path(run) / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}

// The same run on the CPU and in bf16 on the GPU: every step's loss within 3% (the data, the
// initial weights and the random choices are the same; only rounding differs).
TEST(CudaTrain, LossCurveTracksTheCpu) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  testing::TempDir tmp("cuda_train");
  const std::string data = prepare_tiny(tmp);
  train(tiny_run(data, tmp.file("cpu"), "cpu"));
  train(tiny_run(data, tmp.file("gpu"), "cuda"));
  const auto a = losses(tmp.file("cpu")), b = losses(tmp.file("gpu"));
  ASSERT_EQ(a.size(), 30u);
  ASSERT_EQ(b.size(), 30u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(b[i], a[i], 0.03 * a[i]) << "step " << i + 1;
  EXPECT_LT(b.back(), b.front() - 1.0) << "the GPU run did not learn";
}

// A checkpoint written on the GPU resumes on the CPU, and the reverse; the resumed run
// continues the curve (within bf16 rounding of the uninterrupted run).
TEST(CudaTrain, CheckpointsResumeAcrossDevices) {
  SUBLLM_REQUIRE_DEVICE("cuda");
  testing::TempDir tmp("cuda_resume");
  const std::string data = prepare_tiny(tmp);
  for (const auto& [first, second] : {std::pair<std::string, std::string>{"cuda", "cpu"}, {"cpu", "cuda"}}) {
    const std::string run = tmp.file(first + "_then_" + second);
    TrainOptions part = tiny_run(data, run, first);
    part.steps = 20;
    train(part);
    TrainOptions resumed = tiny_run(data, "", second);
    resumed.resume = run;
    const TrainResult r = train(resumed);
    EXPECT_EQ(r.steps_done, 30) << first << " -> " << second;
    const auto l = losses(run);
    ASSERT_EQ(l.size(), 30u);
    EXPECT_NEAR(l[20], l[19], 0.1 * l[19]) << "the resumed step continues the curve";
    EXPECT_TRUE(fs::exists(fs::path(run) / "checkpoint-00000030" / "model.safetensors"));
  }
}

}  // namespace cuda_model_tests
}  // namespace subllm
