// `subllm bench train`: training throughput of one config on random tokens.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "kernels/kernels.h"
#include "subllm/config.h"
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
}

}  // namespace subllm::cli
