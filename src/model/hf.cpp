// Hugging Face LLaMA folders in and out (`subllm convert`); the name mapping is in subllm/hf.h.
#include "subllm/hf.h"

#include <unistd.h>

#include <charconv>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <vector>

#include "backend/backend.h"
#include "subllm/error.h"
#include "subllm/export.h"
#include "subllm/generate.h"
#include "subllm/host_memory.h"
#include "subllm/model.h"
#include "subllm/safetensors.h"
#include "subllm/tokenizer.h"

namespace subllm {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string hf_layer(int i) { return "model.layers." + std::to_string(i) + "."; }
std::string our_layer(int i) { return "decoder.layers." + std::to_string(i) + "."; }

// A Hugging Face LLaMA tensor and its place here: our tensor, the shape, and the element offset
// within ours (gate_proj and up_proj are the two halves of w12).
struct HfPlace {
  std::string hf, ours;
  Shape shape;
  int64_t at = 0;
};

// Every tensor of a LLaMA of config c but the output head, in file order.
std::vector<HfPlace> hf_places(const ModelConfig& c) {
  const int64_t C = c.dim, F = c.ffn_dim, V = c.vocab_size, KV = c.kv_dim();
  std::vector<HfPlace> p = {{"model.embed_tokens.weight", "decoder.embed_tokens.weight", {V, C}}};
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string h = hf_layer(i), o = our_layer(i);
    p.push_back({h + "input_layernorm.weight", o + "self_attn_layer_norm.weight", {C}});
    p.push_back({h + "self_attn.q_proj.weight", o + "self_attn.q_proj.weight", {C, C}});
    p.push_back({h + "self_attn.k_proj.weight", o + "self_attn.k_proj.weight", {KV, C}});
    p.push_back({h + "self_attn.v_proj.weight", o + "self_attn.v_proj.weight", {KV, C}});
    p.push_back({h + "self_attn.o_proj.weight", o + "self_attn.out_proj.weight", {C, C}});
    p.push_back({h + "post_attention_layernorm.weight", o + "final_layer_norm.weight", {C}});
    p.push_back({h + "mlp.gate_proj.weight", o + "feedforward.swiglu.w12.weight", {F, C}});
    p.push_back({h + "mlp.up_proj.weight", o + "feedforward.swiglu.w12.weight", {F, C}, F * C});
    p.push_back({h + "mlp.down_proj.weight", o + "feedforward.swiglu.w3.weight", {C, F}});
  }
  p.push_back({"model.norm.weight", "decoder.layer_norm.weight", {C}});
  return p;
}

// Shortest decimal text that reads back as the same float (1e-05, not 9.99999974737875e-06).
double float_for_json(float v) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::strtod(std::string(buf, res.ptr).c_str(), nullptr);
}

json read_json_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  check((bool)f, "cannot read '" + path.string() + "' (check the folder)");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    json j = json::parse(ss.str());
    check(j.is_object(), path.string() + ": the top level must be a JSON object");
    return j;
  } catch (const json::exception& e) {
    throw Error(path.string() + ": invalid JSON: " + e.what() + " (fix the syntax of the file)");
  }
}

// An output folder that does not exist or is empty, written beside and renamed into place.
void check_new_folder(const std::string& out_dir) {
  std::error_code ec;
  if (fs::exists(out_dir, ec)) {
    check(fs::is_directory(out_dir) && fs::is_empty(out_dir, ec),
          "output folder '" + out_dir + "' already exists and is not empty: choose a new folder (convert never overwrites)");
  }
}

template <class Fill>
void write_folder(const std::string& out_dir, Fill fill) {
  const fs::path out(out_dir);
  const fs::path tmp = out.string() + ".tmp-" + std::to_string(::getpid());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  check(!ec, "cannot create '" + tmp.string() + "': " + ec.message() + " (check the output folder)");
  try {
    fill(tmp);
    fs::rename(tmp, out, ec);
    check(!ec, "cannot move '" + tmp.string() + "' to '" + out_dir + "': " + ec.message() + " (check the output folder)");
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

void copy_tokenizer(const fs::path& from_dir, const fs::path& to_dir) {
  std::error_code ec;
  fs::copy_file(from_dir / "tokenizer.model", to_dir / "tokenizer.model", ec);
  check(!ec, "cannot copy tokenizer.model into '" + to_dir.string() + "': " + ec.message());
}

// ---- reading a Hugging Face config ---------------------------------------------------------

struct HfConfigReader {
  const json& j;
  std::string src;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }
  int integer(const char* key, int fallback, bool required) const {
    if (!has(key)) {
      check(!required, src + ": the key " + std::string(key) + " is missing: a LLaMA config.json states it");
      return fallback;
    }
    const json& v = j.at(key);
    if (v.is_number_integer() && v.get<int64_t>() >= INT32_MIN && v.get<int64_t>() <= INT32_MAX) return v.get<int>();
    throw Error(src + ": " + key + " must be an integer, got " + v.dump());
  }
  double number(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    check(v.is_number(), src + ": " + key + " must be a number, got " + v.dump());
    return v.get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    check(v.is_boolean(), src + ": " + key + " must be true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    check(v.is_string(), src + ": " + key + " must be a string, got " + v.dump());
    return v.get<std::string>();
  }
  // A token id: an integer, or (eos in some configs) a list whose first entry is used.
  int token_id(const char* key, int fallback, std::string& notes) const {
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    if (v.is_array() && !v.empty() && v[0].is_number_integer()) {
      notes += "note: " + std::string(key) + " lists " + std::to_string(v.size()) + " ids; the first (" +
               std::to_string(v[0].get<int>()) + ") is used\n";
      return v[0].get<int>();
    }
    return integer(key, fallback, false);
  }
};

// Everything LlamaConfig can say that this model cannot compute is refused, naming the key.
void refuse_unsupported(const HfConfigReader& r) {
  const std::string& s = r.src;
  const std::string type = r.string("model_type", "llama");
  check(type == "llama", s + ": model_type \"" + type +
                             "\" is not supported: only LLaMA models (model_type \"llama\") convert");
  const std::string act = r.string("hidden_act", "silu");
  check(act == "silu", s + ": hidden_act \"" + act + "\" is not supported: the feed-forward is SwiGLU (\"silu\") only");
  if (r.has("rope_scaling")) {
    throw Error(s + ": rope_scaling " + r.j.at("rope_scaling").dump() +
                " is not supported: only plain RoPE (rope_scaling null) converts");
  }
  check(!r.boolean("attention_bias", false),
        s + ": attention_bias true is not supported: only models without q/k/v/o biases convert");
  check(!r.boolean("mlp_bias", false), s + ": mlp_bias true is not supported: only models without MLP biases convert");
  if (r.has("sliding_window")) {
    throw Error(s + ": sliding_window " + r.j.at("sliding_window").dump() +
                " is not supported: attention here is over the whole causal context");
  }
  if (r.has("quantization_config")) {
    throw Error(s + ": quantization_config is present: quantized checkpoints are not supported; convert the "
                    "F32/BF16/F16 weights");
  }
  const double rotary = r.number("partial_rotary_factor", 1.0);
  check(rotary == 1.0, s + ": partial_rotary_factor " + std::to_string(rotary) +
                           " is not supported: RoPE here rotates the whole head");
}

// LlamaConfig -> ModelConfig (a LLaMA: no subsamplers, no q/k biases).
ModelConfig config_from_hf(const json& j, const std::string& src, std::string& notes) {
  const HfConfigReader r{j, src};
  refuse_unsupported(r);
  ModelConfig c;
  c.source = src;
  c.vocab_size = r.integer("vocab_size", 0, true);
  c.dim = r.integer("hidden_size", 0, true);
  c.ffn_dim = r.integer("intermediate_size", 0, true);
  c.n_layers = r.integer("num_hidden_layers", 0, true);
  c.n_heads = r.integer("num_attention_heads", 0, true);
  const int kv = r.integer("num_key_value_heads", c.n_heads, false);
  check(kv > 0 && c.n_heads > 0 && c.n_heads % kv == 0,
        src + ": num_key_value_heads (" + std::to_string(kv) + ") must divide num_attention_heads (" +
            std::to_string(c.n_heads) + ")");
  c.n_kv_heads = kv == c.n_heads ? 0 : kv;
  if (r.has("head_dim") && c.n_heads > 0) {
    const int hd = r.integer("head_dim", 0, false);
    check(hd * c.n_heads == c.dim, src + ": head_dim " + std::to_string(hd) + " is not hidden_size / num_attention_heads (" +
                                       std::to_string(c.dim / c.n_heads) +
                                       "): only models whose heads tile the hidden size convert");
  }
  c.context = r.integer("max_position_embeddings", 2048, false);
  c.norm_eps = (float)r.number("rms_norm_eps", 1e-6);
  c.rope_base = (float)r.number("rope_theta", 10000.0);
  c.tie_weights = r.boolean("tie_word_embeddings", false);
  c.bos_token_id = r.token_id("bos_token_id", 1, notes);
  c.eos_token_id = r.token_id("eos_token_id", 2, notes);
  c.padding_idx = r.has("pad_token_id") ? r.token_id("pad_token_id", 0, notes) : -1;  // -1: from the tokenizer
  c.qk_bias = false;
  c.structure.clear();
  c.rope_parent_positions = true;
  return c;
}

// The token ids of config.json against the tokenizer's, and the padding id when the config has none.
void reconcile_token_ids(ModelConfig& c, const Tokenizer& tok, const std::string& src, std::string& notes) {
  check(tok.vocab_size() <= c.vocab_size, src + ": vocab_size (" + std::to_string(c.vocab_size) +
                                              ") is smaller than tokenizer.model's " + std::to_string(tok.vocab_size()) +
                                              " pieces: the files do not belong together");
  auto same = [&](const char* key, int config_id, int tok_id) {
    if (tok_id >= 0 && config_id != tok_id) {
      throw Error(src + ": " + key + " is " + std::to_string(config_id) + " but tokenizer.model's is " +
                  std::to_string(tok_id) + ": set " + key + " to the tokenizer's id");
    }
  };
  same("bos_token_id", c.bos_token_id, tok.bos_id());
  same("eos_token_id", c.eos_token_id, tok.eos_id());
  if (c.padding_idx < 0) {
    // LLaMA tokenizers have no padding piece; padding_idx here only marks tokens a subsampler never
    // keeps at inference, so the unknown piece (which byte fallback never produces) serves.
    c.padding_idx = tok.pad_id() >= 0 ? tok.pad_id() : tok.unk_id() >= 0 ? tok.unk_id() : 0;
    notes += "note: config.json has no pad_token_id; padding_idx is " + std::to_string(c.padding_idx) + " (the tokenizer's " +
             (tok.pad_id() >= 0 ? "padding" : "unknown") + " piece)\n";
  }
}

// ---- the weights -----------------------------------------------------------------------------

// The tensors of a folder: model.safetensors, or the shards its index lists.
class HfTensors {
 public:
  explicit HfTensors(const fs::path& dir) {
    const fs::path index = dir / "model.safetensors.index.json";
    if (fs::exists(index)) {
      const json j = read_json_file(index);
      check(j.contains("weight_map") && j["weight_map"].is_object(),
            index.string() + ": has no weight_map object (tensor name -> shard file)");
      for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        check(it.value().is_string(), index.string() + ": weight_map entry '" + it.key() + "' is not a file name");
        const std::string shard = it.value().get<std::string>();
        check(!shard.empty() && shard.find('/') == std::string::npos && shard != "." && shard != "..",
              index.string() + ": weight_map names the file '" + shard + "': shards must be files of the same folder");
        if (!files_.count(shard)) {
          check(fs::exists(dir / shard), index.string() + ": shard '" + shard + "' (of tensor '" + it.key() +
                                             "') is missing from the folder");
          files_[shard] = std::make_unique<SafetensorsFile>((dir / shard).string());
        }
        where_[it.key()] = files_[shard].get();
      }
      // Every tensor of every shard must be in the map (and where it says).
      for (const auto& [shard, f] : files_)
        for (const std::string& n : f->names()) {
          auto w = where_.find(n);
          check(w != where_.end() && w->second == f.get(),
                f->path() + ": tensor '" + n + "' is not listed for this shard in " + index.string());
        }
      for (const auto& [n, f] : where_)
        check(f->has(n), index.string() + ": tensor '" + n + "' is not in its shard " + f->path());
    } else {
      const fs::path single = dir / "model.safetensors";
      check(fs::exists(single), "'" + dir.string() + "' has neither model.safetensors nor model.safetensors.index.json: "
                                "only safetensors checkpoints convert (save the model with safe_serialization)");
      files_["model.safetensors"] = std::make_unique<SafetensorsFile>(single.string());
      for (const std::string& n : files_.begin()->second->names()) where_[n] = files_.begin()->second.get();
    }
  }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& [k, f] : where_) n.push_back(k);
    return n;
  }
  bool has(const std::string& n) const { return where_.count(n) != 0; }
  void read(const std::string& n, const Shape& shape, float* dst) const {
    auto it = where_.find(n);
    check(it != where_.end(), "the checkpoint has no tensor '" + n + "', which a LLaMA of this config.json needs");
    it->second->read_f32(n, shape, dst);
  }
  const SafetensorsFile& file_of(const std::string& n) const { return *where_.at(n); }

 private:
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

void check_finite(const float* x, int64_t n, const std::string& name) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]))
      throw Error("tensor '" + name + "' holds " + (std::isnan(x[i]) ? "NaN" : "infinity") + " (element " +
                  std::to_string(i) + "): the checkpoint is damaged");
}

}  // namespace

std::string convert_from_hf(const std::string& hf_dir, const std::string& out_dir) {
  const fs::path dir(hf_dir);
  check(fs::is_directory(dir), "'" + hf_dir + "' is not a folder: give a Hugging Face model folder (config.json, "
                                              "model.safetensors, tokenizer.model)");
  check_new_folder(out_dir);
  for (const char* f : {"config.json", "tokenizer.model"})
    check(fs::exists(dir / f), "'" + hf_dir + "' has no " + f +
                                   ": a LLaMA folder needs config.json, the safetensors weights and the "
                                   "sentencepiece tokenizer.model (tokenizer.json alone is not supported)");
  std::string notes;
  const std::string src = (dir / "config.json").string();
  ModelConfig c = config_from_hf(read_json_file(dir / "config.json"), src, notes);
  const Tokenizer tok = Tokenizer::load((dir / "tokenizer.model").string());
  reconcile_token_ids(c, tok, src, notes);
  c.validate();

  const HfTensors in(dir);
  // Every tensor must have a place; the old per-block RoPE buffers are checked and dropped.
  const std::vector<HfPlace> places = hf_places(c);
  std::set<std::string> expected;
  for (const HfPlace& p : places) expected.insert(p.hf);
  if (!c.tie_weights) expected.insert("lm_head.weight");
  const int hd = c.head_dim();
  for (const std::string& n : in.names()) {
    if (n.size() > 9 && n.compare(n.size() - 9, 9, ".inv_freq") == 0) {
      std::vector<float> got((size_t)hd / 2);
      in.read(n, {hd / 2}, got.data());
      for (int i = 0; i < hd / 2; ++i) {
        const double want = std::pow((double)c.rope_base, -2.0 * i / hd);
        check(std::fabs(got[(size_t)i] - want) <= 1e-2 * want,
              in.file_of(n).path() + ": RoPE buffer '" + n + "' does not match rope_theta " +
                  std::to_string(c.rope_base) + " of config.json: set rope_theta to the base the model was trained with");
      }
      continue;
    }
    if (c.tie_weights && n == "lm_head.weight") continue;  // checked against the embedding below
    if (!expected.count(n)) {
      const bool bias = n.size() > 5 && n.compare(n.size() - 5, 5, ".bias") == 0;
      throw Error(in.file_of(n).path() + ": tensor '" + n + "' has no place in a LLaMA of this config.json" +
                  (bias ? " (biases are not supported)" : "") + ": only LLaMA checkpoints convert");
    }
  }

  // The weights, laid out as ours on the CPU (and the copy save() writes from).
  check_host_memory(8.0 * (double)c.param_count(), src + ": converting the model",
                    "convert on a machine with more memory");
  Weights w(c, cpu_backend());
  float* P = w.data();
  const int64_t C = c.dim, V = c.vocab_size;
  auto put = [&](const std::string& hf, const std::string& ours, const Shape& shape, int64_t at = 0) {
    float* dst = P + w.param_info(ours).offset + at;
    in.read(hf, shape, dst);
    check_finite(dst, shape_numel(shape), hf);
  };
  for (const HfPlace& p : places) put(p.hf, p.ours, p.shape, p.at);
  if (!c.tie_weights) {
    put("lm_head.weight", "decoder.output_projection.weight", {V, C});
  } else if (in.has("lm_head.weight")) {
    std::vector<float> head((size_t)(V * C));
    in.read("lm_head.weight", {V, C}, head.data());
    check(std::memcmp(head.data(), P + w.embed_offset(), sizeof(float) * head.size()) == 0,
          src + ": tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight: set "
                "tie_word_embeddings to false");
  }
  w.params_changed();

  write_folder(out_dir, [&](const fs::path& tmp) {
    save_config(c, (tmp / "config.json").string());
    w.save((tmp / "model.safetensors").string());
    copy_tokenizer(dir, tmp);
  });
  return notes;
}

std::string convert_to_hf(const std::string& model_dir, const std::string& out_dir, DType dtype) {
  check(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16, "convert: --dtype must be f32, bf16 or f16");
  check_new_folder(out_dir);
  LoadedModel lm = load_model_dir(model_dir, "cpu");
  const ModelConfig& c = lm.model->config();
  check(c.parse().is_plain(), "cannot convert '" + lm.dir + "' to Hugging Face LLaMA: it has subsamplers (structure " +
                                  c.layout() + "); only LLaMA-structure models (no parentheses) convert");
  check(!c.qk_bias, "cannot convert '" + lm.dir + "' to Hugging Face LLaMA: it has q/k biases (qk_bias true), which "
                    "LLaMA has not");
  const Weights& w = lm.model->weights();
  std::vector<float> host((size_t)w.num_params());
  w.backend().to_host(host.data(), w.data(), sizeof(float) * host.size());
  const int64_t C = c.dim, V = c.vocab_size;

  std::vector<SafetensorsOut> out;
  std::vector<std::vector<uint16_t>> halves;
  auto put = [&](const std::string& hf, const std::string& ours, const Shape& shape, int64_t at = 0) {
    const float* src = host.data() + w.param_info(ours).offset + at;
    if (dtype == DType::F32) {
      out.push_back({hf, DType::F32, shape, src});
      return;
    }
    std::vector<uint16_t> h((size_t)shape_numel(shape));
    for (size_t i = 0; i < h.size(); ++i)
      h[i] = dtype == DType::BF16 ? float_to_bf16_bits(src[i]) : float_to_f16_bits(src[i]);
    halves.push_back(std::move(h));
    out.push_back({hf, dtype, shape, halves.back().data()});
  };
  const std::vector<HfPlace> places = hf_places(c);
  halves.reserve(places.size() + 1);
  for (const HfPlace& p : places) put(p.hf, p.ours, p.shape, p.at);
  if (!c.tie_weights) put("lm_head.weight", "decoder.output_projection.weight", {V, C});

  nlohmann::ordered_json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.dim;
  j["intermediate_size"] = c.ffn_dim;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.kv_heads();
  j["head_dim"] = c.head_dim();
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.context;
  j["rms_norm_eps"] = float_for_json(c.norm_eps);
  j["rope_theta"] = float_for_json(c.rope_base);
  j["rope_scaling"] = nullptr;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = false;
  j["tie_word_embeddings"] = c.tie_weights;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["pad_token_id"] = c.padding_idx;
  j["torch_dtype"] = dtype == DType::F32 ? "float32" : dtype == DType::BF16 ? "bfloat16" : "float16";
  j["use_cache"] = true;

  write_folder(out_dir, [&](const fs::path& tmp) {
    std::ofstream f(tmp / "config.json", std::ios::binary);
    f << j.dump(2) << "\n";
    f.close();
    check((bool)f, "cannot write '" + (tmp / "config.json").string() + "' (check the output folder)");
    write_safetensors((tmp / "model.safetensors").string(), out, {{"format", "pt"}});
    copy_tokenizer(lm.dir, tmp);
  });
  return "";
}

}  // namespace subllm
