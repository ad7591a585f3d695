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

}  // namespace subllm
