#include "subllm/schedule.h"

#include <algorithm>
#include <cmath>

#include "subllm/error.h"

namespace subllm {

float LrSchedule::at(long step, double epoch) const {
  if (kind == "eden" || kind == "eden2") {
    EdenSchedule e = eden;
    e.base_lr = base_lr;
    e.warmup_batches = warmup_steps;
    e.eden2 = kind == "eden2";
    // Eden counts the step about to be taken from 1.
    return (float)e.at(step + 1, epoch);
  }
  if (warmup_steps > 0 && step < warmup_steps) return base_lr * (float)(step + 1) / (float)warmup_steps;
  if (kind == "constant") return base_lr;
  check(kind == "cosine", "unknown learning-rate schedule '" + kind + "': use cosine, constant, eden or eden2");
  const double span = std::max<long>(1, total_steps - warmup_steps);
  const double progress = std::min(1.0, (double)(step - warmup_steps) / span);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return (float)(base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine));
}

ScheduledFloat::ScheduledFloat(std::vector<std::pair<double, double>> points) : points_(std::move(points)) {
  check(!points_.empty(), "a scheduled value needs at least one (step, value) point");
  for (size_t i = 1; i < points_.size(); ++i)
    check(points_[i].first > points_[i - 1].first, "scheduled value points must have increasing steps");
}

double ScheduledFloat::at(double step) const {
  if (step <= points_.front().first) return points_.front().second;
  if (step >= points_.back().first) return points_.back().second;
  for (size_t i = 1; i < points_.size(); ++i) {
    if (step <= points_[i].first) {
      const auto& [x0, y0] = points_[i - 1];
      const auto& [x1, y1] = points_[i];
      return y0 + (y1 - y0) * (step - x0) / (x1 - x0);
    }
  }
  return points_.back().second;
}

}  // namespace subllm
