#pragma once
// Text generation: load a model folder, prefill prompts, decode token by token with the
// key/value cache, stream text as it completes.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "subllm/model.h"
#include "subllm/sampler.h"
#include "subllm/tokenizer.h"

namespace subllm {

struct LoadedModel {
  std::unique_ptr<Model> model;
  Tokenizer tokenizer;
  std::string dir;  // the folder the files came from
};

// A model folder holds config.json, model.safetensors and tokenizer.model (a checkpoint of
// `subllm train`); a run folder resolves to its newest checkpoint. Errors name the missing
// or inconsistent file.
// `device` names the backend the weights are loaded to ("cpu").
//
// `dtype` is the inference weight type, "f32", "bf16" or "q8" (Weights::set_weight_dtype); empty:
// the folder's own (the type `subllm quantize` wrote, else f32). A typed folder loads only as its
// own type. `kv_dtype` ("f32", "bf16"; empty: the compute dtype) is the sessions' cache dtype.
LoadedModel load_model_dir(const std::string& path, const std::string& device = "cpu", const std::string& dtype = "",
                           const std::string& kv_dtype = "");
// "f32", "bf16", "q8" as a DType; anything else is an Error naming `flag` and the choices.
DType inference_dtype(const std::string& name, const std::string& flag = "--dtype");
// The inference weight type a model folder's model.safetensors holds ("f32" unless typed).
std::string model_dir_dtype(const std::string& dir);

struct GenerateOptions {
  int max_new_tokens = 128;
  SamplingOptions sampling;
  std::vector<std::string> stop;  // stop after any of these strings appears in the output
  bool stop_at_eos = true;
  bool truncate = false;          // drop the start of a prompt that does not fit, instead of an error
  // Every document in training data follows an end-of-document token, so a prompt starts
  // with one (an empty prompt then generates a fresh document).
  bool document_start = true;
  // SUBLLM: this sequence's keep threshold per subsampler (empty: the session's knobs).
  std::vector<float> keep_thresholds;
  // Per generated token: its log-probability and the `top_logprobs` likeliest alternatives
  // (< 0: none recorded). `prompt_logprobs` also scores every prompt token after the first.
  int top_logprobs = -1;
  bool prompt_logprobs = false;
  bool record_depth = false;  // per token: how deep it went through the subsamplers
};

struct GenerateStats {
  int prompt_tokens = 0;
  int generated_tokens = 0;
  double prefill_s = 0;         // prompt processing
  double first_token_s = 0;     // prompt processing + the first sampled token
  double decode_s = 0;          // every later token
  std::vector<double> retention;  // kept fraction per subsampler over the whole sequence
  size_t kv_cache_bytes = 0;
  size_t kv_cache_bytes_llama = 0;  // what every block caching every token would hold
  double prefill_tokens_per_s() const { return prefill_s > 0 ? prompt_tokens / prefill_s : 0; }
  double decode_tokens_per_s() const { return decode_s > 0 ? (generated_tokens - 1) / decode_s : 0; }
};

// One token of a sequence, prompt or generated, as a client sees it.
struct TokenRecord {
  int32_t id = 0;
  std::string text;  // the text this token completed (may be empty inside a UTF-8 character)
  float logprob = 0;  // log-probability under the model (NaN: not scored, e.g. the first token)
  std::vector<std::pair<int32_t, float>> top;  // the likeliest alternatives, best first
  int depth = -1;     // subsamplers that kept it on its deepest path (-1: not recorded)
};

// The decoding state of one sequence: its prompt, key/value cache, sampler (with its seed),
// stop strings, the text streamed so far and statistics. generate(), generate_interleaved()
// and the server step it the same way: next_step() is what the sequence feeds the next
// (batched) pass, take_logits() takes what the pass returned for it and samples.
class Decoding {
 public:
  // `prompt`: token ids as Generator::prompt_tokens gives them; `prompt_has_text`: the
  // generated text continues shown text (a leading word-start mark is a space).
  Decoding(Session& session, const Tokenizer& tokenizer, std::vector<int32_t> prompt, const GenerateOptions& opt,
           bool prompt_has_text);
  Decoding(const Decoding&) = delete;
  Decoding& operator=(const Decoding&) = delete;

  // The step for the next pass: up to `max_chunk` more prompt tokens while prefilling (a
  // long prompt in chunks), else the last sampled token. Valid until take_logits().
  Session::CachedStep next_step(int max_chunk);
  // Logit rows the step writes: its n when prompt log-probabilities are wanted, else 1.
  int step_rows() const { return step_.all_rows ? step_.n : 1; }
  // The pass's logits for this step (step_rows() x V); samples once the prompt is in.
  void take_logits(float* logits);

  bool prefilling() const { return fed_ < (int)prompt_.size(); }
  bool done() const { return done_; }
  // Text settled since the last call: never half a UTF-8 character, never what could still
  // become a stop string (everything once done()).
  std::string take_text();
  const std::string& text() const { return text_; }
  // Tokens recorded so far (prompt tokens once their prefill ran, then generated ones).
  const std::vector<TokenRecord>& prompt_records() const { return prompt_records_; }
  const std::vector<TokenRecord>& records() const { return records_; }
  bool stopped_by_string() const { return stopped_; }
  bool ended_by_eos() const { return eos_; }
  // Statistics, with retention and cache sizes as of now.
  GenerateStats stats() const;

 private:
  void accept(int32_t id, const float* logits);

  Session& session_;
  const Tokenizer& tok_;
  GenerateOptions opt_;
  std::vector<int32_t> prompt_, history_;
  SequenceCache cache_;
  Sampler sampler_;
  StreamDecoder decoder_, prompt_decoder_;
  Session::CachedStep step_;
  std::vector<uint8_t> depth_;
  std::vector<float> logits_;
  std::vector<TokenRecord> prompt_records_, records_;
  std::string text_;
  size_t shown_ = 0;
  int fed_ = 0;  // prompt tokens in the cache
  bool done_ = false, stopped_ = false, eos_ = false;
  GenerateStats stats_;
  std::chrono::steady_clock::time_point start_, decode_start_;
  bool started_ = false;
};

// Generates with one Session: its knobs (keep thresholds) and workspace. Generators on
// different Sessions of one Weights may run on different threads at once.
class Generator {
 public:
  Generator(Session& session, const Tokenizer& tokenizer) : session_(session), tok_(tokenizer) {}
  Generator(Model& model, const Tokenizer& tokenizer) : Generator(model.session(), tokenizer) {}
  // Generates a continuation of `prompt`; `on_text` (optional) receives text as it completes,
  // never splitting a UTF-8 character. Returns the generated text.
  std::string generate(const std::string& prompt, const GenerateOptions& opt,
                       const std::function<void(const std::string&)>& on_text = nullptr,
                       GenerateStats* stats = nullptr);
  // Several prompts at once: each round is one batched pass (Session::forward_cached_batch)
  // of every unfinished prompt, a whole prompt's prefill or one token; prompt i samples with
  // seed `seed + i`, so the results equal generate() of each prompt with that seed.
  std::vector<std::string> generate_interleaved(const std::vector<std::string>& prompts, const GenerateOptions& opt,
                                          std::vector<GenerateStats>* stats = nullptr);
  // The token ids a prompt becomes (with the document-start token and truncation applied).
  std::vector<int32_t> prompt_tokens(const std::string& prompt, const GenerateOptions& opt) const;

 private:
  Session& session_;
  const Tokenizer& tok_;
};

}  // namespace subllm
