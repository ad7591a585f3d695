#include "subllm/scheduled_float.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "subllm/error.h"

namespace subllm {

ScheduledFloat::ScheduledFloat(std::vector<std::pair<double, double>> points) : points_(std::move(points)) {
  check(!points_.empty(), "a scheduled value needs at least one (step, value) point");
  for (size_t i = 1; i < points_.size(); ++i)
    check(points_[i].first > points_[i - 1].first, "scheduled value points must have increasing steps");
}

ScheduledFloat ScheduledFloat::parse(const std::string& text, const std::string& what) {
  const auto bad = [&](const std::string& why) {
    return Error(what + " '" + text + "' is not a schedule (" + why +
                 "): give STEP:VALUE points with increasing steps, e.g. 0:1.0,8000:0.25, or one VALUE");
  };
  const auto number = [&](const std::string& s) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != s.size() || !std::isfinite(v)) throw bad("'" + s + "' is not a number");
    return v;
  };
  std::vector<std::pair<double, double>> points;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, end - start);
    const size_t colon = item.find(':');
    if (colon == std::string::npos) {
      if (text.find(',') != std::string::npos) throw bad("'" + item + "' has no STEP:");
      points.emplace_back(0.0, number(item));
    } else {
      points.emplace_back(number(item.substr(0, colon)), number(item.substr(colon + 1)));
    }
    if (points.size() > 1 && points.back().first <= points[points.size() - 2].first)
      throw bad("steps must increase");
    start = end + 1;
  }
  return ScheduledFloat(std::move(points));
}

std::string ScheduledFloat::str() const {
  std::string out;
  char b[64];
  for (const auto& [x, y] : points_) {
    std::snprintf(b, sizeof b, "%s%g:%g", out.empty() ? "" : ",", x, y);
    out += b;
  }
  return out;
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
