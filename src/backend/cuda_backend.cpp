// The CUDA backend's construction: device selection, stream, cuBLASLt handle and workspace,
// error helpers and the factory the registry calls (backend.cpp). Plain C++ on the CUDA
// runtime API: the kernels live under src/kernels/cuda/.
#include "backend/cuda_backend.h"

#include <cstdlib>
#include <memory>
#include <string>

#include "kernels/cuda/cublaslt.h"
#include "subllm/error.h"

namespace subllm {

// gemm.cu: drops the cuBLASLt plans cached for `owner` (a CudaBackend being destroyed).
void cuda_gemm_release(const void* owner);

namespace {

// The cuBLASLt workspace handed to the heuristics and to every matmul.
constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;

std::string error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

void lt_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("CUDA backend: ") + what + " failed (" + cublaslt().GetStatusString(s) + ")");
}

// Releases what a backend holds; null members are skipped and errors ignored (this runs in a
// destructor and on a failed construction, possibly while the runtime shuts down).
void release(cudaStream_t& stream, cublasLtHandle_t& lt, void*& workspace) {
  if (lt) cublaslt().Destroy(lt);
  lt = nullptr;
  if (workspace) cudaFree(workspace);
  workspace = nullptr;
  if (stream) cudaStreamDestroy(stream);
  stream = nullptr;
  cudaGetLastError();  // a failure here must not surface as a later op's error
}

}  // namespace

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + error_text(e));
}

void cuda_check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw Error(std::string("CUDA kernel launch failed in ") + what + ": " + error_text(e));
}

int cuda_device_count(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the error so that later calls do not report it
    if (why) {
      if (e == cudaErrorNoDevice)
        *why = "no CUDA GPU found (" + error_text(e) + ")";
      else if (e == cudaErrorInsufficientDriver)
        *why = "the NVIDIA driver is missing or older than this build's CUDA runtime needs (" + error_text(e) + ")";
      else
        *why = "the CUDA runtime cannot list GPUs (" + error_text(e) + ")";
    }
    return 0;
  }
  if (n <= 0) {
    if (why) *why = "no CUDA GPU found";
    return 0;
  }
  return n;
}

CudaBackend::CudaBackend(int device, DType compute) : device_(device), compute_(compute) {
  if (compute != DType::F32 && compute != DType::BF16)
    throw Error(std::string("CudaBackend: compute dtype must be F32 or BF16, got ") + dtype_name(compute));
  try {
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cuda_check(cudaGetDeviceProperties(&props_, device), "cudaGetDeviceProperties");
    if (props_.major < 8)
      throw Error("GPU " + std::to_string(device) + " (" + props_.name + ") has compute capability " +
                  std::to_string(props_.major) + "." + std::to_string(props_.minor) +
                  "; the CUDA backend needs 8.0 or newer (Ampere or later, for bf16 tensor cores)");
    sm_count_ = props_.multiProcessorCount;
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    lt_check(cublaslt().Create(&lt_), "cublasLtCreate");
    lt_workspace_bytes_ = kLtWorkspaceBytes;
    cuda_check(cudaMalloc(&lt_workspace_, kLtWorkspaceBytes + CudaBackend::kReduceBytes), "cudaMalloc (cuBLASLt workspace)");
  } catch (...) {
    release(stream_, lt_, lt_workspace_);
    throw;
  }
}

CudaBackend::~CudaBackend() {
  cuda_gemm_release(this);
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  // Allocations still alive belong to tensors that outlive the backend; they are released here
  // so the device memory goes back with it.
  for (auto& [p, bytes] : sizes_) cudaFree(p);
  sizes_.clear();
  in_use_ = 0;
  release(stream_, lt_, lt_workspace_);
}

std::unique_ptr<Backend> make_cuda_backend(DType compute, std::string* why) {
  auto fail = [&](const std::string& reason) -> std::unique_ptr<Backend> {
    if (why) *why = reason;
    return nullptr;
  };
  std::string reason;
  const int n = cuda_device_count(&reason);
  if (n == 0) return fail(reason);
  int device = 0;
  if (const char* env = std::getenv("SUBLLM_CUDA_DEVICE"); env && *env) {
    char* end = nullptr;
    const long d = std::strtol(env, &end, 10);
    if (*end != '\0' || d < 0 || d >= n)
      return fail("SUBLLM_CUDA_DEVICE='" + std::string(env) + "' is not a GPU index in [0, " + std::to_string(n) +
                  ")");
    device = (int)d;
  } else {
    // One rank of several on this machine (mpirun, srun): the local rank picks the GPU.
    for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"})
      if (const char* local = std::getenv(var); local && *local) {
        device = (int)(std::strtol(local, nullptr, 10) % n);
        break;
      }
  }
  try {
    return std::make_unique<CudaBackend>(device, compute);
  } catch (const Error& e) {
    return fail(e.what());
  } catch (const std::bad_alloc&) {
    return fail("out of host memory creating the CUDA backend");
  }
}

}  // namespace subllm
