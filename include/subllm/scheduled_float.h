#pragma once
// A value that changes with the training step: piecewise-linear between (step, value) points.
#include <string>
#include <utility>
#include <vector>

namespace subllm {

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
