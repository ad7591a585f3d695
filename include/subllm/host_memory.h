#pragma once
// The memory this machine gives the process, so that sizes too large for it are refused
// before anything is allocated, with the numbers, rather than by the kernel's OOM killer.
#include <cstdint>
#include <string>

namespace subllm {

// Physical RAM, or the cgroup's memory limit when that is lower (a container).
uint64_t host_memory_bytes();

// Bytes as "1.5 GiB" (MiB below one GiB, TiB above 1024 GiB).
std::string memory_text(double bytes);

// Throws Error "<what> needs X, this machine has Y: <fix>" when `bytes` exceed
// host_memory_bytes(). Byte counts are doubles so that products of huge sizes cannot wrap.
void check_host_memory(double bytes, const std::string& what, const std::string& fix);

}  // namespace subllm
