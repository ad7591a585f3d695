// `subllm bench train | infer | paper`: throughput of configs on random data.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/commands.h"
#include "subllm/bench.h"
#include "subllm/error.h"
#include "subllm/threads.h"

namespace subllm::cli {
namespace {

struct BenchTrainArgs {
  std::string config;
  std::string baseline;
  TrainBenchOptions opt;
  int threads = 0;
  bool json = false;
};

struct BenchInferArgs {
  std::string config, baseline;
  std::string baseline_dtype, baseline_kv_dtype;  // the baseline's types (empty: the model's)
  InferBenchOptions opt;
  std::vector<int> streams;  // batched decoding of this many sequences at once, each count in turn
  int threads = 0;
  bool json = false;
};

void print_measurement(const nlohmann::json& j) {
  std::printf("%-28s %s (%s)\n", "config", j["config"].get<std::string>().c_str(), j["structure"].get<std::string>().c_str());
  std::printf("%-28s %d x %d tokens, %d threads\n", "batch", j["batch"].get<int>(), j["seq"].get<int>(), j["threads"].get<int>());
  std::printf("%-28s %.1f\n", "tokens/s", j["tokens_per_s"].get<double>());
  std::printf("%-28s %.3f\n", "step (s)", j["step_s"].get<double>());
  std::printf("%-28s %.1f (sgemm %.1f, MFU %.1f%%)\n", "model GFLOP/s", j["gflops"].get<double>(),
              j["sgemm_gflops"].get<double>(), 100 * j["mfu"].get<double>());
  std::printf("%-28s %.0f\n", "activations (MB)", j["activation_mb"].get<double>());
  std::printf("%-28s %.0f\n", "peak RSS (MB)", j["peak_rss_mb"].get<double>());
  if (j["peak_device_mb"].get<double>() > 0)
    std::printf("%-28s %.0f\n", "peak device memory (MB)", j["peak_device_mb"].get<double>());
}

int bench_train(const BenchTrainArgs& a) {
  set_num_threads(a.threads);
  check(a.opt.seq > 0 && a.opt.batch > 0 && a.opt.steps > 0, "--seq, --batch and --steps must be positive");
  const double sgemm = measure_sgemm_gflops(a.opt.device);
  TrainBenchOptions opt = a.opt;
  opt.progress = !a.json;
  // The baseline runs first and in the same process, so peak RSS is comparable only through
  // activation_mb; run each config alone (without --baseline) for a clean peak RSS.
  nlohmann::json base;
  if (!a.baseline.empty()) base = measure_training(a.baseline, opt, sgemm);
  nlohmann::json j = measure_training(a.config, opt, sgemm);
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

// Whether `bench infer` measures a baseline beside the model: another config, or the same
// model in other types.
bool paired(const BenchInferArgs& a) {
  return !a.baseline.empty() || !a.baseline_dtype.empty() || !a.baseline_kv_dtype.empty();
}
InferBenchOptions baseline_options(const BenchInferArgs& a) {
  InferBenchOptions base = a.opt;
  if (!a.baseline.empty()) base.model_dir.clear();  // a config: random weights
  if (!a.baseline_dtype.empty()) base.dtype = a.baseline_dtype;
  if (!a.baseline_kv_dtype.empty()) base.kv_dtype = a.baseline_kv_dtype;
  return base;
}

// `bench infer --streams 1,4,16`: aggregate decode speed of that many sequences decoding
// together, for the config and (in the same run) the baseline.
int bench_streams(const BenchInferArgs& a) {
  check(a.opt.model_dir.empty(), "--streams measures random weights: give --config CONFIG.json instead of -m");
  const InferBenchOptions base_opt = baseline_options(a);
  const std::string baseline = a.baseline.empty() ? a.config : a.baseline;
  nlohmann::json rows = nlohmann::json::array();
  double single = 0, single_base = 0;
  for (int n : a.streams) {
    nlohmann::json row = paired(a) ? measure_streams_pair(a.config, a.opt, baseline, base_opt, n)
                                   : measure_streams(a.config, a.opt, n);
    if (n == a.streams.front()) single = row["decode_tokens_per_s"].get<double>();
    row["decode_vs_first"] = row["decode_tokens_per_s"].get<double>() / single;
    if (paired(a)) {
      nlohmann::json& base = row["baseline"];
      if (n == a.streams.front()) single_base = base["decode_tokens_per_s"].get<double>();
      base["decode_vs_first"] = base["decode_tokens_per_s"].get<double>() / single_base;
    }
    rows.push_back(row);
  }
  if (a.json) {
    std::printf("%s\n", nlohmann::json{{"streams", rows}}.dump().c_str());
    return 0;
  }
  auto show = [](const nlohmann::json& r) {
    std::printf("  %-40s %3d streams  decode %9.1f tokens/s (x%.2f of %s), step %.2f ms, prefill %.1f tokens/s\n",
                (r["config"].get<std::string>() + " (" + r["structure"].get<std::string>() + ", " +
                 r["dtype"].get<std::string>() + ")").c_str(),
                r["streams"].get<int>(), r["decode_tokens_per_s"].get<double>(), r["decode_vs_first"].get<double>(),
                "the first count", r["decode_step_ms"].get<double>(), r["prefill_tokens_per_s"].get<double>());
  };
  std::printf("batched decoding: prompt %d, %d generated per stream, %d threads\n", a.opt.prompt_len, a.opt.gen,
              rows[0]["threads"].get<int>());
  for (const auto& r : rows) {
    if (r.contains("baseline")) show(r["baseline"]);
    show(r);
    if (r.contains("decode_speedup"))
      std::printf("  ratio at %d streams: decode x%.3f over the baseline (decodes alternated)\n", r["streams"].get<int>(),
                  r["decode_speedup"].get<double>());
  }
  return 0;
}

int bench_infer(const BenchInferArgs& a) {
  set_num_threads(a.threads);
  check(!a.config.empty() || !a.opt.model_dir.empty(), "give --config CONFIG.json (random weights) or -m MODEL_DIR");
  check(a.opt.prompt_len > 0 && a.opt.gen > 0, "--prompt-len and --gen must be positive");
  if (!a.streams.empty()) return bench_streams(a);
  const double sgemm = measure_sgemm_gflops(a.opt.device);
  const std::string model = a.opt.model_dir.empty() ? a.config : a.opt.model_dir;
  const nlohmann::json j = paired(a) ? measure_inference_pair(model, a.opt, a.baseline.empty() ? model : a.baseline,
                                                              baseline_options(a), sgemm)
                                     : measure_inference(model, a.opt, sgemm);
  const nlohmann::json base = paired(a) ? j["baseline"] : nlohmann::json();
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
    std::printf("  decode                %.1f tokens/s (limit %.1f = %.1f GB/s / (%.1f MB of %s weights + %.1f MB of "
                "%s cache) per token: %.0f%%)\n",
                r["decode_tokens_per_s"].get<double>(), r["decode_limit_tokens_per_s"].get<double>(),
                r["read_bandwidth_gbs"].get<double>(), r["weight_bytes"].get<double>() / 1e6,
                r["dtype"].get<std::string>().c_str(), r["kv_read_bytes"].get<double>() / 1e6,
                r["kv_dtype"].get<std::string>().c_str(), 100 * r["decode_fraction_of_limit"].get<double>());
    std::printf("  kv cache              %.2f MB\n", r["kv_cache_bytes"].get<double>() / 1048576.0);
    for (size_t i = 0; i < r["retention"].size(); ++i)
      std::printf("  retention %zu           %.3f\n", i, r["retention"][i].get<double>());
  };
  if (paired(a)) show(base);
  show(j);
  if (paired(a))
    std::printf("ratios (decodes alternated): first token x%.3f (ideal x%.3f), decode x%.3f (ideal x%.3f), kv cache x%.3f\n",
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
  train->add_option("--optimizer", args->opt.optimizer, "adamw | scaled-adam")
      ->capture_default_str()
      ->transform([](std::string v) { return v == "scaled-adam" ? std::string("scaled_adam") : v; })
      ->check(CLI::IsMember({"adamw", "scaled_adam"}));
  train->add_option("--seq", args->opt.seq, "sequence length")->capture_default_str()->check(interval("[1, inf)"));
  train->add_option("--batch", args->opt.batch, "sequences per step")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  train->add_option("--steps", args->opt.steps, "timed steps")->capture_default_str()->check(interval("[1, inf)"));
  train->add_option("--warmup", args->opt.warmup, "untimed steps first")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  add_threads_option(train, args->threads);
  train->add_option("--seed", args->opt.seed, "seed for weights and tokens")->capture_default_str();
  add_device_option(train, args->opt.device);
  train->add_flag("--json", args->json, "print one JSON line");
  train->callback([&run, args] { run = [args] { return bench_train(*args); }; });

  auto* infer = bench->add_subcommand("infer", "Inference: prefill, time to first token, decode speed, KV cache");
  auto ia = std::make_shared<BenchInferArgs>();
  auto* icfg = infer->add_option("--config", ia->config, "config.json (random weights; SUBLLM thresholds calibrated)")
                   ->check(CLI::ExistingFile);
  infer->add_option("-m,--model", ia->opt.model_dir, "a trained model folder instead of random weights")->excludes(icfg);
  infer->add_option("--baseline", ia->baseline,
                    "a second config measured side by side in the same run (e.g. the LLaMA), decodes alternating; "
                    "holds both models in memory")
      ->check(CLI::ExistingFile);
  infer->add_option("--baseline-dtype", ia->baseline_dtype,
                    "the baseline's weight type (default: --dtype's); without --baseline the baseline is this model, "
                    "e.g. --dtype q8 --baseline-dtype f32")
      ->check(CLI::IsMember({"f32", "bf16", "q8"}));
  infer->add_option("--baseline-kv-dtype", ia->baseline_kv_dtype, "the baseline's key/value cache type (default: --kv-dtype's)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  infer->add_option("--prompt-len", ia->opt.prompt_len, "prompt tokens")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  infer->add_option("--gen", ia->opt.gen, "tokens decoded after the prompt")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  add_threads_option(infer, ia->threads);
  infer->add_option("--seed", ia->opt.seed, "seed for weights and prompt")->capture_default_str();
  add_device_option(infer, ia->opt.device);
  infer->add_option("--streams", ia->streams,
                    "batched decoding: sequences decoding together, a list (e.g. 1,4,16); aggregate tokens/s")
      ->delimiter(',')
      ->check(interval("[1, 4096]"));
  add_dtype_options(infer, ia->opt.dtype, ia->opt.kv_dtype);
  infer->add_flag("--json", ia->json, "print one JSON line");
  infer->callback([&run, ia] { run = [ia] { return bench_infer(*ia); }; });

  auto* paper = bench->add_subcommand("paper", "The paper's efficiency tables: LLaMA vs SUBLLM training and inference");
  auto pa = std::make_shared<PaperBenchOptions>();
  auto threads = std::make_shared<int>(0);
  auto json = std::make_shared<bool>(false);
  paper->add_option("--subllm", pa->subllm_config, "SUBLLM config")->capture_default_str()->check(CLI::ExistingFile);
  paper->add_option("--llama", pa->llama_config, "LLaMA config")->capture_default_str()->check(CLI::ExistingFile);
  paper->add_option("--lengths", pa->lengths, "context lengths")
      ->capture_default_str()
      ->delimiter(',')
      ->check(interval("[1, inf)"));
  paper->add_option("--tokens-per-step", pa->tokens_per_step, "training tokens per step (batch = this / length)")
      ->capture_default_str()->check(interval("[1, inf)"));
  paper->add_option("--train-steps", pa->train_steps, "timed training steps per model and length")
      ->capture_default_str()->check(interval("[1, inf)"));
  paper->add_option("--gen", pa->gen, "decoded tokens per model and length")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  add_device_option(paper, pa->device);
  add_threads_option(paper, *threads);
  paper->add_flag("--json", *json, "print one JSON object instead of Markdown");
  paper->callback([&run, pa, threads, json] {
    run = [pa, threads, json] {
      set_num_threads(*threads);
      nlohmann::json r = bench_paper(*pa);
      std::printf("%s\n", *json ? r.dump().c_str() : paper_markdown(r).c_str());
      return 0;
    };
  });
}

}  // namespace subllm::cli
