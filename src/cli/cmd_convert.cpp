// `subllm convert`: Hugging Face LLaMA folders in (HF_DIR -o DIR) and out (DIR --to hf -o OUT).
#include <cstdio>

#include "cli/commands.h"
#include "subllm/hf.h"

namespace subllm::cli {
namespace {

struct ConvertCli {
  std::string in_dir, out_dir, to = "subllm", dtype = "f32";
};

int run_convert(const ConvertCli& c) {
  std::string notes;
  if (c.to == "hf") {
    const DType dt = c.dtype == "bf16" ? DType::BF16 : c.dtype == "f16" ? DType::F16 : DType::F32;
    notes = convert_to_hf(c.in_dir, c.out_dir, dt);
    std::fputs(notes.c_str(), stderr);
    std::printf("converted %s to the Hugging Face LLaMA folder %s (%s weights)\n", c.in_dir.c_str(), c.out_dir.c_str(),
                c.dtype.c_str());
  } else {
    notes = convert_from_hf(c.in_dir, c.out_dir);
    std::fputs(notes.c_str(), stderr);
    std::printf("converted the Hugging Face LLaMA folder %s to %s\n", c.in_dir.c_str(), c.out_dir.c_str());
  }
  return 0;
}

}  // namespace

void add_convert_command(CLI::App& app, Runner& run) {
  auto c = std::make_shared<ConvertCli>();
  auto* e = app.add_subcommand(
      "convert", "Convert a Hugging Face LLaMA folder into a model folder, or (--to hf) a LLaMA model folder back");
  e->add_option("input", c->in_dir,
                "a Hugging Face LLaMA folder (config.json, model.safetensors or its shards, tokenizer.model); with "
                "--to hf, a model folder or run folder")
      ->required();
  e->add_option("-o,--out", c->out_dir, "new folder to write (must not exist, or be empty)")->required();
  e->add_option("--to", c->to, "what to write: a model folder of this program, or a Hugging Face LLaMA folder")
      ->capture_default_str()
      ->check(CLI::IsMember({"subllm", "hf"}));
  e->add_option("--dtype", c->dtype, "dtype of the weights written with --to hf")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  e->callback([&run, c] { run = [c] { return run_convert(*c); }; });
}

}  // namespace subllm::cli
