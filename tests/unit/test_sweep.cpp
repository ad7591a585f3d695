// The keep-threshold sweep: `eval ppl --keep-threshold A,B,...` (loss, retention and speed per
// threshold, each equal to a run at that threshold alone), and `plot --sweep` of its JSON.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "subllm/config.h"
#include "subllm/eval.h"
#include "subllm/model.h"
#include "subllm/plot.h"
#include "subllm/prepare.h"
#include "subllm/rng.h"
#include "model_util.h"
#include "test_util.h"

namespace subllm {
namespace sweep_tests {

using json = nlohmann::json;
using testing::error_of;
using testing::read_all;
using testing::run_cli;
using testing::TempDir;
using testing::write_file;
namespace fs = std::filesystem;

// A model folder of `structure` with score layers that spread scores around 0, and its data.
std::string sweep_model_dir(const TempDir& tmp, const std::string& structure, std::vector<float> ret) {
  if (!fs::exists(tmp.file("data"))) testing::prepare_tiny(tmp, 40, 5, 400);
  ModelConfig c;
  c.vocab_size = 400;
  c.dim = 32;
  c.ffn_dim = 48;
  c.n_heads = 4;
  c.context = 96;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(ret);
  Model m(c);
  testing::spread_weights(m, 5, {0, 1.5, 0});
  const std::string dir = tmp.file("model_" + std::to_string(c.n_layers) + "_" + std::to_string(c.retentions.size()));
  fs::create_directories(dir);
  m.save(dir + "/model.safetensors");
  save_config(m.config(), dir + "/config.json");
  fs::copy_file(tmp.file("data/tokenizer.model"), dir + "/tokenizer.model");
  return dir;
}

json ppl_json(const std::string& dir, const std::string& data, const std::string& thresholds) {
  const auto r = run_cli({"eval", "ppl", "-m", dir, "--data", data, "--seq", "32", "--max-tokens", "200",
                          "--keep-threshold", thresholds, "--speed-prompt", "24", "--speed-decode", "8", "--json", "-t", "1"});
  EXPECT_EQ(r.code, 0) << r.output;
  const size_t brace = r.output.find('{');  // the progress line goes to stderr; stdout is the object
  EXPECT_NE(brace, std::string::npos) << r.output;
  return json::parse(r.output.substr(brace));
}

TEST(KeepThresholdSweep, EachValueEqualsARunAtThatValueAndRetentionFallsAsItRises) {
  TempDir tmp("sweep");
  const std::string dir = sweep_model_dir(tmp, "T(TT(TT)T)T", {0.6f, 0.6f});
  const std::string data = tmp.file("data");
  const json sweep = ppl_json(dir, data, "-100,0,0.5,2");
  ASSERT_EQ(sweep["results"].size(), 4u);
  double last_kept = 2;
  for (size_t i = 0; i < 4; ++i) {
    const json& r = sweep["results"][i];
    const float v = std::vector<float>{-100, 0, 0.5f, 2}[i];
    EXPECT_FLOAT_EQ(r["keep_threshold"].get<float>(), v);
    ASSERT_EQ(r["retention"].size(), 2u);
    // The first subsampler keeps fewer tokens as the threshold rises; -100 keeps them all.
    const double kept = r["retention"][0].get<double>();
    EXPECT_LE(kept, last_kept + 1e-12);
    last_kept = kept;
    if (v < 0) {
      EXPECT_DOUBLE_EQ(kept, 1.0);
    }
    EXPECT_GT(r["decode_tokens_per_s"].get<double>(), 0);
    EXPECT_GT(r["prefill_tokens_per_s"].get<double>(), 0);
    EXPECT_GT(r["kv_cache_bytes"].get<double>(), 0);
    // The same threshold alone gives the same loss and retention.
    char one[32];
    std::snprintf(one, sizeof one, "%g", v);
    const json alone = ppl_json(dir, data, one);
    EXPECT_NEAR(alone["results"][0]["loss"].get<double>(), r["loss"].get<double>(), 1e-9) << v;
    EXPECT_EQ(alone["results"][0]["retention"], r["retention"]) << v;
  }
  EXPECT_LT(sweep["results"][3]["retention"][0].get<double>(), 1.0);
  // A cache that keeps fewer tokens inside the segments is smaller.
  EXPECT_LT(sweep["results"][3]["kv_cache_bytes"].get<double>(), sweep["results"][0]["kv_cache_bytes"].get<double>());

  // The chart of two sweeps, and the table it prints.
  write_file(tmp.file("a.json"), sweep.dump());
  write_file(tmp.file("b.json"), sweep.dump());
  const auto plot = run_cli({"plot", "--sweep", tmp.file("a.json"), tmp.file("b.json"), "--label", "f32", "--label",
                             "again", "-o", tmp.file("sweep.png")});
  ASSERT_EQ(plot.code, 0) << plot.output;
  EXPECT_NE(plot.output.find("again"), std::string::npos);
  const std::string png = read_all(tmp.file("sweep.png"));
  ASSERT_GT(png.size(), 1000u);
  EXPECT_EQ(png.substr(1, 3), "PNG");
  const std::vector<SweepCurve> curves = {load_sweep(tmp.file("a.json"))};
  const std::string svg = render_sweep_plot(curves, PlotOptions{}, PlotFormat::svg);
  EXPECT_NE(svg.find("<svg"), std::string::npos);
}

TEST(KeepThresholdSweep, MisuseIsRefusedWithTheReason) {
  TempDir tmp("sweep_bad");
  const std::string llama = sweep_model_dir(tmp, "TTT", {});
  const std::string subllm = sweep_model_dir(tmp, "T(TT)T", {0.6f});
  const std::string data = tmp.file("data");
  auto ppl = [&](std::vector<std::string> extra, const std::string& dir) {
    std::vector<std::string> args = {"eval", "ppl", "-m", dir, "--data", data, "--max-tokens", "64"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_cli(args);
  };
  auto r = ppl({"--keep-threshold", "0,1"}, llama);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("has none (a LLaMA)"), std::string::npos) << r.output;
  r = ppl({"--keep-threshold", "0,1", "--mode", "both"}, subllm);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("drop --mode"), std::string::npos) << r.output;
  r = ppl({"--keep-threshold", "0,nan"}, subllm);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--keep-threshold"), std::string::npos) << r.output;
  r = ppl({"--speed", "--speed-decode", "96"}, subllm);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--speed-decode"), std::string::npos) << r.output;
  // One value with --speed: the usual table and a speed line.
  r = ppl({"--speed", "--speed-prompt", "16", "--speed-decode", "4"}, subllm);
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("decoded one at a time"), std::string::npos) << r.output;

  write_file(tmp.file("bad.json"), "{\"results\": [{\"loss\": 1}]}");
  EXPECT_NE(error_of([&] { load_sweep(tmp.file("bad.json")); }).find("keep_threshold"), std::string::npos);
  write_file(tmp.file("junk.json"), "not json");
  EXPECT_NE(error_of([&] { load_sweep(tmp.file("junk.json")); }).find("junk.json"), std::string::npos);
  const auto plot = run_cli({"plot", "--sweep", tmp.file("junk.json"), "-o", tmp.file("x.png")});
  EXPECT_NE(plot.code, 0);
  EXPECT_FALSE(fs::exists(tmp.file("x.png")));
  EXPECT_NE(plot.output.find("eval ppl --keep-threshold"), std::string::npos) << plot.output;
}

}  // namespace sweep_tests
}  // namespace subllm
