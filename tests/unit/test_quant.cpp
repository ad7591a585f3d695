// Inference weight types (bf16, q8) and the bf16 key/value cache: kernels against the F32
// kernels on dequantized weights, on both the AVX-512 and the portable paths; typed models
// against F32 models holding the dequantized weights; cached decoding against the full pass;
// `subllm quantize` and its round trip; the errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"
#include "subllm/error.h"
#include "subllm/generate.h"
#include "subllm/prepare.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"
#include "model_util.h"
#include "test_util.h"

namespace subllm {
namespace quant_tests {

namespace k = kernels;
namespace fs = std::filesystem;
using testing::error_of;
using testing::random_tokens;
using testing::rel_diff;
using testing::TempDir;

std::vector<float> normal(int64_t n, uint64_t seed, double sd = 1.0) {
  Rng r(seed);
  std::vector<float> v((size_t)n);
  for (auto& x : v) x = (float)(sd * r.normal());
  return v;
}

float round_bf16(float f) {
  uint16_t h;
  k::f32_to_bf16(&f, &h, 1);
  float g;
  k::bf16_to_f32(&h, &g, 1);
  return g;
}

// Runs `fn` on the AVX-512 paths (where the machine has them: with and without the int8 dot
// product) and on the portable one.
template <class Fn>
void on_both_paths(Fn fn) {
  k::set_portable_kernels(false);
  fn(k::fast_kernels_active() ? "avx512" : "portable");
  k::set_vnni_kernels(false);
  fn(k::fast_kernels_active() ? "avx512 without vnni" : "portable");
  k::set_vnni_kernels(true);
  k::set_portable_kernels(true);
  EXPECT_FALSE(k::fast_kernels_active());
  fn("portable");
  k::set_portable_kernels(false);
}

// What the Q8 products multiply W by: each x row quantized as a weight row and dequantized.
std::vector<float> q8_rounded(const std::vector<float>& x, int rows, int cols) {
  std::vector<uint8_t> q(rows * k::q8_row_bytes(cols));
  k::quantize_q8(x.data(), rows, cols, q.data());
  std::vector<float> d(x.size());
  k::dequantize_q8(q.data(), rows, cols, d.data());
  return d;
}

TEST(QuantKernels, Q8QuantizeBoundsTheErrorAndKeepsExactValues) {
  const int rows = 3, cols = 96;
  std::vector<float> w = normal(rows * cols, 1);
  w[5] = 0;
  std::fill(w.begin() + 64, w.begin() + 96, 0.f);  // an all-zero group
  std::vector<uint8_t> q(rows * k::q8_row_bytes(cols));
  k::quantize_q8(w.data(), rows, cols, q.data());
  std::vector<float> d(w.size());
  k::dequantize_q8(q.data(), rows, cols, d.data());
  for (int r = 0; r < rows; ++r)
    for (int g = 0; g < cols / 32; ++g) {
      float amax = 0;
      for (int e = 0; e < 32; ++e) amax = std::max(amax, std::fabs(w[r * cols + g * 32 + e]));
      for (int e = 0; e < 32; ++e) {
        const int i = r * cols + g * 32 + e;
        EXPECT_LE(std::fabs(d[i] - w[i]), amax / 127 * 0.5f * 1.0001f) << i;
      }
    }
  EXPECT_EQ(d[5], 0.f);
  for (int i = 64; i < 96; ++i) EXPECT_EQ(d[i], 0.f);
  // Quantizing dequantized values gives them back exactly.
  std::vector<uint8_t> q2(q.size());
  k::quantize_q8(d.data(), rows, cols, q2.data());
  std::vector<float> d2(w.size());
  k::dequantize_q8(q2.data(), rows, cols, d2.data());
  EXPECT_EQ(std::memcmp(d.data(), d2.data(), sizeof(float) * d.size()), 0);
}

// Q8 rows unpack into the files' form (int8 values in row order, one F32 scale per 32) and
// pack back byte for byte, at widths with whole and partial 16-group blocks.
TEST(QuantKernels, Q8RowsPackAndUnpackTheFilesValuesAndScales) {
  for (int cols : {96, 512, 1056, 2752}) {
    const int rows = 5, G = cols / 32;
    const std::vector<float> w = normal((int64_t)rows * cols, 3);
    std::vector<uint8_t> q(rows * k::q8_row_bytes(cols));
    k::quantize_q8(w.data(), rows, cols, q.data());
    std::vector<float> d(w.size());
    k::dequantize_q8(q.data(), rows, cols, d.data());
    std::vector<int8_t> values(w.size());
    std::vector<float> scales((size_t)rows * G);
    k::unpack_q8(q.data(), rows, cols, values.data(), scales.data());
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < G; ++g) {
        float amax = 0;
        for (int e = 0; e < 32; ++e) amax = std::max(amax, std::fabs(w[r * cols + g * 32 + e]));
        ASSERT_EQ(scales[r * G + g], amax / 127.0f) << cols << " " << r << " " << g;
        for (int e = 0; e < 32; ++e) {
          const int i = r * cols + g * 32 + e;
          ASSERT_EQ(values[i], (int8_t)std::nearbyint(w[i] * (1.0f / scales[r * G + g]))) << cols << " " << i;
          ASSERT_EQ(d[i], scales[r * G + g] * (float)values[i]) << cols << " " << i;
        }
      }
    std::vector<uint8_t> packed(q.size());
    k::pack_q8(values.data(), scales.data(), rows, cols, packed.data());
    EXPECT_EQ(packed, q) << cols;
  }
}

// y = x · W^T with W in Q8, every row count (matrix-vector and many-rows paths), against the
// F32 kernel on the dequantized W and the quantized-then-dequantized x. Widths: an odd group
// count (a half 64-column chunk), part of one 512-column block, one and two whole blocks (the
// model's widths at d 512 and 1024), more than two blocks.
TEST(QuantKernels, Q8LinearEqualsF32OnDequantizedOperands) {
  for (int in : {96, 320, 512, 1024, 1056}) {
    const int out = 131;  // rows not a multiple of the tiles, an odd count (a last row without its pair)
    const std::vector<float> w = normal((int64_t)out * in, 2, 0.05);
    std::vector<uint8_t> q(out * k::q8_row_bytes(in));
    k::quantize_q8(w.data(), out, in, q.data());
    std::vector<float> wd(w.size());
    k::dequantize_q8(q.data(), out, in, wd.data());
    for (int n : {1, 2, 3, 4, 5, 9, 70}) {
      const std::vector<float> x = normal((int64_t)n * in, 10 + n);
      std::vector<float> ref((size_t)n * out), base = normal((int64_t)n * out, 30 + n);
      k::linear_forward(q8_rounded(x, n, in).data(), wd.data(), ref.data(), n, in, out);
      on_both_paths([&](const char* path) {
        std::vector<float> y((size_t)n * out, 7.f);
        k::linear_forward_q8(x.data(), in, q.data(), y.data(), out, n, in, out, false);
        EXPECT_LT(rel_diff(y.data(), ref.data(), (int64_t)y.size()), 2e-6) << path << " in " << in << " n " << n;
        std::vector<float> acc = base;
        k::linear_forward_q8(x.data(), in, q.data(), acc.data(), out, n, in, out, true);
        for (size_t i = 0; i < acc.size(); ++i) acc[i] -= base[i];
        EXPECT_LT(rel_diff(acc.data(), ref.data(), (int64_t)acc.size()), 2e-6)
            << path << " accumulate, in " << in << " n " << n;
      });
    }
  }
}

// Quantizing x costs little accuracy: against the exact F32 product on the dequantized W, the
// error stays within what rounding x to 8 bits per group of 32 allows.
TEST(QuantKernels, Q8ActivationRoundingStaysSmall) {
  const int in = 1024, out = 256, n = 3;
  const std::vector<float> w = normal((int64_t)out * in, 7, 0.05), x = normal((int64_t)n * in, 8);
  std::vector<uint8_t> q(out * k::q8_row_bytes(in));
  k::quantize_q8(w.data(), out, in, q.data());
  std::vector<float> wd(w.size()), exact((size_t)n * out), y((size_t)n * out);
  k::dequantize_q8(q.data(), out, in, wd.data());
  k::linear_forward(x.data(), wd.data(), exact.data(), n, in, out);
  k::linear_forward_q8(x.data(), in, q.data(), y.data(), out, n, in, out, false);
  const double err = rel_diff(y.data(), exact.data(), (int64_t)y.size());
  EXPECT_GT(err, 0.0);  // x was rounded
  EXPECT_LT(err, 1e-2);
}

// The same for BF16 rows (strided, with a width that leaves a tail after the 32-wide steps, and
// an odd row count: a last row without its pair on the many-rows path).
TEST(QuantKernels, Bf16LinearEqualsF32OnWidenedWeights) {
  const int in = 300, out = 71, ldw = 310;
  const std::vector<float> w = normal((int64_t)out * ldw, 3, 0.05);
  std::vector<uint16_t> h(w.size());
  k::f32_to_bf16(w.data(), h.data(), (int64_t)w.size());
  std::vector<float> wd((size_t)out * in);
  for (int r = 0; r < out; ++r) k::bf16_to_f32(h.data() + (size_t)r * ldw, wd.data() + (size_t)r * in, in);
  for (int n : {1, 3, 4, 6, 65, 520}) {  // matrix-vector rows, then panels
    const int ldx = in + 5, ldy = out + 3;
    const std::vector<float> x = normal((int64_t)n * ldx, 40 + n);
    std::vector<float> xd((size_t)n * in);
    for (int i = 0; i < n; ++i) std::copy_n(x.data() + (size_t)i * ldx, in, xd.data() + (size_t)i * in);
    std::vector<float> ref((size_t)n * out);
    k::linear_forward(xd.data(), wd.data(), ref.data(), n, in, out);
    on_both_paths([&](const char* path) {
      std::vector<float> y((size_t)n * ldy, 0.f);
      k::linear_forward_bf16(x.data(), ldx, h.data(), ldw, y.data(), ldy, n, in, out, false);
      std::vector<float> yd((size_t)n * out);
      for (int i = 0; i < n; ++i) std::copy_n(y.data() + (size_t)i * ldy, out, yd.data() + (size_t)i * out);
      EXPECT_LT(rel_diff(yd.data(), ref.data(), (int64_t)yd.size()), 2e-6) << path << " n " << n;
    });
  }
}

TEST(QuantKernels, PortableAndFastPathsAgree) {
  const int in = 256, out = 96, n = 2;
  const std::vector<float> w = normal((int64_t)out * in, 4, 0.05), x = normal((int64_t)n * in, 5);
  std::vector<uint8_t> q(out * k::q8_row_bytes(in));
  k::quantize_q8(w.data(), out, in, q.data());
  std::vector<float> fast((size_t)n * out), portable((size_t)n * out);
  k::linear_forward_q8(x.data(), in, q.data(), fast.data(), out, n, in, out, false);
  k::set_portable_kernels(true);
  k::linear_forward_q8(x.data(), in, q.data(), portable.data(), out, n, in, out, false);
  k::set_portable_kernels(false);
  EXPECT_LT(rel_diff(fast.data(), portable.data(), (int64_t)fast.size()), 2e-6);
}

// Cached attention over a BF16 cache equals the F32 kernel over the same (rounded) values, with
// every key/value head shared by 1, 2 or 4 query heads.
TEST(QuantKernels, Bf16CachedAttentionEqualsF32OnRoundedCache) {
  const int H = 4, hd = 16, C = H * hd, L = 37, m = 3;
  for (int Hkv : {4, 2, 1}) {
    const int KV = Hkv * hd;
    std::vector<float> kf = normal((int64_t)L * KV, 6), vf = normal((int64_t)L * KV, 7), q = normal((int64_t)m * C, 8);
    std::vector<uint16_t> kb(kf.size()), vb(vf.size());
    k::f32_to_bf16(kf.data(), kb.data(), (int64_t)kf.size());
    k::f32_to_bf16(vf.data(), vb.data(), (int64_t)vf.size());
    for (auto& x : kf) x = round_bf16(x);
    for (auto& x : vf) x = round_bf16(x);
    std::vector<float> scratch(64 * k::attention_cached_scratch_floats(L, hd));
    std::vector<float> ref((size_t)m * C), got((size_t)m * C);
    k::attention_cached(q.data(), C, m, kf.data(), vf.data(), KV, L, H, Hkv, hd, ref.data(), C, scratch.data());
    k::attention_cached_bf16(q.data(), C, m, kb.data(), vb.data(), KV, L, H, Hkv, hd, got.data(), C, scratch.data());
    EXPECT_LT(rel_diff(got.data(), ref.data(), (int64_t)got.size()), 1e-5) << "kv heads " << Hkv;
  }
}

// ---- models --------------------------------------------------------------------------------

ModelConfig quant_config(const std::string& structure, std::vector<float> ret, bool tied = false) {
  ModelConfig c;
  c.vocab_size = 400;
  c.dim = 64;
  c.ffn_dim = 96;
  c.n_heads = 4;
  c.context = 96;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(ret);
  c.tie_weights = tied;
  return c;
}

// Random weights larger than the init (tokens interact; scores spread around 0), saved.
void write_random_weights(const ModelConfig& cfg, const std::string& path, uint64_t seed) {
  Model m(cfg);
  testing::spread_weights(m, seed);
  m.save(path);
}

// An F32 model holding what a `dt` model reads: each matrix dequantized (Q8) or rounded (BF16;
// under Q8 an untied embedding is BF16).
std::unique_ptr<Model> dequantized_model(const ModelConfig& cfg, const std::string& path, DType dt) {
  auto m = std::make_unique<Model>(cfg);
  m->load(path);
  for (const auto& p : m->params()) {
    if (p.shape.size() != 2 || p.shape[0] == 1) continue;
    float* w = m->param_data() + p.offset;
    const bool untied_embed = p.name == "decoder.embed_tokens.weight" && !cfg.tie_weights;
    if (dt == DType::Q8 && !untied_embed) {
      std::vector<uint8_t> q((size_t)p.shape[0] * k::q8_row_bytes(p.shape[1]));
      k::quantize_q8(w, p.shape[0], (int)p.shape[1], q.data());
      k::dequantize_q8(q.data(), p.shape[0], (int)p.shape[1], w);
    } else {
      for (int64_t i = 0; i < p.numel; ++i) w[i] = round_bf16(w[i]);
    }
  }
  return m;
}

std::unique_ptr<Model> typed_model(const ModelConfig& cfg, const std::string& path, DType dt) {
  auto m = std::make_unique<Model>(cfg);
  m->weights().set_weight_dtype(dt);
  m->load(path);
  return m;
}

// Prefill then one token at a time: every position's logits (all rows).
std::vector<float> cached_logits(Model& m, const std::vector<int32_t>& tok, int prefill) {
  const int V = m.config().vocab_size, T = (int)tok.size();
  std::vector<float> out((size_t)T * V);
  SequenceCache c = m.new_cache();
  m.forward_cached(c, tok.data(), prefill, out.data(), true);
  for (int t = prefill; t < T; ++t) m.forward_cached(c, tok.data() + t, 1, out.data() + (size_t)t * V, false);
  return out;
}

// A typed model gives the logits of an F32 model on its dequantized weights (full pass and
// cached decoding, with loss), and its cached decoding equals its own full pass. BF16 matches
// to rounding; Q8 also rounds every product's x rows to 8 bits (its kernels are exact against
// that in QuantKernels), which moves logits by up to a few percent of their range, and more in
// SUBLLM, where a moved score can flip a token's keep decision.
void check_typed_model(const std::string& structure, std::vector<float> ret, bool tied, DType dt) {
  TempDir tmp("quant");
  const ModelConfig cfg = quant_config(structure, ret, tied);
  const std::string path = tmp.file("model.safetensors");
  write_random_weights(cfg, path, 5);
  auto typed = typed_model(cfg, path, dt);
  auto ref = dequantized_model(cfg, path, dt);
  const int T = 60, V = cfg.vocab_size;
  const std::vector<int32_t> tok = random_tokens(T, V, 9);
  std::vector<int32_t> targets(tok.begin() + 1, tok.end());
  targets.push_back(-1);
  std::vector<float> full_typed((size_t)T * V), full_ref((size_t)T * V);
  const float loss_typed = typed->forward(tok.data(), targets.data(), 1, T, full_typed.data(), Mode::Inference);
  const float loss_ref = ref->forward(tok.data(), targets.data(), 1, T, full_ref.data(), Mode::Inference);
  const std::string what = structure + " " + dtype_name(dt) + (tied ? " tied" : "");
  const bool q8 = dt == DType::Q8;
  const double logit_tol = !q8 ? 1e-4 : ret.empty() ? 3e-2 : 0.1, loss_tol = q8 ? 1e-3 : 1e-4;
  EXPECT_LT(rel_diff(full_typed.data(), full_ref.data(), (int64_t)full_ref.size()), logit_tol) << what;
  EXPECT_NEAR(loss_typed, loss_ref, loss_tol * std::fabs(loss_ref)) << what;
  for (int prefill : {1, 17}) {
    const std::vector<float> inc = cached_logits(*typed, tok, prefill);
    EXPECT_LT(rel_diff(inc.data(), full_typed.data(), (int64_t)inc.size()), 1e-4) << what << " prefill " << prefill;
  }
  if (!typed->structure().is_plain()) {
    typed->reset_retention_stats();
    typed->forward(tok.data(), nullptr, 1, T, nullptr, Mode::Inference);
    const double kept = typed->retention()[0];
    EXPECT_GT(kept, 0.0) << what;
    EXPECT_LT(kept, 1.0) << what;
  }
}

TEST(QuantModel, Q8LlamaEqualsF32OnDequantizedWeights) {
  check_typed_model("TTT", {}, false, DType::Q8);
  check_typed_model("TT", {}, true, DType::Q8);
}
TEST(QuantModel, Bf16LlamaEqualsF32OnRoundedWeights) { check_typed_model("TTT", {}, false, DType::BF16); }
TEST(QuantModel, Q8AndBf16NestedSubllmEqualF32OnTheirWeights) {
  check_typed_model("T(T(TT)T)T", {0.6f, 0.5f}, false, DType::Q8);
  check_typed_model("T(TT)T", {0.6f}, false, DType::BF16);
}

// The same model on the portable kernels gives the same logits.
TEST(QuantModel, PortableKernelsGiveTheSameLogits) {
  TempDir tmp("quant");
  const ModelConfig cfg = quant_config("T(TT)T", {0.6f});
  write_random_weights(cfg, tmp.file("w.safetensors"), 6);
  auto m = typed_model(cfg, tmp.file("w.safetensors"), DType::Q8);
  const std::vector<int32_t> tok = random_tokens(40, cfg.vocab_size, 3);
  const std::vector<float> fast = cached_logits(*m, tok, 9);
  k::set_portable_kernels(true);
  const std::vector<float> portable = cached_logits(*m, tok, 9);
  k::set_portable_kernels(false);
  EXPECT_LT(rel_diff(portable.data(), fast.data(), (int64_t)fast.size()), 1e-4);
}

// A BF16 cache (inner SUBLLM caches too) is half the bytes and decodes close to the F32 cache.
TEST(QuantModel, Bf16KvCacheHalvesTheBytesAndDecodesClose) {
  TempDir tmp("quant");
  const ModelConfig cfg = quant_config("T(T(TT)T)T", {0.6f, 0.5f});
  write_random_weights(cfg, tmp.file("w.safetensors"), 7);
  Model m(cfg);
  m.load(tmp.file("w.safetensors"));
  const std::vector<int32_t> tok = random_tokens(60, cfg.vocab_size, 4);
  const std::vector<float> f32_cache = cached_logits(m, tok, 20);
  SequenceCache c32 = m.new_cache();
  EXPECT_EQ(c32.element_bytes, 4u);
  m.set_kv_dtype(DType::BF16);
  SequenceCache c16 = m.new_cache();
  EXPECT_EQ(c16.element_bytes, 2u);
  EXPECT_EQ(c16.k[1].dtype(), DType::BF16);
  const std::vector<float> bf16_cache = cached_logits(m, tok, 20);
  const double d = rel_diff(bf16_cache.data(), f32_cache.data(), (int64_t)f32_cache.size());
  EXPECT_LT(d, 2e-2);
  EXPECT_GT(d, 0.0) << "a bf16 cache rounds the keys and values";
  std::vector<float> logits(cfg.vocab_size);
  m.forward_cached(c16, tok.data(), 60, logits.data(), false);
  m.set_kv_dtype(DType::F32);
  m.forward_cached(c32, tok.data(), 60, logits.data(), false);
  EXPECT_EQ(2 * c16.bytes(), c32.bytes());
  EXPECT_NE(error_of([&] { m.set_kv_dtype(DType::Q8); }).find("--kv-dtype"), std::string::npos);
}

TEST(QuantModel, TypedWeightsRefuseTrainingAndFp32Loads) {
  TempDir tmp("quant");
  const ModelConfig cfg = quant_config("TT", {});
  write_random_weights(cfg, tmp.file("w.safetensors"), 8);
  auto q = typed_model(cfg, tmp.file("w.safetensors"), DType::Q8);
  EXPECT_NE(error_of([&] { q->grad_data(); }).find("no gradients"), std::string::npos);
  q->save(tmp.file("q8.safetensors"));
  Model f(cfg);
  std::string msg = error_of([&] { f.load(tmp.file("q8.safetensors")); });
  EXPECT_NE(msg.find("inference weights"), std::string::npos) << msg;
  EXPECT_NE(msg.find("fp32 checkpoint"), std::string::npos) << msg;
  Model b(cfg);
  b.weights().set_weight_dtype(DType::BF16);
  msg = error_of([&] { b.load(tmp.file("q8.safetensors")); });
  EXPECT_NE(msg.find("load only as --dtype q8"), std::string::npos) << msg;
  ModelConfig odd = quant_config("TT", {});
  odd.ffn_dim = 100;
  Model o(odd);
  msg = error_of([&] { o.weights().set_weight_dtype(DType::Q8); });
  EXPECT_NE(msg.find("multiples of 32"), std::string::npos) << msg;
}

// ---- subllm quantize ------------------------------------------------------------------------

std::string make_model_dir(const TempDir& tmp, const ModelConfig& cfg) {
  testing::write_corpus(tmp.path() / "corpus", 30);
  PrepareOptions p;
  p.inputs = {(tmp.path() / "corpus").string()};
  p.out_dir = tmp.file("data");
  p.vocab_size = 400;
  p.log = [](const std::string&) {};
  prepare_data(p);
  const std::string dir = tmp.file("model");
  fs::create_directories(dir);
  write_random_weights(cfg, dir + "/model.safetensors", 11);
  save_config(cfg, dir + "/config.json");
  fs::copy_file(tmp.file("data/tokenizer.model"), dir + "/tokenizer.model");
  return dir;
}

std::string read_bytes(const std::string& path) { return testing::read_all(path); }

TEST(QuantCli, QuantizeWritesAFolderThatLoadsBitForBit) {
  TempDir tmp("quant");
  const ModelConfig cfg = quant_config("T(TT)T", {0.6f});
  const std::string dir = make_model_dir(tmp, cfg);
  for (const std::string type : {"q8", "bf16"}) {
    const std::string out = tmp.file("out-" + type);
    auto r = testing::run_cli({"quantize", "-m", dir, "-o", out, "--type", type});
    ASSERT_EQ(r.code, 0) << r.output;
    for (const char* f : {"config.json", "tokenizer.model", "model.safetensors"}) EXPECT_TRUE(fs::exists(fs::path(out) / f));
    SafetensorsFile file(out + "/model.safetensors");
    EXPECT_EQ(file.metadata().at("subllm_weight_type"), type);
    if (type == "q8") {
      EXPECT_EQ(file.get("decoder.layers.0.feedforward.swiglu.w12.weight").dtype, DType::I8);
      EXPECT_EQ(file.get("decoder.layers.0.feedforward.swiglu.w12.weight.q8_scale").shape, (Shape{192, 2}));
      EXPECT_EQ(file.get("decoder.embed_tokens.weight").dtype, DType::BF16);
      EXPECT_EQ(file.get("decoder.output_projection.weight").dtype, DType::I8);
    }
    EXPECT_EQ(file.get("decoder.layers.0.final_layer_norm.weight").dtype, DType::F32);
    EXPECT_LT(fs::file_size(out + "/model.safetensors"), fs::file_size(dir + "/model.safetensors") / 1.7);
    // Loaded as it is (no --dtype), saved again: the same bytes; the same logits as
    // quantizing on load.
    LoadedModel lm = load_model_dir(out);
    EXPECT_EQ(lm.model->weights().weight_dtype(), inference_dtype(type));
    lm.model->save(tmp.file("again.safetensors"));
    EXPECT_EQ(read_bytes(tmp.file("again.safetensors")), read_bytes(out + "/model.safetensors")) << type;
    LoadedModel direct = load_model_dir(dir, "cpu", type);
    const std::vector<int32_t> tok = random_tokens(30, cfg.vocab_size, 12);
    const std::vector<float> a = cached_logits(*lm.model, tok, 5), b = cached_logits(*direct.model, tok, 5);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * a.size()), 0) << type;
    // Errors: quantizing again, another --dtype, an existing output folder.
    r = testing::run_cli({"quantize", "-m", out, "-o", tmp.file("twice-" + type), "--type", "q8"});
    EXPECT_NE(r.code, 0);
    EXPECT_NE(r.output.find("already quantized"), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(tmp.file("twice-" + type)));
    const std::string other = type == "q8" ? "bf16" : "q8";
    r = testing::run_cli({"generate", "-m", out, "-p", "The", "-n", "3", "--dtype", other});
    EXPECT_NE(r.code, 0);
    EXPECT_NE(r.output.find("load only as --dtype " + type), std::string::npos) << r.output;
    r = testing::run_cli({"quantize", "-m", dir, "-o", out, "--type", type});
    EXPECT_NE(r.code, 0);
    EXPECT_NE(r.output.find("not empty"), std::string::npos) << r.output;
  }
  auto r = testing::run_cli({"generate", "-m", tmp.file("out-q8"), "-p", "The captain", "-n", "8", "--temp", "0",
                             "--kv-dtype", "bf16", "--stats"});
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("kv cache"), std::string::npos) << r.output;
  r = testing::run_cli({"train", "--resume", tmp.file("out-q8"), "--data", tmp.file("data")});
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("inference weights written by `subllm quantize`"), std::string::npos) << r.output;
  r = testing::run_cli({"export", "-m", tmp.file("out-q8"), "-o", tmp.file("exported")});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("fp32 model"), std::string::npos) << r.output;
}

}  // namespace quant_tests
}  // namespace subllm
