#pragma once
// The Eden and Eden2 learning-rate schedules of the zipformer family (SUBLLM.md section 7),
// meant for ScaledAdam.
#include <string>

namespace subllm {

// What Eden's epoch e counts (docs/RESULTS.md, "Eden's epoch").
enum class EdenEpoch {
  // The data already seen, in passes over the training split, fractional: the reading of
  // the paper's recipe (E = a third of the run's data; icefall's language-model recipe,
  // which the SUBLLM training code grew out of, steps e with the tokens seen at every batch).
  Fractional,
  // Completed passes only (the floor of the above), as icefall's ASR recipes call
  // step_epoch(epoch - 1) at the start of each epoch: e stays 0 through the first pass.
  Completed,
};
// "fractional" | "completed"; throws Error naming both otherwise.
EdenEpoch parse_eden_epoch(const std::string& name);
const char* eden_epoch_name(EdenEpoch mode);

struct EdenSchedule {
  float base_lr = 0.045f;
  double lr_batches = 5000;   // B: batches after which the rate falls noticeably
  double lr_epochs = 6;       // E: the same in epochs (Eden only)
  int warmup_batches = 500;
  // The warmup factor at batch 0; it reaches 1 at warmup_batches. 0.5 is icefall's Eden
  // default, which its language-model recipe (2023) and zipformer's train.py before 2025
  // use; zipformer's ASR train.py passes 0.1 since January 2025 (against divergence).
  float warmup_start = 0.5f;
  bool eden2 = false;
  EdenEpoch epoch_mode = EdenEpoch::Fractional;  // Eden only
  // Eden:  base * ((b^2 + B^2) / B^2)^-0.25 * ((e^2 + E^2) / E^2)^-0.25 * warmup(b)
  // Eden2: base * ((b^2 + B^2) / B^2)^-0.5 * warmup(b)
  // warmup(b) = warmup_start + (1 - warmup_start) * b / warmup_batches below warmup_batches,
  // else 1. `batch` is the index of the step about to be taken, counted from 1 over the
  // whole run (icefall steps the schedule to that index just before each optimizer step);
  // `epoch` is the amount of data already seen, in epochs, and may be fractional: e is that
  // amount (Fractional) or its floor, the passes completed (Completed).
  double at(long batch, double epoch) const;
};

}  // namespace subllm
