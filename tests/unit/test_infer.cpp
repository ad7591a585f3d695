// Inference: the KV cache against the full inference-mode forward, generation, sampling and
// model-folder errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <set>
#include <thread>

#include "kernels/select_kernels.h"
#include "subllm/error.h"
#include "subllm/generate.h"
#include "subllm/prepare.h"
#include "subllm/sampler.h"
#include "model_util.h"
#include "test_util.h"

namespace subllm {
namespace infer_tests {

using testing::error_of;
using testing::rel_diff;
using testing::TempDir;
namespace fs = std::filesystem;

ModelConfig infer_config(const std::string& structure, std::vector<float> ret) {
  ModelConfig c;
  c.vocab_size = 400;
  c.dim = 32;
  c.ffn_dim = 48;
  c.n_heads = 4;
  c.context = 96;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(ret);
  return c;
}

void randomize(Model& m, uint64_t seed) { testing::spread_weights(m, seed); }

// Prefill `prefill` tokens (in two chunks when `chunked`), then one token at a time; every
// position's logits must equal the full inference-mode forward's.
void check_incremental(const std::string& structure, std::vector<float> ret, float threshold, int T, int prefill,
                       bool chunked) {
  Model m(infer_config(structure, ret));
  randomize(m, 3);
  m.knobs().keep_threshold = threshold;
  const int V = m.config().vocab_size;
  Rng r(4);
  std::vector<int32_t> tok(T);
  for (auto& t : tok) t = (int32_t)(1 + r.below(V - 1));
  std::vector<float> full((size_t)T * V);
  m.forward(tok.data(), nullptr, 1, T, full.data(), Mode::Inference);
  std::vector<float> inc((size_t)T * V);
  SequenceCache c = m.new_cache();
  if (chunked && prefill > 1) {
    const int half = prefill / 2;
    m.forward_cached(c, tok.data(), half, inc.data(), true);
    m.forward_cached(c, tok.data() + half, prefill - half, inc.data() + (size_t)half * V, true);
  } else {
    m.forward_cached(c, tok.data(), prefill, inc.data(), true);
  }
  for (int t = prefill; t < T; ++t) m.forward_cached(c, tok.data() + t, 1, inc.data() + (size_t)t * V, false);
  EXPECT_LT(rel_diff(inc.data(), full.data(), (int64_t)T * V), 1e-4)
      << structure << " threshold " << threshold << " prefill " << prefill << (chunked ? " chunked" : "");
  EXPECT_EQ(c.length, T);
  // The cache of a block holds exactly the tokens its segment kept.
  if (!m.structure().is_plain()) {
    const auto& seg1 = m.structure().segments[1];
    const int inner_block = seg1.items[0].is_block ? seg1.items[0].index : -1;
    if (inner_block >= 0) {
      EXPECT_EQ(c.rows[inner_block], c.kept[0]);
    }
    EXPECT_LT(c.bytes(), 2 * sizeof(float) * (size_t)m.config().n_layers * T * m.config().dim);
    EXPECT_GT(c.kept[0], 0) << "the test should keep some tokens";
    EXPECT_LT(c.kept[0], c.seen[0]) << "the test should drop some tokens";
  }
}

TEST(Infer, LlamaIncrementalMatchesFullForward) {
  for (int prefill : {1, 7, 40}) check_incremental("TTT", {}, 0.f, 48, prefill, false);
  check_incremental("TTT", {}, 0.f, 48, 20, true);
}

TEST(Infer, NestedSubllmIncrementalMatchesFullForward) {
  for (float v : {0.0f, 0.5f, -0.4f})
    for (int prefill : {1, 9, 33}) check_incremental("T(T(TT)T)T", {0.6f, 0.5f}, v, 50, prefill, false);
  check_incremental("T(T(TT)T)T", {0.6f, 0.5f}, 0.f, 50, 30, true);
  check_incremental("(T)T(TT)", {0.6f}, 0.2f, 41, 5, true);
}

TEST(Infer, CacheRefusesToOverflowTheContext) {
  Model m(infer_config("TT", {}));
  randomize(m, 1);
  SequenceCache c = m.new_cache();
  std::vector<int32_t> tok(96, 5);
  std::vector<float> logits(400);
  m.forward_cached(c, tok.data(), 96, logits.data(), false);
  std::string msg = error_of([&] { m.forward_cached(c, tok.data(), 1, logits.data(), false); });
  EXPECT_NE(msg.find("context is full"), std::string::npos) << msg;
  SequenceCache d = m.new_cache();
  int32_t bad = 400;
  msg = error_of([&] { m.forward_cached(d, &bad, 1, logits.data(), false); });
  EXPECT_NE(msg.find("token id 400"), std::string::npos) << msg;
}

TEST(Infer, SamplerRules) {
  std::vector<float> base = {0.1f, 2.0f, 1.5f, -1.0f, 1.9f};
  SamplingOptions greedy;
  greedy.temperature = 0;
  std::vector<float> l = base;
  EXPECT_EQ(Sampler(greedy).sample(l, {}), 1);
  // A repetition penalty on token 1 (2.0 / 1.5 = 1.33) lets token 4 win.
  greedy.repeat_penalty = 1.5f;
  l = base;
  EXPECT_EQ(Sampler(greedy).sample(l, {1, 1, 3}), 4);
  EXPECT_FLOAT_EQ(l[3], -1.5f);  // negative logits are multiplied
  SamplingOptions topk;
  topk.top_k = 1;
  topk.temperature = 5.0f;
  for (int i = 0; i < 20; ++i) {
    l = base;
    topk.seed = i;
    EXPECT_EQ(Sampler(topk).sample(l, {}), 1);
  }
  SamplingOptions hot;
  hot.temperature = 1.0f;
  hot.top_k = 0;
  hot.top_p = 1.0f;
  std::vector<int> counts(5, 0);
  Sampler s(hot);
  for (int i = 0; i < 4000; ++i) {
    l = base;
    counts[s.sample(l, {})]++;
  }
  // Probabilities of softmax(base): token 1 ≈ 0.37, token 3 ≈ 0.02.
  EXPECT_NEAR(counts[1] / 4000.0, 0.369, 0.03);
  EXPECT_NEAR(counts[3] / 4000.0, 0.019, 0.01);
  SamplingOptions nucleus = hot;
  nucleus.top_p = 0.5f;  // {1, 4} hold 0.70 > 0.5 after 1 alone holds 0.37
  Sampler sn(nucleus);
  for (int i = 0; i < 200; ++i) {
    l = base;
    int t = sn.sample(l, {});
    EXPECT_TRUE(t == 1 || t == 4) << t;
  }
}

TEST(Infer, ArgmaxIsTheFirstLargestAsMaxElement) {
  Rng rng(5);
  for (int n : {1, 2, 63, 64, 65, 200, 32000}) {
    std::vector<float> x(n);
    for (int round = 0; round < 4; ++round) {
      // Few distinct values, so the largest repeats; ±0 compare equal.
      for (float& v : x) v = (float)rng.below(round == 3 ? 2 : 7) - (round == 2 ? 9.0f : 3.0f);
      if (round == 1 && n > 3) x[n - 1] = x[n / 2] = 99.0f;
      if (round == 3) x[rng.below(n)] = -0.0f;
      EXPECT_EQ(kernels::argmax(x.data(), n), std::max_element(x.begin(), x.end()) - x.begin()) << n << " " << round;
    }
    x[n / 2] = std::nanf("");  // NaN follows max_element's comparisons too
    EXPECT_EQ(kernels::argmax(x.data(), n), std::max_element(x.begin(), x.end()) - x.begin()) << n;
  }
}

// The top-k sampler as a full sort of the token ids would pick: the same token for each seed.
TEST(Infer, TopKSamplingPicksAsAFullSortWould) {
  Rng rng(9);
  const int V = 3000;
  std::vector<float> base(V);
  for (float& v : base) v = (float)rng.below(400) * 0.01f;  // many ties
  for (int k : {1, 5, 40, 2999}) {
    for (uint64_t seed = 0; seed < 30; ++seed) {
      SamplingOptions o;
      o.top_k = k;
      o.top_p = seed % 2 ? 0.9f : 1.0f;
      o.seed = seed;
      std::vector<float> l = base;
      const int32_t got = Sampler(o).sample(l, {});
      // The reference: every id sorted by logit (ties by id), the first k kept.
      std::vector<int32_t> idx(V);
      std::iota(idx.begin(), idx.end(), 0);
      std::sort(idx.begin(), idx.end(),
                [&](int32_t a, int32_t b) { return base[a] > base[b] || (base[a] == base[b] && a < b); });
      std::vector<double> p(k);
      double sum = 0, acc = 0, total = 0;
      for (int i = 0; i < k; ++i) sum += p[i] = std::exp((base[idx[i]] - base[idx[0]]) / o.temperature);
      int keep = k;
      for (int i = 0; i < k && o.top_p < 1.0f; ++i)
        if ((acc += p[i] / sum) >= o.top_p) {
          keep = i + 1;
          break;
        }
      for (int i = 0; i < keep; ++i) total += p[i];
      Rng draw(seed);
      double u = draw.uniform() * total;
      int32_t want = idx[keep - 1];
      for (int i = 0; i < keep; ++i)
        if ((u -= p[i]) <= 0) {
          want = idx[i];
          break;
        }
      EXPECT_EQ(got, want) << "k " << k << " seed " << seed;
    }
  }
}

// A model folder with a tokenizer trained on a tiny corpus.
std::string make_model_dir(const TempDir& tmp, const std::string& structure, std::vector<float> ret) {
  testing::write_corpus(tmp.path() / "corpus", 40);
  PrepareOptions p;
  p.inputs = {(tmp.path() / "corpus").string()};
  p.out_dir = tmp.file("data");
  p.vocab_size = 400;
  p.log = [](const std::string&) {};
  prepare_data(p);
  const std::string dir = tmp.file("model");
  fs::create_directories(dir);
  Model m(infer_config(structure, ret));
  randomize(m, 7);
  m.save(dir + "/model.safetensors");
  save_config(m.config(), dir + "/config.json");
  fs::copy_file(tmp.file("data/tokenizer.model"), dir + "/tokenizer.model");
  return dir;
}

TEST(Infer, GenerationIsDeterministicAndInterleavedEqualsOneByOne) {
  TempDir tmp("infer");
  const std::string dir = make_model_dir(tmp, "T(TT)T", {0.6f});
  LoadedModel lm = load_model_dir(dir);
  Generator gen(*lm.model, lm.tokenizer);
  GenerateOptions o;
  o.max_new_tokens = 20;
  o.stop_at_eos = false;
  o.sampling.temperature = 0;
  const std::string a = gen.generate("The old sailor", o), b = gen.generate("The old sailor", o);
  EXPECT_EQ(a, b);
  EXPECT_FALSE(a.empty());
  o.sampling.temperature = 1.0f;
  o.sampling.seed = 11;
  const std::string s1 = gen.generate("The captain", o), s2 = gen.generate("The captain", o);
  EXPECT_EQ(s1, s2);
  std::vector<std::string> prompts = {"The captain", "A quiet student watched", ""};
  std::vector<GenerateStats> st;
  auto batch = gen.generate_interleaved(prompts, o, &st);
  ASSERT_EQ(batch.size(), 3u);
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateOptions oi = o;
    oi.sampling.seed = o.sampling.seed + i;
    EXPECT_EQ(batch[i], gen.generate(prompts[i], oi)) << "prompt " << i;
    EXPECT_EQ(st[i].generated_tokens, 20);
    EXPECT_EQ(st[i].retention.size(), 1u);
  }
  // Streaming hands out exactly the returned text.
  std::string streamed;
  GenerateStats gs;
  const std::string full = gen.generate("Our nation", o, [&](const std::string& t) { streamed += t; }, &gs);
  EXPECT_EQ(streamed, full);
  EXPECT_GT(gs.decode_tokens_per_s(), 0);
  EXPECT_LT(gs.kv_cache_bytes, gs.kv_cache_bytes_llama);
}

// Sessions share one loaded model: two threads generating at once give the tokens that two
// sequential runs give, and neither disturbs the other's knobs or counters.
TEST(Infer, TwoSessionsOnOneModelGenerateConcurrentlyAsSequentially) {
  TempDir tmp("infer");
  LoadedModel lm = load_model_dir(make_model_dir(tmp, "T(TT)T", {0.6f}));
  GenerateOptions o;
  o.max_new_tokens = 24;
  o.stop_at_eos = false;
  o.sampling.temperature = 0.8f;
  o.sampling.seed = 5;
  const std::vector<std::string> prompts = {"The captain of the ship", "Our nation and its people"};
  std::vector<std::string> sequential;
  std::vector<std::vector<double>> retention(2);
  for (size_t i = 0; i < prompts.size(); ++i) {
    Session session(lm.model->weights());
    GenerateStats gs;
    sequential.push_back(Generator(session, lm.tokenizer).generate(prompts[i], o, nullptr, &gs));
    retention[i] = gs.retention;
  }
  ASSERT_NE(sequential[0], sequential[1]);
  for (int round = 0; round < 3; ++round) {
    std::vector<std::string> concurrent(2);
    std::vector<GenerateStats> stats(2);
    std::vector<std::thread> threads;
    for (size_t i = 0; i < prompts.size(); ++i)
      threads.emplace_back([&, i] {
        Session session(lm.model->weights());
        concurrent[i] = Generator(session, lm.tokenizer).generate(prompts[i], o, nullptr, &stats[i]);
      });
    for (auto& t : threads) t.join();
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(concurrent[i], sequential[i]) << "prompt " << i << ", round " << round;
      EXPECT_EQ(stats[i].retention, retention[i]) << "prompt " << i;
    }
  }
  // A session's knobs are its own: a threshold set on one does not reach another.
  Session a(lm.model->weights()), b(lm.model->weights());
  a.knobs().keep_threshold = 5.0f;
  EXPECT_EQ(b.keep_threshold(0), 0.0f);
}

TEST(Infer, StopStringsEndGenerationAndAreNotShown) {
  TempDir tmp("infer");
  LoadedModel lm = load_model_dir(make_model_dir(tmp, "TT", {}));
  Generator gen(*lm.model, lm.tokenizer);
  GenerateOptions o;
  o.max_new_tokens = 30;
  o.stop_at_eos = false;
  o.sampling.temperature = 0;
  const std::string full = gen.generate("The river", o);
  ASSERT_GE(full.size(), 4u);
  o.stop = {full.substr(2, 2)};
  std::string streamed;
  const std::string cut = gen.generate("The river", o, [&](const std::string& t) { streamed += t; });
  EXPECT_EQ(cut, full.substr(0, full.find(o.stop[0])));
  EXPECT_EQ(streamed, cut);
}

TEST(Infer, PromptLimitsAndModelFolderErrors) {
  TempDir tmp("infer");
  const std::string dir = make_model_dir(tmp, "TT", {});
  LoadedModel lm = load_model_dir(dir);
  Generator gen(*lm.model, lm.tokenizer);
  GenerateOptions o;
  o.max_new_tokens = 10;
  std::string longp;
  for (int i = 0; i < 200; ++i) longp += "word" + std::to_string(i) + " ";
  std::string msg = error_of([&] { gen.generate(longp, o); });
  EXPECT_NE(msg.find("--truncate"), std::string::npos) << msg;
  o.truncate = true;
  EXPECT_EQ(gen.prompt_tokens(longp, o).size(), 96u - 10u);
  EXPECT_NO_THROW(gen.generate(longp, o));
  // An empty prompt starts a fresh document; without the document-start token it is an error.
  o.truncate = false;
  EXPECT_EQ(gen.prompt_tokens("", o).size(), 1u);
  o.document_start = false;
  EXPECT_NE(error_of([&] { gen.prompt_tokens("", o); }).find("empty prompt"), std::string::npos);

  EXPECT_NE(error_of([&] { load_model_dir(tmp.file("nope")); }).find("does not exist"), std::string::npos);
  fs::remove(dir + "/tokenizer.model");
  EXPECT_NE(error_of([&] { load_model_dir(dir); }).find("tokenizer.model"), std::string::npos);
  // A tokenizer larger than the model's vocabulary does not belong to it.
  ModelConfig small = infer_config("TT", {});
  small.vocab_size = 300;
  save_config(small, dir + "/config.json");
  fs::copy_file(tmp.file("data/tokenizer.model"), dir + "/tokenizer.model");
  msg = error_of([&] { load_model_dir(dir); });
  EXPECT_NE(msg.find("do not belong together"), std::string::npos) << msg;
}

}  // namespace infer_tests
}  // namespace subllm

namespace subllm {
namespace infer_tests {

// A Decoding fed its prompt in chunks of 3 scores every prompt token as one chunk does, and
// as the full inference-mode forward does (log softmax of the row before each token); the
// greedy continuation and the token depths are the same too.
TEST(Infer, DecodingInChunksScoresThePromptAsOnePass) {
  TempDir tmp("infer");
  LoadedModel lm = load_model_dir(make_model_dir(tmp, "T(TT)T", {0.6f}));
  Session& s = lm.model->session();
  const int V = lm.model->config().vocab_size;
  GenerateOptions o;
  o.max_new_tokens = 6;
  o.sampling.temperature = 0;
  o.prompt_logprobs = true;
  o.top_logprobs = 2;
  o.record_depth = true;
  Generator gen(*lm.model, lm.tokenizer);
  const std::vector<int32_t> ids = gen.prompt_tokens("The old sailor watched the distant harbour", o);
  auto run = [&](int chunk) {
    auto d = std::make_unique<Decoding>(s, lm.tokenizer, ids, o, true);
    std::vector<float> logits;
    while (!d->done()) {
      const Session::CachedStep step = d->next_step(chunk);
      logits.resize((size_t)d->step_rows() * V);
      s.forward_cached_batch({step}, logits.data());
      d->take_logits(logits.data());
    }
    return d;
  };
  auto whole = run(1000), chunked = run(3);
  EXPECT_EQ(whole->text(), chunked->text());
  ASSERT_EQ(whole->prompt_records().size(), ids.size());
  ASSERT_EQ(chunked->prompt_records().size(), ids.size());
  std::vector<float> full(ids.size() * (size_t)V);
  lm.model->forward(ids.data(), nullptr, 1, (int)ids.size(), full.data(), Mode::Inference);
  std::set<int> depths;
  for (size_t p = 1; p < ids.size(); ++p) {
    const float* row = full.data() + (p - 1) * V;
    double mx = row[0], sum = 0;
    for (int i = 1; i < V; ++i) mx = std::max(mx, (double)row[i]);
    for (int i = 0; i < V; ++i) sum += std::exp(row[i] - mx);
    const double expected = row[ids[p]] - mx - std::log(sum);
    EXPECT_NEAR(whole->prompt_records()[p].logprob, expected, 1e-3) << "token " << p;
    EXPECT_NEAR(chunked->prompt_records()[p].logprob, expected, 1e-3) << "token " << p;
    EXPECT_EQ(chunked->prompt_records()[p].top.size(), 2u);
    EXPECT_EQ(whole->prompt_records()[p].depth, chunked->prompt_records()[p].depth) << "token " << p;
    depths.insert(whole->prompt_records()[p].depth);
  }
  EXPECT_TRUE(std::isnan(whole->prompt_records()[0].logprob));
  EXPECT_GE(depths.size(), 2u) << "the subsampler should keep some prompt tokens and drop others";
  // Generated tokens: log-probabilities of greedy picks are the row maxima (<= 0).
  for (const auto& r : whole->records()) EXPECT_LE(r.logprob, 0.0f);
  EXPECT_EQ(whole->stats().prompt_tokens, (int)ids.size());
}

}  // namespace infer_tests
}  // namespace subllm
