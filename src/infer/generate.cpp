#include "subllm/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>
#include <numeric>

#include "subllm/error.h"
#include "subllm/checkpoint.h"

namespace subllm {

namespace fs = std::filesystem;

DType inference_dtype(const std::string& name, const std::string& flag) {
  if (name == "f32") return DType::F32;
  if (name == "bf16") return DType::BF16;
  if (name == "q8") return DType::Q8;
  throw Error(flag + " '" + name + "': the choices are f32, bf16 and q8");
}

std::string model_dir_dtype(const std::string& dir) {
  return weight_file_type((fs::path(dir) / "model.safetensors").string());
}

LoadedModel load_model_dir(const std::string& path, const std::string& device, const std::string& dtype,
                           const std::string& kv_dtype) {
  check(fs::exists(path), "model folder '" + path + "' does not exist");
  std::string dir = path;
  if (!fs::exists(fs::path(dir) / "model.safetensors") && fs::is_directory(dir)) {
    try {
      dir = find_checkpoint(path);
    } catch (const Error&) {
      throw Error("'" + path + "' is not a model folder: it needs config.json, model.safetensors and tokenizer.model "
                  "(a checkpoint folder of `subllm train`, or its run folder)");
    }
  }
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.model"})
    check(fs::exists(fs::path(dir) / f), "model folder '" + dir + "' has no " + f +
                                             ": it needs config.json, model.safetensors and tokenizer.model");
  ModelConfig cfg = load_config((fs::path(dir) / "config.json").string());
  Tokenizer tok = Tokenizer::load((fs::path(dir) / "tokenizer.model").string());
  check(tok.vocab_size() <= cfg.vocab_size,
        "model folder '" + dir + "': tokenizer.model has " + std::to_string(tok.vocab_size()) +
            " pieces but the model only " + std::to_string(cfg.vocab_size) + ": the files do not belong together");
  const std::string own = model_dir_dtype(dir);
  if (own != "f32" && !dtype.empty() && dtype != own)
    throw Error("model folder '" + dir + "' holds " + own + " weights (written by `subllm quantize`), which load only as " +
                "--dtype " + own + ": leave --dtype out, or give the fp32 model it was made from");
  const DType weight_type = inference_dtype(dtype.empty() ? own : dtype);
  const std::string weights_file = (fs::path(dir) / "model.safetensors").string();
  std::unique_ptr<Model> model;
  if (weight_type == DType::F32) {
    // For inference: mapped from the file where it can be (see Weights), else a copy.
    model = std::make_unique<Model>(cfg, device, weights_file);
  } else {
    model = std::make_unique<Model>(cfg, device);
    model->weights().set_weight_dtype(weight_type);
    model->load(weights_file);
  }
  if (!kv_dtype.empty()) model->set_kv_dtype(inference_dtype(kv_dtype, "--kv-dtype"));
  return LoadedModel{std::move(model), std::move(tok), dir};
}

std::vector<int32_t> Generator::prompt_tokens(const std::string& prompt, const GenerateOptions& opt) const {
  std::vector<int32_t> ids;
  if (opt.document_start) ids.push_back(tok_.eos_id());
  for (int32_t t : tok_.encode(prompt)) ids.push_back(t);
  check(!ids.empty(), "empty prompt: give some text (or keep the document-start token)");
  const int context = session_.weights().config().context;
  const int room = context - opt.max_new_tokens;
  check(room > 0, "-n " + std::to_string(opt.max_new_tokens) + " leaves no room for the prompt in the context of " +
                      std::to_string(context) + " tokens: generate fewer tokens");
  if ((int)ids.size() > room) {
    check(opt.truncate, "the prompt has " + std::to_string(ids.size()) + " tokens; with -n " +
                            std::to_string(opt.max_new_tokens) + " that exceeds the context of " +
                            std::to_string(context) + " tokens: shorten it, lower -n, or pass --truncate");
    ids.erase(ids.begin(), ids.end() - room);
  }
  return ids;
}

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// log softmax(row)[id] from one pass over the row: the max, then the sum of exponentials.
float log_softmax_at(const float* row, int V, int32_t id, float* log_sum_out = nullptr) {
  float mx = row[0];
  for (int i = 1; i < V; ++i) mx = std::max(mx, row[i]);
  double sum = 0;
  for (int i = 0; i < V; ++i) sum += std::exp((double)row[i] - mx);
  const float log_sum = mx + (float)std::log(sum);
  if (log_sum_out) *log_sum_out = log_sum;
  return row[id] - log_sum;
}

// The `k` likeliest tokens of a row with their log-probabilities, best first (ties by id).
std::vector<std::pair<int32_t, float>> top_of(const float* row, int V, int k, float log_sum) {
  k = std::min(k, V);
  std::vector<int32_t> idx(V);
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
  std::vector<std::pair<int32_t, float>> out;
  for (int i = 0; i < k; ++i) out.emplace_back(idx[i], row[idx[i]] - log_sum);
  return out;
}

}  // namespace

Decoding::Decoding(Session& session, const Tokenizer& tokenizer, std::vector<int32_t> prompt, const GenerateOptions& opt,
                   bool prompt_has_text)
    : session_(session),
      tok_(tokenizer),
      opt_(opt),
      prompt_(std::move(prompt)),
      cache_(session.new_cache((int)prompt_.size() + std::max(opt.max_new_tokens, 0))),
      sampler_(opt.sampling),
      decoder_(tokenizer),
      prompt_decoder_(tokenizer) {
  check(!prompt_.empty(), "empty prompt: give some text (or keep the document-start token)");
  const int subsamplers = session.weights().structure().num_subsamplers;
  check(opt_.keep_thresholds.empty() || (int)opt_.keep_thresholds.size() == subsamplers,
        "keep thresholds: " + std::to_string(opt_.keep_thresholds.size()) + " values for a model with " +
            std::to_string(subsamplers) + " subsamplers: give one per subsampler");
  if (prompt_has_text) decoder_.continue_text();
  history_ = prompt_;
  done_ = opt_.max_new_tokens <= 0;
}

Session::CachedStep Decoding::next_step(int max_chunk) {
  check(!done_, "Decoding::next_step: the sequence is finished");
  if (!started_) {
    start_ = Clock::now();
    started_ = true;
  }
  step_ = Session::CachedStep{};
  step_.cache = &cache_;
  if (prefilling()) {
    step_.tokens = prompt_.data() + fed_;
    step_.n = std::min((int)prompt_.size() - fed_, std::max(max_chunk, 1));
    step_.all_rows = opt_.prompt_logprobs;
  } else {
    step_.tokens = &history_.back();
    step_.n = 1;
  }
  if (!opt_.keep_thresholds.empty()) step_.keep_thresholds = opt_.keep_thresholds.data();
  if (opt_.record_depth) {
    depth_.assign(step_.n, 0);
    step_.depth = depth_.data();
  }
  return step_;
}

void Decoding::take_logits(float* logits) {
  const int V = session_.weights().config().vocab_size;
  if (prefilling()) {
    const int first = fed_;
    for (int r = 0; r < step_.n; ++r) {
      const int p = first + r;
      TokenRecord t;
      t.id = prompt_[p];
      t.text = prompt_decoder_.push(t.id);
      t.logprob = std::numeric_limits<float>::quiet_NaN();
      if (opt_.record_depth) t.depth = depth_[r];
      // Row r - 1 of this chunk predicted token p (rows are the chunk's own positions).
      if (opt_.prompt_logprobs && r > 0) {
        float log_sum = 0;
        t.logprob = log_softmax_at(logits + (size_t)(r - 1) * V, V, t.id, &log_sum);
        if (opt_.top_logprobs > 0) t.top = top_of(logits + (size_t)(r - 1) * V, V, opt_.top_logprobs, log_sum);
      } else if (opt_.prompt_logprobs && p > 0 && !logits_.empty()) {
        // The first token of a later chunk: the previous chunk's last row predicted it.
        float log_sum = 0;
        t.logprob = log_softmax_at(logits_.data(), V, t.id, &log_sum);
        if (opt_.top_logprobs > 0) t.top = top_of(logits_.data(), V, opt_.top_logprobs, log_sum);
      }
      prompt_records_.push_back(std::move(t));
    }
    fed_ += step_.n;
    const float* last = logits + (size_t)(step_rows() - 1) * V;
    logits_.assign(last, last + V);
    if (prefilling()) return;
    if (!prompt_records_.empty()) prompt_records_.back().text += prompt_decoder_.flush();
    stats_.prefill_s = since(start_);
    stats_.prompt_tokens = (int)prompt_.size();
    if (done_) return;
  } else {
    if (opt_.record_depth && !records_.empty()) records_.back().depth = depth_[0];
    logits_.assign(logits, logits + V);
  }
  const auto t0 = Clock::now();
  std::vector<float> raw;
  if (opt_.top_logprobs >= 0) raw = logits_;  // the sampler may change logits (repeat penalty)
  const int32_t id = sampler_.sample(logits_, history_);
  accept(id, raw.empty() ? nullptr : raw.data());
  if (stats_.generated_tokens == 1) {
    stats_.first_token_s = stats_.prefill_s + since(t0);
    decode_start_ = Clock::now();
  } else if (done_) {
    stats_.decode_s = since(decode_start_);
  }
  if (done_ && !stopped_) {
    const std::string rest = decoder_.flush();
    text_ += rest;
    if (!records_.empty()) records_.back().text += rest;
  }
}

// Takes the sampled token into the sequence: history, text, and whether generation ends
// (end of document, a stop string, or the token budget).
void Decoding::accept(int32_t id, const float* raw_logits) {
  const int V = session_.weights().config().vocab_size;
  history_.push_back(id);
  ++stats_.generated_tokens;
  TokenRecord t;
  t.id = id;
  t.logprob = std::numeric_limits<float>::quiet_NaN();
  if (raw_logits) {
    float log_sum = 0;
    t.logprob = log_softmax_at(raw_logits, V, id, &log_sum);
    if (opt_.top_logprobs > 0) t.top = top_of(raw_logits, V, opt_.top_logprobs, log_sum);
  }
  if (stats_.generated_tokens >= opt_.max_new_tokens) done_ = true;
  if (opt_.stop_at_eos && id == tok_.eos_id()) {
    done_ = eos_ = true;
    records_.push_back(std::move(t));
    return;
  }
  t.text = decoder_.push(id);
  text_ += t.text;
  records_.push_back(std::move(t));
  for (const auto& stop : opt_.stop)
    if (!stop.empty() && text_.find(stop) != std::string::npos) {
      text_.erase(text_.find(stop));
      done_ = stopped_ = true;
    }
}

std::string Decoding::take_text() {
  size_t safe = text_.size();
  if (!done_)
    for (const auto& stop : opt_.stop)
      for (size_t k = std::min(stop.size() - 1, text_.size()); k > 0; --k)
        if (text_.compare(text_.size() - k, k, stop, 0, k) == 0) {
          safe = std::min(safe, text_.size() - k);
          break;
        }
  if (safe <= shown_) return "";
  std::string out = text_.substr(shown_, safe - shown_);
  shown_ = safe;
  return out;
}

GenerateStats Decoding::stats() const {
  GenerateStats s = stats_;
  const ModelConfig& mc = session_.weights().config();
  for (size_t j = 0; j < cache_.seen.size(); ++j)
    s.retention.push_back(cache_.seen[j] ? (double)cache_.kept[j] / cache_.seen[j] : 0.0);
  s.kv_cache_bytes = cache_.bytes();
  s.kv_cache_bytes_llama = 2 * cache_.element_bytes * (size_t)mc.n_layers * cache_.length * mc.kv_dim();
  return s;
}

std::vector<std::string> Generator::generate_interleaved(const std::vector<std::string>& prompts, const GenerateOptions& opt,
                                                   std::vector<GenerateStats>* stats) {
  std::vector<std::unique_ptr<Decoding>> seqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateOptions oi = opt;
    oi.sampling.seed = opt.sampling.seed + i;
    seqs.push_back(std::make_unique<Decoding>(session_, tok_, prompt_tokens(prompts[i], opt), oi, !prompts[i].empty()));
  }
  const int V = session_.weights().config().vocab_size;
  const int context = session_.weights().config().context;
  std::vector<float> logits;
  for (;;) {
    std::vector<Session::CachedStep> steps;
    std::vector<Decoding*> stepped;
    size_t rows = 0;
    for (auto& d : seqs)
      if (!d->done()) {
        steps.push_back(d->next_step(context));
        stepped.push_back(d.get());
        rows += d->step_rows();
      }
    if (steps.empty()) break;
    logits.resize(rows * V);
    session_.forward_cached_batch(steps, logits.data());
    float* row = logits.data();
    for (Decoding* d : stepped) {
      const int r = d->step_rows();
      d->take_logits(row);
      row += (size_t)r * V;
    }
  }
  std::vector<std::string> out;
  if (stats) stats->clear();
  for (auto& d : seqs) {
    out.push_back(d->text());
    if (stats) stats->push_back(d->stats());
  }
  return out;
}

std::string Generator::generate(const std::string& prompt, const GenerateOptions& opt,
                                const std::function<void(const std::string&)>& on_text, GenerateStats* stats) {
  Decoding d(session_, tok_, prompt_tokens(prompt, opt), opt, !prompt.empty());
  const int V = session_.weights().config().vocab_size;
  std::vector<float> logits;
  while (!d.done()) {
    const Session::CachedStep step = d.next_step(session_.weights().config().context);
    logits.resize((size_t)d.step_rows() * V);
    session_.forward_cached_batch({step}, logits.data());
    d.take_logits(logits.data());
    const std::string piece = d.take_text();
    if (on_text && !piece.empty()) on_text(piece);
  }
  if (stats) *stats = d.stats();
  return d.text();
}

}  // namespace subllm
