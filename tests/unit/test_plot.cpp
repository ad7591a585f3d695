// `subllm plot`: reading run folders, the chart's numbers, and SVG / PNG output checked from the
// bytes up (the PNG is decoded here with an independent CRC, Adler-32 and stored-block reader).
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "subllm/plot.h"
#include "test_util.h"

namespace subllm {
namespace {

using testing::error_of;
using testing::read_all;
using testing::TempDir;
using testing::write_file;
namespace fs = std::filesystem;

// A run folder whose train loss decays from ~8 to ~3 with validation every `val_every` steps.
std::string fake_run(const TempDir& tmp, const std::string& name, int steps, int val_every, double floor = 3.0) {
  std::string text;
  for (int s = 1; s <= steps; ++s) {
    const double loss = floor + 5.0 * std::exp(-s / 30.0) + 0.05 * std::sin(s * 1.7);
    char line[256];
    std::snprintf(line, sizeof line,
                  "{\"step\": %d, \"loss\": %.5f, \"lr\": 0.002, \"grad_norm\": 0.8, \"tokens\": %d, "
                  "\"tokens_per_s\": 4700.0, \"elapsed_s\": %.3f",
                  s, loss, s * 4096, s * 0.5);
    text += line;
    if (s % val_every == 0) text += ", \"val_loss\": " + std::to_string(loss + 0.1);
    text += "}\n";
  }
  write_file(tmp.file(name + "/metrics.jsonl"), text);
  return tmp.file(name);
}

// ---- PNG decoding, written independently of the encoder under test ----

uint32_t be32(const std::string& s, size_t at) {
  return (uint32_t)(uint8_t)s[at] << 24 | (uint32_t)(uint8_t)s[at + 1] << 16 | (uint32_t)(uint8_t)s[at + 2] << 8 |
         (uint32_t)(uint8_t)s[at + 3];
}

uint32_t bitwise_crc32(const std::string& s, size_t at, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= (uint8_t)s[at + i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
  }
  return ~c;
}

uint32_t slow_adler32(const std::string& s) {
  uint64_t a = 1, b = 0;
  for (unsigned char c : s) {
    a = (a + c) % 65521;
    b = (b + a) % 65521;
  }
  return (uint32_t)(b << 16 | a);
}

struct DecodedPng {
  uint32_t width = 0, height = 0;
  int bit_depth = 0, colour_type = 0;
  std::string raw;  // filtered scanlines as inflated from IDAT
  std::vector<std::string> chunk_types;
  std::string error;  // first structural problem found, "" if none
  // RGB of pixel (x, y), valid when every scanline uses filter 0 (what the encoder writes).
  std::array<int, 3> at(int x, int y) const {
    const size_t row = 1 + (size_t)width * 3;
    const size_t p = (size_t)y * row + 1 + (size_t)x * 3;
    return {(uint8_t)raw[p], (uint8_t)raw[p + 1], (uint8_t)raw[p + 2]};
  }
};

DecodedPng decode_png(const std::string& png) {
  DecodedPng d;
  auto fail = [&](const std::string& why) {
    if (d.error.empty()) d.error = why;
    return d;
  };
  const std::string sig = "\x89PNG\r\n\x1a\n";
  if (png.compare(0, 8, sig) != 0) return fail("bad signature");
  std::string zdata;
  size_t pos = 8;
  while (pos + 12 <= png.size()) {
    const uint32_t len = be32(png, pos);
    if (pos + 12 + len > png.size()) return fail("chunk runs past the end");
    const std::string type = png.substr(pos + 4, 4);
    if (bitwise_crc32(png, pos + 4, 4 + len) != be32(png, pos + 8 + len)) return fail("bad CRC in " + type);
    d.chunk_types.push_back(type);
    if (type == "IHDR") {
      d.width = be32(png, pos + 8);
      d.height = be32(png, pos + 12);
      d.bit_depth = (uint8_t)png[pos + 16];
      d.colour_type = (uint8_t)png[pos + 17];
    } else if (type == "IDAT") {
      zdata += png.substr(pos + 8, len);
    }
    pos += 12 + len;
  }
  if (pos != png.size()) return fail("trailing bytes after the last chunk");
  if (d.chunk_types.empty() || d.chunk_types.front() != "IHDR" || d.chunk_types.back() != "IEND")
    return fail("IHDR must come first and IEND last");
  if (zdata.size() < 6) return fail("no zlib stream");
  const int cmf = (uint8_t)zdata[0], flg = (uint8_t)zdata[1];
  if ((cmf & 0x0F) != 8 || (cmf * 256 + flg) % 31 != 0 || (flg & 0x20)) return fail("bad zlib header");
  size_t z = 2;
  for (bool last = false; !last;) {
    if (z + 5 > zdata.size()) return fail("deflate stream ends early");
    const int header = (uint8_t)zdata[z];
    last = header & 1;
    if (((header >> 1) & 3) != 0) return fail("a deflate block is not stored");
    const unsigned len = (uint8_t)zdata[z + 1] | (uint8_t)zdata[z + 2] << 8;
    const unsigned nlen = (uint8_t)zdata[z + 3] | (uint8_t)zdata[z + 4] << 8;
    if ((len ^ 0xFFFF) != nlen) return fail("stored block LEN/NLEN mismatch");
    if (z + 5 + len > zdata.size()) return fail("stored block runs past the stream");
    d.raw += zdata.substr(z + 5, len);
    z += 5 + len;
  }
  if (z + 4 != zdata.size()) return fail("zlib stream length is off");
  if (be32(zdata, z) != slow_adler32(d.raw)) return fail("bad Adler-32");
  return d;
}

bool is_background(const std::array<int, 3>& p) { return p[0] == 255 && p[1] == 255 && p[2] == 255; }
// The chart's own colours are saturated; grid, frame and text are greys.
bool is_coloured(const std::array<int, 3>& p) {
  return std::max({p[0], p[1], p[2]}) - std::min({p[0], p[1], p[2]}) > 60;
}

// ---- loading ----

TEST(PlotLoad, ReadsPointsIgnoringUnknownKeysAndBlankLines) {
  TempDir tmp("plot");
  write_file(tmp.file("run1/metrics.jsonl"),
             "{\"step\": 1, \"loss\": 6.5, \"tokens\": 100, \"elapsed_s\": 1.5, \"future\": {\"x\": [1, 2]}}\n"
             "\n"
             "{\"step\": 2, \"loss\": 6.0, \"val_loss\": 6.2, \"tokens\": 200}\n"
             "  \r\n"
             "{\"step\": 3, \"loss\": null, \"grad_norm\": null}\n");
  const RunCurves run = load_run(tmp.file("run1"));
  EXPECT_EQ(run.label, "run1");
  ASSERT_EQ(run.points.size(), 3u);
  EXPECT_EQ(run.points[0].step, 1);
  EXPECT_DOUBLE_EQ(run.points[0].loss, 6.5);
  EXPECT_DOUBLE_EQ(run.points[0].tokens, 100);
  EXPECT_DOUBLE_EQ(run.points[0].elapsed_s, 1.5);
  EXPECT_TRUE(std::isnan(run.points[0].val_loss));
  EXPECT_DOUBLE_EQ(run.points[1].val_loss, 6.2);
  EXPECT_TRUE(std::isnan(run.points[1].elapsed_s));
  EXPECT_TRUE(std::isnan(run.points[2].loss));
}

TEST(PlotLoad, MissingFolderOrMetricsNamesTheFolder) {
  TempDir tmp("plot");
  const std::string missing = tmp.file("no_such_run");
  std::string err = error_of([&] { load_run(missing); });
  EXPECT_NE(err.find(missing), std::string::npos) << err;

  fs::create_directories(tmp.file("empty_run"));
  err = error_of([&] { load_run(tmp.file("empty_run")); });
  EXPECT_NE(err.find("no metrics.jsonl in '" + tmp.file("empty_run") + "'"), std::string::npos) << err;
  EXPECT_NE(err.find("subllm train"), std::string::npos) << err;
}

TEST(PlotLoad, MalformedLineNamesFileAndLineNumber) {
  TempDir tmp("plot");
  const std::string good = "{\"step\": 1, \"loss\": 5.0}\n";
  const std::string bad_lines[] = {"{\"step\": 3, \"loss\": 4.0",  // cut short, then more lines follow
                                   "[1, 2, 3]",
                                   "{\"loss\": 4.0}",
                                   "{\"step\": \"three\", \"loss\": 4.0}",
                                   "{\"step\": 3, \"loss\": \"4.0\"}",
                                   "{\"step\": -3, \"loss\": 4.0}",
                                   "{\"step\": 3, \"loss\": 4.0, \"val_loss\": [4]}"};
  for (const std::string& bad : bad_lines) {
    write_file(tmp.file("run/metrics.jsonl"), good + "\n" + bad + "\n" + good);
    const std::string err = error_of([&] { load_run(tmp.file("run")); });
    EXPECT_NE(err.find("line 3"), std::string::npos) << bad << " -> " << err;
    EXPECT_NE(err.find(tmp.file("run/metrics.jsonl")), std::string::npos) << bad << " -> " << err;
  }
}

TEST(PlotLoad, UnfinishedLastLineOfALiveRunIsSkipped) {
  TempDir tmp("plot");
  write_file(tmp.file("run/metrics.jsonl"), "{\"step\": 1, \"loss\": 5.0}\n{\"step\": 2, \"lo");
  const RunCurves run = load_run(tmp.file("run"));
  ASSERT_EQ(run.points.size(), 1u);
  // The same text with its newline is a finished line, and so malformed.
  write_file(tmp.file("run/metrics.jsonl"), "{\"step\": 1, \"loss\": 5.0}\n{\"step\": 2, \"lo\n");
  EXPECT_NE(error_of([&] { load_run(tmp.file("run")); }).find("line 2"), std::string::npos);
}

TEST(PlotLoad, LaterLineForAStepWinsAndResumedClockIsChained) {
  TempDir tmp("plot");
  write_file(tmp.file("run/metrics.jsonl"),
             "{\"step\": 1, \"loss\": 5.0, \"elapsed_s\": 10}\n"
             "{\"step\": 2, \"loss\": 4.0, \"elapsed_s\": 20}\n"
             "{\"step\": 2, \"loss\": 4.5, \"elapsed_s\": 3}\n"  // resumed: a new process redid step 2
             "{\"step\": 3, \"loss\": 3.5, \"elapsed_s\": 6}\n");
  const RunCurves run = load_run(tmp.file("run"));
  ASSERT_EQ(run.points.size(), 3u);
  EXPECT_DOUBLE_EQ(run.points[1].loss, 4.5);
  EXPECT_DOUBLE_EQ(run.points[0].elapsed_s, 10);
  EXPECT_DOUBLE_EQ(run.points[1].elapsed_s, 13);
  EXPECT_DOUBLE_EQ(run.points[2].elapsed_s, 16);
}

TEST(PlotLoad, LabelsComeFromFoldersOrFlags) {
  TempDir tmp("plot");
  const std::string a = fake_run(tmp, "x/out", 20, 10), b = fake_run(tmp, "y/out", 20, 10);
  const std::string c = fake_run(tmp, "base", 20, 10);
  auto runs = load_runs({a, b, c + "/"});
  EXPECT_EQ(runs[0].label, "x/out");  // same folder name: the parent tells them apart
  EXPECT_EQ(runs[1].label, "y/out");
  EXPECT_EQ(runs[2].label, "base");
  runs = load_runs({a, c}, {"first", "second"});
  EXPECT_EQ(runs[0].label, "first");
  EXPECT_EQ(runs[1].label, "second");
  EXPECT_NE(error_of([&] { load_runs({a, c}, {"only one"}); }).find("--label"), std::string::npos);
}

TEST(PlotSummary, LastTrainLossAndBestValidationWithItsStep) {
  TempDir tmp("plot");
  write_file(tmp.file("run/metrics.jsonl"),
             "{\"step\": 10, \"loss\": 5.0, \"val_loss\": 5.5}\n"
             "{\"step\": 20, \"loss\": 4.0, \"val_loss\": 4.2}\n"
             "{\"step\": 30, \"loss\": 3.9, \"val_loss\": 4.4}\n"
             "{\"step\": 40, \"loss\": null}\n");
  const RunSummary s = summarize_run(load_run(tmp.file("run")));
  EXPECT_EQ(s.last_step, 40);
  EXPECT_DOUBLE_EQ(s.last_loss, 3.9);
  EXPECT_DOUBLE_EQ(s.best_val_loss, 4.2);
  EXPECT_EQ(s.best_val_step, 20);
}

// ---- numbers ----

TEST(PlotMath, MovingAverageIsCentredAndShrinksAtTheEnds) {
  const std::vector<double> v = {1, 2, 3, 4, 5, 6};
  const auto m = moving_average(v, 3);
  ASSERT_EQ(m.size(), v.size());
  EXPECT_DOUBLE_EQ(m[0], 1.5);
  EXPECT_DOUBLE_EQ(m[2], 3.0);
  EXPECT_DOUBLE_EQ(m[5], 5.5);
  EXPECT_EQ(moving_average(v, 1), v);
  const auto with_gap = moving_average({1, NAN, 3}, 3);
  EXPECT_DOUBLE_EQ(with_gap[1], 2.0);
  EXPECT_EQ(auto_smooth_window(10), 1);
  EXPECT_EQ(auto_smooth_window(5000), 100);
}

TEST(PlotMath, TicksAreNiceRoundValuesInsideTheRange) {
  EXPECT_EQ(nice_ticks(0, 1, 6), (std::vector<double>{0, 0.2, 0.4, 0.6, 0.8, 1}));
  const auto t = nice_ticks(2.83, 10.41, 8);
  ASSERT_GE(t.size(), 3u);
  EXPECT_LE(t.size(), 9u);
  const double step = t[1] - t[0];
  EXPECT_DOUBLE_EQ(step, 2.0);
  EXPECT_DOUBLE_EQ(t.front(), 4);
  EXPECT_DOUBLE_EQ(t.back(), 10);
  for (double x : nice_ticks(0, 2000, 9)) EXPECT_EQ(std::fmod(x, 250), 0) << x;
}

// ---- SVG ----

TEST(PlotSvg, HasSeriesLegendAxesAndMarkers) {
  TempDir tmp("plot");
  auto runs = load_runs({fake_run(tmp, "llama", 200, 50), fake_run(tmp, "subllm", 150, 50, 2.8)});
  PlotOptions o;
  o.title = "A & B";
  const std::string svg = render_svg(runs, o);
  EXPECT_EQ(svg.rfind("<svg ", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_NE(svg.find("width=\"900\" height=\"560\""), std::string::npos);
  for (const char* text : {">llama train<", ">llama valid<", ">subllm train<", ">subllm valid<", ">step<", ">loss<",
                           ">A &amp; B<"})
    EXPECT_NE(svg.find(text), std::string::npos) << text;
  // Train curves carry the run colour: the first two palette entries.
  EXPECT_NE(svg.find("stroke=\"#1f77b4\""), std::string::npos);
  EXPECT_NE(svg.find("stroke=\"#ff7f0e\""), std::string::npos);
  // 4 + 3 validation points, plus one legend marker per run, each a white ring and a coloured dot.
  size_t circles = 0;
  for (size_t p = svg.find("<circle"); p != std::string::npos; p = svg.find("<circle", p + 1)) ++circles;
  EXPECT_EQ(circles, 2u * (4 + 3 + 2));
  // The y axis carries round tick labels.
  EXPECT_NE(svg.find(">4<"), std::string::npos);
}

TEST(PlotSvg, NoValidationMeansNoValidLegendEntry) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "solo", 100, 1000)});
  const std::string svg = render_svg(runs, PlotOptions{});
  EXPECT_NE(svg.find(">solo train<"), std::string::npos);
  EXPECT_EQ(svg.find("solo valid"), std::string::npos);
}

TEST(PlotSvg, TokensAxisUsesShortNumbersAndNeedsTokens) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "run", 300, 100)});
  PlotOptions o;
  o.x = PlotX::tokens;
  const std::string svg = render_svg(runs, o);
  EXPECT_NE(svg.find(">tokens<"), std::string::npos);
  EXPECT_NE(svg.find("M<"), std::string::npos);  // 300 * 4096 tokens: ticks in millions
  EXPECT_GE(plot_frame(runs, o).x_hi, 300.0 * 4096);

  write_file(tmp.file("bare/metrics.jsonl"), "{\"step\": 1, \"loss\": 5}\n{\"step\": 2, \"loss\": 4}\n");
  const auto bare = load_runs({tmp.file("bare")});
  EXPECT_NE(error_of([&] { render_svg(bare, o); }).find("--x step"), std::string::npos);
}

// ---- PNG ----

TEST(PlotPng, IsAValidPngOfStoredDeflateBlocks) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "run", 120, 40)});
  PlotOptions o;
  o.width = 640;
  o.height = 400;
  const std::vector<uint8_t> bytes = render_png(runs, o);
  const std::string png(bytes.begin(), bytes.end());
  const DecodedPng d = decode_png(png);
  ASSERT_EQ(d.error, "");
  EXPECT_EQ(d.width, 640u);
  EXPECT_EQ(d.height, 400u);
  EXPECT_EQ(d.bit_depth, 8);
  EXPECT_EQ(d.colour_type, 2);
  EXPECT_EQ(d.raw.size(), 400u * (1 + 640u * 3));
  for (uint32_t y = 0; y < d.height; ++y) ASSERT_EQ(d.raw[y * (1 + 640u * 3)], 0) << "filter byte of row " << y;

  // The checker itself must notice damage.
  std::string broken = png;
  broken[40] ^= 1;
  EXPECT_NE(decode_png(broken).error, "");
}

TEST(PlotPng, EncoderRoundTripsPixelsAcrossManyStoredBlocks) {
  // 200 x 150 RGB is over 65535 bytes, so the data spans more than one stored block.
  const int w = 200, h = 150;
  std::vector<uint8_t> rgb((size_t)w * h * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = (uint8_t)(i * 7 + i / 611);
  const auto bytes = encode_png_rgb(rgb, w, h);
  const DecodedPng d = decode_png(std::string(bytes.begin(), bytes.end()));
  ASSERT_EQ(d.error, "");
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      const size_t i = ((size_t)y * w + x) * 3;
      ASSERT_EQ(d.at(x, y), (std::array<int, 3>{rgb[i], rgb[i + 1], rgb[i + 2]})) << x << "," << y;
    }
  }
  EXPECT_NE(error_of([&] { encode_png_rgb(rgb, w, h + 1); }), "");
}

TEST(PlotPng, DrawsTheCurveWhereTheDataIs) {
  TempDir tmp("plot");
  // A flat train loss of 5 on a 4..7 axis: a horizontal line a third of the way up the data area.
  std::string text;
  for (int s = 0; s <= 100; ++s) text += "{\"step\": " + std::to_string(s) + ", \"loss\": 5.0}\n";
  write_file(tmp.file("flat/metrics.jsonl"), text);
  const auto runs = load_runs({tmp.file("flat")});
  PlotOptions o;
  o.ylim = std::make_pair(4.0, 7.0);
  const PlotFrame f = plot_frame(runs, o);
  ASSERT_LT(f.left, f.right);
  ASSERT_LT(f.top, f.bottom);
  EXPECT_DOUBLE_EQ(f.y_lo, 4.0);
  EXPECT_DOUBLE_EQ(f.y_hi, 7.0);
  const auto bytes = render_png(runs, o);
  const DecodedPng d = decode_png(std::string(bytes.begin(), bytes.end()));
  ASSERT_EQ(d.error, "");

  auto px = [&](double step, double loss) {
    const double x = f.left + (step - f.x_lo) / (f.x_hi - f.x_lo) * (f.right - f.left);
    const double y = f.bottom - (loss - f.y_lo) / (f.y_hi - f.y_lo) * (f.bottom - f.top);
    return d.at((int)x, (int)y);
  };
  for (double step : {10.0, 50.0, 90.0}) {
    const auto on = px(step, 5.0);
    EXPECT_TRUE(is_coloured(on)) << "step " << step << ": " << on[0] << "," << on[1] << "," << on[2];
    EXPECT_GT(on[2], on[0] + 60) << "the first run is drawn in blue";
    EXPECT_FALSE(is_coloured(px(step, 4.3))) << "nothing is drawn below the line";
    EXPECT_FALSE(is_coloured(px(step, 5.7))) << "nothing is drawn above the line";
    EXPECT_FALSE(is_coloured(px(step, 6.0))) << "nothing is drawn at the mirror image of the line";
  }
  // Margins outside the data area hold no curve ink.
  EXPECT_TRUE(is_background(d.at(2, 2)));
}

TEST(PlotPng, TextIsDrawnInTheImage) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "run", 100, 50)});
  PlotOptions o;
  auto dark_in_top_band = [&](const PlotOptions& opt) {
    const auto bytes = render_png(runs, opt);
    const DecodedPng d = decode_png(std::string(bytes.begin(), bytes.end()));
    const PlotFrame f = plot_frame(runs, opt);
    int dark = 0;
    for (int y = 0; y < (int)f.top - 6; ++y)
      for (int x = 0; x < (int)d.width; ++x) dark += d.at(x, y)[0] < 128;
    return dark;
  };
  EXPECT_EQ(dark_in_top_band(o), 0);
  o.title = "Loss curves";
  EXPECT_GT(dark_in_top_band(o), 40);
}

// ---- writing ----

TEST(PlotWrite, PicksFormatByExtensionAndReplacesAtomically) {
  TempDir tmp("plot");
  const std::string run = fake_run(tmp, "run", 60, 20);
  const std::string png = tmp.file("curves.PNG"), svg = tmp.file("curves.svg");
  write_file(png, "old");
  const auto summary = plot_runs({run}, {}, png, PlotOptions{});
  ASSERT_EQ(summary.size(), 1u);
  EXPECT_EQ(summary[0].label, "run");
  EXPECT_EQ(summary[0].best_val_step, 60);
  EXPECT_EQ(read_all(png).substr(1, 3), "PNG");
  plot_runs({run}, {}, svg, PlotOptions{});
  EXPECT_EQ(read_all(svg).rfind("<svg", 0), 0u);
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << e.path();
}

TEST(PlotWrite, ErrorsLeaveNoOutputFile) {
  TempDir tmp("plot");
  const std::string good = fake_run(tmp, "good", 50, 10);
  write_file(tmp.file("bad/metrics.jsonl"), "{\"step\": 1, \"loss\": 5}\n{\"step\": 2, \"loss\": oops}\n");
  fs::create_directories(tmp.file("not_a_run"));
  const std::string out = tmp.file("out.png");
  PlotOptions o;

  std::string err = error_of([&] { plot_runs({good, tmp.file("missing")}, {}, out, o); });
  EXPECT_NE(err.find(tmp.file("missing")), std::string::npos) << err;
  err = error_of([&] { plot_runs({good, tmp.file("not_a_run")}, {}, out, o); });
  EXPECT_NE(err.find("no metrics.jsonl in"), std::string::npos) << err;
  err = error_of([&] { plot_runs({good, tmp.file("bad")}, {}, out, o); });
  EXPECT_NE(err.find("line 2"), std::string::npos) << err;
  EXPECT_NE(err.find(tmp.file("bad/metrics.jsonl")), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(out));

  const std::string jpg = tmp.file("out.jpg");
  err = error_of([&] { plot_runs({good}, {}, jpg, o); });
  EXPECT_NE(err.find("use .png or .svg"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(jpg));
  EXPECT_NE(error_of([&] { plot_runs({good}, {}, tmp.file("curves"), o); }).find("use .png or .svg"),
            std::string::npos);

  PlotOptions bad = o;
  bad.ylim = std::make_pair(5.0, 3.0);
  EXPECT_NE(error_of([&] { plot_runs({good}, {}, out, bad); }).find("--ylim"), std::string::npos);
  bad = o;
  bad.width = 10;
  EXPECT_NE(error_of([&] { plot_runs({good}, {}, out, bad); }).find("--width"), std::string::npos);
  EXPECT_NE(error_of([&] { plot_runs({good}, {}, tmp.file("no_folder/out.svg"), o); }).find("no_folder"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(out));
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << e.path();
}

}  // namespace
}  // namespace subllm
