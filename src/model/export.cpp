// The authors' model format written out: their config keys, tensor names, numbering and buffers.
#include "subllm/export.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "backend/backend.h"
#include "subllm/error.h"
#include "subllm/generate.h"
#include "subllm/safetensors.h"

namespace subllm {

namespace fs = std::filesystem;

namespace {

// What their code fixes and ours lets a config choose: refused, since their code would compute
// something else.
void check_exportable(const ModelConfig& c, const std::string& dir) {
  if (c.rope_base != 10000.0f) {
    throw Error("cannot export '" + dir + "': rope_base is " + std::to_string(c.rope_base) +
                ", but the authors' code always uses RoPE base 10000: only models with rope_base 10000 can be exported");
  }
  if (c.kv_heads() != c.n_heads) {
    throw Error("cannot export '" + dir + "': it has grouped-query attention (" + std::to_string(c.kv_heads()) +
                " key/value heads for " + std::to_string(c.n_heads) +
                " query heads), which the authors' code does not have: only models with as many key/value heads as "
                "query heads can be exported (a LLaMA-structure model converts with `subllm convert --to hf`)");
  }
  const Structure st = c.parse();
  for (int j = 0; j < st.num_subsamplers; ++j) {
    if (st.segments[(size_t)j + 1].retention >= 1.0f) {
      throw Error("cannot export '" + dir + "': subsampler " + std::to_string(j) +
                  " keeps every token (retention 1), which the authors' code refuses (it needs a factor above 1): "
                  "remove that pair of parentheses from the structure");
    }
  }
  // Their code places a nested segment's tokens at their rows in the parent segment; a model
  // using original positions there would compute something else. Without nesting both agree.
  const bool nested = std::any_of(st.segments.begin(), st.segments.end(), [](const Segment& s) { return s.depth > 1; });
  if (nested && !c.rope_parent_positions) {
    throw Error("cannot export '" + dir + "': the model is nested (" + c.layout() +
                ") and uses \"rope_positions\": \"original\", but the authors' code always uses \"parent\" "
                "(a token's row in the parent segment): only nested models with \"parent\" positions can be exported");
  }
}

std::string config_text(const ModelConfig& c) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(config_to_json_text(c, true));
  // Their code ignores the key; it is written so that loading the export here gives the same model.
  if (c.norm_eps != 1e-5f) {
    j["norm_eps"] = c.norm_eps;
    // With one of our keys the config would read as ours from before rope_positions; say it.
    j["rope_positions"] = "parent";
  }
  return j.dump(2) + "\n";
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  f.close();
  check((bool)f, "cannot write '" + path.string() + "' (check the output folder)");
}

// The tensors in the authors' state-dict layout, converted to `dtype`; `halves`, `host` and
// `inv_freq` hold the data the entries point at.
std::vector<SafetensorsOut> authors_tensors(const Model& m, const ExportOptions& opt, std::vector<std::vector<uint16_t>>& halves,
                                            std::vector<float>& host, std::vector<float>& inv_freq) {
  const Weights& w = m.weights();
  host.resize((size_t)w.num_params());
  w.backend().to_host(host.data(), w.data(), sizeof(float) * host.size());
  std::vector<SafetensorsOut> out;
  auto put = [&](const std::string& name, const Shape& shape, const float* data) {
    if (opt.dtype == DType::F32) {
      out.push_back({name, DType::F32, shape, data});
      return;
    }
    std::vector<uint16_t> h((size_t)shape_numel(shape));
    for (size_t i = 0; i < h.size(); ++i)
      h[i] = opt.dtype == DType::BF16 ? float_to_bf16_bits(data[i]) : float_to_f16_bits(data[i]);
    halves.push_back(std::move(h));
    out.push_back({name, opt.dtype, shape, halves.back().data()});
  };
  halves.reserve(w.params().size() + 1);
  for (const ParamInfo& p : w.params()) put(p.name, p.shape, host.data() + p.offset);
  // A tied model's state dict names the shared weight twice; a strict load wants both names.
  if (m.config().tie_weights) {
    const ParamInfo& e = w.param_info("decoder.embed_tokens.weight");
    put("decoder.output_projection.weight", e.shape, host.data() + e.offset);
  }
  if (opt.buffers) {
    // As their RotaryEmbedding computes it, in fp32: 1 / 10000^(2i / head_dim).
    const int hd = m.config().head_dim();
    for (int i = 0; i < hd / 2; ++i) inv_freq.push_back(1.0f / std::pow(10000.0f, (float)(2 * i) / (float)hd));
    for (int l = 0; l < m.config().n_layers; ++l)
      out.push_back({"decoder.layers." + std::to_string(l) + ".self_attn.position.inv_freq", DType::F32,
                     {(int64_t)inv_freq.size()}, inv_freq.data()});
  }
  return out;
}

}  // namespace

uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u);  // NaN stays a quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

uint16_t float_to_f16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;                // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;               // rounds to infinity (65520 and above)
  if (abs < 0x38800000u) {                                     // below the smallest normal half: subnormal
    // The value in units of 2^-24, rounded to nearest even, by adding 0.5 in float arithmetic.
    const float scaled = std::fabs(f) * 16777216.0f;           // exact: a power-of-two scale
    const float r = std::nearbyint(scaled);                    // default rounding mode: nearest even
    return sign | (uint16_t)r;
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return sign | (uint16_t)h;
}

std::string export_authors_model(const std::string& model_dir, const std::string& out_dir, const ExportOptions& opt) {
  check(opt.dtype == DType::F32 || opt.dtype == DType::BF16 || opt.dtype == DType::F16,
        "export: --dtype must be f32, bf16 or f16");
  const fs::path out(out_dir);
  std::error_code ec;
  if (fs::exists(out, ec)) {
    check(fs::is_directory(out) && fs::is_empty(out, ec),
          "output folder '" + out_dir + "' already exists and is not empty: choose a new folder (export never overwrites)");
  }
  LoadedModel lm = load_model_dir(model_dir, "cpu");
  check(lm.model->weights().weight_dtype() == DType::F32,
        "model folder '" + lm.dir + "' holds inference weights written by `subllm quantize`: export the fp32 model "
        "it was made from");
  const ModelConfig& c = lm.model->config();
  check_exportable(c, lm.dir);
  std::string notes;
  if (c.norm_eps != 1e-5f) {
    notes += "note: norm_eps is " + std::to_string(c.norm_eps) +
             " but the authors' code always uses 1e-5: its logits will differ slightly from subllm's\n";
  }

  std::vector<std::vector<uint16_t>> halves;
  std::vector<float> host, inv_freq;
  const std::vector<SafetensorsOut> tensors = authors_tensors(*lm.model, opt, halves, host, inv_freq);

  // Built beside the target and renamed into place, so the folder appears complete or not at all.
  const fs::path tmp = out.string() + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  check(!ec, "cannot create '" + tmp.string() + "': " + ec.message() + " (check the output folder)");
  try {
    write_text(tmp / "config.json", config_text(c));
    write_safetensors((tmp / "model.safetensors").string(), tensors, {{"format", "pt"}, {"subllm_format", "2"}});
    fs::copy_file(fs::path(lm.dir) / "tokenizer.model", tmp / "tokenizer.model", ec);
    check(!ec, "cannot copy tokenizer.model into '" + tmp.string() + "': " + ec.message());
    fs::rename(tmp, out, ec);
    check(!ec, "cannot move '" + tmp.string() + "' to '" + out_dir + "': " + ec.message() + " (check the output folder)");
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  return notes;
}

}  // namespace subllm
