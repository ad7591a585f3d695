#pragma once
// Each `subllm <command>` lives in its own file and registers itself on the app here.
#include <CLI/CLI.hpp>
#include <functional>
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

}  // namespace subllm::cli
