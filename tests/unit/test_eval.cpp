// Evaluation: the authors' few-shot prompts character for character, their random choices,
// prediction scoring, label log-likelihoods against an independent forward pass, perplexity
// against Model::forward, and the spam-assassin task builder.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "subllm/dataset.h"
#include "subllm/error.h"
#include "subllm/eval.h"
#include "subllm/prepare.h"
#include "model_util.h"
#include "test_util.h"

namespace subllm {
namespace eval_tests {

using testing::error_of;
using testing::read_all;
using testing::TempDir;
using testing::write_file;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------
// Prompts

// Demonstrations = the first lines of the train file, the query = the test file's first line.
std::string prompt_for(const TempDir& tmp, const std::string& task_name, const std::string& train_jsonl,
                       const std::string& test_jsonl) {
  const FewshotTask task = builtin_task(task_name);
  write_file(tmp.file(task_name + "_train.jsonl"), train_jsonl);
  write_file(tmp.file(task_name + "_test.jsonl"), test_jsonl);
  const auto train = load_fewshot_jsonl(tmp.file(task_name + "_train.jsonl"), task);
  const auto test = load_fewshot_jsonl(tmp.file(task_name + "_test.jsonl"), task);
  std::vector<const FewshotExample*> demos;
  for (const auto& e : train) demos.push_back(&e);
  return build_prompt(task, demos, test.at(0));
}

TEST(EvalPrompt, BuiltinTasksMatchTheAuthorsFormat) {
  TempDir tmp("eval");
  // Field values are stripped (the authors' item['text'].strip()); the test item ends right
  // after the label's colon, with no space.
  EXPECT_EQ(prompt_for(tmp, "sst2",
                       "{\"text\": \"  a gripping film \", \"label\": 0}\n{\"text\": \"dull\\n\", \"label\": 1}\n",
                       "{\"text\": \" fine acting\", \"label\": 0}\n"),
            "text: a gripping film sentiment: positive\n\ntext: dull sentiment: negative\n\ntext: fine acting "
            "sentiment:");
  EXPECT_EQ(prompt_for(tmp, "yelp", "{\"text\": \"cold food\", \"label\": 0}\n{\"text\": \"great\", \"label\": 1}\n",
                       "{\"text\": \"ok\", \"label\": 1}"),
            "text: cold food sentiment: negative\n\ntext: great sentiment: positive\n\ntext: ok sentiment:");
  EXPECT_EQ(prompt_for(tmp, "amazon",
                       "{\"title\": \"Broke\", \"content\": \"Stopped after a day.\", \"label\": 0}\n"
                       "{\"title\": \" Love it \", \"content\": \"Works well\", \"label\": 1}\n",
                       "{\"title\": \"Fine\", \"content\": \"As described\", \"label\": 1}\n"),
            "Title: Broke. Content: Stopped after a day. Sentiment: negative\n\nTitle: Love it. Content: Works well "
            "Sentiment: positive\n\nTitle: Fine. Content: As described Sentiment:");
  EXPECT_EQ(prompt_for(tmp, "agnews",
                       "{\"text\": \"Markets fell.\", \"label\": 2}\n{\"text\": \"Team wins cup\", \"label\": 1}\n"
                       "{\"text\": \"New chip\", \"label\": 3}\n{\"text\": \"Summit ends\", \"label\": 0}\n",
                       "{\"text\": \"Rates rise\", \"label\": 2}\n"),
            "Article: Markets fell. Category: business\n\nArticle: Team wins cup Category: sports\n\nArticle: New chip "
            "Category: science\n\nArticle: Summit ends Category: world\n\nArticle: Rates rise Category:");
  EXPECT_EQ(prompt_for(tmp, "dbpedia",
                       "{\"title\": \"Acme\", \"content\": \"A maker of anvils.\", \"label\": 0}\n"
                       "{\"title\": \"Moby-Dick\", \"content\": \"A novel.\", \"label\": 13}\n",
                       "{\"title\": \"Oak\", \"content\": \"A tree.\", \"label\": 10}\n"),
            "Title: Acme. Content: A maker of anvils.\nCategory: Company\n\nTitle: Moby-Dick. Content: A novel.\n"
            "Category: WrittenWork\n\nTitle: Oak. Content: A tree.\nCategory:");
  // tweet_hate as the authors' code writes it: one newline after each demonstration, and the
  // test item with a space (not a newline) before "Label:".
  EXPECT_EQ(prompt_for(tmp, "tweet_hate", "{\"text\": \"nice day\", \"label\": 0}\n{\"text\": \"go away\", \"label\": 1}\n",
                       "{\"text\": \"hello all\", \"label\": 0}\n"),
            "Text: nice day\nLabel: Non-hate\nText: go away\nLabel: Hate\nText: hello all Label:");
  EXPECT_EQ(prompt_for(tmp, "spam", "{\"text\": \"Buy now!\", \"label\": 1}\n{\"text\": \"Lunch at 3?\", \"label\": 0}\n",
                       "{\"text\": \"Hi Bob\", \"label\": 0}\n"),
            "Email: Buy now!\nLabel: spam\n\nEmail: Lunch at 3?\nLabel: ham\n\nEmail: Hi Bob\nLabel:");
  // Zero shots: the query alone.
  const FewshotTask sst2 = builtin_task("sst2");
  FewshotExample q{{"x"}, 0};
  EXPECT_EQ(build_prompt(sst2, {}, q), "text: x sentiment:");
  EXPECT_EQ(label_gap(sst2), " ");
  EXPECT_EQ(label_gap(builtin_task("dbpedia")), " ");
  EXPECT_NE(error_of([] { builtin_task("mnli"); }).find("sst2, yelp, amazon"), std::string::npos);
}

TEST(EvalPrompt, TaskSpecFilesAndTheirErrors) {
  TempDir tmp("eval");
  write_file(tmp.file("topic.json"),
             R"({"name": "topic", "template": "Q: {question} ({extra})  A:  {label}", "separator": "\n---\n",
                 "labels": ["no", "yes"], "fields": ["question", "extra"], "strip_fields": false})");
  const FewshotTask t = load_task_spec(tmp.file("topic.json"));
  EXPECT_EQ(t.name, "topic");
  FewshotExample a{{"is it {label}? ", "x"}, 1}, b{{"why", "{y}"}, 0};
  // Field text is never re-expanded, unstripped when asked, and only the spaces right before
  // {label} leave the query ("A:" keeps its inner double space before it).
  EXPECT_EQ(build_prompt(t, {&a}, b), "Q: is it {label}?  (x)  A:  yes\n---\nQ: why ({y})  A:");
  EXPECT_EQ(label_gap(t), "  ");
  write_file(tmp.file("q.json"), R"({"template": "T: {text}\nL: {label}", "separator": "\n", "labels": ["a", "b"],
                                     "query_template": "T: {text} L:"})");
  const FewshotTask q = load_task_spec(tmp.file("q.json"));
  EXPECT_EQ(q.name, "q");
  FewshotExample c{{" hi "}, 0};
  EXPECT_EQ(build_prompt(q, {&c}, c), "T: hi\nL: a\nT: hi L:");

  auto spec_error = [&](const std::string& text) {
    write_file(tmp.file("bad.json"), text);
    return error_of([&] { load_task_spec(tmp.file("bad.json")); });
  };
  EXPECT_NE(spec_error(R"({"template": "{text}", "labels": ["a", "b"]})").find("{label}"), std::string::npos);
  EXPECT_NE(spec_error(R"({"template": "{txt} {label}", "labels": ["a", "b"]})").find("{txt}"), std::string::npos);
  EXPECT_NE(spec_error(R"({"template": "{text} {label}", "labels": ["a"]})").find("two label"), std::string::npos);
  EXPECT_NE(spec_error(R"({"template": "{text} {label}", "labels": ["a ", "b"]})").find("whitespace"),
            std::string::npos);
  EXPECT_NE(spec_error(R"({"template": "{text} {label}", "labels": ["a", "b"], "sep": ""})").find("unknown key \"sep\""),
            std::string::npos);
  EXPECT_NE(spec_error(R"({"template": "{label}", "labels": ["a", "b"], "fields": ["text"]})").find("never used"),
            std::string::npos);
  EXPECT_NE(spec_error("{").find("bad.json"), std::string::npos);
}

TEST(EvalPrompt, DuplicateLabelWordsAreRefused) {
  // Generate scoring would take the first label with the word for every prediction, while
  // the authors compare with the true label's own word: the task is ambiguous, so refused.
  TempDir tmp("eval");
  write_file(tmp.file("dup.json"), R"({"template": "{text} => {label}", "labels": ["yes", "no", "yes"]})");
  const std::string msg = error_of([&] { load_task_spec(tmp.file("dup.json")); });
  EXPECT_NE(msg.find("dup.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("labels 0 and 2 are both 'yes'"), std::string::npos) << msg;
  FewshotTask t = builtin_task("agnews");
  t.labels[3] = "world";
  EXPECT_NE(error_of([&] { validate_task(t); }).find("labels 0 and 3 are both 'world'"), std::string::npos);
  t.labels[3] = "World";  // case counts: the match is case-sensitive
  EXPECT_EQ(error_of([&] { validate_task(t); }), "");
}

// ---------------------------------------------------------------------------------------
// Random choices: numpy's RandomState(seed).shuffle, values printed by numpy 1.24.

TEST(EvalFewshot, DemonstrationChoiceReproducesNumpy) {
  EXPECT_EQ(numpy_shuffle_order(10, 42), (std::vector<size_t>{8, 1, 5, 0, 7, 2, 9, 4, 3, 6}));
  EXPECT_EQ(numpy_shuffle_order(7, 12345), (std::vector<size_t>{6, 3, 4, 0, 1, 5, 2}));
  EXPECT_EQ(numpy_shuffle_order(6, 4294967295u), (std::vector<size_t>{1, 4, 5, 0, 2, 3}));
  const auto big = numpy_shuffle_order(1000, 0);
  EXPECT_EQ(std::vector<size_t>(big.begin(), big.begin() + 10),
            (std::vector<size_t>{993, 859, 298, 553, 672, 971, 27, 231, 306, 706}));
  // The authors' downsampling: RandomState(666).choice(20, 5, replace=False).
  EXPECT_EQ(choose_test_items(20, 5), (std::vector<size_t>{15, 16, 10, 19, 17}));
  EXPECT_EQ(choose_test_items(4, 0), (std::vector<size_t>{0, 1, 2, 3}));
  EXPECT_EQ(choose_test_items(4, 9), (std::vector<size_t>{0, 1, 2, 3}));

  EXPECT_EQ(choose_demonstrations(10, 4, 42), (std::vector<size_t>{8, 1, 5, 0}));
  EXPECT_EQ(choose_demonstrations(500, 4, 7), choose_demonstrations(500, 4, 7));
  EXPECT_NE(choose_demonstrations(500, 4, 7), choose_demonstrations(500, 4, 8));
  EXPECT_EQ(choose_demonstrations(3, 8, 1).size(), 3u);  // fewer examples than shots: all of them
  EXPECT_TRUE(choose_demonstrations(3, 0, 1).empty());
}

// ---------------------------------------------------------------------------------------
// Scoring rules: first line of the stripped output, stripped, exact match.

TEST(EvalFewshot, PredictionEdgeCases) {
  EXPECT_TRUE(prediction_matches("positive", "positive"));
  EXPECT_TRUE(prediction_matches(" positive\n\ntext: next", "positive"));
  EXPECT_TRUE(prediction_matches("\n\n  negative \r\nfoo", "negative"));  // leading newlines go first
  EXPECT_TRUE(prediction_matches(" Hate\xC2\xA0", "Hate"));               // Python strips U+00A0 too
  EXPECT_FALSE(prediction_matches("", "positive"));
  EXPECT_FALSE(prediction_matches(" \n ", "positive"));
  EXPECT_FALSE(prediction_matches(" positive.", "positive"));  // punctuation is not removed
  EXPECT_FALSE(prediction_matches(" positive review", "positive"));
  EXPECT_FALSE(prediction_matches(" Positive", "positive"));
  EXPECT_FALSE(prediction_matches(" Non-hate", "Hate"));
  EXPECT_EQ(normalise_prediction(" sports\tnews \nx"), "sports\tnews");
  EXPECT_EQ(py_strip("\xE3\x80\x80 a b\xE2\x80\x83"), "a b");  // U+3000, U+2003
  EXPECT_EQ(py_strip("\xE3\x81\x82"), "\xE3\x81\x82");           // a non-space CJK character stays
}

TEST(EvalFewshot, MalformedJsonlIsReportedWithItsLine) {
  TempDir tmp("eval");
  const FewshotTask t = builtin_task("sst2");
  auto err = [&](const std::string& text) {
    write_file(tmp.file("d.jsonl"), text);
    return error_of([&] { load_fewshot_jsonl(tmp.file("d.jsonl"), t); });
  };
  const std::string ok = "{\"text\": \"a\", \"label\": 0}\n";
  std::string msg = err(ok + "\n" + "{\"text\": \"b\", \"label\": 1\n");
  EXPECT_NE(msg.find("d.jsonl:3: malformed JSON"), std::string::npos) << msg;
  msg = err(ok + "{\"txt\": \"b\", \"label\": 1}\n");
  EXPECT_NE(msg.find("d.jsonl:2: missing field \"text\""), std::string::npos) << msg;
  msg = err(ok + ok + "{\"text\": \"b\", \"label\": 2}\n");
  EXPECT_NE(msg.find("d.jsonl:3: label 2 is outside"), std::string::npos) << msg;
  msg = err("{\"text\": \"b\", \"label\": \"1\"}\n");
  EXPECT_NE(msg.find("d.jsonl:1: \"label\" is not an integer"), std::string::npos) << msg;
  msg = err("{\"text\": 5, \"label\": 1}\n");
  EXPECT_NE(msg.find("d.jsonl:1: field \"text\" is not a string"), std::string::npos) << msg;
  msg = err("[1, 2]\n");
  EXPECT_NE(msg.find("d.jsonl:1: not a JSON object"), std::string::npos) << msg;
  msg = err(ok + "{\"text\": \"\xff\", \"label\": 1}\n");
  EXPECT_NE(msg.find("d.jsonl:2: not UTF-8"), std::string::npos) << msg;
  msg = err("\n\n");
  EXPECT_NE(msg.find("no examples"), std::string::npos) << msg;
  // A blank line and a label written 1.0 are fine.
  write_file(tmp.file("d.jsonl"), ok + "\n{\"text\": \"c\", \"label\": 1.0}");
  const auto ex = load_fewshot_jsonl(tmp.file("d.jsonl"), t);
  ASSERT_EQ(ex.size(), 2u);
  EXPECT_EQ(ex[1].label, 1);
}

// ---------------------------------------------------------------------------------------
// Models: a tokenizer trained once on a small corpus, tiny models built on it.

class EvalModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir("evalmodel");
    testing::write_corpus(tmp_->path() / "corpus", 30);
    PrepareOptions p;
    p.inputs = {(tmp_->path() / "corpus").string()};
    p.out_dir = tmp_->file("data");
    p.vocab_size = 400;
    p.valid_every = 3;
    p.log = [](const std::string&) {};
    prepare_data(p);
    tok_ = new Tokenizer(Tokenizer::load(tmp_->file("data/tokenizer.model")));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete tmp_;
  }

  static std::unique_ptr<Model> make_model(const std::string& structure, std::vector<float> ret, int context,
                                           uint64_t seed) {
    ModelConfig c;
    c.vocab_size = 400;
    c.dim = 32;
    c.ffn_dim = 48;
    c.n_heads = 4;
    c.context = context;
    c.structure = structure;
    c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
    c.retentions = std::move(ret);
    auto m = std::make_unique<Model>(c);
    // Much larger weights than the init, so the context moves the predictions a lot (a wrong
    // prefix must change the scores), and scores spread around 0.
    testing::spread_weights(*m, seed, {0.3, 1.5, 0});
    return m;
  }

  static TempDir* tmp_;
  static Tokenizer* tok_;
};
TempDir* EvalModel::tmp_ = nullptr;
Tokenizer* EvalModel::tok_ = nullptr;

double log_softmax_ref(const float* row, int V, int id) {
  double mx = row[0];
  for (int i = 1; i < V; ++i) mx = std::max(mx, (double)row[i]);
  double s = 0;
  for (int i = 0; i < V; ++i) s += std::exp(row[i] - mx);
  return row[id] - mx - std::log(s);
}

// log P(ids[from..]) | ids[..from]) from one full inference-mode forward pass.
double reference_log_likelihood(Model& m, const std::vector<int32_t>& ids, size_t from) {
  const int V = m.config().vocab_size, T = (int)ids.size();
  std::vector<float> logits((size_t)T * V);
  m.forward(ids.data(), nullptr, 1, T, logits.data(), Mode::Inference);
  double lp = 0;
  for (size_t t = from; t < ids.size(); ++t) lp += log_softmax_ref(logits.data() + (t - 1) * V, V, ids[t]);
  return lp;
}

std::vector<int32_t> doc_ids(const Tokenizer& tok, const std::string& text) {
  std::vector<int32_t> ids{tok.eos_id()};
  for (int32_t t : tok.encode(text)) ids.push_back(t);
  return ids;
}

TEST_F(EvalModel, LoglikScoresEqualAnIndependentForward) {
  auto m = make_model("T(T(TT)T)T", {0.6f, 0.5f}, 256, 3);
  const Tokenizer& tok = *tok_;
  FewshotTask task = builtin_task("spam");
  task.labels = {"harbour", "zebra quagga", "ham"};  // multi-token labels with this vocabulary
  ASSERT_GE(tok.encode("zebra quagga").size(), 3u);
  std::vector<FewshotExample> train = {{{"The old sailor"}, 0}, {{"A curious child"}, 1},
                                       {{"Our nation"}, 2},    {{"The river"}, 1}};
  std::vector<FewshotExample> test = {{{"The captain built"}, 1}, {{"My neighbour"}, 2}};
  FewshotOptions o;
  o.shots = 3;
  o.seeds = {5, 6};
  o.scoring = Scoring::Loglik;
  const FewshotResult r = evaluate_fewshot(*m, tok, task, train, test, o);
  ASSERT_EQ(r.seeds.size(), 2u);
  int checked = 0;
  for (const auto& s : r.seeds) {
    std::vector<const FewshotExample*> demos;
    for (size_t i : choose_demonstrations(train.size(), 3, s.seed)) demos.push_back(&train[i]);
    for (size_t i = 0; i < test.size(); ++i) {
      const auto& item = s.items[i];
      ASSERT_EQ(item.scores.size(), 3u);
      EXPECT_EQ(item.demos_used, 3);
      const std::string prompt = build_prompt(task, demos, test[i]);
      const auto p = doc_ids(tok, prompt);
      int best = 0;
      for (size_t l = 0; l < 3; ++l) {
        const auto full = doc_ids(tok, prompt + " " + task.labels[l]);
        ASSERT_TRUE(std::equal(p.begin(), p.end(), full.begin()));
        ASSERT_GT(full.size(), p.size());
        const double ref = reference_log_likelihood(*m, full, p.size());
        EXPECT_NEAR(item.scores[l], ref, 1e-3 + 1e-4 * std::fabs(ref)) << "seed " << s.seed << " label " << l;
        if (item.scores[l] > item.scores[best]) best = (int)l;
        ++checked;
      }
      EXPECT_EQ(item.predicted, best);
    }
  }
  EXPECT_EQ(checked, 12);
  // The low-level entry point gives the same numbers on a fresh cache.
  const auto p = doc_ids(tok, "Email: x\nLabel:");
  const auto full = doc_ids(tok, "Email: x\nLabel: zebra quagga");
  const auto got = continuation_log_likelihoods(*m, p, {std::vector<int32_t>(full.begin() + (long)p.size(), full.end())});
  EXPECT_NEAR(got[0], reference_log_likelihood(*m, full, p.size()), 1e-3 + 1e-4 * std::fabs(got[0]));
}

// A LLaMA whose blocks add nothing and whose head sees one constant channel: its next-token
// distribution is fixed, with `favoured` tokens at logit `boost` and the rest at 0.
std::unique_ptr<Model> constant_model(const std::vector<int32_t>& favoured, float boost, int context) {
  ModelConfig c;
  c.vocab_size = 400;
  c.dim = 16;
  c.ffn_dim = 32;
  c.n_heads = 2;
  c.n_layers = 2;
  c.context = context;
  auto m = std::make_unique<Model>(c);
  m->init_weights(1);
  auto zero = [&](const std::string& name) {
    Tensor t = m->param(name);
    std::fill(t.f32(), t.f32() + t.numel(), 0.f);
  };
  for (int i = 0; i < 2; ++i) {
    zero("decoder.layers." + std::to_string(i) + ".self_attn.out_proj.weight");
    zero("decoder.layers." + std::to_string(i) + ".feedforward.swiglu.w3.weight");
  }
  float* emb = m->param("decoder.embed_tokens.weight").f32();
  for (int v = 0; v < 400; ++v) emb[(size_t)v * 16] = 1.0f;  // channel 0 positive for every token
  float* gain = m->param("decoder.layer_norm.weight").f32();
  std::fill(gain, gain + 16, 0.f);
  gain[0] = 1.0f;
  float* head = m->param("decoder.output_projection.weight").f32();
  std::fill(head, head + (size_t)400 * 16, 0.f);
  for (int32_t t : favoured) head[(size_t)t * 16] = boost;  // then logit_t = boost * emb0 / rms > 0
  return m;
}

TEST_F(EvalModel, LoglikPicksTheLabelMadeLikeliestByConstruction) {
  const Tokenizer& tok = *tok_;
  FewshotTask task = builtin_task("sst2");
  task.labels = {"harbour", "zebra quagga"};
  const auto p = doc_ids(tok, "text: x sentiment:");
  const auto full = doc_ids(tok, "text: x sentiment: zebra quagga");
  const std::vector<int32_t> winner(full.begin() + (long)p.size(), full.end());
  ASSERT_GE(winner.size(), 2u);
  // The losing label needs a token the model does not favour.
  const auto loser_full = doc_ids(tok, "text: x sentiment: harbour");
  ASSERT_TRUE(std::any_of(loser_full.begin() + (long)p.size(), loser_full.end(), [&](int32_t t) {
    return std::find(winner.begin(), winner.end(), t) == winner.end();
  }));
  auto m = constant_model(winner, 40.0f, 128);
  std::vector<FewshotExample> train = {{{"a b"}, 0}, {{"c d"}, 1}};
  // Label 1 is right for the first item and wrong for the second.
  std::vector<FewshotExample> test = {{{"x"}, 1}, {{"y"}, 0}};
  FewshotOptions o;
  o.shots = 2;
  o.scoring = Scoring::Loglik;
  const FewshotResult r = evaluate_fewshot(*m, tok, task, train, test, o);
  ASSERT_EQ(r.seeds.size(), 1u);
  EXPECT_EQ(r.seeds[0].items[0].predicted, 1);
  EXPECT_EQ(r.seeds[0].items[1].predicted, 1);
  EXPECT_EQ(r.seeds[0].correct, 1);
  EXPECT_DOUBLE_EQ(r.seeds[0].accuracy, 50.0);
  EXPECT_GT(r.seeds[0].items[0].scores[1], r.seeds[0].items[0].scores[0] + 10);
  // The same with the winning label listed first.
  std::swap(task.labels[0], task.labels[1]);
  const FewshotResult r2 = evaluate_fewshot(*m, tok, task, train, test, o);
  EXPECT_EQ(r2.seeds[0].items[0].predicted, 0);
}

TEST_F(EvalModel, GenerateScoringCountsAnEmptyGenerationAsWrong) {
  const Tokenizer& tok = *tok_;
  // The model ends the document at once: nothing is generated, so nothing matches.
  auto m = constant_model({(int32_t)tok.eos_id()}, 40.0f, 128);
  const FewshotTask task = builtin_task("sst2");
  std::vector<FewshotExample> train = {{{"a b"}, 0}, {{"c d"}, 1}};
  std::vector<FewshotExample> test = {{{"x"}, 0}, {{"y"}, 1}};
  FewshotOptions o;
  o.shots = 1;
  o.seeds = {1, 2, 3};
  const FewshotResult r = evaluate_fewshot(*m, tok, task, train, test, o);
  ASSERT_EQ(r.seeds.size(), 3u);
  for (const auto& s : r.seeds) {
    EXPECT_EQ(s.correct, 0);
    for (const auto& it : s.items) {
      EXPECT_EQ(it.generated, "");
      EXPECT_EQ(it.predicted, -1);
    }
  }
  EXPECT_EQ(r.mean, 0.0);
  EXPECT_EQ(r.stddev, 0.0);
  // A model that keeps repeating one word generates it up to the token budget on one line.
  const auto word = tok.encode("positive");
  auto rep = constant_model({word.back()}, 40.0f, 128);
  const FewshotResult g = evaluate_fewshot(*rep, tok, task, train, test, o);
  EXPECT_EQ(g.max_new_tokens, std::max(3, (int)std::max(tok.encode("positive").size(), tok.encode("negative").size()) + 2));
  EXPECT_FALSE(g.seeds[0].items[0].generated.empty());
  EXPECT_EQ(g.seeds[0].correct, 0);
}

TEST_F(EvalModel, LongPromptsDropDemonstrationsFromTheFront) {
  const Tokenizer& tok = *tok_;
  const FewshotTask task = builtin_task("sst2");
  const std::string longer = "The old sailor watched the distant harbour before dawn";
  std::vector<FewshotExample> train;
  for (int i = 0; i < 6; ++i) train.push_back({{longer + " " + std::to_string(i)}, i % 2});
  std::string very_long;
  for (int i = 0; i < 8; ++i) very_long += longer + " ";
  std::vector<FewshotExample> test = {{{"short"}, 0}, {{very_long}, 1}};
  FewshotOptions o;
  o.shots = 4;
  std::vector<const FewshotExample*> demos;
  for (size_t i : choose_demonstrations(train.size(), 4, o.seeds[0])) demos.push_back(&train[i]);
  // A context that holds the last two demonstrations with the short query, not three.
  const int max_new = std::max(3, (int)std::max(tok.encode("positive").size(), tok.encode("negative").size()) + 2);
  const int context = (int)doc_ids(tok, build_prompt(task, {demos[2], demos[3]}, test[0])).size() + max_new + 1;
  ASSERT_GT((int)doc_ids(tok, build_prompt(task, {demos[1], demos[2], demos[3]}, test[0])).size() + max_new, context);
  ASSERT_GT((int)doc_ids(tok, very_long).size(), context);
  auto m = make_model("TT", {}, context, 4);
  const FewshotResult r = evaluate_fewshot(*m, tok, task, train, test, o);
  ASSERT_EQ(r.max_new_tokens, max_new);
  const auto& s = r.seeds[0];
  EXPECT_EQ(s.items[0].demos_used, 2);
  EXPECT_FALSE(s.items[0].truncated);
  EXPECT_EQ(s.items[1].demos_used, 0);
  EXPECT_TRUE(s.items[1].truncated);
  EXPECT_EQ(s.shortened, 2);
  EXPECT_EQ(s.truncated, 1);
  EXPECT_EQ(s.demos_dropped, 2 + 4);
}

TEST_F(EvalModel, ASpecsExplicitTokenBudgetIsHonoured) {
  const Tokenizer& tok = *tok_;
  ASSERT_GE(tok.encode("zebra quagga").size(), 3u);
  const int by_labels = (int)std::max(tok.encode("zebra quagga").size(), tok.encode("harbour").size()) + 2;
  const std::string spec = R"({"template": "text: {text} answer: {label}", "labels": ["zebra quagga", "harbour"])";
  write_file(tmp_->file("budget1.json"), spec + R"(, "max_new_tokens": 1})");
  write_file(tmp_->file("budget0.json"), spec + "}");
  const FewshotTask one = load_task_spec(tmp_->file("budget1.json"));
  const FewshotTask unset = load_task_spec(tmp_->file("budget0.json"));
  // A model that repeats one token on one line: it generates as many as the budget allows.
  const int32_t word = tok.encode("zebra").back();
  auto rep = constant_model({word}, 40.0f, 128);
  std::vector<FewshotExample> train = {{{"a b"}, 0}, {{"c d"}, 1}};
  std::vector<FewshotExample> test = {{{"x"}, 0}};
  FewshotOptions o;
  o.shots = 1;
  const FewshotResult r1 = evaluate_fewshot(*rep, tok, one, train, test, o);
  EXPECT_EQ(r1.max_new_tokens, 1);
  EXPECT_EQ(r1.seeds[0].items[0].generated, tok.decode({word}));
  // Without the key: the longest label + 2.
  const FewshotResult r0 = evaluate_fewshot(*rep, tok, unset, train, test, o);
  EXPECT_EQ(r0.max_new_tokens, by_labels);
  EXPECT_EQ(r0.seeds[0].items[0].generated, tok.decode(std::vector<int32_t>((size_t)by_labels, word)));
  // A built-in task's count is the authors' for their tokenizer: still raised for ours.
  FewshotTask builtin = builtin_task("sst2");
  builtin.labels = {"zebra quagga", "harbour"};
  builtin.max_new_tokens = 1;
  EXPECT_EQ(evaluate_fewshot(*rep, tok, builtin, train, test, o).max_new_tokens, by_labels);
}

// A LLaMA whose blocks add nothing, so the next token depends on the last one only: each
// (a, b) of `chain` makes b the greedy choice after a.
std::unique_ptr<Model> chain_model(int vocab, const std::vector<std::pair<int32_t, int32_t>>& chain, int context) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.dim = 16;
  c.ffn_dim = 32;
  c.n_heads = 2;
  c.n_layers = 1;
  c.context = context;
  auto m = std::make_unique<Model>(c);
  m->init_weights(1);
  for (const char* name : {"decoder.layers.0.self_attn.out_proj.weight", "decoder.layers.0.feedforward.swiglu.w3.weight",
                           "decoder.output_projection.weight"}) {
    Tensor t = m->param(name);
    std::fill(t.f32(), t.f32() + t.numel(), 0.f);
  }
  float* gain = m->param("decoder.layer_norm.weight").f32();
  std::fill(gain, gain + 16, 1.f);
  float* emb = m->param("decoder.embed_tokens.weight").f32();
  float* head = m->param("decoder.output_projection.weight").f32();
  EXPECT_LE(chain.size(), 16u);
  for (size_t k = 0; k < chain.size(); ++k) {
    std::fill(emb + (size_t)chain[k].first * 16, emb + (size_t)chain[k].first * 16 + 16, 0.f);
    emb[(size_t)chain[k].first * 16 + k] = 1.f;  // channel k: "the last token was a"
    head[(size_t)chain[k].second * 16 + k] = 40.f;
  }
  return m;
}

int32_t piece_id(const Tokenizer& tok, const std::string& piece) {
  for (int32_t id = 0; id < tok.vocab_size(); ++id)
    if (tok.id_to_piece(id) == piece) return id;
  ADD_FAILURE() << "no piece " << piece;
  return 0;
}

TEST(EvalGenerate, ANonAsciiSpaceAndNewlineBeforeTheAnswerDoNotEndIt) {
  // The answer "\u2003\n—so": its stripped text starts with the byte E2 that also starts
  // the em space U+2003 (E2 80 83), so the newline after the space is not the end of the
  // answer's first line.
  TempDir tmp("evalgen");
  std::string text;
  for (int i = 0; i < 100; ++i) text += "the sea—calm, the ship—slow and the wind—cold " + std::to_string(i) + "\n";
  write_file(tmp.file("dash.txt"), text);
  Tokenizer::train({tmp.file("dash.txt")}, tmp.file("dash.model"), 300, 1);
  const Tokenizer tok = Tokenizer::load(tmp.file("dash.model"));
  const int32_t b_e2 = piece_id(tok, "<0xE2>"), b_80 = piece_id(tok, "<0x80>"), b_83 = piece_id(tok, "<0x83>"),
                b_nl = piece_id(tok, "<0x0A>"), dash = piece_id(tok, "\xE2\x80\x94"), s = piece_id(tok, "s"),
                o = piece_id(tok, "o");
  ASSERT_EQ(tok.decode({b_e2, b_80, b_83, b_nl, dash, s, o}), "\xE2\x80\x83\n\xE2\x80\x94so");

  FewshotTask task;
  task.name = "dash";
  task.demo_template = "{text} wind: {label}";
  task.fields = {"text"};
  task.labels = {"\xE2\x80\x94so", "sea"};
  task.max_new_tokens = 10;
  const std::vector<FewshotExample> items = {{{"calm"}, 0}};
  const std::vector<int32_t> prompt = tok.encode(format_query(task, items[0]));
  const int32_t last = prompt.back();
  for (int32_t id : {b_e2, b_80, b_83, b_nl, dash, s, o}) ASSERT_NE(last, id);
  auto m = chain_model(tok.vocab_size(),
                       {{last, b_e2}, {b_e2, b_80}, {b_80, b_83}, {b_83, b_nl}, {b_nl, dash}, {dash, s}, {s, o},
                        {o, tok.eos_id()}},
                       64);
  FewshotOptions opt;
  opt.shots = 0;
  const FewshotResult r = evaluate_fewshot(*m, tok, task, items, items, opt);
  EXPECT_EQ(r.seeds[0].items[0].generated, "\xE2\x80\x83\n\xE2\x80\x94so");
  EXPECT_EQ(r.seeds[0].items[0].predicted, 0);
  EXPECT_EQ(r.seeds[0].correct, 1);
}

TEST_F(EvalModel, PredictionsNameEachItemsLineInTheTestFile) {
  const std::string run = tmp_->file("pred_run");
  const std::string train = std::string(SUBLLM_CLI_PATH) + " train --data " + tmp_->file("data") + " --out " + run +
                            " --dim 16 --layers 1 --heads 2 --batch 2 --seq 32 --steps 1 --eval-every 0 -t 2 -q > " +
                            run + ".log 2>&1";
  ASSERT_EQ(std::system(train.c_str()), 0) << read_all(run + ".log");
  // Examples on lines 1, 3, 6 and 7 (blank lines are skipped); --max-test 3 samples them
  // out of file order.
  write_file(tmp_->file("pred_test.jsonl"),
             "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\", \"label\": 1}\n\n \n"
             "{\"text\": \"c\", \"label\": 0}\n{\"text\": \"d\", \"label\": 1}\n");
  const std::vector<int64_t> lines = {1, 3, 6, 7};
  const std::string eval = std::string(SUBLLM_CLI_PATH) + " eval fewshot -m " + run + " --task sst2 --train " +
                           tmp_->file("pred_test.jsonl") + " --test " + tmp_->file("pred_test.jsonl") +
                           " --shots 1 --max-test 3 --scoring loglik -t 2 --predictions " + tmp_->file("pred.jsonl") +
                           " > " + run + ".eval.log 2>&1";
  ASSERT_EQ(std::system(eval.c_str()), 0) << read_all(run + ".eval.log");
  const std::vector<size_t> chosen = choose_test_items(4, 3);
  ASSERT_NE(chosen, (std::vector<size_t>{0, 1, 2}));
  std::istringstream in(read_all(tmp_->file("pred.jsonl")));
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    ASSERT_LT(n, chosen.size());
    EXPECT_EQ(j.at("item").get<size_t>(), n);
    EXPECT_EQ(j.at("example").get<size_t>(), chosen[n]);
    EXPECT_EQ(j.at("line").get<int64_t>(), lines[chosen[n]]) << line;
    ++n;
  }
  EXPECT_EQ(n, chosen.size());
}

// ---------------------------------------------------------------------------------------
// Perplexity

TEST_F(EvalModel, PerplexityMatchesModelForwardOnTheSameWindows) {
  auto m = make_model("T(TT)T", {0.6f}, 64, 5);
  const auto tokens = load_eval_tokens({tmp_->file("data")}, *tok_, "valid", 0);
  TokenDataset ds(tmp_->file("data"), "valid");
  ASSERT_EQ((int64_t)tokens.size(), ds.num_tokens());
  const int T = 16;
  const int64_t predict = 7 * T + 5;  // 7 full windows and a tail of 5
  ASSERT_GT((int64_t)tokens.size(), predict + 1);
  for (Mode mode : {Mode::Inference, Mode::Train}) {
    PplOptions o;
    o.seq = T;
    o.batch = 3;
    o.max_tokens = predict;
    o.mode = mode;
    o.seed = 9;
    int64_t last_done = 0;
    o.progress = [&](int64_t d, int64_t t) {
      EXPECT_GT(d, last_done);
      EXPECT_EQ(t, predict);
      last_done = d;
    };
    const PplResult r = evaluate_ppl(*m, tokens, o);
    EXPECT_EQ(last_done, predict);
    EXPECT_EQ(r.tokens, predict);
    EXPECT_EQ(r.windows, 8);
    EXPECT_DOUBLE_EQ(r.perplexity, std::exp(r.loss));
    // Independent: one window at a time, with targets and with logits.
    if (mode == Mode::Train) m->set_train_context(0, 9);
    double sum = 0;
    for (int w = 0; w < 8; ++w) {
      const int len = w < 7 ? T : 5;
      std::vector<int32_t> in(tokens.begin() + w * T, tokens.begin() + w * T + len);
      std::vector<int32_t> tg(tokens.begin() + w * T + 1, tokens.begin() + w * T + len + 1);
      if (mode == Mode::Inference) {
        std::vector<float> logits((size_t)len * 400);
        m->forward(in.data(), nullptr, 1, len, logits.data(), Mode::Inference);
        for (int t = 0; t < len; ++t) sum -= log_softmax_ref(logits.data() + (size_t)t * 400, 400, tg[t]);
      } else {
        sum += (double)m->forward(in.data(), tg.data(), 1, len, nullptr, Mode::Train) * len;
      }
    }
    EXPECT_NEAR(r.loss, sum / predict, 1e-4) << (mode == Mode::Train ? "train" : "inference");
    ASSERT_EQ(r.retention.size(), 1u);
    if (mode == Mode::Train) {
      // ceil(16 * 0.6) = 10 of 16 in full windows, ceil(5 * 0.6) = 3 of 5 in the tail.
      EXPECT_NEAR(r.retention[0], (7 * 10 + 3) / (7.0 * 16 + 5), 1e-12);
    } else {
      EXPECT_GT(r.retention[0], 0.0);
      EXPECT_LT(r.retention[0], 1.0);
    }
  }
  PplOptions bad;
  bad.seq = 65;
  EXPECT_NE(error_of([&] { evaluate_ppl(*m, tokens, bad); }).find("exceeds the model's context"), std::string::npos);
  EXPECT_NE(error_of([&] { evaluate_ppl(*m, {5}, PplOptions{}); }).find("at least two"), std::string::npos);
}

TEST_F(EvalModel, EvalTokensFromTextFilesEndEachDocumentWithEos) {
  const Tokenizer& tok = *tok_;
  write_file(tmp_->file("txt/a.txt"), "The captain answered.");
  write_file(tmp_->file("txt/b.jsonl"), "{\"text\": \"Our nation\"}\n\n{\"text\": \"My neighbour\"}\n");
  auto expect = doc_ids(tok, "The captain answered.");
  expect.erase(expect.begin());
  expect.push_back(tok.eos_id());
  for (const char* s : {"Our nation", "My neighbour"}) {
    for (int32_t t : tok.encode(s)) expect.push_back(t);
    expect.push_back(tok.eos_id());
  }
  EXPECT_EQ(load_eval_tokens({tmp_->file("txt")}, tok), expect);
  EXPECT_EQ(load_eval_tokens({tmp_->file("txt")}, tok, "valid", 5), std::vector<int32_t>(expect.begin(), expect.begin() + 5));
  write_file(tmp_->file("bad.jsonl"), "{\"text\": \"x\"}\n{\"txt\": 1}\n");
  EXPECT_NE(error_of([&] { load_eval_tokens({tmp_->file("bad.jsonl")}, tok); }).find("bad.jsonl:2"), std::string::npos);
  EXPECT_NE(error_of([&] { load_eval_tokens({tmp_->file("nope")}, tok); }).find("not found"), std::string::npos);
}

// ---------------------------------------------------------------------------------------
// The spam task

TEST(EvalSpam, BodyExcerpt) {
  EXPECT_EQ(email_body_excerpt("From: a\r\nSubject: hi\r\n\r\nHello  there,\r\n\r\n\tBob\r\n", 400),
            "Hello there, Bob");
  EXPECT_EQ(email_body_excerpt("From: a\nSubject: no body", 400), "");
  EXPECT_EQ(email_body_excerpt("From: a\n\n\n  \n", 400), "");
  std::string words;
  for (int i = 0; i < 100; ++i) words += "word" + std::to_string(i) + " ";
  const std::string cut = email_body_excerpt("H: x\n\n" + words, 400);
  EXPECT_LE(cut.size(), 400u);
  EXPECT_GE(cut.size(), 320u);
  EXPECT_EQ(words.compare(0, cut.size() + 1, cut + " "), 0) << cut;  // ends at a word boundary
  // Characters, not bytes: 10 two-byte characters fit a 10-character cut whole.
  EXPECT_EQ(email_body_excerpt("H: x\n\n\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9Z", 10),
            "\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9");
}

TEST(EvalSpam, BuilderOnAFakeFolderTree) {
  TempDir tmp("spam");
  const fs::path src = tmp.path() / "spam-assassin" / "data";
  int n = 0;
  for (const char* folder : {"easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"}) {
    const bool spam = std::string(folder).rfind("spam", 0) == 0;
    for (int i = 0; i < 4; ++i, ++n) {
      const std::string name = "0000" + std::to_string(i) + ".abc";
      write_file((src / folder / (name + ".txt")).string(),
                 "From: x@y\nSubject: s" + std::to_string(n) + "\n\n" + (spam ? "WIN money now " : "Meeting notes ") +
                     std::to_string(n) + "\n");
      write_file((src / folder / (name + ".json")).string(), "{\"not\": \"an e-mail\"}");
    }
  }
  write_file((src / "spam-1" / "bad.txt").string(), "From: x\n\nCaf\xE9 latin-1\n");
  write_file((src / "easy-ham-1" / "headers-only.txt").string(), "From: x\nSubject: y\n");

  SpamTaskOptions o;
  o.source_dir = src.string();
  o.out_dir = tmp.file("out");
  o.test_per_class = 3;
  o.seed = 11;
  o.log = [](const std::string&) {};
  const SpamTaskSummary s = build_spam_task(o);
  EXPECT_EQ(s.skipped_non_utf8, 1);
  EXPECT_EQ(s.skipped_empty, 1);
  EXPECT_EQ(s.test_ham, 3);
  EXPECT_EQ(s.test_spam, 3);
  EXPECT_EQ(s.train_ham, 12 - 3);
  EXPECT_EQ(s.train_spam, 8 - 3);
  const FewshotTask task = load_task_spec(s.spec_path);
  EXPECT_EQ(task.labels, builtin_task("spam").labels);
  EXPECT_EQ(build_prompt(task, {}, FewshotExample{{"x"}, 0}), "Email: x\nLabel:");
  const auto train = load_fewshot_jsonl(s.train_path, builtin_task("spam"));
  const auto test = load_fewshot_jsonl(s.test_path, builtin_task("spam"));
  ASSERT_EQ(train.size(), 14u);
  ASSERT_EQ(test.size(), 6u);
  std::set<std::string> seen;
  int test_spam = 0;
  for (const auto* split : {&train, &test})
    for (const auto& e : *split) {
      EXPECT_EQ(e.label, e.fields[0].rfind("WIN", 0) == 0 ? 1 : 0) << e.fields[0];
      EXPECT_TRUE(seen.insert(e.fields[0]).second) << "duplicate " << e.fields[0];
      if (split == &test) test_spam += e.label;
    }
  EXPECT_EQ(test_spam, 3);
  const auto line = nlohmann::json::parse(read_all(s.test_path).substr(0, read_all(s.test_path).find('\n')));
  EXPECT_TRUE(line.contains("source"));
  // The same seed rebuilds the same files; another seed splits differently.
  const std::string first = read_all(s.test_path);
  build_spam_task(o);
  EXPECT_EQ(read_all(s.test_path), first);
  o.seed = 12;
  build_spam_task(o);
  EXPECT_NE(read_all(s.test_path), first);
  // A source without the expected folders is named in the error.
  fs::remove_all(src / "spam-2");
  EXPECT_NE(error_of([&] { build_spam_task(o); }).find("spam-2"), std::string::npos);
}

}  // namespace eval_tests
}  // namespace subllm
