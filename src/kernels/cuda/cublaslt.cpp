#include "kernels/cuda/cublaslt.h"

#include <dlfcn.h>

#include <string>
#include <type_traits>

#include "subllm/error.h"

namespace subllm {

namespace {

// The soname of the cuBLASLt this build's headers describe (its major version), found as the
// dynamic loader finds libraries (LD_LIBRARY_PATH, the system's cache), else where CMake found
// it at build time.
void* open_library(std::string& tried) {
  const std::string soname = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
  tried = soname;
  if (void* h = ::dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
#ifdef SUBLLM_CUBLASLT_DIR
  const std::string path = std::string(SUBLLM_CUBLASLT_DIR) + "/" + soname;
  tried += ", " + path;
  if (void* h = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
#endif
  return nullptr;
}

CublasLt load() {
  std::string tried;
  void* h = open_library(tried);
  if (!h) {
    const char* why = ::dlerror();
    throw Error("CUDA backend: cannot load cuBLASLt (tried " + tried + (why ? std::string(": ") + why : "") +
                "); install the CUDA toolkit's cuBLAS " + std::to_string(CUBLAS_VER_MAJOR) +
                " or add its lib folder to LD_LIBRARY_PATH");
  }
  CublasLt lt{};
  auto find = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(h, name));
    if (!fn)
      throw Error(std::string("CUDA backend: cuBLASLt (") + tried + ") has no " + name +
                  "; it is older than this build's headers");
  };
#define SUBLLM_CUBLASLT_FIND(name) find(lt.name, "cublasLt" #name);
  SUBLLM_CUBLASLT_FUNCTIONS(SUBLLM_CUBLASLT_FIND)
#undef SUBLLM_CUBLASLT_FIND
  return lt;
}

}  // namespace

const CublasLt& cublaslt() {
  // A failed load throws out of the initialiser, so the next call tries again.
  static const CublasLt lt = load();
  return lt;
}

}  // namespace subllm
