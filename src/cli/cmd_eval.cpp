// `subllm eval ppl` and `subllm eval fewshot`: perplexity on held-out text and few-shot
// classification with the SUBLLM authors' protocol.
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "subllm/error.h"
#include "subllm/eval.h"
#include "subllm/generate.h"
#include "subllm/suites.h"
#include "subllm/threads.h"

namespace subllm::cli {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// A progress bar redrawn in place when stderr is a terminal; otherwise a plain line about
// every 10% (at most one per 5 s), so logs of batch jobs stay short.
class ProgressLine {
 public:
  ProgressLine(std::string label, std::string unit)
      : label_(std::move(label)), unit_(std::move(unit)), tty_(isatty(fileno(stderr))), t0_(Clock::now()) {}
  ~ProgressLine() {
    if (tty_ && drawn_) std::fprintf(stderr, "\r\033[K");
  }
  void operator()(int64_t done, int64_t total) {
    const double s = std::chrono::duration<double>(Clock::now() - t0_).count();
    const double rate = s > 0 ? done / s : 0;
    const double eta = rate > 0 ? (total - done) / rate : 0;
    if (tty_) {
      if (done < total && s - last_ < 0.1) return;
      last_ = s;
      constexpr int kWidth = 28;
      const int fill = total > 0 ? (int)(kWidth * done / total) : kWidth;
      std::string bar(fill, '#');
      bar.resize(kWidth, '.');
      std::fprintf(stderr, "\r\033[K%s [%s] %3d%% %lld/%lld %s  %.1f %s/s  ETA %.0fs", label_.c_str(), bar.c_str(),
                   total > 0 ? (int)(100 * done / total) : 100, (long long)done, (long long)total, unit_.c_str(), rate,
                   unit_.c_str(), eta);
      drawn_ = true;
      return;
    }
    const int decile = total > 0 ? (int)(10 * done / total) : 10;
    if (decile <= decile_ || (done < total && s - last_ < 5.0)) return;
    decile_ = decile;
    last_ = s;
    std::fprintf(stderr, "%s: %lld/%lld %s (%.1f %s/s)\n", label_.c_str(), (long long)done, (long long)total,
                 unit_.c_str(), rate, unit_.c_str());
  }

 private:
  std::string label_, unit_;
  bool tty_;
  Clock::time_point t0_;
  double last_ = -1e9;
  int decile_ = 0;
  bool drawn_ = false;
};

const char* mode_name(Mode m) { return m == Mode::Train ? "train" : "inference"; }

// ---------------------------------------------------------------------------------------
// ppl

struct PplCli {
  std::string model_dir;
  std::string device = "cpu";
  std::string dtype, kv_dtype;
  std::vector<std::string> data;
  std::string split = "valid";
  int seq = 0, batch = 1;
  int64_t max_tokens = 0;
  std::string mode = "inference";
  std::vector<float> keep_thresholds{0.0f};
  bool speed = false;
  int speed_prompt = 256, speed_decode = 64;
  uint64_t seed = 0;
  int threads = 0;
  bool json_out = false;
};

// The weight and cache types a model evaluates with, as --dtype / --kv-dtype name them.
std::string type_name(DType d) { return d == DType::Q8 ? "q8" : d == DType::BF16 ? "bf16" : "f32"; }

std::string retention_text(const std::vector<double>& r) {
  std::string out;
  char buf[16];
  for (double v : r) {
    std::snprintf(buf, sizeof buf, "%.3f", v);
    if (!out.empty()) out += ' ';
    out += buf;
  }
  return out;
}

// --keep-threshold A,B,...: loss, retention and speed of a SUBLLM model at each threshold.
int run_ppl_sweep(const PplCli& c, LoadedModel& lm, const std::vector<int32_t>& tokens) {
  Model& m = *lm.model;
  const int prompt = std::min(c.speed_prompt, m.config().context - c.speed_decode);
  struct Row {
    float threshold;
    PplResult ppl;
    DecodeSpeed speed;
  };
  std::vector<Row> rows;
  for (float v : c.keep_thresholds) {
    m.knobs().keep_threshold = v;
    m.knobs().keep_thresholds.clear();
    PplOptions o;
    o.seq = c.seq;
    o.batch = c.batch;
    o.max_tokens = c.max_tokens;
    o.mode = Mode::Inference;
    char name[48];
    std::snprintf(name, sizeof name, "ppl at threshold %g", v);
    ProgressLine bar(name, "tok");
    o.progress = [&bar](int64_t d, int64_t t) { bar(d, t); };
    Row r{v, evaluate_ppl(m, tokens, o), {}};
    r.speed = measure_decode_speed(m, tokens, prompt, c.speed_decode);
    rows.push_back(std::move(r));
  }
  if (c.json_out) {
    json j = {{"model", lm.dir},          {"data", c.data},          {"split", c.split},
              {"seq", rows[0].ppl.seq},   {"batch", c.batch},        {"speed_prompt", prompt},
              {"speed_decode", c.speed_decode}, {"keep_thresholds", c.keep_thresholds},
              {"dtype", type_name(m.weights().weight_dtype())}, {"kv_dtype", type_name(m.session().kv_dtype())}};
    json arr = json::array();
    for (const Row& r : rows)
      arr.push_back({{"mode", "inference"},
                     {"keep_threshold", r.threshold},
                     {"loss", r.ppl.loss},
                     {"perplexity", r.ppl.perplexity},
                     {"tokens", r.ppl.tokens},
                     {"retention", r.ppl.retention},
                     {"tokens_per_s", r.ppl.tokens_per_s},
                     {"prefill_tokens_per_s", r.speed.prefill_tokens_per_s},
                     {"decode_tokens_per_s", r.speed.decode_tokens_per_s},
                     {"kv_cache_bytes", r.speed.kv_cache_bytes}});
    j["results"] = arr;
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%-12s %s\n", "model", lm.dir.c_str());
  std::printf("%-12s %lld predicted per threshold, windows of %d, batch %d\n", "tokens", (long long)rows[0].ppl.tokens,
              rows[0].ppl.seq, c.batch);
  std::printf("%-12s prefill %d tokens, then %d decoded one at a time (cached)\n", "speed", prompt, c.speed_decode);
  std::printf("%-10s %-9s %-11s %-13s %-13s %-10s %s\n", "threshold", "loss", "perplexity", "prefill tok/s",
              "decode tok/s", "KV MB", "retention");
  for (const Row& r : rows)
    std::printf("%-10g %-9.4f %-11.3f %-13.1f %-13.1f %-10.2f %s\n", r.threshold, r.ppl.loss, r.ppl.perplexity,
                r.speed.prefill_tokens_per_s, r.speed.decode_tokens_per_s, r.speed.kv_cache_bytes / 1e6,
                retention_text(r.ppl.retention).c_str());
  return 0;
}

int run_ppl(const PplCli& c) {
  set_num_threads(c.threads);
  const bool sweep = c.keep_thresholds.size() > 1;
  check(!sweep || c.mode == "inference",
        "--keep-threshold with several values sweeps inference mode's threshold: drop --mode " + c.mode);
  LoadedModel lm = load_model_dir(c.model_dir, c.device, c.dtype, c.kv_dtype);
  Model& m = *lm.model;
  check(!sweep || !m.structure().is_plain(),
        "--keep-threshold sweeps a SUBLLM model's subsamplers, and " + lm.dir +
            " has none (a LLaMA): give one value");
  check(c.speed_decode < m.config().context,
        "--speed-decode " + std::to_string(c.speed_decode) + " leaves no room for a prompt in the model's context of " +
            std::to_string(m.config().context) + " tokens");
  m.knobs().keep_threshold = c.keep_thresholds[0];
  std::vector<Mode> modes;
  if (c.mode == "inference" || c.mode == "both") modes.push_back(Mode::Inference);
  if (c.mode == "train" || c.mode == "both") modes.push_back(Mode::Train);
  const int64_t speed_tokens = c.speed || sweep ? std::min(c.speed_prompt, m.config().context - c.speed_decode) + c.speed_decode : 0;
  const std::vector<int32_t> tokens = load_eval_tokens(
      c.data, lm.tokenizer, c.split, c.max_tokens > 0 ? std::max(c.max_tokens + 1, speed_tokens) : 0);
  if (sweep) return run_ppl_sweep(c, lm, tokens);
  std::vector<PplResult> results;
  for (Mode mode : modes) {
    PplOptions o;
    o.seq = c.seq;
    o.batch = c.batch;
    o.max_tokens = c.max_tokens;
    o.mode = mode;
    o.seed = c.seed;
    ProgressLine bar(std::string("ppl ") + mode_name(mode), "tok");
    o.progress = [&bar](int64_t d, int64_t t) { bar(d, t); };
    results.push_back(evaluate_ppl(m, tokens, o));
  }
  DecodeSpeed speed;
  if (c.speed) speed = measure_decode_speed(m, tokens, (int)speed_tokens - c.speed_decode, c.speed_decode);
  const bool subllm = !m.structure().is_plain();
  if (c.json_out) {
    json j = {{"model", lm.dir}, {"data", c.data}, {"split", c.split}, {"seq", results[0].seq}, {"batch", c.batch},
              {"keep_threshold", c.keep_thresholds[0]}, {"dtype", type_name(m.weights().weight_dtype())}};
    if (c.speed)
      j["speed"] = {{"prompt", speed.prompt},
                    {"decoded", speed.decoded},
                    {"prefill_tokens_per_s", speed.prefill_tokens_per_s},
                    {"decode_tokens_per_s", speed.decode_tokens_per_s},
                    {"kv_cache_bytes", speed.kv_cache_bytes}};
    json arr = json::array();
    for (const auto& r : results) {
      json e = {{"mode", mode_name(r.mode)},   {"loss", r.loss},       {"perplexity", r.perplexity},
                {"tokens", r.tokens},          {"windows", r.windows}, {"seconds", r.seconds},
                {"tokens_per_s", r.tokens_per_s}};
      if (subllm) e["retention"] = r.retention;
      arr.push_back(e);
    }
    j["results"] = arr;
    if (results.size() == 2) j["train_minus_inference_loss"] = results[1].loss - results[0].loss;
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%-12s %s\n", "model", lm.dir.c_str());
  std::string data;
  bool folders = false;
  for (const auto& d : c.data) {
    data += (data.empty() ? "" : ", ") + d;
    folders = folders || std::filesystem::exists(std::filesystem::path(d) / "manifest.json");
  }
  std::printf("%-12s %s%s\n", "data", data.c_str(), folders ? (" (" + c.split + " split)").c_str() : "");
  std::printf("%-12s %lld predicted, windows of %d, batch %d\n", "tokens", (long long)results[0].tokens,
              results[0].seq, c.batch);
  std::printf("%-12s %-9s %-11s %-10s%s\n", "mode", "loss", "perplexity", "tokens/s", subllm ? "retention" : "");
  for (const auto& r : results) {
    std::printf("%-12s %-9.4f %-11.3f %-10.1f", mode_name(r.mode), r.loss, r.perplexity, r.tokens_per_s);
    for (size_t j = 0; j < r.retention.size(); ++j)
      std::printf("%s%.3f", j ? " " : "", r.retention[j]);
    std::printf("\n");
  }
  if (subllm) {
    std::printf("%-12s", "configured");
    for (int j = 0; j < m.structure().num_subsamplers; ++j)
      for (const auto& s : m.structure().segments)
        if (s.subsampler == j) std::printf(" %.3f", s.retention);
    std::printf("  (retention per subsampler: kept / seen)\n");
  }
  if (results.size() == 2)
    std::printf("%-12s %+.4f (train-mode loss minus inference-mode loss)\n", "gap", results[1].loss - results[0].loss);
  if (c.speed)
    std::printf("%-12s prefill %d tokens %.1f tokens/s, then %d decoded one at a time %.1f tokens/s, KV cache %.2f MB\n",
                "speed", speed.prompt, speed.prefill_tokens_per_s, speed.decoded, speed.decode_tokens_per_s,
                speed.kv_cache_bytes / 1e6);
  return 0;
}

// ---------------------------------------------------------------------------------------
// fewshot

struct FewshotCli {
  std::string model_dir, task, task_spec, train, test, scoring = "generate", predictions;
  std::string suite, data_dir;          // --suite mmlu|bbh|agieval reads the authors' folder layouts
  std::vector<std::string> subjects;
  int max_new_tokens = 0;               // suites: 0 is the authors' budget
  bool shots_given = false;             // suites default to their own shot counts
  std::string device = "cpu";
  std::string dtype, kv_dtype;
  int shots = 4;
  std::vector<uint32_t> seeds;
  int64_t max_test = 0;
  float keep_threshold = 0.0f;
  int threads = 0;
  bool json_out = false;
};

int run_suite(const FewshotCli& c);

int run_fewshot(const FewshotCli& c) {
  if (!c.suite.empty()) return run_suite(c);
  set_num_threads(c.threads);
  check(!c.task.empty() || !c.task_spec.empty(), "give --task NAME, --task-spec FILE.json or --suite NAME");
  check(!c.train.empty() && !c.test.empty(), "--task and --task-spec need --train FILE.jsonl and --test FILE.jsonl");
  const FewshotTask task = c.task_spec.empty() ? builtin_task(c.task) : load_task_spec(c.task_spec);
  validate_task(task);
  // Data errors surface before the model loads.
  const auto train = load_fewshot_jsonl(c.train, task);
  const auto test = load_fewshot_jsonl(c.test, task);
  // The predictions file is opened before the evaluation (a bad path fails at once) and written
  // beside its final name, renamed there only when complete.
  struct PendingFile {  // removed unless renamed into place
    std::string tmp;
    std::ofstream out;
    ~PendingFile() {
      std::error_code ec;
      if (!tmp.empty()) std::filesystem::remove(tmp, ec);
    }
  } predictions;
  if (!c.predictions.empty()) {
    predictions.tmp = c.predictions + ".tmp-" + std::to_string(::getpid());
    predictions.out.open(predictions.tmp, std::ios::trunc);
    if (!predictions.out.good()) {
      const std::string why = std::strerror(errno);
      predictions.tmp.clear();
      throw Error("cannot write --predictions " + c.predictions + ": " + why + " (give a path in a writable folder)");
    }
  }
  LoadedModel lm = load_model_dir(c.model_dir, c.device, c.dtype, c.kv_dtype);
  lm.model->knobs().keep_threshold = c.keep_threshold;
  FewshotOptions o;
  o.shots = c.shots;
  if (!c.seeds.empty()) o.seeds = c.seeds;
  o.scoring = c.scoring == "loglik" ? Scoring::Loglik : Scoring::Generate;
  o.max_test = c.max_test;
  ProgressLine bar("fewshot " + task.name, "items");
  o.progress = [&bar](int64_t d, int64_t t) { bar(d, t); };
  const FewshotResult r = evaluate_fewshot(*lm.model, lm.tokenizer, task, train, test, o);

  if (!c.predictions.empty()) {
    std::ofstream& out = predictions.out;
    for (const auto& s : r.seeds)
      for (size_t i = 0; i < s.items.size(); ++i) {
        const auto& it = s.items[i];
        // item: position in the sample; example: index among the test file's examples;
        // line: that example's line in the test file.
        json e = {{"seed", s.seed},          {"item", i},         {"example", it.example},
                  {"line", it.line},         {"label", it.label}, {"predicted", it.predicted},
                  {"demos_used", it.demos_used}};
        if (r.scoring == Scoring::Generate)
          e["generated"] = it.generated;
        else
          e["scores"] = it.scores;
        out << e.dump() << "\n";
      }
    out.close();
    check(!out.fail(), "writing --predictions " + c.predictions + " failed (disk full?); nothing was written there");
    std::error_code ec;
    std::filesystem::rename(predictions.tmp, c.predictions, ec);
    check(!ec, "cannot move the predictions to " + c.predictions + ": " + ec.message());
    predictions.tmp.clear();
  }
  const char* scoring = r.scoring == Scoring::Loglik ? "loglik" : "generate";
  if (c.json_out) {
    json seeds = json::array();
    for (const auto& s : r.seeds)
      seeds.push_back({{"seed", s.seed},
                       {"accuracy", s.accuracy},
                       {"correct", s.correct},
                       {"total", s.total},
                       {"prompts_shortened", s.shortened},
                       {"demonstrations_dropped", s.demos_dropped},
                       {"queries_truncated", s.truncated}});
    json j = {{"model", lm.dir},          {"task", r.task},         {"shots", r.shots},
              {"scoring", scoring},       {"test_items", r.test_items}, {"max_new_tokens", r.max_new_tokens},
              {"seeds", seeds},           {"mean", r.mean},         {"std", r.stddev},
              {"seconds", r.seconds}};
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%-12s %s\n", "model", lm.dir.c_str());
  std::printf("%-12s %s (%d shots, %s scoring", "task", r.task.c_str(), r.shots, scoring);
  if (r.scoring == Scoring::Generate) std::printf(", up to %d new tokens", r.max_new_tokens);
  std::printf(")\n%-12s %lld\n", "test items", (long long)r.test_items);
  for (const auto& s : r.seeds) {
    char name[32];
    std::snprintf(name, sizeof name, "seed %u", s.seed);
    std::printf("%-12s accuracy %6.2f%% (%lld/%lld)", name, s.accuracy, (long long)s.correct, (long long)s.total);
    if (s.shortened)
      std::printf("  %lld prompts shortened to fit the context (%lld demonstrations dropped)", (long long)s.shortened,
                  (long long)s.demos_dropped);
    if (s.truncated) std::printf("  %lld queries truncated", (long long)s.truncated);
    std::printf("\n");
  }
  std::printf("%-12s %.2f%% ± %.2f (sample std over %zu seed%s)\n", "mean", r.mean, r.stddev, r.seeds.size(),
              r.seeds.size() == 1 ? "" : "s");
  std::printf("%-12s %.1f\n", "seconds", r.seconds);
  return 0;
}

json answer_json(const SuiteAnswer& a) {
  if (a.none) return nullptr;
  if (a.is_list) return a.list;
  return a.text;
}

// MMLU, BBH or AGIEval from the authors' folder layouts: accuracy per subject and overall.
int run_suite(const FewshotCli& c) {
  set_num_threads(c.threads);
  check(!c.data_dir.empty(), "--suite " + c.suite + " needs --data-dir DIR, the suite's folder of the authors' "
                             "eval_data (see docs/EVAL.md)");
  const Suite suite = parse_suite(c.suite);
  SuiteLoadOptions lo;
  lo.shots = c.shots_given ? c.shots : -1;
  lo.subjects = c.subjects;
  // Data errors surface before the model loads.
  const SuiteData data = load_suite(suite, c.data_dir, lo);
  // Written beside its final name and renamed there only when complete.
  std::string tmp;
  std::ofstream out;
  struct Cleanup {
    std::string& tmp;
    ~Cleanup() {
      std::error_code ec;
      if (!tmp.empty()) std::filesystem::remove(tmp, ec);
    }
  } cleanup{tmp};
  if (!c.predictions.empty()) {
    tmp = c.predictions + ".tmp-" + std::to_string(::getpid());
    out.open(tmp, std::ios::trunc);
    if (!out.good()) {
      const std::string why = std::strerror(errno);
      tmp.clear();
      throw Error("cannot write --predictions " + c.predictions + ": " + why + " (give a path in a writable folder)");
    }
  }
  LoadedModel lm = load_model_dir(c.model_dir, c.device, c.dtype, c.kv_dtype);
  lm.model->knobs().keep_threshold = c.keep_threshold;
  SuiteOptions o;
  o.max_new_tokens = c.max_new_tokens;
  ProgressLine bar(std::string("fewshot ") + suite_name(suite), "items");
  o.progress = [&bar](int64_t d, int64_t t) { bar(d, t); };
  const SuiteResult r = evaluate_suite(*lm.model, lm.tokenizer, data, o);

  if (!c.predictions.empty()) {
    for (const auto& it : r.items) {
      const SuiteItem& item = data.items[it.item];
      out << json{{"item", it.item},
                  {"subject", item.subject},
                  {"source", item.where},
                  {"label", answer_json(item.label)},
                  {"extracted", answer_json(it.extracted)},
                  {"correct", it.correct},
                  {"generated", it.generated},
                  {"prompt_tokens", it.prompt_tokens},
                  {"truncated", it.truncated}}
                 .dump()
          << "\n";
    }
    out.close();
    check(!out.fail(), "writing --predictions " + c.predictions + " failed (disk full?); nothing was written there");
    std::error_code ec;
    std::filesystem::rename(tmp, c.predictions, ec);
    check(!ec, "cannot move the predictions to " + c.predictions + ": " + ec.message());
    tmp.clear();
  }
  const std::string setup = suite == Suite::Bbh       ? std::string("its cot-prompts")
                            : suite == Suite::Agieval ? r.setting
                                                      : std::to_string(r.shots) + " shots";
  if (c.json_out) {
    json subjects = json::array();
    for (const auto& s : r.subjects)
      subjects.push_back({{"subject", s.subject}, {"accuracy", s.accuracy}, {"correct", s.correct}, {"total", s.total}});
    json j = {{"model", lm.dir},          {"suite", suite_name(suite)},   {"shots", r.shots},
              {"max_new_tokens", r.max_new_tokens}, {"subjects", subjects}, {"accuracy", r.accuracy},
              {"correct", r.correct},     {"total", r.total},            {"subject_mean", r.subject_mean},
              {"prompts_truncated", r.truncated}, {"seconds", r.seconds}};
    if (suite == Suite::Agieval) j["setting"] = r.setting;
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  size_t width = 12;
  for (const auto& s : r.subjects) width = std::max(width, s.subject.size() + 1);
  std::printf("%-*s %s\n", (int)width, "model", lm.dir.c_str());
  std::printf("%-*s %s (%s, greedy, up to %d new tokens)\n", (int)width, "suite", suite_name(suite), setup.c_str(),
              r.max_new_tokens);
  for (const auto& s : r.subjects)
    std::printf("%-*s %6.2f%% (%lld/%lld)\n", (int)width, s.subject.c_str(), s.accuracy, (long long)s.correct,
                (long long)s.total);
  std::printf("%-*s %6.2f%% (%lld/%lld, over all items, as the authors score)\n", (int)width, "overall", r.accuracy,
              (long long)r.correct, (long long)r.total);
  std::printf("%-*s %6.2f%% (mean of %zu subject accuracies)\n", (int)width, "subject mean", r.subject_mean,
              r.subjects.size());
  if (r.truncated)
    std::printf("%-*s %lld prompts lost their first tokens to fit the context\n", (int)width, "truncated",
                (long long)r.truncated);
  std::printf("%-*s %.1f\n", (int)width, "seconds", r.seconds);
  return 0;
}
}  // namespace

void add_eval_command(CLI::App& app, Runner& run) {
  auto* ev = app.add_subcommand("eval", "Evaluate a model: perplexity (ppl) or few-shot classification (fewshot)");
  ev->require_subcommand(1);

  auto p = std::make_shared<PplCli>();
  auto* ppl = ev->add_subcommand(
      "ppl",
      "Perplexity over non-overlapping windows: window w feeds tokens [wT, wT+T) and predicts each next token, so "
      "every token but the first is predicted once; the leftover tokens form a last, shorter window. Prints mean loss "
      "(nats/token), perplexity = exp(loss), tokens/s and, for SUBLLM, each subsampler's actual retention.\n"
      "--mode inference subsamples by the keep threshold (as the model is used); train keeps the top ceil(T*r) "
      "scores per sequence (as in training, forward only); both prints the two and their gap.");
  ppl->add_option("-m,--model", p->model_dir, "model folder (a checkpoint) or run folder (its newest checkpoint)")
      ->required();
  ppl->add_option("--data", p->data,
                  "a data folder of `subllm prepare` (its --split), or text files, folders and .jsonl files "
                  "({\"text\": ...} per line), tokenized with the model's tokenizer, each document ended by eos")
      ->required();
  ppl->add_option("--split", p->split, "split of a data folder")->check(CLI::IsMember({"train", "valid"}))
      ->capture_default_str();
  ppl->add_option("--seq", p->seq, "window length T (0: the model's context)")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  ppl->add_option("--batch", p->batch, "windows per forward pass")->check(CLI::PositiveNumber)->capture_default_str();
  ppl->add_option("--max-tokens", p->max_tokens, "predict at most this many tokens (0: all)")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  ppl->add_option("--mode", p->mode, "subsampling: inference (threshold), train (top-k) or both")
      ->check(CLI::IsMember({"inference", "train", "both"}))
      ->capture_default_str();
  ppl->add_option("--keep-threshold", p->keep_thresholds,
                  "SUBLLM inference: keep tokens scoring above this; several values (A,B,...) sweep it, printing "
                  "loss, retention, prefill and decode speed per value (`subllm plot --sweep` charts the --json output)")
      ->delimiter(',')
      ->capture_default_str()
      ->check(interval("(-inf, inf)"));
  ppl->add_flag("--speed", p->speed, "also measure cached prefill and decode speed on the data (a sweep always does)");
  ppl->add_option("--speed-prompt", p->speed_prompt, "tokens prefilled before the decode measurement")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  ppl->add_option("--speed-decode", p->speed_decode, "tokens decoded one at a time for the decode speed")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  ppl->add_option("--seed", p->seed, "seed of training mode's random pairing choices")->capture_default_str();
  add_device_option(ppl, p->device);
  add_dtype_options(ppl, p->dtype, p->kv_dtype);
  add_threads_option(ppl, p->threads);
  ppl->add_flag("--json", p->json_out, "print one JSON object instead of the table");
  ppl->callback([&run, p] { run = [p] { return run_ppl(*p); }; });

  auto f = std::make_shared<FewshotCli>();
  auto* fs = ev->add_subcommand(
      "fewshot",
      "Few-shot classification as the SUBLLM authors ran it (fewshot_eval/fewshot.py): k demonstrations, the first k "
      "of the train split after numpy's RandomState(seed).shuffle, each written with the task's template and "
      "separator; the test item last, its template cut before {label} with trailing spaces removed (\"... "
      "sentiment:\"). Field values are stripped. Scoring generate: greedy decoding; prediction = output stripped, "
      "first line, stripped; correct = exact match with the label word (\"positive.\" is wrong). Scoring loglik: the "
      "label whose tokens (after the template's space) are likeliest given the prompt.\n"
      "Built-in tasks: sst2, yelp (text), amazon, dbpedia (title, content), agnews, tweet_hate (text), spam "
      "(text; see `subllm prepare --task spam`). Data: jsonl with those string fields and an integer \"label\".\n"
      "--task-spec FILE.json describes another task: {\"name\": \"topic\", \"template\": \"Q: {text} A: {label}\", "
      "\"separator\": \"\\n\\n\", \"labels\": [\"no\", \"yes\"], \"fields\": [\"text\"]} with optional "
      "\"query_template\" (the test item's own template, no {label}), \"max_new_tokens\" and \"strip_fields\" "
      "(default true). See docs/EVAL.md.\n"
      "A prompt longer than the context (minus the generated tokens) drops demonstrations from the front; the "
      "count is reported.\n"
      "--suite mmlu|bbh|agieval --data-dir DIR runs the authors' other benchmarks from their eval_data folders, "
      "prompted and scored as their fewshot.py does; prints accuracy per subject and over all items.");
  fs->add_option("-m,--model", f->model_dir, "model folder (a checkpoint) or run folder (its newest checkpoint)")
      ->required();
  auto* task = fs->add_option("--task", f->task, "built-in task: sst2, yelp, amazon, agnews, dbpedia, tweet_hate, spam");
  auto* spec = fs->add_option("--task-spec", f->task_spec, "a task described in JSON (see above)")
      ->check(CLI::ExistingFile)
      ->excludes(task);
  auto* train = fs->add_option("--train", f->train, "jsonl the demonstrations are drawn from (--task, --task-spec)")
                    ->check(CLI::ExistingFile);
  auto* test = fs->add_option("--test", f->test, "jsonl of test items (--task, --task-spec)")->check(CLI::ExistingFile);
  auto* shots = fs->add_option("--shots", f->shots,
                               "demonstrations per prompt (tasks: default 4; mmlu: the first k dev rows, default 5; "
                               "agieval: 0 reads experiment_input/zero-shot, more few-shot; bbh: not used)")
                    ->capture_default_str()
                    ->check(interval("[0, inf)"));
  auto* seed = fs->add_option("--seed", f->seeds, "seed of the demonstration choice; repeat for several (default 12345)");
  auto* suite = fs->add_option("--suite", f->suite,
                               "the authors' benchmark suites instead of a task: mmlu, bbh or agieval, read from "
                               "--data-dir in their eval_data layout (see docs/EVAL.md)")
                    ->check(CLI::IsMember({"mmlu", "bbh", "agieval"}))
                    ->excludes(task)
                    ->excludes(spec)
                    ->excludes(train)
                    ->excludes(test)
                    ->excludes(seed);
  fs->add_option("--data-dir", f->data_dir,
                 "the suite's folder: eval_data/MMLU/data (dev/, test/), eval_data/BBH (cot-prompts/, bbh/) or "
                 "eval_data/AGIEval (experiment_input/)")
      ->needs(suite);
  fs->add_option("--subjects", f->subjects, "suite subjects to run, comma separated (default: all found)")
      ->delimiter(',')
      ->needs(suite);
  fs->add_option("--max-new-tokens", f->max_new_tokens,
                 "suite generation budget (default the authors': mmlu 3, bbh 1024, agieval 60)")
      ->check(interval("[1, 1000000]"))
      ->needs(suite);
  add_device_option(fs, f->device);
  add_dtype_options(fs, f->dtype, f->kv_dtype);
  fs->add_option("--scoring", f->scoring, "generate (the authors' exact match) or loglik (likeliest label)")
      ->check(CLI::IsMember({"generate", "loglik"}))
      ->excludes(suite)
      ->capture_default_str();
  fs->add_option("--max-test", f->max_test,
                 "evaluate this many test items, chosen as the authors downsample (RandomState(666)); 0: all")
      ->excludes(suite)
      ->capture_default_str()->check(interval("[0, inf)"));
  fs->add_option("--keep-threshold", f->keep_threshold, "SUBLLM inference: keep tokens scoring above this")
      ->capture_default_str()->check(interval("(-inf, inf)"));
  fs->add_option("--predictions", f->predictions, "write every item's prediction to this jsonl file");
  add_threads_option(fs, f->threads);
  fs->add_flag("--json", f->json_out, "print one JSON object instead of the table");
  fs->callback([&run, f, shots] {
    f->shots_given = shots->count() > 0;
    run = [f] { return run_fewshot(*f); };
  });
}

}  // namespace subllm::cli
