// `subllm export`: a model folder the authors' PyTorch code loads.
#include <cstdio>

#include "cli/commands.h"
#include "subllm/export.h"

namespace subllm::cli {
namespace {

struct ExportCli {
  std::string model_dir, out_dir, dtype = "f32";
  bool buffers = false;
};

int run_export(const ExportCli& c) {
  ExportOptions opt;
  opt.dtype = c.dtype == "bf16" ? DType::BF16 : c.dtype == "f16" ? DType::F16 : DType::F32;
  opt.buffers = c.buffers;
  const std::string notes = export_authors_model(c.model_dir, c.out_dir, opt);
  std::fputs(notes.c_str(), stderr);
  std::printf("exported %s to %s (%s weights%s)\n", c.model_dir.c_str(), c.out_dir.c_str(), c.dtype.c_str(),
              c.buffers ? ", with RoPE buffers" : "");
  return 0;
}

}  // namespace

void add_export_command(CLI::App& app, Runner& run) {
  auto c = std::make_shared<ExportCli>();
  auto* e = app.add_subcommand("export", "Write a model folder in the authors' format (their config keys and tensor names)");
  e->add_option("-m,--model", c->model_dir, "model folder (a checkpoint) or run folder (its newest checkpoint)")->required();
  e->add_option("-o,--out", c->out_dir, "new folder to write (must not exist, or be empty)")->required();
  e->add_option("--dtype", c->dtype, "dtype of the weights")->capture_default_str()->check(CLI::IsMember({"f32", "bf16", "f16"}));
  e->add_flag("--buffers", c->buffers, "also write the RoPE inv_freq buffers their state dict holds (for a strict load)");
  e->callback([&run, c] { run = [c] { return run_export(*c); }; });
}

}  // namespace subllm::cli
