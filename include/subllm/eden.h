#pragma once
// The Eden and Eden2 learning-rate schedules of the zipformer family (SUBLLM.md section 7),
// meant for ScaledAdam.
namespace subllm {

struct EdenSchedule {
  float base_lr = 0.045f;
  double lr_batches = 5000;   // B: batches after which the rate falls noticeably
  double lr_epochs = 6;       // E: the same in epochs (Eden only)
  int warmup_batches = 500;
  float warmup_start = 0.5f;  // the warmup factor at batch 0; it reaches 1 at warmup_batches
  bool eden2 = false;
  // Eden:  base * ((b^2 + B^2) / B^2)^-0.25 * ((e^2 + E^2) / E^2)^-0.25 * warmup(b)
  // Eden2: base * ((b^2 + B^2) / B^2)^-0.5 * warmup(b)
  // warmup(b) = warmup_start + (1 - warmup_start) * b / warmup_batches below warmup_batches,
  // else 1. `batch` is the index of the step about to be taken, counted from 1 over the
  // whole run (icefall steps the schedule to that index just before each optimizer step);
  // `epoch` is the amount of data already seen, in epochs, and may be fractional.
  double at(long batch, double epoch) const;
};

}  // namespace subllm
