// The one-process communicator, the choice of a communicator per backend, job abort, and the
// shard bounds.
#include "dist/communicator.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "dist/mpi_communicator.h"
#include "subllm/error.h"

namespace subllm {

float* dense_f32(const View& x, const char* op) {
  if (x.dtype != DType::F32)
    throw Error(std::string(op) + ": expects F32 data, got " + dtype_name(x.dtype));
  if (x.rows < 0 || x.cols < 0 || (x.rows > 1 && x.ld != x.cols))
    throw Error(std::string(op) + ": expects a dense view (row stride " + std::to_string(x.ld) + " != " +
                std::to_string(x.cols) + " columns)");
  if (x.numel() > 0 && !x.data) throw Error(std::string(op) + ": null data");
  return static_cast<float*>(x.data);
}

void check_bounds(const std::vector<int64_t>& bounds, int ranks, int64_t n, const char* op) {
  if ((int64_t)bounds.size() != (int64_t)ranks + 1)
    throw Error(std::string(op) + ": " + std::to_string(bounds.size()) + " bounds for " + std::to_string(ranks) +
                " ranks (need ranks + 1)");
  if (bounds.front() != 0 || bounds.back() != n)
    throw Error(std::string(op) + ": bounds must run from 0 to " + std::to_string(n) + ", got " +
                std::to_string(bounds.front()) + " to " + std::to_string(bounds.back()));
  for (int r = 0; r < ranks; ++r)
    if (bounds[r] > bounds[r + 1]) throw Error(std::string(op) + ": bounds decrease at rank " + std::to_string(r));
}

namespace {

// One process: every collective leaves the data as it is.
class LocalCommunicator final : public Communicator {
 public:
  const char* name() const override { return "local"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum_start(View x) override { dense_f32(x, "all_reduce_sum_start"); }
  double wait_reductions() override { return 0; }
  void all_gather(View x, const std::vector<int64_t>& bounds) override {
    dense_f32(x, "all_gather");
    check_bounds(bounds, 1, x.numel(), "all_gather");
  }
  void all_reduce_sum_host(double*, int n) override { check(n >= 0, "all_reduce_sum_host: negative count"); }
  void gather_host(const float* local, float* full, const std::vector<int64_t>& bounds) override {
    check_bounds(bounds, 1, bounds.empty() ? 0 : bounds.back(), "gather_host");
    const int64_t n = bounds[1] - bounds[0];
    if (n > 0 && full + bounds[0] != local) std::memmove(full + bounds[0], local, size_t(n) * sizeof(float));
  }
  void broadcast_host(void*, int64_t n) override { check(n >= 0, "broadcast_host: negative size"); }
  void barrier() override {}
};

bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v && *v;
}

}  // namespace

bool launched_by_mpi() {
  // OpenMPI's mpirun: OMPI_COMM_WORLD_SIZE (and PMIX_RANK); srun --mpi=pmix: PMIX_RANK;
  // srun --mpi=pmi2 and MPICH's hydra: PMI_RANK, PMI_SIZE.
  return env_set("OMPI_COMM_WORLD_SIZE") || env_set("PMIX_RANK") || env_set("PMI_RANK") || env_set("PMI_SIZE");
}

Communicator& communicator_for(Backend& backend) {
  static std::mutex mu;
  // Never destroyed: MPI may be finalised at exit before static destructors would run.
  static auto* made = new std::map<Backend*, std::unique_ptr<Communicator>>();
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = (*made)[&backend];  // stays empty when making it fails, so a later call retries
  if (slot) return *slot;
  if (!launched_by_mpi()) {
    // srun without MPI's process manager starts every task as a job of its own: refuse rather
    // than train N unrelated copies into one folder.
    if (const char* n = std::getenv("SLURM_NTASKS"); n && std::atoi(n) > 1 && std::getenv("SLURM_PROCID"))
      throw Error("srun started " + std::string(n) +
                  " tasks without MPI's process manager, so each would train alone: launch with srun --mpi=pmix "
                  "(or pmi2), or with mpirun inside the allocation");
    slot = std::make_unique<LocalCommunicator>();
    return *slot;
  }
  const std::string name = backend.name();
  if (name == "cpu") {
    slot = std::make_unique<MpiCommunicator>();
  } else if (name == "cuda" || name == "cuda:fp32") {
#ifdef SUBLLM_HAVE_NCCL
    slot = make_nccl_communicator(backend);
#else
    throw Error("--device " + name +
                " under an MPI launcher needs NCCL, and this build has none: install NCCL (libnccl-dev, or the "
                "CUDA toolkit's nccl.h and libnccl.so) and rebuild, or train with --device cpu");
#endif
  } else {
    throw Error("no multi-process communicator for device '" + name + "'");
  }
  return *slot;
}

void abort_job(int code) {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (!initialised || finalised) return;  // a rank that never joined: mpirun ends the job on its exit status
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size > 1) MPI_Abort(MPI_COMM_WORLD, code);
}

std::vector<int64_t> shard_bounds(int64_t n, int ranks, int64_t align) {
  check(n >= 0, "shard_bounds: negative length");
  check(ranks >= 1, "shard_bounds: needs at least one rank");
  check(align >= 1, "shard_bounds: align must be positive");
  std::vector<int64_t> b(size_t(ranks) + 1);
  const int64_t q = n / ranks, rem = n % ranks;
  for (int r = 0; r < ranks; ++r) {
    const int64_t exact = q * r + rem * r / ranks;  // floor(n * r / ranks) without overflow
    b[r] = exact / align * align;
  }
  b[ranks] = n;
  return b;
}

}  // namespace subllm
