// config.json with the official SUBLLM key names (every key the authors' config class reads),
// plus norm_eps, rope_base, subllm_format and rope_positions of our own; other keys are kept and written back.
#include <unistd.h>

#include <algorithm>
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

// The authors' `downsampling_factor`: a list of factors 1/r, one for every subsampler or one per
// subsampler in `(` order. Their config class lets it override downsampling_factor_denominator
// (which their parser reads as one number), so a model whose subsamplers keep different fractions
// is written with both. Empty when the key is absent.
std::vector<float> read_factors(const json& j, const std::string& src) {
  const char* key = "downsampling_factor";
  std::vector<float> out;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return out;
  const json list = it->is_array() ? *it : json::array({*it});
  for (const json& e : list) {
    if (!e.is_number() || !(e.get<double>() >= 1.0) || !std::isfinite(e.get<double>())) {
      throw Error(src + ": downsampling_factor entry " + value_preview(e) +
                  " must be a number >= 1 (1 / the fraction a subsampler keeps, e.g. 1.5625 for 0.64)");
    }
    out.push_back(static_cast<float>(1.0 / e.get<double>()));
  }
  if (out.empty()) throw Error(src + ": downsampling_factor is an empty list: give one factor per subsampler or remove the key");
  return out;
}

// Elements of the flat parameter buffer, or an Error naming `src` and the keys on overflow.
int64_t count_params(const ModelConfig& c, const std::string& src) {
  bool overflow = false;
  auto mul = [&](int64_t a, int64_t b) {
    int64_t r = 0;
    overflow |= __builtin_mul_overflow(a, b, &r);
    return r;
  };
  auto add = [&](int64_t a, int64_t b) {
    int64_t r = 0;
    overflow |= __builtin_add_overflow(a, b, &r);
    return r;
  };
  // Mirrors the layout Weights builds: tensors padded to 16 elements, except q and k, which
  // stay back to back with v.
  auto padded = [&](int64_t n) { return add(n, 15) / 16 * 16; };
  const int64_t C = c.dim, F = c.ffn_dim, V = c.vocab_size;
  const int64_t subsamplers = std::count(c.structure.begin(), c.structure.end(), '(');
  const int64_t CC = mul(C, C);
  // k and v are kv_heads * head_dim wide (grouped-query attention); C without it.
  const int64_t KV = c.n_heads > 0 && c.n_kv_heads > 0 ? C / c.n_heads * c.n_kv_heads : C;
  const int64_t CKV = mul(KV, C);
  int64_t block = add(add(CC, CKV), padded(CKV));                      // q, k, v
  block = add(block, add(padded(CC), mul(2, padded(C))));              // out_proj, both norms
  block = add(block, add(padded(mul(mul(2, F), C)), padded(mul(C, F))));  // w12, w3
  if (c.qk_bias) block = add(block, padded(add(C, KV)));              // q and k biases
  int64_t total = add(padded(mul(V, C)), mul(c.n_layers, block));
  total = add(total, mul(add(mul(2, subsamplers), 1), padded(C)));    // scores, bypasses, final norm
  if (!c.tie_weights) total = add(total, padded(mul(V, C)));
  if (overflow || total < 0) {
    throw Error(src + ": the parameter count overflows 64 bits (decoder_layers " + std::to_string(c.n_layers) +
                " blocks of decoder_embed_dim " + std::to_string(c.dim) + " and decoder_ffn_embed_dim " +
                std::to_string(c.ffn_dim) + ", num_embeddings " + std::to_string(c.vocab_size) +
                "): choose sizes a machine can hold");
  }
  return total;
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
  auto at_most = [&](int v, int limit, const char* key, const char* why) {
    if (v > limit) {
      throw Error(src + ": " + key + " (" + std::to_string(v) + ") is above the limit of " + std::to_string(limit) +
                  " (" + why + "): choose a smaller value");
    }
  };
  at_most(c.n_layers, ModelConfig::kMaxLayers, "decoder_layers", "far more blocks than any trained transformer");
  at_most(c.dim, ModelConfig::kMaxDim, "decoder_embed_dim", "the fused q|k|v weight has 3 x this many rows");
  at_most(c.ffn_dim, ModelConfig::kMaxFfnDim, "decoder_ffn_embed_dim", "the fused w12 weight has 2 x this many rows");

  if (c.dim % c.n_heads != 0) {
    throw Error(src + ": decoder_embed_dim (" + std::to_string(c.dim) + ") is not divisible by decoder_attention_heads (" +
                std::to_string(c.n_heads) + "): choose sizes with dim % heads == 0");
  }
  if (c.n_kv_heads < 0 || (c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads != 0)) {
    throw Error(src + ": decoder_kv_heads (" + std::to_string(c.n_kv_heads) + ") does not divide decoder_attention_heads (" +
                std::to_string(c.n_heads) +
                "): grouped-query attention shares each key/value head among an equal number of query heads; "
                "use a divisor of the head count (1 = multi-query, the head count or no key = multi-head)");
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
    throw Error(src + ": norm_eps (" + float_text(c.norm_eps) + ") must be a small positive number, e.g. 1e-5");
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

  try {
    c.parse();
  } catch (const Error& e) {
    throw Error(src + ": " + e.what());
  }
  // After the structure: a bad structure string is the clearer message.
  count_params(c, src);
}

// unlink rather than remove: if something else (a directory) sits at the temp path, it is not ours.
[[noreturn]] void write_failed(const std::string& path, const std::string& tmp, int err, bool created) {
  if (created) ::unlink(tmp.c_str());
  throw Error("cannot write '" + path + "': " + std::strerror(err) + " (check the output folder)");
}

// Keys this file reads into ModelConfig fields; the rest are kept as they are (kept_keys).
bool is_read_key(const std::string& key) {
  static const char* const kRead[] = {
      "num_embeddings", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_layers", "decoder_attention_heads",
      "tokens_per_sample", "padding_idx", "bos_token_id", "eos_token_id", "tie_weights", "structure",
      "downsampling_factor_denominator", "downsampling_factor", "norm_eps", "rope_base", "norm_name", "mlp_name",
      "subllm_format", "qk_bias", "hidden_size", "rope_positions", "decoder_kv_heads"};
  for (const char* k : kRead)
    if (key == k) return true;
  return false;
}

// The authors' keys that do not change the math of their model (their inference code ignores
// them or only picks a kernel), with the value written when a config does not have them.
// n_positions is written as tokens_per_sample when absent.
const std::vector<std::pair<const char*, json>>& authors_kept_keys() {
  static const std::vector<std::pair<const char*, json>> keys = {
      {"use_fused", false}, {"attn_type", "vanilla"}, {"n_positions", nullptr}, {"scale_token_embedding", false},
      {"use_flash", false}, {"qkv_pack", false},      {"fix_zh", false}};
  return keys;
}

// The authors' keys whose other values would change the math beyond this model: refused
// rather than ignored. Aliases of their config class (hidden_size, vocab_size, n_layer, n_head
// override the key they name) must agree with it.
void check_authors_keys(const json& j, const std::string& s, const ModelConfig& c) {
  bool bias = false, no_scale_embedding = true;
  read_bool(j, s, "bias", bias);
  if (bias) throw Error(s + ": bias true (biases on every projection) is not supported: use a model without biases");
  read_bool(j, s, "no_scale_embedding", no_scale_embedding);
  if (!no_scale_embedding) {
    throw Error(s + ": no_scale_embedding false (embeddings scaled by sqrt(width)) is not supported: "
                    "use a model with unscaled embeddings (no_scale_embedding true, the default)");
  }
  std::string attn = "vanilla";
  read_string(j, s, "attn_type", attn);
  if (attn != "vanilla" && attn != "flash") {
    throw Error(s + ": attn_type \"" + attn + "\" is not known: \"vanilla\" and \"flash\" (the same attention) are");
  }
  for (const char* key : {"use_fused", "scale_token_embedding", "use_flash", "qkv_pack", "fix_zh"}) {
    bool ignored = false;
    read_bool(j, s, key, ignored);
  }
  int n_positions = 0;
  read_int(j, s, "n_positions", n_positions);
  const std::pair<const char*, int> aliases[] = {{"hidden_size", c.dim},
                                                 {"vocab_size", c.vocab_size},
                                                 {"n_layer", c.n_layers},
                                                 {"n_head", c.n_heads}};
  const char* const named[] = {"decoder_embed_dim", "num_embeddings", "decoder_layers", "decoder_attention_heads"};
  for (size_t i = 0; i < 4; ++i) {
    int v = aliases[i].second;
    read_int(j, s, aliases[i].first, v);
    if (v != aliases[i].second) {
      throw Error(s + ": " + aliases[i].first + " (" + std::to_string(v) + ") differs from " + named[i] + " (" +
                  std::to_string(aliases[i].second) + "); the authors' code reads " + aliases[i].first +
                  " as " + named[i] + ": make them equal");
    }
  }
}

// subllm_format, or for a config without it a guess from the keys: ours always had norm_eps
// and rope_base and none of the authors' own keys; theirs have the reverse. 0 when neither.
int read_bypass_numbering(const json& j, const std::string& s) {
  auto it = j.find("subllm_format");
  if (it != j.end() && !it->is_null()) {
    int v = 0;
    read_int(j, s, "subllm_format", v);
    if (v != 1 && v != 2) {
      throw Error(s + ": subllm_format " + std::to_string(v) +
                  " is not known: 2 = bypasses numbered by ')' (the authors' numbering, what subllm writes), "
                  "1 = numbered by '(' (subllm before format 2)");
    }
    return v;
  }
  const bool ours = j.contains("norm_eps") || j.contains("rope_base");
  bool theirs = false;
  for (const char* key : {"qk_bias", "hidden_size", "attn_type", "use_fused", "n_positions", "scale_token_embedding"})
    theirs = theirs || j.contains(key);
  if (ours == theirs) return 0;
  return ours ? 1 : 2;
}

// rope_positions: "parent" or "original". Without the key, a config that is recognisably ours
// (subllm_format or our keys) was written before the key existed, when subllm used original
// positions: it keeps them, so its checkpoints keep their results. Any other config (the
// authors', or one that says neither) gets the authors' rule.
bool read_rope_parent_positions(const json& j, const std::string& s) {
  auto it = j.find("rope_positions");
  if (it == j.end() || it->is_null()) {
    const bool ours = j.contains("subllm_format") || j.contains("norm_eps") || j.contains("rope_base");
    return !ours;
  }
  std::string v;
  read_string(j, s, "rope_positions", v);
  if (v != "parent" && v != "original") {
    throw Error(s + ": rope_positions \"" + v +
                "\" is not known: \"parent\" = a subsampled token's position is its row in the parent "
                "segment (the authors' rule), \"original\" = its position in the full sequence");
  }
  return v == "parent";
}

}  // namespace

std::string ModelConfig::layout() const {
  if (!structure.empty()) return structure;
  return std::string(static_cast<size_t>(n_layers > 0 ? n_layers : 0), 'T');
}

Structure ModelConfig::parse() const { return parse_structure(layout(), n_layers, retentions); }

void ModelConfig::validate() const { validate_named(*this, source); }

int64_t ModelConfig::param_count() const { return count_params(*this, source); }

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
  c.source = source_name;
  const std::string& s = source_name;
  read_int(j, s, "num_embeddings", c.vocab_size);
  read_int(j, s, "decoder_embed_dim", c.dim);
  read_int(j, s, "decoder_ffn_embed_dim", c.ffn_dim);
  read_int(j, s, "decoder_layers", c.n_layers);
  read_int(j, s, "decoder_attention_heads", c.n_heads);
  if (j.contains("decoder_kv_heads") && !j["decoder_kv_heads"].is_null()) {
    int kv = 0;
    read_int(j, s, "decoder_kv_heads", kv);
    if (kv <= 0) {
      throw Error(s + ": decoder_kv_heads (" + std::to_string(kv) +
                  ") must be positive: the number of key/value heads, a divisor of decoder_attention_heads");
    }
    c.n_kv_heads = kv == c.n_heads ? 0 : kv;  // one form for plain multi-head attention
  }
  read_int(j, s, "tokens_per_sample", c.context);
  read_int(j, s, "padding_idx", c.padding_idx);
  read_int(j, s, "bos_token_id", c.bos_token_id);
  read_int(j, s, "eos_token_id", c.eos_token_id);
  read_bool(j, s, "tie_weights", c.tie_weights);
  // Absent means true, as in the authors' config class (their published configs say false),
  // except in files of subllm (known by its own keys), which had no biases before it wrote the key.
  c.qk_bias = !(j.contains("norm_eps") || j.contains("rope_base") || j.contains("subllm_format"));
  read_bool(j, s, "qk_bias", c.qk_bias);
  read_string(j, s, "structure", c.structure);
  c.retentions = read_retentions(j, s);
  std::vector<float> factors = read_factors(j, s);
  if (!factors.empty()) c.retentions = factors;
  read_float(j, s, "norm_eps", c.norm_eps);
  read_float(j, s, "rope_base", c.rope_base);
  read_string(j, s, "norm_name", c.norm_name);
  read_string(j, s, "mlp_name", c.mlp_name);
  c.bypass_numbering = read_bypass_numbering(j, s);
  c.rope_parent_positions = read_rope_parent_positions(j, s);
  check_authors_keys(j, s, c);
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!is_read_key(it.key())) c.kept_keys.emplace_back(it.key(), it.value().dump());

  validate_named(c, source_name);
  return c;
}

std::string config_to_json_text(const ModelConfig& c, bool authors_keys_only) {
  // Ordered like the authors' published configs.
  nlohmann::ordered_json j;
  auto kept = [&](const std::string& key) -> const std::string* {
    for (const auto& [k, v] : c.kept_keys)
      if (k == key) return &v;
    return nullptr;
  };
  auto put_kept = [&](const char* key, const json& fallback) {
    const std::string* v = kept(key);
    j[key] = v ? nlohmann::ordered_json::parse(*v) : nlohmann::ordered_json(fallback);
  };
  j["num_embeddings"] = c.vocab_size;
  j["decoder_embed_dim"] = c.dim;
  j["decoder_ffn_embed_dim"] = c.ffn_dim;
  j["hidden_size"] = c.dim;
  j["decoder_layers"] = c.n_layers;
  j["decoder_attention_heads"] = c.n_heads;
  // Ours (the authors' code has no grouped-query attention); written only when it applies.
  if (c.kv_heads() != c.n_heads) j["decoder_kv_heads"] = c.kv_heads();
  j["norm_name"] = c.norm_name;
  j["mlp_name"] = c.mlp_name;
  j["qk_bias"] = c.qk_bias;  // always written: the authors' class defaults a missing key to true
  for (const auto& [key, fallback] : authors_kept_keys()) {
    if (std::string(key) == "n_positions") {
      j["tokens_per_sample"] = c.context;
      put_kept(key, c.context);
      j["padding_idx"] = c.padding_idx;
      j["bos_token_id"] = c.bos_token_id;
      j["eos_token_id"] = c.eos_token_id;
    } else {
      put_kept(key, fallback);
    }
  }
  if (!c.retentions.empty()) {
    // Their parser reads one number here; different fractions per subsampler go into the
    // factor list, which their config class lets override it.
    j["downsampling_factor_denominator"] = float_text(c.retentions[0]);
    if (std::any_of(c.retentions.begin(), c.retentions.end(), [&](float r) { return r != c.retentions[0]; })) {
      nlohmann::ordered_json factors = nlohmann::ordered_json::array();
      for (float r : c.retentions) factors.push_back(1.0 / static_cast<double>(r));
      j["downsampling_factor"] = factors;
    }
  }
  j["tie_weights"] = c.tie_weights;
  j["structure"] = c.layout();
  if (!authors_keys_only) {
    j["norm_eps"] = float_for_json(c.norm_eps);
    j["rope_base"] = float_for_json(c.rope_base);
    j["subllm_format"] = 2;
    j["rope_positions"] = c.rope_parent_positions ? "parent" : "original";
  }
  for (const auto& [key, value] : c.kept_keys)
    if (!j.contains(key)) j[key] = nlohmann::ordered_json::parse(value);
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
