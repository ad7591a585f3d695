#include "subllm/eden.h"

#include <cmath>

#include "subllm/error.h"

namespace subllm {

EdenEpoch parse_eden_epoch(const std::string& name) {
  if (name == "fractional") return EdenEpoch::Fractional;
  if (name == "completed") return EdenEpoch::Completed;
  throw Error("unknown Eden epoch count '" + name + "': use fractional or completed");
}

const char* eden_epoch_name(EdenEpoch mode) { return mode == EdenEpoch::Completed ? "completed" : "fractional"; }

double EdenSchedule::at(long batch, double epoch) const {
  const double b = (double)batch, bb = lr_batches * lr_batches;
  double factor;
  if (eden2) {
    factor = std::pow((b * b + bb) / bb, -0.5);
  } else {
    const double e = epoch_mode == EdenEpoch::Completed ? std::floor(epoch) : epoch;
    const double ee = lr_epochs * lr_epochs;
    factor = std::pow((b * b + bb) / bb, -0.25) * std::pow((e * e + ee) / ee, -0.25);
  }
  const double start = warmup_start;
  const double warmup =
      batch >= warmup_batches ? 1.0 : start + (1.0 - start) * (b / (double)warmup_batches);
  return (double)base_lr * factor * warmup;
}

}  // namespace subllm
