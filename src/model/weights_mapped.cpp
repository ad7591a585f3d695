// Weights for inference that point into their memory-mapped safetensors file instead of a copy.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "backend/backend.h"
#include "subllm/error.h"
#include "subllm/host_memory.h"
#include "subllm/model.h"
#include "subllm/safetensors.h"

namespace subllm {

Weights::Weights(ModelConfig cfg, Backend& backend, const std::string& path)
    : Weights(std::move(cfg), backend, Buffer::none) {
  if (map_file(path)) return;
  // A copy: the layout this class allocates, filled by load() with all of its checks (through a
  // host staging copy; on the CPU the weights themselves are host memory too).
  const bool on_host = std::string(backend_->name()) == "cpu";
  check_host_memory((on_host ? 8.0 : 4.0) * (double)num_params_, path + ": loading the weights of " + cfg_.source,
                    on_host ? "store them as F32 in subllm's layout (a checkpoint of `subllm train` or a folder of "
                              "`subllm convert`) so that they are mapped instead of copied"
                            : "use a smaller model");
  buf_ = backend_->zeros({num_params_});
  if (compute_dtype_ != DType::F32) compute_buf_ = backend_->empty({num_params_}, compute_dtype_);
  load(path);
}

// The file's tensors become the flat buffer: it must hold exactly this model's tensors, all F32,
// with q|k|v (and the q|k biases) adjacent as one fused GEMM reads them. Anything else (another
// dtype, the authors' RoPE buffers or tied head copy, another order) is loaded as a copy.
bool Weights::map_file(const std::string& path) {
  if (std::string(backend_->name()) != "cpu" || compute_dtype_ != DType::F32) return false;
  auto file = std::make_shared<SafetensorsFile>(path);
  const std::vector<std::string> names = file->names();
  if (names.size() != params_.size()) return false;
  const char* base = nullptr;
  size_t end = 0;
  for (const std::string& n : names) {
    const SafetensorsEntry& e = file->get(n);
    if (e.dtype != DType::F32) return false;
    const char* p = static_cast<const char*>(e.data);
    if (!base || p < base) base = p;
  }
  std::map<std::string, int64_t> offset;  // elements from `base`
  for (const ParamInfo& p : params_) {
    // Legacy bypass names (format 1) and their renumbering are left to load().
    if (!p.legacy_name.empty() || !file->has(p.name)) return false;
    const SafetensorsEntry& e = file->get(p.name);
    if (e.shape != p.shape) return false;  // load() names the mismatch
    const size_t bytes = static_cast<const char*>(e.data) - base;
    if (bytes % sizeof(float) != 0) return false;
    offset[p.name] = (int64_t)(bytes / sizeof(float));
    end = std::max(end, bytes + e.nbytes);
  }
  auto at = [&](const std::string& n) { return offset.at(n); };
  auto follows = [&](const std::string& a, const std::string& b) {  // b starts where a ends
    return at(b) == at(a) + shape_numel(param_info(a).shape);
  };
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const std::string pre = "decoder.layers." + std::to_string(i) + ".self_attn.";
    if (!follows(pre + "q_proj.weight", pre + "k_proj.weight") || !follows(pre + "k_proj.weight", pre + "v_proj.weight"))
      return false;
    if (cfg_.qk_bias && !follows(pre + "q_proj.bias", pre + "k_proj.bias")) return false;
  }

  // Every value is checked as load() checks it, a slice at a time, each slice dropped from the
  // resident set once read (the pages stay in the page cache for the first pass to use).
  const float* values = reinterpret_cast<const float*>(base);
  const int64_t count = (int64_t)(end / sizeof(float));
  const int64_t slice = int64_t(16) << 20;  // 64 MiB of floats
  const uintptr_t page = (uintptr_t)::sysconf(_SC_PAGESIZE);
  for (int64_t first = 0; first < count; first += slice) {
    const int64_t n = std::min(slice, count - first);
    for (int64_t i = first; i < first + n; ++i) {
      if (std::isfinite(values[i])) continue;
      std::string name = "?";
      for (const ParamInfo& p : params_)
        if (i >= at(p.name) && i < at(p.name) + p.numel) name = p.name;
      throw Error(path + ": tensor '" + name + "' holds " + (std::isnan(values[i]) ? "NaN" : "infinity") +
                  ": the checkpoint is damaged (did training diverge?); use an earlier checkpoint of the run");
    }
    const uintptr_t lo = ((uintptr_t)(values + first) + page - 1) / page * page;
    const uintptr_t hi = (uintptr_t)(values + first + n) / page * page;
    if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  }

  // The layout follows the file: every offset into the flat buffer is the tensor's there.
  for (ParamInfo& p : params_) p.offset = at(p.name);
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const std::string pre = "decoder.layers." + std::to_string(i) + ".";
    BlockOffsets& b = blocks_[(size_t)i];
    b.attn_norm = at(pre + "self_attn_layer_norm.weight");
    b.wqkv = at(pre + "self_attn.q_proj.weight");
    b.wo = at(pre + "self_attn.out_proj.weight");
    b.ffn_norm = at(pre + "final_layer_norm.weight");
    b.w12 = at(pre + "feedforward.swiglu.w12.weight");
    b.w3 = at(pre + "feedforward.swiglu.w3.weight");
    if (cfg_.qk_bias) b.qk_bias = at(pre + "self_attn.q_proj.bias");
  }
  for (int j = 0; j < structure_.num_subsamplers; ++j) {
    score_offset_[(size_t)j] = at("decoder.downsamplers." + std::to_string(j) + ".to_scores.weight");
    const int k = structure_.segments[(size_t)j + 1].bypass;
    bypass_offset_[(size_t)j] = at("decoder.bypasses." + std::to_string(k) + ".bypass_scale");
  }
  embed_offset_ = at("decoder.embed_tokens.weight");
  final_norm_offset_ = at("decoder.layer_norm.weight");
  if (!cfg_.tie_weights) head_offset_ = at("decoder.output_projection.weight");
  // The gradient spans describe an allocated layout; mapped weights have no gradients.
  num_params_ = count;
  buf_ = Tensor::view(const_cast<char*>(base), {num_params_}, DType::F32, backend_);
  mapping_ = std::shared_ptr<const void>(file, file.get());
  return true;
}

}  // namespace subllm
