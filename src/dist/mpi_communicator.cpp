// MPI between CPU backends: the gradient sums as non-blocking all-reduces that progress while
// the backward runs, and every other collective blocking, all on host memory.
//
// MPI counts are int. Calls move at most max_count (2^30) elements: longer all-reduces are
// several requests and longer broadcasts several calls; an all-gather or gather longer than
// that is done slice by slice from each owner (broadcasts, or sends to rank 0) instead of one
// Allgatherv/Gatherv, whose displacements are int too.
//
// Failures: the communicator returns MPI errors (MPI_ERRORS_RETURN) and they become Errors
// naming the call. A rank that dies or exits with a non-zero status makes mpirun (OpenMPI) or
// srun end the whole job, so survivors do not wait in a collective forever.
#include "dist/mpi_communicator.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "subllm/error.h"

namespace subllm {

namespace {

constexpr int kGatherTag = 4242;

void finalize_at_exit() {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (initialised && !finalised) MPI_Finalize();
}

std::string error_string(int rc) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS || len <= 0) return "MPI error code " + std::to_string(rc);
  return std::string(msg, size_t(len));
}

}  // namespace

void mpi_check(int rc, const char* op) {
  if (rc != MPI_SUCCESS) throw Error(std::string(op) + " failed: " + error_string(rc));
}

void mpi_init_once() {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (finalised) throw Error("MPI was already finalised: a communicator cannot be made after MPI_Finalize");
  if (initialised) return;  // someone else initialised MPI; they finalise it
  int provided = 0;
  mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  // Registered once: MPI_Initialized is true from here on. Not run after MPI_Abort, which ends
  // the process.
  std::atexit(finalize_at_exit);
  if (provided < MPI_THREAD_FUNNELED)
    throw Error("MPI_Init_thread: the MPI library offers no MPI_THREAD_FUNNELED support (level " +
                std::to_string(provided) + ")");
}

MpiCommunicator::MpiCommunicator(int64_t max_count) : max_count_(max_count) {
  check(max_count >= 1 && max_count <= INT_MAX, "MpiCommunicator: max_count must be in [1, INT_MAX]");
  mpi_init_once();
  mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), "MPI_Comm_dup");
  mpi_check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  mpi_check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
}

MpiCommunicator::~MpiCommunicator() {
  int finalised = 0;
  MPI_Finalized(&finalised);
  // Requests still pending are left to MPI (freeing a collective's request is erroneous).
  if (!finalised && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiCommunicator::all_reduce_sum_start(View x) {
  float* p = dense_f32(x, "all_reduce_sum_start");
  const int64_t n = x.numel();
  if (!pending_.empty()) {
    // Lets the earlier reductions advance (OpenMPI progresses them only inside MPI calls).
    int done = 0;
    mpi_check(MPI_Testall((int)pending_.size(), pending_.data(), &done, MPI_STATUSES_IGNORE), "MPI_Testall");
    if (done) pending_.clear();
  }
  for (int64_t off = 0; off < n; off += max_count_) {
    const int count = (int)std::min(max_count_, n - off);
    MPI_Request req = MPI_REQUEST_NULL;
    mpi_check(MPI_Iallreduce(MPI_IN_PLACE, p + off, count, MPI_FLOAT, MPI_SUM, comm_, &req), "MPI_Iallreduce");
    pending_.push_back(req);
  }
}

double MpiCommunicator::wait_reductions() {
  const auto t0 = std::chrono::steady_clock::now();
  if (!pending_.empty()) {
    std::vector<MPI_Status> status(pending_.size());
    const int rc = MPI_Waitall((int)pending_.size(), pending_.data(), status.data());
    pending_.clear();
    if (rc == MPI_ERR_IN_STATUS)
      for (const MPI_Status& s : status) mpi_check(s.MPI_ERROR, "MPI_Iallreduce (MPI_Waitall)");
    mpi_check(rc, "MPI_Waitall");
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void MpiCommunicator::all_gather(View x, const std::vector<int64_t>& bounds) {
  float* p = dense_f32(x, "all_gather");
  check_bounds(bounds, size_, x.numel(), "all_gather");
  all_gather_host(p, bounds);
}

void MpiCommunicator::all_gather_host(float* x, const std::vector<int64_t>& bounds) {
  check_bounds(bounds, size_, bounds.empty() ? 0 : bounds.back(), "all_gather");
  const int64_t n = bounds.back();
  if (size_ == 1 || n == 0) return;
  if (n <= max_count_) {
    std::vector<int> counts(size_), displs(size_);
    for (int r = 0; r < size_; ++r) {
      counts[r] = int(bounds[r + 1] - bounds[r]);
      displs[r] = int(bounds[r]);
    }
    mpi_check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, x, counts.data(), displs.data(), MPI_FLOAT, comm_),
              "MPI_Allgatherv");
    return;
  }
  // Beyond int displacements: each owner broadcasts its slice, max_count_ elements at a time.
  for (int r = 0; r < size_; ++r)
    for (int64_t off = bounds[r]; off < bounds[r + 1]; off += max_count_) {
      const int count = (int)std::min(max_count_, bounds[r + 1] - off);
      mpi_check(MPI_Bcast(x + off, count, MPI_FLOAT, r, comm_), "MPI_Bcast (all_gather)");
    }
}

void MpiCommunicator::all_reduce_sum_host(double* values, int n) {
  check(n >= 0, "all_reduce_sum_host: negative count");
  if (n == 0 || size_ == 1) return;
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, values, n, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce");
}

void MpiCommunicator::gather_host(const float* local, float* full, const std::vector<int64_t>& bounds) {
  check_bounds(bounds, size_, bounds.empty() ? 0 : bounds.back(), "gather_host");
  const int64_t n = bounds.back();
  const int64_t mine = bounds[rank_ + 1] - bounds[rank_];
  if (rank_ == 0 && n > 0 && !full) throw Error("gather_host: rank 0 needs the full buffer");
  if (n <= max_count_) {
    std::vector<int> counts(size_), displs(size_);
    for (int r = 0; r < size_; ++r) {
      counts[r] = int(bounds[r + 1] - bounds[r]);
      displs[r] = int(bounds[r]);
    }
    const void* send = (rank_ == 0 && local == full + bounds[0]) ? MPI_IN_PLACE : local;
    mpi_check(MPI_Gatherv(send, (int)mine, MPI_FLOAT, full, counts.data(), displs.data(), MPI_FLOAT, 0, comm_),
              "MPI_Gatherv");
    return;
  }
  // Beyond int displacements: every rank sends its slice to rank 0, max_count_ elements at a time.
  if (rank_ == 0) {
    if (mine > 0 && local != full) std::memmove(full, local, size_t(mine) * sizeof(float));
    for (int r = 1; r < size_; ++r)
      for (int64_t off = bounds[r]; off < bounds[r + 1]; off += max_count_) {
        const int count = (int)std::min(max_count_, bounds[r + 1] - off);
        mpi_check(MPI_Recv(full + off, count, MPI_FLOAT, r, kGatherTag, comm_, MPI_STATUS_IGNORE),
                  "MPI_Recv (gather_host)");
      }
  } else {
    for (int64_t off = 0; off < mine; off += max_count_) {
      const int count = (int)std::min(max_count_, mine - off);
      mpi_check(MPI_Send(local + off, count, MPI_FLOAT, 0, kGatherTag, comm_), "MPI_Send (gather_host)");
    }
  }
}

void MpiCommunicator::broadcast_host(void* data, int64_t n) {
  check(n >= 0, "broadcast_host: negative size");
  if (size_ == 1) return;
  for (int64_t off = 0; off < n; off += max_count_) {
    const int count = (int)std::min(max_count_, n - off);
    mpi_check(MPI_Bcast(static_cast<char*>(data) + off, count, MPI_BYTE, 0, comm_), "MPI_Bcast");
  }
}

void MpiCommunicator::barrier() { mpi_check(MPI_Barrier(comm_), "MPI_Barrier"); }

}  // namespace subllm
