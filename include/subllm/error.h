#pragma once
// Errors raised by the library. Every message names the offending input and says how to fix it.
#include <stdexcept>
#include <string>

namespace subllm {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Throws subllm::Error with `msg` when `cond` is false.
inline void check(bool cond, const std::string& msg) {
  if (!cond) throw Error(msg);
}

}  // namespace subllm
