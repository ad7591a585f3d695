#pragma once
// The model's passes over a Weights, shared by the full (training / evaluation) and the
// cached (generation) paths; private to the model's sources.
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "subllm/model.h"

namespace subllm {

// Activations of one transformer block, sized for the rows of its segment.
struct BlockActs {
  Tensor rstd1, rstd2;  // (rows)
  Tensor qkv;           // (rows, C + 2 KV), q and k after RoPE (KV = kv_dim())
  Tensor att;           // (rows, C) attention output before out_proj
  Tensor lse;           // (B, H, T_seg)
  Tensor h;             // (rows, C) after the attention residual
  Tensor gu;            // (rows, 2F)
};

// One level of the layout: the whole sequence (segment 0) or the tokens a subsampler kept.
struct SegmentActs {
  int T = 0;                   // tokens per sequence now (inference: this pass's count)
  int T_cap = 0;               // tokens per sequence the memory was planned for
  Tensor pos;                  // (B*T) RoPE positions (config.rope_parent_positions says which)
  Tensor parent_index;         // (parent rows) i32: each parent row's index in its sequence ("parent" rule)
  Tensor tok;                  // (B*T) token ids (inference: padding is never kept)
  std::vector<Tensor> stream;  // items+1 of (B*T, C): the residual stream between items
  Tensor d_stream;             // (B*T, C)
  // Subsampler side (segments other than the root); parent rows are (B * parent T).
  Tensor scores, d_scores;     // (parent rows)
  Tensor kept;                 // (B*T) parent row of each kept token, ascending per sequence
  Tensor partner;              // (B*T) parent row whose weight is subtracted from w_scale, or -1
  Tensor w_scale, d_w_scale;   // (B*T)
  Tensor d_bypass;             // (C) this pass's bypass-scale gradient, before the limit
  Tensor count;                // (1) i32: tokens kept (inference)
  bool balancer_on = false, limit_on = false, flipped = false;
};

// Activations saved for backward, planned once per (B, T, mode) and reused every step.
struct ModelActivations {
  int B = 0, T = 0;
  Mode mode = Mode::Train;
  Arena arena;
  std::vector<SegmentActs> seg;
  std::vector<BlockActs> blk;
  Tensor targets;                    // (N) i32
  Tensor norm_out, rstd_f;           // (N, C), (N) final norm
  Tensor tmp_c, tmp_f;               // (N, C), (N, F): recomputed norm / swiglu outputs
  Tensor d_tmp_c, d_att;             // (N, C)
  Tensor d_qkv;                      // (N, C + 2 KV)
  Tensor d_f, d_gu;                  // (N, F), (N, 2F)
  Tensor logits_chunk;               // (chunk, V)
  Tensor loss;                       // (2) f64: summed loss, counted rows
  Tensor stats;                      // (3) f64: score statistics
  Tensor scratch;                    // kernel working memory, bytes
  Tensor ones;                       // (N) of 1 in the compute dtype (qk_bias only)
};

// Where one block pass keeps its intermediates.
struct BlockIO {
  View n1, qkv, att, h, gu, a, rstd1, rstd2, lse;  // (rows, C | C + 2 KV | C | C | 2F | F), (rows) x2, (H, rows)
  View ones;                                       // (rows, 1) of 1, for the q/k biases (qk_bias only)
  Scratch scratch;
};

// Buffers of the cached path for one segment (0: the new tokens) over the rows of every
// sequence of a batched step, each sequence's rows contiguous; grown to the largest step seen
// (doubling); uninitialised, as every pass writes the rows it reads. A child segment's
// selection buffers are sized by its parent's rows, which bound its own.
struct CachedSegment {
  int cap = 0;
  Tensor x, pos, tok;        // (rows, C) activation dtype, (rows) i32 x2
  Tensor index;              // (rows) i32: each row's index within its sequence's segment ("parent" rule)
  Tensor scores;             // (parent rows) F32
  Tensor kept, w;            // (rows) i32 parent row, F32 clamp(score): every sequence's kept rows
  Tensor kept_local, w_local;  // (parent rows): select_threshold's per-sequence output, at the sequence's parent offset
  Tensor iota;               // (cap) i32: 0, 1, ... (turns a sequence's own row index into a batch row)
  Tensor counts;             // (sequences) i32: rows each sequence kept
  int counts_cap = 0;
  // Host: per sequence of the step, its rows' offset and count here and the rows its
  // segment held before this step; per row, its row among the new tokens (depth only).
  std::vector<int> off, n;
  std::vector<int64_t> before;
  std::vector<int32_t> host_counts, root;
  void reserve(Backend& be, int rows, int C, DType act);
  void reserve_sequences(Backend& be, int sequences);
};

struct SessionState {
  // Plans, most recently used first; a few shapes (training, validation, ...) stay planned.
  std::vector<std::unique_ptr<ModelActivations>> plans;
  ModelActivations* last = nullptr;  // the plan of the last full pass (traces, statistics)
  // Cached path.
  std::vector<CachedSegment> cseg;   // per segment (0: the new tokens)
  Tensor block_ws, block_stats;      // one block's intermediates: activations, F32 statistics
  Tensor normed, rstd, logits;       // final norm and head of the rows whose logits are asked for
  Tensor head_in;                    // (rows, C): the rows whose logits are asked for, gathered
  Tensor staging;                    // i32 uploads of a batched step: tokens, positions, wanted rows
  std::vector<int32_t> host_staging;
  std::vector<uint8_t> host_depth;   // (new tokens) depth of every new token of the step
  std::vector<Backend::CachedAttention> attend_many;  // a block's sequences attending to their caches
  Tensor scratch;                    // kernel working memory, bytes
  Tensor ones;                       // (ones_rows) of 1 in the compute dtype (qk_bias only)
  int64_t ones_rows = 0;
};

// Layer lengths of a plan (segment 0 = T); training keeps ceil(T * r) at each subsampler.
std::vector<int> plan_lengths(const Structure& st, int T, Mode mode);
// Every token id in [0, vocab) and every target below vocab, or an error naming the position.
void check_token_ids(const ModelConfig& c, const int32_t* tokens, const int32_t* targets, int64_t n);

// dst (n, 1) = 1 in dst's dtype: a bias is added as ones(n, 1) · bias(m, 1)^T, so every
// backend's GEMM serves, and its gradient (column sums) is that product's weight gradient.
void fill_ones(Backend& be, View dst);

// A matrix view of the first `rows` rows of a tensor planned for more.
inline View rows_of(const Tensor& t, int64_t rows) { return view_of(t).rows_at(0, rows); }

// Parameters as kernels read them: (rows, cols) at `offset` elements, from the typed copy of
// a matrix when the weights have an inference type (BF16, Q8), else from the compute copy.
inline View param(const Weights& w, int64_t offset, int64_t rows, int64_t cols) {
  DType typed = DType::F32;
  if (const void* m = w.matrix_data(offset, &typed)) return View{const_cast<void*>(m), typed, rows, cols, cols};
  const DType dt = w.compute_dtype();
  return View{static_cast<char*>(w.compute_data()) + offset * (int64_t)dtype_size(dt), dt, rows, cols, cols};
}
inline View param_vec(const Weights& w, int64_t offset, int64_t n) { return param(w, offset, n, 1); }

// ---- transformer block (shared by the full and the cached path) -------------------------

// x (rows, C) -> y (rows, C), keeping the intermediates in io. `attend` turns io.qkv into
// io.att (full causal attention, or against a cache).
template <class Attend>
void block_core(Backend& be, const Weights& w, int blk, View x, View y, View pos, const BlockIO& io, Attend attend) {
  const ModelConfig& c = w.config();
  const int64_t C = c.dim, F = c.ffn_dim, hd = c.head_dim(), KV = c.kv_dim();
  const BlockOffsets& o = w.block(blk);
  const View cos = view_of(w.rope_cos()), sin = view_of(w.rope_sin());
  // h = x + wo · attention(rope(qkv(norm(x))))
  be.rmsnorm_forward(x, param_vec(w, o.attn_norm, C), io.n1, io.rstd1, c.norm_eps);
  // q, k, v weights are adjacent, so one GEMM against the (C + 2 KV, C) block makes all three.
  be.linear_forward(io.n1, param(w, o.wqkv, C + 2 * KV, C), io.qkv);
  // The q and k biases go in before RoPE, as in the authors' q_proj / k_proj.
  if (c.qk_bias) be.linear_forward(io.ones, param(w, o.qk_bias, C + KV, 1), io.qkv.cols_at(0, C + KV), true);
  be.rope_apply(io.qkv.cols_at(0, C), pos, cos, sin, (int)hd, false);
  be.rope_apply(io.qkv.cols_at(C, KV), pos, cos, sin, (int)hd, false);
  attend();
  be.copy_rows(x, io.h);
  be.linear_forward(io.att, param(w, o.wo, C, C), io.h, true);
  // y = h + w3 · swiglu(w12 · norm(h))
  be.rmsnorm_forward(io.h, param_vec(w, o.ffn_norm, C), io.n1, io.rstd2, c.norm_eps);
  be.linear_forward(io.n1, param(w, o.w12, 2 * F, C), io.gu);
  be.swiglu_forward(io.gu, io.a);
  be.copy_rows(io.h, y);
  be.linear_forward(io.a, param(w, o.w3, C, F), y, true);
}

}  // namespace subllm
