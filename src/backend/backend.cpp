// Views, the backend's shared helpers, and the registry: the one place that maps a device
// name to a backend.
#include "backend/backend.h"

#include "kernels/kernels.h"
#include "subllm/error.h"

namespace subllm {

namespace {
void* require(const View& v, DType dt) {
  if (v.dtype != dt)
    throw Error(std::string("kernel expects ") + dtype_name(dt) + " data, got " + dtype_name(v.dtype) +
                ": this backend has no kernel for that dtype");
  return v.data;
}
}  // namespace

float* View::f32() const { return static_cast<float*>(require(*this, DType::F32)); }
int32_t* View::i32() const { return static_cast<int32_t*>(require(*this, DType::I32)); }
double* View::f64() const { return static_cast<double*>(require(*this, DType::F64)); }
int64_t* View::i64() const { return static_cast<int64_t*>(require(*this, DType::I64)); }
uint8_t* View::u8() const { return static_cast<uint8_t*>(require(*this, DType::U8)); }

View View::cols_at(int64_t c0, int64_t n) const {
  View v = *this;
  v.data = static_cast<char*>(data) + c0 * (int64_t)dtype_size(dtype);
  v.cols = n;
  return v;
}

View View::rows_at(int64_t r0, int64_t n) const {
  View v = *this;
  v.data = static_cast<char*>(data) + r0 * ld * (int64_t)dtype_size(dtype);
  v.rows = n;
  return v;
}

View mat(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return View{const_cast<float*>(p), DType::F32, rows, cols, ld ? ld : cols};
}
View vec(const float* p, int64_t n) { return View{const_cast<float*>(p), DType::F32, n, 1, 1}; }
View ivec(const int32_t* p, int64_t n) { return View{const_cast<int32_t*>(p), DType::I32, n, 1, 1}; }
View dvec(const double* p, int64_t n) { return View{const_cast<double*>(p), DType::F64, n, 1, 1}; }

View view_of(const Tensor& t) {
  const Shape& s = t.shape();
  const int64_t cols = s.size() >= 2 ? s.back() : 1;
  const int64_t rows = cols ? t.numel() / cols : 0;
  return View{t.raw(), t.dtype(), rows, cols, cols};
}

std::shared_ptr<void> Backend::alloc_shared(size_t bytes) {
  void* p = alloc(bytes);
  return std::shared_ptr<void>(p, [this](void* q) { free(q); });
}

Tensor Backend::empty(Shape shape, DType dt) {
  const size_t bytes = (size_t)shape_numel(shape) * dtype_size(dt);
  return Tensor::owning(alloc_shared(bytes), std::move(shape), dt, this);
}

Tensor Backend::zeros(Shape shape, DType dt) {
  Tensor t = empty(std::move(shape), dt);
  zero(t.raw(), t.nbytes());
  return t;
}

double balancer_mean_bound(double p) { return kernels::proportion_positive_to_mean(p); }

std::unique_ptr<Backend> make_cpu_backend();  // cpu_backend.cpp

Backend& cpu_backend() {
  static std::unique_ptr<Backend> cpu = make_cpu_backend();
  return *cpu;
}

std::vector<std::string> backend_names() { return {"cpu"}; }

Backend& backend_for(const std::string& device) {
  if (device == "cpu") return cpu_backend();
  std::string names;
  for (const auto& n : backend_names()) names += (names.empty() ? "" : ", ") + n;
  throw Error("unknown device '" + device + "': this build has " + names);
}

}  // namespace subllm
