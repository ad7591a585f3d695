#pragma once
// Learning-rate schedules and piecewise-linear scheduled values, as functions of the step.
#include <string>
#include <utility>
#include <vector>

namespace subllm {

struct LrSchedule {
  std::string kind = "cosine";  // "cosine" | "constant"
  float base_lr = 3e-4f;
  int warmup_steps = 100;       // linear from 0 to base_lr
  long total_steps = 1000;
  float min_lr_ratio = 0.1f;    // cosine ends at base_lr * min_lr_ratio
  float at(long step) const;    // step counts from 0
};

// A value given as (step, value) points, linear between them, constant outside.
class ScheduledFloat {
 public:
  ScheduledFloat(float constant = 0.f) : points_{{0.0, constant}} {}
  ScheduledFloat(std::vector<std::pair<double, double>> points);
  double at(double step) const;

 private:
  std::vector<std::pair<double, double>> points_;
};

}  // namespace subllm
