// config.json with the official SUBLLM key names, plus norm_eps and rope_base of our own.
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "subllm/config.h"
#include "subllm/error.h"

namespace subllm {
namespace {

using nlohmann::json;

// Shortest decimal text that reads back as the same float, so 0.64f is written as 0.64
// rather than the double expansion 0.6399999856948853.
std::string float_text(float v) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, res.ptr);
}

double float_for_json(float v) { return std::strtod(float_text(v).c_str(), nullptr); }

std::string value_preview(const json& v) {
  std::string s = v.dump();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

[[noreturn]] void wrong_type(const std::string& src, const char* key, const char* wanted, const json& v) {
  throw Error(src + ": " + key + " must be " + wanted + ", got " + v.type_name() + " " + value_preview(v) +
              ": fix the value in the file");
}

void read_int(const json& j, const std::string& src, const char* key, int& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  const json& v = *it;
  if (v.is_number_integer()) {
    // Unsigned values above INT64_MAX arrive as number_unsigned; compare in the matching type.
    if (v.is_number_unsigned()) {
      auto u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int>::max())) wrong_type(src, key, "an integer that fits in 32 bits", v);
      out = static_cast<int>(u);
      return;
    }
    auto s = v.get<int64_t>();
    if (s < std::numeric_limits<int>::min() || s > std::numeric_limits<int>::max()) {
      wrong_type(src, key, "an integer that fits in 32 bits", v);
    }
    out = static_cast<int>(s);
    return;
  }
  // Some tools write whole numbers as 2048.0.
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && d >= std::numeric_limits<int>::min() &&
        d <= std::numeric_limits<int>::max()) {
      out = static_cast<int>(d);
      return;
    }
  }
  wrong_type(src, key, "an integer", v);
}

void read_bool(const json& j, const std::string& src, const char* key, bool& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  if (!it->is_boolean()) wrong_type(src, key, "true or false", *it);
  out = it->get<bool>();
}

void read_float(const json& j, const std::string& src, const char* key, float& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  if (!it->is_number()) wrong_type(src, key, "a number", *it);
  out = static_cast<float>(it->get<double>());
}

void read_string(const json& j, const std::string& src, const char* key, std::string& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  if (!it->is_string()) wrong_type(src, key, "a string", *it);
  out = it->get<std::string>();
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

float parse_retention_text(const std::string& src, const std::string& piece) {
  std::string t = trim(piece);
  const char* begin = t.c_str();
  char* end = nullptr;
  errno = 0;
  double d = std::strtod(begin, &end);
  if (t.empty() || end != begin + t.size() || errno == ERANGE) {
    throw Error(src + ": downsampling_factor_denominator entry \"" + piece +
                "\" is not a number: write the kept fraction per subsampler, e.g. \"0.64\" or \"0.64,0.5\"");
  }
  return static_cast<float>(d);
}

std::vector<float> read_retentions(const json& j, const std::string& src) {
  const char* key = "downsampling_factor_denominator";
  std::vector<float> out;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return out;
  const json& v = *it;
  if (v.is_number()) {
    out.push_back(static_cast<float>(v.get<double>()));
  } else if (v.is_string()) {
    std::string s = v.get<std::string>();
    if (trim(s).empty()) return out;
    size_t start = 0;
    while (true) {
      size_t comma = s.find(',', start);
      out.push_back(parse_retention_text(src, s.substr(start, comma == std::string::npos ? std::string::npos : comma - start)));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  } else if (v.is_array()) {
    for (const json& e : v) {
      if (e.is_number()) {
        out.push_back(static_cast<float>(e.get<double>()));
      } else if (e.is_string()) {
        out.push_back(parse_retention_text(src, e.get<std::string>()));
      } else {
        wrong_type(src, key, "a list of numbers", v);
      }
    }
  } else {
    wrong_type(src, key, "a number, a string like \"0.64\" or \"0.64,0.5\", or a list", v);
  }
  return out;
}

void validate_named(const ModelConfig& c, const std::string& src) {
  auto positive = [&](int v, const char* key, const char* fix) {
    if (v <= 0) throw Error(src + ": " + key + " (" + std::to_string(v) + ") must be positive: " + fix);
  };
  positive(c.vocab_size, "num_embeddings", "set it to the tokenizer's vocabulary size");
  positive(c.dim, "decoder_embed_dim", "set the model width, e.g. 512");
  positive(c.ffn_dim, "decoder_ffn_embed_dim", "set the SwiGLU hidden size, e.g. 1376 for width 512");
  positive(c.n_layers, "decoder_layers", "set the number of transformer blocks");
  positive(c.n_heads, "decoder_attention_heads", "set the number of attention heads");
  positive(c.context, "tokens_per_sample", "set the context length, e.g. 1024");

  if (c.dim % c.n_heads != 0) {
    throw Error(src + ": decoder_embed_dim (" + std::to_string(c.dim) + ") is not divisible by decoder_attention_heads (" +
                std::to_string(c.n_heads) + "): choose sizes with dim % heads == 0");
  }
  if (c.head_dim() % 2 != 0) {
    throw Error(src + ": head size decoder_embed_dim / decoder_attention_heads = " + std::to_string(c.head_dim()) +
                " is odd: RoPE rotates channel pairs, so choose sizes that give an even head size");
  }

  auto token_id = [&](int v, const char* key) {
    if (v < 0 || v >= c.vocab_size) {
      throw Error(src + ": " + key + " (" + std::to_string(v) + ") is outside [0, num_embeddings = " +
                  std::to_string(c.vocab_size) + "): use an id of the tokenizer's vocabulary");
    }
  };
  token_id(c.padding_idx, "padding_idx");
  token_id(c.bos_token_id, "bos_token_id");
  token_id(c.eos_token_id, "eos_token_id");

  if (!(c.norm_eps > 0.0f) || !std::isfinite(c.norm_eps)) {
    throw Error(src + ": norm_eps (" + float_text(c.norm_eps) + ") must be a small positive number, e.g. 1e-6");
  }
  if (!(c.rope_base > 0.0f) || !std::isfinite(c.rope_base)) {
    throw Error(src + ": rope_base (" + float_text(c.rope_base) + ") must be positive, e.g. 10000");
  }
  if (c.norm_name != "rmsnorm") {
    throw Error(src + ": norm_name \"" + c.norm_name + "\" is not supported: only \"rmsnorm\" is implemented");
  }
  if (c.mlp_name != "swiglu") {
    throw Error(src + ": mlp_name \"" + c.mlp_name + "\" is not supported: only \"swiglu\" is implemented");
  }

  // Parsing spells out the layout, one item per block: a wild decoder_layers (2e9) would
  // allocate gigabytes here, before any size check of the model.
  constexpr int kMaxLayers = 65536;
  if (c.n_layers > kMaxLayers) {
    throw Error(src + ": decoder_layers (" + std::to_string(c.n_layers) + ") is more than " +
                std::to_string(kMaxLayers) + ": set the number of transformer blocks, e.g. 8");
  }
  try {
    c.parse();
  } catch (const Error& e) {
    throw Error(src + ": " + e.what());
  }
}

// unlink rather than remove: if something else (a directory) sits at the temp path, it is not ours.
[[noreturn]] void write_failed(const std::string& path, const std::string& tmp, int err, bool created) {
  if (created) ::unlink(tmp.c_str());
  throw Error("cannot write '" + path + "': " + std::strerror(err) + " (check the output folder)");
}

}  // namespace

std::string ModelConfig::layout() const {
  if (!structure.empty()) return structure;
  return std::string(static_cast<size_t>(n_layers > 0 ? n_layers : 0), 'T');
}

Structure ModelConfig::parse() const { return parse_structure(layout(), n_layers, retentions); }

// validate() has no file name to hand, so errors name the conventional file.
void ModelConfig::validate() const { validate_named(*this, "config.json"); }

ModelConfig config_from_json_text(const std::string& json_text, const std::string& source_name) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1e999
    throw Error(source_name + ": invalid JSON: " + e.what() + " (fix the syntax of the file)");
  }
  if (!j.is_object()) {
    throw Error(source_name + ": the top level must be a JSON object {...}, got " + j.type_name());
  }

  ModelConfig c;
  const std::string& s = source_name;
  read_int(j, s, "num_embeddings", c.vocab_size);
  read_int(j, s, "decoder_embed_dim", c.dim);
  read_int(j, s, "decoder_ffn_embed_dim", c.ffn_dim);
  read_int(j, s, "decoder_layers", c.n_layers);
  read_int(j, s, "decoder_attention_heads", c.n_heads);
  read_int(j, s, "tokens_per_sample", c.context);
  read_int(j, s, "padding_idx", c.padding_idx);
  read_int(j, s, "bos_token_id", c.bos_token_id);
  read_int(j, s, "eos_token_id", c.eos_token_id);
  read_bool(j, s, "tie_weights", c.tie_weights);
  read_string(j, s, "structure", c.structure);
  c.retentions = read_retentions(j, s);
  read_float(j, s, "norm_eps", c.norm_eps);
  read_float(j, s, "rope_base", c.rope_base);
  read_string(j, s, "norm_name", c.norm_name);
  read_string(j, s, "mlp_name", c.mlp_name);

  validate_named(c, source_name);
  return c;
}

std::string config_to_json_text(const ModelConfig& c) {
  // Ordered so the file reads like the official configs.
  nlohmann::ordered_json j;
  j["num_embeddings"] = c.vocab_size;
  j["decoder_embed_dim"] = c.dim;
  j["decoder_ffn_embed_dim"] = c.ffn_dim;
  j["decoder_layers"] = c.n_layers;
  j["decoder_attention_heads"] = c.n_heads;
  j["norm_name"] = c.norm_name;
  j["mlp_name"] = c.mlp_name;
  j["tokens_per_sample"] = c.context;
  j["padding_idx"] = c.padding_idx;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  if (!c.retentions.empty()) {
    std::string r;
    for (size_t i = 0; i < c.retentions.size(); ++i) {
      if (i) r += ',';
      r += float_text(c.retentions[i]);
    }
    j["downsampling_factor_denominator"] = r;
  }
  j["tie_weights"] = c.tie_weights;
  j["structure"] = c.layout();
  j["norm_eps"] = float_for_json(c.norm_eps);
  j["rope_base"] = float_for_json(c.rope_base);
  return j.dump(2);
}

ModelConfig load_config(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    throw Error("cannot read config '" + path + "': " + std::strerror(errno) +
                " (check the path; a model folder holds config.json)");
  }
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  bool failed = std::ferror(f) != 0;
  int err = errno;
  std::fclose(f);
  if (failed) throw Error("cannot read config '" + path + "': " + std::strerror(err) + " (is it a regular file?)");
  return config_from_json_text(text, path);
}

void save_config(const ModelConfig& c, const std::string& path) {
  std::string text = config_to_json_text(c) + "\n";
  std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) write_failed(path, tmp, errno, false);
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  int err = errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (!ok) write_failed(path, tmp, err, true);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) write_failed(path, tmp, errno, true);
}

}  // namespace subllm
