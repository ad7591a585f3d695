// std::vector whose storage starts on a 64-byte cache line. The matrix-vector kernels read their
// x operand with 64-byte vector loads, each weight load paired with x loads: from a buffer that
// malloc places 16 or 32 bytes off a line, every x load spans two lines, and a product streaming
// W from memory ran at half speed (x 32 bytes off: 17 against 32 GB/s on one core).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace subllm::kernels {

template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};

template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace subllm::kernels
