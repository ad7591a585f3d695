#pragma once
// Loss curves (or subsampler retention) of training runs on one chart, drawn with cairo as PNG,
// SVG or PDF from one drawing routine, text in DejaVu Sans. The library side of `subllm plot`.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace subllm {

// What the horizontal axis measures.
enum class PlotX { step, tokens, time };

// One line of a run's metrics.jsonl, reduced to what the chart uses. Absent values are NaN.
struct MetricPoint {
  long step = 0;
  double tokens = NAN;
  double elapsed_s = NAN;  // training time summed over resumes (each resume restarts the clock)
  double loss = NAN;
  double val_loss = NAN;
  std::vector<double> retention;  // SUBLLM runs at validation steps: kept fraction per subsampler
};

struct RunCurves {
  std::string label;
  std::string dir;
  std::vector<MetricPoint> points;  // ascending step, one per step (a later line for a step wins)
};

struct PlotOptions {
  PlotX x = PlotX::step;
  int smooth = 0;  // moving-average window of the train curve in points; 0: auto (about steps/50), 1: off
  std::string title;
  std::optional<std::pair<double, double>> ylim;  // loss range shown; none: fit the curves
  int width = 900;
  int height = 560;
  // Draw each subsampler's measured retention (fraction of tokens kept) instead of the loss: one
  // line per run and subsampler, the run's colour, a dash pattern per subsampler.
  bool retention = false;
};

// The numbers `subllm plot` prints for a run. NaN / -1 where the run has none.
struct RunSummary {
  std::string label;
  long last_step = -1;
  double last_loss = NAN;
  double best_val_loss = NAN;
  long best_val_step = -1;
};

// Reads `dir`/metrics.jsonl. Unknown keys are ignored and blank lines skipped; a line that is not a
// JSON object with a numeric "step" (and a numeric or null "loss" / "val_loss") is an error naming
// the file and line. An unfinished last line (no newline, does not parse) is a write still in
// progress by a live run and is skipped. `label` empty: the folder name.
RunCurves load_run(const std::string& dir, const std::string& label = "");
// `labels` empty or one per dir. Runs whose folder names clash are labelled parent/name.
std::vector<RunCurves> load_runs(const std::vector<std::string>& dirs, const std::vector<std::string>& labels = {});

RunSummary summarize_run(const RunCurves& run);

// The window PlotOptions::smooth = 0 picks for a curve of `points` points.
int auto_smooth_window(size_t points);
// Centred moving average over `window` points, the window shrinking at the ends; NaNs are skipped.
std::vector<double> moving_average(const std::vector<double>& values, int window);
// Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi], at most about `max_ticks`.
std::vector<double> nice_ticks(double lo, double hi, int max_ticks);

enum class PlotFormat { png, svg, pdf };
// From the extension of `path` (either case); anything but .png / .svg / .pdf is an error.
PlotFormat plot_format_of(const std::string& path);

// The chart as the bytes of a file in `format`.
std::string render_plot(const std::vector<RunCurves>& runs, const PlotOptions& options, PlotFormat format);

// Throws an Error naming `package` unless fontconfig has the font `family` itself (not a stand-in).
void check_plot_font(const std::string& family = "DejaVu Sans", const std::string& package = "fonts-dejavu-core");

// Where the data area of the chart lies in pixels and which data range it shows, so callers (and
// tests) can find a data point in the image: pixel x = left + (v - x_lo) / (x_hi - x_lo) * (right - left).
struct PlotFrame {
  double left = 0, top = 0, right = 0, bottom = 0;
  double x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;
};
PlotFrame plot_frame(const std::vector<RunCurves>& runs, const PlotOptions& options);

// Renders in the format of `path`'s extension and writes it atomically (temp file + rename): an
// unwritable path is an error naming it, and no partial file is left behind.
void write_plot(const std::string& path, const std::vector<RunCurves>& runs, const PlotOptions& options);

// The whole `subllm plot`: checks the output name and options, loads the runs, writes the chart.
// On error nothing is written.
std::vector<RunSummary> plot_runs(const std::vector<std::string>& dirs, const std::vector<std::string>& labels,
                                  const std::string& out_path, const PlotOptions& options);

// A keep-threshold sweep of `subllm eval ppl --keep-threshold A,B,... --json`: loss and decode
// speed per threshold, drawn as one curve (loss against decode tokens/s, points labelled by
// their threshold), so users pick their point between speed and quality.
struct SweepPoint {
  double keep_threshold = 0, loss = NAN, decode_tokens_per_s = NAN;
  std::vector<double> retention;
};
struct SweepCurve {
  std::string label, file;
  std::vector<SweepPoint> points;
};
// Errors name the file and say how to make one. `label` empty: the file's name (with the
// weight type when the sweep records one).
SweepCurve load_sweep(const std::string& path, const std::string& label = "");
std::string render_sweep_plot(const std::vector<SweepCurve>& curves, const PlotOptions& options, PlotFormat format);
void write_sweep_plot(const std::string& path, const std::vector<SweepCurve>& curves, const PlotOptions& options);

}  // namespace subllm
