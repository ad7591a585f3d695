#pragma once
// Errors raised by the library. Every message names the offending input and says how to fix it.
#include <stdexcept>
#include <string>

namespace subllm {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Throws subllm::Error with `msg` when `cond` is false. A message built from parts costs its
// allocations even when the check passes: on a hot path write `if (!cond) throw Error(...)`.
inline void check(bool cond, const char* msg) {
  if (!cond) throw Error(msg);
}
inline void check(bool cond, const std::string& msg) {
  if (!cond) throw Error(msg);
}

}  // namespace subllm
