#include "subllm/tensor.h"

#include <cstdlib>
#include <cstring>

#include "backend/backend.h"
#include "subllm/error.h"

namespace subllm {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::F64: return 8;
    case DType::I64: return 8;
    case DType::U8: return 1;
    case DType::I8: return 1;
    case DType::Q8: return 1;
  }
  return 0;
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
    case DType::I8: return "I8";
    case DType::Q8: return "Q8";
  }
  return "?";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

Tensor Tensor::view(void* data, Shape shape, DType dt, Backend* backend) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dt;
  t.backend_ = backend;
  t.ptr_ = data;
  return t;
}

Tensor Tensor::owning(std::shared_ptr<void> owner, Shape shape, DType dt, Backend* backend) {
  Tensor t = view(owner.get(), std::move(shape), dt, backend);
  t.owner_ = std::move(owner);
  return t;
}

float* Tensor::f32() const {
  if (dtype_ != DType::F32) throw Error(std::string("tensor of dtype ") + dtype_name(dtype_) + " used as F32");
  return static_cast<float*>(ptr_);
}

void Arena::reserve(size_t bytes, Backend& backend) {
  if (bytes <= capacity_) return;
  mem_ = backend.alloc_shared(bytes);
  backend_ = &backend;
  capacity_ = bytes;
  used_ = 0;
}

Tensor Arena::alloc(Shape shape, DType dt) {
  size_t bytes = (static_cast<size_t>(shape_numel(shape)) * dtype_size(dt) + 63) / 64 * 64;
  size_t at = used_;
  used_ += bytes;
  if (measuring_) return Tensor::view(nullptr, std::move(shape), dt);
  check(used_ <= capacity_, "activation arena overflow: planned " + std::to_string(capacity_) + " bytes, need " + std::to_string(used_));
  return Tensor::view(static_cast<char*>(mem_.get()) + at, std::move(shape), dt, backend_);
}

}  // namespace subllm
