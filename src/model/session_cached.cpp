// Inference with a key/value cache: incremental decoding and (chunked) prefill, in inference
// mode, of one sequence or of several at once (a batched step). Blocks inside subsamplers
// cache only the tokens that every enclosing subsampler kept; a token scoring at or below
// the threshold skips the segment.
//
// A batched step stacks the new rows of every sequence into one (sum n_i, C) stream, each
// sequence's rows contiguous, and walks the structure once: every GEMM, norm, RoPE and SwiGLU
// runs over all rows; attention runs per sequence against its own cache; a subsampler scores
// all rows at once, selects per sequence (its own threshold), reads every sequence's kept
// count in one device->host copy, and gathers the kept rows of all sequences into one ragged
// batch for the inner segment. forward_cached is the batch of one.
#include <algorithm>
#include <cmath>

#include "model/passes.h"
#include "subllm/error.h"

namespace subllm {

size_t SequenceCache::bytes() const {
  size_t total = 0;
  for (size_t b = 0; b < k.size(); ++b) total += 2 * element_bytes * (size_t)rows[b] * width;
  return total;
}

KVRows& KVRows::operator=(const KVRows& o) {
  if (this == &o) return *this;
  backend_ = o.backend_;
  dtype_ = o.dtype_;
  const size_t es = dtype_size(dtype_);
  buf_ = o.cap_ ? backend_->alloc_shared(es * o.cap_) : nullptr;
  cap_ = o.cap_;
  used_ = committed_ = o.used_;
  if (used_) backend_->copy(buf_.get(), o.buf_.get(), es * used_);
  return *this;
}

void KVRows::reserve(size_t elements) {
  if (elements <= committed_) return;
  check(backend_ != nullptr, "key/value rows without a backend: make caches with Session::new_cache");
  const size_t es = dtype_size(dtype_);
  if (elements > cap_) {
    const size_t cap = std::max(elements, cap_ * 2);
    std::shared_ptr<void> grown = backend_->alloc_shared(es * cap);
    if (used_) backend_->copy(grown.get(), buf_.get(), es * used_);
    buf_ = std::move(grown);
    cap_ = cap;
    committed_ = used_;
  }
  // All that was asked for, and an eighth more (at least 64 KB) of the capacity past it.
  const size_t ahead = std::max(elements / 8, ((size_t)64 << 10) / es);
  const size_t upto = std::min(cap_, std::max(elements, committed_ + ahead));
  backend_->commit(static_cast<char*>(buf_.get()) + es * committed_, es * (upto - committed_));
  committed_ = upto;
}

void Session::set_kv_dtype(DType dt) {
  const char* name = dt == DType::BF16 ? "bf16" : dt == DType::F32 ? "f32" : dtype_name(dt);
  check(w_.backend().takes_kv_dtype(dt), std::string("--kv-dtype ") + name + ": the " + w_.backend().name() +
                                             " backend keeps its key/value cache in its compute dtype (" +
                                             (w_.compute_dtype() == DType::BF16 ? "bf16" : "f32") +
                                             "): leave --kv-dtype out");
  kv_dtype_ = dt;
  kv_dtype_set_ = true;
}

SequenceCache Session::new_cache(int reserve_tokens) const {
  const ModelConfig& c = w_.config();
  SequenceCache cache;
  const DType dt = kv_dtype();
  cache.k.assign(c.n_layers, KVRows(&w_.backend(), dt));
  cache.v.assign(c.n_layers, KVRows(&w_.backend(), dt));
  for (int b = 0; b < c.n_layers && reserve_tokens > 0; ++b) {
    cache.k[b].reserve((size_t)reserve_tokens * c.kv_dim());
    cache.v[b].reserve((size_t)reserve_tokens * c.kv_dim());
  }
  cache.rows.assign(c.n_layers, 0);
  cache.width = c.kv_dim();  // key/value heads only: grouped-query attention caches less
  cache.element_bytes = dtype_size(dt);
  cache.seen.assign(w_.structure().num_subsamplers, 0);
  cache.kept.assign(w_.structure().num_subsamplers, 0);
  return cache;
}

void CachedSegment::reserve(Backend& be, int rows, int C, DType act) {
  if (rows <= cap) return;
  cap = std::max(rows, 2 * cap);
  x = be.empty({cap, (int64_t)C}, act);
  pos = be.empty({cap}, DType::I32);
  tok = be.empty({cap}, DType::I32);
  index = be.empty({cap}, DType::I32);
  scores = be.empty({cap});
  kept = be.empty({cap}, DType::I32);
  w = be.empty({cap});
  kept_local = be.empty({cap}, DType::I32);
  w_local = be.empty({cap});
  iota = be.empty({cap}, DType::I32);
  be.fill_positions(view_of(iota), 1, cap, 0);
}

void CachedSegment::reserve_sequences(Backend& be, int sequences) {
  if (sequences <= counts_cap) return;
  counts_cap = std::max(sequences, 2 * counts_cap);
  counts = be.empty({counts_cap}, DType::I32);
}

namespace {

// Makes `t` hold at least `numel` elements, uninitialised (doubling, so growth is amortised).
void ensure(Backend& be, Tensor& t, int64_t numel, DType dt = DType::F32) {
  const int64_t have = t.raw() ? t.numel() : 0;  // an unallocated tensor holds nothing
  if (have >= numel) return;
  t = be.empty({std::max(numel, 2 * have)}, dt);
}

// The cached walk of one batched step. A segment's rows are those of every sequence in turn;
// st.cseg[seg].off / n / before say where each sequence's rows are and how many rows its
// segment held before this step.
struct CachedPass {
  CachedPass(const Session& session, SessionState& state, const Session::CachedStep* steps, int count)
      : s(session), w(session.weights()), be(w.backend()), cfg(w.config()), st(state), step(steps), S(count) {}

  const Session& s;
  const Weights& w;
  Backend& be;
  const ModelConfig& cfg;
  SessionState& st;
  const Session::CachedStep* step;
  int S;
  bool want_depth = false;  // some step asks for its tokens' depths (st.host_depth, by root row)

  float threshold(int i, int j) const {
    return step[i].keep_thresholds ? step[i].keep_thresholds[j] : s.keep_threshold(j);
  }
  // x (rows, C) in and out; pos, tok, index (rows) i32.
  void segment(int seg, View x, int rows, View pos, View tok, View index, int depth);
  void block(int blk, const CachedSegment& g, View x, int rows, View pos);
};

void CachedPass::block(int blk, const CachedSegment& g, View x, int rows, View pos) {
  const int64_t C = cfg.dim, F = cfg.ffn_dim, H = cfg.n_heads, hd = cfg.head_dim(), KV = cfg.kv_dim();
  const DType ad = w.compute_dtype();
  // One workspace serves every block: blocks never run nested inside one another.
  // Activations in the compute dtype, per-row statistics in F32.
  ensure(be, st.block_ws, rows * (5 * C + 2 * KV + 3 * F), ad);
  ensure(be, st.block_stats, rows * (2 + H));
  char* ws = static_cast<char*>(st.block_ws.raw());
  float* stats = st.block_stats.f32();
  auto take = [&](int64_t cols) {
    View v{ws, ad, rows, cols, cols};
    ws += rows * cols * (int64_t)dtype_size(ad);
    return v;
  };
  auto take_f32 = [&](int64_t cols) {
    View v = mat(stats, rows, cols);
    stats += rows * cols;
    return v;
  };
  BlockIO io;
  io.n1 = take(C);
  io.qkv = take(C + 2 * KV);
  io.att = take(C);
  io.h = take(C);
  io.gu = take(2 * F);
  io.a = take(F);
  io.rstd1 = take_f32(1);
  io.rstd2 = take_f32(1);
  io.lse = take_f32(H);
  const View y = take(C);
  // Attention scratch: the most any one sequence's first chunk needs, or the sequences
  // attending to their caches together.
  size_t scratch = 0;
  int max_m = 0, max_L = 0;
  for (int i = 0; i < S; ++i) {
    const int m = g.n[i];
    if (m == 0) continue;
    const int L0 = step[i].cache->rows[blk];
    if (L0 == 0) {
      scratch = std::max(scratch, be.attention_scratch_bytes(1, m, (int)H, (int)hd, false));
    } else {
      max_m = std::max(max_m, m);
      max_L = std::max(max_L, L0 + m);
    }
  }
  if (max_L > 0) scratch = std::max(scratch, be.attention_cached_many_scratch_bytes(max_m, max_L, (int)H, (int)hd));
  ensure(be, st.scratch, (int64_t)scratch, DType::U8);
  io.scratch = scratch_of(st.scratch);
  if (cfg.qk_bias) {
    if (st.ones_rows < rows) {
      st.ones_rows = std::max<int64_t>(rows, 2 * st.ones_rows);
      st.ones = be.empty({st.ones_rows}, ad);
      fill_ones(be, view_of(st.ones));
    }
    io.ones = rows_of(st.ones, rows);
  }
  block_core(be, w, blk, x, y, pos, io, [&] {
    // Each sequence appends its rows' keys and values to its cache, then attends over it: a
    // first chunk on its own, the others against their caches in one call.
    std::vector<Backend::CachedAttention>& many = st.attend_many;
    many.clear();
    for (int i = 0; i < S; ++i) {
      const int m = g.n[i], r0 = g.off[i];
      if (m == 0) continue;
      SequenceCache& cache = *step[i].cache;
      KVRows& K = cache.k[blk];
      KVRows& V = cache.v[blk];
      const int L0 = cache.rows[blk], L = L0 + m;
      K.reserve((size_t)L * KV);
      V.reserve((size_t)L * KV);
      const View k_rows{K.data(), K.dtype(), L, KV, KV}, v_rows{V.data(), V.dtype(), L, KV, KV};
      const View qkv = io.qkv.rows_at(r0, m), att = io.att.rows_at(r0, m);
      if (K.dtype() == ad) {
        be.copy_rows(qkv.cols_at(C, KV), k_rows.rows_at(L0, m));
        be.copy_rows(qkv.cols_at(C + KV, KV), v_rows.rows_at(L0, m));
      } else {  // a cache in another dtype than the activations (bf16 under f32)
        be.convert(qkv.cols_at(C, KV), k_rows.rows_at(L0, m));
        be.convert(qkv.cols_at(C + KV, KV), v_rows.rows_at(L0, m));
      }
      K.set_used((size_t)L * KV);
      V.set_used((size_t)L * KV);
      cache.rows[blk] = L;
      if (L0 == 0)
        be.attention_forward(qkv.cols_at(0, C), qkv.cols_at(C, KV), qkv.cols_at(C + KV, KV), att,
                             mat(io.lse.f32() + (int64_t)r0 * H, m, H), 1, m, (int)H, io.scratch);
      else
        many.push_back({qkv.cols_at(0, C), k_rows, v_rows, att});
    }
    if (!many.empty()) be.attention_cached_many(many.data(), (int)many.size(), (int)H, io.scratch);
  });
  be.copy_rows(y, x);
}

void CachedPass::segment(int seg, View x, int rows, View pos, View tok, View index, int depth) {
  const int C = cfg.dim;
  const Structure& structure = w.structure();
  for (const SegmentItem& it : structure.segments[seg].items) {
    CachedSegment& g = st.cseg[seg];
    if (it.is_block) {
      block(it.index, g, x, rows, pos);
      continue;
    }
    const int child = it.index;
    const int j = structure.segments[child].subsampler;
    CachedSegment& b = st.cseg[child];
    b.reserve(be, rows, C, w.compute_dtype());
    b.reserve_sequences(be, S);
    be.score_forward(x, param_vec(w, w.score_offset(j), C), rows_of(b.scores, rows));
    // Select per sequence, each with its own threshold. The first sequence's rows start at
    // row 0, so its choice is already in batch rows and in place; the others land at their
    // parent offset and move into place once the counts are known.
    for (int i = 0; i < S; ++i) {
      const int m = g.n[i], r0 = g.off[i];
      if (m == 0) continue;
      const bool in_place = r0 == 0;
      be.select_threshold(view_of(b.scores).rows_at(r0, m), tok.rows_at(r0, m),
                          threshold(i, j), cfg.padding_idx, (in_place ? view_of(b.kept) : view_of(b.kept_local)).rows_at(r0, m),
                          (in_place ? view_of(b.w) : view_of(b.w_local)).rows_at(r0, m), view_of(b.counts).rows_at(i, 1));
    }
    // The kept lengths shape everything after: one read for every sequence.
    b.host_counts.resize(S);
    be.to_host(b.host_counts.data(), b.counts.raw(), sizeof(int32_t) * S);
    b.off.resize(S);
    b.n.resize(S);
    b.before.resize(S);
    int nk = 0;
    for (int i = 0; i < S; ++i) {
      const int m = g.n[i], r0 = g.off[i], k = m == 0 ? 0 : b.host_counts[i];
      SequenceCache& cache = *step[i].cache;
      b.off[i] = nk;
      b.n[i] = k;
      b.before[i] = cache.kept[j];
      cache.seen[j] += m;
      cache.kept[j] += k;
      if (k > 0 && r0 != 0) {
        // Own row index -> batch row (r0 + t), moved down to the packed offset.
        be.gather_rows(view_of(b.iota).rows_at(r0, m), view_of(b.kept_local).rows_at(r0, k),
                       view_of(b.kept).rows_at(nk, k));
        be.copy_rows(view_of(b.w_local).rows_at(r0, k), view_of(b.w).rows_at(nk, k));
      }
      nk += k;
    }
    if (nk == 0) continue;
    const View kept = rows_of(b.kept, nk), xk = rows_of(b.x, nk);
    if (want_depth) {
      b.root.resize(nk);
      be.to_host(b.root.data(), b.kept.raw(), sizeof(int32_t) * nk);
      for (int32_t& r : b.root) {
        r = g.root[r];
        st.host_depth[r] = (uint8_t)std::max<int>(st.host_depth[r], depth + 1);
      }
    }
    be.gather_rows(x, kept, xk);
    // Positions: the authors' "parent" rule takes each kept token's index in the parent
    // segment's sequence; otherwise it keeps its root position.
    be.gather_rows(cfg.rope_parent_positions ? index : pos, kept, rows_of(b.pos, nk));
    be.gather_rows(tok, kept, rows_of(b.tok, nk));
    bool nested = false;
    for (const SegmentItem& inner : structure.segments[child].items) nested |= !inner.is_block;
    if (cfg.rope_parent_positions && nested)
      for (int i = 0; i < S; ++i)
        if (b.n[i] > 0) be.fill_positions(view_of(b.index).rows_at(b.off[i], b.n[i]), 1, b.n[i], (int)b.before[i]);
    segment(child, xk, nk, rows_of(b.pos, nk), rows_of(b.tok, nk), rows_of(b.index, nk), depth + 1);
    // Upsample + bypass in place: x[kept] += c * w * (y' - x[kept]).
    be.upsample_bypass_forward(x, xk, kept, rows_of(b.w, nk), param_vec(w, w.bypass_offset(j), C), x);
  }
}

// The rows of checked steps, `total` in all (run_steps).
void run_checked_steps(const Session& session, SessionState& st, const Session::CachedStep* steps, int S,
                       int64_t total, float* logits) {
  const Weights& w = session.weights();
  const ModelConfig& c = w.config();
  const Structure& structure = w.structure();
  const int R = (int)total, C = c.dim, V = c.vocab_size;
  Backend& be = w.backend();
  st.cseg.resize(structure.segments.size());
  CachedSegment& root = st.cseg[0];
  root.reserve(be, R, C, w.compute_dtype());
  root.off.resize(S);
  root.n.resize(S);
  root.before.resize(S);
  // One upload: tokens (R), root positions (R), then the rows whose logits are asked for.
  std::vector<int32_t>& host = st.host_staging;
  host.resize(2 * (size_t)R);
  int r = 0, wanted = 0;
  bool want_depth = false;
  for (int i = 0; i < S; ++i) {
    const Session::CachedStep& s = steps[i];
    root.off[i] = r;
    root.n[i] = s.n;
    root.before[i] = s.cache->length;
    std::copy(s.tokens, s.tokens + s.n, host.begin() + r);
    for (int t = 0; t < s.n; ++t) host[R + r + t] = s.cache->length + t;
    r += s.n;
    wanted += s.all_rows ? s.n : 1;
    want_depth |= s.depth != nullptr;
  }
  const bool every_row = wanted == R;
  if (!every_row) {
    for (int i = 0; i < S; ++i) {
      const int r0 = root.off[i], m = root.n[i];
      if (steps[i].all_rows)
        for (int t = 0; t < m; ++t) host.push_back(r0 + t);
      else
        host.push_back(r0 + m - 1);
    }
  }
  ensure(be, st.staging, (int64_t)host.size(), DType::I32);
  be.to_device(st.staging.raw(), host.data(), sizeof(int32_t) * host.size());
  const View staged = view_of(st.staging);
  const View tok = staged.rows_at(0, R), pos = staged.rows_at(R, R);
  const View x = rows_of(root.x, R);
  if (want_depth) {
    st.host_depth.assign(R, 0);
    root.root.resize(R);
    for (int t = 0; t < R; ++t) root.root[t] = t;
  }
  be.embedding_forward(tok, param(w, w.embed_offset(), V, C), x);
  CachedPass pass(session, st, steps, S);
  pass.want_depth = want_depth;
  // At the root a row's index in its sequence is its position.
  pass.segment(0, x, R, pos, tok, pos, 0);
  for (int i = 0; i < S; ++i) steps[i].cache->length += steps[i].n;
  if (want_depth)
    for (int i = 0; i < S; ++i)
      if (steps[i].depth) std::copy_n(st.host_depth.begin() + root.off[i], root.n[i], steps[i].depth);
  // Final norm and head over the rows whose logits are asked for.
  View head_in = x;
  if (S == 1 && !every_row) {
    head_in = x.rows_at(R - 1, 1);  // one sequence's last row: no gather
  } else if (!every_row) {
    ensure(be, st.head_in, (int64_t)wanted * C, w.compute_dtype());
    head_in = View{st.head_in.raw(), w.compute_dtype(), wanted, C, C};
    be.gather_rows(x, staged.rows_at(2 * (int64_t)R, wanted), head_in);
  }
  ensure(be, st.normed, (int64_t)wanted * C, w.compute_dtype());
  ensure(be, st.rstd, wanted);
  // Logits in F32 from compute-dtype operands; the CPU backend writes them where the caller
  // wants them (no copy of a vocabulary-wide row per token).
  const bool on_host = &be == &cpu_backend();
  if (!on_host) ensure(be, st.logits, (int64_t)wanted * V);
  const View normed = View{st.normed.raw(), w.compute_dtype(), wanted, C, C};
  const View out = mat(on_host ? logits : st.logits.f32(), wanted, V);
  be.rmsnorm_forward(head_in, param_vec(w, w.final_norm_offset(), C), normed, vec(st.rstd.f32(), wanted), c.norm_eps);
  be.linear_forward(normed, param(w, w.head_offset(), V, C), out);
  if (!on_host) be.to_host(logits, out.data, sizeof(float) * wanted * V);
}

// One batched step; forward_cached and forward_cached_batch both come here.
void run_steps(const Session& session, SessionState& st, const Session::CachedStep* steps, int S, float* logits) {
  const Weights& w = session.weights();
  const ModelConfig& c = w.config();
  const Structure& structure = w.structure();
  const int num_sub = structure.num_subsamplers;
  // Everything is checked before anything runs, so a refused batch changes no cache.
  auto where = [&](int i) { return S > 1 ? "step " + std::to_string(i) + ": " : std::string(); };
  int64_t total = 0;
  for (int i = 0; i < S; ++i) {
    const Session::CachedStep& s = steps[i];
    check(s.cache != nullptr && s.tokens != nullptr,
          where(i) + "a step without its cache or tokens: give every step a cache and its new tokens");
    if (s.n <= 0) throw Error(where(i) + "nothing to run: no new tokens (n = " + std::to_string(s.n) + ")");
    for (int k = 0; k < i; ++k)
      if (steps[k].cache == s.cache)
        throw Error("forward_cached_batch: steps " + std::to_string(k) + " and " + std::to_string(i) +
                    " share one cache; give each sequence one step per batch");
    const SequenceCache& cache = *s.cache;
    check((int)cache.k.size() == c.n_layers && (int)cache.v.size() == c.n_layers && (int)cache.rows.size() == c.n_layers &&
              cache.width == c.kv_dim() && (int)cache.seen.size() == num_sub && (int)cache.kept.size() == num_sub &&
              cache.element_bytes == dtype_size(session.kv_dtype()) && (c.n_layers == 0 || cache.k[0].dtype() == session.kv_dtype()),
          where(i) + "the cache was not made for this model and session (its size or --kv-dtype differs): make it "
                     "with this session's Session::new_cache");
    if (cache.length + (int64_t)s.n > c.context)
      throw Error(where(i) + "the context is full: " + std::to_string(cache.length) + " + " + std::to_string(s.n) +
                  " tokens exceed " + std::to_string(c.context) +
                  " (tokens_per_sample); shorten the prompt or the generation");
    try {
      check_token_ids(c, s.tokens, nullptr, s.n);
    } catch (const Error& e) {
      throw Error(where(i) + e.what());
    }
    if (s.keep_thresholds)
      for (int j = 0; j < num_sub; ++j)
        if (std::isnan(s.keep_thresholds[j]))
          throw Error(where(i) + "keep threshold " + std::to_string(j) + " is NaN: give a number");
    total += s.n;
  }
  if (S == 0) return;
  // A decoding step's many short kernels run on one team of threads (Backend::run_step).
  w.backend().run_step(total, [&] { run_checked_steps(session, st, steps, S, total, logits); });
}

}  // namespace

void Session::forward_cached(SequenceCache& cache, const int32_t* tokens, int n, float* logits, bool all_rows) {
  CachedStep step;
  step.cache = &cache;
  step.tokens = tokens;
  step.n = n;
  step.all_rows = all_rows;
  run_steps(*this, *st_, &step, 1, logits);
}

void Session::forward_cached_batch(const std::vector<CachedStep>& steps, float* logits) {
  run_steps(*this, *st_, steps.data(), (int)steps.size(), logits);
}

}  // namespace subllm
