#pragma once
// Measurements behind `subllm bench`: training and inference throughput of a config on
// random data, the machine's yardsticks (sgemm rate, read bandwidth), and the paper's
// LLaMA-vs-SUBLLM efficiency tables.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "subllm/model.h"

namespace subllm {

double peak_rss_mb();
// The device's GEMM rate in its compute dtype, best of 3: 2048^3 fp32 on the CPU's current
// thread count, 8192^3 bf16 (cuBLASLt) on a GPU.
double measure_sgemm_gflops(const std::string& device = "cpu");
double measure_read_bandwidth(const std::string& device = "cpu");  // GB/s streaming over 512 MB (GPU: 2 GB)

struct TrainBenchOptions {
  int seq = 1024, batch = 4, steps = 3, warmup = 1;
  uint64_t seed = 1;
  std::string optimizer = "adamw";
  std::string device = "cpu";
  bool progress = true;  // a line per timed step on stderr
};
// Forward + backward + optimizer step of `config_path` on random tokens: tokens_per_s, step_s,
// flops_per_token, gflops, mfu (against `sgemm`), activation_mb, peak_rss_mb, ...
nlohmann::json measure_training(const std::string& config_path, const TrainBenchOptions& a, double sgemm);

struct InferBenchOptions {
  int prompt_len = 256, gen = 64;
  uint64_t seed = 1;
  std::string model_dir;  // a trained model folder instead of random weights
  std::string device = "cpu";
  std::string dtype, kv_dtype;  // inference weight and cache types (empty: the defaults)
};
// Prefill of a random prompt, first token, `gen` greedy decode steps: first_token_ms,
// prefill_tokens_per_s, decode_tokens_per_s against the read-bandwidth limit (probed around
// the decode), retention, kv_cache_bytes, ...
nlohmann::json measure_inference(const std::string& config_or_dir, const InferBenchOptions& a, double sgemm);
// measure_inference of two models in one run, side by side: built and prefilled in turn, then
// their decodes alternate in stretches with bandwidth probes between, so that the machine's
// drifting speed reaches both alike and their ratio holds on a shared machine. Holds both
// models at once. The model's measurement, with the baseline's under "baseline" and the ratios
// (first_token_speedup, decode_speedup, kv_cache_ratio and their ideals from FLOPs and bytes).
nlohmann::json measure_inference_pair(const std::string& config_or_dir, const InferBenchOptions& a,
                                      const std::string& baseline, const InferBenchOptions& base_opt, double sgemm);

// Batched decoding of `streams` sequences together (Session::forward_cached_batch), each with
// its own random prompt: prefill_tokens_per_s, decode_tokens_per_s (all sequences' tokens),
// decode_step_ms, retention, ...
nlohmann::json measure_streams(const std::string& config_path, const InferBenchOptions& a, int streams);
// measure_streams of two models side by side, their decodes alternating as in
// measure_inference_pair: the model's measurement with the baseline's under "baseline" and
// decode_speedup.
nlohmann::json measure_streams_pair(const std::string& config_path, const InferBenchOptions& a,
                                    const std::string& baseline, const InferBenchOptions& base_opt, int streams);

// Per subsampler, in order, the threshold that keeps its configured fraction of `prompt`.
std::vector<float> calibrate_thresholds(Model& m, const std::vector<int32_t>& prompt);

struct PaperBenchOptions {
  std::string subllm_config = "configs/subllm-d512-l24.json";
  std::string llama_config = "configs/llama-d512-l24.json";
  std::vector<int> lengths = {512, 1024, 2048};
  int tokens_per_step = 4096;  // training batch = tokens_per_step / length sequences
  int train_steps = 2, gen = 32;
  uint64_t seed = 1;
  std::string device = "cpu";
};
// Both models at every length: training and inference, measured back to back.
nlohmann::json bench_paper(const PaperBenchOptions& o);
// The paper's layout: one training table and one inference table, with the paper's figures.
std::string paper_markdown(const nlohmann::json& result);

}  // namespace subllm
