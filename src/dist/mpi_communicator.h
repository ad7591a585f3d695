#pragma once
// Private to src/dist (and its tests): the MPI communicator, the NCCL one's factory, and the
// argument checks every communicator shares.
// The C API only: no MPI C++ bindings (deprecated; they would need libmpi_cxx).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "dist/communicator.h"

namespace subllm {

// ---- shared checks (communicator.cpp) ---------------------------------------------------------
// x as one contiguous run of F32 elements (a dense matrix or a vector); an Error naming `op`
// otherwise.
float* dense_f32(const View& x, const char* op);
// bounds: ranks + 1 non-decreasing entries from 0 to n; an Error naming `op` otherwise.
void check_bounds(const std::vector<int64_t>& bounds, int ranks, int64_t n, const char* op);

// ---- MPI (mpi_communicator.cpp) ---------------------------------------------------------------
// Initialises MPI once per process (MPI_THREAD_FUNNELED: only the thread that made the first
// communicator may call collectives) unless someone else already did; finalises it at exit when
// it initialised it. Thread-safe.
void mpi_init_once();
// Throws an Error naming `op` and MPI's message when rc is not MPI_SUCCESS.
void mpi_check(int rc, const char* op);

// Collectives on a duplicate of MPI_COMM_WORLD (errors returned, not fatal), on host memory.
// If a peer dies, mpirun (OpenMPI) or srun ends the whole job; nothing here waits for that.
class MpiCommunicator final : public Communicator {
 public:
  // MPI counts are int: a call moves at most max_count elements (tests lower it to exercise the
  // split paths).
  static constexpr int64_t kMaxCount = int64_t(1) << 30;
  explicit MpiCommunicator(int64_t max_count = kMaxCount);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  const char* name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce_sum_start(View x) override;
  double wait_reductions() override;
  void all_gather(View x, const std::vector<int64_t>& bounds) override;
  void all_reduce_sum_host(double* values, int n) override;
  void gather_host(const float* local, float* full, const std::vector<int64_t>& bounds) override;
  void broadcast_host(void* data, int64_t n) override;
  void barrier() override;

  MPI_Comm comm() const { return comm_; }
  // The same collectives on raw host floats.
  void all_gather_host(float* x, const std::vector<int64_t>& bounds);

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  int64_t max_count_;
  std::vector<MPI_Request> pending_;
};

#ifdef SUBLLM_HAVE_NCCL
// nccl_communicator.cpp: NCCL between CUDA backends, bootstrapped over MPI. `backend` must be a
// CudaBackend.
std::unique_ptr<Communicator> make_nccl_communicator(Backend& backend);
#endif

}  // namespace subllm
