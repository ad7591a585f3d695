#pragma once
// Each `subllm <command>` lives in its own file and registers itself on the app here.
#include <CLI/CLI.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "subllm/model.h"

namespace subllm::cli {

// A registered command runs after parsing; it returns the process exit code.
using Runner = std::function<int()>;
void add_bench_command(CLI::App& app, Runner& run);
void add_prepare_command(CLI::App& app, Runner& run);
void add_train_command(CLI::App& app, Runner& run);
void add_plot_command(CLI::App& app, Runner& run);
void add_generate_command(CLI::App& app, Runner& run);
void add_eval_command(CLI::App& app, Runner& run);
void add_export_command(CLI::App& app, Runner& run);
void add_convert_command(CLI::App& app, Runner& run);
void add_serve_command(CLI::App& app, Runner& run);
void add_quantize_command(CLI::App& app, Runner& run);

// A numeric flag's valid values, written as an interval: "[1, inf)", "(0, 1]", "[0, 1)". NaN and
// infinities are refused too; the error names the flag (CLI11 prefixes it) and the interval.
inline CLI::Validator interval(const std::string& text) {
  const size_t comma = text.find(',');
  const bool lo_open = text.front() == '(', hi_open = text.back() == ')';
  const auto bound = [](std::string s) {
    s.erase(0, s.find_first_not_of(' '));
    return s == "inf" ? std::numeric_limits<double>::infinity() : std::stod(s);
  };
  const double lo = bound(text.substr(1, comma - 1)), hi = bound(text.substr(comma + 1, text.size() - comma - 2));
  return CLI::Validator(
      [=](std::string& arg) -> std::string {
        double v;
        try {
          size_t used = 0;
          v = std::stod(arg, &used);
          if (used != arg.size()) return "'" + arg + "' is not a number";
        } catch (const std::out_of_range&) {
          return "got " + arg + ", must lie in " + text;
        } catch (const std::exception&) {
          return "'" + arg + "' is not a number";
        }
        const bool inside = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
        return inside ? std::string() : "got " + arg + ", must lie in " + text;
      },
      "in " + text);
}

// -t/--threads: the OpenMP threads a command uses.
inline void add_threads_option(CLI::App* cmd, int& threads) {
  cmd->add_option("-t,--threads", threads, "threads (0: all cores)")->capture_default_str()->check(interval("[0, 4096]"));
}

// --device: the backend to run on, one of backend_names().
inline void add_device_option(CLI::App* cmd, std::string& device) {
  std::string names;
  for (const auto& n : backend_names()) names += (names.empty() ? "" : ", ") + n;
  cmd->add_option("--device", device, "device to run on (" + names + "; cuda computes in bf16, cuda:fp32 in fp32)")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& d) {
            std::string why;
            return backend_available(d, &why) ? std::string() : why;
          },
          "DEVICE"));
}

// --dtype and --kv-dtype: the inference weight type and the key/value cache type.
inline void add_dtype_options(CLI::App* cmd, std::string& dtype, std::string& kv_dtype) {
  cmd->add_option("--dtype", dtype,
                  "weight type for inference: f32, bf16 or q8 (int8, one scale per 32 weights; CPU) (default: the "
                  "model folder's, f32 unless `subllm quantize` wrote it)")
      ->check(CLI::IsMember({"f32", "bf16", "q8"}));
  cmd->add_option("--kv-dtype", kv_dtype, "key/value cache type: f32 or bf16 (CPU) (default: the compute dtype)")
      ->check(CLI::IsMember({"f32", "bf16"}));
}

}  // namespace subllm::cli
