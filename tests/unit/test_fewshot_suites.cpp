// MMLU, BBH and AGIEval in the authors' folder layouts: prompts byte for byte against the
// format of their fewshot.py, their answer extraction and MATH equivalence on tables of model
// outputs, clear errors for bad data, and one CLI run per suite on a tiny trained model.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "subllm/error.h"
#include "subllm/suites.h"
#include "test_util.h"

namespace subllm {
namespace fewshot_suites_tests {

using testing::error_of;
using testing::read_all;
using testing::TempDir;
using testing::write_file;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------
// Layouts written by the tests

// MMLU/data/{dev,test}: quoted fields with commas, doubled quotes and a CRLF file with a
// blank line; a numeric choice column and a "None" cell, which pandas types.
void write_mmlu(const TempDir& tmp) {
  fs::create_directories(tmp.path() / "MMLU/data/dev");
  fs::create_directories(tmp.path() / "MMLU/data/test");
  write_file(tmp.file("MMLU/data/dev/high_school_biology_dev.csv"),
             "\"Which organelle makes ATP, mostly?\",Nucleus,Mitochondrion,Ribosome,\"\"\"Golgi\"\" body\",B\r\n"
             "\r\n"
             "What is 2 + 2?,3,4,5,22,B\r\n"
             "Unused third row,a,b,c,d,A\r\n");
  write_file(tmp.file("MMLU/data/test/high_school_biology_test.csv"),
             "Cells divide by:,mitosis,osmosis,5,None,A\n"
             "\"Pick, one\",x,y,7.5,z,C\n");
  write_file(tmp.file("MMLU/data/dev/anatomy_dev.csv"), "Bone?,femur,lung,heart,skin,A\nMuscle?,femur,lung,heart,skin,D\n");
  write_file(tmp.file("MMLU/data/test/anatomy_test.csv"), "Organ?,femur,lung,heart,skin,B\n");
}

const char* kBbhCot =
    "BIG-Bench canary: do not train on this.\n"
    "-----\n"
    "Infer the date from context.\n\n"
    "Q: Today is 9/7. What is the date tomorrow?\nOptions:\n(A) 9/8\n(B) 9/6\n"
    "A: Let's think step by step.\nTomorrow is one day later. So the answer is (A).";

void write_bbh(const TempDir& tmp) {
  fs::create_directories(tmp.path() / "BBH/cot-prompts");
  fs::create_directories(tmp.path() / "BBH/bbh");
  write_file(tmp.file("BBH/cot-prompts/date_understanding.txt"), kBbhCot);
  write_file(tmp.file("BBH/bbh/date_understanding.json"),
             R"J({"canary": "x", "examples": [{"input": "Yesterday was 1/1. What is today?\nOptions:\n(A) 1/2\n(B) 1/3", "target": "(A)"}]})J");
  write_file(tmp.file("BBH/cot-prompts/boolean_expressions.txt"),
             "canary\n-----\nEvaluate the expression.\n\nQ: True and False is\nA: Let's think step by step.\n"
             "So the answer is False.");
  write_file(tmp.file("BBH/bbh/boolean_expressions.json"),
             R"J({"examples": [{"input": "not False is", "target": "True"}, {"input": "True or False is", "target": "True"}]})J");
}

void write_agieval(const TempDir& tmp) {
  fs::create_directories(tmp.path() / "AGIEval/experiment_input/zero-shot");
  fs::create_directories(tmp.path() / "AGIEval/experiment_input/few-shot");
  write_file(tmp.file("AGIEval/experiment_input/zero-shot/lsat-ar.jsonl"),
             R"J({"context": "Q: Which one is first? Answer Choices: (A)x (B)y (C)z\nA: Among A through E, the answer is", "metadata": 0, "label": "C"})J"
             "\n"
             R"J({"context": "Q: Which one is last? Answer Choices: (A)x (B)y\nA: Among A through E, the answer is", "metadata": 1, "label": "A"})J"
             "\n");
  write_file(tmp.file("AGIEval/experiment_input/zero-shot/jec-qa-kd.jsonl"),
             R"J({"context": "问题：哪些正确？ 选项：(A)甲 (B)乙 (C)丙\n答案：从A到D, 我们应选择", "label": ["A", "C"]})J"
             "\n");
  write_file(tmp.file("AGIEval/experiment_input/zero-shot/math.jsonl"),
             R"J({"context": "Q: What is 1/2 + 1/4?\nA: The answer is", "label": "\\frac{3}{4}"})J"
             "\n");
  write_file(tmp.file("AGIEval/experiment_input/few-shot/sat-math.jsonl"),
             R"J({"context": "Here are the answers for the problems in the exam.\nProblem 1.   2+2=? Choose from the following options:    (A)3 (B)4\nThe answer is therefore B\n\nProblem 2.   1+2=? Choose from the following options:    (A)3 (B)4\n", "label": "A"})J"
             "\n");
}

// ---------------------------------------------------------------------------------------
// Prompts

TEST(SuitePrompt, MmluMatchesTheirFormatByteForByte) {
  TempDir tmp("suite_mmlu");
  write_mmlu(tmp);
  SuiteLoadOptions o;
  o.shots = 2;
  const SuiteData d = load_suite(Suite::Mmlu, tmp.file("MMLU/data"), o);
  ASSERT_EQ(d.subjects, (std::vector<std::string>{"anatomy", "high_school_biology"}));
  ASSERT_EQ(d.items.size(), 3u);
  const SuiteItem& it = d.items[1];
  EXPECT_EQ(it.subject, "high_school_biology");
  // The subject's words each after a space, so "about" is followed by two; the numeric
  // column (5, 7.5) is float to pandas, the "None" cell NaN.
  EXPECT_EQ(it.prompt,
            "The following are multiple choice questions (with answers) about  high school biology.\n\n"
            "Which organelle makes ATP, mostly?\nA. Nucleus\nB. Mitochondrion\nC. Ribosome\nD. \"Golgi\" body\n"
            "Answer: B\n\n"
            "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer: B\n\n"
            "Cells divide by:\nA. mitosis\nB. osmosis\nC. 5.0\nD. nan\nAnswer:");
  EXPECT_EQ(it.label.text, "A");
  const std::string end = "D. 22\nAnswer: B\n\nPick, one\nA. x\nB. y\nC. 7.5\nD. z\nAnswer:";
  EXPECT_EQ(d.items[2].prompt.substr(d.items[2].prompt.size() - end.size()), end);
  EXPECT_EQ(d.items[2].label.text, "C");
  // The default is their five shots; the anatomy dev file has two rows.
  EXPECT_NE(error_of([&] { load_suite(Suite::Mmlu, tmp.file("MMLU"), {}); }).find("has only 2 rows"),
            std::string::npos);
  SuiteLoadOptions one;
  one.subjects = {"anatomy"};
  one.shots = 0;
  const SuiteData a = load_suite(Suite::Mmlu, tmp.file("MMLU"), one);
  ASSERT_EQ(a.items.size(), 1u);
  EXPECT_EQ(a.items[0].prompt,
            "The following are multiple choice questions (with answers) about  anatomy.\n\n"
            "Organ?\nA. femur\nB. lung\nC. heart\nD. skin\nAnswer:");
}

TEST(SuitePrompt, PandasCellsPrintAsTheirPromptCodeSeesThem) {
  TempDir tmp("suite_csv");
  write_file(tmp.file("a.csv"),
             "q1,007,1,True,1e-5,NA,\"multi\nline\"\n"
             " \t\n"
             "q2,-3,2.50,false,100000000000000000000,x\n");
  const auto rows = read_pandas_csv(tmp.file("a.csv"));
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0], (std::vector<std::string>{"q1", "7", "1.0", "True", "1e-05", "nan", "multi\nline"}));
  EXPECT_EQ(rows[1], (std::vector<std::string>{"q2", "-3", "2.5", "False", "1e+20", "x", "nan"}));
}

TEST(SuitePrompt, BbhMatchesTheirFormatByteForByte) {
  TempDir tmp("suite_bbh");
  write_bbh(tmp);
  const SuiteData d = load_suite(Suite::Bbh, tmp.file("BBH"), {});
  ASSERT_EQ(d.subjects, (std::vector<std::string>{"boolean_expressions", "date_understanding"}));
  ASSERT_EQ(d.items.size(), 3u);
  EXPECT_EQ(d.items[2].prompt,
            "Follow the given examples and answer the question.\n"
            "Infer the date from context.\n\n"
            "Q: Today is 9/7. What is the date tomorrow?\nOptions:\n(A) 9/8\n(B) 9/6\n"
            "A: Let's think step by step.\nTomorrow is one day later. So the answer is (A).\n\n"
            "Q:Yesterday was 1/1. What is today?\nOptions:\n(A) 1/2\n(B) 1/3\nA: Let's think step by step.");
  EXPECT_EQ(d.items[2].label.text, "A");  // "(A)" through their mcq post-processing
  EXPECT_EQ(d.items[0].label.text, "True");
  EXPECT_EQ(d.items[0].prompt.substr(0, 52), "Follow the given examples and answer the question.\nE");
}

TEST(SuitePrompt, AgievalPromptIsTheContextOfTheirExperimentInput) {
  TempDir tmp("suite_agieval");
  write_agieval(tmp);
  const SuiteData z = load_suite(Suite::Agieval, tmp.file("AGIEval"), {});
  EXPECT_EQ(z.setting, "zero-shot");
  ASSERT_EQ(z.subjects, (std::vector<std::string>{"jec-qa-kd", "lsat-ar", "math"}));
  ASSERT_EQ(z.items.size(), 4u);
  EXPECT_EQ(z.items[1].prompt,
            "Q: Which one is first? Answer Choices: (A)x (B)y (C)z\nA: Among A through E, the answer is");
  EXPECT_EQ(z.items[1].label.text, "C");
  EXPECT_TRUE(z.items[0].label.is_list);
  EXPECT_EQ(z.items[0].label.list, (std::vector<std::string>{"A", "C"}));
  SuiteLoadOptions few;
  few.shots = 3;  // any positive count reads their few-shot folder
  const SuiteData f = load_suite(Suite::Agieval, tmp.file("AGIEval/experiment_input"), few);
  EXPECT_EQ(f.setting, "few-shot");
  ASSERT_EQ(f.items.size(), 1u);
  EXPECT_EQ(f.items[0].subject, "sat-math");
  EXPECT_EQ(f.items[0].prompt.substr(0, 52), "Here are the answers for the problems in the exam.\nP");

  // Their subset is the file name up to its first dot: a second file adds to it.
  write_file(tmp.file("AGIEval/experiment_input/zero-shot/math.part2.jsonl"),
             "{\"context\": \"Q: 2+2?\\nA: The answer is\", \"label\": \"4\"}\n");
  const SuiteData more = load_suite(Suite::Agieval, tmp.file("AGIEval"), {});
  EXPECT_EQ(more.subjects, z.subjects);
  ASSERT_EQ(more.items.size(), 5u);
  EXPECT_EQ(more.items[4].subject, "math");
  EXPECT_EQ(more.items[4].label.text, "4");
}

// ---------------------------------------------------------------------------------------
// Answers

TEST(SuiteAnswers, MmluTakesTheFirstLineStripped) {
  TempDir tmp("suite_mmlu_ans");
  write_mmlu(tmp);
  SuiteLoadOptions o;
  o.shots = 0;
  const SuiteData d = load_suite(Suite::Mmlu, tmp.file("MMLU"), o);
  const SuiteItem& it = d.items[1];  // label A
  const std::vector<std::pair<std::string, bool>> table = {
      {" A", true}, {" A\n\nQuestion", true}, {"\n A ", true}, {" A.", false}, {" a", false}, {"", false}, {" B", false}};
  for (const auto& [out, right] : table) EXPECT_EQ(suite_correct(d, it, suite_extract(d, it, out)), right) << out;
}

TEST(SuiteAnswers, BbhExtractionAsTheirPostProcessing) {
  const std::vector<std::pair<std::string, std::string>> mc = {
      {"Tomorrow is 1/2. So the answer is (A).", "A"},
      {"So the answer is (C). Later the answer is (A).", "C"},
      {"So the answer is B because", "B"},
      {"So the answer is (E)\n\nQ: next", "E"},
      {"The cat sat", "T"},
      {"no capitals here.", "no capitals here"},
      {"the answer is  none of them.\nmore", "none of them"},
      {"", ""}};
  for (const auto& [out, want] : mc) EXPECT_EQ(bbh_prediction(out, true), want) << out;
  const std::vector<std::pair<std::string, std::string>> free = {
      {"not False is True. So the answer is True.\n\nQ: x", "True"},
      {"So the answer is 24.", "24"},
      {"answer is \n valid\nmore", "valid"},
      {"So the answer is 3.. ", "3."},
      {"So the answer is (A).", "(A)"},
      {"no phrase.\nsecond", "no phrase"},
      {"the answer is x the answer is y", "x the"}};
  for (const auto& [out, want] : free) EXPECT_EQ(bbh_prediction(out, false), want) << out;
  EXPECT_EQ(bbh_mcq_postprocess("(B)"), "B");
  EXPECT_EQ(bbh_freeform_postprocess("valid"), "valid");
}

TEST(SuiteAnswers, BbhStopsOnlyOnceTheAnswerCannotChange) {
  EXPECT_FALSE(bbh_answer_settled("Let us think.", true));
  EXPECT_FALSE(bbh_answer_settled("So the answer is (", true));
  EXPECT_FALSE(bbh_answer_settled("So the answer is B", true));  // a later "(C" would win
  EXPECT_TRUE(bbh_answer_settled("So the answer is (B", true));
  EXPECT_TRUE(bbh_answer_settled("the answer is x. the answer is ", true));
  EXPECT_FALSE(bbh_answer_settled("So the answer is True", false));
  EXPECT_FALSE(bbh_answer_settled("So the answer is \n", false));
  EXPECT_TRUE(bbh_answer_settled("So the answer is True.\n", false));
  // Their strip keeps "x " when text follows the line and drops the space when none does.
  EXPECT_FALSE(bbh_answer_settled("So the answer is x \n", false));
  EXPECT_EQ(bbh_prediction("So the answer is x \n", false), "x");
  EXPECT_EQ(bbh_prediction("So the answer is x \nmore", false), "x ");
  // Where it says stop, the answer equals the one of any longer output.
  for (const std::string& tail : {std::string(""), std::string(" (D) the answer is (E)\nZ")}) {
    EXPECT_EQ(bbh_prediction("So the answer is (B" + tail, true), "B");
    EXPECT_EQ(bbh_prediction("So the answer is True.\n" + tail, false), "True");
  }
}

TEST(SuiteAnswers, AgievalPostProcessAsTheirs) {
  struct Row {
    std::string dataset, setting, output;
    std::string want;
  };
  const std::vector<Row> single = {
      {"lsat-ar", "zero-shot", " (C)", "C"},
      {"lsat-ar", "zero-shot", " Based on the passage, D", "B"},  // the first capital A-F
      {"lsat-ar", "zero-shot", " none", ""},
      {"lsat-ar", "zero-shot", " G", ""},
      {"sat-math", "few-shot", "so the answer is C", "C"},
      {"sat-math", "few-shot", "The answer is therefore G", "G"},
      {"sat-math", "few-shot", "the answer is\nD", "D"},  // not on the phrase's line: the first capital
      {"sat-math", "few-shot", "the answer is x\nthe answer is E", "E"},
      {"logiqa-zh", "few-shot", "\xE7\xAD\x94\xE6\xA1\x88\xE6\x98\xAF B", "B"},
      {"new-subset", "zero-shot", "(E)", "E"}};
  for (const auto& r : single) {
    const SuiteAnswer a = agieval_post_process(r.dataset, r.setting, r.output);
    EXPECT_FALSE(a.is_list);
    EXPECT_EQ(a.text, r.want) << r.dataset << " " << r.output;
  }
  const SuiteAnswer multi = agieval_post_process("jec-qa-kd", "zero-shot", "(A)(D) and F, not G");
  EXPECT_TRUE(multi.is_list);
  EXPECT_EQ(multi.list, (std::vector<std::string>{"A", "D", "F"}));
  EXPECT_NE(error_of([] { agieval_post_process("new-subset", "few-shot", "A"); }).find("new-subset"),
            std::string::npos);

  SuiteAnswer list;
  list.is_list = true;
  list.list = {"C", "A", "C"};
  SuiteAnswer label;
  label.is_list = true;
  label.list = {"A", "C"};
  EXPECT_TRUE(agieval_is_correct("jec-qa-ca", list, label));
  list.list = {"A"};
  EXPECT_TRUE(agieval_is_correct("jec-qa-ca", list, SuiteAnswer::of("A")));
  EXPECT_FALSE(agieval_is_correct("jec-qa-ca", list, label));
  EXPECT_TRUE(agieval_is_correct("lsat-ar", SuiteAnswer::of("B"), SuiteAnswer::of("B")));
  EXPECT_FALSE(agieval_is_correct("lsat-ar", SuiteAnswer::of(""), SuiteAnswer::of("B")));
}

TEST(SuiteAnswers, MathAnswerParsingAsTheirs) {
  const std::vector<std::pair<std::string, std::string>> table = {
      {"The answer is therefore $\\frac{1}{2}$", "\\frac{1}{2}"},
      {"so \\boxed{x = 5}.", "5"},
      {"first \\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"},
      {"$5$ and $x=7$ total", "7"},
      {"x = 3..", "3"},
      {"y = 4\\text{ cm}", "4"},
      {"It is 12 apples and 7", "7"},
      {"costs $12 then", "$12"},
      {"3.14a", "3"},
      {"pi is 3.14", "3.14"},
      {"12abc", ""},
      {"答案是 5。", "5"}};
  for (const auto& [out, want] : table) {
    const SuiteAnswer a = agieval_parse_math_answer(out);
    if (want.empty()) {
      EXPECT_TRUE(a.none) << out;
    } else {
      EXPECT_FALSE(a.none) << out;
      EXPECT_EQ(a.text, want) << out;
    }
  }
  EXPECT_TRUE(agieval_parse_math_answer("\\boxed{3").none);
  EXPECT_TRUE(agieval_parse_math_answer("no number").none);
}

TEST(SuiteAnswers, MathEquivalenceNormalisesAsTheirs) {
  auto eq = [](const std::string& a, const std::string& b) {
    return math_is_equiv(SuiteAnswer::of(a), SuiteAnswer::of(b));
  };
  EXPECT_TRUE(eq("\\frac12", "\\frac{1}{2}"));
  EXPECT_TRUE(eq("0.5", "\\frac{1}{2}"));
  EXPECT_TRUE(eq(".5", "\\frac{1}{2}"));
  EXPECT_TRUE(eq("1/2", "\\frac{1}{2}"));
  EXPECT_TRUE(eq("-3/4", "\\frac{-3}{4}"));
  EXPECT_FALSE(eq("07/4", "\\frac{7}{4}"));  // int("07") prints 7: their a/b rule leaves it
  EXPECT_TRUE(eq("\\dfrac{3}{4}", "\\frac34"));
  EXPECT_TRUE(eq("10\\%", "10"));
  EXPECT_TRUE(eq("x = 5", "5"));
  EXPECT_FALSE(eq("abc = 5", "5"));  // only one- or two-character left sides are dropped
  EXPECT_TRUE(eq("5\\text{ cm}", "5"));
  EXPECT_TRUE(eq("\\sqrt2", "\\sqrt{2}"));
  EXPECT_TRUE(eq("90^\\circ", "90"));
  EXPECT_TRUE(eq("\\left(1,2\\right)", "(1, 2)"));
  EXPECT_FALSE(eq("2", "3"));
  // Where their normalisation raises, the raw strings are compared.
  EXPECT_TRUE(eq("a\\sqrt", "a\\sqrt"));
  EXPECT_FALSE(eq("a\\sqrt", "a\\sqrt "));
  EXPECT_FALSE(eq("5\\text{ a}\\text{ b}", "5"));
  EXPECT_FALSE(math_strip_string("1\\frac").has_value());
  EXPECT_EQ(*math_strip_string("\\frac1"), "\\frac1");
  SuiteAnswer none;
  none.none = true;
  EXPECT_FALSE(math_is_equiv(none, SuiteAnswer::of("1")));
  EXPECT_TRUE(math_is_equiv(none, none));
}

// ---------------------------------------------------------------------------------------
// Bad data

TEST(SuiteErrors, NameTheFileAndTheFix) {
  TempDir tmp("suite_errors");
  write_mmlu(tmp);
  write_bbh(tmp);
  write_agieval(tmp);
  auto err = [&](Suite s, const std::string& dir, SuiteLoadOptions o = {}) {
    return error_of([&] { load_suite(s, tmp.file(dir), o); });
  };
  SuiteLoadOptions zero;
  zero.shots = 0;
  EXPECT_NE(err(Suite::Mmlu, "nowhere").find("is not a folder"), std::string::npos);
  EXPECT_NE(err(Suite::Mmlu, "BBH").find("needs dev/ and test/"), std::string::npos);
  SuiteLoadOptions unknown = zero;
  unknown.subjects = {"astronomy"};
  EXPECT_NE(err(Suite::Mmlu, "MMLU", unknown).find("'astronomy' is not in"), std::string::npos);

  write_file(tmp.file("MMLU/data/test/anatomy_test.csv"), "Organ?,femur,lung,heart,skin,E\n");
  EXPECT_NE(err(Suite::Mmlu, "MMLU", zero).find("anatomy_test.csv: row 1 answers 'E'"), std::string::npos);
  write_file(tmp.file("MMLU/data/test/anatomy_test.csv"), "\"Organ?,femur,lung,heart,skin,B\n");
  EXPECT_NE(err(Suite::Mmlu, "MMLU", zero).find("never closed"), std::string::npos);
  write_file(tmp.file("MMLU/data/test/anatomy_test.csv"), "Organ?,femur,lung,heart,skin,B\nA,b,c,d,e,f,B\n");
  EXPECT_NE(err(Suite::Mmlu, "MMLU", zero).find("row 2 has 7 fields"), std::string::npos);
  write_file(tmp.file("MMLU/data/test/anatomy_test.csv"), "Organ?,B\n");
  EXPECT_NE(err(Suite::Mmlu, "MMLU", zero).find("has 2 columns"), std::string::npos);
  fs::remove(tmp.file("MMLU/data/dev/anatomy_dev.csv"));
  EXPECT_NE(err(Suite::Mmlu, "MMLU", zero).find("has no dev file"), std::string::npos);

  SuiteLoadOptions shots = zero;
  EXPECT_NE(err(Suite::Bbh, "BBH", shots).find("--shots does not apply"), std::string::npos);
  write_file(tmp.file("BBH/cot-prompts/boolean_expressions.txt"), "no separator\n");
  EXPECT_NE(err(Suite::Bbh, "BBH").find("boolean_expressions.txt has no \"-----\" line"), std::string::npos);
  write_bbh(tmp);
  write_file(tmp.file("BBH/bbh/boolean_expressions.json"), R"J({"examples": [{"input": "x"}]})J");
  EXPECT_NE(err(Suite::Bbh, "BBH").find("boolean_expressions.json example 0: needs string \"input\" and \"target\""),
            std::string::npos);
  write_file(tmp.file("BBH/bbh/boolean_expressions.json"), "{\"examples\": ");
  EXPECT_NE(err(Suite::Bbh, "BBH").find("is not valid JSON"), std::string::npos);

  write_file(tmp.file("AGIEval/experiment_input/zero-shot/lsat-ar.jsonl"), "{\"label\": \"A\"}\n");
  EXPECT_NE(err(Suite::Agieval, "AGIEval").find("lsat-ar.jsonl:1: needs a string \"context\""), std::string::npos);
  write_file(tmp.file("AGIEval/experiment_input/zero-shot/lsat-ar.jsonl"), "\n{\"context\": \"q\", \"label\": 3}\n");
  EXPECT_NE(err(Suite::Agieval, "AGIEval").find("lsat-ar.jsonl:2: \"label\" must be"), std::string::npos);
  write_file(tmp.file("AGIEval/experiment_input/few-shot/mystery.jsonl"), "{\"context\": \"q\", \"label\": \"A\"}\n");
  SuiteLoadOptions few;
  few.shots = 1;
  EXPECT_NE(err(Suite::Agieval, "AGIEval", few).find("subset 'mystery' has no few-shot answer parser"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_suite("gsm8k"); }).find("mmlu, bbh and agieval"), std::string::npos);
}

// ---------------------------------------------------------------------------------------
// The CLI on a tiny trained model

class SuiteCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir("suite_cli");
    testing::prepare_tiny(*tmp_, 30, 3);
    run_ = tmp_->file("run");
    const std::string train = std::string(SUBLLM_CLI_PATH) + " train --data " + tmp_->file("data") + " --out " + run_ +
                              " --dim 16 --layers 1 --heads 2 --batch 2 --seq 32 --steps 2 --eval-every 0 -t 2 -q > " +
                              run_ + ".log 2>&1";
    ASSERT_EQ(std::system(train.c_str()), 0) << read_all(run_ + ".log");
    write_mmlu(*tmp_);
    write_bbh(*tmp_);
    write_agieval(*tmp_);
    // A question longer than the 1024-token context.
    std::string words;
    for (int i = 0; i < 400; ++i) words += "word" + std::to_string(i) + " sort ";
    write_file(tmp_->file("BBH/cot-prompts/word_sorting.txt"), "canary\n-----\nSort the words.\n");
    write_file(tmp_->file("BBH/bbh/word_sorting.json"),
               nlohmann::json{{"examples", {{{"input", words}, {"target", "sort word"}}}}}.dump());
  }
  static void TearDownTestSuite() { delete tmp_; }

  static testing::CliResult eval(const std::vector<std::string>& args) {
    std::vector<std::string> all = {"eval", "fewshot", "-m", run_, "-t", "2"};
    all.insert(all.end(), args.begin(), args.end());
    return testing::run_cli(all);
  }

  static TempDir* tmp_;
  static std::string run_;
};
TempDir* SuiteCli::tmp_ = nullptr;
std::string SuiteCli::run_;

TEST_F(SuiteCli, MmluReportsEachSubjectAndWritesPredictions) {
  const std::string pred = tmp_->file("mmlu_pred.jsonl");
  const auto r = eval({"--suite", "mmlu", "--data-dir", tmp_->file("MMLU"), "--shots", "1", "--predictions", pred});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("anatomy"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("high_school_biology"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("overall"), std::string::npos) << r.output;
  std::istringstream in(read_all(pred));
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_TRUE(j.contains("generated") && j.contains("extracted") && j.contains("correct")) << line;
    ++n;
  }
  EXPECT_EQ(n, 3u);
}

TEST_F(SuiteCli, BbhRunsWithABudgetTheContextHolds) {
  // The authors' 1024 new tokens fill the whole 1024-token context: the error says what to lower.
  const auto big = eval({"--suite", "bbh", "--data-dir", tmp_->file("BBH")});
  EXPECT_NE(big.code, 0);
  EXPECT_NE(big.output.find("--max-new-tokens 1024 leaves no room"), std::string::npos) << big.output;
  const std::string pred = tmp_->file("bbh_pred.jsonl");
  const auto r = eval({"--suite", "bbh", "--data-dir", tmp_->file("BBH"), "--max-new-tokens", "8", "--subjects",
                       "word_sorting,boolean_expressions", "--json", "--predictions", pred});
  ASSERT_EQ(r.code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(j.at("suite"), "bbh");
  ASSERT_EQ(j.at("subjects").size(), 2u);
  EXPECT_EQ(j.at("subjects")[0].at("subject"), "boolean_expressions");
  EXPECT_EQ(j.at("subjects")[0].at("total"), 2);
  EXPECT_EQ(j.at("total"), 3);
  // The long question is cut from the left to 1024 - 8 tokens, as their tokenizer truncated.
  EXPECT_EQ(j.at("prompts_truncated").get<int>(), 1);
  std::istringstream in(read_all(pred));
  std::string line;
  std::vector<int> tokens;
  while (std::getline(in, line)) tokens.push_back(nlohmann::json::parse(line).at("prompt_tokens").get<int>());
  ASSERT_EQ(tokens.size(), 3u);
  EXPECT_EQ(tokens[2], 1024 - 8);
}

TEST_F(SuiteCli, AgievalZeroShotRunsAndBadFlagsAreRefused) {
  const auto r = eval({"--suite", "agieval", "--data-dir", tmp_->file("AGIEval"), "--json"});
  ASSERT_EQ(r.code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(j.at("setting"), "zero-shot");
  EXPECT_EQ(j.at("subjects").size(), 3u);
  EXPECT_EQ(j.at("total"), 4);

  const auto no_dir = eval({"--suite", "agieval"});
  EXPECT_NE(no_dir.code, 0);
  EXPECT_NE(no_dir.output.find("needs --data-dir"), std::string::npos) << no_dir.output;
  const auto with_task = eval({"--suite", "mmlu", "--task", "sst2", "--data-dir", tmp_->file("MMLU")});
  EXPECT_NE(with_task.code, 0);
  EXPECT_NE(with_task.output.find("excludes"), std::string::npos) << with_task.output;
  const auto no_test = eval({"--task", "sst2"});
  EXPECT_NE(no_test.code, 0);
  EXPECT_NE(no_test.output.find("need --train"), std::string::npos) << no_test.output;
  const auto subjects = eval({"--suite", "mmlu", "--data-dir", tmp_->file("MMLU"), "--subjects", "astronomy"});
  EXPECT_NE(subjects.code, 0);
  EXPECT_NE(subjects.output.find("'astronomy' is not in"), std::string::npos) << subjects.output;
}

}  // namespace fewshot_suites_tests
}  // namespace subllm
