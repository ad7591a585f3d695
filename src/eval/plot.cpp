// Loss curves: reading metrics.jsonl of runs, laying the chart out once as a scene of shapes,
// which plot_cairo.cpp draws as PNG, SVG or PDF.
#include "subllm/plot.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "eval/plot_scene.h"
#include "subllm/error.h"

namespace subllm {

using plot_detail::Anchor;
using plot_detail::Pt;
using plot_detail::Rgb;
using plot_detail::Scene;
using plot_detail::Shape;
using plot_detail::cap_height;
using plot_detail::descent;
using plot_detail::text_width;
namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Reading runs

namespace {

std::string last_component(const std::string& dir) {
  std::string s = fs::absolute(fs::path(dir)).lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  const std::string name = fs::path(s).filename().string();
  return name.empty() ? s : name;
}

std::string parent_and_name(const std::string& dir) {
  std::string s = fs::absolute(fs::path(dir)).lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  const fs::path p(s);
  const std::string parent = p.parent_path().filename().string();
  return parent.empty() ? p.filename().string() : parent + "/" + p.filename().string();
}

// A number, or NaN for null (the trainer writes null for a non-finite loss); `what` names the key.
double number_or_null(const json& obj, const char* key, const std::function<void(const std::string&)>& fail) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return NAN;
  if (!it->is_number()) fail(std::string("\"") + key + "\" is not a number");
  return it->get<double>();
}

}  // namespace

RunCurves load_run(const std::string& dir, const std::string& label) {
  std::error_code ec;
  check(fs::is_directory(dir, ec), "run folder '" + dir + "' does not exist (or is not a folder)");
  const fs::path file = fs::path(dir) / "metrics.jsonl";
  check(fs::is_regular_file(file, ec),
        "no metrics.jsonl in '" + dir + "': is it a run folder written by subllm train?");
  std::ifstream in(file, std::ios::binary);
  check(bool(in), "cannot read '" + file.string() + "': " + std::strerror(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());

  RunCurves run;
  run.dir = dir;
  run.label = label.empty() ? last_component(dir) : label;
  size_t pos = 0;
  long line_no = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    const bool terminated = end != std::string::npos;
    if (!terminated) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    const size_t first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;
    auto fail = [&](const std::string& why) {
      throw Error("malformed line " + std::to_string(line_no) + " in '" + file.string() + "': " + why);
    };
    json obj = json::parse(line, nullptr, false);
    if (obj.is_discarded()) {
      // A live run may be half way through writing its last line.
      if (!terminated) break;
      fail("not valid JSON");
    }
    if (!obj.is_object()) fail("not a JSON object");
    auto step = obj.find("step");
    if (step == obj.end() || !step->is_number()) fail("no numeric \"step\"");
    const double s = step->get<double>();
    if (!(s >= 0) || s != std::floor(s)) fail("\"step\" is not a whole number >= 0");
    MetricPoint p;
    p.step = (long)s;
    p.loss = number_or_null(obj, "loss", fail);
    p.val_loss = number_or_null(obj, "val_loss", fail);
    p.tokens = number_or_null(obj, "tokens", fail);
    p.elapsed_s = number_or_null(obj, "elapsed_s", fail);
    if (auto ret = obj.find("retention"); ret != obj.end() && !ret->is_null()) {
      if (!ret->is_array()) fail("\"retention\" is not a list of numbers");
      for (const json& v : *ret) {
        if (!v.is_null() && !v.is_number()) fail("\"retention\" is not a list of numbers");
        p.retention.push_back(v.is_null() ? NAN : v.get<double>());
      }
    }
    run.points.push_back(p);
  }

  // A resumed run may repeat steps it had logged before the interruption; the newest line wins.
  std::stable_sort(run.points.begin(), run.points.end(),
                   [](const MetricPoint& a, const MetricPoint& b) { return a.step < b.step; });
  std::vector<MetricPoint> unique;
  for (const MetricPoint& p : run.points) {
    if (!unique.empty() && unique.back().step == p.step) unique.back() = p;
    else unique.push_back(p);
  }
  run.points = std::move(unique);

  // Each process restarts elapsed_s at zero; chain the segments into one clock.
  double offset = 0, prev = NAN;
  for (MetricPoint& p : run.points) {
    if (!std::isfinite(p.elapsed_s)) continue;
    const double e = p.elapsed_s;
    if (std::isfinite(prev) && e < prev) offset += prev;
    prev = e;
    p.elapsed_s = offset + e;
  }
  return run;
}

std::vector<RunCurves> load_runs(const std::vector<std::string>& dirs, const std::vector<std::string>& labels) {
  check(!dirs.empty(), "no run folders given");
  check(labels.empty() || labels.size() == dirs.size(),
        "got " + std::to_string(labels.size()) + " --label for " + std::to_string(dirs.size()) +
            " run folders: give one per run, in the same order, or none");
  std::vector<RunCurves> runs;
  for (size_t i = 0; i < dirs.size(); ++i) runs.push_back(load_run(dirs[i], labels.empty() ? "" : labels[i]));
  if (labels.empty()) {
    std::map<std::string, int> seen;
    for (const RunCurves& r : runs) ++seen[r.label];
    for (RunCurves& r : runs)
      if (seen[r.label] > 1) r.label = parent_and_name(r.dir);
  }
  return runs;
}

RunSummary summarize_run(const RunCurves& run) {
  RunSummary s;
  s.label = run.label;
  for (const MetricPoint& p : run.points) {
    s.last_step = p.step;
    if (std::isfinite(p.loss)) s.last_loss = p.loss;
    if (std::isfinite(p.val_loss) && !(p.val_loss >= s.best_val_loss)) {
      s.best_val_loss = p.val_loss;
      s.best_val_step = p.step;
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Numbers

int auto_smooth_window(size_t points) { return std::max(1, (int)std::lround(points / 50.0)); }

std::vector<double> moving_average(const std::vector<double>& values, int window) {
  const size_t n = values.size();
  if (window <= 1) return values;
  std::vector<double> sum(n + 1, 0.0), count(n + 1, 0.0);
  for (size_t i = 0; i < n; ++i) {
    const bool ok = std::isfinite(values[i]);
    sum[i + 1] = sum[i] + (ok ? values[i] : 0.0);
    count[i + 1] = count[i] + (ok ? 1.0 : 0.0);
  }
  std::vector<double> out(n);
  const long before = (window - 1) / 2, after = window / 2;
  for (size_t i = 0; i < n; ++i) {
    const size_t lo = (size_t)std::max(0L, (long)i - before);
    const size_t hi = std::min(n, i + (size_t)after + 1);
    const double c = count[hi] - count[lo];
    out[i] = c > 0 ? (sum[hi] - sum[lo]) / c : NAN;
  }
  return out;
}

namespace {

// The tick step as mantissa (1, 2 or 5) times 10^exponent.
struct TickStep {
  int mantissa;
  int exponent;
  double value() const { return times(1); }
  // k steps, computed so that e.g. 3 x 0.2 comes out as the double nearest 0.6.
  double times(long k) const {
    return exponent >= 0 ? (double)(k * mantissa) * std::pow(10.0, exponent)
                         : (double)(k * mantissa) / std::pow(10.0, -exponent);
  }
};

TickStep nice_step(double span, int max_ticks) {
  const double raw = span / std::max(1, max_ticks - 1);
  int e = (int)std::floor(std::log10(raw));
  const double f = raw / std::pow(10.0, e);
  // Allow a hair over each size so that rounding noise in `raw` does not jump to the next one.
  int m = f <= 1.0001 ? 1 : f <= 2.0001 ? 2 : f <= 5.0001 ? 5 : 10;
  if (m == 10) m = 1, ++e;
  return {m, e};
}

}  // namespace

std::vector<double> nice_ticks(double lo, double hi, int max_ticks) {
  if (!std::isfinite(lo) || !std::isfinite(hi)) return {};
  if (hi < lo) std::swap(lo, hi);
  if (hi == lo) return {lo};
  const TickStep step = nice_step(hi - lo, max_ticks);
  const double size = step.value();
  std::vector<double> ticks;
  const long first = (long)std::ceil(lo / size - 1e-9), last = (long)std::floor(hi / size + 1e-9);
  for (long k = first; k <= last; ++k) ticks.push_back(k == 0 ? 0.0 : step.times(k));
  return ticks;
}

// ---------------------------------------------------------------------------------------------
// Layout

namespace {

// Ten colours that stay apart from each other and on white.
const Rgb kPalette[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},   {214, 39, 40},  {148, 103, 189},
                        {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};
const Rgb kInk{34, 34, 34}, kMuted{85, 85, 85}, kGrid{230, 230, 230}, kFrame{140, 140, 140}, kWhite{255, 255, 255};

struct Axis {
  double lo = 0, hi = 1;
  std::vector<double> ticks;
  double unit = 1;     // tick labels show value / unit followed by suffix
  std::string suffix;
  int decimals = 0;
};

// Tick labels with just enough decimals for the tick step, large values shortened with k/M/G/T.
void choose_label_format(Axis& a) {
  double biggest = 0;
  for (double t : a.ticks) biggest = std::max(biggest, std::fabs(t));
  const struct {
    double unit;
    const char* suffix;
  } units[] = {{1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e4, "k"}};
  a.unit = 1;
  a.suffix.clear();
  for (const auto& u : units) {
    if (biggest >= u.unit) {
      a.unit = u.unit >= 1e4 && u.unit < 1e6 ? 1e3 : u.unit;
      a.suffix = u.suffix;
      break;
    }
  }
  const double step = a.ticks.size() > 1 ? (a.ticks[1] - a.ticks[0]) / a.unit : 1;
  a.decimals = std::clamp((int)std::ceil(-std::log10(step) - 1e-9), 0, 9);
}

std::string tick_label(const Axis& a, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", a.decimals, v / a.unit);
  std::string s = buf;
  if (s.find_first_not_of("-0.") == std::string::npos) return "0";  // not "-0.0" nor "0M"
  return s + a.suffix;
}

// [lo, hi] of the data, padded so curves do not run along the frame, with ticks inside.
Axis fit_axis(double lo, double hi, int max_ticks, double pad_fraction, bool from_zero) {
  Axis a;
  if (!std::isfinite(lo) || !std::isfinite(hi)) lo = 0, hi = 1;
  if (from_zero) lo = std::min(lo, 0.0);
  if (hi - lo <= 0) {
    const double half = std::max(std::fabs(lo) * 0.05, 0.5);
    lo -= half;
    hi += half;
  } else if (pad_fraction > 0) {
    const double pad = (hi - lo) * pad_fraction;
    lo -= from_zero && lo == 0 ? 0 : pad;
    hi += pad;
  }
  a.lo = lo;
  a.hi = hi;
  a.ticks = nice_ticks(lo, hi, max_ticks);
  choose_label_format(a);
  return a;
}

// Screen points that land in the same pixel column collapse to the first, lowest, highest and last
// of them: the drawn line looks the same and the SVG stays small for runs of many steps.
std::vector<Pt> decimate(const std::vector<Pt>& pts, double max_points) {
  if ((double)pts.size() <= max_points) return pts;
  std::vector<Pt> out;
  size_t i = 0;
  while (i < pts.size()) {
    const long col = (long)std::floor(pts[i].x);
    size_t j = i, lo = i, hi = i;
    while (j < pts.size() && (long)std::floor(pts[j].x) == col) {
      if (pts[j].y < pts[lo].y) lo = j;
      if (pts[j].y > pts[hi].y) hi = j;
      ++j;
    }
    size_t keep[4] = {i, std::min(lo, hi), std::max(lo, hi), j - 1};
    for (size_t k = 0; k < 4; ++k)
      if (k == 0 || keep[k] != keep[k - 1]) out.push_back(pts[keep[k]]);
    i = j;
  }
  return out;
}

// One run's train and validation loss, or (with --retention) one subsampler's retention of a run,
// drawn like a validation curve.
struct Series {
  std::vector<double> x, raw, smooth;  // train points
  std::vector<double> vx, val;         // validation points
  std::string train_name, val_name;    // legend entries
  Rgb colour;
  std::vector<double> dash;  // of the validation-style line, in units of `ui`
  std::vector<std::string> notes;  // optional: a label beside each validation-style point
};

const char* x_key(PlotX x) { return x == PlotX::step ? "step" : x == PlotX::tokens ? "tokens" : "elapsed_s"; }

Series series_of(const RunCurves& run, const PlotOptions& o, double x_unit) {
  Series s;
  bool any_x = false;
  for (const MetricPoint& p : run.points) {
    const double x = o.x == PlotX::step ? (double)p.step : o.x == PlotX::tokens ? p.tokens : p.elapsed_s;
    if (!std::isfinite(x)) continue;
    any_x = true;
    if (std::isfinite(p.loss)) {
      s.x.push_back(x / x_unit);
      s.raw.push_back(p.loss);
    }
    if (std::isfinite(p.val_loss)) {
      s.vx.push_back(x / x_unit);
      s.val.push_back(p.val_loss);
    }
  }
  check(any_x || run.points.empty(), "run '" + run.label + "' has no \"" + x_key(o.x) + "\" in " + run.dir +
                                         "/metrics.jsonl to plot against; use --x step");
  s.smooth = moving_average(s.raw, o.smooth > 0 ? o.smooth : auto_smooth_window(s.raw.size()));
  return s;
}

// One series per subsampler of `run`, from the retention its validations logged.
std::vector<Series> retention_series_of(const RunCurves& run, const PlotOptions& o, double x_unit) {
  static const std::vector<double> dashes[] = {{}, {7, 4}, {2, 3}, {9, 3, 2, 3}};
  size_t subsamplers = 0;
  for (const MetricPoint& p : run.points) subsamplers = std::max(subsamplers, p.retention.size());
  std::vector<Series> out(subsamplers);
  bool any_x = false;
  for (const MetricPoint& p : run.points) {
    const double x = o.x == PlotX::step ? (double)p.step : o.x == PlotX::tokens ? p.tokens : p.elapsed_s;
    if (p.retention.empty()) continue;
    if (!std::isfinite(x)) continue;
    any_x = true;
    for (size_t k = 0; k < p.retention.size(); ++k) {
      if (!std::isfinite(p.retention[k])) continue;
      out[k].vx.push_back(x / x_unit);
      out[k].val.push_back(p.retention[k]);
    }
  }
  check(any_x || subsamplers == 0, "run '" + run.label + "' has no \"" + x_key(o.x) + "\" in " + run.dir +
                                       "/metrics.jsonl to plot against; use --x step");
  for (size_t k = 0; k < subsamplers; ++k) {
    out[k].val_name = run.label + (subsamplers == 1 ? " retention" : " subsampler " + std::to_string(k + 1));
    out[k].dash = dashes[k % std::size(dashes)];
  }
  return out;
}

void validate(const PlotOptions& o) {
  check(o.width >= 200 && o.width <= 8000 && o.height >= 150 && o.height <= 8000,
        "--width must be 200..8000 and --height 150..8000 pixels (got " + std::to_string(o.width) + "x" +
            std::to_string(o.height) + ")");
  check(o.smooth >= 0, "--smooth must be a window of 1 or more points (1: no smoothing)");
  if (o.ylim) {
    check(std::isfinite(o.ylim->first) && std::isfinite(o.ylim->second) && o.ylim->first < o.ylim->second,
          "--ylim wants LO,HI with LO < HI, such as 2.5,5");
  }
}

struct Layout {
  Scene scene;
  PlotFrame frame;
};

Layout draw(const std::vector<Series>& series, const std::string& x_title, const std::string& y_title,
            const PlotOptions& o, const std::string& nothing);

Layout build(const std::vector<RunCurves>& runs, const PlotOptions& o) {
  validate(o);
  check(!runs.empty(), "no runs to plot");

  // The time axis reads in seconds, minutes or hours, whichever keeps its numbers short.
  double x_unit = 1;
  std::string x_title = o.x == PlotX::step ? "step" : o.x == PlotX::tokens ? "tokens" : "time (s)";
  if (o.x == PlotX::time) {
    double longest = 0;
    for (const RunCurves& r : runs)
      for (const MetricPoint& p : r.points)
        if (std::isfinite(p.elapsed_s)) longest = std::max(longest, p.elapsed_s);
    if (longest >= 36000) x_unit = 3600, x_title = "time (h)";
    else if (longest >= 600) x_unit = 60, x_title = "time (min)";
  }

  std::vector<Series> series;
  for (size_t r = 0; r < runs.size(); ++r) {
    const Rgb colour = kPalette[r % std::size(kPalette)];
    if (o.retention) {
      for (Series& s : retention_series_of(runs[r], o, x_unit)) {
        s.colour = colour;
        series.push_back(std::move(s));
      }
    } else {
      Series s = series_of(runs[r], o, x_unit);
      s.train_name = runs[r].label + " train";
      s.val_name = runs[r].label + " valid";
      s.colour = colour;
      series.push_back(std::move(s));
    }
  }
  if (o.retention) {
    check(!series.empty(), "no retention to plot: only SUBLLM runs log \"retention\" (at validation steps), and "
                           "no metrics.jsonl given has it; drop --retention to plot the loss");
  }
  return draw(series, x_title, o.retention ? "retention (fraction kept)" : "loss", o,
              "nothing to plot: no finite loss in the metrics.jsonl of " +
                  (runs.size() == 1 ? "'" + runs[0].dir + "'" : "any of the " + std::to_string(runs.size()) + " runs"));
}

// The chart of `series`: axes fitted to their points, grid, lines, markers, legend and titles.
// `nothing` is the error when no series has a finite point.
Layout draw(const std::vector<Series>& series, const std::string& x_title, const std::string& y_title,
            const PlotOptions& o, const std::string& nothing) {
  const double W = o.width, H = o.height;
  const double ui = std::clamp(std::min(W / 900.0, H / 560.0), 0.6, 8.0);
  const double f_tick = 11 * ui, f_legend = 12 * ui, f_axis = 13 * ui, f_title = 16 * ui;
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  for (const Series& s : series) {
    for (double v : s.x) xmin = std::min(xmin, v), xmax = std::max(xmax, v);
    for (double v : s.vx) xmin = std::min(xmin, v), xmax = std::max(xmax, v);
    // The range fits the smoothed curve: raw noise would stretch it and flatten what matters.
    for (double v : s.smooth)
      if (std::isfinite(v)) ymin = std::min(ymin, v), ymax = std::max(ymax, v);
    for (double v : s.val) ymin = std::min(ymin, v), ymax = std::max(ymax, v);
  }
  check(std::isfinite(xmin) && std::isfinite(ymin), nothing);

  Layout L;
  Scene& sc = L.scene;
  sc.width = o.width;
  sc.height = o.height;
  auto add_text = [&](double x, double y, const std::string& t, double px, Anchor a, Rgb c, bool vertical = false,
                      bool bold = false) {
    Shape sh;
    sh.kind = Shape::Kind::text;
    sh.pts = {{x, y}};
    sh.text = t;
    sh.font_px = px;
    sh.anchor = a;
    sh.fill = c;
    sh.filled = true;
    sh.vertical = vertical;
    sh.bold = bold;
    sc.shapes.push_back(std::move(sh));
  };
  auto add_rect = [&](double x0, double y0, double x1, double y1, std::optional<Rgb> fill, std::optional<Rgb> stroke,
                      double width = 1, double opacity = 1) {
    Shape sh;
    sh.kind = Shape::Kind::rect;
    sh.pts = {{x0, y0}, {x1, y1}};
    if (fill) sh.fill = *fill, sh.filled = true;
    if (stroke) sh.stroke = *stroke, sh.stroked = true;
    sh.width = width;
    sh.opacity = opacity;
    sc.shapes.push_back(std::move(sh));
  };
  auto add_line = [&](std::vector<Pt> pts, Rgb c, double width, double opacity, bool clip,
                      const std::vector<double>& dash = {}) {
    Shape sh;
    sh.kind = Shape::Kind::line;
    sh.pts = std::move(pts);
    sh.stroke = c;
    sh.stroked = true;
    sh.width = width;
    sh.opacity = opacity;
    sh.clip = clip;
    for (double d : dash) sh.dash.push_back(d * ui);
    sc.shapes.push_back(std::move(sh));
  };
  auto add_dot = [&](Pt p, double r, Rgb c, bool clip) {
    Shape sh;
    sh.kind = Shape::Kind::dot;
    sh.pts = {p};
    sh.radius = r;
    sh.fill = c;
    sh.filled = true;
    sh.clip = clip;
    sc.shapes.push_back(std::move(sh));
  };
  // Thin lines on pixel centres stay one crisp pixel wide instead of two blurred ones.
  auto crisp = [](double v) { return std::floor(v) + 0.5; };

  const double pad = 12 * ui;
  const double tick_len = 5 * ui, tick_gap = 4 * ui;
  const double top = std::round(pad + (o.title.empty() ? 0 : cap_height(f_title) + pad));
  const double bottom_margin = tick_len + tick_gap + cap_height(f_tick) + pad * 0.9 +
                               cap_height(f_axis) + descent(f_axis) + pad * 0.6;
  const double bottom = std::round(H - bottom_margin);
  const double plot_h = bottom - top;

  Axis ya;
  if (o.ylim) {
    ya.lo = o.ylim->first;
    ya.hi = o.ylim->second;
    ya.ticks = nice_ticks(ya.lo, ya.hi, std::max(2, (int)(plot_h / (42 * ui))));
    choose_label_format(ya);
  } else {
    ya = fit_axis(ymin, ymax, std::max(2, (int)(plot_h / (42 * ui))), 0.04, false);
  }
  double ylabel_w = 0;
  for (double t : ya.ticks) ylabel_w = std::max(ylabel_w, text_width(tick_label(ya, t), f_tick, false));
  const double left = std::round(pad + cap_height(f_axis) + descent(f_axis) + pad * 0.9 + ylabel_w +
                                 tick_gap + tick_len);
  // Right margin leaves room for half of a last x tick label centred on the frame's edge.
  const double right = std::round(W - std::max(2 * pad, 0.6 * f_tick * 4));
  const double plot_w = right - left;
  check(plot_w > 40 && plot_h > 40, "the chart is too small for its labels: raise --width / --height");
  const Axis xa = fit_axis(xmin, xmax, std::max(2, (int)(plot_w / (95 * ui))), 0.0, true);

  PlotFrame& fr = L.frame;
  fr = {left, top, right, bottom, xa.lo, xa.hi, ya.lo, ya.hi};
  sc.clip_left = left;
  sc.clip_top = top;
  sc.clip_right = right;
  sc.clip_bottom = bottom;
  auto X = [&](double v) { return left + (v - xa.lo) / (xa.hi - xa.lo) * plot_w; };
  auto Y = [&](double v) { return bottom - (v - ya.lo) / (ya.hi - ya.lo) * plot_h; };

  // Grid, ticks and their labels.
  for (double t : xa.ticks) {
    const double x = crisp(X(t));
    add_line({{x, top}, {x, bottom}}, kGrid, 1, 1, false);
    add_line({{x, bottom}, {x, bottom + tick_len}}, kFrame, 1, 1, false);
    add_text(X(t), bottom + tick_len + tick_gap + cap_height(f_tick), tick_label(xa, t), f_tick, Anchor::middle,
             kMuted);
  }
  for (double t : ya.ticks) {
    const double y = crisp(Y(t));
    add_line({{left, y}, {right, y}}, kGrid, 1, 1, false);
    add_line({{left - tick_len, y}, {left, y}}, kFrame, 1, 1, false);
    add_text(left - tick_len - tick_gap, Y(t) + cap_height(f_tick) / 2, tick_label(ya, t), f_tick, Anchor::end,
             kMuted);
  }
  add_rect(crisp(left), crisp(top), crisp(right), crisp(bottom), std::nullopt, kFrame, 1);

  // Curves: train lines of all runs first so the sparser validation lines stay on top of them.
  std::vector<std::vector<Pt>> train_pts(series.size()), val_pts(series.size());
  for (size_t r = 0; r < series.size(); ++r) {
    const Series& s = series[r];
    const Rgb c = s.colour;
    std::vector<Pt> raw, smooth;
    for (size_t i = 0; i < s.x.size(); ++i) {
      raw.push_back({X(s.x[i]), Y(s.raw[i])});
      if (std::isfinite(s.smooth[i])) smooth.push_back({X(s.x[i]), Y(s.smooth[i])});
    }
    const bool smoothed = o.smooth != 1 && (o.smooth > 1 || auto_smooth_window(s.raw.size()) > 1);
    // With smoothing on, the raw steps stay visible as a faint band behind the smoothed line.
    if (smoothed && raw.size() > 1) add_line(decimate(raw, 4 * plot_w), c, 1.0 * ui, 0.18, true);
    if (!smooth.empty()) add_line(decimate(smooth, 4 * plot_w), c, 1.4 * ui, 0.95, true);
    train_pts[r] = smooth;
    for (size_t i = 0; i < s.vx.size(); ++i) val_pts[r].push_back({X(s.vx[i]), Y(s.val[i])});
  }
  for (size_t r = 0; r < series.size(); ++r) {
    const Rgb c = series[r].colour;
    const std::vector<Pt>& v = val_pts[r];
    if (v.empty()) continue;
    add_line(decimate(v, 4 * plot_w), c, 2.4 * ui, 1, true, series[r].dash);
    // Markers only while they stand apart; hundreds of them would merge into a ragged bar.
    // A marker inside the data area is drawn whole even where it overhangs the frame.
    if ((double)v.size() <= plot_w / (9 * ui)) {
      for (const Pt& p : v) {
        if (p.x < left - 0.5 || p.x > right + 0.5 || p.y < top - 0.5 || p.y > bottom + 0.5) continue;
        add_dot(p, 4.2 * ui, kWhite, false);
        add_dot(p, 3.2 * ui, c, false);
      }
    }
    for (size_t i = 0; i < series[r].notes.size() && i < v.size(); ++i) {
      const std::string& note = series[r].notes[i];
      const bool room = v[i].x + 6 * ui + text_width(note, f_tick, false) < right;  // else left of the point
      add_text(room ? v[i].x + 6 * ui : v[i].x - 6 * ui, v[i].y - 6 * ui, note, f_tick,
               room ? Anchor::start : Anchor::end, c);
    }
  }

  // Legend, in whichever corner of the data area hides the fewest curve points.
  struct Entry {
    std::string text;
    size_t run;
    bool valid;
  };
  std::vector<Entry> entries;
  for (size_t r = 0; r < series.size(); ++r) {
    if (!series[r].x.empty()) entries.push_back({series[r].train_name, r, false});
    if (!series[r].vx.empty()) entries.push_back({series[r].val_name, r, true});
  }
  if (!entries.empty()) {
    const double row_h = std::round(std::max(f_legend * 1.45, cap_height(f_legend) + 8 * ui));
    const double sample = 26 * ui, inner = 9 * ui;
    double text_w = 0;
    for (const Entry& e : entries) text_w = std::max(text_w, text_width(e.text, f_legend, false));
    const double lw = std::round(inner + sample + 7 * ui + text_w + inner);
    const double lh = std::round(inner * 2 + row_h * (double)entries.size() - (row_h - cap_height(f_legend)));
    const double m = 10 * ui;
    const Pt corners[4] = {{right - m - lw, top + m}, {left + m, bottom - m - lh}, {left + m, top + m},
                           {right - m - lw, bottom - m - lh}};
    int best = 0;
    size_t best_hits = SIZE_MAX;
    for (int k = 0; k < 4; ++k) {
      size_t hits = 0;
      auto count = [&](const std::vector<Pt>& pts) {
        for (const Pt& p : pts)
          if (p.x >= corners[k].x && p.x <= corners[k].x + lw && p.y >= corners[k].y && p.y <= corners[k].y + lh)
            ++hits;
      };
      for (size_t r = 0; r < series.size(); ++r) count(train_pts[r]), count(val_pts[r]);
      if (hits < best_hits) best_hits = hits, best = k;
    }
    const double lx = std::round(corners[best].x), ly = std::round(corners[best].y);
    add_rect(lx + 0.5, ly + 0.5, lx + lw + 0.5, ly + lh + 0.5, kWhite, Rgb{200, 200, 200}, 1, 0.92);
    for (size_t i = 0; i < entries.size(); ++i) {
      const Entry& e = entries[i];
      const Rgb c = series[e.run].colour;
      const double base = ly + inner + cap_height(f_legend) + row_h * (double)i;
      const double mid = base - cap_height(f_legend) / 2;
      const double sx0 = lx + inner, sx1 = lx + inner + sample;
      if (e.valid) {
        add_line({{sx0, mid}, {sx1, mid}}, c, 2.4 * ui, 1, false, series[e.run].dash);
        add_dot({(sx0 + sx1) / 2, mid}, 4.2 * ui, kWhite, false);
        add_dot({(sx0 + sx1) / 2, mid}, 3.2 * ui, c, false);
      } else {
        add_line({{sx0, mid}, {sx1, mid}}, c, 1.4 * ui, 0.95, false);
      }
      add_text(sx1 + 7 * ui, base, e.text, f_legend, Anchor::start, kInk);
    }
  }

  // Axis titles and the chart title.
  add_text((left + right) / 2, H - pad * 0.6 - descent(f_axis), x_title, f_axis, Anchor::middle, kInk, false,
           true);
  add_text(pad + cap_height(f_axis), (top + bottom) / 2, y_title, f_axis, Anchor::middle, kInk, true, true);
  if (!o.title.empty())
    add_text((left + right) / 2, pad + cap_height(f_title), o.title, f_title, Anchor::middle, kInk, false, true);
  return L;
}

// One curve per sweep file: loss against decode speed, each point labelled with its threshold.
Layout build_sweep(const std::vector<SweepCurve>& curves, const PlotOptions& o) {
  validate(o);
  check(!curves.empty(), "no sweeps to plot");
  std::vector<Series> series;
  for (size_t r = 0; r < curves.size(); ++r) {
    Series s;
    s.colour = kPalette[r % std::size(kPalette)];
    s.val_name = curves[r].label;
    std::vector<SweepPoint> pts = curves[r].points;
    // In threshold order: the curve is the path the knob takes.
    std::sort(pts.begin(), pts.end(),
              [](const SweepPoint& a, const SweepPoint& b) { return a.keep_threshold < b.keep_threshold; });
    for (const SweepPoint& p : pts) {
      s.vx.push_back(p.decode_tokens_per_s);
      s.val.push_back(p.loss);
      char note[32];
      std::snprintf(note, sizeof note, "%g", p.keep_threshold);
      s.notes.push_back(note);
    }
    series.push_back(std::move(s));
  }
  return draw(series, "decode speed (tokens/s), points labelled by keep threshold", "validation loss", o,
              "nothing to plot: the sweeps hold no finite loss");
}

// ---------------------------------------------------------------------------------------------
// Files

void write_atomic(const std::string& path, const void* data, size_t size) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  auto fail = [&](int err) {
    std::remove(tmp.c_str());
    throw Error("cannot write '" + path + "': " + std::strerror(err) +
                (err == ENOENT ? " (does its folder exist?)" : ""));
  };
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail(errno);
  bool ok = std::fwrite(data, 1, size, f) == size && std::fflush(f) == 0;
  int err = errno;
  if (std::fclose(f) != 0 && ok) ok = false, err = errno;
  if (!ok) fail(err);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(errno);
}

}  // namespace

PlotFrame plot_frame(const std::vector<RunCurves>& runs, const PlotOptions& options) {
  return build(runs, options).frame;
}

std::string render_plot(const std::vector<RunCurves>& runs, const PlotOptions& options, PlotFormat format) {
  return plot_detail::render_scene(build(runs, options).scene, format);
}

PlotFormat plot_format_of(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return (char)std::tolower(c); });
  if (ext == ".png") return PlotFormat::png;
  if (ext == ".svg") return PlotFormat::svg;
  if (ext == ".pdf") return PlotFormat::pdf;
  throw Error("cannot write '" + path + "': " +
              (ext.empty() ? std::string("it has no extension") : "unknown extension '" + ext + "'") +
              "; use .png, .svg or .pdf");
}

void write_plot(const std::string& path, const std::vector<RunCurves>& runs, const PlotOptions& options) {
  const std::string bytes = render_plot(runs, options, plot_format_of(path));
  write_atomic(path, bytes.data(), bytes.size());
}

SweepCurve load_sweep(const std::string& path, const std::string& label) {
  std::ifstream in(path, std::ios::binary);
  check(in.good(), "cannot read sweep '" + path + "': write one with `subllm eval ppl --keep-threshold A,B,... --json > FILE`");
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    throw Error("sweep '" + path + "' is not JSON (" + std::string(e.what()) +
                "): write one with `subllm eval ppl --keep-threshold A,B,... --json > FILE`");
  }
  auto bad = [&](const std::string& what) {
    throw Error("sweep '" + path + "': " + what + "; it should be the output of `subllm eval ppl --keep-threshold A,B,... --json`");
  };
  if (!j.is_object() || !j.contains("results") || !j["results"].is_array()) bad("no \"results\" array");
  SweepCurve c;
  c.file = path;
  c.label = label;
  if (c.label.empty()) {
    c.label = fs::path(path).stem().string();
    if (j.contains("dtype") && j["dtype"].is_string()) c.label += " (" + j["dtype"].get<std::string>() + ")";
  }
  for (const json& r : j["results"]) {
    auto num = [&](const char* key) {
      if (!r.is_object() || !r.contains(key) || !r[key].is_number()) bad(std::string("a result without a numeric \"") + key + "\"");
      return r[key].get<double>();
    };
    SweepPoint p;
    p.keep_threshold = num("keep_threshold");
    p.loss = num("loss");
    p.decode_tokens_per_s = num("decode_tokens_per_s");
    if (r.contains("retention") && r["retention"].is_array())
      for (const json& v : r["retention"])
        if (v.is_number()) p.retention.push_back(v.get<double>());
    c.points.push_back(std::move(p));
  }
  if (c.points.empty()) bad("no results");
  return c;
}

std::string render_sweep_plot(const std::vector<SweepCurve>& curves, const PlotOptions& options, PlotFormat format) {
  return plot_detail::render_scene(build_sweep(curves, options).scene, format);
}

void write_sweep_plot(const std::string& path, const std::vector<SweepCurve>& curves, const PlotOptions& options) {
  const std::string bytes = render_sweep_plot(curves, options, plot_format_of(path));
  write_atomic(path, bytes.data(), bytes.size());
}

std::vector<RunSummary> plot_runs(const std::vector<std::string>& dirs, const std::vector<std::string>& labels,
                                  const std::string& out_path, const PlotOptions& options) {
  plot_format_of(out_path);
  validate(options);
  const std::vector<RunCurves> runs = load_runs(dirs, labels);
  write_plot(out_path, runs, options);
  std::vector<RunSummary> out;
  for (const RunCurves& r : runs) out.push_back(summarize_run(r));
  return out;
}

}  // namespace subllm
