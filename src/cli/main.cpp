// subllm: train, run, evaluate and benchmark SUBLLM and LLaMA language models.
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "dist/communicator.h"
#include "subllm/error.h"

int main(int argc, char** argv) {
  CLI::App app{"subllm: train, run, evaluate and benchmark SUBLLM and LLaMA language models"};
  app.require_subcommand(1);
  subllm::cli::Runner run;
  subllm::cli::add_prepare_command(app, run);
  subllm::cli::add_train_command(app, run);
  subllm::cli::add_generate_command(app, run);
  subllm::cli::add_serve_command(app, run);
  subllm::cli::add_eval_command(app, run);
  subllm::cli::add_export_command(app, run);
  subllm::cli::add_convert_command(app, run);
  subllm::cli::add_quantize_command(app, run);
  subllm::cli::add_plot_command(app, run);
  subllm::cli::add_bench_command(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run ? run() : 0;
  } catch (const subllm::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  // One rank of several failed: end the job now rather than leave the others in a collective.
  std::fflush(stderr);
  subllm::abort_job(1);
  return 1;
}
