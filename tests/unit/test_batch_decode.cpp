// Batched cached inference (Session::forward_cached_batch): several sequences' steps in one
// pass give what each would give alone through forward_cached, with per-step keep thresholds
// and token depths; bad batches are refused before any cache changes.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <utility>

#include "backend/backend.h"
#include "kernels/cpu/row_parts.h"
#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/rng.h"
#include "model_util.h"
#include "test_util.h"

namespace subllm {
namespace batch_decode_tests {

using testing::error_of;
using testing::random_tokens;
using Step = Session::CachedStep;
namespace k = kernels;

ModelConfig batch_config(const std::string& structure, std::vector<float> ret) {
  ModelConfig c;
  c.vocab_size = 300;
  c.dim = 32;
  c.ffn_dim = 48;
  c.n_heads = 4;
  c.context = 80;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(ret);
  return c;
}

void randomize(Model& m, uint64_t seed) { testing::spread_weights(m, seed); }

// The depth of every token of `tok` from a full inference-mode pass's traces: the deepest
// segment whose subsampler kept it.
std::vector<int> depths_from_traces(Model& m, const std::vector<int32_t>& tok) {
  const int T = (int)tok.size();
  m.forward(tok.data(), nullptr, 1, T, nullptr, Mode::Inference);
  const auto traces = m.last_traces();
  const Structure& s = m.structure();
  std::vector<std::vector<int>> root(s.segments.size());
  root[0].resize(T);
  for (int t = 0; t < T; ++t) root[0][t] = t;
  std::vector<int> depth(T, 0);
  for (size_t seg = 1; seg < s.segments.size(); ++seg) {  // parents come before children
    const Segment& g = s.segments[seg];
    for (int32_t p : traces[g.subsampler].kept) {
      const int r = root[g.parent][p];
      root[seg].push_back(r);
      depth[r] = std::max(depth[r], g.depth);
    }
  }
  return depth;
}

TEST(BatchDecode, PerStepKeepThresholdsEqualASessionWithThoseKnobs) {
  Model m(batch_config("T(TT(TT)TT)T", {0.6f, 0.5f}));
  randomize(m, 11);
  const int V = m.config().vocab_size;
  const std::vector<float> thr = {0.4f, -0.3f};
  Session tuned(m.weights());
  tuned.knobs().keep_thresholds = thr;
  Session plain(m.weights());  // keep_threshold 0: the batch's per-step values must override it
  const auto tok = random_tokens(30, V, 5);
  SequenceCache alone = tuned.new_cache(), batched = plain.new_cache();
  std::vector<float> want((size_t)30 * V), got((size_t)30 * V);
  tuned.forward_cached(alone, tok.data(), 20, want.data(), true);
  plain.forward_cached_batch({Step{&batched, tok.data(), 20, true, thr.data(), nullptr}}, got.data());
  for (int t = 20; t < 30; ++t) {
    tuned.forward_cached(alone, tok.data() + t, 1, want.data() + (size_t)t * V, false);
    plain.forward_cached_batch({Step{&batched, tok.data() + t, 1, false, thr.data(), nullptr}},
                               got.data() + (size_t)t * V);
  }
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-5f * (1 + std::fabs(want[i]))) << i;
  EXPECT_EQ(batched.kept, alone.kept);
  EXPECT_EQ(batched.seen, alone.seen);
  // The thresholds matter: the session's own knob keeps a different number of tokens.
  SequenceCache other = plain.new_cache();
  plain.forward_cached(other, tok.data(), 30, got.data(), false);
  EXPECT_NE(other.kept, alone.kept);
}

TEST(BatchDecode, DepthFollowsTheKeptPositions) {
  for (const char* structure : {"T(TT(TT)TT)T", "T(T)(TT)T", "TTT"}) {
    const std::string st = structure;
    std::vector<float> ret = st == "TTT" ? std::vector<float>{} : std::vector<float>{0.6f, 0.5f};
    Model m(batch_config(st, ret));
    randomize(m, 7);
    const int V = m.config().vocab_size, T = 40;
    const auto tok = random_tokens(T, V, 9);
    const std::vector<int> want = depths_from_traces(m, tok);
    SequenceCache c = m.new_cache();
    std::vector<uint8_t> depth(T, 99);
    std::vector<float> logits((size_t)T * V);
    m.session().forward_cached_batch({Step{&c, tok.data(), 17, false, nullptr, depth.data()}}, logits.data());
    for (int t = 17; t < T; ++t)
      m.session().forward_cached_batch({Step{&c, tok.data() + t, 1, false, nullptr, depth.data() + t}},
                                       logits.data());
    int deepest = 0, zeros = 0;
    for (int t = 0; t < T; ++t) {
      EXPECT_EQ((int)depth[t], want[t]) << structure << " token " << t;
      deepest = std::max(deepest, (int)depth[t]);
      zeros += depth[t] == 0;
    }
    if (st == "T(TT(TT)TT)T") {
      EXPECT_EQ(deepest, 2) << "the test should keep some tokens through both subsamplers";
      EXPECT_GT(zeros, 0) << "the test should drop some tokens at the first subsampler";
    }
    if (st == "TTT") {
      EXPECT_EQ(deepest, 0);
    }
  }
}


// 16 sequences of different prompt lengths join at different rounds; each round's batch mixes
// prefill chunks (some asking for all rows, some for the last) and greedy decode steps, and a
// quarter of the sequences carry their own keep thresholds. Every step's logits must equal
// those of its sequence run alone through forward_cached by a session with its thresholds.
void check_batch_equals_alone(ModelConfig cfg, float session_threshold, bool expect_ragged) {
  Model m(cfg);
  randomize(m, 21);
  const int V = m.config().vocab_size, S = 16, gen = 6, chunk = 8;
  const int num_sub = m.structure().num_subsamplers;
  const std::vector<float> own = num_sub ? std::vector<float>{0.5f, -0.2f} : std::vector<float>{};
  Session batch(m.weights());
  batch.knobs().keep_threshold = session_threshold;
  Session plain(m.weights()), tuned(m.weights());
  plain.knobs().keep_threshold = session_threshold;
  tuned.knobs().keep_thresholds = own;
  struct Seq {
    std::vector<int32_t> tokens;
    int prompt = 0, done = 0, start = 0;
    bool own_thresholds = false, all_rows = false;
    SequenceCache batched, alone;
  };
  std::vector<Seq> seqs(S);
  for (int i = 0; i < S; ++i) {
    Seq& q = seqs[i];
    q.prompt = 1 + (i * 7) % 23;
    q.tokens = random_tokens(q.prompt, V, 100 + i);
    q.start = i % 3;
    q.own_thresholds = num_sub && i % 4 == 1;
    q.all_rows = i % 2 == 0;
    q.batched = batch.new_cache();
    q.alone = (q.own_thresholds ? tuned : plain).new_cache();
  }
  int ragged_steps = 0, mixed_batches = 0;
  for (int round = 0;; ++round) {
    std::vector<Step> steps;
    std::vector<int> who;
    bool prefill = false, decode = false;
    for (int i = 0; i < S; ++i) {
      Seq& q = seqs[i];
      if (round < q.start || q.done >= q.prompt + gen) continue;
      const int n = q.done < q.prompt ? std::min(chunk, q.prompt - q.done) : 1;
      (q.done < q.prompt ? prefill : decode) = true;
      steps.push_back(Step{&q.batched, q.tokens.data() + q.done, n, q.all_rows && q.done < q.prompt,
                           q.own_thresholds ? own.data() : nullptr, nullptr});
      who.push_back(i);
    }
    if (steps.empty()) break;
    mixed_batches += prefill && decode;
    size_t rows = 0;
    for (const Step& s : steps) rows += s.all_rows ? s.n : 1;
    std::vector<float> got(rows * V);
    std::vector<std::vector<int64_t>> kept_before;
    for (const Step& s : steps) kept_before.push_back(s.cache->kept);
    batch.forward_cached_batch(steps, got.data());
    // Some sequence kept no rows at a subsampler where another in the batch kept some.
    for (int j = 0; j < num_sub; ++j) {
      bool zero = false, some = false;
      for (size_t k = 0; k < steps.size(); ++k) {
        const int64_t d = steps[k].cache->kept[j] - kept_before[k][j];
        (d == 0 ? zero : some) = true;
      }
      ragged_steps += zero && some;
    }
    const float* row = got.data();
    for (size_t k = 0; k < steps.size(); ++k) {
      Seq& q = seqs[who[k]];
      const Step& s = steps[k];
      const int count = s.all_rows ? s.n : 1;
      std::vector<float> want((size_t)count * V);
      (q.own_thresholds ? tuned : plain).forward_cached(q.alone, s.tokens, s.n, want.data(), s.all_rows);
      double scale = 0, worst = 0;
      for (size_t e = 0; e < want.size(); ++e) scale = std::max(scale, (double)std::fabs(want[e]));
      for (size_t e = 0; e < want.size(); ++e) worst = std::max(worst, std::fabs((double)row[e] - want[e]));
      EXPECT_LE(worst, 1e-5 * scale) << "sequence " << who[k] << " round " << round;
      const float* last_got = row + (size_t)(count - 1) * V;
      const float* last_want = want.data() + (size_t)(count - 1) * V;
      const int32_t tok_got = (int32_t)(std::max_element(last_got, last_got + V) - last_got);
      const int32_t tok_want = (int32_t)(std::max_element(last_want, last_want + V) - last_want);
      EXPECT_EQ(tok_got, tok_want) << "sequence " << who[k] << " round " << round;
      q.done += s.n;
      if (q.done >= q.prompt && q.done < q.prompt + gen) q.tokens.push_back(tok_got);  // greedy
      row += (size_t)count * V;
    }
  }
  for (int i = 0; i < S; ++i) {
    const Seq& q = seqs[i];
    EXPECT_EQ(q.batched.length, q.prompt + gen);
    EXPECT_EQ(q.batched.length, q.alone.length);
    EXPECT_EQ(q.batched.rows, q.alone.rows) << "sequence " << i;
    EXPECT_EQ(q.batched.kept, q.alone.kept) << "sequence " << i;
    EXPECT_EQ(q.batched.seen, q.alone.seen) << "sequence " << i;
  }
  EXPECT_GT(mixed_batches, 0) << "the test should mix prefill chunks and decode steps in one batch";
  if (expect_ragged) {
    EXPECT_GT(ragged_steps, 0) << "the test should have sequences keeping 0 rows beside others";
  }
}

TEST(BatchDecode, LlamaBatchEqualsEachSequenceAlone) {
  check_batch_equals_alone(batch_config("TTT", {}), 0.f, false);
  ModelConfig gqa = batch_config("TTT", {});
  gqa.n_kv_heads = 2;  // grouped-query attention: two query heads per key/value head
  check_batch_equals_alone(gqa, 0.f, false);
}

TEST(BatchDecode, NestedSubllmBatchEqualsEachSequenceAlone) {
  check_batch_equals_alone(batch_config("T(TT(TT)TT)T", {0.6f, 0.5f}), 0.1f, true);
  ModelConfig parent = batch_config("T(TT(TT)TT)T", {0.6f, 0.5f});
  parent.rope_parent_positions = true;
  parent.qk_bias = true;
  check_batch_equals_alone(parent, -0.1f, true);
  ModelConfig mqa = batch_config("T(TT(TT)TT)T", {0.6f, 0.5f});
  mqa.n_kv_heads = 1;  // multi-query attention
  check_batch_equals_alone(mqa, 0.1f, true);
}

TEST(BatchDecode, BadBatchesAreRefusedBeforeAnyCacheChanges) {
  Model m(batch_config("T(TT(TT)TT)T", {0.6f, 0.5f}));
  randomize(m, 3);
  const int V = m.config().vocab_size, ctx = m.config().context;
  Session& s = m.session();
  const auto tok = random_tokens(ctx, V, 4);
  SequenceCache a = s.new_cache(), b = s.new_cache(), full = s.new_cache();
  std::vector<float> logits((size_t)(ctx + 2) * V);
  s.forward_cached(a, tok.data(), 5, logits.data(), false);
  s.forward_cached(full, tok.data(), ctx - 1, logits.data(), false);
  auto snapshot = [&] {
    std::vector<std::vector<int64_t>> v;
    for (const SequenceCache* c : {&a, &b, &full}) {
      v.push_back({c->length});
      v.push_back(std::vector<int64_t>(c->rows.begin(), c->rows.end()));
      v.push_back(c->seen);
      v.push_back(c->kept);
    }
    return v;
  };
  const auto before = snapshot();
  auto refused = [&](std::vector<Step> steps, const std::string& part) {
    const std::string msg = error_of([&] { s.forward_cached_batch(steps, logits.data()); });
    EXPECT_NE(msg.find(part), std::string::npos) << "want '" << part << "' in: " << msg;
    EXPECT_EQ(snapshot(), before) << part;
  };
  const int32_t bad = V;
  const float nan_thr[2] = {std::nanf(""), 0.f};
  refused({Step{&a, tok.data(), 1}, Step{&b, tok.data(), 2}, Step{&a, tok.data(), 1}}, "share one cache");
  refused({Step{&a, tok.data(), 1}, Step{&b, nullptr, 2}}, "step 1: a step without its cache or tokens");
  refused({Step{&a, tok.data(), 1}, Step{nullptr, tok.data(), 2}}, "without its cache");
  refused({Step{&a, tok.data(), 1}, Step{&b, tok.data(), 0}}, "step 1: nothing to run");
  refused({Step{&b, tok.data(), 3}, Step{&a, tok.data(), -2}}, "nothing to run");
  // The full cache's step comes last: the first two would fit.
  refused({Step{&a, tok.data(), 4}, Step{&b, tok.data(), 4}, Step{&full, tok.data(), 2}}, "step 2: the context is full");
  refused({Step{&a, tok.data(), 1}, Step{&b, &bad, 1}}, "token id 300");
  refused({Step{&a, tok.data(), 1, false, nan_thr}}, "keep threshold 0 is NaN");
  SequenceCache other = Session(Model(batch_config("TTT", {})).weights()).new_cache();
  refused({Step{&a, tok.data(), 1}, Step{&other, tok.data(), 1}}, "not made for this model");
  // An empty batch does nothing; the last free position still takes one token.
  s.forward_cached_batch({}, logits.data());
  EXPECT_EQ(snapshot(), before);
  s.forward_cached_batch({Step{&full, tok.data(), 1}, Step{&b, tok.data(), 3, true}}, logits.data());
  EXPECT_EQ(full.length, ctx);
  EXPECT_EQ(b.length, 3);
}

// The batched decoding step's attention: several sequences against their own caches in one
// call equal one attention_cached per sequence (decode rows, chunks, different lengths).
TEST(BatchDecode, AttentionOfManySequencesEqualsOneAtATime) {
  for (int Hkv : {4, 2, 1}) {  // multi-head, grouped-query, multi-query
    Backend& be = cpu_backend();
    const int H = 4, hd = 8, C = H * hd, KV = Hkv * hd;
    Rng r(5);
    struct Seq {
      int m, L;
      std::vector<float> q = {}, k = {}, v = {}, want = {}, got = {};
    };
    std::vector<Seq> seqs = {{1, 37}, {5, 12}, {1, 1}, {3, 64}, {2, 2}};
    for (Seq& s : seqs) {
      for (auto* t : {&s.k, &s.v}) {
        t->resize((size_t)s.L * KV);
        for (float& x : *t) x = (float)r.normal();
      }
      s.q.resize((size_t)s.m * 3 * C);  // strided like a fused qkv block
      for (float& x : s.q) x = (float)r.normal();
      s.want.assign((size_t)s.m * C, 0.f);
      s.got.assign((size_t)s.m * C, -1.f);
  }
  std::vector<float> scratch(be.attention_cached_many_scratch_bytes(5, 64, H, hd) / sizeof(float) + 1);
  std::vector<Backend::CachedAttention> items;
  for (Seq& s : seqs) {
    const View q = mat(s.q.data(), s.m, C, 3 * C), k = mat(s.k.data(), s.L, KV), v = mat(s.v.data(), s.L, KV);
    std::vector<float> one(be.attention_cached_scratch_bytes(s.m, s.L, H, hd) / sizeof(float) + 1);
    be.attention_cached(q, k, v, mat(s.want.data(), s.m, C), H, Scratch{one.data(), one.size() * sizeof(float)});
    items.push_back({q, k, v, mat(s.got.data(), s.m, C)});
  }
  be.attention_cached_many(items.data(), (int)items.size(), H, Scratch{scratch.data(), scratch.size() * sizeof(float)});
  for (const Seq& s : seqs)
    for (size_t i = 0; i < s.want.size(); ++i)
      ASSERT_FLOAT_EQ(s.got[i], s.want[i]) << "m " << s.m << " L " << s.L << " kv heads " << Hkv;
  }
}

// Attention in blocks of cache rows (the AVX-512 path for head sizes that are multiples of 16;
// a multiple of 4 blocks of at most 64 rows by the cache length):
// against a plain softmax in double precision over F32 and BF16 caches, with caches shorter
// than a block, at and around block edges and of several blocks, decode rows and chunks, and
// multi-head, grouped-query and multi-query heads. Rows run alone, in a batch and on one
// thread give the same bits: a row's blocks combine in order however they are shared out.
TEST(BatchDecode, BlockedAttentionEqualsSoftmaxAndIsTheSameAloneOrBatched) {
  Backend& be = cpu_backend();
  ASSERT_TRUE(k::attention_blocks_take(16)) << "this machine should run the blocked attention (AVX-512)";
  for (bool bf16 : {false, true})
    for (int hd : {16, 64})
      for (int Hkv : {4, 2, 1}) {
        const int H = 4, C = H * hd, KV = Hkv * hd;
        Rng r(11 + hd + Hkv);
        struct Seq {
          int m, L;
          std::vector<float> q = {}, kf = {}, vf = {}, alone = {}, batched = {}, one_thread = {};
          std::vector<uint16_t> kb = {}, vb = {};
        };
        std::vector<Seq> seqs = {{1, 1}, {1, 63}, {1, 64}, {1, 65}, {1, 200}, {3, 130}, {2, 2}, {1, 700}, {1, 256}, {2, 257}};
        std::vector<Backend::CachedAttention> items;
        auto cache = [&](Seq& s, bool key) {
          std::vector<float>& f = key ? s.kf : s.vf;
          std::vector<uint16_t>& b = key ? s.kb : s.vb;
          return bf16 ? View{b.data(), DType::BF16, s.L, KV, KV} : mat(f.data(), s.L, KV);
        };
        for (Seq& s : seqs) {
          for (auto* t : {&s.kf, &s.vf}) {
            t->resize((size_t)s.L * KV);
            for (float& x : *t) x = (float)r.normal();
          }
          if (bf16) {  // the F32 copies become what the BF16 cache holds
            for (auto [f, b] : {std::pair{&s.kf, &s.kb}, std::pair{&s.vf, &s.vb}}) {
              b->resize(f->size());
              k::f32_to_bf16(f->data(), b->data(), (int64_t)f->size());
              k::bf16_to_f32(b->data(), f->data(), (int64_t)f->size());
            }
          }
          s.q.resize((size_t)s.m * 3 * C);
          for (float& x : s.q) x = (float)r.normal();
          for (auto* o : {&s.alone, &s.batched, &s.one_thread}) o->assign((size_t)s.m * C, -1.f);
          const View q = mat(s.q.data(), s.m, C, 3 * C);
          std::vector<float> one(be.attention_cached_scratch_bytes(s.m, s.L, H, hd) / sizeof(float));
          be.attention_cached(q, cache(s, true), cache(s, false), mat(s.alone.data(), s.m, C), H,
                              Scratch{one.data(), one.size() * sizeof(float)});
          items.push_back({q, cache(s, true), cache(s, false), mat(s.batched.data(), s.m, C)});
        }
        std::vector<float> scratch(be.attention_cached_many_scratch_bytes(3, 700, H, hd) / sizeof(float));
        be.attention_cached_many(items.data(), (int)items.size(), H, Scratch{scratch.data(), scratch.size() * sizeof(float)});
        const int threads = omp_get_max_threads();
        omp_set_num_threads(1);
        for (Seq& s : seqs)
          be.attention_cached(mat(s.q.data(), s.m, C, 3 * C), cache(s, true), cache(s, false),
                              mat(s.one_thread.data(), s.m, C), H, Scratch{scratch.data(), scratch.size() * sizeof(float)});
        omp_set_num_threads(threads);
        const float scale = 1.0f / std::sqrt((float)hd);
        for (const Seq& s : seqs) {
          const std::string where = std::string(bf16 ? "bf16" : "f32") + " hd " + std::to_string(hd) + " kv heads " +
                                    std::to_string(Hkv) + " m " + std::to_string(s.m) + " L " + std::to_string(s.L);
          for (size_t e = 0; e < s.alone.size(); ++e) {
            ASSERT_EQ(s.batched[e], s.alone[e]) << where;
            ASSERT_EQ(s.one_thread[e], s.alone[e]) << where;
          }
          for (int i = 0; i < s.m; ++i)
            for (int h = 0; h < H; ++h) {
              const int n = s.L - s.m + i + 1, g = h / (H / Hkv);
              std::vector<double> sc(n);
              double top = -1e300, den = 0;
              for (int j = 0; j < n; ++j) {
                double d = 0;
                for (int e = 0; e < hd; ++e) d += (double)s.q[(size_t)i * 3 * C + h * hd + e] * s.kf[(size_t)j * KV + g * hd + e];
                sc[j] = d * scale;
                top = std::max(top, sc[j]);
              }
              for (double& x : sc) den += (x = std::exp(x - top));
              for (int e = 0; e < hd; ++e) {
                double want = 0;
                for (int j = 0; j < n; ++j) want += sc[j] * s.vf[(size_t)j * KV + g * hd + e];
                want /= den;
                ASSERT_NEAR(s.alone[(size_t)i * C + h * hd + e], want, 2e-5 * (1 + std::fabs(want))) << where;
              }
            }
        }
      }
}

// The blocked attention keeps its scores and partials in the scratch the backend asks for:
// for every cache length up to 1200, a row alone (its blocks shared out), a chunk of rows and
// a batch (a row per thread) write nothing past a scratch of exactly that size, and a smaller
// scratch is refused.
TEST(BatchDecode, BlockedAttentionStaysInsideItsScratch) {
  Backend& be = cpu_backend();
  ASSERT_TRUE(k::attention_blocks_take(16)) << "this machine should run the blocked attention (AVX-512)";
  const int H = 4, hd = 16, C = H * hd, max_L = 1200;
  std::vector<float> kv((size_t)max_L * C, 0.25f), q((size_t)4 * C, 0.5f), out((size_t)4 * C);
  constexpr float kGuard = 12345.f;
  for (int L = 1; L <= max_L; L += L < 600 ? 1 : 7)
    for (int m : {1, std::min(L, 3)}) {
      const View k = mat(kv.data(), L, C), v = k;
      const size_t bytes = be.attention_cached_scratch_bytes(m, L, H, hd);
      std::vector<float> scratch(bytes / sizeof(float) + 64, kGuard);
      be.attention_cached(mat(q.data(), m, C), k, v, mat(out.data(), m, C), H, Scratch{scratch.data(), bytes});
      // Four sequences of one row each: at least two rows per thread, so a row per thread.
      std::vector<Backend::CachedAttention> items;
      for (int i = 0; i < 4; ++i) items.push_back({mat(q.data() + i * C, 1, C), k, v, mat(out.data() + i * C, 1, C)});
      const size_t many = be.attention_cached_many_scratch_bytes(1, L, H, hd);
      std::vector<float> many_scratch(many / sizeof(float) + 64, kGuard);
      be.attention_cached_many(items.data(), 4, H, Scratch{many_scratch.data(), many});
      for (int e = 0; e < 64; ++e) {
        ASSERT_EQ(scratch[bytes / sizeof(float) + e], kGuard) << "L " << L << " m " << m;
        ASSERT_EQ(many_scratch[many / sizeof(float) + e], kGuard) << "L " << L;
      }
      ASSERT_NEAR(out[0], 0.25f, 1e-6f);  // equal values: every weighting gives them back
    }
  std::vector<float> small(16);
  EXPECT_NE(error_of([&] {
              be.attention_cached(mat(q.data(), 1, C), mat(kv.data(), 100, C), mat(kv.data(), 100, C),
                                  mat(out.data(), 1, C), H, Scratch{small.data(), small.size() * sizeof(float)});
            }).find("attention_cached"),
            std::string::npos);
}

// The matrix-vector product of decoding (1 row, W split among threads in chunks) and the
// few-rows product of batched decoding (2..32 rows, W read once) against plain sums, with
// widths that leave tails of the 16- and 64-wide loops and of the 4-row tiles; accumulation
// too; a W of model size and one small enough for the calling thread alone.
TEST(BatchDecode, MatrixVectorAndFewRowsLinearEqualPlainSums) {
  Backend& be = cpu_backend();
  Rng r(8);
  // 66900 weights: the threads' paths on AVX-512 (BLAS elsewhere); 1200: the calling thread's
  for (auto [in, out] : {std::pair{300, 223}, std::pair{40, 30}}) {
    std::vector<float> w((size_t)out * in);
    for (float& v : w) v = (float)r.normal();
    for (int n : {1, 2, 3, 5, 16, 17, 32, 33}) {
      std::vector<float> x((size_t)n * in), y((size_t)n * out), base((size_t)n * out);
      for (float& v : x) v = (float)r.normal();
      for (float& v : base) v = (float)r.normal();
      for (bool acc : {false, true}) {
        y = base;
        be.linear_forward(mat(x.data(), n, in), mat(w.data(), out, in), mat(y.data(), n, out), acc);
        for (int i = 0; i < n; ++i)
          for (int o = 0; o < out; ++o) {
            double want = acc ? base[(size_t)i * out + o] : 0.0;
            for (int k = 0; k < in; ++k) want += (double)x[(size_t)i * in + k] * w[(size_t)o * in + k];
            ASSERT_NEAR(y[(size_t)i * out + o], want, 1e-4 * (1 + std::fabs(want)))
                << "in " << in << " out " << out << " n " << n << (acc ? " accumulate" : "");
          }
      }
    }
  }
}

// for_row_parts hands every row out exactly once, on one thread and on two, as single rows
// and as pairs of streams (rows a + i and b + i), whatever the row count against the chunk.
TEST(BatchDecode, RowPartsVisitEveryRowOnce) {
  const int threads = omp_get_max_threads();
  for (int nt : {1, 2}) {
    omp_set_num_threads(nt);
    for (int chunk : {1, 7, 27})
      for (int rows : {1, 5, 13, 14, 15, 54, 55, 223, 1000}) {
        std::vector<std::atomic<int>> seen(rows);
        std::atomic<int> paired{0};
        kernels::for_row_parts(
            rows, chunk,
            [&](int r0, int r1) {
              ASSERT_TRUE(0 <= r0 && r0 < r1 && r1 <= rows) << r0 << " " << r1;
              for (int r = r0; r < r1; ++r) seen[r]++;
            },
            [&](int a, int b, int n) {
              ASSERT_TRUE(n >= 1 && 0 <= a && a + n <= b && b + n <= rows) << a << " " << b << " " << n;
              for (int i = 0; i < n; ++i) seen[a + i]++, seen[b + i]++;
              paired += n;
            });
        const std::string where =
            std::to_string(nt) + " threads, " + std::to_string(rows) + " rows, chunk " + std::to_string(chunk);
        for (int r = 0; r < rows; ++r) ASSERT_EQ(seen[r].load(), 1) << where << ", row " << r;
        if (rows >= 2 * chunk) {
          EXPECT_GT(paired.load(), 0) << where;
        }
      }
  }
  omp_set_num_threads(threads);
}

}  // namespace batch_decode_tests
}  // namespace subllm
