#pragma once
// Each `subllm <command>` lives in its own file and registers itself on the app here.
#include <CLI/CLI.hpp>
#include <functional>

namespace subllm::cli {

// A registered command runs after parsing; it returns the process exit code.
using Runner = std::function<int()>;
void add_bench_command(CLI::App& app, Runner& run);
void add_prepare_command(CLI::App& app, Runner& run);
void add_train_command(CLI::App& app, Runner& run);
void add_plot_command(CLI::App& app, Runner& run);
void add_generate_command(CLI::App& app, Runner& run);
void add_eval_command(CLI::App& app, Runner& run);

}  // namespace subllm::cli
