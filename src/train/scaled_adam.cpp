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
  model_norms_.assign(opt_.clipping_update_period, 0.f);
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

double ScaledAdam::clip_factor(double norm, ScaledAdamStepInfo& info) {
  const int s = step_;
  const int period = opt_.clipping_update_period;
  // Step 0 only initialises state; its norm is measured with the initial RMS but not kept.
  if (s > 0) {
    model_norms_[s % period] = (float)norm;
    // The early estimates see few norms while they may still be changing fast, hence the
    // subset and the doubled threshold.
    const bool irregular = (s == 10 || s == 20 || s == 40) && s < period;
    if (s % period == 0 || irregular) {
      std::vector<float> sorted = model_norms_;
      std::sort(sorted.begin(), sorted.end(), norm_less);
      if (irregular) sorted.erase(sorted.begin(), sorted.end() - s);
      const int64_t n = (int64_t)sorted.size();
      for (int q = 0; q < 5; ++q) info.quartiles[q] = sorted[std::min(n - 1, (n / 4) * q)];
      const double median = info.quartiles[2];
      check(std::isfinite(median), "ScaledAdam: at step " + std::to_string(s) +
                                       " the median gradient norm of the clipping window is not finite "
                                       "(too many non-finite gradients); lower the learning rate or check the data");
      double thr = (double)opt_.clipping_scale * median;
      if (irregular) thr *= 2.0;
      threshold_ = thr;
      has_threshold_ = true;
      num_clipped_ = 0;
      info.quartiles_changed = true;
    }
  }
  info.threshold = has_threshold_ ? threshold_ : 0.0;
  if (!std::isfinite(norm)) return 0.0;
  if (!has_threshold_) return 1.0;
  const double f = std::min(1.0, threshold_ / (norm + 1e-20));
  if (f < 1.0) ++num_clipped_;
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

  // The clipping norm weights each tensor's gradient by how its update is scaled.
  double sumsq = 0;
  for (size_t t = 0; t < nt; ++t) {
    const double w = is_scalar(t) ? (double)opt_.scalar_lr_scale : (double)param_rms_[t];
    sumsq += grad_sq(t) * w * w;
  }
  info.grad_norm = std::sqrt(sumsq);
  double f = 1.0;
  if (opt_.clipping_scale > 0) f = clip_factor(info.grad_norm, info);
  info.clip_factor = f;
  info.skipped = (f == 0.0);
  if (f != 1.0) be_->optim_scale_chunks(g, ch, (float)f);

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
  std::vector<SafetensorsOut> out = {
      {"exp_avg_sq", DType::F32, {total_}, v.data()},
      {"momentum", DType::F32, {total_}, m.data()},
      {"param_rms", DType::F32, {nt}, param_rms_.data()},
      {"scale_exp_avg_sq", DType::F32, {nt}, scale_exp_avg_sq_.data()},
      {"scale_grads", DType::F32, {nt, (int64_t)opt_.size_update_period}, scale_grads_.data()},
      {"model_norms", DType::F32, {(int64_t)opt_.clipping_update_period}, model_norms_.data()},
  };
  std::map<std::string, std::string> meta = {
      {"format", "subllm.scaled_adam.v1"},
      {"step", std::to_string(step_)},
      {"has_threshold", has_threshold_ ? "1" : "0"},
      {"threshold", exact_double(threshold_)},
      {"num_clipped", std::to_string(num_clipped_)},
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
  const int64_t nt = (int64_t)params_.size();
  // Read everything before touching the live state, so a bad file leaves it as it was. The
  // whole file on every rank; only the slice of the per-element state is kept.
  std::vector<float> v = read("exp_avg_sq", {total_});
  std::vector<float> m = read("momentum", {total_});
  std::vector<float> rms = read("param_rms", {nt});
  std::vector<float> sea = read("scale_exp_avg_sq", {nt});
  std::vector<float> sg = read("scale_grads", {nt, (int64_t)opt_.size_update_period});
  std::vector<float> norms = read("model_norms", {(int64_t)opt_.clipping_update_period});
  check(meta("format") == "subllm.scaled_adam.v1", where + "unknown format '" + meta("format") + "'");
  const int64_t step = to_int("step");
  const int64_t has_thr = to_int("has_threshold");
  const int64_t clipped = to_int("num_clipped");
  const std::string& thr_s = meta("threshold");
  char* end = nullptr;
  const double thr = std::strtod(thr_s.c_str(), &end);
  check(!thr_s.empty() && *end == '\0', where + "metadata 'threshold' is not a number: '" + thr_s + "'");

  be_->to_device(exp_avg_sq_.raw(), v.data() + lo_, sizeof(float) * (hi_ - lo_));
  be_->to_device(momentum_.raw(), m.data() + lo_, sizeof(float) * (hi_ - lo_));
  param_rms_ = std::move(rms);
  scale_exp_avg_sq_ = std::move(sea);
  scale_grads_ = std::move(sg);
  model_norms_ = std::move(norms);
  step_ = (int)step;
  has_threshold_ = has_thr != 0;
  threshold_ = thr;
  num_clipped_ = clipped;
}

}  // namespace subllm
