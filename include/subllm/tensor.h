#pragma once
// A tagged, shaped view of memory. fp32 is the only compute type today; the dtype and
// device tags exist so bf16 storage and a CUDA backend can arrive without changing callers.
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace subllm {

enum class DType : uint8_t { F32, BF16, F16, I32 };
enum class Device : uint8_t { CPU };

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);

using Shape = std::vector<int64_t>;
int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  // Owns fresh 64-byte aligned memory, zero-filled.
  static Tensor zeros(Shape shape, DType dt = DType::F32, Device dev = Device::CPU);
  // Does not own `data`; the caller keeps it alive.
  static Tensor view(void* data, Shape shape, DType dt = DType::F32, Device dev = Device::CPU);

  bool defined() const { return ptr_ != nullptr || numel() == 0; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  void* raw() const { return ptr_; }
  float* f32() const;
  int32_t* i32() const;

  void zero();

 private:
  std::shared_ptr<void> owner_;
  void* ptr_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
};

// 64-byte aligned host allocation released by the returned owner.
std::shared_ptr<void> aligned_alloc_shared(size_t bytes);

// A bump allocator for activations. Sized once per (batch, length) by a measuring pass
// (`Arena::measuring()`), then every step reuses the same memory.
class Arena {
 public:
  Arena() = default;
  static Arena measuring() { Arena a; a.measuring_ = true; return a; }
  void reserve(size_t bytes);
  // In a measuring arena the returned tensor has no memory; only the size is counted.
  Tensor alloc(Shape shape, DType dt = DType::F32);
  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }
  bool is_measuring() const { return measuring_; }

 private:
  std::shared_ptr<void> mem_;
  size_t capacity_ = 0;
  size_t used_ = 0;
  bool measuring_ = false;
};

}  // namespace subllm
