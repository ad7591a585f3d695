// Measurements shared by `subllm bench train`, `bench infer` and `bench paper`.
#include "subllm/bench.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "kernels/memory_kernels.h"
#include "kernels/select_kernels.h"
#include "subllm/config.h"
#include "subllm/error.h"
#include "subllm/generate.h"
#include "subllm/model.h"
#include "subllm/optim.h"
#include "subllm/rng.h"
#include "subllm/threads.h"

namespace subllm {

using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}

// The device's matrix-multiply rate in its compute dtype (fp32 sgemm on this CPU thread
// count, cuBLASLt bf16 on a GPU), the yardstick for MFU.
double measure_sgemm_gflops(const std::string& device) {
  Backend& be = backend_for(device);
  const bool host = &be == &cpu_backend();
  const int n = host ? 2048 : 8192, reps = host ? 1 : 10;
  const DType dt = be.compute_dtype();
  Tensor a = be.empty({n, n}, dt), b = be.empty({n, n}, dt), c = be.empty({n, n}, dt);
  be.zero(a.raw(), a.nbytes());
  be.zero(b.raw(), b.nbytes());
  be.linear_forward(view_of(a), view_of(b), view_of(c));
  be.sync();
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    auto t0 = Clock::now();
    for (int i = 0; i < reps; ++i) be.linear_forward(view_of(a), view_of(b), view_of(c));
    be.sync();
    best = std::max(best, 2.0 * n * n * n * reps / seconds_since(t0) / 1e9);
  }
  return best;
}

// Trains one config on random tokens; returns the measurement as JSON.
nlohmann::json measure_training(const std::string& config_path, const TrainBenchOptions& a, double sgemm) {
  ModelConfig cfg = load_config(config_path);
  if (cfg.context < a.seq) cfg.context = a.seq;
  backend_for(a.device).reset_device_peak();
  Model model(cfg, a.device);
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
    model.backend().sync();  // the step ends when the device is done
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
    if (a.progress) std::fprintf(stderr, "%s step %d/%d  loss %.4f  %.3f s\n", cfg.layout().c_str(), i + 1, a.steps, loss, dt);
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
          {"device", a.device},
          {"compute_dtype", dtype_name(model.weights().compute_dtype())},
          {"activation_mb", model.activation_bytes(a.batch, a.seq) / 1048576.0},
          {"peak_rss_mb", peak_rss_mb()},
          {"peak_device_mb", model.backend().device_peak_bytes() / 1048576.0},
          {"final_loss", loss}};
}

// Streaming read bandwidth (GB/s) over a buffer far larger than the caches: the yardstick
// for decoding, which reads every weight once per token. On a GPU: a sum of squares over
// 2 GB of device memory.
double measure_read_bandwidth(const std::string& device) {
  Backend& be = backend_for(device);
  if (&be != &cpu_backend()) {
    const int64_t n = (int64_t)1 << 29;
    Tensor buf = be.zeros({n}), out = be.empty({1}, DType::F64);
    be.sum_squares(view_of(buf), view_of(out));
    be.sync();
    double best = 0;
    for (int r = 0; r < 3; ++r) {
      auto t0 = Clock::now();
      for (int i = 0; i < 5; ++i) be.sum_squares(view_of(buf), view_of(out));
      be.sync();
      best = std::max(best, 5.0 * n * sizeof(float) / seconds_since(t0) / 1e9);
    }
    return best;
  }
  // Allocated as the weights are (the CPU backend's placement decides how fast a stream reads).
  const size_t n = (size_t)1 << 27;  // 512 MB
  Tensor buf = be.empty({(int64_t)n});
  std::fill(buf.f32(), buf.f32() + n, 1.0f);
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    auto t0 = Clock::now();
    const double total = kernels::read_sum(buf.f32(), n);
    const double dt = seconds_since(t0);
    if (total != (double)n) std::fprintf(stderr, "bandwidth check sum mismatch\n");
    best = std::max(best, n * sizeof(float) / dt / 1e9);
  }
  return best;
}

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

// Bytes of weights a decoded token reads when segment s sees the fraction frac[s] of the
// tokens (subsampler j feeds segment j + 1): each block's tensors as kernels read them (typed
// matrices at their size), the subsamplers' score weights and bypass scales, the final norm and
// the output head; the embedding only gives one row.
double decode_weight_bytes(const Model& m, const std::vector<double>& retention) {
  const Weights& w = m.weights();
  const auto& st = m.structure();
  std::vector<double> frac(st.segments.size(), 1.0);
  double bytes = w.read_bytes(w.final_norm_span()) +
                 (m.config().tie_weights ? w.read_bytes(w.embed_span()) : w.read_bytes(w.head_span()));
  for (size_t s = 0; s < st.segments.size(); ++s) {
    if (s > 0) {
      const int j = st.segments[s].subsampler;
      const double r = (size_t)j < retention.size() ? retention[(size_t)j] : st.segments[s].retention;
      frac[s] = frac[st.segments[s].parent] * r;
    }
    for (const auto& it : st.segments[s].items) {
      if (it.is_block) {
        bytes += frac[s] * w.read_bytes(w.block_span(it.index));
      } else {
        const int j = st.segments[it.index].subsampler;
        bytes += frac[s] * (w.read_bytes(w.score_span(j)) + w.read_bytes(w.bypass_span(j)));
      }
    }
  }
  return bytes;
}

nlohmann::json measure_inference(const std::string& config_path, const InferBenchOptions& a, double sgemm) {
  std::unique_ptr<Model> model;
  const std::string& source = config_path;
  if (!a.model_dir.empty() && config_path == a.model_dir) {
    LoadedModel lm = load_model_dir(a.model_dir, a.device, a.dtype, a.kv_dtype);
    model = std::move(lm.model);
  } else {
    ModelConfig cfg = load_config(config_path);
    if (cfg.context < a.prompt_len + a.gen) cfg.context = a.prompt_len + a.gen;
    model = std::make_unique<Model>(cfg, a.device);
    if (!a.dtype.empty()) model->weights().set_weight_dtype(inference_dtype(a.dtype));
    if (!a.kv_dtype.empty()) model->set_kv_dtype(inference_dtype(a.kv_dtype, "--kv-dtype"));
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
  // One untimed pass sizes and page-faults the workspace and spins up the threads; then the
  // fastest of three prefills counts, as latency on a shared machine is noisy.
  {
    SequenceCache warm = m.new_cache();
    m.forward_cached(warm, prompt.data(), a.prompt_len, logits.data(), false);
  }
  SequenceCache cache;
  double prefill_s = 1e30, first_token_s = 1e30;
  int32_t tok = 0;
  for (int rep = 0; rep < 3; ++rep) {
    cache = m.new_cache(a.prompt_len + a.gen);
    auto t0 = Clock::now();
    m.forward_cached(cache, prompt.data(), a.prompt_len, logits.data(), false);
    prefill_s = std::min(prefill_s, seconds_since(t0));
    tok = kernels::argmax(logits.data(), V);
    first_token_s = std::min(first_token_s, seconds_since(t0));
  }
  const size_t kv_after_prefill = cache.bytes();
  // A shared machine's memory bandwidth drifts by tens of percent within seconds, so the decode
  // runs in up to 4 timed stretches with a bandwidth probe before and after each; a stretch's
  // bandwidth is the higher of its two probes, and the decode's is the median of those.
  const int stretches = std::max(1, std::min(4, a.gen / 8));
  std::vector<double> probes = {measure_read_bandwidth(a.device)}, stretch_bw;
  double decode_s = 0;
  for (int st = 0, done = 0; st < stretches; ++st) {
    const int count = a.gen * (st + 1) / stretches - done;
    auto t1 = Clock::now();
    for (int i = 0; i < count; ++i) {
      m.forward_cached(cache, &tok, 1, logits.data(), false);
      tok = kernels::argmax(logits.data(), V);
    }
    decode_s += seconds_since(t1);
    done += count;
    probes.push_back(measure_read_bandwidth(a.device));
    stretch_bw.push_back(std::max(probes[probes.size() - 2], probes.back()));
  }
  std::sort(stretch_bw.begin(), stretch_bw.end());
  const size_t mid = stretch_bw.size() / 2;
  const double bw = stretch_bw.size() % 2 ? stretch_bw[mid] : 0.5 * (stretch_bw[mid - 1] + stretch_bw[mid]);
  std::vector<double> retention;
  for (size_t j = 0; j < cache.seen.size(); ++j) retention.push_back(cache.seen[j] ? (double)cache.kept[j] / cache.seen[j] : 0);
  // What one decoded token reads: the weights (each segment's blocks at its measured retention)
  // and, on average over the decode, the key/value cache.
  const double weight_bytes = decode_weight_bytes(m, retention);
  const double kv_read = 0.5 * (double)(kv_after_prefill + cache.bytes());
  const double bytes_per_token = weight_bytes + kv_read;
  const size_t kv_llama = 2 * cache.element_bytes * (size_t)m.config().n_layers * cache.length * m.config().kv_dim();
  const char* wtype = m.weights().weight_dtype() == DType::Q8 ? "q8" : m.weights().weight_dtype() == DType::BF16 ? "bf16"
                      : m.weights().compute_dtype() == DType::BF16 ? "bf16" : "f32";
  const double pf = forward_flops(m, a.prompt_len);
  return {{"impl", "subllm"},
          {"config", source},
          {"structure", m.config().layout()},
          {"device", a.device},
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
          {"read_bandwidth_probes_gbs", probes},
          {"dtype", wtype},
          {"kv_dtype", cache.element_bytes == 2 ? "bf16" : "f32"},
          {"weight_bytes", weight_bytes},
          {"kv_read_bytes", kv_read},
          {"decode_bytes_per_token", bytes_per_token},
          {"decode_limit_tokens_per_s", bw * 1e9 / bytes_per_token},
          {"decode_fraction_of_limit", a.gen / decode_s / (bw * 1e9 / bytes_per_token)},
          {"retention", retention},
          {"thresholds", thresholds},
          {"kv_cache_bytes", cache.bytes()},
          {"kv_cache_bytes_llama", kv_llama},
          {"peak_rss_mb", peak_rss_mb()}};
}

// Batched decoding: `streams` sequences, each with its own random prompt of prompt_len
// tokens, prefilled together in one batched step, then 1 + `gen` batched steps that decode
// one greedy token for every sequence (the first untimed). decode_tokens_per_s counts all sequences' tokens.
nlohmann::json measure_streams(const std::string& config_path, const InferBenchOptions& a, int streams) {
  check(streams > 0, "--streams must list positive counts, e.g. 1,4,16");
  ModelConfig cfg = load_config(config_path);
  if (cfg.context < a.prompt_len + a.gen) cfg.context = a.prompt_len + a.gen;
  Model m(cfg, a.device);
  m.init_weights(a.seed);
  check(a.prompt_len + a.gen <= m.config().context, "--prompt-len + --gen exceed the model's context");
  const int V = m.config().vocab_size;
  Rng rng(a.seed);
  std::vector<std::vector<int32_t>> prompts(streams, std::vector<int32_t>(a.prompt_len));
  for (auto& p : prompts)
    for (auto& t : p) t = (int32_t)(1 + rng.below(V - 1));
  std::vector<float> thresholds;
  if (!m.structure().is_plain()) thresholds = calibrate_thresholds(m, prompts[0]);
  Session& session = m.session();
  std::vector<SequenceCache> caches;
  std::vector<Session::CachedStep> steps(streams);
  std::vector<int32_t> next(streams);
  std::vector<float> logits((size_t)streams * V);
  auto greedy = [&] {
    for (int i = 0; i < streams; ++i) {
      const float* row = logits.data() + (size_t)i * V;
      next[i] = kernels::argmax(row, V);
    }
  };
  auto prefill = [&] {
    caches.clear();
    for (int i = 0; i < streams; ++i) caches.push_back(m.new_cache(a.prompt_len + a.gen));
    for (int i = 0; i < streams; ++i) steps[i] = {&caches[i], prompts[i].data(), a.prompt_len, false, nullptr, nullptr};
    session.forward_cached_batch(steps, logits.data());
    greedy();
  };
  // The prefill (one batched step of every prompt) is timed once, workspace growth included;
  // one untimed decode step then sizes the decode workspaces before the timed ones.
  auto t0 = Clock::now();
  prefill();
  const double prefill_s = seconds_since(t0);
  for (int i = 0; i < streams; ++i) steps[i] = {&caches[i], &next[i], 1, false, nullptr, nullptr};
  session.forward_cached_batch(steps, logits.data());
  greedy();
  auto t1 = Clock::now();
  for (int g = 0; g < a.gen; ++g) {
    session.forward_cached_batch(steps, logits.data());
    greedy();
  }
  const double decode_s = seconds_since(t1);
  std::vector<double> retention;
  for (size_t j = 0; j < caches[0].seen.size(); ++j) {
    int64_t seen = 0, kept = 0;
    for (const auto& c : caches) seen += c.seen[j], kept += c.kept[j];
    retention.push_back(seen ? (double)kept / seen : 0);
  }
  return {{"config", config_path},
          {"structure", m.config().layout()},
          {"device", a.device},
          {"threads", num_threads()},
          {"streams", streams},
          {"prompt_len", a.prompt_len},
          {"gen", a.gen},
          {"prefill_tokens_per_s", (double)streams * a.prompt_len / prefill_s},
          {"decode_tokens_per_s", (double)streams * a.gen / decode_s},
          {"decode_step_ms", 1e3 * decode_s / a.gen},
          {"retention", retention},
          {"thresholds", thresholds}};
}

// Bytes a training step holds beyond activations: weights, gradients and two Adam moments.
double training_state_mb(const std::string& config_path) {
  Model m(load_config(config_path));
  return 4.0 * 4.0 * m.num_params() / 1048576.0;
}

nlohmann::json bench_paper(const PaperBenchOptions& o) {
  const double sgemm = measure_sgemm_gflops(o.device), bw = measure_read_bandwidth(o.device);
  nlohmann::json rows = nlohmann::json::array();
  for (int T : o.lengths) {
    check(T > 0 && o.tokens_per_step >= T, "lengths must be positive and at most --tokens-per-step");
    TrainBenchOptions t;
    t.seq = T;
    t.batch = o.tokens_per_step / T;
    t.steps = o.train_steps;
    t.seed = o.seed;
    t.progress = false;
    t.device = o.device;
    InferBenchOptions in;
    in.prompt_len = T;
    in.gen = o.gen;
    in.seed = o.seed;
    in.device = o.device;
    nlohmann::json row = {{"length", T}};
    for (const auto& [name, cfg] : {std::pair{"llama", o.llama_config}, std::pair{"subllm", o.subllm_config}}) {
      std::fprintf(stderr, "bench paper: %s at %d tokens\n", name, T);
      nlohmann::json tr = measure_training(cfg, t, sgemm);
      tr["memory_mb"] = tr["activation_mb"].get<double>() + training_state_mb(cfg);
      row[std::string(name) + "_train"] = tr;
      row[std::string(name) + "_infer"] = measure_inference(cfg, in, sgemm);
    }
    auto ratio = [&](const char* a, const char* b, const char* key) {
      return row[a][key].get<double>() / row[b][key].get<double>();
    };
    row["train_speedup"] = ratio("subllm_train", "llama_train", "tokens_per_s");
    row["train_ideal_speedup"] = ratio("llama_train", "subllm_train", "flops_per_token");
    row["train_memory_ratio"] = ratio("subllm_train", "llama_train", "memory_mb");
    row["first_token_speedup"] = ratio("llama_infer", "subllm_infer", "first_token_ms");
    row["decode_speedup"] = ratio("subllm_infer", "llama_infer", "decode_tokens_per_s");
    row["kv_cache_ratio"] = ratio("subllm_infer", "llama_infer", "kv_cache_bytes");
    rows.push_back(row);
  }
  return {{"sgemm_gflops", sgemm}, {"read_bandwidth_gbs", bw}, {"threads", num_threads()},
          {"llama_config", o.llama_config}, {"subllm_config", o.subllm_config}, {"rows", rows}};
}

std::string paper_markdown(const nlohmann::json& r) {
  std::string out;
  char line[512];
  auto add = [&](const char* fmt, auto... args) {
    std::snprintf(line, sizeof line, fmt, args...);
    out += line;
  };
  add("LLaMA `%s` against SUBLLM `%s`, %d threads, sgemm %.0f GFLOP/s, read bandwidth %.1f GB/s.\n\n",
      r["llama_config"].get<std::string>().c_str(), r["subllm_config"].get<std::string>().c_str(),
      r["threads"].get<int>(), r["sgemm_gflops"].get<double>(), r["read_bandwidth_gbs"].get<double>());
  out += "Training (tokens per second; memory = weights, gradients, Adam moments and activations)\n\n";
  out += "| length | LLaMA tok/s | SUBLLM tok/s | speed-up | ideal | LLaMA memory | SUBLLM memory | memory ratio |\n";
  out += "|---|---|---|---|---|---|---|---|\n";
  for (const auto& row : r["rows"])
    add("| %d | %.1f | %.1f | x%.2f | x%.2f | %.0f MB | %.0f MB | x%.2f |\n", row["length"].get<int>(),
        row["llama_train"]["tokens_per_s"].get<double>(), row["subllm_train"]["tokens_per_s"].get<double>(),
        row["train_speedup"].get<double>(), row["train_ideal_speedup"].get<double>(),
        row["llama_train"]["memory_mb"].get<double>(), row["subllm_train"]["memory_mb"].get<double>(),
        row["train_memory_ratio"].get<double>());
  out += "\nPaper (1.3B, GPUs): x1.24 / x1.26 / x1.29 at 2k / 4k / 8k; memory 65.99 -> 55.81 GB at 4k.\n\n";
  out += "Inference (batch 1; prompt = length; greedy decode after it)\n\n";
  out += "| length | first token LLaMA | first token SUBLLM | speed-up | decode LLaMA | decode SUBLLM | speed-up | "
         "retention | KV LLaMA | KV SUBLLM |\n";
  out += "|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& row : r["rows"]) {
    std::string ret;
    for (const auto& x : row["subllm_infer"]["retention"]) {
      if (!ret.empty()) ret += " / ";
      char b[16];
      std::snprintf(b, sizeof b, "%.2f", x.get<double>());
      ret += b;
    }
    add("| %d | %.1f ms | %.1f ms | x%.2f | %.1f tok/s | %.1f tok/s | x%.2f | %s | %.1f MB | %.1f MB |\n",
        row["length"].get<int>(), row["llama_infer"]["first_token_ms"].get<double>(),
        row["subllm_infer"]["first_token_ms"].get<double>(), row["first_token_speedup"].get<double>(),
        row["llama_infer"]["decode_tokens_per_s"].get<double>(),
        row["subllm_infer"]["decode_tokens_per_s"].get<double>(), row["decode_speedup"].get<double>(), ret.c_str(),
        row["llama_infer"]["kv_cache_bytes"].get<double>() / 1048576.0,
        row["subllm_infer"]["kv_cache_bytes"].get<double>() / 1048576.0);
  }
  out += "\nPaper (1.3B): first token x1.40 / x1.45 / x1.67 and decode x1.28 / x1.37 / x1.52 at 2k / 4k / 8k; "
         "retention 43-44% overall.\n";
  return out;
}

}  // namespace subllm
