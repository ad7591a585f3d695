// `subllm bench train`: training throughput of one config on random tokens.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "kernels/kernels.h"
#include "subllm/config.h"
#include "subllm/generate.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/optim.h"
#include "subllm/rng.h"
#include "subllm/threads.h"

namespace subllm::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}

// The machine's matrix-multiply rate on this thread count, the yardstick for MFU.
double measure_sgemm_gflops() {
  const int n = 2048;
  std::vector<float> a((size_t)n * n, 0.5f), b((size_t)n * n, 0.25f), c((size_t)n * n);
  kernels::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    auto t0 = Clock::now();
    kernels::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
    best = std::max(best, 2.0 * n * n * n / seconds_since(t0) / 1e9);
  }
  return best;
}

struct BenchTrainArgs {
  std::string config;
  std::string baseline;
  std::string optimizer = "adamw";
  int seq = 1024, batch = 4, steps = 3, warmup = 1, threads = 0;
  uint64_t seed = 1;
  bool json = false;
};

// Trains one config on random tokens; returns the measurement as JSON.
nlohmann::json measure_training(const std::string& config_path, const BenchTrainArgs& a, double sgemm) {
  ModelConfig cfg = load_config(config_path);
  if (cfg.context < a.seq) cfg.context = a.seq;
  Model model(cfg);
  model.init_weights(a.seed);
  std::unique_ptr<Optimizer> opt = make_optimizer(a.optimizer, model, AdamWOptions{}, ScaledAdamOptions{});
  Rng rng(a.seed);
  const int64_t n = (int64_t)a.batch * a.seq;
  std::vector<int32_t> tokens(n), targets(n);
  long step = 0;
  auto train_step = [&] {
    for (int64_t i = 0; i < n; ++i) {
      tokens[i] = (int32_t)(1 + rng.below(cfg.vocab_size - 1));
      targets[i] = (int32_t)rng.below(cfg.vocab_size);
    }
    model.set_train_context(step++, a.seed);
    model.zero_grad();
    float loss = model.forward_backward(tokens.data(), targets.data(), a.batch, a.seq);
    opt->step(model, a.optimizer == "adamw" ? 3e-4f : 0.045f);
    return loss;
  };
  for (int i = 0; i < a.warmup; ++i) train_step();
  double total = 0;
  float loss = 0;
  for (int i = 0; i < a.steps; ++i) {
    auto t0 = Clock::now();
    loss = train_step();
    double dt = seconds_since(t0);
    total += dt;
    if (!a.json) std::fprintf(stderr, "%s step %d/%d  loss %.4f  %.3f s\n", cfg.layout().c_str(), i + 1, a.steps, loss, dt);
  }
  const double step_s = total / a.steps;
  const double tps = n / step_s;
  const double gflops = model.train_flops_per_token(a.seq) * tps / 1e9;
  return {{"impl", "subllm"},
          {"config", config_path},
          {"structure", cfg.layout()},
          {"seq", a.seq},
          {"batch", a.batch},
          {"steps", a.steps},
          {"optimizer", a.optimizer},
          {"threads", num_threads()},
          {"params", model.num_params()},
          {"tokens_per_s", tps},
          {"step_s", step_s},
          {"flops_per_token", model.train_flops_per_token(a.seq)},
          {"gflops", gflops},
          {"sgemm_gflops", sgemm},
          {"mfu", gflops / sgemm},
          {"activation_mb", model.activation_bytes(a.batch, a.seq) / 1048576.0},
          {"peak_rss_mb", peak_rss_mb()},
          {"final_loss", loss}};
}

void print_measurement(const nlohmann::json& j) {
  std::printf("%-28s %s (%s)\n", "config", j["config"].get<std::string>().c_str(), j["structure"].get<std::string>().c_str());
  std::printf("%-28s %d x %d tokens, %d threads\n", "batch", j["batch"].get<int>(), j["seq"].get<int>(), j["threads"].get<int>());
  std::printf("%-28s %.1f\n", "tokens/s", j["tokens_per_s"].get<double>());
  std::printf("%-28s %.3f\n", "step (s)", j["step_s"].get<double>());
  std::printf("%-28s %.1f (sgemm %.1f, MFU %.1f%%)\n", "model GFLOP/s", j["gflops"].get<double>(),
              j["sgemm_gflops"].get<double>(), 100 * j["mfu"].get<double>());
  std::printf("%-28s %.0f\n", "activations (MB)", j["activation_mb"].get<double>());
  std::printf("%-28s %.0f\n", "peak RSS (MB)", j["peak_rss_mb"].get<double>());
}

int bench_train(const BenchTrainArgs& a) {
  set_num_threads(a.threads);
  check(a.seq > 0 && a.batch > 0 && a.steps > 0, "--seq, --batch and --steps must be positive");
  const double sgemm = measure_sgemm_gflops();
  // The baseline runs first and in the same process, so peak RSS is comparable only through
  // activation_mb; run each config alone (without --baseline) for a clean peak RSS.
  nlohmann::json base;
  if (!a.baseline.empty()) base = measure_training(a.baseline, a, sgemm);
  nlohmann::json j = measure_training(a.config, a, sgemm);
  if (!a.baseline.empty()) {
    j["baseline"] = base;
    j["speedup"] = j["tokens_per_s"].get<double>() / base["tokens_per_s"].get<double>();
    j["ideal_speedup"] = base["flops_per_token"].get<double>() / j["flops_per_token"].get<double>();
    j["fraction_of_ideal"] = j["speedup"].get<double>() / j["ideal_speedup"].get<double>();
    j["activation_ratio"] = j["activation_mb"].get<double>() / base["activation_mb"].get<double>();
  }
  if (a.json) {
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  if (!a.baseline.empty()) {
    std::printf("baseline\n");
    print_measurement(base);
    std::printf("\n");
  }
  print_measurement(j);
  if (!a.baseline.empty())
    std::printf("\n%-28s x%.3f (ideal from FLOPs x%.3f, %.0f%% of it); activations x%.2f\n", "speed vs baseline",
                j["speedup"].get<double>(), j["ideal_speedup"].get<double>(), 100 * j["fraction_of_ideal"].get<double>(),
                j["activation_ratio"].get<double>());
  return 0;
}

// Streaming read bandwidth (GB/s) over a buffer far larger than the caches: the yardstick
// for decoding, which reads every weight once per token.
double measure_read_bandwidth() {
  const size_t n = (size_t)1 << 27;  // 512 MB
  std::vector<float> buf(n, 1.0f);
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    auto t0 = Clock::now();
    double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
    for (size_t b = 0; b < n; b += 4096) {
      // 64 independent partial sums: four vector accumulators, so the loop is bound by
      // loads rather than by the latency of one addition chain.
      float acc[64] = {};
      for (size_t i = b; i < b + 4096; i += 64)
        for (int k = 0; k < 64; ++k) acc[k] += buf[i + k];
      float s = 0.f;
      for (float x : acc) s += x;
      total += s;
    }
    const double dt = seconds_since(t0);
    if (total != (double)n) std::fprintf(stderr, "bandwidth check sum mismatch\n");
    best = std::max(best, n * sizeof(float) / dt / 1e9);
  }
  return best;
}

struct BenchInferArgs {
  std::string config, model_dir, baseline;
  int prompt_len = 256, gen = 64, threads = 0;
  uint64_t seed = 1;
  bool json = false;
};

// Per subsampler, in order, the threshold that keeps the configured fraction of this
// prompt's tokens (random weights have no trained balance around 0).
std::vector<float> calibrate_thresholds(Model& m, const std::vector<int32_t>& prompt) {
  const int S = m.structure().num_subsamplers;
  m.knobs().keep_thresholds.assign(S, -std::numeric_limits<float>::infinity());
  for (int j = 0; j < S; ++j) {
    m.forward(prompt.data(), nullptr, 1, (int)prompt.size(), nullptr, Mode::Inference);
    std::vector<float> s = m.last_traces()[j].scores;
    if (s.empty()) continue;
    std::sort(s.begin(), s.end(), std::greater<float>());
    const double r = m.structure().segments[j + 1].retention;
    const size_t k = std::min(s.size() - 1, (size_t)std::llround(s.size() * r));
    m.knobs().keep_thresholds[j] = k < s.size() ? s[k] : s.back();
  }
  return m.knobs().keep_thresholds;
}

double forward_flops(const Model& m, int P) {
  const double head = 2.0 * m.config().vocab_size * m.config().dim;
  return (m.train_flops_per_token(P) / 3 - head) * P + head;
}

// Bytes of weights a decoded token reads when each segment sees the configured fraction.
double decode_weight_bytes(const Model& m) {
  const auto& st = m.structure();
  std::vector<double> frac(st.segments.size(), 1.0);
  const double C = m.config().dim, F = m.config().ffn_dim;
  double bytes = 4.0 * m.config().vocab_size * C + 4.0 * C;
  for (size_t s = 0; s < st.segments.size(); ++s) {
    if (s > 0) frac[s] = frac[st.segments[s].parent] * st.segments[s].retention;
    for (const auto& it : st.segments[s].items)
      bytes += it.is_block ? frac[s] * 4.0 * (4 * C * C + 3 * C * F + 2 * C) : frac[s] * 4.0 * 2 * C;
  }
  return bytes;
}

nlohmann::json measure_inference(const std::string& config_path, const BenchInferArgs& a, double sgemm, double bw) {
  std::unique_ptr<Model> model;
  std::string source = config_path;
  if (!a.model_dir.empty() && config_path == a.model_dir) {
    LoadedModel lm = load_model_dir(a.model_dir);
    model = std::move(lm.model);
  } else {
    ModelConfig cfg = load_config(config_path);
    if (cfg.context < a.prompt_len + a.gen) cfg.context = a.prompt_len + a.gen;
    model = std::make_unique<Model>(cfg);
    model->init_weights(a.seed);
  }
  Model& m = *model;
  check(a.prompt_len + a.gen <= m.config().context, "--prompt-len + --gen exceed the model's context");
  Rng rng(a.seed);
  std::vector<int32_t> prompt(a.prompt_len);
  for (auto& t : prompt) t = (int32_t)(1 + rng.below(m.config().vocab_size - 1));
  std::vector<float> thresholds;
  if (a.model_dir.empty() && !m.structure().is_plain()) thresholds = calibrate_thresholds(m, prompt);
  const int V = m.config().vocab_size;
  std::vector<float> logits(V);
  // One untimed pass sizes and page-faults the workspace and spins up the threads.
  {
    SequenceCache warm = m.new_cache();
    m.forward_cached(warm, prompt.data(), a.prompt_len, logits.data(), false);
  }
  SequenceCache cache = m.new_cache();
  auto t0 = Clock::now();
  m.forward_cached(cache, prompt.data(), a.prompt_len, logits.data(), false);
  const double prefill_s = seconds_since(t0);
  int32_t tok = (int32_t)(std::max_element(logits.begin(), logits.end()) - logits.begin());
  const double first_token_s = seconds_since(t0);
  auto t1 = Clock::now();
  for (int i = 0; i < a.gen; ++i) {
    m.forward_cached(cache, &tok, 1, logits.data(), false);
    tok = (int32_t)(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  const double decode_s = seconds_since(t1);
  std::vector<double> retention;
  for (size_t j = 0; j < cache.seen.size(); ++j) retention.push_back(cache.seen[j] ? (double)cache.kept[j] / cache.seen[j] : 0);
  const double weight_bytes = 4.0 * m.num_params();
  const size_t kv_llama = 2 * sizeof(float) * (size_t)m.config().n_layers * cache.length * m.config().dim;
  const double pf = forward_flops(m, a.prompt_len);
  return {{"impl", "subllm"},
          {"config", source},
          {"structure", m.config().layout()},
          {"threads", num_threads()},
          {"prompt_len", a.prompt_len},
          {"gen", a.gen},
          {"first_token_ms", 1e3 * first_token_s},
          {"prefill_tokens_per_s", a.prompt_len / prefill_s},
          {"prefill_gflops", pf / prefill_s / 1e9},
          {"prefill_flops", pf},
          {"sgemm_gflops", sgemm},
          {"prefill_fraction_of_sgemm", pf / prefill_s / 1e9 / sgemm},
          {"decode_tokens_per_s", a.gen / decode_s},
          {"read_bandwidth_gbs", bw},
          {"weight_bytes", weight_bytes},
          {"decode_bytes_per_token", decode_weight_bytes(m)},
          {"decode_limit_tokens_per_s", bw * 1e9 / weight_bytes},
          {"decode_fraction_of_limit", a.gen / decode_s / (bw * 1e9 / weight_bytes)},
          {"retention", retention},
          {"thresholds", thresholds},
          {"kv_cache_bytes", cache.bytes()},
          {"kv_cache_bytes_llama", kv_llama},
          {"peak_rss_mb", peak_rss_mb()}};
}

int bench_infer(const BenchInferArgs& a) {
  set_num_threads(a.threads);
  check(!a.config.empty() || !a.model_dir.empty(), "give --config CONFIG.json (random weights) or -m MODEL_DIR");
  check(a.prompt_len > 0 && a.gen > 0, "--prompt-len and --gen must be positive");
  const double sgemm = measure_sgemm_gflops(), bw = measure_read_bandwidth();
  nlohmann::json base;
  if (!a.baseline.empty()) base = measure_inference(a.baseline, a, sgemm, bw);
  nlohmann::json j = measure_inference(a.model_dir.empty() ? a.config : a.model_dir, a, sgemm, bw);
  if (!a.baseline.empty()) {
    j["baseline"] = base;
    j["first_token_speedup"] = base["first_token_ms"].get<double>() / j["first_token_ms"].get<double>();
    j["decode_speedup"] = j["decode_tokens_per_s"].get<double>() / base["decode_tokens_per_s"].get<double>();
    j["kv_cache_ratio"] = j["kv_cache_bytes"].get<double>() / base["kv_cache_bytes"].get<double>();
    j["ideal_first_token_speedup"] = base["prefill_flops"].get<double>() / j["prefill_flops"].get<double>();
    j["ideal_decode_speedup"] =
        base["decode_bytes_per_token"].get<double>() / j["decode_bytes_per_token"].get<double>();
  }
  if (a.json) {
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  auto show = [](const nlohmann::json& r) {
    std::printf("%s (%s), prompt %d, %d generated, %d threads\n", r["config"].get<std::string>().c_str(),
                r["structure"].get<std::string>().c_str(), r["prompt_len"].get<int>(), r["gen"].get<int>(),
                r["threads"].get<int>());
    std::printf("  time to first token   %.1f ms\n", r["first_token_ms"].get<double>());
    std::printf("  prefill               %.1f tokens/s (%.1f GFLOP/s, %.0f%% of sgemm %.0f)\n",
                r["prefill_tokens_per_s"].get<double>(), r["prefill_gflops"].get<double>(),
                100 * r["prefill_fraction_of_sgemm"].get<double>(), r["sgemm_gflops"].get<double>());
    std::printf("  decode                %.1f tokens/s (limit %.1f = %.1f GB/s / %.1f MB of weights: %.0f%%)\n",
                r["decode_tokens_per_s"].get<double>(), r["decode_limit_tokens_per_s"].get<double>(),
                r["read_bandwidth_gbs"].get<double>(), r["weight_bytes"].get<double>() / 1e6,
                100 * r["decode_fraction_of_limit"].get<double>());
    std::printf("  kv cache              %.2f MB\n", r["kv_cache_bytes"].get<double>() / 1048576.0);
    for (size_t i = 0; i < r["retention"].size(); ++i)
      std::printf("  retention %zu           %.3f\n", i, r["retention"][i].get<double>());
  };
  if (!a.baseline.empty()) show(base);
  show(j);
  if (!a.baseline.empty())
    std::printf("ratios: first token x%.3f (ideal x%.3f), decode x%.3f (ideal x%.3f), kv cache x%.3f\n",
                j["first_token_speedup"].get<double>(), j["ideal_first_token_speedup"].get<double>(),
                j["decode_speedup"].get<double>(), j["ideal_decode_speedup"].get<double>(),
                j["kv_cache_ratio"].get<double>());
  return 0;
}

}  // namespace

void add_bench_command(CLI::App& app, Runner& run) {
  auto* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  auto* train = bench->add_subcommand("train", "Training throughput: forward + backward + AdamW step on random tokens");
  auto args = std::make_shared<BenchTrainArgs>();
  train->add_option("--config", args->config, "config.json of the model")->required()->check(CLI::ExistingFile);
  train->add_option("--baseline", args->baseline, "a second config measured in the same run (e.g. the LLaMA of a SUBLLM)")
      ->check(CLI::ExistingFile);
  train->add_option("--optimizer", args->optimizer, "adamw | scaled-adam")
      ->capture_default_str()
      ->transform([](std::string v) { return v == "scaled-adam" ? std::string("scaled_adam") : v; })
      ->check(CLI::IsMember({"adamw", "scaled_adam"}));
  train->add_option("--seq", args->seq, "sequence length")->capture_default_str();
  train->add_option("--batch", args->batch, "sequences per step")->capture_default_str();
  train->add_option("--steps", args->steps, "timed steps")->capture_default_str();
  train->add_option("--warmup", args->warmup, "untimed steps first")->capture_default_str();
  train->add_option("-t,--threads", args->threads, "threads (0: all cores)")->capture_default_str();
  train->add_option("--seed", args->seed, "seed for weights and tokens")->capture_default_str();
  train->add_flag("--json", args->json, "print one JSON line");
  train->callback([&run, args] { run = [args] { return bench_train(*args); }; });

  auto* infer = bench->add_subcommand("infer", "Inference: prefill, time to first token, decode speed, KV cache");
  auto ia = std::make_shared<BenchInferArgs>();
  auto* icfg = infer->add_option("--config", ia->config, "config.json (random weights; SUBLLM thresholds calibrated)")
                   ->check(CLI::ExistingFile);
  infer->add_option("-m,--model", ia->model_dir, "a trained model folder instead of random weights")->excludes(icfg);
  infer->add_option("--baseline", ia->baseline, "a second config measured in the same run (e.g. the LLaMA)")
      ->check(CLI::ExistingFile);
  infer->add_option("--prompt-len", ia->prompt_len, "prompt tokens")->capture_default_str();
  infer->add_option("--gen", ia->gen, "tokens decoded after the prompt")->capture_default_str();
  infer->add_option("-t,--threads", ia->threads, "threads (0: all cores)")->capture_default_str();
  infer->add_option("--seed", ia->seed, "seed for weights and prompt")->capture_default_str();
  infer->add_flag("--json", ia->json, "print one JSON line");
  infer->callback([&run, ia] { run = [ia] { return bench_infer(*ia); }; });
}

}  // namespace subllm::cli
