#pragma once
// Few-shot prompts share their start (the demonstrations, or a subject's examples): it runs
// through the model once, and each prompt that begins with it continues from a copy of its
// cache. Private to the evaluation sources.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "subllm/model.h"

namespace subllm {

class SharedPrefix {
 public:
  explicit SharedPrefix(Model& m) : m_(m) {}

  // Runs `ids`, the tokens prompts will start with, unless it leaves no room for `max_new`
  // generated tokens. Its last tokens may merge with what follows them in a prompt: left out.
  void set(std::vector<int32_t> ids, int max_new) {
    ids_ = std::move(ids);
    ids_.resize(ids_.size() > 3 ? ids_.size() - 2 : 0);
    active_ = !ids_.empty() && ids_.size() + max_new < (size_t)m_.config().context;
    if (!active_) return;
    cache_ = m_.new_cache();
    std::vector<float> logits(m_.config().vocab_size);
    m_.forward_cached(cache_, ids_.data(), (int)ids_.size(), logits.data(), false);
  }
  void clear() {
    ids_.clear();
    active_ = false;
  }

  // Runs a prompt into `cache`, from the prefix's cache when the prompt extends it; `last`
  // receives the next-token logits.
  void prefill(const std::vector<int32_t>& ids, SequenceCache& cache, std::vector<float>& last) {
    last.assign(m_.config().vocab_size, 0.f);
    size_t start = 0;
    if (active_ && ids.size() > ids_.size() && std::equal(ids_.begin(), ids_.end(), ids.begin())) {
      cache = cache_;
      start = ids_.size();
    } else {
      cache = m_.new_cache();
    }
    m_.forward_cached(cache, ids.data() + start, (int)(ids.size() - start), last.data(), false);
  }

 private:
  Model& m_;
  std::vector<int32_t> ids_;
  SequenceCache cache_;
  bool active_ = false;
};

}  // namespace subllm
