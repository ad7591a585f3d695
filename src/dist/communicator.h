#pragma once
// The processes of a data-parallel job and the collectives training needs, on a proven
// transport: MPI between CPU backends (host memory), NCCL between CUDA backends (device memory,
// its unique id broadcast over MPI). A program started without a launcher (no mpirun, no srun)
// is one rank, and every collective is the identity. The backend chooses the implementation;
// the trainer never does.
//
// Every rank must call the collectives in the same order. Reductions of backend memory are
// started asynchronously (from the gradient-ready hook, so they overlap the rest of the
// backward) and completed together by wait_reductions().
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace subllm {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const char* name() const = 0;  // "local", "mpi" or "nccl"
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // ---- backend memory (F32 views of the backend this communicator serves) -----------------
  // Starts summing x across ranks, in place. Returns at once; x must not be touched until
  // wait_reductions() returns.
  virtual void all_reduce_sum_start(View x) = 0;
  // Completes every started reduction; returns the seconds spent waiting for them.
  virtual double wait_reductions() = 0;
  // In place: rank r's elements [bounds[r], bounds[r+1]) of x reach every rank (bounds has
  // size() + 1 entries, from 0 to x's length). Blocking.
  virtual void all_gather(View x, const std::vector<int64_t>& bounds) = 0;

  // ---- host memory ------------------------------------------------------------------------
  // Sums n doubles across ranks, in place, on every rank. Blocking.
  virtual void all_reduce_sum_host(double* values, int n) = 0;
  // Rank 0 receives every rank's slice [bounds[r], bounds[r+1]) into full (the whole length);
  // `local` holds this rank's slice. `full` is ignored on other ranks. Blocking.
  virtual void gather_host(const float* local, float* full, const std::vector<int64_t>& bounds) = 0;
  // Rank 0's n bytes reach every rank. Blocking.
  virtual void broadcast_host(void* data, int64_t n) = 0;
  virtual void barrier() = 0;
};

// The communicator of this process for `backend`: one rank without a launcher; under mpirun or
// srun, MPI for the CPU backend and NCCL for the CUDA backend. Made on first use; lives for the
// program. An error names what is missing (e.g. a build without NCCL).
Communicator& communicator_for(Backend& backend);

// Whether this process was started by an MPI launcher (mpirun, srun): the environment says so.
bool launched_by_mpi();

// Ends the whole job with `code` when this process is one rank of several (MPI_Abort), so the
// other ranks stop instead of waiting in a collective; returns when there is only one rank.
void abort_job(int code);

// Splits n elements into `ranks` contiguous slices of nearly equal length, each boundary a
// multiple of `align` elements (the last slice takes the rest): ranks + 1 bounds from 0 to n.
std::vector<int64_t> shard_bounds(int64_t n, int ranks, int64_t align = 16);

}  // namespace subllm
