// `subllm plot`: train and validation loss curves (or subsampler retention) of runs on one chart,
// as PNG, SVG or PDF.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "subllm/error.h"
#include "subllm/plot.h"

namespace subllm::cli {
namespace {

struct PlotArgs {
  std::vector<std::string> runs;
  std::vector<std::string> labels;
  std::string out;
  std::string x = "step";
  std::string ylim;
  bool sweep = false;
  PlotOptions options;
};

std::pair<double, double> parse_ylim(const std::string& text) {
  const std::string usage = "--ylim wants LO,HI such as 2.5,5 (got '" + text + "')";
  const size_t comma = text.find(',');
  check(comma != std::string::npos, usage);
  auto number = [&](const std::string& s) {
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    check(!s.empty() && end && *end == '\0' && std::isfinite(v), usage);
    return v;
  };
  const double lo = number(text.substr(0, comma)), hi = number(text.substr(comma + 1));
  check(lo < hi, usage);
  return {lo, hi};
}

std::string loss_text(double v) {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4f", v);
  return buf;
}

// --sweep: loss against decode speed of keep-threshold sweeps, one curve per file.
int plot_sweeps(PlotArgs& a) {
  plot_format_of(a.out);
  check(a.labels.empty() || a.labels.size() == a.runs.size(),
        "--label given " + std::to_string(a.labels.size()) + " times for " + std::to_string(a.runs.size()) +
            " sweeps: give one per sweep file, in order, or none");
  std::vector<SweepCurve> curves;
  for (size_t i = 0; i < a.runs.size(); ++i) curves.push_back(load_sweep(a.runs[i], a.labels.empty() ? "" : a.labels[i]));
  write_sweep_plot(a.out, curves, a.options);
  std::printf("wrote %s\n", a.out.c_str());
  std::printf("%-24s %10s %9s %14s  %s\n", "sweep", "threshold", "loss", "decode tok/s", "retention");
  for (const SweepCurve& c : curves)
    for (const SweepPoint& p : c.points) {
      std::string r;
      char buf[16];
      for (double v : p.retention) {
        std::snprintf(buf, sizeof buf, "%.3f", v);
        if (!r.empty()) r += ' ';
        r += buf;
      }
      std::printf("%-24s %10g %9.4f %14.1f  %s\n", c.label.c_str(), p.keep_threshold, p.loss, p.decode_tokens_per_s,
                  r.c_str());
    }
  return 0;
}

int plot(PlotArgs& a) {
  a.options.x = a.x == "tokens" ? PlotX::tokens : a.x == "time" ? PlotX::time : PlotX::step;
  if (!a.ylim.empty()) a.options.ylim = parse_ylim(a.ylim);
  if (a.sweep) {
    check(!a.options.retention && a.x == "step",
          "--sweep draws loss against decode speed: drop --retention and --x");
    return plot_sweeps(a);
  }
  const std::vector<RunSummary> runs = plot_runs(a.runs, a.labels, a.out, a.options);
  std::printf("wrote %s\n", a.out.c_str());
  size_t width = 3;
  for (const RunSummary& r : runs) width = std::max(width, r.label.size());
  std::printf("%-*s  %8s  %10s  %10s  %s\n", (int)width, "run", "steps", "last train", "best valid", "at step");
  for (const RunSummary& r : runs) {
    const std::string at = r.best_val_step >= 0 ? std::to_string(r.best_val_step) : "-";
    const std::string steps = r.last_step >= 0 ? std::to_string(r.last_step) : "-";
    std::printf("%-*s  %8s  %10s  %10s  %s\n", (int)width, r.label.c_str(), steps.c_str(),
                loss_text(r.last_loss).c_str(), loss_text(r.best_val_loss).c_str(), at.c_str());
  }
  return 0;
}

}  // namespace

void add_plot_command(CLI::App& app, Runner& run) {
  auto* cmd = app.add_subcommand(
      "plot",
      "Draw train and validation loss curves of one or more runs on one chart (PNG, SVG or PDF, by the "
      "extension of -o). Train loss is the thin line (smoothed, raw steps faint behind it), validation "
      "loss the thick line with markers, one colour per run. --x time or --x tokens compares runs by "
      "training time or tokens seen (LLaMA against SUBLLM shows SUBLLM's speed-up). --retention draws "
      "instead each subsampler's measured retention (fraction of tokens kept) over the run, from the "
      "validations of SUBLLM runs, one dash pattern per subsampler. Prints the last train loss and the "
      "best validation loss of each run. --sweep draws instead keep-threshold sweeps of SUBLLM models "
      "(JSON files of `subllm eval ppl --keep-threshold A,B,... --json`): validation loss against decode "
      "speed, one curve per file (e.g. per weight type), each point labelled by its threshold.");
  auto args = std::make_shared<PlotArgs>();
  cmd->add_option("runs", args->runs,
                  "run folders written by `subllm train` (each holds metrics.jsonl); with --sweep, sweep JSON files")
      ->required();
  cmd->add_option("-o,--out", args->out, "output file: a .png, .svg or .pdf path")->required();
  cmd->add_option("--label", args->labels, "name of a run in the legend; repeat once per run, in order "
                                           "(default: the folder names)")
      ->allow_extra_args(false);
  cmd->add_option("--x", args->x, "horizontal axis: step, tokens or time (training time; labelled in s, min or h)")
      ->check(CLI::IsMember({"step", "tokens", "time"}))
      ->capture_default_str();
  cmd->add_option("--smooth", args->options.smooth,
                  "moving-average window of the train curve in points (default: about steps/50; 1: off)")
                      ->check(interval("[0, inf)"));
  cmd->add_flag("--sweep", args->sweep,
                "the inputs are keep-threshold sweeps (`subllm eval ppl --keep-threshold A,B,... --json`): chart "
                "validation loss against decode speed");
  cmd->add_flag("--retention", args->options.retention,
                "chart each subsampler's retention over the run instead of the loss (SUBLLM runs)");
  cmd->add_option("--title", args->options.title, "chart title");
  cmd->add_option("--ylim", args->ylim, "loss range shown, LO,HI (default: fit the curves)");
  cmd->add_option("--width", args->options.width, "image width in pixels")
      ->capture_default_str()
      ->check(interval("[64, 16384]"));
  cmd->add_option("--height", args->options.height, "image height in pixels")
      ->capture_default_str()
      ->check(interval("[64, 16384]"));
  cmd->callback([&run, args] { run = [args] { return plot(*args); }; });
}

}  // namespace subllm::cli
