#pragma once
// Learning-rate schedules and piecewise-linear scheduled values, as functions of the step.
#include <string>
#include <utility>
#include <vector>

#include "subllm/eden.h"

namespace subllm {

struct LrSchedule {
  std::string kind = "cosine";  // cosine | constant | eden | eden2
  float base_lr = 3e-4f;
  int warmup_steps = 100;       // cosine/constant: linear from 0; eden: from eden.warmup_start
  long total_steps = 1000;
  float min_lr_ratio = 0.1f;    // cosine ends at base_lr * min_lr_ratio
  EdenSchedule eden;            // lr_batches, lr_epochs, warmup_start for eden/eden2
  // `step` counts optimizer steps from 0; `epoch` is the data seen so far, in epochs.
  float at(long step, double epoch = 0) const;
};

// A value given as (step, value) points, linear between them, constant outside.
class ScheduledFloat {
 public:
  ScheduledFloat(float constant = 0.f) : points_{{0.0, constant}} {}
  ScheduledFloat(std::vector<std::pair<double, double>> points);
  double at(double step) const;
  // "STEP:VALUE,STEP:VALUE,..." (or one VALUE, constant); a bad string is an error naming
  // `what` and the expected form.
  static ScheduledFloat parse(const std::string& text, const std::string& what);
  std::string str() const;  // the same form


 private:
  std::vector<std::pair<double, double>> points_;
};

}  // namespace subllm
