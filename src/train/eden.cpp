#include "subllm/eden.h"

#include <cmath>

namespace subllm {

double EdenSchedule::at(long batch, double epoch) const {
  const double b = (double)batch, bb = lr_batches * lr_batches;
  double factor;
  if (eden2) {
    factor = std::pow((b * b + bb) / bb, -0.5);
  } else {
    const double ee = lr_epochs * lr_epochs;
    factor = std::pow((b * b + bb) / bb, -0.25) * std::pow((epoch * epoch + ee) / ee, -0.25);
  }
  const double start = warmup_start;
  const double warmup =
      batch >= warmup_batches ? 1.0 : start + (1.0 - start) * (b / (double)warmup_batches);
  return (double)base_lr * factor * warmup;
}

}  // namespace subllm
