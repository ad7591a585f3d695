#include "subllm/scaled_adam.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "subllm/error.h"
#include "subllm/safetensors.h"

namespace subllm {

namespace {

// Reductions are summed per fixed-size chunk and then in chunk order (by the kernels), so
// results are the same for any thread count.
constexpr int64_t kChunk = 4096;

// Ascending, NaN last (as torch.sort does), so a window with a few NaNs still has a
// meaningful median.
bool norm_less(float a, float b) {
  if (std::isnan(a)) return false;
  if (std::isnan(b)) return true;
  return a < b;
}

std::string exact_double(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%a", x);
  return buf;
}

}  // namespace

ScaledAdam::ScaledAdam(const std::vector<ParamInfo>& params, int64_t total_elements, ScaledAdamOptions opt,
                       Backend* backend)
    : opt_(opt), params_(params), total_(total_elements), be_(backend ? backend : &cpu_backend()) {
  check(!params_.empty(), "ScaledAdam: no parameters to optimize");
  check(opt_.size_update_period >= 1,
        "ScaledAdam: size_update_period must be >= 1 (got " + std::to_string(opt_.size_update_period) + ")");
  check(opt_.clipping_update_period >= 1,
        "ScaledAdam: clipping_update_period must be >= 1 (got " + std::to_string(opt_.clipping_update_period) + ")");
  check(opt_.beta1 >= 0 && opt_.beta1 < 1 && opt_.beta2 > 0 && opt_.beta2 < 1,
        "ScaledAdam: betas must satisfy 0 <= beta1 < 1 and 0 < beta2 < 1");
  std::vector<int32_t> chunk_tensor;
  std::vector<int64_t> chunk_begin, chunk_end;
  std::vector<uint8_t> clamp_tensor;
  for (size_t t = 0; t < params_.size(); ++t) {
    const ParamInfo& p = params_[t];
    check(p.numel > 0 && p.offset >= 0 && p.offset + p.numel <= total_,
          "ScaledAdam: parameter '" + p.name + "' (offset " + std::to_string(p.offset) + ", " +
              std::to_string(p.numel) + " elements) does not fit the " + std::to_string(total_) +
              "-element buffer");
    for (int64_t b = p.offset; b < p.offset + p.numel; b += kChunk) {
      chunk_tensor.push_back((int32_t)t);
      chunk_begin.push_back(b);
      chunk_end.push_back(std::min(b + kChunk, p.offset + p.numel));
    }
    clamp_tensor.push_back(p.numel == 1 ? 1 : 0);
  }
  const int64_t nc = (int64_t)chunk_tensor.size(), nt = (int64_t)params_.size();
  auto upload = [&](const auto& host, DType dt) {
    Tensor t = be_->zeros({(int64_t)host.size()}, dt);
    be_->to_device(t.raw(), host.data(), t.nbytes());
    return t;
  };
  chunk_tensor_ = upload(chunk_tensor, DType::I32);
  chunk_begin_ = upload(chunk_begin, DType::I64);
  chunk_end_ = upload(chunk_end, DType::I64);
  clamp_tensor_ = upload(clamp_tensor, DType::U8);
  sums_dev_ = be_->zeros({nt, 3}, DType::F64);
  sums_scratch_ = be_->zeros({(int64_t)be_->optim_sums_scratch_bytes((int)nc)}, DType::U8);
  step_coef_dev_ = be_->zeros({nt});
  scale_step_dev_ = be_->zeros({nt});
  sums_.assign(params_.size() * 3, 0.0);
  step_coef_.assign(params_.size(), 0.f);
  scale_step_.assign(params_.size(), 0.f);
  exp_avg_sq_ = be_->zeros({total_});
  momentum_ = be_->zeros({total_});
  lo_ = 0;
  hi_ = total_;
  local_tensor_ = chunk_tensor_;
  local_begin_ = chunk_begin_;
  local_end_ = chunk_end_;
  param_rms_.assign(params_.size(), 0.f);
  scale_exp_avg_sq_.assign(params_.size(), 0.f);
  scale_grads_.assign(params_.size() * opt_.size_update_period, 0.f);
  // Clipping groups: by lr_scale in order of first appearance, or one group of everything.
  group_of_.assign(params_.size(), 0);
  for (size_t t = 0; t < params_.size(); ++t) {
    size_t gi = 0;
    if (opt_.clipping == Clipping::per_group)
      while (gi < groups_.size() && groups_[gi].lr_scale != params_[t].lr_scale) ++gi;
    if (gi == groups_.size()) {
      groups_.emplace_back();
      groups_.back().lr_scale = params_[t].lr_scale;
      groups_.back().norms.assign(opt_.clipping_update_period, 0.f);
    }
    groups_[gi].tensors.push_back((int)t);
    groups_[gi].elements += params_[t].numel;
    group_of_[t] = (int)gi;
  }
  for (size_t gi = 0; gi < groups_.size(); ++gi)
    if (groups_[gi].elements > groups_[main_group_].elements) main_group_ = (int)gi;
  // Each group's own chunk tables, for scaling its gradients (one group uses the full ones).
  if (groups_.size() > 1) {
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      ClipGroup& grp = groups_[gi];
      std::vector<int32_t> gt;
      std::vector<int64_t> gb, ge;
      for (size_t c = 0; c < chunk_tensor.size(); ++c)
        if (group_of_[chunk_tensor[c]] == (int)gi) {
          gt.push_back(chunk_tensor[c]);
          gb.push_back(chunk_begin[c]);
          ge.push_back(chunk_end[c]);
        }
      grp.chunk_tensor = upload(gt, DType::I32);
      grp.chunk_begin = upload(gb, DType::I64);
      grp.chunk_end = upload(ge, DType::I64);
    }
  }
}

void ScaledAdam::shard(Communicator& comm) {
  check(!comm_ && step_ == 0, "ScaledAdam::shard: call it once, before the first step and before load_state");
  const int ranks = comm.size(), rank = comm.rank();
  if (ranks <= 1) return;
  const int64_t nc = chunk_tensor_.numel();
  std::vector<int32_t> tensor(nc);
  std::vector<int64_t> begin(nc), end(nc);
  be_->to_host(tensor.data(), chunk_tensor_.raw(), chunk_tensor_.nbytes());
  be_->to_host(begin.data(), chunk_begin_.raw(), chunk_begin_.nbytes());
  be_->to_host(end.data(), chunk_end_.raw(), chunk_end_.nbytes());
  // before[c]: parameter elements in chunks 0..c-1. Rank r's first chunk is the one whose
  // start is nearest to r/ranks of them (never before rank r-1's).
  std::vector<int64_t> before(nc + 1, 0);
  for (int64_t c = 0; c < nc; ++c) before[c + 1] = before[c] + (end[c] - begin[c]);
  std::vector<int64_t> first(ranks + 1, 0);
  first[ranks] = nc;
  for (int r = 1; r < ranks; ++r) {
    const double target = (double)before[nc] * r / ranks;
    const auto at = std::lower_bound(before.begin() + first[r - 1], before.end(), (int64_t)std::ceil(target));
    int64_t c = std::min<int64_t>(at - before.begin(), nc);
    if (c > first[r - 1] && target - (double)before[c - 1] < (double)before[c] - target) --c;
    first[r] = c;
  }
  // Element bounds: a slice runs from its first chunk's start to the next slice's (gaps
  // between tensors, if any, go with the chunk before them).
  bounds_.assign(ranks + 1, total_);
  bounds_[0] = 0;
  for (int r = 1; r < ranks; ++r) bounds_[r] = first[r] < nc ? begin[first[r]] : total_;
  lo_ = bounds_[rank];
  hi_ = bounds_[rank + 1];
  std::vector<int32_t> lt(tensor.begin() + first[rank], tensor.begin() + first[rank + 1]);
  std::vector<int64_t> lb, le;
  for (int64_t c = first[rank]; c < first[rank + 1]; ++c) {
    lb.push_back(begin[c] - lo_);
    le.push_back(end[c] - lo_);
  }
  auto upload = [&](const auto& host, DType dt) {
    if (host.empty()) return Tensor();
    Tensor t = be_->zeros({(int64_t)host.size()}, dt);
    be_->to_device(t.raw(), host.data(), t.nbytes());
    return t;
  };
  local_tensor_ = upload(lt, DType::I32);
  local_begin_ = upload(lb, DType::I64);
  local_end_ = upload(le, DType::I64);
  // At least one element, so an empty slice still owns memory; views use hi_ - lo_.
  exp_avg_sq_ = be_->zeros({std::max<int64_t>(hi_ - lo_, 1)});
  momentum_ = be_->zeros({std::max<int64_t>(hi_ - lo_, 1)});
  comm_ = &comm;
}

double ScaledAdam::clip_factor(ClipGroup& grp, double norm, ClipGroupStats& st) {
  const int s = step_;
  const int period = opt_.clipping_update_period;
  // Step 0 only initialises state; its norm is measured with the initial RMS but not kept.
  if (s > 0) {
    grp.norms[s % period] = (float)norm;
    // The early estimates see few norms while they may still be changing fast, hence the
    // subset and the doubled threshold.
    const bool irregular = (s == 10 || s == 20 || s == 40) && s < period;
    if (s % period == 0 || irregular) {
      std::vector<float> sorted = grp.norms;
      std::sort(sorted.begin(), sorted.end(), norm_less);
      if (irregular) sorted.erase(sorted.begin(), sorted.end() - s);
      const int64_t n = (int64_t)sorted.size();
      for (int q = 0; q < 5; ++q) st.quartiles[q] = sorted[std::min(n - 1, (n / 4) * q)];
      const double median = st.quartiles[2];
      if (!std::isfinite(median)) {
        char which[64] = "";
        if (groups_.size() > 1) std::snprintf(which, sizeof which, " (lr-scale %g group)", (double)grp.lr_scale);
        throw Error("ScaledAdam: at step " + std::to_string(s) + " the median gradient norm of the clipping window" +
                    which +
                    " is not finite (too many non-finite gradients); lower the learning rate or check the data");
      }
      double thr = (double)opt_.clipping_scale * median;
      if (irregular) thr *= 2.0;
      grp.threshold = thr;
      grp.has_threshold = true;
      grp.num_clipped = 0;
      st.quartiles_changed = true;
    }
  }
  st.threshold = grp.has_threshold ? grp.threshold : 0.0;
  if (!std::isfinite(norm)) return 0.0;
  if (!grp.has_threshold) return 1.0;
  const double f = std::min(1.0, grp.threshold / (norm + 1e-20));
  if (f < 1.0) ++grp.num_clipped;
  return f;
}

ScaledAdamStepInfo ScaledAdam::step(float* params, float* grads, float lr) {
  ScaledAdamStepInfo info;
  const int s = step_;
  const int P = opt_.size_update_period;
  const size_t nt = params_.size();
  const bool size_step = (s % P == P - 1);

  const Backend::Chunks ch{view_of(chunk_tensor_), view_of(chunk_begin_), view_of(chunk_end_)};
  const View p = vec(params, total_), g = vec(grads, total_);
  be_->optim_chunk_sums(p, g, ch, (int)nt, s == 0 || size_step, view_of(sums_dev_), scratch_of(sums_scratch_));
  be_->to_host(sums_.data(), sums_dev_.raw(), sums_dev_.nbytes());  // the step's one read
  auto grad_sq = [&](size_t t) { return sums_[t * 3 + 0]; };
  auto param_grad = [&](size_t t) { return sums_[t * 3 + 1]; };
  auto param_sq = [&](size_t t) { return sums_[t * 3 + 2]; };
  if (s == 0)
    for (size_t t = 0; t < nt; ++t)
      if (!is_scalar(t)) param_rms_[t] = (float)std::sqrt(param_sq(t) / (double)params_[t].numel);

  // The clipping norm weights each tensor's gradient by how its update is scaled; each
  // clipping group has its own norm (summed in tensor order, as the whole-model one).
  const size_t ng = groups_.size();
  std::vector<double> group_sumsq(ng, 0.0);
  double sumsq = 0;
  for (size_t t = 0; t < nt; ++t) {
    const double w = is_scalar(t) ? (double)opt_.scalar_lr_scale : (double)param_rms_[t];
    const double x = grad_sq(t) * w * w;
    sumsq += x;
    group_sumsq[group_of_[t]] += x;
  }
  info.grad_norm = std::sqrt(sumsq);
  info.groups.resize(ng);
  std::vector<double> factor(ng, 1.0);
  for (size_t gi = 0; gi < ng; ++gi) {
    ClipGroup& grp = groups_[gi];
    ClipGroupStats& st = info.groups[gi];
    st.whole_model = opt_.clipping == Clipping::global;
    st.lr_scale = grp.lr_scale;
    st.tensors = (int)grp.tensors.size();
    st.elements = grp.elements;
    st.grad_norm = std::sqrt(group_sumsq[gi]);
    if (opt_.clipping_scale > 0) factor[gi] = clip_factor(grp, st.grad_norm, st);
    st.clip_factor = factor[gi];
    info.skipped |= factor[gi] == 0.0;
    if (factor[gi] == 1.0) continue;
    if (ng == 1) {
      be_->optim_scale_chunks(g, ch, (float)factor[gi]);
    } else {
      const Backend::Chunks gch{view_of(grp.chunk_tensor), view_of(grp.chunk_begin), view_of(grp.chunk_end)};
      be_->optim_scale_chunks(g, gch, (float)factor[gi]);
    }
  }
  const ClipGroupStats& main = info.groups[main_group_];
  info.clip_factor = main.clip_factor;
  info.threshold = main.threshold;
  info.quartiles_changed = main.quartiles_changed;
  for (int q = 0; q < 5; ++q) info.quartiles[q] = main.quartiles[q];

  // Per-tensor coefficients of the elementwise update.
  const double beta2 = opt_.beta2, eps = opt_.eps;
  const double bc2 = 1.0 - std::pow(beta2, s + 1);
  const float inv_bc2 = bc2 < 0.99 ? (float)(1.0 / bc2) : 1.0f;
  for (size_t t = 0; t < nt; ++t) {
    const ParamInfo& p = params_[t];
    const double lr_t = (double)lr * (double)p.lr_scale;
    if (is_scalar(t)) {
      step_coef_[t] = (float)(-lr_t * opt_.scalar_lr_scale);
      scale_step_[t] = 0.f;
      continue;
    }
    float* sg = &scale_grads_[t * P];
    const double f = factor[group_of_[t]];
    sg[s % P] = f == 0.0 ? 0.f : (float)(param_grad(t) * f);
    if (size_step) param_rms_[t] = (float)std::sqrt(param_sq(t) / (double)p.numel);
    const double rms = param_rms_[t];
    double scale_step = 0;
    if (size_step && s > 0) {
      const double beta2_corr = std::pow(beta2, P);
      double mean_sq = 0, sum = 0;
      for (int k = 0; k < P; ++k) {
        mean_sq += (double)sg[k] * sg[k];
        sum += sg[k];
      }
      mean_sq /= P;
      scale_exp_avg_sq_[t] = (float)(scale_exp_avg_sq_[t] * beta2_corr + mean_sq * (1.0 - beta2_corr));
      const int64_t size_steps = (s + 1) / P;
      const double bc = 1.0 - std::pow(beta2_corr, (double)size_steps);
      const double size_lr = lr_t * opt_.scalar_lr_scale;
      scale_step = -size_lr * std::sqrt(bc) * sum / (std::sqrt((double)scale_exp_avg_sq_[t]) + eps);
      // The rule freezes the scale of a tensor that is already below the minimum RMS.
      if (rms < opt_.param_min_rms) scale_step = 0;
      scale_step = std::clamp(scale_step, -0.1, 0.1);
      scale_step = std::min(scale_step, ((double)opt_.param_max_rms - rms) / rms);
    }
    step_coef_[t] = (float)(-lr_t * std::max(rms, (double)opt_.param_min_rms));
    scale_step_[t] = (float)scale_step;
  }

  const float b1 = opt_.beta1, one_minus_b1 = (float)(1.0 - (double)opt_.beta1);
  const float b2 = opt_.beta2, one_minus_b2 = (float)(1.0 - (double)opt_.beta2);
  be_->to_device(step_coef_dev_.raw(), step_coef_.data(), step_coef_dev_.nbytes());
  be_->to_device(scale_step_dev_.raw(), scale_step_.data(), scale_step_dev_.nbytes());
  // Only this rank's chunks: p and g from the slice start, the state local to the slice.
  const int64_t n = hi_ - lo_;
  if (local_tensor_.raw()) {  // a rank may own no chunk
    const Backend::Chunks local{view_of(local_tensor_), view_of(local_begin_), view_of(local_end_)};
    be_->scaled_adam_update(vec(params + lo_, n), vec(grads + lo_, n), vec(exp_avg_sq_.f32(), n),
                            vec(momentum_.f32(), n), local, view_of(step_coef_dev_), view_of(scale_step_dev_),
                            view_of(clamp_tensor_), opt_.scalar_max, inv_bc2, b1, one_minus_b1, b2, one_minus_b2,
                            opt_.eps);
  }
  if (comm_) comm_->all_gather(p, bounds_);
  ++step_;
  return info;
}

void ScaledAdam::save_state(const std::string& path) const {
  const int64_t nt = (int64_t)params_.size();
  const int64_t n = hi_ - lo_;
  std::vector<float> v, m;
  if (comm_) {
    // Every rank sends its slice; rank 0 alone assembles and writes (the per-tensor state is
    // the same on every rank).
    const bool root = comm_->rank() == 0;
    std::vector<float> lv(n), lm(n);
    be_->to_host(lv.data(), exp_avg_sq_.raw(), sizeof(float) * n);
    be_->to_host(lm.data(), momentum_.raw(), sizeof(float) * n);
    if (root) {
      v.assign(total_, 0.f);
      m.assign(total_, 0.f);
    }
    comm_->gather_host(lv.data(), v.data(), bounds_);
    comm_->gather_host(lm.data(), m.data(), bounds_);
    if (!root) return;
  } else {
    v.resize(total_);
    m.resize(total_);
    be_->to_host(v.data(), exp_avg_sq_.raw(), sizeof(float) * total_);
    be_->to_host(m.data(), momentum_.raw(), sizeof(float) * total_);
  }
  // The clipping groups: their windows stacked [groups, period]; per group, in metadata lists
  // (comma separated, in group order), its lr_scale, whether it has a threshold, the
  // threshold (exact) and its clipped count.
  const int64_t ng = (int64_t)groups_.size(), period = opt_.clipping_update_period;
  std::vector<float> norms;
  std::string scales, has_thr, thr, clipped;
  for (const ClipGroup& grp : groups_) {
    norms.insert(norms.end(), grp.norms.begin(), grp.norms.end());
    const std::string sep = scales.empty() ? "" : ",";
    scales += sep + exact_double(grp.lr_scale);
    has_thr += sep + (grp.has_threshold ? "1" : "0");
    thr += sep + exact_double(grp.threshold);
    clipped += sep + std::to_string(grp.num_clipped);
  }
  std::vector<SafetensorsOut> out = {
      {"exp_avg_sq", DType::F32, {total_}, v.data()},
      {"momentum", DType::F32, {total_}, m.data()},
      {"param_rms", DType::F32, {nt}, param_rms_.data()},
      {"scale_exp_avg_sq", DType::F32, {nt}, scale_exp_avg_sq_.data()},
      {"scale_grads", DType::F32, {nt, (int64_t)opt_.size_update_period}, scale_grads_.data()},
      {"model_norms", DType::F32, {ng, period}, norms.data()},
  };
  std::map<std::string, std::string> meta = {
      {"format", "subllm.scaled_adam.v2"},
      {"step", std::to_string(step_)},
      {"clipping", opt_.clipping == Clipping::global ? "global" : "per-group"},
      {"clip_groups", std::to_string(ng)},
      {"clip_group_lr_scales", scales},
      {"has_threshold", has_thr},
      {"threshold", thr},
      {"num_clipped", clipped},
  };
  write_safetensors(path, out, meta);
}

void ScaledAdam::load_state(const std::string& path) {
  SafetensorsFile f(path);
  const std::string where = "ScaledAdam state '" + path + "': ";
  auto read = [&](const std::string& name, const Shape& shape) {
    check(f.has(name), where + "missing tensor '" + name + "' (not a ScaledAdam state file, or a truncated one)");
    std::vector<float> tmp(shape_numel(shape));
    f.read_f32(name, shape, tmp.data());
    return tmp;
  };
  auto meta = [&](const std::string& key) -> const std::string& {
    auto it = f.metadata().find(key);
    check(it != f.metadata().end(), where + "missing metadata '" + key + "'");
    return it->second;
  };
  auto to_int = [&](const std::string& key) -> int64_t {
    const std::string& s = meta(key);
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    check(!s.empty() && *end == '\0' && v >= 0, where + "metadata '" + key + "' is not a count: '" + s + "'");
    return v;
  };
  auto split = [](const std::string& text) {
    std::vector<std::string> parts;
    size_t from = 0;
    for (;;) {
      const size_t comma = text.find(',', from);
      parts.push_back(text.substr(from, comma == std::string::npos ? std::string::npos : comma - from));
      if (comma == std::string::npos) return parts;
      from = comma + 1;
    }
  };
  auto to_count = [&](const std::string& key, const std::string& s) -> int64_t {
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    check(!s.empty() && *end == '\0' && v >= 0, where + "metadata '" + key + "' holds a non-count: '" + s + "'");
    return v;
  };
  auto to_double = [&](const std::string& key, const std::string& s) -> double {
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    check(!s.empty() && *end == '\0', where + "metadata '" + key + "' holds a non-number: '" + s + "'");
    return v;
  };
  const int64_t nt = (int64_t)params_.size();
  const int64_t period = opt_.clipping_update_period;
  // Read everything before touching the live state, so a bad file leaves it as it was. The
  // whole file on every rank; only the slice of the per-element state is kept.
  std::vector<float> v = read("exp_avg_sq", {total_});
  std::vector<float> m = read("momentum", {total_});
  std::vector<float> rms = read("param_rms", {nt});
  std::vector<float> sea = read("scale_exp_avg_sq", {nt});
  std::vector<float> sg = read("scale_grads", {nt, (int64_t)opt_.size_update_period});
  const std::string& format = meta("format");
  const bool v1 = format == "subllm.scaled_adam.v1";
  check(v1 || format == "subllm.scaled_adam.v2", where + "unknown format '" + format + "'");
  const int64_t step = to_int("step");
  // The clipping groups of the file (a v1 file has one, written before groups existed).
  const int64_t file_groups = v1 ? 1 : to_int("clip_groups");
  check(file_groups >= 1, where + "metadata 'clip_groups' is 0");
  std::vector<float> norms = read("model_norms", v1 ? Shape{period} : Shape{file_groups, period});
  auto list = [&](const std::string& key) {
    std::vector<std::string> parts = v1 ? std::vector<std::string>{meta(key)} : split(meta(key));
    check((int64_t)parts.size() == file_groups, where + "metadata '" + key + "' has " +
                                                    std::to_string(parts.size()) + " entries for " +
                                                    std::to_string(file_groups) + " clipping groups");
    return parts;
  };
  std::vector<std::string> has_thr = list("has_threshold"), thr = list("threshold"), clipped = list("num_clipped");
  std::vector<ClipGroup> loaded(file_groups);
  for (int64_t gi = 0; gi < file_groups; ++gi) {
    ClipGroup& grp = loaded[gi];
    grp.norms.assign(norms.begin() + gi * period, norms.begin() + (gi + 1) * period);
    grp.has_threshold = to_count("has_threshold", has_thr[gi]) != 0;
    grp.threshold = to_double("threshold", thr[gi]);
    grp.num_clipped = to_count("num_clipped", clipped[gi]);
  }
  // Which groups: the same ones (one group each side holds every tensor alike), or one group
  // copied to each of ours; a file with several groups must have ours.
  const int64_t ng = (int64_t)groups_.size();
  bool same = file_groups == ng && ng == 1;
  if (!same && !v1 && file_groups == ng && meta("clipping") == "per-group" && opt_.clipping == Clipping::per_group) {
    const std::vector<std::string> scales = list("clip_group_lr_scales");
    same = true;
    for (int64_t gi = 0; gi < ng; ++gi)
      same = same && to_double("clip_group_lr_scales", scales[gi]) == (double)groups_[gi].lr_scale;
  }
  auto describe = [&](int64_t count, const std::string& how) {
    return std::to_string(count) + " clipping group" + (count == 1 ? "" : "s") + " (" + how + ")";
  };
  const std::string ours =
      describe(ng, opt_.clipping == Clipping::global ? "--clipping global" : "--clipping per-group, by lr scale");
  if (!same && file_groups > 1) {
    std::string scales;
    for (const std::string& x : list("clip_group_lr_scales")) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%s%g", scales.empty() ? "" : ", ", to_double("clip_group_lr_scales", x));
      scales += buf;
    }
    throw Error(where + "written with " + describe(file_groups, meta("clipping") + ", lr scales " + scales) +
                ", but this optimizer has " + ours + "; resume with the clipping and lr scales it was written with");
  }
  if (!same) {
    if (!comm_ || comm_->rank() == 0)
      std::fprintf(stderr,
                   "note: %s holds one clipping window%s; it starts each of this optimizer's %lld clipping "
                   "groups, whose own norms replace it within %lld steps\n",
                   path.c_str(), v1 ? " (a v1 state, clipped globally)" : "", (long long)ng, (long long)period);
    std::vector<ClipGroup> copies(ng, loaded[0]);
    loaded.swap(copies);
  }

  be_->to_device(exp_avg_sq_.raw(), v.data() + lo_, sizeof(float) * (hi_ - lo_));
  be_->to_device(momentum_.raw(), m.data() + lo_, sizeof(float) * (hi_ - lo_));
  param_rms_ = std::move(rms);
  scale_exp_avg_sq_ = std::move(sea);
  scale_grads_ = std::move(sg);
  for (int64_t gi = 0; gi < ng; ++gi) {
    groups_[gi].norms = std::move(loaded[gi].norms);
    groups_[gi].has_threshold = loaded[gi].has_threshold;
    groups_[gi].threshold = loaded[gi].threshold;
    groups_[gi].num_clipped = loaded[gi].num_clipped;
  }
  step_ = (int)step;
}

}  // namespace subllm
