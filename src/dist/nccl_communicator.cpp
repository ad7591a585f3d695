// NCCL between CUDA backends (built with SUBLLM_HAVE_NCCL). MPI starts the processes, carries
// NCCL's unique id from rank 0 and does the host collectives; NCCL moves device memory on the
// backend's stream, so a reduction runs after the backward kernels queued before it and before
// anything queued after it.
//
// One GPU per process: the CUDA backend exists before its communicator and uses GPU
// SUBLLM_CUDA_DEVICE (default 0). With several ranks on one machine give each its own GPU, e.g.
//   mpirun -np 4 bash -c 'SUBLLM_CUDA_DEVICE=$OMPI_COMM_WORLD_LOCAL_RANK exec subllm train ...'
// (srun: $SLURM_LOCALID), or CUDA_VISIBLE_DEVICES per rank. Ranks sharing a GPU are refused
// with that advice. One rank per GPU machine needs nothing.
//
// If a peer dies, NCCL calls may wait on the stream; mpirun or srun then ends the whole job.
#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda_backend.h"
#include "dist/mpi_communicator.h"
#include "subllm/error.h"

namespace subllm {

namespace {

void nccl_check(ncclResult_t r, const char* op) {
  if (r != ncclSuccess) throw Error(std::string(op) + " failed: " + ncclGetErrorString(r));
}

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(CudaBackend& backend) : backend_(backend) {
    rank_ = host_.rank();
    size_ = host_.size();
    cuda_check(cudaSetDevice(backend_.device()), "cudaSetDevice (NCCL communicator)");
    refuse_shared_gpus();
    ncclUniqueId id;
    std::memset(&id, 0, sizeof id);
    if (rank_ == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    host_.broadcast_host(&id, sizeof id);
    nccl_check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  }
  // Lives for the program (communicator_for never destroys it); destroying frees the comm.
  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  const char* name() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce_sum_start(View x) override {
    float* p = dense_f32(x, "all_reduce_sum_start");
    if (x.numel() == 0) return;
    nccl_check(ncclAllReduce(p, p, size_t(x.numel()), ncclFloat, ncclSum, comm_, backend_.stream()), "ncclAllReduce");
    pending_ = true;
  }

  // Waits for the backend's stream: the reductions and whatever was queued before them.
  double wait_reductions() override {
    const auto t0 = std::chrono::steady_clock::now();
    if (pending_) {
      pending_ = false;
      cuda_check(cudaStreamSynchronize(backend_.stream()), "cudaStreamSynchronize (NCCL reductions)");
      ncclResult_t async = ncclSuccess;
      nccl_check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
      nccl_check(async, "ncclAllReduce");
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  // ncclAllGather needs equal counts and the bounds may differ: each owner broadcasts its slice,
  // all in one group. Queued on the backend's stream like every backend method (to_host or sync
  // sees the result).
  void all_gather(View x, const std::vector<int64_t>& bounds) override {
    float* p = dense_f32(x, "all_gather");
    check_bounds(bounds, size_, x.numel(), "all_gather");
    if (size_ == 1) return;
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (int r = 0; r < size_; ++r) {
      const int64_t count = bounds[r + 1] - bounds[r];
      if (count == 0) continue;
      float* slice = p + bounds[r];
      const ncclResult_t res = ncclBroadcast(slice, slice, size_t(count), ncclFloat, r, comm_, backend_.stream());
      if (res != ncclSuccess) {
        ncclGroupEnd();
        nccl_check(res, "ncclBroadcast (all_gather)");
      }
    }
    nccl_check(ncclGroupEnd(), "ncclGroupEnd (all_gather)");
  }

  void all_reduce_sum_host(double* values, int n) override { host_.all_reduce_sum_host(values, n); }
  void gather_host(const float* local, float* full, const std::vector<int64_t>& bounds) override {
    host_.gather_host(local, full, bounds);
  }
  void broadcast_host(void* data, int64_t n) override { host_.broadcast_host(data, n); }
  void barrier() override { host_.barrier(); }

 private:
  // NCCL refuses two ranks on one GPU with a terse message; say what to do instead.
  void refuse_shared_gpus() {
    constexpr int kLen = 128;
    char mine[kLen] = {};
    char bus[32] = {};
    cuda_check(cudaDeviceGetPCIBusId(bus, sizeof bus, backend_.device()), "cudaDeviceGetPCIBusId");
    char host[64] = {};
    gethostname(host, sizeof host - 1);
    std::snprintf(mine, kLen, "%s %s", host, bus);
    std::vector<char> all(size_t(size_) * kLen);
    mpi_check(MPI_Allgather(mine, kLen, MPI_CHAR, all.data(), kLen, MPI_CHAR, host_.comm()),
              "MPI_Allgather (GPU identities)");
    for (int a = 0; a < size_; ++a)
      for (int b = a + 1; b < size_; ++b)
        if (std::strncmp(&all[size_t(a) * kLen], &all[size_t(b) * kLen], kLen) == 0)
          throw Error("ranks " + std::to_string(a) + " and " + std::to_string(b) + " both use GPU " +
                      std::string(&all[size_t(a) * kLen]) +
                      ": give each rank its own GPU, e.g. mpirun ... bash -c "
                      "'SUBLLM_CUDA_DEVICE=$OMPI_COMM_WORLD_LOCAL_RANK exec subllm train ...' "
                      "(srun: $SLURM_LOCALID), or CUDA_VISIBLE_DEVICES per rank");
  }

  CudaBackend& backend_;
  MpiCommunicator host_;
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  bool pending_ = false;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (!cuda) throw Error(std::string("the NCCL communicator serves CUDA backends, not '") + backend.name() + "'");
  return std::make_unique<NcclCommunicator>(*cuda);
}

}  // namespace subllm
