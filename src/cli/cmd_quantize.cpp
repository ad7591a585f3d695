// `subllm quantize`: a model folder whose weights are stored in an inference type (bf16, or q8:
// int8 with one scale per 32), which generate, eval and bench load as they are.
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "subllm/checkpoint.h"
#include "subllm/error.h"
#include "subllm/generate.h"
#include "subllm/threads.h"

namespace subllm::cli {
namespace {

namespace fs = std::filesystem;

struct QuantizeCli {
  std::string model_dir, out_dir, type = "q8";
  int threads = 0;
};

int run_quantize(const QuantizeCli& c) {
  set_num_threads(c.threads);
  const fs::path out(c.out_dir);
  std::error_code ec;
  if (fs::exists(out, ec))
    check(fs::is_directory(out) && fs::is_empty(out, ec),
          "output folder '" + c.out_dir + "' already exists and is not empty: choose a new folder (quantize never "
          "overwrites)");
  check(fs::exists(c.model_dir), "model folder '" + c.model_dir + "' does not exist");
  const std::string dir =
      fs::exists(fs::path(c.model_dir) / "model.safetensors") ? c.model_dir : find_checkpoint(c.model_dir);
  check(fs::exists(fs::path(dir) / "model.safetensors"), "model folder '" + dir + "' has no model.safetensors");
  const std::string own = model_dir_dtype(dir);
  check(own == "f32", "model folder '" + dir + "' is already quantized (" + own +
                          " weights, written by `subllm quantize`): quantize the fp32 model it was made from");
  LoadedModel lm = load_model_dir(dir, "cpu", c.type);

  // Written beside the target and renamed into place, so the folder appears complete or not at all.
  const fs::path tmp = out.string() + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  check(!ec, "cannot create '" + tmp.string() + "': " + ec.message() + " (check the output folder)");
  try {
    for (const char* f : {"config.json", "tokenizer.model"}) {
      fs::copy_file(fs::path(lm.dir) / f, tmp / f, ec);
      check(!ec, std::string("cannot copy ") + f + " into '" + tmp.string() + "': " + ec.message());
    }
    lm.model->save((tmp / "model.safetensors").string());
    fs::rename(tmp, out, ec);
    check(!ec, "cannot move '" + tmp.string() + "' to '" + c.out_dir + "': " + ec.message() + " (check the output folder)");
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  const auto in_bytes = fs::file_size(fs::path(lm.dir) / "model.safetensors");
  const auto out_bytes = fs::file_size(out / "model.safetensors");
  std::printf("quantized %s to %s (%s weights, model.safetensors %.1f MB -> %.1f MB)\n", lm.dir.c_str(),
              c.out_dir.c_str(), c.type.c_str(), in_bytes / 1048576.0, out_bytes / 1048576.0);
  return 0;
}

}  // namespace

void add_quantize_command(CLI::App& app, Runner& run) {
  auto c = std::make_shared<QuantizeCli>();
  auto* q = app.add_subcommand("quantize", "Write a model folder with inference weights: bf16, or q8 (int8, one scale per 32)");
  q->add_option("-m,--model", c->model_dir, "fp32 model folder (a checkpoint) or run folder (its newest checkpoint)")
      ->required();
  q->add_option("-o,--out", c->out_dir, "new folder to write (must not exist, or be empty)")->required();
  q->add_option("--type", c->type, "weight type")->capture_default_str()->check(CLI::IsMember({"bf16", "q8"}));
  add_threads_option(q, c->threads);
  q->callback([&run, c] { run = [c] { return run_quantize(*c); }; });
}

}  // namespace subllm::cli
