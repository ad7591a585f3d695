// Measurements shared by `subllm bench train`, `bench infer` and `bench paper`.
#include "subllm/bench.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <limits>
#include <memory>
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

namespace {

// Streaming read bandwidth (GB/s) over a buffer far larger than the caches: the yardstick
// for decoding, which reads every weight once per token. The buffer is made once and read at
// each measure(), the best of three reads counting. On a GPU: a sum of squares over 2 GB of
// device memory.
class BandwidthProbe {
 public:
  explicit BandwidthProbe(const std::string& device) : be_(backend_for(device)) {
    if (host()) {
      // Allocated as the weights are (the CPU backend's placement decides how fast a stream reads).
      buf_ = be_.empty({(int64_t)1 << 27});  // 512 MB
      std::fill(buf_.f32(), buf_.f32() + buf_.numel(), 1.0f);
    } else {
      buf_ = be_.zeros({(int64_t)1 << 29});
      out_ = be_.empty({1}, DType::F64);
      be_.sum_squares(view_of(buf_), view_of(out_));
      be_.sync();
    }
  }
  double measure() {
    const double bytes = (double)buf_.nbytes();
    double best = 0;
    for (int r = 0; r < 3; ++r) {
      auto t0 = Clock::now();
      if (host()) {
        const double total = kernels::read_sum(buf_.f32(), (size_t)buf_.numel());
        if (total != (double)buf_.numel()) std::fprintf(stderr, "bandwidth check sum mismatch\n");
        best = std::max(best, bytes / seconds_since(t0) / 1e9);
      } else {
        for (int i = 0; i < 5; ++i) be_.sum_squares(view_of(buf_), view_of(out_));
        be_.sync();
        best = std::max(best, 5 * bytes / seconds_since(t0) / 1e9);
      }
    }
    return best;
  }

 private:
  bool host() const { return &be_ == &cpu_backend(); }
  Backend& be_;
  Tensor buf_, out_;
};

}  // namespace

double measure_read_bandwidth(const std::string& device) { return BandwidthProbe(device).measure(); }

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

namespace {

// The type a model's matrices are read in: "f32", "bf16" or "q8".
const char* weight_type(const Model& m) {
  const DType w = m.weights().weight_dtype();
  if (w == DType::Q8) return "q8";
  return w == DType::BF16 || m.weights().compute_dtype() == DType::BF16 ? "bf16" : "f32";
}

// A model of `config_path` with random weights (seed a.seed) in the types a asks for, its
// context at least the prompt and the decode.
std::unique_ptr<Model> random_model(const std::string& config_path, const InferBenchOptions& a) {
  ModelConfig cfg = load_config(config_path);
  if (cfg.context < a.prompt_len + a.gen) cfg.context = a.prompt_len + a.gen;
  auto m = std::make_unique<Model>(cfg, a.device);
  if (!a.dtype.empty()) m->weights().set_weight_dtype(inference_dtype(a.dtype));
  if (!a.kv_dtype.empty()) m->set_kv_dtype(inference_dtype(a.kv_dtype, "--kv-dtype"));
  m->init_weights(a.seed);
  return m;
}

// One model under `bench infer`: built (random weights from a config, or a model folder), its
// random prompt prefilled into a fresh cache at each prefill() (the fastest counts), then
// decoded greedily from the last prefill's cache in timed stretches.
class InferRun {
 public:
  InferRun(const std::string& config_or_dir, const InferBenchOptions& a) : a_(a), source_(config_or_dir) {
    if (!a.model_dir.empty() && config_or_dir == a.model_dir) {
      LoadedModel lm = load_model_dir(a.model_dir, a.device, a.dtype, a.kv_dtype);
      model_ = std::move(lm.model);
    } else {
      model_ = random_model(config_or_dir, a);
    }
    Model& m = *model_;
    check(a.prompt_len + a.gen <= m.config().context, "--prompt-len + --gen exceed the model's context");
    Rng rng(a.seed);
    prompt_.resize(a.prompt_len);
    for (auto& t : prompt_) t = (int32_t)(1 + rng.below(m.config().vocab_size - 1));
    if (a.model_dir.empty() && !m.structure().is_plain()) thresholds_ = calibrate_thresholds(m, prompt_);
    logits_.resize(m.config().vocab_size);
    // One untimed pass sizes and page-faults the workspace and spins up the threads.
    SequenceCache warm = m.new_cache();
    m.forward_cached(warm, prompt_.data(), a.prompt_len, logits_.data(), false);
  }

  void prefill() {
    Model& m = *model_;
    cache_ = m.new_cache(a_.prompt_len + a_.gen);
    auto t0 = Clock::now();
    m.forward_cached(cache_, prompt_.data(), a_.prompt_len, logits_.data(), false);
    prefill_s_ = std::min(prefill_s_, seconds_since(t0));
    tok_ = kernels::argmax(logits_.data(), (int)logits_.size());
    first_token_s_ = std::min(first_token_s_, seconds_since(t0));
    kv_after_prefill_ = cache_.bytes();
  }

  // `count` more greedy tokens; their seconds (added to the decode's total).
  double decode(int count) {
    auto t0 = Clock::now();
    for (int i = 0; i < count; ++i) {
      model_->forward_cached(cache_, &tok_, 1, logits_.data(), false);
      tok_ = kernels::argmax(logits_.data(), (int)logits_.size());
    }
    const double s = seconds_since(t0);
    decode_s_ += s;
    decoded_ += count;
    return s;
  }

  // The measurement: the decode's read bandwidth `bw` (GB/s) sets its limit; `probes` are
  // every probe taken around it.
  nlohmann::json result(double sgemm, double bw, const std::vector<double>& probes) const {
    const Model& m = *model_;
    std::vector<double> retention;
    for (size_t j = 0; j < cache_.seen.size(); ++j)
      retention.push_back(cache_.seen[j] ? (double)cache_.kept[j] / cache_.seen[j] : 0);
    // What one decoded token reads: the weights (each segment's blocks at its measured retention)
    // and, on average over the decode, the key/value cache.
    const double weight_bytes = decode_weight_bytes(m, retention);
    const double kv_read = 0.5 * (double)(kv_after_prefill_ + cache_.bytes());
    const double bytes_per_token = weight_bytes + kv_read;
    const size_t kv_llama =
        2 * cache_.element_bytes * (size_t)m.config().n_layers * cache_.length * m.config().kv_dim();
    const double pf = forward_flops(m, a_.prompt_len);
    const double decode_rate = decoded_ / decode_s_;
    return {{"impl", "subllm"},
            {"config", source_},
            {"structure", m.config().layout()},
            {"device", a_.device},
            {"threads", num_threads()},
            {"prompt_len", a_.prompt_len},
            {"gen", a_.gen},
            {"first_token_ms", 1e3 * first_token_s_},
            {"prefill_tokens_per_s", a_.prompt_len / prefill_s_},
            {"prefill_gflops", pf / prefill_s_ / 1e9},
            {"prefill_flops", pf},
            {"sgemm_gflops", sgemm},
            {"prefill_fraction_of_sgemm", pf / prefill_s_ / 1e9 / sgemm},
            {"decode_tokens_per_s", decode_rate},
            {"read_bandwidth_gbs", bw},
            {"read_bandwidth_probes_gbs", probes},
            {"dtype", weight_type(m)},
            {"kv_dtype", cache_.element_bytes == 2 ? "bf16" : "f32"},
            {"weight_bytes", weight_bytes},
            {"kv_read_bytes", kv_read},
            {"decode_bytes_per_token", bytes_per_token},
            {"decode_limit_tokens_per_s", bw * 1e9 / bytes_per_token},
            {"decode_fraction_of_limit", decode_rate / (bw * 1e9 / bytes_per_token)},
            {"retention", retention},
            {"thresholds", thresholds_},
            {"kv_cache_bytes", cache_.bytes()},
            {"kv_cache_bytes_llama", kv_llama},
            {"peak_rss_mb", peak_rss_mb()}};
  }

 private:
  InferBenchOptions a_;
  std::string source_;
  std::unique_ptr<Model> model_;
  std::vector<int32_t> prompt_;
  std::vector<float> thresholds_, logits_;
  SequenceCache cache_;
  int32_t tok_ = 0;
  int decoded_ = 0;
  size_t kv_after_prefill_ = 0;
  double prefill_s_ = 1e30, first_token_s_ = 1e30, decode_s_ = 0;
};

// Decodes `gen` tokens on each of `runs` in `stretches` stretches, the runs taking turns and
// their order flipping every round, so that a drift of the machine's speed reaches each alike;
// after(i) follows each stretch of runs[i].
template <class Run, class After>
void decode_in_turns(const std::vector<Run*>& runs, int gen, int stretches, After after) {
  const int n = (int)runs.size();
  for (int st = 0; st < stretches; ++st) {
    const int count = gen * (st + 1) / stretches - gen * st / stretches;
    for (int k = 0; k < n; ++k) {
      const int i = st % 2 == 0 ? k : n - 1 - k;
      runs[i]->decode(count);
      after(i);
    }
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t mid = v.size() / 2;
  return v.size() % 2 ? v[mid] : 0.5 * (v[mid - 1] + v[mid]);
}

// The runs' decodes of `gen` tokens in turns (decode_in_turns), with a bandwidth probe before
// the first stretch and after each: a stretch's bandwidth is the higher of the probes around
// it, a run's the median of its stretches'. Each run's bandwidth; `probes` gets every probe.
std::vector<double> decode_probed(const std::vector<InferRun*>& runs, const std::string& device, int gen,
                                  int stretches, std::vector<double>& probes) {
  BandwidthProbe probe(device);
  probes = {probe.measure()};
  std::vector<std::vector<double>> bw(runs.size());
  decode_in_turns(runs, gen, stretches, [&](int i) {
    probes.push_back(probe.measure());
    bw[i].push_back(std::max(probes[probes.size() - 2], probes.back()));
  });
  std::vector<double> out;
  for (const auto& b : bw) out.push_back(median(b));
  return out;
}

}  // namespace

nlohmann::json measure_inference(const std::string& config_or_dir, const InferBenchOptions& a, double sgemm) {
  InferRun run(config_or_dir, a);
  for (int rep = 0; rep < 3; ++rep) run.prefill();  // the fastest of three: latency on a shared machine is noisy
  // A shared machine's memory bandwidth drifts by tens of percent within seconds, so the decode
  // runs in up to 4 timed stretches with a bandwidth probe before and after each.
  std::vector<double> probes;
  const std::vector<double> bw = decode_probed({&run}, a.device, a.gen, std::max(1, std::min(4, a.gen / 8)), probes);
  return run.result(sgemm, bw[0], probes);
}

nlohmann::json measure_inference_pair(const std::string& config_or_dir, const InferBenchOptions& a,
                                      const std::string& baseline, const InferBenchOptions& base_opt, double sgemm) {
  InferRun base(baseline, base_opt), run(config_or_dir, a);
  check(base_opt.gen == a.gen, "the baseline decodes as many tokens as the model");
  // Prefills alternate too, the fastest of three each.
  for (int rep = 0; rep < 3; ++rep) base.prefill(), run.prefill();
  // The two decodes take turns in up to 8 stretches each (baseline first in even rounds, the
  // model first in odd ones), a bandwidth probe between any two.
  std::vector<double> probes;
  const std::vector<double> bw =
      decode_probed({&base, &run}, a.device, a.gen, std::max(1, std::min(8, a.gen / 4)), probes);
  nlohmann::json b = base.result(sgemm, bw[0], probes), j = run.result(sgemm, bw[1], probes);
  j["baseline"] = b;
  j["first_token_speedup"] = b["first_token_ms"].get<double>() / j["first_token_ms"].get<double>();
  j["decode_speedup"] = j["decode_tokens_per_s"].get<double>() / b["decode_tokens_per_s"].get<double>();
  j["kv_cache_ratio"] = j["kv_cache_bytes"].get<double>() / b["kv_cache_bytes"].get<double>();
  j["ideal_first_token_speedup"] = b["prefill_flops"].get<double>() / j["prefill_flops"].get<double>();
  j["ideal_decode_speedup"] = b["decode_bytes_per_token"].get<double>() / j["decode_bytes_per_token"].get<double>();
  return j;
}

namespace {

// `streams` sequences under `bench infer --streams`, each with its own random prompt: built,
// prefilled together in one batched step (timed once, workspace growth included), one
// untimed decode step that sizes the decode workspaces, then batched greedy steps, each
// decoding one token of every sequence.
class StreamsRun {
 public:
  StreamsRun(const std::string& config_path, const InferBenchOptions& a, int streams)
      : a_(a), source_(config_path), streams_(streams) {
    check(streams > 0, "--streams must list positive counts, e.g. 1,4,16");
    model_ = random_model(config_path, a);
    Model& m = *model_;
    check(a.prompt_len + a.gen <= m.config().context, "--prompt-len + --gen exceed the model's context");
    V_ = m.config().vocab_size;
    Rng rng(a.seed);
    prompts_.assign(streams, std::vector<int32_t>(a.prompt_len));
    for (auto& p : prompts_)
      for (auto& t : p) t = (int32_t)(1 + rng.below(V_ - 1));
    if (!m.structure().is_plain()) thresholds_ = calibrate_thresholds(m, prompts_[0]);
    next_.resize(streams);
    logits_.resize((size_t)streams * V_);
    steps_.resize(streams);
    auto t0 = Clock::now();
    for (int i = 0; i < streams; ++i) caches_.push_back(m.new_cache(a.prompt_len + a.gen + 1));
    for (int i = 0; i < streams; ++i) steps_[i] = {&caches_[i], prompts_[i].data(), a.prompt_len, false, nullptr, nullptr};
    m.session().forward_cached_batch(steps_, logits_.data());
    greedy();
    prefill_s_ = seconds_since(t0);
    for (int i = 0; i < streams; ++i) steps_[i] = {&caches_[i], &next_[i], 1, false, nullptr, nullptr};
    step();
  }

  // `count` more batched steps (added to the decode's total).
  void decode(int count) {
    auto t0 = Clock::now();
    for (int g = 0; g < count; ++g) step();
    decode_s_ += seconds_since(t0);
    decoded_ += count;
  }

  nlohmann::json result() const {
    const Model& m = *model_;
    std::vector<double> retention;
    for (size_t j = 0; j < caches_[0].seen.size(); ++j) {
      int64_t seen = 0, kept = 0;
      for (const auto& c : caches_) seen += c.seen[j], kept += c.kept[j];
      retention.push_back(seen ? (double)kept / seen : 0);
    }
    return {{"config", source_},
            {"structure", m.config().layout()},
            {"device", a_.device},
            {"threads", num_threads()},
            {"dtype", weight_type(m)},
            {"kv_dtype", caches_[0].element_bytes == 2 ? "bf16" : "f32"},
            {"streams", streams_},
            {"prompt_len", a_.prompt_len},
            {"gen", a_.gen},
            {"prefill_tokens_per_s", (double)streams_ * a_.prompt_len / prefill_s_},
            {"decode_tokens_per_s", (double)streams_ * decoded_ / decode_s_},
            {"decode_step_ms", 1e3 * decode_s_ / decoded_},
            {"retention", retention},
            {"thresholds", thresholds_}};
  }

 private:
  void greedy() {
    for (int i = 0; i < streams_; ++i) next_[i] = kernels::argmax(logits_.data() + (size_t)i * V_, V_);
  }
  void step() {
    model_->session().forward_cached_batch(steps_, logits_.data());
    greedy();
  }

  InferBenchOptions a_;
  std::string source_;
  int streams_, V_ = 0, decoded_ = 0;
  std::unique_ptr<Model> model_;
  std::vector<std::vector<int32_t>> prompts_;
  std::vector<float> thresholds_, logits_;
  std::vector<SequenceCache> caches_;
  std::vector<Session::CachedStep> steps_;
  std::vector<int32_t> next_;
  double prefill_s_ = 0, decode_s_ = 0;
};

}  // namespace

nlohmann::json measure_streams(const std::string& config_path, const InferBenchOptions& a, int streams) {
  StreamsRun run(config_path, a, streams);
  run.decode(a.gen);
  return run.result();
}

nlohmann::json measure_streams_pair(const std::string& config_path, const InferBenchOptions& a,
                                    const std::string& baseline, const InferBenchOptions& base_opt, int streams) {
  check(base_opt.gen == a.gen, "the baseline decodes as many tokens as the model");
  StreamsRun base(baseline, base_opt, streams), run(config_path, a, streams);
  // As measure_inference_pair: the decodes take turns in up to 8 stretches each.
  decode_in_turns<StreamsRun>({&base, &run}, a.gen, std::max(1, std::min(8, a.gen / 4)), [](int) {});
  nlohmann::json j = run.result();
  j["baseline"] = base.result();
  j["decode_speedup"] = j["decode_tokens_per_s"].get<double>() / j["baseline"]["decode_tokens_per_s"].get<double>();
  return j;
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
      std::fprintf(stderr, "bench paper: training %s at %d tokens\n", name, T);
      nlohmann::json tr = measure_training(cfg, t, sgemm);
      tr["memory_mb"] = tr["activation_mb"].get<double>() + training_state_mb(cfg);
      row[std::string(name) + "_train"] = tr;
    }
    std::fprintf(stderr, "bench paper: inference of both at %d tokens\n", T);
    nlohmann::json infer = measure_inference_pair(o.subllm_config, in, o.llama_config, in, sgemm);
    row["llama_infer"] = infer["baseline"];
    infer.erase("baseline");
    row["subllm_infer"] = infer;
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
