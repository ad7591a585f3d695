#pragma once
// A shaped view of memory with its dtype and the backend (device) that owns it.
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace subllm {

// I8: plain int8 (the values of a Q8 matrix in a safetensors file). Q8: an inference weight
// matrix of int8 values with one F32 scale per group of 32 along a row (kernels/quant_kernels.h
// has the layout); its dtype_size is that of its values, a row with its scales is
// q8_row_bytes(cols).
enum class DType : uint8_t { F32, BF16, F16, I32, F64, I64, U8, I8, Q8 };

class Backend;  // backend/backend.h

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);

using Shape = std::vector<int64_t>;
int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  // (Backend::zeros makes a tensor that owns backend memory.)
  // Does not own `data`; the caller keeps it alive.
  static Tensor view(void* data, Shape shape, DType dt = DType::F32, Backend* backend = nullptr);
  // Owns `owner` (memory of `backend`).
  static Tensor owning(std::shared_ptr<void> owner, Shape shape, DType dt, Backend* backend);

  const Shape& shape() const { return shape_; }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Backend* backend() const { return backend_; }

  void* raw() const { return ptr_; }
  float* f32() const;

 private:
  std::shared_ptr<void> owner_;
  void* ptr_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  Backend* backend_ = nullptr;
};

// A bump allocator for activations in one block of backend memory. Sized once per (batch,
// length, mode) by a measuring pass (`Arena::measuring()`), then every step reuses it.
class Arena {
 public:
  Arena() = default;
  static Arena measuring() { Arena a; a.measuring_ = true; return a; }
  void reserve(size_t bytes, Backend& backend);
  // In a measuring arena the returned tensor has no memory; only the size is counted.
  Tensor alloc(Shape shape, DType dt = DType::F32);
  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }
  bool is_measuring() const { return measuring_; }

 private:
  std::shared_ptr<void> mem_;
  Backend* backend_ = nullptr;
  size_t capacity_ = 0;
  size_t used_ = 0;
  bool measuring_ = false;
};

}  // namespace subllm
