#include "subllm/generate.h"

#include <chrono>
#include <filesystem>

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
  auto model = std::make_unique<Model>(cfg, device);
  const std::string own = model_dir_dtype(dir);
  if (own != "f32" && !dtype.empty() && dtype != own)
    throw Error("model folder '" + dir + "' holds " + own + " weights (written by `subllm quantize`), which load only as " +
                "--dtype " + own + ": leave --dtype out, or give the fp32 model it was made from");
  model->weights().set_weight_dtype(inference_dtype(dtype.empty() ? own : dtype));
  if (!kv_dtype.empty()) model->set_kv_dtype(inference_dtype(kv_dtype, "--kv-dtype"));
  model->load((fs::path(dir) / "model.safetensors").string());
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

// The state of one sequence being generated.
struct Stream {
  SequenceCache cache;
  std::vector<int32_t> history;
  std::vector<float> logits;
  Sampler sampler;
  StreamDecoder decoder;
  std::string text;
  bool done = false;
  bool stopped = false;  // a stop string ended it: the text after it is dropped
  GenerateStats stats;
  Stream(SequenceCache c, SamplingOptions s, const Tokenizer& t) : cache(std::move(c)), sampler(s), decoder(t) {}
};

// Takes the sampled token into the stream: history, text, and whether generation ends
// (end of document, a stop string, or the token budget).
void accept(Stream& s, int32_t id, const GenerateOptions& opt, int eos) {
  s.history.push_back(id);
  ++s.stats.generated_tokens;
  if (s.stats.generated_tokens >= opt.max_new_tokens) s.done = true;
  if (opt.stop_at_eos && id == eos) {
    s.done = true;
    return;
  }
  s.text += s.decoder.push(id);
  for (const auto& stop : opt.stop)
    if (!stop.empty() && s.text.find(stop) != std::string::npos) {
      s.text.erase(s.text.find(stop));
      s.done = s.stopped = true;
    }
}

// Prompt processing: fills the cache and leaves the next-token logits in s.logits.
void prefill(Session& m, Stream& s, const std::vector<int32_t>& ids, bool prompt_has_text) {
  if (prompt_has_text) s.decoder.continue_text();
  const auto t0 = Clock::now();
  s.logits.assign(m.weights().config().vocab_size, 0.f);
  m.forward_cached(s.cache, ids.data(), (int)ids.size(), s.logits.data(), false);
  s.stats.prefill_s = since(t0);
  s.stats.prompt_tokens = (int)ids.size();
  s.history = ids;
}

void finish_stats(Stream& s, const ModelConfig& mc) {
  const auto& c = s.cache;
  s.stats.retention.clear();
  for (size_t j = 0; j < c.seen.size(); ++j) s.stats.retention.push_back(c.seen[j] ? (double)c.kept[j] / c.seen[j] : 0.0);
  s.stats.kv_cache_bytes = c.bytes();
  s.stats.kv_cache_bytes_llama = 2 * sizeof(float) * (size_t)mc.n_layers * c.length * mc.dim;
}

}  // namespace

std::vector<std::string> Generator::generate_interleaved(const std::vector<std::string>& prompts, const GenerateOptions& opt,
                                                   std::vector<GenerateStats>* stats) {
  std::vector<std::unique_ptr<Stream>> streams;
  for (size_t i = 0; i < prompts.size(); ++i) {
    SamplingOptions so = opt.sampling;
    so.seed = opt.sampling.seed + i;
    streams.push_back(std::make_unique<Stream>(session_.new_cache(), so, tok_));
  }
  // Prefill every prompt and sample its first token; then one token per prompt per round.
  std::vector<Clock::time_point> decode_start(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    Stream& s = *streams[i];
    prefill(session_, s, prompt_tokens(prompts[i], opt), !prompts[i].empty());
    if (opt.max_new_tokens <= 0) {
      s.done = true;
      continue;
    }
    const auto t0 = Clock::now();
    accept(s, s.sampler.sample(s.logits, s.history), opt, tok_.eos_id());
    s.stats.first_token_s = s.stats.prefill_s + since(t0);
    decode_start[i] = Clock::now();
  }
  for (bool any = true; any;) {
    any = false;
    for (size_t i = 0; i < streams.size(); ++i) {
      Stream& s = *streams[i];
      if (s.done) continue;
      any = true;
      session_.forward_cached(s.cache, &s.history.back(), 1, s.logits.data(), false);
      accept(s, s.sampler.sample(s.logits, s.history), opt, tok_.eos_id());
      if (s.done) s.stats.decode_s = since(decode_start[i]);
    }
  }
  std::vector<std::string> out;
  if (stats) stats->clear();
  for (auto& sp : streams) {
    Stream& s = *sp;
    if (!s.stopped) s.text += s.decoder.flush();
    finish_stats(s, session_.weights().config());
    out.push_back(s.text);
    if (stats) stats->push_back(s.stats);
  }
  return out;
}

std::string Generator::generate(const std::string& prompt, const GenerateOptions& opt,
                                const std::function<void(const std::string&)>& on_text, GenerateStats* stats) {
  const std::vector<int32_t> ids = prompt_tokens(prompt, opt);
  Stream s(session_.new_cache((int)ids.size() + opt.max_new_tokens), opt.sampling, tok_);
  prefill(session_, s, ids, !prompt.empty());
  // Text is held back while it could still be the start of a stop string.
  size_t shown = 0;
  auto show = [&](bool final) {
    size_t safe = s.text.size();
    if (!final)
      for (const auto& stop : opt.stop)
        for (size_t k = std::min(stop.size() - 1, s.text.size()); k > 0; --k)
          if (s.text.compare(s.text.size() - k, k, stop, 0, k) == 0) {
            safe = std::min(safe, s.text.size() - k);
            break;
          }
    if (on_text && safe > shown) on_text(s.text.substr(shown, safe - shown));
    shown = std::max(shown, safe);
  };
  s.done = opt.max_new_tokens <= 0;
  Clock::time_point decode_start;
  while (!s.done) {
    const auto ts = Clock::now();
    if (s.stats.generated_tokens > 0) session_.forward_cached(s.cache, &s.history.back(), 1, s.logits.data(), false);
    accept(s, s.sampler.sample(s.logits, s.history), opt, tok_.eos_id());
    if (s.stats.generated_tokens == 1) {
      s.stats.first_token_s = s.stats.prefill_s + since(ts);
      decode_start = Clock::now();
    }
    show(false);
  }
  if (s.stats.generated_tokens > 1) s.stats.decode_s = since(decode_start);
  if (!s.stopped) s.text += s.decoder.flush();
  show(true);
  finish_stats(s, session_.weights().config());
  if (stats) *stats = s.stats;
  return s.text;
}

}  // namespace subllm
