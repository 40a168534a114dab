// NCCL communicator of one rank: the GPU data plane between ranks (no PyTorch).
//
// Built from a unique id that rank 0 makes and the launcher broadcasts (over MPI). Every
// operation is enqueued on the caller's stream and returns at once, so that a step can be
// captured in a CUDA graph. wait() is where a dead or stuck peer is noticed: it polls the
// stream and NCCL's asynchronous error, and past the timeout aborts the communicator (which
// ends its kernels) and throws, instead of hanging forever.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <string>

namespace star {

class NcclComm {
 public:
  // NCCL_UNIQUE_ID_BYTES bytes, to be sent to every rank.
  static std::string make_unique_id();

  NcclComm(const std::string& unique_id, int rank, int world, int device);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // recv holds world * bytes: rank r's send at offset r * bytes.
  void all_gather(const void* send, void* recv, size_t bytes, cudaStream_t stream);
  void broadcast(void* buffer, size_t bytes, int root, cudaStream_t stream);
  // Sends to dst and receives from src at once (one NCCL group), for rings.
  void send_recv(const void* send, int dst, void* recv, int src, size_t bytes,
                 cudaStream_t stream);

  // Blocks until the work on `stream` is done; throws (after aborting the communicator)
  // on an NCCL error or when it takes longer than timeout_s.
  void wait(cudaStream_t stream, double timeout_s);

  // Ends every operation of this communicator in flight, on this rank.
  void abort();

  int rank() const { return rank_; }
  int world() const { return world_; }

 private:
  static void configure_environment();
  void check(ncclResult_t result, const char* what);
  void warm_up();

  static constexpr double kWarmUpTimeoutS = 600.0;

  ncclComm_t comm_ = nullptr;
  int rank_, world_;
  bool aborted_ = false;
};

}  // namespace star
