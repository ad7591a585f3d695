// The CPU backend: host memory, and the kernels of kernels/cpu/ called on the views' pointers.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "backend/backend.h"
#include "kernels/kernels.h"
#include "kernels/optimizer_kernels.h"
#include "kernels/quant_kernels.h"
#include "subllm/error.h"
#include "subllm/host_memory.h"
#include "subllm/threads.h"

namespace subllm {

namespace {

namespace k = kernels;

constexpr size_t round64(size_t b) { return (b + 63) / 64 * 64; }

// Buffers from kLargeBuffer bytes up are placed on 2 MB pages where the kernel lends them
// (transparent huge pages on request). On 4 KB pages, a stream over memory whose pages lie
// scattered (memory the process had freed and got back) misses the TLB at every page and
// reads up to a third slower than one over fresh memory; decoding streams every weight per token.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kLargeBuffer = size_t(4) << 20;

// The dense kernels read rows back to back.
bool is_dense(std::initializer_list<View> views) {
  for (const View& v : views)
    if (v && v.ld != v.cols) return false;
  return true;
}

// One element of an F32 or BF16 view as float (bf16: the top half of an fp32; stores round to
// nearest even).
float get_f32(const View& v, int64_t r, int64_t c) {
  const int64_t i = r * v.ld + c;
  if (v.dtype == DType::BF16) {
    const uint32_t bits = (uint32_t) static_cast<const uint16_t*>(v.data)[i] << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return v.f32()[i];
}
void set_f32(const View& v, int64_t r, int64_t c, float f) {
  const int64_t i = r * v.ld + c;
  if (v.dtype == DType::BF16) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) bits |= 0x00400000u;  // NaN stays a (quiet) NaN
    else bits += 0x7fffu + ((bits >> 16) & 1u);
    static_cast<uint16_t*>(v.data)[i] = (uint16_t)(bits >> 16);
    return;
  }
  v.f32()[i] = f;
}

View as_row(const View& v) { return View{v.data, v.dtype, 1, v.numel(), v.numel()}; }

void need_scratch(const Scratch& s, size_t bytes, const char* op) {
  if (s.bytes < bytes)
    throw Error(std::string(op) + ": scratch of " + std::to_string(s.bytes) + " bytes, needs " + std::to_string(bytes));
}

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  bool takes_weight_dtype(DType dt) const override { return dt == DType::F32 || dt == DType::BF16 || dt == DType::Q8; }
  bool takes_kv_dtype(DType dt) const override { return dt == DType::F32 || dt == DType::BF16; }

  void* alloc(size_t bytes) override {
    const bool large = bytes >= kLargeBuffer;
    const size_t size = large ? (bytes + kHugePage - 1) / kHugePage * kHugePage : round64(bytes ? bytes : 64);
    void* p = std::aligned_alloc(large ? kHugePage : 64, size);
    if (!p)
      throw Error("out of memory allocating " + memory_text((double)bytes) + " (this machine has " +
                  memory_text((double)host_memory_bytes()) + "): use a smaller model, --batch or --seq");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (large) ::madvise(p, size, MADV_HUGEPAGE);  // a request: refused, the buffer keeps 4 KB pages
#endif
    return p;
  }
  void free(void* p) override { std::free(p); }
  void to_device(void* dst, const void* src, size_t bytes) override { if (bytes) std::memcpy(dst, src, bytes); }
  void to_host(void* dst, const void* src, size_t bytes) override { if (bytes) std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { if (bytes && dst != src) std::memmove(dst, src, bytes); }
  void zero(void* p, size_t bytes) override { if (bytes) std::memset(p, 0, bytes); }
  // One call maps the pages: a first-touch fault costs about 11 µs a 4 KB page on a virtual
  // machine with page-table isolation, the populating call under 1 µs. Pages already mapped are
  // left as they are; kernels without MADV_POPULATE_WRITE (before Linux 5.14) get each page
  // touched by writing back one of its bytes in the range.
  void commit(void* p, size_t bytes) override {
    if (!p || !bytes) return;
    const uintptr_t page = 4096, lo = (uintptr_t)p & ~(page - 1), hi = (uintptr_t)p + bytes;
#if defined(__linux__)
    constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, missing from older headers
    if (::madvise((void*)lo, hi - lo, kPopulateWrite) == 0) return;
#endif
    for (uintptr_t a = (uintptr_t)p; a < hi; a = (a & ~(page - 1)) + page) {
      volatile char* c = reinterpret_cast<volatile char*>(a);
      *c = *c;
    }
  }
  void sync() override {}
  void run_step(int64_t rows, const std::function<void()>& step) override {
    if (k::team_takes_step(rows)) k::run_in_team(step);
    else step();
  }

  void convert(View src, View dst) override {
    check(src.rows == dst.rows && src.cols == dst.cols, "convert: source and destination shapes differ");
    if (src.dtype == DType::Q8 || dst.dtype == DType::Q8) {  // inference weights, quantized on load
      check(src.ld == src.cols && dst.ld == dst.cols && (src.dtype == DType::F32 || dst.dtype == DType::F32),
            "convert: Q8 converts to and from dense F32 only");
      check(src.cols % k::kQ8Group == 0, "convert: Q8 rows hold a multiple of 32 elements");
      if (dst.dtype == DType::Q8) k::quantize_q8(src.f32(), src.rows, (int)src.cols, dst.data);
      else k::dequantize_q8(src.data, src.rows, (int)src.cols, dst.f32());
      return;
    }
    if (src.dtype == DType::F32 && dst.dtype == DType::BF16) {  // e.g. keys and values into a BF16 cache
      for (int64_t r = 0; r < src.rows; ++r)
        k::f32_to_bf16(static_cast<const float*>(src.data) + r * src.ld, static_cast<uint16_t*>(dst.data) + r * dst.ld,
                       src.cols);
      return;
    }
    for (int64_t r = 0; r < src.rows; ++r)
      for (int64_t c = 0; c < src.cols; ++c) set_f32(dst, r, c, get_f32(src, r, c));
  }

  // Strided operands (e.g. the q|k columns of the fused qkv rows) go to the GEMM with their
  // row strides; dense ones keep the kernels' paths (a matrix-vector product for one row).
  void linear_forward(View x, View w, View y, bool accumulate) override {
    if (w.dtype == DType::Q8) {
      check(w.ld == w.cols, "linear_forward: a Q8 weight matrix is dense");
      k::linear_forward_q8(x.f32(), x.ld, w.data, y.f32(), y.ld, (int)x.rows, (int)x.cols, (int)w.rows, accumulate);
      return;
    }
    if (w.dtype == DType::BF16) {
      k::linear_forward_bf16(x.f32(), x.ld, static_cast<const uint16_t*>(w.data), w.ld, y.f32(), y.ld, (int)x.rows,
                             (int)x.cols, (int)w.rows, accumulate);
      return;
    }
    if (is_dense({x, w, y})) {
      k::linear_forward(x.f32(), w.f32(), y.f32(), (int)x.rows, (int)x.cols, (int)w.rows, accumulate);
      return;
    }
    k::gemm(false, true, (int)x.rows, (int)w.rows, (int)x.cols, 1.0f, x.f32(), (int)x.ld, w.f32(), (int)w.ld,
            accumulate ? 1.0f : 0.0f, y.f32(), (int)y.ld);
  }
  void linear_backward(View x, View w, View dy, View dx, View dw, bool accumulate_dx) override {
    if (is_dense({x, w, dy, dx, dw})) {
      k::linear_backward(x.f32(), w.f32(), dy.f32(), dx ? dx.f32() : nullptr, dw ? dw.f32() : nullptr, (int)x.rows,
                         (int)x.cols, (int)w.rows, accumulate_dx);
      return;
    }
    const int n = (int)x.rows, in = (int)x.cols, out = (int)w.rows;
    if (dx)
      k::gemm(false, false, n, in, out, 1.0f, dy.f32(), (int)dy.ld, w.f32(), (int)w.ld, accumulate_dx ? 1.0f : 0.0f,
              dx.f32(), (int)dx.ld);
    if (dw) k::gemm(true, false, out, in, n, 1.0f, dy.f32(), (int)dy.ld, x.f32(), (int)x.ld, 1.0f, dw.f32(), (int)dw.ld);
  }

  // The score layer is a linear layer with one output: w as a (1, C) row.
  void score_forward(View x, View w, View scores) override { linear_forward(x, as_row(w), scores, false); }
  void score_backward(View x, View w, View dscores, View dx, View dw, bool accumulate_dx) override {
    linear_backward(x, as_row(w), dscores, dx, dw ? as_row(dw) : dw, accumulate_dx);
  }

  void gather_rows(View src, View idx, View dst) override {
    check(dtype_size(src.dtype) == 4 && src.dtype == dst.dtype, "gather_rows: 4-byte elements of one dtype");
    k::gather_rows(src.data, src.ld, idx.i32(), dst.data, dst.ld, idx.rows, (int)src.cols);
  }
  void scatter_add_rows(View src, View idx, View dst) override {
    k::scatter_add_rows(src.f32(), src.ld, idx.i32(), dst.f32(), dst.ld, idx.rows, (int)src.cols);
  }
  void copy_rows(View src, View dst) override {
    check(dtype_size(src.dtype) == 4 && src.dtype == dst.dtype, "copy_rows: 4-byte elements of one dtype");
    k::copy_rows(src.data, src.ld, dst.data, dst.ld, src.rows, (int)src.cols);
  }
  void fill_positions(View pos, int B, int T, int offset) override { k::fill_positions(pos.i32(), B, T, offset); }

  void embedding_forward(View tokens, View table, View out) override {
    if (table.dtype == DType::Q8) {
      k::embedding_forward_q8(tokens.i32(), table.data, out.f32(), (int)tokens.rows, (int)table.cols);
      return;
    }
    if (table.dtype == DType::BF16) {
      k::embedding_forward_bf16(tokens.i32(), static_cast<const uint16_t*>(table.data), out.f32(), (int)tokens.rows,
                                (int)table.cols);
      return;
    }
    k::embedding_forward(tokens.i32(), table.f32(), out.f32(), (int)tokens.rows, (int)table.cols);
  }
  void embedding_backward(View tokens, View dout, View dtable) override {
    k::embedding_backward(tokens.i32(), dout.f32(), dtable.f32(), (int)tokens.rows, (int)dtable.cols,
                          (int)dtable.rows);
  }
  void rmsnorm_forward(View x, View g, View y, View rstd, float eps) override {
    k::rmsnorm_forward(x.f32(), g.f32(), y.f32(), rstd.f32(), (int)x.rows, (int)x.cols, eps);
  }
  size_t rmsnorm_scratch_bytes(int C) const override { return sizeof(float) * (size_t)num_threads() * C; }
  void rmsnorm_backward(View x, View g, View rstd, View dy, View dx, View dg, bool accumulate_dx, Scratch s) override {
    need_scratch(s, rmsnorm_scratch_bytes((int)x.cols), "rmsnorm_backward");
    k::rmsnorm_backward(x.f32(), g.f32(), rstd.f32(), dy.f32(), dx.f32(), dg.f32(), (int)x.rows, (int)x.cols,
                        accumulate_dx, static_cast<float*>(s.data));
  }
  void rope_table(View cos, View sin, int head_dim, float base) override {
    k::RopeTable t{head_dim, (int)cos.rows, cos.f32(), sin.f32()};
    k::rope_table_fill(t, base);
  }
  void rope_apply(View x, View pos, View cos, View sin, int head_dim, bool inverse) override {
    const k::RopeTable t{head_dim, (int)cos.rows, cos.f32(), sin.f32()};
    k::rope_apply(x.f32(), (int)x.ld, (int)x.rows, (int)(x.cols / head_dim), pos.i32(), t, inverse);
  }
  void swiglu_forward(View gu, View a) override { k::swiglu_forward(gu.f32(), a.f32(), (int)gu.rows, (int)a.cols); }
  void swiglu_backward(View gu, View da, View dgu) override {
    k::swiglu_backward(gu.f32(), da.f32(), dgu.f32(), (int)gu.rows, (int)da.cols);
  }

  size_t attention_scratch_bytes(int, int, int, int hd, bool backward) const override {
    return (size_t)num_threads() * round64(k::attention_scratch_bytes(hd, backward));
  }
  void attention_forward(View q, View kk, View v, View o, View lse, int B, int T, int H, Scratch s) override {
    check(q.ld == kk.ld && q.ld == v.ld, "attention_forward: q, k and v share one row stride");
    const int hd = (int)(q.cols / H), Hkv = attention_kv_heads(q, kk, v, H, "attention_forward");
    need_scratch(s, attention_scratch_bytes(B, T, H, hd, false), "attention_forward");
    k::attention_forward(q.f32(), kk.f32(), v.f32(), (int)q.ld, o.f32(), (int)o.ld, lse.f32(), B, T, H, Hkv, hd,
                         static_cast<float*>(s.data));
  }
  void attention_backward(View q, View kk, View v, View o, View dout, View lse, View dq, View dk, View dv, int B, int T,
                          int H, Scratch s) override {
    check(q.ld == kk.ld && q.ld == v.ld && dq.ld == dk.ld && dq.ld == dv.ld && o.ld == dout.ld,
          "attention_backward: q, k, v (and their gradients, and o, dout) share a row stride");
    const int hd = (int)(q.cols / H), Hkv = attention_kv_heads(q, kk, v, H, "attention_backward");
    check(dk.cols == kk.cols && dv.cols == v.cols, "attention_backward: dk and dv have the key/value heads' width");
    need_scratch(s, attention_scratch_bytes(B, T, H, hd, true), "attention_backward");
    k::attention_backward(q.f32(), kk.f32(), v.f32(), (int)q.ld, o.f32(), (int)o.ld, dout.f32(), lse.f32(), dq.f32(),
                          dk.f32(), dv.f32(), (int)dq.ld, B, T, H, Hkv, hd, static_cast<float*>(s.data));
  }
  // The blocked kernel's scratch where it runs, else the per-head kernels'.
  size_t attention_blocks_scratch_bytes(int max_L, int H, int hd) const {
    return sizeof(float) * k::attention_blocks_scratch_floats(max_L, H, hd, num_threads());
  }
  size_t attention_cached_scratch_bytes(int, int L, int H, int hd) const override {
    const size_t per_head = sizeof(float) * (size_t)num_threads() * k::attention_cached_scratch_floats(L, hd);
    return k::attention_blocks_take(hd) ? std::max(per_head, attention_blocks_scratch_bytes(L, H, hd)) : per_head;
  }
  void attention_cached(View q, View kk, View v, View out, int H, Scratch s) override {
    check(kk.ld == v.ld, "attention_cached: the key and value caches share one row stride");
    const int hd = (int)(q.cols / H), L = (int)kk.rows, Hkv = attention_kv_heads(q, kk, v, H, "attention_cached");
    if (k::attention_blocks_take(hd) && kk.dtype == v.dtype) {
      need_scratch(s, attention_blocks_scratch_bytes(L, H, hd), "attention_cached");
      const k::CachedAttentionItem it{q.f32(), (int)q.ld, (int)q.rows, kk.data, v.data, (int)kk.ld, L, out.f32(), (int)out.ld};
      k::attention_cached_blocks(&it, 1, H, Hkv, hd, kk.dtype == DType::BF16, static_cast<float*>(s.data));
      return;
    }
    need_scratch(s, attention_cached_scratch_bytes((int)q.rows, L, H, hd), "attention_cached");
    if (kk.dtype == DType::BF16 && v.dtype == DType::BF16) {
      k::attention_cached_bf16(q.f32(), (int)q.ld, (int)q.rows, static_cast<const uint16_t*>(kk.data),
                               static_cast<const uint16_t*>(v.data), (int)kk.ld, L, H, Hkv, hd, out.f32(), (int)out.ld,
                               static_cast<float*>(s.data));
      return;
    }
    k::attention_cached(q.f32(), (int)q.ld, (int)q.rows, kk.f32(), v.f32(), (int)kk.ld, L, H, Hkv, hd, out.f32(),
                        (int)out.ld, static_cast<float*>(s.data));
  }

  size_t attention_cached_many_scratch_bytes(int, int max_L, int H, int hd) const override {
    const size_t per_head = sizeof(float) * (size_t)num_threads() * k::attention_cached_many_scratch_floats(max_L, H, hd);
    return k::attention_blocks_take(hd) ? std::max(per_head, attention_blocks_scratch_bytes(max_L, H, hd)) : per_head;
  }
  void attention_cached_many(const CachedAttention* items, int count, int H, Scratch s) override {
    if (count == 0) return;
    const int hd = (int)(items[0].q.cols / H);
    const int Hkv = attention_kv_heads(items[0].q, items[0].k, items[0].v, H, "attention_cached_many");
    const bool bf16 = items[0].k.dtype == DType::BF16;
    int max_L = 0;
    // Per calling thread: sessions on one backend may run concurrently.
    static thread_local std::vector<k::CachedAttentionItem> many_;
    many_.resize(count);
    for (int i = 0; i < count; ++i) {
      const CachedAttention& a = items[i];
      check(a.k.ld == a.v.ld, "attention_cached_many: the key and value caches share one row stride");
      check(a.q.cols == items[0].q.cols && a.k.cols == items[0].k.cols && a.v.cols == items[0].v.cols &&
                a.k.dtype == items[0].k.dtype && a.v.dtype == items[0].k.dtype,
            "attention_cached_many: every sequence has the same heads and cache type");
      max_L = std::max(max_L, (int)a.k.rows);
      many_[i] = {a.q.f32(), (int)a.q.ld, (int)a.q.rows, a.k.data, a.v.data, (int)a.k.ld, (int)a.k.rows, a.out.f32(),
                  (int)a.out.ld};
    }
    if (k::attention_blocks_take(hd)) {
      need_scratch(s, attention_blocks_scratch_bytes(max_L, H, hd), "attention_cached_many");
      k::attention_cached_blocks(many_.data(), count, H, Hkv, hd, bf16, static_cast<float*>(s.data));
      return;
    }
    if (bf16) {
      // A bf16 cache: one sequence after another (the scratch covers the longest cache).
      for (int i = 0; i < count; ++i) attention_cached(items[i].q, items[i].k, items[i].v, items[i].out, H, s);
      return;
    }
    need_scratch(s, attention_cached_many_scratch_bytes(1, max_L, H, hd), "attention_cached_many");
    k::attention_cached_many(many_.data(), count, max_L, H, Hkv, hd, static_cast<float*>(s.data));
  }

  void lm_head_xent(View x, View w, View targets, float grad_scale, View dx, View dw, View logits, View chunk,
                    View out) override {
    int64_t count = 0;
    if (w.dtype == DType::Q8 || w.dtype == DType::BF16) {
      // Inference weight types have no gradients: loss and logits only.
      check(!dx && !dw, "lm_head_xent: a " + std::string(dtype_name(w.dtype)) +
                            " output head is for inference; training needs F32 weights");
      const float* lg = logits ? logits.f32() : nullptr;
      const int32_t* tg = targets ? targets.i32() : nullptr;
      const double loss =
          w.dtype == DType::Q8
              ? k::lm_head_loss_q8(x.f32(), w.data, tg, (int)x.rows, (int)x.cols, (int)w.rows, const_cast<float*>(lg),
                                   chunk.f32(), (int)chunk.rows, &count)
              : k::lm_head_loss_bf16(x.f32(), static_cast<const uint16_t*>(w.data), tg, (int)x.rows, (int)x.cols,
                                     (int)w.rows, const_cast<float*>(lg), chunk.f32(), (int)chunk.rows, &count);
      out.f64()[0] = loss;
      out.f64()[1] = (double)count;
      return;
    }
    const double loss = k::lm_head_xent(x.f32(), w.f32(), targets ? targets.i32() : nullptr, (int)x.rows, (int)x.cols, (int)w.rows,
                                        grad_scale, dx ? dx.f32() : nullptr, dw ? dw.f32() : nullptr,
                                        logits ? logits.f32() : nullptr, chunk.f32(), (int)chunk.rows, &count);
    out.f64()[0] = loss;
    out.f64()[1] = (double)count;
  }

  size_t select_top_scratch_bytes(int Tp) const override { return sizeof(int32_t) * 2 * (size_t)Tp; }
  void select_top(View scores, int B, int Tc, bool flip, View kept, View partner, View w, Scratch s) override {
    const int Tp = (int)(scores.rows / B);
    need_scratch(s, select_top_scratch_bytes(Tp), "select_top");
    k::select_top(scores.f32(), B, Tp, Tc, flip, kept.i32(), partner.i32(), w.f32(), static_cast<int32_t*>(s.data));
  }
  void select_threshold(View scores, View tokens, float threshold, int pad, View kept, View w, View count) override {
    count.i32()[0] = k::select_threshold(scores.f32(), tokens.i32(), (int)scores.rows, threshold, pad, kept.i32(),
                                         w.f32());
  }
  void upsample_bypass_forward(View x, View y, View kept, View w, View c, View out) override {
    k::upsample_bypass_forward(x.f32(), y.f32(), kept.i32(), w.f32(), c.f32(), out.f32(), kept.rows, (int)x.cols);
  }
  size_t upsample_bypass_scratch_bytes(int C) const override { return sizeof(float) * (size_t)num_threads() * C; }
  void upsample_bypass_backward(View x, View y, View kept, View w, View c, View dout, View dy, View dw, View dc,
                                Scratch s) override {
    need_scratch(s, upsample_bypass_scratch_bytes((int)x.cols), "upsample_bypass_backward");
    k::upsample_bypass_backward(x.f32(), y.f32(), kept.i32(), w.f32(), c.f32(), dout.f32(), dy.f32(), dw.f32(),
                                dc.f32(), kept.rows, (int)x.cols, static_cast<float*>(s.data));
  }
  void selection_backward(View dw, View kept, View partner, View scores, View dscores) override {
    k::selection_backward(dw.f32(), kept.i32(), partner ? partner.i32() : nullptr, kept.rows, scores.f32(),
                          dscores.f32(), scores.rows);
  }
  size_t balancer_scratch_bytes(int64_t n) const override { return sizeof(double) * (size_t)n; }
  void balancer_backward(View scores, View dscores, double m_min, double m_max, double r_min, double r_max,
                         double grad_scale, double p_target, double p_window, Scratch s) override {
    need_scratch(s, balancer_scratch_bytes(scores.rows), "balancer_backward");
    k::balancer_backward(scores.f32(), dscores.f32(), scores.rows, static_cast<double*>(s.data), m_min, m_max, r_min,
                         r_max, grad_scale, p_target, p_window);
  }
  void bypass_limit_accumulate(View dc, View c, float lo, float hi, bool limit, View gc) override {
    k::bypass_limit_accumulate(dc.f32(), c.f32(), lo, hi, limit, gc.f32(), (int)dc.numel());
  }
  void score_stats(View scores, View kept, float threshold, View out) override {
    k::score_stats(scores.f32(), scores.rows, kept.i32(), kept.rows, threshold, out.f64());
  }

  void scale(View x, float s) override { k::scale_inplace(x.f32(), s, x.numel()); }
  void add(View dst, View src) override {
    check(dst.numel() == src.numel(), "add: operands differ in length");
    float* d = dst.f32();
    const float* s = src.f32();
    const int64_t n = dst.numel();
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  }
  void sum_squares(View x, View out) override { out.f64()[0] = k::sum_squares(x.f32(), x.numel()); }
  void adamw_step(View p, View g, View m, View v, float lr, float beta1, float beta2, float eps, float weight_decay,
                  int step) override {
    k::adamw_step(p.f32(), g.f32(), m.f32(), v.f32(), p.numel(), lr, beta1, beta2, eps, weight_decay, step);
  }
  size_t optim_sums_scratch_bytes(int n_chunks) const override {
    return sizeof(double) * k::optim_chunk_sums_scratch(n_chunks);
  }
  void optim_chunk_sums(View p, View g, const Chunks& ch, int n_tensors, bool want_param_sq, View out,
                        Scratch s) override {
    const int n = (int)ch.tensor.rows;
    need_scratch(s, optim_sums_scratch_bytes(n), "optim_chunk_sums");
    k::optim_chunk_sums(p.f32(), g.f32(), ch.tensor.i32(), ch.begin.i64(), ch.end.i64(), n, n_tensors, want_param_sq,
                        out.f64(), static_cast<double*>(s.data));
  }
  void optim_scale_chunks(View g, const Chunks& ch, float factor) override {
    k::optim_scale_chunks(g.f32(), ch.begin.i64(), ch.end.i64(), (int)ch.begin.rows, factor);
  }
  void scaled_adam_update(View p, View g, View v, View m, const Chunks& ch, View step_coef, View scale_step, View clamp,
                          float clamp_max, float inv_bc2, float b1, float one_minus_b1, float b2, float one_minus_b2,
                          float eps) override {
    k::optim_scaled_adam_update(p.f32(), g.f32(), v.f32(), m.f32(), ch.tensor.i32(), ch.begin.i64(), ch.end.i64(),
                                (int)ch.tensor.rows, step_coef.f32(), scale_step.f32(), clamp.u8(), clamp_max, inv_bc2,
                                b1, one_minus_b1, b2, one_minus_b2, eps);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace subllm
