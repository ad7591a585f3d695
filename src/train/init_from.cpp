// --init-from: a fresh run seeded with the weights of a trained model (continued training as
// SUBLLM from a LLaMA, or fine-tuning with a fresh optimizer).
#include <algorithm>
#include <filesystem>
#include <map>

#include "backend/backend.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/safetensors.h"
#include "subllm/trainer.h"

namespace subllm {

namespace fs = std::filesystem;

std::string init_from_folder(const std::string& path) {
  check(fs::exists(path), "--init-from '" + path + "' does not exist: give a model folder (config.json, "
                                                   "model.safetensors) or a run folder");
  if (fs::exists(fs::path(path) / "model.safetensors")) return path;
  try {
    return find_checkpoint(path);
  } catch (const Error&) {
    throw Error("--init-from '" + path + "' is not a model folder: it needs config.json and model.safetensors (a "
                "checkpoint of `subllm train`, its run folder, or a folder of `subllm convert`)");
  }
}

std::string init_from_model(Model& model, const std::string& dir) {
  const fs::path d(dir);
  check(fs::exists(d / "config.json"), "--init-from '" + dir + "' has no config.json");
  const ModelConfig src = load_config((d / "config.json").string());
  const ModelConfig& dst = model.config();
  const std::string where = "--init-from '" + dir + "'";
  auto same = [&](const char* key, long a, long b) {
    if (a != b) {
      throw Error(where + " cannot seed this model: " + key + " is " + std::to_string(a) + " there and " +
                  std::to_string(b) + " here; the blocks keep their shapes, so give the model the source's " + key +
                  " (without --config the source's sizes are used)");
    }
  };
  same("num_embeddings", src.vocab_size, dst.vocab_size);
  same("decoder_embed_dim", src.dim, dst.dim);
  same("decoder_ffn_embed_dim", src.ffn_dim, dst.ffn_dim);
  same("decoder_attention_heads", src.n_heads, dst.n_heads);
  same("decoder_kv_heads", src.kv_heads(), dst.kv_heads());
  same("tie_weights", src.tie_weights, dst.tie_weights);
  same("qk_bias", src.qk_bias, dst.qk_bias);
  if (src.n_layers > dst.n_layers) {
    throw Error(where + " has " + std::to_string(src.n_layers) + " blocks but this model only " +
                std::to_string(dst.n_layers) + " (" + dst.layout() +
                "): give a structure with at least as many T as the source has blocks");
  }
  check(src.rope_base == dst.rope_base && src.norm_eps == dst.norm_eps,
        where + " was trained with rope_base " + std::to_string(src.rope_base) + " and norm_eps " +
            std::to_string(src.norm_eps) + ", this model has " + std::to_string(dst.rope_base) + " and " +
            std::to_string(dst.norm_eps) + ": use the source's values (without --config they are taken from it)");

  // A quantized folder holds integer tensors: its weights are not the ones training updates.
  const std::string weights_path = (d / "model.safetensors").string();
  {
    SafetensorsFile f(weights_path);
    for (const std::string& n : f.names()) {
      const DType dt = f.get(n).dtype;
      check(dt == DType::F32 || dt == DType::BF16 || dt == DType::F16,
            weights_path + ": tensor '" + n + "' is " + dtype_name(dt) +
                ": a quantized model cannot seed training; use the F32/BF16/F16 model it was made from");
    }
  }
  // Read with every check of a load (names, shapes, bypass numbering, finite values).
  Weights from(src, cpu_backend());
  from.load(weights_path);

  Weights& w = model.weights();
  std::vector<float> host((size_t)w.num_params());
  w.backend().to_host(host.data(), w.data(), sizeof(float) * host.size());
  std::map<std::string, const ParamInfo*> by_name;
  for (const ParamInfo& p : w.params()) by_name[p.name] = &p;
  // Score layers and bypass scales belong to a place in the layout; kept only when it is the same.
  const bool same_layout = src.layout() == dst.layout() && src.retentions == dst.retentions;
  int64_t kept = 0, tensors = 0;
  for (const ParamInfo& p : from.params()) {
    const bool subsampler = p.name.rfind("decoder.downsamplers.", 0) == 0 || p.name.rfind("decoder.bypasses.", 0) == 0;
    if (subsampler && !same_layout) continue;
    auto it = by_name.find(p.name);
    check(it != by_name.end() && it->second->shape == p.shape,
          where + ": tensor '" + p.name + "' has no place of its shape in this model");
    std::copy(from.data() + p.offset, from.data() + p.offset + p.numel, host.begin() + it->second->offset);
    kept += p.numel;
    ++tensors;
  }
  w.backend().to_device(w.data(), host.data(), sizeof(float) * host.size());
  w.params_changed();

  std::string notes = "init-from " + dir + ": " + std::to_string(tensors) + " tensors (" + std::to_string(kept) +
                      " parameters) kept in place";
  const int fresh_subsamplers = same_layout ? 0 : model.structure().num_subsamplers;
  if (fresh_subsamplers > 0)
    notes += "; " + std::to_string(fresh_subsamplers) + " subsampler(s) (score layer and bypass scale) start fresh";
  if (dst.n_layers > src.n_layers)
    notes += "; blocks " + std::to_string(src.n_layers) + ".." + std::to_string(dst.n_layers - 1) + " start fresh";
  return notes + "\n";
}

}  // namespace subllm
