// Views, the backend's shared helpers, and the registry: the one place that maps a device
// name to a backend.
#include "backend/backend.h"

#include <mutex>

#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"
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
  // A Q8 row keeps its scales after its values: a column slice has no view of its own.
  check(dtype != DType::Q8 || (c0 == 0 && n == cols), "a Q8 matrix has no column slices: take whole rows");
  View v = *this;
  v.data = static_cast<char*>(data) + c0 * (int64_t)dtype_size(dtype);
  v.cols = n;
  return v;
}

View View::rows_at(int64_t r0, int64_t n) const {
  View v = *this;
  const int64_t row_bytes = dtype == DType::Q8 ? (int64_t)kernels::q8_row_bytes(ld) : ld * (int64_t)dtype_size(dtype);
  v.data = static_cast<char*>(data) + r0 * row_bytes;
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

int attention_kv_heads(const View& q, const View& k, const View& v, int H, const char* op) {
  check(H > 0 && q.cols % H == 0, std::string(op) + ": q's width is not a multiple of the head count");
  const int64_t hd = q.cols / H;
  check(k.cols == v.cols && k.cols % hd == 0 && k.cols > 0,
        std::string(op) + ": k and v must have one width, a multiple of the head size");
  const int64_t Hkv = k.cols / hd;
  check(H % Hkv == 0, std::string(op) + ": the key/value head count (" + std::to_string(Hkv) +
                          ") does not divide the query head count (" + std::to_string(H) + ")");
  return (int)Hkv;
}

std::unique_ptr<Backend> make_cpu_backend();  // cpu_backend.cpp

Backend& cpu_backend() {
  static std::unique_ptr<Backend> cpu = make_cpu_backend();
  return *cpu;
}

#ifdef SUBLLM_HAVE_CUDA
// cuda_backend.cpp: the backend of GPU 0 computing in `compute`; nullptr with `why` set when no
// GPU can be used.
std::unique_ptr<Backend> make_cuda_backend(DType compute, std::string* why);
#endif

std::vector<std::string> backend_names() {
#ifdef SUBLLM_HAVE_CUDA
  return {"cpu", "cuda", "cuda:fp32"};
#else
  return {"cpu"};
#endif
}

namespace {

std::string names_list() {
  std::string names;
  for (const auto& n : backend_names()) names += (names.empty() ? "" : ", ") + n;
  return names;
}

#ifdef SUBLLM_HAVE_CUDA
// Each CUDA backend is made on first use; a failure is remembered with its reason.
struct LazyBackend {
  std::unique_ptr<Backend> be;
  std::string why;
  bool tried = false;
};
Backend* cuda_backend(DType compute, std::string* why) {
  static std::mutex mu;
  static LazyBackend bf16, fp32;
  std::lock_guard<std::mutex> lock(mu);
  LazyBackend& l = compute == DType::BF16 ? bf16 : fp32;
  if (!l.tried) {
    l.tried = true;
    l.be = make_cuda_backend(compute, &l.why);
  }
  if (!l.be && why) *why = l.why;
  return l.be.get();
}
#endif

}  // namespace

bool backend_available(const std::string& device, std::string* why) {
  if (device == "cpu") return true;
#ifdef SUBLLM_HAVE_CUDA
  if (device == "cuda" || device == "cuda:fp32") {
    std::string reason;
    if (cuda_backend(device == "cuda" ? DType::BF16 : DType::F32, &reason)) return true;
    if (why) *why = "device '" + device + "' is not usable here: " + reason;
    return false;
  }
  if (why) *why = "unknown device '" + device + "': this build has " + names_list();
#else
  if (why)
    *why = device.rfind("cuda", 0) == 0
               ? "device '" + device + "': this build has no CUDA backend (rebuild on a machine with the CUDA toolkit, "
                 "cmake -DSUBLLM_CUDA=ON)"
               : "unknown device '" + device + "': this build has " + names_list();
#endif
  return false;
}

Backend& backend_for(const std::string& device) {
  if (device == "cpu") return cpu_backend();
#ifdef SUBLLM_HAVE_CUDA
  if (device == "cuda" || device == "cuda:fp32")
    if (Backend* be = cuda_backend(device == "cuda" ? DType::BF16 : DType::F32, nullptr)) return *be;
#endif
  std::string why;
  backend_available(device, &why);
  throw Error(why);
}

}  // namespace subllm
