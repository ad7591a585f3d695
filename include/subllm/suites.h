#pragma once
// The SUBLLM authors' other few-shot benchmarks: MMLU, BBH and AGIEval, read from the folder
// layouts of their eval_data download, prompted and scored as their fewshot_eval/fewshot.py
// and agieval_post_process_and_evaluation.py do (docs/EVAL.md has the rules).
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "subllm/eval.h"

namespace subllm {

enum class Suite { Mmlu, Bbh, Agieval };

// "mmlu", "bbh", "agieval"; anything else is an Error listing them.
Suite parse_suite(const std::string& name);
const char* suite_name(Suite suite);
// The authors' generation budget: 3 (MMLU), 1024 (BBH), 60 (AGIEval) new tokens.
int suite_max_new_tokens(Suite suite);

// An answer as the authors' code holds it: Python None, a string, or a list of strings
// (AGIEval's multiple-answer subsets).
struct SuiteAnswer {
  bool none = false;
  bool is_list = false;
  std::string text;
  std::vector<std::string> list;
  static SuiteAnswer of(std::string s) {
    SuiteAnswer a;
    a.text = std::move(s);
    return a;
  }
};

struct SuiteItem {
  std::string subject;  // MMLU subject, BBH task, AGIEval subset (the file name up to its first dot)
  std::string prompt;
  SuiteAnswer label;    // as scored: MMLU letter, BBH target (a letter for multiple-choice tasks)
  std::string where;    // file and row or line, for messages and --predictions
};

struct SuiteData {
  Suite suite = Suite::Mmlu;
  std::string setting;                // AGIEval: "zero-shot" or "few-shot"
  int shots = 0;                      // MMLU demonstrations per prompt
  std::vector<std::string> subjects;  // sorted
  std::vector<std::string> shared;    // per subject: text every prompt of it starts with
  std::vector<SuiteItem> items;       // subject by subject
};

struct SuiteLoadOptions {
  int shots = -1;                     // -1: the suite's default (MMLU 5, AGIEval 0); BBH takes none
  std::vector<std::string> subjects;  // empty: every subject found
};

// DIR is the suite's folder of the authors' eval_data: MMLU (or MMLU/data) with dev/ and
// test/, BBH with cot-prompts/ and bbh/, AGIEval (or its experiment_input) with zero-shot/
// and few-shot/. Errors name the file and row or line at fault.
SuiteData load_suite(Suite suite, const std::string& dir, const SuiteLoadOptions& options);

// ---------------------------------------------------------------------------------------
// MMLU

// A csv file as pandas.read_csv(path, header=None) hands its cells to the authors' prompt
// code: quoted fields, blank lines skipped, short rows filled with NaN, and each column
// typed as pandas types it (all integers: int; all numbers: float, printed as Python's
// repr, "1.0"; otherwise text), NaN and the default NA words ("", "NA", "None", "null", ...)
// printed as "nan".
std::vector<std::vector<std::string>> read_pandas_csv(const std::string& path);
// " high school biology" for high_school_biology (the leading space is theirs).
std::string mmlu_format_subject(const std::string& subject);
// A question row (question, choices..., answer) as "Q\nA. c1\n...\nAnswer:" (+ " X\n\n").
std::string mmlu_format_example(const std::vector<std::string>& row, bool include_answer);
// The header, the first `shots` dev rows with their answers, then the test question.
std::string mmlu_prompt(const std::string& subject, const std::vector<std::vector<std::string>>& dev, int shots,
                        const std::vector<std::string>& test_row);

// ---------------------------------------------------------------------------------------
// BBH

bool bbh_is_multiple_choice(const std::string& task);
// The worked examples of a cot-prompts file: the text between its first and second "-----\n".
std::string bbh_cot_prompt(const std::string& file_text, const std::string& path);
std::string bbh_prompt(const std::string& cot_prompt, const std::string& input);
// Their bbh_mcq_postprocess and bbh_freeform_postprocess.
std::string bbh_mcq_postprocess(std::string_view text);
std::string bbh_freeform_postprocess(std::string_view text);
// The answer scored for a generation: multiple-choice tasks take the mcq step, then all the
// free-form step.
std::string bbh_prediction(std::string_view generated, bool multiple_choice);
// Whether more generated text can no longer change bbh_prediction (generation may stop).
bool bbh_answer_settled(std::string_view generated, bool multiple_choice);

// ---------------------------------------------------------------------------------------
// AGIEval

// Their post_process(dataset, setting, prediction); throws Error for a few-shot subset
// their parser does not know.
SuiteAnswer agieval_post_process(const std::string& dataset, const std::string& setting, std::string_view prediction);
// Their parse_math_answer (zero- and few-shot settings); none when nothing was found.
SuiteAnswer agieval_parse_math_answer(std::string_view text);
// Their evaluate_single_sample: set equality, math equivalence or string equality.
bool agieval_is_correct(const std::string& dataset, const SuiteAnswer& prediction, const SuiteAnswer& label);
// hendrycks' math_equivalence: _strip_string; nullopt where their Python raises.
std::optional<std::string> math_strip_string(const std::string& s);
bool math_is_equiv(const SuiteAnswer& a, const SuiteAnswer& b);
// Whether a subset is scored as a multiple-answer, maths or single-letter problem.
bool agieval_known_subset(const std::string& dataset);

// ---------------------------------------------------------------------------------------
// Evaluation

struct SuiteOptions {
  int max_new_tokens = 0;  // 0: the suite's default
  EvalProgress progress;   // in items
};

struct SuiteItemResult {
  size_t item = 0;
  std::string generated;
  SuiteAnswer extracted;
  bool correct = false;
  int prompt_tokens = 0;
  bool truncated = false;  // the prompt lost its first tokens to fit the context
};

struct SuiteSubjectResult {
  std::string subject;
  int64_t correct = 0, total = 0;
  double accuracy = 0;  // percent
};

struct SuiteResult {
  Suite suite = Suite::Mmlu;
  std::string setting;
  int shots = 0;
  int max_new_tokens = 0;
  std::vector<SuiteSubjectResult> subjects;
  int64_t correct = 0, total = 0;
  double accuracy = 0;       // percent over all items, as the authors compute it
  double subject_mean = 0;   // percent, mean of the subjects' accuracies
  int64_t truncated = 0;
  double seconds = 0;
  std::vector<SuiteItemResult> items;
};

// Greedy decoding (the first maximum) from each prompt after the document-start token, until
// end of document or the token budget (or earlier where later text cannot change the
// extracted answer). A prompt longer than the context minus the budget loses its first
// tokens, as the authors' left truncation.
SuiteResult evaluate_suite(Model& model, const Tokenizer& tokenizer, const SuiteData& data,
                           const SuiteOptions& options);
// The extracted answer of a generation and whether it is right.
SuiteAnswer suite_extract(const SuiteData& data, const SuiteItem& item, std::string_view generated);
bool suite_correct(const SuiteData& data, const SuiteItem& item, const SuiteAnswer& extracted);

}  // namespace subllm
