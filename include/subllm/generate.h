#pragma once
// Text generation: load a model folder, prefill prompts, decode token by token with the
// key/value cache, stream text as it completes.
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
  // Several prompts interleaved, one token each per round (one sequence per forward pass);
  // prompt i samples with seed `seed + i`, so the results equal generate() of each prompt
  // with that seed.
  std::vector<std::string> generate_interleaved(const std::vector<std::string>& prompts, const GenerateOptions& opt,
                                          std::vector<GenerateStats>* stats = nullptr);
  // The token ids a prompt becomes (with the document-start token and truncation applied).
  std::vector<int32_t> prompt_tokens(const std::string& prompt, const GenerateOptions& opt) const;

 private:
  Session& session_;
  const Tokenizer& tok_;
};

}  // namespace subllm
