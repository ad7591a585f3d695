#include "subllm/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "subllm/dataset.h"
#include "subllm/error.h"
#include "subllm/host_memory.h"
#include "subllm/model.h"
#include "subllm/optim.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"
#include "subllm/threads.h"
#include "subllm/tokenizer.h"

namespace subllm {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Set by SIGINT/SIGTERM; the loop finishes its step, checkpoints and returns. A second
// signal ends the process at once, naming the newest checkpoint. A signal handler can only
// reach process-wide state, hence these globals; the message is built outside the handler
// in the spare one of two buffers, then published by switching the index.
std::atomic<bool> g_stop_requested{false};
std::atomic<bool> g_stop_messages{true};
char g_stop_text[2][4200];
std::atomic<int> g_stop_text_index{0};

void write_stderr(const char* text) {
  size_t left = std::strlen(text);
  while (left > 0) {
    const ssize_t n = ::write(2, text, left);
    if (n <= 0) return;
    text += n;
    left -= (size_t)n;
  }
}

void set_last_checkpoint(const std::string& path) {
  const int spare = 1 - g_stop_text_index.load();
  std::snprintf(g_stop_text[spare], sizeof g_stop_text[spare],
                "\ninterrupted again: stopped at once; no checkpoint was written for this step, the last one is %s\n",
                path.empty() ? "none (nothing of this run is saved)" : path.c_str());
  g_stop_text_index.store(spare);
}

extern "C" void on_stop_signal(int) {
  if (g_stop_requested.exchange(true)) {
    if (g_stop_messages.load()) write_stderr(g_stop_text[g_stop_text_index.load()]);
    ::_exit(130);
  }
  if (g_stop_messages.load())
    write_stderr("\nstopping after this step with a checkpoint; Ctrl-C again stops at once, without one\n");
}

class StopSignalScope {
 public:
  StopSignalScope(bool messages, const std::string& last_checkpoint) {
    g_stop_requested.store(false);
    g_stop_messages.store(messages);
    set_last_checkpoint(last_checkpoint);
    old_int_ = std::signal(SIGINT, on_stop_signal);
    old_term_ = std::signal(SIGTERM, on_stop_signal);
  }
  ~StopSignalScope() {
    std::signal(SIGINT, old_int_);
    std::signal(SIGTERM, old_term_);
  }

 private:
  void (*old_int_)(int);
  void (*old_term_)(int);
};

// Each (step, micro-batch) draws its windows from its own generator, so a resumed run sees
// exactly the data the uninterrupted run would have seen.
uint64_t batch_seed(uint64_t seed, long step, int micro) {
  return seed * 0x9e3779b97f4a7c15ull ^ ((uint64_t)step << 20) ^ (uint64_t)micro;
}

void fill_windows(const TokenDataset& ds, Rng& rng, int batch, int seq, std::vector<int32_t>& tokens,
                  std::vector<int32_t>& targets, std::vector<int32_t>& window) {
  const int64_t span = ds.num_tokens() - (seq + 1);
  for (int b = 0; b < batch; ++b) {
    const int64_t start = span > 0 ? (int64_t)rng.below((uint64_t)span + 1) : 0;
    ds.read(start, seq + 1, window.data());
    std::copy(window.begin(), window.begin() + seq, tokens.begin() + (int64_t)b * seq);
    std::copy(window.begin() + 1, window.begin() + seq + 1, targets.begin() + (int64_t)b * seq);
  }
}

// One micro-batch: the gradients of (its mean loss · multiplier) are added to the model's
// gradient buffer; returns its mean loss. The first micro-batch of a step lands in the zeroed
// buffer; later ones are computed into a zeroed buffer of their own and then added, so the
// buffer ends as g0 + g1 + …, the same sum a reduction over ranks makes of the same
// micro-batches (bit for bit with two ranks). On the last micro-batch each span of the buffer
// goes to the communicator as soon as it is final, so the sum over ranks overlaps the rest of
// the backward.
double accumulate_micro_batch(Model& model, Communicator& comm, Tensor& micro_grads, const std::vector<int32_t>& tokens,
                              const std::vector<int32_t>& targets, int batch, int seq, float multiplier, bool first,
                              bool last) {
  Backend& be = model.backend();
  Session& s = model.session();
  float* grads = model.grad_data();
  float* into = grads;
  if (!first) {
    if (!micro_grads.raw()) micro_grads = be.empty({model.num_params()});
    be.zero(micro_grads.raw(), micro_grads.nbytes());
    into = micro_grads.f32();
  }
  const bool reduce = last && comm.size() > 1;
  if (!first || reduce)
    s.on_grad_ready([&](int64_t a, int64_t b) {
      if (!first) be.add(vec(grads + a, b - a), vec(into + a, b - a));
      if (reduce) comm.all_reduce_sum_start(vec(grads + a, b - a));
    });
  const double loss = s.forward_backward(into, tokens.data(), targets.data(), batch, seq, multiplier);
  s.on_grad_ready(nullptr);
  return loss;
}

// Validation runs in inference mode: SUBLLM subsamplers keep the tokens scoring above the
// threshold, as they will when the model is used.
float evaluate(Model& model, const TokenDataset& ds, int batch, int seq, int batches) {
  model.reset_retention_stats();
  std::vector<int32_t> tokens((size_t)batch * seq), targets((size_t)batch * seq), window(seq + 1);
  const int64_t span = ds.num_tokens() - (seq + 1);
  const int windows = batch * batches;
  double total = 0;
  for (int k = 0; k < batches; ++k) {
    for (int b = 0; b < batch; ++b) {
      // Evenly spaced windows: the same validation tokens at every evaluation.
      const int64_t start = span > 0 ? span * (k * batch + b) / std::max(1, windows - 1) : 0;
      ds.read(start, seq + 1, window.data());
      std::copy(window.begin(), window.begin() + seq, tokens.begin() + (int64_t)b * seq);
      std::copy(window.begin() + 1, window.end(), targets.begin() + (int64_t)b * seq);
    }
    total += model.forward(tokens.data(), targets.data(), batch, seq);
  }
  return (float)(total / batches);
}

// The --balancer-fraction value of these knobs, as trainer_state.json records it.
const char* balancer_fraction(const SubllmKnobs& k) { return k.balancer_counted ? "counted" : "gaussian"; }

std::string format_duration(double s) {
  char buf[32];
  if (s < 0 || !std::isfinite(s)) return "?";
  long t = (long)s;
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  return buf;
}

void write_text_atomic(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    check((bool)f, "cannot write '" + tmp.string() + "': check that the folder exists and is writable");
    f << text;
    f.flush();
    check((bool)f, "writing '" + tmp.string() + "' failed (disk full?)");
  }
  fs::rename(tmp, path);
}

json read_json(const fs::path& path) {
  std::ifstream f(path);
  check((bool)f, "cannot read '" + path.string() + "'");
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    throw Error("'" + path.string() + "' is not valid JSON (" + e.what() + "): the checkpoint is damaged");
  }
}

void save_checkpoint(const fs::path& dir, const Model& model, const Optimizer& opt, const json& state,
                     const std::string& tokenizer) {
  const fs::path tmp = dir.string() + ".tmp";
  try {
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    save_config(model.config(), (tmp / "config.json").string());
    model.save((tmp / "model.safetensors").string());
    opt.save_state((tmp / "optimizer.safetensors").string());
    if (!tokenizer.empty() && fs::exists(tokenizer)) fs::copy_file(tokenizer, tmp / "tokenizer.model");
    write_text_atomic(tmp / "trainer_state.json", state.dump(2) + "\n");
    // The folder appears under its final name only when complete.
    fs::remove_all(dir);
    fs::rename(tmp, dir);
  } catch (...) {
    // A partial copy would only take more of a disk that is likely full.
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

// Config fields that must agree between a checkpoint and the run resuming it.
void check_same_config(const ModelConfig& saved, const ModelConfig& now, const std::string& where) {
  auto differ = [&](const char* key, const std::string& a, const std::string& b) {
    if (a != b)
      throw Error("cannot resume from '" + where + "': " + key + " differs (checkpoint " + a + ", requested " + b +
                  "); drop the model flags to use the checkpoint's config, or start a new run");
  };
  differ("num_embeddings", std::to_string(saved.vocab_size), std::to_string(now.vocab_size));
  differ("decoder_embed_dim", std::to_string(saved.dim), std::to_string(now.dim));
  differ("decoder_ffn_embed_dim", std::to_string(saved.ffn_dim), std::to_string(now.ffn_dim));
  differ("decoder_layers", std::to_string(saved.n_layers), std::to_string(now.n_layers));
  differ("decoder_attention_heads", std::to_string(saved.n_heads), std::to_string(now.n_heads));
  differ("decoder_kv_heads", std::to_string(saved.kv_heads()), std::to_string(now.kv_heads()));
  differ("structure", saved.layout(), now.layout());
  differ("tie_weights", saved.tie_weights ? "true" : "false", now.tie_weights ? "true" : "false");
  differ("qk_bias", saved.qk_bias ? "true" : "false", now.qk_bias ? "true" : "false");
}

// Weights, gradients, optimizer state (two moments) and one micro-batch's activations on
// the host, refused before they are allocated rather than by the OOM killer mid-run. A
// device's allocator reports its own shortage.
void check_training_memory(const Model& model, const TrainOptions& o) {
  if (std::string(model.backend().name()) != "cpu") return;
  const double state = 4.0 * (double)model.num_params() * (o.grad_accum > 1 ? 5 : 4);
  const double activations = (double)model.activation_bytes(o.batch, o.seq);
  const std::string fix = activations > state
                              ? "lower --batch or --seq (--grad-accum keeps the tokens per step)"
                              : "choose a smaller model (" + model.config().source + ")";
  check_host_memory(state + activations,
                    "training (" + memory_text(state) + " of weights, gradients and optimizer state, " +
                        memory_text(activations) + " of activations for --batch " + std::to_string(o.batch) +
                        " --seq " + std::to_string(o.seq) + ")",
                    fix);
}

// A checkpoint continues only on data of its own vocabulary: another tokenizer's ids would
// stand for other pieces, or fall outside the embedding.
void check_resumed_vocabulary(const std::string& ck, const json& st, const ModelConfig& cfg, const TokenDataset& ds,
                              const std::string& data_dir) {
  const fs::path tok = fs::path(ck) / "tokenizer.model";
  int saved = -1;
  if (fs::exists(tok)) {
    try {
      saved = Tokenizer::load(tok.string()).vocab_size();
    } catch (const Error&) {
    }
  }
  if (saved == ds.vocab_size() || (saved < 0 && cfg.vocab_size >= ds.vocab_size())) return;
  const std::string saved_data =
      st.is_object() && st.contains("data_dir") && st["data_dir"].is_string() ? st["data_dir"].get<std::string>() : "";
  throw Error("cannot resume from '" + ck + "': it was trained on " +
              (saved >= 0 ? "a vocabulary of " + std::to_string(saved) + " pieces"
                          : "num_embeddings " + std::to_string(cfg.vocab_size)) +
              (saved_data.empty() ? "" : " from data folder '" + saved_data + "'") + ", but --data " + data_dir +
              " has a vocabulary of " + std::to_string(ds.vocab_size()) + " pieces: pass " +
              (saved_data.empty() ? "the data folder it was trained on" : "--data " + saved_data));
}

// Bounds of trainer_state.json's fields: far past any real run, short of overflow.
constexpr int64_t kMaxSteps = 1'000'000'000'000;
constexpr int64_t kMaxCount = 1 << 30;

// Fields of a checkpoint's trainer_state.json (`file`), each checked for presence, type and
// range, so a damaged or hand-edited state is named instead of resuming from nonsense.
const char* kDamagedState = ": the checkpoint is damaged or was not written by `subllm train`; resume from another "
                            "checkpoint";

const json& state_field(const json& st, const std::string& file, const char* key) {
  check(st.is_object(), "'" + file + "' is not a JSON object" + kDamagedState);
  const auto it = st.find(key);
  check(it != st.end(), "'" + file + "' has no \"" + key + "\" field" + kDamagedState);
  return *it;
}

int64_t state_int(const json& st, const std::string& file, const char* key, int64_t lo, int64_t hi) {
  const json& v = state_field(st, file, key);
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  check(v.is_number_integer(), "'" + file + "' has " + key + " " + v.dump() + "; it must be an integer in " + range +
                                   kDamagedState);
  // JSON reads a non-negative integer as unsigned, which may exceed int64_t.
  const bool fits = v.is_number_unsigned()
                        ? v.get<uint64_t>() <= (uint64_t)hi && (lo <= 0 || v.get<uint64_t>() >= (uint64_t)lo)
                        : v.get<int64_t>() >= lo && v.get<int64_t>() <= hi;
  check(fits, "'" + file + "' has " + key + " " + v.dump() + "; it must lie in " + range + kDamagedState);
  return v.get<int64_t>();
}

// A text field that states written before it existed lack: those get `fallback`.
std::string state_choice(const json& st, const std::string& file, const char* key, const std::string& fallback,
                         const std::vector<std::string>& allowed) {
  if (st.is_object() && !st.contains(key)) return fallback;
  const json& v = state_field(st, file, key);
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "" : " | ") + a;
  const bool ok = v.is_string() && std::find(allowed.begin(), allowed.end(), v.get<std::string>()) != allowed.end();
  check(ok, "'" + file + "' has " + key + " " + v.dump() + "; it must be one of " + list + kDamagedState);
  return v.get<std::string>();
}

// What a run writes into its folder: a folder holding any of these holds a run.
bool is_run_file(const std::string& name) {
  return name == "config.json" || name == "metrics.jsonl" || name.rfind("checkpoint-", 0) == 0;
}

std::vector<std::string> run_files_in(const fs::path& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (is_run_file(e.path().filename().string())) found.push_back(e.path().filename().string());
  std::sort(found.begin(), found.end());
  return found;
}

bool same_folder(const fs::path& a, const fs::path& b) {
  std::error_code ec;
  return fs::weakly_canonical(a, ec) == fs::weakly_canonical(b, ec);
}

// A new run (or a fork of one) in a folder that holds another run would mix their
// checkpoints and metrics: refused, unless `overwrite` asks to delete that run's files
// first (only the files a run writes; anything else in the folder stays).
void claim_run_folder(const fs::path& run_dir, bool overwrite) {
  const auto found = run_files_in(run_dir);
  if (found.empty()) return;
  if (!overwrite) {
    std::string list;
    for (size_t i = 0; i < found.size() && i < 5; ++i) list += (i ? ", " : "") + found[i];
    if (found.size() > 5) list += " and " + std::to_string(found.size() - 5) + " more";
    throw Error("output folder '" + run_dir.string() + "' holds another run (" + list +
                "): choose another -o, continue that run with --resume " + run_dir.string() +
                ", or pass --overwrite to delete it first");
  }
  for (const auto& name : found) {
    std::error_code ec;
    fs::remove_all(run_dir / name, ec);
    check(!ec, "--overwrite: cannot remove '" + (run_dir / name).string() + "': " + ec.message());
  }
}

// The records of `from` (a run's metrics.jsonl) up to `step`, and how many past it were left out.
std::string metrics_up_to(const fs::path& from, long step, long& dropped) {
  std::string kept;
  dropped = 0;
  std::ifstream in(from);
  std::string line;
  while (std::getline(in, line)) {
    try {
      if (json::parse(line).value("step", 0L) <= step)
        kept += line + "\n";
      else
        ++dropped;
    } catch (const json::exception&) {
    }
  }
  return kept;
}

// The data folder's tokenizer goes into every checkpoint for `generate` and `eval`: a
// missing or broken one stops the run now rather than there.
void check_data_tokenizer(const TokenDataset& ds) {
  const std::string path = ds.tokenizer_path();
  const std::string fix = ": re-run `subllm prepare` to rebuild the data folder";
  check(fs::is_regular_file(path), "tokenizer " + path + " of the data folder is missing" + fix);
  int pieces = 0;
  try {
    pieces = Tokenizer::load(path).vocab_size();
  } catch (const Error&) {
    throw Error("tokenizer " + path + " of the data folder is not a valid sentencepiece model" + fix);
  }
  check(pieces == ds.vocab_size(), "tokenizer " + path + " has " + std::to_string(pieces) +
                                       " pieces but the data manifest says " + std::to_string(ds.vocab_size()) +
                                       ": re-run `subllm prepare` to rebuild the data folder");
}

// The data must be tokenized as the model was trained: the same tokenizer.model, byte for byte.
void check_init_tokenizer(const std::string& init_dir, const TokenDataset& ds) {
  const fs::path mine = fs::path(init_dir) / "tokenizer.model";
  if (!fs::exists(mine)) return;  // a folder without one: the vocabulary size check still applies
  auto bytes = [](const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  };
  check(bytes(mine) == bytes(ds.tokenizer_path()),
        "the data folder was tokenized with " + ds.tokenizer_path() + ", not with the tokenizer of --init-from (" +
            mine.string() + "): prepare the data with `subllm prepare --tokenizer " + mine.string() + "`");
}

}  // namespace

TrainResult train(const TrainOptions& o) {
  set_num_threads(o.threads);
  check(o.batch > 0 && o.seq > 1 && o.grad_accum > 0, "batch, seq (> 1) and grad-accum must be positive");
  // The ranks of a data-parallel job (one without a launcher): each trains on its share of the
  // global batch; rank 0 alone writes and prints.
  Communicator& comm = communicator_for(backend_for(o.device));
  const int ranks = comm.size(), rank = comm.rank();
  const bool root = rank == 0, quiet = o.quiet || !root;
  check(o.eval_batches >= 0, "--eval-batches must be 0 (no validation) or more");
  // The checkpoint to resume and its state come first: a wrong --resume path is named before
  // anything reads the data folder.
  std::string resume_from, state_file;
  json st;
  if (!o.resume.empty()) {
    const fs::path weights_file = fs::path(o.resume) / "model.safetensors";
    if (fs::exists(weights_file) && weight_file_type(weights_file.string()) != "f32")
      throw Error("cannot resume from '" + o.resume + "': it holds " + weight_file_type(weights_file.string()) +
                  " inference weights written by `subllm quantize`; training needs the fp32 checkpoint they were "
                  "made from");
    resume_from = find_checkpoint(o.resume);
    state_file = (fs::path(resume_from) / "trainer_state.json").string();
    st = read_json(state_file);
  }
  check(o.init_from.empty() || o.resume.empty(),
        "--init-from starts a new run from a model's weights and --resume continues a run: give one of them");
  const std::string init_dir = o.init_from.empty() ? "" : init_from_folder(o.init_from);
  const fs::path data_dir(o.data_dir);
  TokenDataset train_ds((data_dir / "manifest.json").string(), "train");
  check_data_tokenizer(train_ds);
  if (!init_dir.empty()) check_init_tokenizer(init_dir, train_ds);
  // --eval-batches 0 trains without validation; otherwise the split must be there and whole.
  std::unique_ptr<TokenDataset> valid_ds;
  if (o.eval_batches > 0) {
    try {
      valid_ds = std::make_unique<TokenDataset>((data_dir / "manifest.json").string(), "valid");
    } catch (const Error& e) {
      throw Error(std::string("the validation split cannot be read: ") + e.what() +
                  "; or pass --eval-batches 0 to train without validation");
    }
    check(valid_ds->num_tokens() > o.seq, "the validation split has " + std::to_string(valid_ds->num_tokens()) +
                                              " tokens, fewer than one window of --seq " + std::to_string(o.seq) +
                                              ": use a shorter --seq, hold out more text, or pass --eval-batches 0");
  }
  check(train_ds.num_tokens() > o.seq, "the training split has " + std::to_string(train_ds.num_tokens()) +
                                           " tokens, fewer than one window of --seq " + std::to_string(o.seq) +
                                           ": use a shorter --seq or more text");

  ModelConfig cfg = o.model;
  if (cfg.context < o.seq) cfg.context = o.seq;
  if (resume_from.empty())
    check(cfg.vocab_size >= train_ds.vocab_size(),
          "the model's vocabulary (" + std::to_string(cfg.vocab_size) + ") is smaller than the tokenizer's (" +
              std::to_string(train_ds.vocab_size()) + "): set num_embeddings to at least that");

  // Micro-batches per optimizer step over all ranks: what one rank with --grad-accum of this
  // many would see, in the same order (rank r takes r·grad_accum .. (r+1)·grad_accum - 1).
  const int global_micro = o.grad_accum * ranks;
  const int64_t tokens_per_step = (int64_t)o.batch * o.seq * global_micro;
  long total_steps = o.steps;
  if (o.token_budget > 0) total_steps = (long)((o.token_budget + tokens_per_step - 1) / tokens_per_step);
  check(total_steps > 0, "nothing to train: --steps or --tokens must be positive");

  long start_step = 0;
  // --resume alone continues the run in its own folder; with --out elsewhere it forks into
  // that folder, which must not hold another run.
  fs::path run_dir = o.out_dir, resumed_run;
  if (!resume_from.empty()) {
    ModelConfig saved = load_config((fs::path(resume_from) / "config.json").string());
    check_resumed_vocabulary(resume_from, st, saved, train_ds, o.data_dir);
    if (o.model_given) check_same_config(saved, cfg, resume_from);
    cfg = saved;
    resumed_run = fs::path(resume_from).parent_path();
    if (run_dir.empty()) run_dir = resumed_run;
    start_step = (long)state_int(st, state_file, "step", 0, kMaxSteps);
    check(start_step < total_steps, "cannot resume from '" + resume_from + "': it is at step " +
                                        std::to_string(start_step) + " of the " + std::to_string(total_steps) +
                                        " asked for: pass a larger --steps (or --tokens) to train further");
  }
  check(!run_dir.empty(), "no output folder: pass --out DIR");
  const bool in_place = !resume_from.empty() && same_folder(run_dir, resumed_run);
  check(!(in_place && o.overwrite), "--overwrite would delete the run that --resume " + o.resume +
                                        " continues: drop --overwrite, or pass -o NEW to fork it into a new folder");

  Model model(cfg, o.device);
  check_training_memory(model, o);
  // The folder is made once the model is known to fit, so a refused one leaves nothing behind.
  std::error_code ec;
  if (root) fs::create_directories(run_dir, ec);
  check(!ec, "cannot create output folder '" + run_dir.string() + "': " + ec.message());
  if (root) {
    const fs::path probe = run_dir / ".write-test";
    std::ofstream f(probe);
    check((bool)f, "output folder '" + run_dir.string() + "' is not writable: choose another --out");
    f.close();
    fs::remove(probe);
  }
  model.init_weights(o.seed);
  if (!init_dir.empty()) {
    const std::string notes = init_from_model(model, init_dir);
    if (!quiet) std::fputs(notes.c_str(), stderr);
  }
  model.knobs() = o.subllm;
  std::unique_ptr<Optimizer> opt = make_optimizer(o.optimizer, model, o.adamw, o.scaled_adam);
  if (o.shard_optimizer) opt->shard(comm);
  if (!resume_from.empty()) {
    const fs::path ck(resume_from);
    const auto mismatch = [&](const char* key, long saved, long now) {
      if (saved != now)
        throw Error("cannot resume from '" + resume_from + "': " + key + " was " + std::to_string(saved) + ", now " +
                    std::to_string(now) + "; pass the same value to continue the same run");
    };
    const auto field = [&](const char* key, int64_t lo, int64_t hi) { return (long)state_int(st, state_file, key, lo, hi); };
    mismatch("--batch", field("batch", 1, kMaxCount), o.batch);
    mismatch("--seq", field("seq", 2, kMaxCount), o.seq);
    field("optimizer_steps", 0, kMaxSteps);
    // The global batch must stay the same; it may be spread over another number of ranks.
    const long saved_ranks = st.contains("world_size") ? field("world_size", 1, kMaxCount) : 1;
    const long saved_micro = field("grad_accum", 1, kMaxCount) * saved_ranks;
    if (saved_micro != global_micro)
      throw Error("cannot resume from '" + resume_from + "': its steps had " + std::to_string(saved_micro) +
                  " micro-batches (ranks x --grad-accum), now " + std::to_string(global_micro) + " (" +
                  std::to_string(ranks) + " x " + std::to_string(o.grad_accum) + "); pass --grad-accum " +
                  (saved_micro % ranks == 0 ? std::to_string(saved_micro / ranks)
                                            : "with a rank count that divides " + std::to_string(saved_micro)) +
                  " to continue the same run");
    const json& seed = state_field(st, state_file, "seed");
    check(seed.is_number_unsigned(), "'" + state_file + "' has seed " + seed.dump() +
                                         "; it must be an integer in [0, 2^64 - 1]" + kDamagedState);
    mismatch("--seed", (long)seed.get<uint64_t>(), (long)o.seed);
    const std::string saved_opt = state_choice(st, state_file, "optimizer", "adamw", {"adamw", "scaled_adam"});
    check(saved_opt == opt->name(), "cannot resume from '" + resume_from + "': it was trained with --optimizer " +
                                        saved_opt + ", not " + opt->name() + "; pass the same optimizer");
    if (!model.structure().is_plain()) {
      // States written before the flag existed were trained with the paper's balancer.
      const std::string saved_bal =
          state_choice(st, state_file, "balancer_fraction", "gaussian", {"gaussian", "counted"});
      const std::string now_bal = balancer_fraction(o.subllm);
      check(saved_bal == now_bal, "cannot resume from '" + resume_from + "': it was trained with --balancer-fraction " +
                                      saved_bal + ", not " + now_bal + "; pass --balancer-fraction " + saved_bal);
    }
    if (o.lr.kind == "eden" || o.lr.kind == "eden2") {
      // States written before the flag existed counted the epoch fractionally.
      const std::string saved_epoch =
          state_choice(st, state_file, "eden_epoch", "fractional", {"fractional", "completed"});
      const std::string now_epoch = eden_epoch_name(o.lr.eden.epoch_mode);
      check(saved_epoch == now_epoch, "cannot resume from '" + resume_from + "': it was trained with --eden-epoch " +
                                          saved_epoch + ", not " + now_epoch + "; pass --eden-epoch " + saved_epoch);
    }
    model.load((ck / "model.safetensors").string());
    opt->load_state((ck / "optimizer.safetensors").string());
    if (!quiet) std::fprintf(stderr, "resuming from %s at step %ld\n", resume_from.c_str(), start_step);
  }
  if (root && !in_place) claim_run_folder(run_dir, o.overwrite);
  if (root) save_config(cfg, (run_dir / "config.json").string());

  // A resumed run keeps the records up to its step, from the run it continues (a fork
  // starts with a copy of them); records past it belong to the abandoned future and go.
  const fs::path metrics_path = run_dir / "metrics.jsonl";
  std::ofstream metrics;
  int64_t metrics_bytes = 0;  // the whole records in the file
  if (root) {
    long dropped = 0;
    const std::string kept = resume_from.empty() ? "" : metrics_up_to(resumed_run / "metrics.jsonl", start_step, dropped);
    if (dropped > 0 && !quiet)
      std::fprintf(stderr, "note: %ld records of metrics.jsonl past step %ld are dropped (a continuation from an "
                   "earlier checkpoint)\n", dropped, start_step);
    write_text_atomic(metrics_path, kept);
    metrics_bytes = (int64_t)kept.size();
    metrics.open(metrics_path, std::ios::app | std::ios::binary);
    check((bool)metrics, "cannot open '" + metrics_path.string() + "' for appending");
  }

  LrSchedule lr = o.lr;
  lr.total_steps = total_steps;
  // Eden's epoch term: an epoch is one pass over the training split; unless given, its
  // scale E is a third of the run's data, as in the paper's recipe.
  const double tokens_per_epoch = (double)train_ds.num_tokens();
  if (lr.eden.lr_epochs <= 0) lr.eden.lr_epochs = (double)total_steps * tokens_per_step / tokens_per_epoch / 3.0;
  const bool tty = isatty(fileno(stderr)) && !quiet;
  const long log_every = std::max<long>(1, total_steps / 100);
  std::vector<int32_t> tokens((size_t)o.batch * o.seq), targets((size_t)o.batch * o.seq), window(o.seq + 1);
  Tensor micro_grads;  // a micro-batch's own gradients, after the first of a step
  std::string last_checkpoint = resume_from;  // the newest complete one of this run's history
  StopSignalScope signals(!quiet, last_checkpoint);
  TrainResult res;
  res.rank = rank;
  int bad_streak = 0;
  const auto t_start = std::chrono::steady_clock::now();
  long timed_steps = 0;

  auto state_json = [&](long step) {
    return json{{"step", step},
                {"optimizer_steps", opt->steps_taken()},
                {"seed", o.seed},
                {"batch", o.batch},
                {"seq", o.seq},
                {"grad_accum", o.grad_accum},
                {"world_size", ranks},
                {"total_steps", total_steps},
                {"tokens_seen", (int64_t)step * tokens_per_step},
                {"optimizer", opt->name()},
                {"balancer_grad_scale", o.subllm.balancer_grad_scale},
                {"balancer_prob", o.subllm.balancer_prob.str()},
                {"balancer_fraction", balancer_fraction(o.subllm)},
                {"balancer_window", o.subllm.balancer_window},
                {"bypass_min", o.subllm.bypass_min.str()},
                {"lr_schedule", lr.kind},
                {"eden_epoch", eden_epoch_name(o.lr.eden.epoch_mode)},
                {"base_lr", lr.base_lr},
                {"data_dir", o.data_dir}};
  };
  auto checkpoint = [&](long step) {
    if (!root) {
      // A sharded optimizer's state is gathered to rank 0, so every rank takes part.
      if (opt->sharded()) opt->save_state("");
      return;
    }
    char name[64];
    std::snprintf(name, sizeof name, "checkpoint-%08ld", step);
    const fs::path dir = run_dir / name;
    try {
      save_checkpoint(dir, model, *opt, state_json(step), train_ds.tokenizer_path());
    } catch (const std::exception& e) {
      throw Error("saving checkpoint '" + dir.string() + "' failed (" + e.what() + "); the last complete one is " +
                  (last_checkpoint.empty() ? "none, so this run is lost" : "'" + last_checkpoint + "'") +
                  ": free some space or choose another -o, and train again");
    }
    // Oldest first by the step in the name; the one just written always stays.
    auto all = list_checkpoints(run_dir.string());
    for (size_t i = 0; i + std::max(1, o.keep_last) < all.size(); ++i)
      if (!same_folder(all[i], dir)) fs::remove_all(all[i]);
    res.last_checkpoint = last_checkpoint = dir.string();
    set_last_checkpoint(last_checkpoint);
  };

  // A metrics record that could not be written (disk full) stops the run after a checkpoint of
  // the step it belongs to. Rank 0 learns it when writing; the next step's agreement tells the
  // other ranks, since a checkpoint may need them all.
  bool metrics_failed = false;
  const auto metrics_error = [&](long step, const std::string& saved) {
    if (!root) return Error("training stopped: rank 0 could not write " + metrics_path.string());
    return Error("cannot append step " + std::to_string(step) + " to '" + metrics_path.string() +
                 "' (disk full?): training stopped; " + saved);
  };
  const auto saved_text = [&] {
    return "checkpoint saved to '" + last_checkpoint + "'; free some space and continue with --resume " +
           run_dir.string();
  };
  const auto stop_after_failed_metrics = [&](long step) {
    std::string saved;
    try {
      checkpoint(step);
      saved = saved_text();
    } catch (const std::exception& e) {
      saved = e.what();
    }
    comm.barrier();
    throw metrics_error(step, saved);
  };

  for (long step = start_step; step < total_steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const float cur_lr = lr.at(step, (double)step * tokens_per_step / tokens_per_epoch);
    model.zero_grad();
    double loss_sum = 0;
    for (int a = 0; a < o.grad_accum; ++a) {
      const int micro = rank * o.grad_accum + a;
      Rng rng(batch_seed(o.seed, step, micro));
      fill_windows(train_ds, rng, o.batch, o.seq, tokens, targets, window);
      model.set_train_context(step, batch_seed(o.seed ^ 0x5eed, step, micro));
      loss_sum += accumulate_micro_batch(model, comm, micro_grads, tokens, targets, o.batch, o.seq,
                                         1.0f / global_micro, a == 0, a == o.grad_accum - 1);
    }
    // Gradients summed over the ranks; the loss, the stop request and a failed metrics write
    // agreed by all.
    double comm_s = comm.wait_reductions();
    const auto t_agree = std::chrono::steady_clock::now();
    double agreed[3] = {loss_sum, g_stop_requested.load() ? 1.0 : 0.0, metrics_failed ? 1.0 : 0.0};
    comm.all_reduce_sum_host(agreed, 3);
    comm_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_agree).count();
    if (agreed[2] > 0) stop_after_failed_metrics(step);  // before this step's update
    const float loss = (float)(agreed[0] / global_micro);
    const bool stop = agreed[1] > 0;
    StepReport rep;
    if (std::isfinite(loss))
      rep = opt->step(model, cur_lr);
    else
      rep.skipped = true;
    const double norm = rep.grad_norm;
    if (rep.skipped) {
      ++bad_streak;
      if (root)
        std::fprintf(stderr, "%swarning: step %ld has a non-finite %s; %s\n", tty ? "\n" : "", step + 1,
                     std::isfinite(loss) ? "gradient" : "loss",
                     std::isfinite(loss) ? "the update of the parameters it reaches is skipped" : "the update is skipped");
      check(bad_streak < 10, "training diverged: 10 steps in a row had non-finite loss or gradients; lower the "
                             "learning rate (--lr) or resume from an earlier checkpoint");
    } else {
      bad_streak = 0;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++timed_steps;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    const double tps = tokens_per_step * timed_steps / elapsed;
    const long done = step + 1;
    res.steps_done = done;
    res.last_loss = loss;
    json m = {{"step", done},           {"loss", loss},          {"lr", cur_lr},
              {"grad_norm", norm},      {"clip", rep.clip_factor}, {"step_s", dt},
              {"tokens_per_s", tps},    {"tokens", (int64_t)done * tokens_per_step}, {"elapsed_s", elapsed}};
    // Per subsampler, on the last micro-batch: the fraction of scores above the keep
    // threshold (what inference mode would keep), their RMS and the kept tokens' mean weight.
    std::string keep_text;
    if (!model.structure().is_plain()) {
      // With several ranks: the mean over the ranks' last micro-batches.
      std::vector<double> flat;
      for (const ScoreStats& st : model.score_stats()) flat.insert(flat.end(), {st.above, st.rms, st.kept_weight});
      if (ranks > 1) {
        comm.all_reduce_sum_host(flat.data(), (int)flat.size());
        for (double& v : flat) v /= ranks;
      }
      std::vector<double> above, rms, kw;
      for (size_t j = 0; j < flat.size(); j += 3) {
        above.push_back(flat[j]);
        rms.push_back(flat[j + 1]);
        kw.push_back(flat[j + 2]);
        char b[16];
        std::snprintf(b, sizeof b, "%s%.2f", keep_text.empty() ? " | keep " : "/", flat[j]);
        keep_text += b;
      }
      m["score_above"] = above;
      m["score_rms"] = rms;
      m["kept_weight"] = kw;
    }
    // ScaledAdam clips each group of tensors (by lr scale) against its own window: "grad_norm"
    // is the whole model's norm, "clip" and "clip_quartiles" the main group's (the one with the
    // most elements), and "clip_groups" has every group (lr_scale null: global clipping).
    if (rep.quartiles_changed) {
      m["clip_quartiles"] = std::vector<double>(rep.quartiles, rep.quartiles + 5);
      if (!quiet && !tty) {
        if (rep.clip_groups.size() > 1) {
          for (const ClipGroupStats& g : rep.clip_groups)
            std::fprintf(stderr, "clipping (lr scale %g): grad-norm quartiles %.3g %.3g %.3g %.3g %.3g\n",
                         (double)g.lr_scale, g.quartiles[0], g.quartiles[1], g.quartiles[2], g.quartiles[3],
                         g.quartiles[4]);
        } else {
          std::fprintf(stderr, "clipping: grad-norm quartiles %.3g %.3g %.3g %.3g %.3g\n", rep.quartiles[0],
                       rep.quartiles[1], rep.quartiles[2], rep.quartiles[3], rep.quartiles[4]);
        }
      }
    }
    if (!rep.clip_groups.empty()) {
      json groups = json::array();
      for (const ClipGroupStats& g : rep.clip_groups) {
        json e = {{"lr_scale", g.whole_model ? json(nullptr) : json(g.lr_scale)},
                  {"tensors", g.tensors},
                  {"grad_norm", g.grad_norm},
                  {"clip", g.clip_factor},
                  {"threshold", g.threshold}};
        if (g.quartiles_changed) e["quartiles"] = std::vector<double>(g.quartiles, g.quartiles + 5);
        groups.push_back(std::move(e));
      }
      m["clip_groups"] = std::move(groups);
    }
    if (ranks > 1) {
      m["world_size"] = ranks;
      m["comm_s"] = comm_s;
      m["comm_share"] = comm_s / dt;
    }
    const bool last = done == total_steps;
    if (root && valid_ds && ((o.eval_every > 0 && done % o.eval_every == 0) || last)) {
      res.val_loss = evaluate(model, *valid_ds, o.batch, o.seq, o.eval_batches);
      m["val_loss"] = res.val_loss;
      res.retention = model.retention();
      if (!model.structure().is_plain()) m["retention"] = res.retention;
    }
    if (root) {
      const std::string record = m.dump() + "\n";
      metrics << record;
      metrics.flush();
      if (metrics) {
        metrics_bytes += (int64_t)record.size();
      } else {
        metrics_failed = true;
        metrics.close();
        std::error_code ec;
        fs::resize_file(metrics_path, (uintmax_t)metrics_bytes, ec);  // no record cut mid-line
      }
    }
    if (!quiet) {
      const double eta = (total_steps - done) * elapsed / timed_steps;
      char line[256];
      std::snprintf(line, sizeof line, "step %ld/%ld | loss %.4f | lr %.2e | gnorm %.2f | %.0f tok/s | ETA %s", done,
                    total_steps, loss, cur_lr, norm, tps, format_duration(eta).c_str());
      std::string text = line + keep_text;
      if (ranks > 1) {
        char c[64];
        std::snprintf(c, sizeof c, " | %d ranks, comm %.0f%%", ranks, 100 * comm_s / dt);
        text += c;
      }
      if (m.contains("val_loss")) text += " | val " + std::to_string(res.val_loss).substr(0, 6);
      if (tty)
        std::fprintf(stderr, "\r%-100s%s", text.c_str(), m.contains("val_loss") || last ? "\n" : "");
      else if (done % log_every == 0 || last || m.contains("val_loss"))
        std::fprintf(stderr, "%s\n", text.c_str());
    }
    if ((o.ckpt_every > 0 && done % o.ckpt_every == 0) || last || stop) checkpoint(done);
    // No rank leaves before rank 0 has written the final checkpoint: a launcher ends the whole
    // job when the first rank exits with a non-zero code.
    if (last || stop) comm.barrier();
    // The run ends here: no next step's agreement will see the failed write.
    if ((last || stop) && root && metrics_failed) throw metrics_error(done, saved_text());
    if (stop && !last) {
      res.interrupted = true;
      if (!quiet)
        std::fprintf(stderr, "%sinterrupted: checkpoint saved to %s; continue with --resume %s\n", tty ? "\n" : "",
                     res.last_checkpoint.c_str(), run_dir.string().c_str());
      break;
    }
  }
  return res;
}

}  // namespace subllm
