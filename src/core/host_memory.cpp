#include "subllm/host_memory.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "subllm/error.h"

namespace subllm {
namespace {

// The limit in a cgroup file ("max" or a byte count), or 0 when there is none.
uint64_t cgroup_limit(const char* path) {
  std::ifstream in(path);
  unsigned long long v = 0;
  if (!(in >> v)) return 0;
  return v;
}

}  // namespace

uint64_t host_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  uint64_t bytes = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : UINT64_MAX;
  // cgroup v2, then v1 (whose "no limit" is a huge number, which min() ignores).
  for (const char* f : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    const uint64_t limit = cgroup_limit(f);
    if (limit > 0) bytes = std::min(bytes, limit);
  }
  return bytes;
}

std::string memory_text(double bytes) {
  const double gib = bytes / (1024.0 * 1024 * 1024);
  char buf[64];
  if (gib >= 1024) std::snprintf(buf, sizeof buf, "%.4g TiB", gib / 1024);
  else if (gib >= 1) std::snprintf(buf, sizeof buf, "%.1f GiB", gib);
  else std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / (1024.0 * 1024));
  return buf;
}

void check_host_memory(double bytes, const std::string& what, const std::string& fix) {
  const double have = (double)host_memory_bytes();
  if (bytes > have)
    throw Error(what + " needs " + memory_text(bytes) + ", this machine has " + memory_text(have) + ": " + fix);
}

}  // namespace subllm
