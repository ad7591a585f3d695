// Inference with a key/value cache: incremental decoding and (chunked) prefill of one
// sequence, in inference mode. Blocks inside subsamplers cache only the tokens that every
// enclosing subsampler kept; a token scoring at or below the threshold skips the segment.
#include <algorithm>
#include <cstring>

#include "kernels/kernels.h"
#include "model/block_io.h"
#include "subllm/error.h"
#include "subllm/model.h"

namespace subllm {

size_t SequenceCache::bytes() const {
  size_t total = 0;
  for (size_t b = 0; b < k.size(); ++b) total += 2 * sizeof(float) * (size_t)rows[b] * width;
  return total;
}

KVRows& KVRows::operator=(const KVRows& o) {
  if (this == &o) return *this;
  buf_.reset(o.cap_ ? new float[o.cap_] : nullptr);
  cap_ = o.cap_;
  used_ = o.used_;
  if (used_) std::memcpy(buf_.get(), o.buf_.get(), sizeof(float) * used_);
  return *this;
}

void KVRows::reserve(size_t floats) {
  if (floats <= cap_) return;
  const size_t cap = std::max(floats, cap_ * 2);
  std::unique_ptr<float[]> grown(new float[cap]);
  if (used_) std::memcpy(grown.get(), buf_.get(), sizeof(float) * used_);
  buf_ = std::move(grown);
  cap_ = cap;
}

SequenceCache Model::new_cache(int reserve_tokens) const {
  SequenceCache c;
  c.k.resize(cfg_.n_layers);
  c.v.resize(cfg_.n_layers);
  for (int b = 0; b < cfg_.n_layers && reserve_tokens > 0; ++b) {
    c.k[b].reserve((size_t)reserve_tokens * cfg_.dim);
    c.v[b].reserve((size_t)reserve_tokens * cfg_.dim);
  }
  c.rows.assign(cfg_.n_layers, 0);
  c.width = cfg_.dim;
  c.seen.assign(structure_.num_subsamplers, 0);
  c.kept.assign(structure_.num_subsamplers, 0);
  return c;
}

float Model::keep_threshold(int j) const {
  return j < (int)knobs_.keep_thresholds.size() ? knobs_.keep_thresholds[j] : knobs_.keep_threshold;
}

// x: (rows, C) in and out; pos, tokens: (rows) original positions and token ids.
void Model::segment_cached(SequenceCache& cache, int seg, float* x, int rows, const int32_t* pos,
                           const int32_t* tokens) {
  namespace k = kernels;
  const int C = cfg_.dim, F = cfg_.ffn_dim, H = cfg_.n_heads, hd = cfg_.head_dim();
  for (const SegmentItem& it : structure_.segments[seg].items) {
    if (it.is_block) {
      const int blk = it.index;
      // One workspace serves every block: blocks never run nested inside one another.
      const size_t need = (size_t)rows * (7 * C + 3 * F + 2 + H);
      if (infer_ws_.size() < need) infer_ws_.resize(need);
      float* w = infer_ws_.data();
      BlockIO io{w, w + (size_t)rows * C, w + (size_t)rows * 4 * C, w + (size_t)rows * 5 * C,
                 w + (size_t)rows * 6 * C, w + (size_t)rows * (6 * C + 2 * F), w + (size_t)rows * (6 * C + 3 * F),
                 w + (size_t)rows * (6 * C + 3 * F + 1)};
      float* lse = w + (size_t)rows * (6 * C + 3 * F + 2);
      float* y = lse + (size_t)rows * H;
      block_core(blk, x, y, rows, pos, io, [&] {
        KVRows& K = cache.k[blk];
        KVRows& V = cache.v[blk];
        const int L0 = cache.rows[blk], L = L0 + rows;
        K.reserve((size_t)L * C);
        V.reserve((size_t)L * C);
        for (int r = 0; r < rows; ++r) {
          std::memcpy(K.data() + (size_t)(L0 + r) * C, io.qkv + (size_t)r * 3 * C + C, sizeof(float) * C);
          std::memcpy(V.data() + (size_t)(L0 + r) * C, io.qkv + (size_t)r * 3 * C + 2 * C, sizeof(float) * C);
        }
        K.set_used((size_t)L * C);
        V.set_used((size_t)L * C);
        cache.rows[blk] = L;
        if (L0 == 0)
          k::attention_forward(io.qkv, io.qkv + C, io.qkv + 2 * C, 3 * C, io.att, C, lse, 1, rows, H, hd);
        else
          k::attention_cached(io.qkv, 3 * C, rows, K.data(), V.data(), C, L, H, hd, io.att, C);
      });
      std::memcpy(x, y, sizeof(float) * rows * C);
      continue;
    }
    const int child = it.index;
    const int j = structure_.segments[child].subsampler;
    std::vector<float> scores(rows);
    k::linear_forward(x, param_data() + score_offset_[j], scores.data(), rows, C, 1);
    std::vector<int32_t> kept, kpos, ktok;
    const float thr = keep_threshold(j);
    for (int r = 0; r < rows; ++r)
      if (scores[r] > thr && tokens[r] != cfg_.padding_idx) {
        kept.push_back(r);
        kpos.push_back(pos[r]);
        ktok.push_back(tokens[r]);
      }
    cache.seen[j] += rows;
    cache.kept[j] += (int64_t)kept.size();
    if (kept.empty()) continue;
    const int nk = (int)kept.size();
    std::vector<float> xk((size_t)nk * C);
    for (int i = 0; i < nk; ++i) std::memcpy(xk.data() + (size_t)i * C, x + (size_t)kept[i] * C, sizeof(float) * C);
    std::vector<float> x_in = xk;
    segment_cached(cache, child, xk.data(), nk, kpos.data(), ktok.data());
    const float* c = param_data() + bypass_offset_[j];
    for (int i = 0; i < nk; ++i) {
      const float wi = std::clamp(scores[kept[i]], 0.0f, 1.0f);
      float* o = x + (size_t)kept[i] * C;
      const float* xi = x_in.data() + (size_t)i * C;
      const float* yi = xk.data() + (size_t)i * C;
      for (int ch = 0; ch < C; ++ch) o[ch] = xi[ch] + c[ch] * wi * (yi[ch] - xi[ch]);
    }
  }
}

void Model::forward_cached(SequenceCache& cache, const int32_t* tokens, int n, float* logits, bool all_rows) {
  check(n > 0, "nothing to run: no new tokens");
  check(cache.length + n <= cfg_.context,
        "the context is full: " + std::to_string(cache.length) + " + " + std::to_string(n) + " tokens exceed " +
            std::to_string(cfg_.context) + " (tokens_per_sample); shorten the prompt or the generation");
  check_tokens(tokens, nullptr, n);
  const int C = cfg_.dim, V = cfg_.vocab_size;
  std::vector<float> x((size_t)n * C);
  std::vector<int32_t> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = cache.length + i;
  kernels::embedding_forward(tokens, param_data() + embed_offset_, x.data(), n, C);
  segment_cached(cache, 0, x.data(), n, pos.data(), tokens);
  cache.length += n;
  const int first = all_rows ? 0 : n - 1, count = all_rows ? n : 1;
  std::vector<float> normed((size_t)count * C), rstd(count);
  kernels::rmsnorm_forward(x.data() + (size_t)first * C, param_data() + final_norm_offset_, normed.data(), rstd.data(),
                           count, C, cfg_.norm_eps);
  const float* head = param_data() + (cfg_.tie_weights ? embed_offset_ : head_offset_);
  kernels::linear_forward(normed.data(), head, logits, count, C, V);
}

}  // namespace subllm
