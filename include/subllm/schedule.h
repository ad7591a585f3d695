#pragma once
// Learning-rate schedules, as functions of the step (ScheduledFloat: subllm/scheduled_float.h).
#include <string>

#include "subllm/eden.h"
#include "subllm/scheduled_float.h"

namespace subllm {

struct LrSchedule {
  std::string kind = "cosine";  // cosine | constant | eden | eden2
  float base_lr = 3e-4f;
  int warmup_steps = 100;       // cosine/constant: linear from 0; eden: from eden.warmup_start
  long total_steps = 1000;
  float min_lr_ratio = 0.1f;    // cosine ends at base_lr * min_lr_ratio
  EdenSchedule eden;            // lr_batches, lr_epochs, warmup_start, epoch_mode for eden/eden2
  // `step` counts optimizer steps from 0; `epoch` is the data seen so far, in epochs
  // (fractional; Eden with EdenEpoch::Completed counts only its whole passes).
  float at(long step, double epoch = 0) const;
};

}  // namespace subllm
