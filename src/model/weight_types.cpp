// Inference weight types: the matrices of a Weights in BF16 or Q8 for the kernels that read
// them, the master buffer left with the small tensors, and the typed model.safetensors that
// `subllm quantize` writes and inference loads without quantizing again.
//
// The typed file: metadata "subllm_weight_type" = "bf16" | "q8" (and "subllm_q8_group" = "32");
// every tensor under its official name. Typed matrices: BF16 tensors of their shape; for q8 the
// int8 values as an I8 tensor of the matrix's shape and its scales as "<name>.q8_scale", F32
// (rows, cols / 32): element (r, c) is q8_scale[r, c / 32] * value[r, c]. Under q8 an untied
// embedding is BF16. Everything else (norms, score weights, bypass scales) is F32.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/backend.h"
#include "kernels/quant_kernels.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/safetensors.h"

namespace subllm {

namespace {

const std::string kWeightTypeKey = "subllm_weight_type";
const std::string kScaleSuffix = ".q8_scale";

std::string type_name(DType dt) {
  switch (dt) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::Q8: return "q8";
    default: return dtype_name(dt);
  }
}

bool is_matrix(const ParamInfo& p) { return p.shape.size() == 2 && p.shape[0] > 1 && p.shape[1] > 1; }

}  // namespace

std::string weight_file_type(const std::string& safetensors_path) {
  SafetensorsFile f(safetensors_path);
  auto it = f.metadata().find(kWeightTypeKey);
  return it == f.metadata().end() ? "f32" : it->second;
}

const Weights::TypedMatrix* Weights::typed_at(int64_t offset) const {
  auto it = std::lower_bound(typed_.begin(), typed_.end(), offset,
                             [](const TypedMatrix& m, int64_t o) { return m.offset < o; });
  return it != typed_.end() && it->offset == offset ? &*it : nullptr;
}

const void* Weights::matrix_data(int64_t offset, DType* dt) const {
  const TypedMatrix* m = typed_at(offset);
  if (!m) return nullptr;
  if (dt) *dt = m->dtype;
  return static_cast<const char*>(typed_buf_.raw()) + m->byte_offset;
}

double Weights::read_bytes(Span s) const {
  double bytes = 0;
  for (const ParamInfo& p : params_) {
    if (p.offset < s.first || p.offset >= s.last) continue;
    const TypedMatrix* m = typed_at(p.offset);
    bytes += m ? (double)m->bytes : (double)p.numel * (double)dtype_size(compute_dtype_);
  }
  return bytes;
}

void Weights::set_weight_dtype(DType dt) {
  if (dt == weight_dtype_) return;
  check(weight_dtype_ == DType::F32, "the weights already have an inference type (" + type_name(weight_dtype_) +
                                         "); load the model again for another");
  check(dt == DType::F32 || dt == DType::BF16 || dt == DType::Q8,
        "inference weight types are f32, bf16 and q8, not " + type_name(dt));
  if (dt == compute_dtype_) return;  // the compute copy already is of that type (bf16 on a GPU)
  check(dt != DType::F32, "--dtype f32 on the " + std::string(backend_->name()) + " backend: its kernels read " +
                              type_name(compute_dtype_) + " weights (use --device cuda:fp32 for f32)");
  check(backend_->takes_weight_dtype(dt), "--dtype " + type_name(dt) + " is a CPU inference type: the " +
                                              backend_->name() + " backend has no kernels for it (use --device cpu, "
                                              "or leave --dtype out)");
  if (dt == DType::Q8) {
    check(cfg_.dim % kernels::kQ8Group == 0 && cfg_.ffn_dim % kernels::kQ8Group == 0,
          "--dtype q8 needs decoder_embed_dim and decoder_ffn_embed_dim that are multiples of 32 (this model has " +
              std::to_string(cfg_.dim) + " and " + std::to_string(cfg_.ffn_dim) + "): use --dtype bf16");
  }
  std::vector<TypedMatrix> typed;
  size_t bytes = 0;
  for (const ParamInfo& p : params_) {
    if (!is_matrix(p)) continue;
    TypedMatrix m;
    m.offset = p.offset;
    m.rows = p.shape[0];
    m.cols = p.shape[1];
    // The output head is read whole for every token, so it takes the type; an untied
    // embedding is read one row per token, so BF16 costs no speed and keeps its rows closer.
    const bool untied_embedding = p.offset == embed_offset_ && !cfg_.tie_weights;
    m.dtype = dt == DType::Q8 && untied_embedding ? DType::BF16 : dt;
    m.byte_offset = bytes;
    m.bytes = m.dtype == DType::Q8 ? (size_t)m.rows * kernels::q8_row_bytes(m.cols)
                                   : (size_t)m.rows * m.cols * dtype_size(m.dtype);
    // q, k and v stay back to back (one (3C, C) matrix); other matrices start on 64 bytes.
    const bool fused_next = p.name.find("q_proj.weight") != std::string::npos ||
                            p.name.find("k_proj.weight") != std::string::npos;
    bytes += fused_next ? m.bytes : (m.bytes + 63) / 64 * 64;
    typed.push_back(m);
  }
  std::sort(typed.begin(), typed.end(), [](const TypedMatrix& a, const TypedMatrix& b) { return a.offset < b.offset; });
  typed_buf_ = backend_->empty({(int64_t)std::max<size_t>(bytes, 1)}, DType::U8);
  typed_ = std::move(typed);
  // A fresh, untouched master buffer: only the small tensors are written to it.
  buf_ = backend_->empty({num_params_});
  for (const ParamInfo& p : params_)
    if (!typed_at(p.offset)) backend_->zero(data() + p.offset, sizeof(float) * p.numel);
  weight_dtype_ = dt;
}

void Weights::upload(const std::vector<float>& host) {
  if (typed_.empty()) {
    backend_->to_device(data(), host.data(), sizeof(float) * host.size());
    params_changed();
    return;
  }
  for (const ParamInfo& p : params_) {
    const float* src = host.data() + p.offset;
    if (const TypedMatrix* m = typed_at(p.offset)) {
      DType dt;
      void* dst = const_cast<void*>(matrix_data(p.offset, &dt));
      backend_->convert(mat(src, m->rows, m->cols), View{dst, dt, m->rows, m->cols, m->cols});
    } else {
      backend_->to_device(data() + p.offset, src, sizeof(float) * p.numel);
    }
  }
}

bool Weights::load_typed(const SafetensorsFile& f) {
  auto it = f.metadata().find(kWeightTypeKey);
  if (it == f.metadata().end()) return false;
  const std::string& type = it->second;
  check(type == "bf16" || type == "q8",
        f.path() + ": metadata " + kWeightTypeKey + " is '" + type + "', which this subllm does not know (bf16, q8)");
  if (weight_dtype_ == DType::F32 && compute_dtype_ == DType::F32)
    throw Error(f.path() + " holds " + type +
                " inference weights (written by `subllm quantize`): training cannot start from or resume them, "
                "and f32 inference cannot read them; train or run from the fp32 checkpoint it was made from");
  if (type_name(weight_dtype_) != type)
    throw Error(f.path() + " holds " + type + " weights, which load only as --dtype " + type +
                " (converting them again would lose more): leave --dtype out, or start from the fp32 checkpoint");
  if (type == "q8") {
    auto g = f.metadata().find("subllm_q8_group");
    check(g != f.metadata().end() && g->second == std::to_string(kernels::kQ8Group),
          f.path() + ": q8 weights without \"subllm_q8_group\": \"32\" in their metadata (the file is damaged)");
  }
  for (const std::string& name : f.names()) {
    const bool scale = name.size() > kScaleSuffix.size() &&
                       name.compare(name.size() - kScaleSuffix.size(), kScaleSuffix.size(), kScaleSuffix) == 0;
    const std::string base = scale ? name.substr(0, name.size() - kScaleSuffix.size()) : name;
    const bool known = std::any_of(params_.begin(), params_.end(), [&](const ParamInfo& p) {
      if (p.name != base) return false;
      const TypedMatrix* m = typed_at(p.offset);
      return !scale || (m && m->dtype == DType::Q8);
    });
    check(known, f.path() + ": tensor '" + name + "' has no place in this model: the file does not match config.json");
  }
  std::vector<float> small;
  std::vector<uint8_t> rows;
  for (const ParamInfo& p : params_) {
    check(f.has(p.name), f.path() + ": tensor '" + p.name + "' is missing: the file does not match config.json");
    const SafetensorsEntry& e = f.get(p.name);
    const TypedMatrix* m = typed_at(p.offset);
    const DType want = !m ? DType::F32 : m->dtype == DType::Q8 ? DType::I8 : m->dtype;
    if (e.dtype != want || e.shape != p.shape)
      throw Error(f.path() + ": tensor '" + p.name + "' is " + dtype_name(e.dtype) + " " + shape_str(e.shape) +
                  ", but a " + type + " model needs " + dtype_name(want) + " " + shape_str(p.shape) +
                  " there: the file is damaged or does not match config.json");
    if (!m) {
      small.resize((size_t)p.numel);
      f.read_f32(p.name, p.shape, small.data());
      for (float v : small)
        check(std::isfinite(v), f.path() + ": tensor '" + p.name + "' holds NaN or infinity: the file is damaged");
      backend_->to_device(data() + p.offset, small.data(), sizeof(float) * small.size());
      continue;
    }
    void* dst = const_cast<void*>(matrix_data(p.offset, nullptr));
    if (m->dtype == DType::BF16) {
      backend_->to_device(dst, e.data, m->bytes);
      continue;
    }
    // Q8: values and scales, packed into rows of q8_row_bytes.
    const std::string sname = p.name + kScaleSuffix;
    const int64_t groups = m->cols / kernels::kQ8Group;
    check(f.has(sname), f.path() + ": tensor '" + sname + "' (the scales of " + p.name + ") is missing");
    const SafetensorsEntry& se = f.get(sname);
    check(se.dtype == DType::F32 && se.shape == Shape{m->rows, groups},
          f.path() + ": tensor '" + sname + "' must be F32 " + shape_str({m->rows, groups}) + ", it is " +
              dtype_name(se.dtype) + " " + shape_str(se.shape));
    std::vector<float> scales((size_t)(m->rows * groups));
    std::memcpy(scales.data(), se.data, sizeof(float) * scales.size());
    for (float s : scales)
      check(std::isfinite(s) && s >= 0,
            f.path() + ": tensor '" + sname + "' holds a negative, NaN or infinite scale: the file is damaged");
    rows.resize(m->bytes);
    kernels::pack_q8(static_cast<const int8_t*>(e.data), scales.data(), m->rows, (int)m->cols, rows.data());
    backend_->to_device(dst, rows.data(), rows.size());
  }
  params_changed();
  return true;
}

void Weights::save_typed(const std::string& path) const {
  std::vector<float> host((size_t)num_params_);
  std::vector<std::vector<uint8_t>> blobs;  // typed matrices, and the values and scales of Q8 ones
  blobs.reserve(2 * typed_.size());
  std::vector<SafetensorsOut> out;
  for (const ParamInfo& p : params_) {
    const TypedMatrix* m = typed_at(p.offset);
    if (!m) {
      backend_->to_host(host.data() + p.offset, data() + p.offset, sizeof(float) * p.numel);
      out.push_back({p.name, DType::F32, p.shape, host.data() + p.offset});
      continue;
    }
    std::vector<uint8_t> bytes(m->bytes);
    backend_->to_host(bytes.data(), matrix_data(p.offset, nullptr), m->bytes);
    if (m->dtype == DType::BF16) {
      blobs.push_back(std::move(bytes));
      out.push_back({p.name, DType::BF16, p.shape, blobs.back().data()});
      continue;
    }
    const int64_t groups = m->cols / kernels::kQ8Group;
    std::vector<uint8_t> values((size_t)(m->rows * m->cols)), scales((size_t)(m->rows * groups) * sizeof(float));
    kernels::unpack_q8(bytes.data(), m->rows, (int)m->cols, reinterpret_cast<int8_t*>(values.data()),
                       reinterpret_cast<float*>(scales.data()));
    blobs.push_back(std::move(values));
    out.push_back({p.name, DType::I8, p.shape, blobs.back().data()});
    blobs.push_back(std::move(scales));
    out.push_back({p.name + kScaleSuffix, DType::F32, {m->rows, groups}, blobs.back().data()});
  }
  std::map<std::string, std::string> meta{
      {"format", "pt"}, {"subllm_format", "2"}, {kWeightTypeKey, type_name(weight_dtype_)}};
  if (weight_dtype_ == DType::Q8) meta["subllm_q8_group"] = std::to_string(kernels::kQ8Group);
  write_safetensors(path, out, meta);
}

}  // namespace subllm
