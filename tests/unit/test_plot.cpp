// `subllm plot`: reading run folders, the chart's numbers, and the PNG (read back through cairo),
// SVG (checked as XML, one stroked path per curve) and PDF that cairo draws.
#include <cairo.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "subllm/plot.h"
#include "test_util.h"

namespace subllm {
namespace plot_tests {

using testing::error_of;
using testing::read_all;
using testing::TempDir;
using testing::write_file;
namespace fs = std::filesystem;

// A run folder whose train loss decays from ~8 to ~3 with validation every `val_every` steps.
// With `retention`, each validation also logs the retention of two subsamplers, as SUBLLM runs do.
std::string fake_run(const TempDir& tmp, const std::string& name, int steps, int val_every, double floor = 3.0,
                     bool retention = false) {
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
    if (s % val_every == 0 && retention)
      text += ", \"retention\": [" + std::to_string(0.5 + 0.1 / s) + ", " + std::to_string(0.25 - 0.1 / s) + "]";
    text += "}\n";
  }
  write_file(tmp.file(name + "/metrics.jsonl"), text);
  return tmp.file(name);
}

// ---- reading the output back ----

// A PNG decoded by cairo: 8-bit RGB per pixel, or an error.
struct Image {
  int width = 0, height = 0;
  std::vector<std::array<int, 3>> px;
  std::string error;
  std::array<int, 3> at(int x, int y) const { return px[(size_t)y * width + x]; }
};

Image decode_png(const std::string& bytes) {
  struct Reader {
    const std::string* bytes;
    size_t at = 0;
  } reader{&bytes};
  auto read = [](void* closure, unsigned char* data, unsigned int length) {
    auto* r = static_cast<Reader*>(closure);
    if (r->at + length > r->bytes->size()) return CAIRO_STATUS_READ_ERROR;
    std::copy_n(r->bytes->data() + r->at, length, reinterpret_cast<char*>(data));
    r->at += length;
    return CAIRO_STATUS_SUCCESS;
  };
  Image img;
  cairo_surface_t* s = cairo_image_surface_create_from_png_stream(read, &reader);
  if (cairo_surface_status(s) != CAIRO_STATUS_SUCCESS) {
    img.error = cairo_status_to_string(cairo_surface_status(s));
    cairo_surface_destroy(s);
    return img;
  }
  cairo_surface_flush(s);
  img.width = cairo_image_surface_get_width(s);
  img.height = cairo_image_surface_get_height(s);
  const int stride = cairo_image_surface_get_stride(s);
  const unsigned char* data = cairo_image_surface_get_data(s);
  const cairo_format_t format = cairo_image_surface_get_format(s);
  for (int y = 0; y < img.height; ++y) {
    for (int x = 0; x < img.width; ++x) {
      uint32_t v = 0;
      std::copy_n(data + (size_t)y * stride + 4 * (size_t)x, 4, reinterpret_cast<unsigned char*>(&v));
      const int a = format == CAIRO_FORMAT_ARGB32 ? (int)(v >> 24) : 255;
      // Composite a (premultiplied) translucent pixel onto white.
      img.px.push_back({(int)(v >> 16 & 255) + 255 - a, (int)(v >> 8 & 255) + 255 - a, (int)(v & 255) + 255 - a});
    }
  }
  cairo_surface_destroy(s);
  return img;
}

bool is_background(const std::array<int, 3>& p) { return p[0] == 255 && p[1] == 255 && p[2] == 255; }
// The chart's own colours are saturated; grid, frame and text are greys.
bool is_coloured(const std::array<int, 3>& p) {
  return std::max({p[0], p[1], p[2]}) - std::min({p[0], p[1], p[2]}) > 60;
}

// Checks that `xml` is one well-formed element tree: every tag closed in order, attributes quoted.
// Returns "" or what is wrong.
std::string xml_problem(const std::string& xml) {
  std::vector<std::string> open;
  size_t p = 0;
  bool root_seen = false;
  while ((p = xml.find('<', p)) != std::string::npos) {
    if (xml.compare(p, 4, "<!--") == 0) {
      p = xml.find("-->", p);
      if (p == std::string::npos) return "unterminated comment";
      continue;
    }
    size_t q = p + 1;
    char quote = 0;
    for (; q < xml.size(); ++q) {
      if (quote) {
        if (xml[q] == quote) quote = 0;
      } else if (xml[q] == '"' || xml[q] == '\'') {
        quote = xml[q];
      } else if (xml[q] == '>') {
        break;
      }
    }
    if (q >= xml.size()) return "unterminated tag at " + std::to_string(p);
    const std::string tag = xml.substr(p + 1, q - p - 1);
    p = q + 1;
    if (tag.empty()) return "empty tag";
    if (tag[0] == '?' || tag[0] == '!') continue;
    const bool closing = tag[0] == '/', self_closing = tag.back() == '/';
    const std::string body = tag.substr(closing ? 1 : 0);
    const std::string name = body.substr(0, body.find_first_of(" \t\r\n/"));
    if (closing) {
      if (open.empty() || open.back() != name) return "</" + name + "> closes nothing open";
      open.pop_back();
    } else if (!self_closing) {
      if (open.empty() && root_seen) return "a second root element <" + name + ">";
      root_seen = true;
      open.push_back(name);
    }
  }
  if (!open.empty()) return "<" + open.back() + "> is never closed";
  return root_seen ? "" : "no root element";
}

// cairo's SVG colour for a palette entry, as in its style attributes.
std::string svg_colour(int r, int g, int b) {
  auto pct = [](int v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%f", v / 255.0 * 100);
    std::string s = buf;
    s.erase(s.find_last_not_of('0') + 1);
    if (s.back() == '.') s.pop_back();
    return s + "%";
  };
  return "rgb(" + pct(r) + "," + pct(g) + "," + pct(b) + ")";
}
const std::string kBlue = svg_colour(31, 119, 180), kOrange = svg_colour(255, 127, 14);

// Curves are the stroked paths with round line caps (grid, ticks, frame and legend samples have
// square ones); counted per stroke colour.
size_t curve_paths(const std::string& svg, const std::string& colour) {
  size_t n = 0;
  for (size_t p = svg.find("<path"); p != std::string::npos; p = svg.find("<path", p + 1)) {
    const std::string tag = svg.substr(p, svg.find('>', p) - p);
    if (tag.find("stroke-linecap:round") != std::string::npos && tag.find("stroke:" + colour + ";") != std::string::npos)
      ++n;
  }
  return n;
}

std::string svg_of(const std::vector<RunCurves>& runs, const PlotOptions& o) {
  return render_plot(runs, o, PlotFormat::svg);
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

TEST(PlotSvg, IsWellFormedXmlWithOnePathPerCurve) {
  TempDir tmp("plot");
  auto runs = load_runs({fake_run(tmp, "llama", 200, 50), fake_run(tmp, "subllm", 150, 50, 2.8)});
  PlotOptions o;
  o.title = "A & B <1>";
  o.smooth = 1;  // no smoothing: per run one train and one validation curve
  const std::string svg = svg_of(runs, o);
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_EQ(svg.substr(svg.find_last_not_of(" \n") - 5, 6), "</svg>");
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_NE(svg.find("width=\"900px\" height=\"560px\""), std::string::npos);
  EXPECT_EQ(curve_paths(svg, kBlue), 2u);
  EXPECT_EQ(curve_paths(svg, kOrange), 2u);
  // Smoothing adds the raw train steps as a faint curve behind the smoothed one.
  o.smooth = 0;
  const std::string smoothed = svg_of(runs, o);
  EXPECT_EQ(xml_problem(smoothed), "");
  EXPECT_EQ(curve_paths(smoothed, kBlue), 3u);
  EXPECT_EQ(curve_paths(smoothed, kOrange), 3u);
  // The text is real glyphs of a font, not pixel blocks.
  EXPECT_NE(svg.find("id=\"glyph"), std::string::npos);
}

TEST(PlotSvg, NoValidationMeansOnlyATrainCurve) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "solo", 100, 1000)});
  PlotOptions o;
  o.smooth = 1;
  EXPECT_EQ(curve_paths(svg_of(runs, o), kBlue), 1u);
}

TEST(PlotAxes, TokensAndTimeAxesNeedTheirFields) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "run", 300, 100)});
  PlotOptions o;
  o.x = PlotX::tokens;
  EXPECT_GE(plot_frame(runs, o).x_hi, 300.0 * 4096);
  EXPECT_LT(plot_frame(runs, o).x_hi, 2 * 300.0 * 4096);
  o.x = PlotX::time;  // 0.5 s a step: 150 s, shown in seconds
  EXPECT_GE(plot_frame(runs, o).x_hi, 150.0);
  EXPECT_LT(plot_frame(runs, o).x_hi, 300.0);
  const auto slow = load_runs({fake_run(tmp, "slow", 3000, 1000)});  // 1500 s: shown in minutes
  EXPECT_GE(plot_frame(slow, o).x_hi, 25.0);
  EXPECT_LT(plot_frame(slow, o).x_hi, 50.0);

  write_file(tmp.file("bare/metrics.jsonl"), "{\"step\": 1, \"loss\": 5}\n{\"step\": 2, \"loss\": 4}\n");
  const auto bare = load_runs({tmp.file("bare")});
  for (PlotX x : {PlotX::tokens, PlotX::time}) {
    o.x = x;
    EXPECT_NE(error_of([&] { svg_of(bare, o); }).find("--x step"), std::string::npos);
  }
}

// ---- retention ----

TEST(PlotRetention, OneCurvePerSubsamplerOfRunsThatLogIt) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "llama", 200, 50), fake_run(tmp, "subllm", 200, 50, 2.8, true)});
  ASSERT_EQ(runs[1].points[49].retention.size(), 2u);
  EXPECT_NEAR(runs[1].points[49].retention[0], 0.5 + 0.1 / 50, 1e-6);
  EXPECT_TRUE(runs[1].points[48].retention.empty());
  PlotOptions o;
  o.retention = true;
  const std::string svg = svg_of(runs, o);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_EQ(curve_paths(svg, kBlue), 0u);    // LLaMA has no subsamplers
  EXPECT_EQ(curve_paths(svg, kOrange), 2u);  // SUBLLM: two, told apart by dash pattern
  const PlotFrame f = plot_frame(runs, o);
  EXPECT_LE(f.y_lo, 0.25);
  EXPECT_GE(f.y_hi, 0.5);
  EXPECT_LT(f.y_hi, 1.0);

  const std::string err = error_of([&] { svg_of({runs[0]}, o); });
  EXPECT_NE(err.find("no retention"), std::string::npos) << err;
  write_file(tmp.file("bad/metrics.jsonl"), "{\"step\": 1, \"loss\": 5, \"retention\": \"half\"}\n");
  EXPECT_NE(error_of([&] { load_run(tmp.file("bad")); }).find("\"retention\""), std::string::npos);
}

// ---- PNG ----

TEST(PlotPng, DecodesAtTheRequestedSizeWithCurvesDrawn) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "a", 300, 50), fake_run(tmp, "b", 300, 50, 2.5)});
  PlotOptions o;
  o.width = 640;
  o.height = 400;
  const std::string png = render_plot(runs, o, PlotFormat::png);
  EXPECT_LT(png.size(), 200000u) << "compressed, unlike 640x400x3 raw bytes";
  const Image img = decode_png(png);
  ASSERT_EQ(img.error, "");
  EXPECT_EQ(img.width, 640);
  EXPECT_EQ(img.height, 400);
  const PlotFrame f = plot_frame(runs, o);
  size_t blue = 0, orange = 0;
  for (int y = (int)f.top + 2; y < (int)f.bottom - 1; ++y)
    for (int x = (int)f.left + 2; x < (int)f.right - 1; ++x) {
      const auto p = img.at(x, y);
      if (!is_coloured(p)) continue;
      blue += p[2] > p[0] + 60;
      orange += p[0] > p[2] + 60;
    }
  EXPECT_GT(blue, 300u);
  EXPECT_GT(orange, 300u);
  EXPECT_TRUE(is_background(img.at(1, 1)));
  EXPECT_NE(decode_png(png.substr(0, png.size() / 2)).error, "");
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
  const Image d = decode_png(render_plot(runs, o, PlotFormat::png));
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
    const Image d = decode_png(render_plot(runs, opt, PlotFormat::png));
    const PlotFrame f = plot_frame(runs, opt);
    int dark = 0;
    for (int y = 0; y < (int)f.top - 6; ++y)
      for (int x = 0; x < d.width; ++x) dark += d.at(x, y)[0] < 128;
    return dark;
  };
  EXPECT_EQ(dark_in_top_band(o), 0);
  o.title = "Loss curves";
  EXPECT_GT(dark_in_top_band(o), 40);
}

// ---- PDF, font ----

TEST(PlotPdf, IsAPdfDocument) {
  TempDir tmp("plot");
  const auto runs = load_runs({fake_run(tmp, "run", 100, 50)});
  const std::string pdf = render_plot(runs, PlotOptions{}, PlotFormat::pdf);
  EXPECT_EQ(pdf.rfind("%PDF-", 0), 0u);
  EXPECT_NE(pdf.find("%%EOF", pdf.size() - 16), std::string::npos);
  EXPECT_NE(pdf.find("DejaVu"), std::string::npos) << "the font is embedded";
}

TEST(PlotFont, AMissingFontNamesThePackageToInstall) {
  EXPECT_EQ(error_of([] { check_plot_font(); }), "");
  const std::string err = error_of([] { check_plot_font("No Such Font Family Qx", "fonts-qx"); });
  EXPECT_NE(err.find("'No Such Font Family Qx'"), std::string::npos) << err;
  EXPECT_NE(err.find("install the package fonts-qx"), std::string::npos) << err;
}

// ---- writing ----

TEST(PlotWrite, PicksFormatByExtensionAndReplacesAtomically) {
  TempDir tmp("plot");
  const std::string run = fake_run(tmp, "run", 60, 20);
  const std::string png = tmp.file("curves.PNG"), svg = tmp.file("curves.svg"), pdf = tmp.file("curves.Pdf");
  write_file(png, "old");
  const auto summary = plot_runs({run}, {}, png, PlotOptions{});
  ASSERT_EQ(summary.size(), 1u);
  EXPECT_EQ(summary[0].label, "run");
  EXPECT_EQ(summary[0].best_val_step, 60);
  EXPECT_EQ(read_all(png).substr(1, 3), "PNG");
  EXPECT_EQ(decode_png(read_all(png)).error, "");
  plot_runs({run}, {}, svg, PlotOptions{});
  EXPECT_EQ(read_all(svg).rfind("<?xml", 0), 0u);
  plot_runs({run}, {}, pdf, PlotOptions{});
  EXPECT_EQ(read_all(pdf).rfind("%PDF", 0), 0u);
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
  EXPECT_NE(err.find("use .png, .svg or .pdf"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(jpg));
  EXPECT_NE(error_of([&] { plot_runs({good}, {}, tmp.file("curves"), o); }).find("use .png, .svg or .pdf"),
            std::string::npos);

  PlotOptions bad = o;
  bad.ylim = std::make_pair(5.0, 3.0);
  EXPECT_NE(error_of([&] { plot_runs({good}, {}, out, bad); }).find("--ylim"), std::string::npos);
  bad = o;
  bad.width = 10;
  EXPECT_NE(error_of([&] { plot_runs({good}, {}, out, bad); }).find("--width"), std::string::npos);
  EXPECT_FALSE(fs::exists(out));

  // Unwritable outputs: a folder that does not exist, and a "folder" that is a file.
  for (const std::string ext : {".png", ".svg", ".pdf"}) {
    const std::string missing = tmp.file("no_folder/out" + ext);
    err = error_of([&] { plot_runs({good}, {}, missing, o); });
    EXPECT_NE(err.find("cannot write '" + missing + "'"), std::string::npos) << err;
    write_file(tmp.file("a_file"), "x");
    const std::string under_file = tmp.file("a_file/out" + ext);
    err = error_of([&] { plot_runs({good}, {}, under_file, o); });
    EXPECT_NE(err.find("cannot write '" + under_file + "'"), std::string::npos) << err;
  }
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << e.path();
}

}  // namespace plot_tests
}  // namespace subllm
