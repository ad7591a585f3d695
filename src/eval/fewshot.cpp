// Few-shot classification: the authors' prompts and greedy exact-match scoring, or label
// log-likelihoods, on the KV cache.
#include <algorithm>
#include <chrono>
#include <cmath>

#include "eval/shared_prefix.h"
#include "kernels/select_kernels.h"
#include "subllm/error.h"
#include "subllm/eval.h"

namespace subllm {
namespace {

using Clock = std::chrono::steady_clock;

double log_softmax_at(const float* logits, int V, int id) {
  float mx = logits[0];
  for (int i = 1; i < V; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int i = 0; i < V; ++i) sum += std::exp((double)logits[i] - mx);
  return (double)logits[id] - mx - std::log(sum);
}

// Scores every continuation on a copy of `cache`, which already holds the prompt and whose
// next-token logits are `last`.
std::vector<double> score_after(Model& model, const SequenceCache& cache, const std::vector<float>& last,
                                const std::vector<std::vector<int32_t>>& conts) {
  const int V = model.config().vocab_size;
  std::vector<double> out;
  std::vector<float> rows;
  for (const auto& c : conts) {
    check(!c.empty(), "an empty continuation has no likelihood to score");
    double lp = log_softmax_at(last.data(), V, c[0]);
    if (c.size() > 1) {
      SequenceCache copy = cache;
      const int n = (int)c.size() - 1;
      rows.assign((size_t)n * V, 0.f);
      model.forward_cached(copy, c.data(), n, rows.data(), true);
      for (int i = 0; i < n; ++i) lp += log_softmax_at(rows.data() + (size_t)i * V, V, c[i + 1]);
    }
    out.push_back(lp);
  }
  return out;
}

size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return i;
}

// A prompt ready to run: its tokens, and per label the split of prompt + gap + label into
// the part shared with the prompt and the label's own tokens.
struct PreparedItem {
  std::vector<int32_t> ids;
  std::vector<size_t> shared;                // per label (loglik)
  std::vector<std::vector<int32_t>> full;    // per label: tokens of prompt + gap + label (loglik)
  int demos_used = 0;
  bool truncated = false;
};

class Evaluator {
 public:
  Evaluator(Model& m, const Tokenizer& tok, const FewshotTask& task, Scoring scoring)
      : m_(m), tok_(tok), task_(task), scoring_(scoring), V_(m.config().vocab_size), context_(m.config().context) {
    gap_ = label_gap(task);
    int longest = 0;
    for (const auto& l : task.labels) longest = std::max(longest, (int)tok.encode(l).size());
    max_new_ = task.max_new_tokens_exact ? task.max_new_tokens : std::max(task.max_new_tokens, longest + 2);
  }
  int max_new_tokens() const { return max_new_; }

  std::vector<int32_t> encode_doc(const std::string& text) const {
    std::vector<int32_t> ids{tok_.eos_id()};  // every document follows an end-of-document token
    for (int32_t t : tok_.encode(text)) ids.push_back(t);
    return ids;
  }

  // Demonstrations are dropped from the front until the prompt and what is scored or
  // generated after it fit the context; with none left, the query loses its first tokens.
  PreparedItem prepare(const std::vector<const FewshotExample*>& demos, const FewshotExample& query) const {
    PreparedItem p;
    for (size_t d = 0; d <= demos.size(); ++d) {
      std::vector<const FewshotExample*> used(demos.begin() + (long)d, demos.end());
      const std::string text = build_prompt(task_, used, query);
      p.ids = encode_doc(text);
      p.demos_used = (int)used.size();
      size_t need = p.ids.size() + max_new_;
      if (scoring_ == Scoring::Loglik) {
        p.full.clear();
        p.shared.clear();
        need = 0;
        for (const auto& label : task_.labels) {
          p.full.push_back(encode_doc(text + gap_ + label));
          p.shared.push_back(common_prefix(p.ids, p.full.back()));
          need = std::max(need, std::max(p.full.back().size(), p.ids.size() + 1));
        }
      }
      if (need <= (size_t)context_) return p;
      if (d < demos.size()) continue;
      // Even alone the query is too long: cut the same leading tokens (after the document
      // start) from the prompt and from every scored sequence.
      const size_t cut = need - (size_t)context_;
      check(cut < p.ids.size() - 1, "the model's context of " + std::to_string(context_) +
                                        " tokens cannot hold a test item and its answer");
      p.ids.erase(p.ids.begin() + 1, p.ids.begin() + 1 + (long)cut);
      for (size_t l = 0; l < p.full.size(); ++l) {
        p.full[l].erase(p.full[l].begin() + 1, p.full[l].begin() + 1 + (long)cut);
        p.shared[l] = common_prefix(p.ids, p.full[l]);
      }
      p.truncated = true;
    }
    return p;
  }

  // Prefills the shared demonstrations once per seed; later prompts that start with the same
  // tokens continue from a copy of that cache.
  void set_prefix(const std::vector<const FewshotExample*>& demos) {
    if (demos.empty()) return prefix_.clear();
    std::string text;
    for (const auto* d : demos) text += format_demonstration(task_, *d);
    prefix_.set(encode_doc(text), max_new_);
  }

  // Runs the prompt; leaves its cache and next-token logits.
  void prefill(const std::vector<int32_t>& ids, SequenceCache& cache, std::vector<float>& last) {
    prefix_.prefill(ids, cache, last);
  }

  FewshotItemResult run(const PreparedItem& p, int label) {
    FewshotItemResult r;
    r.label = label;
    r.demos_used = p.demos_used;
    r.truncated = p.truncated;
    SequenceCache cache;
    std::vector<float> last;
    prefill(p.ids, cache, last);
    if (scoring_ == Scoring::Generate) {
      r.generated = generate(cache, last);
      const std::string pred = normalise_prediction(r.generated);
      for (size_t l = 0; l < task_.labels.size(); ++l)
        if (pred == task_.labels[l]) {
          r.predicted = (int)l;
          break;
        }
      return r;
    }
    for (size_t l = 0; l < task_.labels.size(); ++l) {
      const auto& full = p.full[l];
      const size_t shared = p.shared[l];
      const std::vector<int32_t> cont(full.begin() + (long)shared, full.end());
      if (shared == p.ids.size()) {
        r.scores.push_back(score_after(m_, cache, last, {cont})[0]);
      } else {
        // The label merged with the prompt's last tokens: score it after its own split.
        const std::vector<int32_t> head(full.begin(), full.begin() + (long)shared);
        r.scores.push_back(continuation_log_likelihoods(m_, head, {cont})[0]);
      }
    }
    r.predicted = (int)(std::max_element(r.scores.begin(), r.scores.end()) - r.scores.begin());
    return r;
  }

 private:
  // Greedy decoding until end of document, the token budget, or a completed first line of
  // text (later tokens cannot change the prediction).
  std::string generate(SequenceCache& cache, std::vector<float>& logits) {
    std::vector<int32_t> out;
    std::string text;
    for (int step = 0; step < max_new_; ++step) {
      const int32_t id = kernels::argmax(logits.data(), (int)logits.size());  // the first maximum, as torch.argmax
      if (id == tok_.eos_id()) break;
      out.push_back(id);
      text = tok_.decode(out);
      // The answer's first line is complete once a newline follows its first non-space
      // character (searched from there: a byte of a leading multi-byte space may equal it).
      const size_t start = py_space_prefix(text);
      if (start < text.size() && text.find('\n', start) != std::string::npos) break;
      if (step + 1 < max_new_ && cache.length < context_) m_.forward_cached(cache, &id, 1, logits.data(), false);
      else break;
    }
    return text;
  }

  Model& m_;
  const Tokenizer& tok_;
  const FewshotTask& task_;
  Scoring scoring_;
  int V_, context_, max_new_ = 0;
  std::string gap_;
  SharedPrefix prefix_{m_};
};

}  // namespace

std::vector<double> continuation_log_likelihoods(Model& model, const std::vector<int32_t>& prompt,
                                                 const std::vector<std::vector<int32_t>>& continuations) {
  check(!prompt.empty(), "scoring needs at least one prompt token");
  SequenceCache cache = model.new_cache();
  std::vector<float> last(model.config().vocab_size);
  model.forward_cached(cache, prompt.data(), (int)prompt.size(), last.data(), false);
  return score_after(model, cache, last, continuations);
}

FewshotResult evaluate_fewshot(Model& model, const Tokenizer& tok, const FewshotTask& task,
                               const std::vector<FewshotExample>& train, const std::vector<FewshotExample>& test,
                               const FewshotOptions& o) {
  validate_task(task);
  check(o.shots >= 0, "--shots must not be negative, got " + std::to_string(o.shots));
  check(!o.seeds.empty(), "give at least one --seed");
  check(o.shots == 0 || !train.empty(), "the train split is empty: demonstrations are drawn from it");
  check(!test.empty(), "the test split is empty");
  const auto t0 = Clock::now();
  const std::vector<size_t> items = choose_test_items(test.size(), o.max_test);

  Evaluator ev(model, tok, task, o.scoring);
  FewshotResult res;
  res.task = task.name;
  res.scoring = o.scoring;
  res.shots = o.shots;
  res.max_new_tokens = ev.max_new_tokens();
  res.test_items = (int64_t)items.size();
  const int64_t total = (int64_t)items.size() * (int64_t)o.seeds.size();
  int64_t done = 0;
  for (uint32_t seed : o.seeds) {
    FewshotSeedResult sr;
    sr.seed = seed;
    std::vector<const FewshotExample*> demos;
    for (size_t i : choose_demonstrations(train.size(), o.shots, seed)) demos.push_back(&train[i]);
    ev.set_prefix(demos);
    for (size_t i : items) {
      const PreparedItem p = ev.prepare(demos, test[i]);
      FewshotItemResult r = ev.run(p, test[i].label);
      r.example = i;
      r.line = test[i].line;
      sr.correct += r.predicted == r.label;
      ++sr.total;
      if (r.demos_used < (int)demos.size()) {
        ++sr.shortened;
        sr.demos_dropped += (int64_t)demos.size() - r.demos_used;
      }
      sr.truncated += r.truncated;
      sr.items.push_back(std::move(r));
      if (o.progress) o.progress(++done, total);
    }
    sr.accuracy = 100.0 * (double)sr.correct / (double)sr.total;
    res.seeds.push_back(std::move(sr));
  }
  double sum = 0;
  for (const auto& s : res.seeds) sum += s.accuracy;
  res.mean = sum / (double)res.seeds.size();
  if (res.seeds.size() > 1) {
    double ss = 0;
    for (const auto& s : res.seeds) ss += (s.accuracy - res.mean) * (s.accuracy - res.mean);
    res.stddev = std::sqrt(ss / (double)(res.seeds.size() - 1));
  }
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

}  // namespace subllm
