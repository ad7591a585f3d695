// Grouped-query attention: the kernels against multi-head attention over repeated key/value
// heads, model gradients against finite differences, cached decoding against the full pass,
// the config key, and the KV cache's size.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "backend/backend.h"
#include "grad_check.h"
#include "subllm/checkpoint.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/rng.h"
#include "model_util.h"
#include "test_util.h"

namespace subllm {
namespace gqa_tests {

using testing::error_of;
using testing::rel_diff;

Scratch scratch(std::shared_ptr<void>& mem, size_t bytes) {
  mem = cpu_backend().alloc_shared(std::max<size_t>(bytes, 64));
  return Scratch{mem.get(), bytes};
}

// GQA attention on a fused (N, C + 2 KV) buffer equals multi-head attention on a fused (N, 3C)
// buffer whose key/value heads repeat each shared head over its group; dk, dv of a shared head
// are the sums over its group of the repeated heads' gradients.
void check_kernels(int B, int T, int H, int Hkv, int hd) {
  Backend& be = cpu_backend();
  const int C = H * hd, KV = Hkv * hd, G = H / Hkv;
  const int64_t N = (int64_t)B * T;
  const int ldg = C + 2 * KV, ldf = 3 * C;
  Rng r(7);
  std::vector<float> gqa(N * ldg), full(N * ldf), dout(N * C);
  for (auto& x : gqa) x = (float)r.normal();
  for (auto& x : dout) x = (float)r.normal();
  for (int64_t n = 0; n < N; ++n) {
    std::copy(&gqa[n * ldg], &gqa[n * ldg] + C, &full[n * ldf]);
    for (int h = 0; h < H; ++h)
      for (int part = 1; part <= 2; ++part)
        std::copy(&gqa[n * ldg + C + (part - 1) * KV + (h / G) * hd], &gqa[n * ldg + C + (part - 1) * KV + (h / G) * hd] + hd,
                  &full[n * ldf + part * C + h * hd]);
  }
  std::vector<float> og(N * C), of(N * C), lg((size_t)B * H * T), lf((size_t)B * H * T);
  std::vector<float> dg(N * ldg), df(N * ldf);
  std::shared_ptr<void> mem;
  const View qg = mat(gqa.data(), N, C, ldg), kg = mat(gqa.data() + C, N, KV, ldg), vg = mat(gqa.data() + C + KV, N, KV, ldg);
  const View qf = mat(full.data(), N, C, ldf), kf = mat(full.data() + C, N, C, ldf), vf = mat(full.data() + 2 * C, N, C, ldf);
  be.attention_forward(qg, kg, vg, mat(og.data(), N, C), vec(lg.data(), lg.size()), B, T, H,
                       scratch(mem, be.attention_scratch_bytes(B, T, H, hd, false)));
  be.attention_forward(qf, kf, vf, mat(of.data(), N, C), vec(lf.data(), lf.size()), B, T, H,
                       scratch(mem, be.attention_scratch_bytes(B, T, H, hd, false)));
  EXPECT_LT(rel_diff(og.data(), of.data(), N * C), 1e-6) << "forward H " << H << " Hkv " << Hkv;
  EXPECT_LT(rel_diff(lg.data(), lf.data(), (int64_t)lg.size()), 1e-6);
  be.attention_backward(qg, kg, vg, mat(og.data(), N, C), mat(dout.data(), N, C), vec(lg.data(), lg.size()),
                        mat(dg.data(), N, C, ldg), mat(dg.data() + C, N, KV, ldg), mat(dg.data() + C + KV, N, KV, ldg), B,
                        T, H, scratch(mem, be.attention_scratch_bytes(B, T, H, hd, true)));
  be.attention_backward(qf, kf, vf, mat(of.data(), N, C), mat(dout.data(), N, C), vec(lf.data(), lf.size()),
                        mat(df.data(), N, C, ldf), mat(df.data() + C, N, C, ldf), mat(df.data() + 2 * C, N, C, ldf), B, T,
                        H, scratch(mem, be.attention_scratch_bytes(B, T, H, hd, true)));
  // The reference gradient in the GQA layout: dq as is, dk/dv summed over each group.
  std::vector<float> want(N * ldg, 0.f);
  for (int64_t n = 0; n < N; ++n) {
    std::copy(&df[n * ldf], &df[n * ldf] + C, &want[n * ldg]);
    for (int h = 0; h < H; ++h)
      for (int part = 1; part <= 2; ++part)
        for (int i = 0; i < hd; ++i)
          want[n * ldg + C + (part - 1) * KV + (h / G) * hd + i] += df[n * ldf + part * C + h * hd + i];
  }
  EXPECT_LT(rel_diff(dg.data(), want.data(), N * ldg), 1e-5) << "backward H " << H << " Hkv " << Hkv;
  // The same call again gives the same bits (a fixed summation order over the group).
  std::vector<float> again(N * ldg);
  be.attention_backward(qg, kg, vg, mat(og.data(), N, C), mat(dout.data(), N, C), vec(lg.data(), lg.size()),
                        mat(again.data(), N, C, ldg), mat(again.data() + C, N, KV, ldg),
                        mat(again.data() + C + KV, N, KV, ldg), B, T, H,
                        scratch(mem, be.attention_scratch_bytes(B, T, H, hd, true)));
  EXPECT_EQ(0, std::memcmp(again.data(), dg.data(), sizeof(float) * again.size()));

  // Cached: the last m queries against the whole key/value rows of sequence 0.
  const int m = std::min(T, 5);
  std::vector<float> cached((size_t)m * C);
  be.attention_cached(qg.rows_at(T - m, m), kg.rows_at(0, T), vg.rows_at(0, T), mat(cached.data(), m, C), H,
                      scratch(mem, be.attention_cached_scratch_bytes(m, T, H, hd)));
  EXPECT_LT(rel_diff(cached.data(), og.data() + (size_t)(T - m) * C, (int64_t)m * C), 1e-5) << "cached";
}

TEST(Gqa, KernelsEqualMultiHeadAttentionOverRepeatedHeads) {
  check_kernels(2, 70, 4, 2, 16);   // two query heads per key/value head, two key tiles
  check_kernels(1, 130, 4, 1, 24);  // multi-query, a head size that is not a multiple of 16
  check_kernels(2, 9, 6, 3, 8);
}

TEST(Gqa, BackendRefusesKeyValueHeadsThatDoNotDivide) {
  std::vector<float> buf(4 * 64, 0.f), o(4 * 32), lse(4 * 4);
  std::shared_ptr<void> mem;
  Backend& be = cpu_backend();
  // 4 query heads of 8, 3 key/value heads.
  EXPECT_NE(error_of([&] {
              be.attention_forward(mat(buf.data(), 4, 32, 80), mat(buf.data() + 32, 4, 24, 80),
                                   mat(buf.data() + 56, 4, 24, 80), mat(o.data(), 4, 32), vec(lse.data(), 16), 1, 4, 4,
                                   scratch(mem, be.attention_scratch_bytes(1, 4, 4, 8, false)));
            }).find("does not divide"),
            std::string::npos);
}

ModelConfig gqa_config(int kv_heads, const std::string& structure = "TT") {
  ModelConfig c;
  c.vocab_size = 13;
  c.dim = 16;
  c.ffn_dim = 24;
  c.n_heads = 4;
  c.n_kv_heads = kv_heads;
  c.context = 32;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  if (c.n_layers != (int)structure.size()) c.retentions = {0.6f};
  return c;
}

TEST(Gqa, ModelGradientsMatchFiniteDifferences) {
  for (int kv : {2, 1}) {
    Model m(gqa_config(kv));
    EXPECT_EQ(m.param_info("decoder.layers.0.self_attn.k_proj.weight").shape, (Shape{kv * 4, 16}));
    Rng r(1);
    for (const auto& p : m.params()) {
      float* w = m.param_data() + p.offset;
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(p.shape.size() == 1 ? 1.0 + 0.2 * r.normal() : 0.3 * r.normal());
    }
    const int B = 2, T = 7;
    std::vector<int32_t> tok, tgt;
    for (int i = 0; i < B * T; ++i) {
      tok.push_back((int32_t)r.below(13));
      tgt.push_back((int32_t)r.below(13));
    }
    m.zero_grad();
    m.forward_backward(tok.data(), tgt.data(), B, T);
    for (const auto& p : m.params()) {
      if (p.name.find("self_attn") == std::string::npos) continue;
      std::vector<float> x(m.param_data() + p.offset, m.param_data() + p.offset + p.numel);
      std::vector<float> g(m.grad_data() + p.offset, m.grad_data() + p.offset + p.numel);
      auto loss = [&] {
        std::copy(x.begin(), x.end(), m.param_data() + p.offset);
        return (double)m.forward(tok.data(), tgt.data(), B, T);
      };
      testing::expect_grad_matches(p.name + " kv " + std::to_string(kv), x, g, loss, 1e-2f, 3e-2, 24, 2e-3);
      std::copy(x.begin(), x.end(), m.param_data() + p.offset);
    }
  }
}

TEST(Gqa, CachedDecodingEqualsTheFullPassAndCachesOnlyKeyValueHeads) {
  for (const char* structure : {"TTT", "T(T)T"}) {
    Model m(gqa_config(2, structure));
    Rng r(4);
    testing::spread_weights(m, 3, {0.2, 1.5, 0}, r);
    const int T = 20, V = 13;
    std::vector<int32_t> tok(T);
    for (auto& t : tok) t = (int32_t)(1 + r.below(V - 1));
    std::vector<float> full((size_t)T * V), inc((size_t)T * V);
    m.forward(tok.data(), nullptr, 1, T, full.data(), Mode::Inference);
    SequenceCache c = m.new_cache();
    m.forward_cached(c, tok.data(), 6, inc.data(), true);
    for (int t = 6; t < T; ++t) m.forward_cached(c, tok.data() + t, 1, inc.data() + (size_t)t * V, false);
    EXPECT_LT(rel_diff(inc.data(), full.data(), (int64_t)T * V), 1e-4) << structure;
    // Rows of 2 key/value heads of 4 values, keys and values, in every block that saw them.
    EXPECT_EQ(c.width, 8);
    size_t rows = 0;
    for (int b : c.rows) rows += (size_t)b;
    EXPECT_EQ(c.bytes(), rows * 2 * 8 * sizeof(float)) << structure;
  }
}

TEST(Gqa, ConfigKeyIsReadWrittenAndValidated) {
  ModelConfig c = config_from_json_text(
      R"({"num_embeddings": 64, "decoder_embed_dim": 32, "decoder_ffn_embed_dim": 48, "decoder_layers": 2,
          "decoder_attention_heads": 4, "decoder_kv_heads": 2, "qk_bias": false})",
      "config.json");
  EXPECT_EQ(c.kv_heads(), 2);
  EXPECT_EQ(c.kv_dim(), 16);
  EXPECT_EQ(c.qkv_dim(), 64);
  EXPECT_EQ(config_from_json_text(config_to_json_text(c), "again").kv_heads(), 2);
  // As many key/value heads as query heads is plain attention, written without the key.
  ModelConfig plain = config_from_json_text(
      R"({"num_embeddings": 64, "decoder_embed_dim": 32, "decoder_layers": 2, "decoder_attention_heads": 4,
          "decoder_kv_heads": 4})",
      "config.json");
  EXPECT_EQ(plain.n_kv_heads, 0);
  EXPECT_EQ(config_to_json_text(plain).find("decoder_kv_heads"), std::string::npos);
  EXPECT_NE(error_of([] {
              config_from_json_text(R"({"decoder_embed_dim": 32, "decoder_attention_heads": 4, "decoder_kv_heads": 3})",
                                    "config.json");
            }).find("config.json: decoder_kv_heads (3) does not divide decoder_attention_heads (4)"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              config_from_json_text(R"({"decoder_embed_dim": 32, "decoder_attention_heads": 4, "decoder_kv_heads": 0})",
                                    "config.json");
            }).find("decoder_kv_heads (0) must be positive"),
            std::string::npos);
  // The parameter count follows the narrower k and v.
  ModelConfig mha = c;
  mha.n_kv_heads = 0;
  EXPECT_EQ(mha.param_count() - c.param_count(), 2 * 2 * 16 * 32);
  Model m(c);
  EXPECT_EQ(m.num_params(), c.param_count());
}

TEST(Gqa, TrainFlagAndGenerateStats) {
  testing::TempDir tmp;
  const std::string data = testing::prepare_tiny(tmp);
  const std::string run = tmp.file("run");
  auto r = testing::run_cli({"train", "--data", data, "--dim", "32", "--heads", "4", "--kv-heads", "2", "--layers", "3",
                             "--structure", "T(T)T", "--retention", "0.5", "--steps", "2", "--batch", "2", "--seq",
                             "16", "--eval-batches", "0", "-o", run, "-t", "2", "-q"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(load_config(find_checkpoint(run) + "/config.json").kv_heads(), 2);
  r = testing::run_cli({"generate", "-m", run, "-p", "The", "-n", "4", "--stats", "-t", "2"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("kv heads            2 of 4 query heads"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("weights             mapped from the file"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("peak rss"), std::string::npos) << r.output;
  r = testing::run_cli({"train", "--data", data, "--dim", "32", "--heads", "4", "--kv-heads", "3", "--steps", "1",
                        "-o", tmp.file("bad")});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("decoder_kv_heads (3) does not divide decoder_attention_heads (4)"), std::string::npos)
      << r.output;
}

}  // namespace gqa_tests
}  // namespace subllm
