// NCCL communicator of one rank: the GPU data plane between ranks (no PyTorch).
//
// Built from a unique id that rank 0 makes and the launcher broadcasts (over MPI). Every
// operation is enqueued on the caller's stream and returns at once, so that a step can be
// captured in a CUDA graph.
//
// A dead or stuck peer must end the job, not hang it. A watchdog thread watches every
// operation enqueued outside graph capture, from the moment the host enters the NCCL call
// until its work on the GPU is done, and NCCL's asynchronous error; wait() bounds the work
// it waits for, which is how the collectives of a replayed CUDA graph (which the watchdog
// never sees enqueued) are watched. When one is older than the timeout, or NCCL reports an
// error, the communicator fails: the watchdog aborts it, so that its kernels end and a host
// thread blocked behind them (in NCCL, or in a kernel launch that waits for them, as the
// first launch of a lazily loaded kernel does) goes on, and the next call on this
// communicator, or wait(), throws with the reason.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

namespace star {

class NcclComm {
 public:
  // NCCL_UNIQUE_ID_BYTES bytes, to be sent to every rank.
  static std::string make_unique_id();

  NcclComm(const std::string& unique_id, int rank, int world, int device, double timeout_s);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // recv holds world * bytes: rank r's send at offset r * bytes.
  void all_gather(const void* send, void* recv, size_t bytes, cudaStream_t stream);
  void broadcast(void* buffer, size_t bytes, int root, cudaStream_t stream);
  // Sums `count` elements of `type` over all ranks, in place.
  void all_reduce_sum(void* buffer, size_t count, ncclDataType_t type, cudaStream_t stream);
  // Sends to dst and receives from src at once (one NCCL group), for rings.
  void send_recv(const void* send, int dst, void* recv, int src, size_t bytes,
                 cudaStream_t stream);

  // Blocks until the work on `stream` is done; throws if the communicator failed, or, when
  // that work is not done within the timeout, fails it with a reason that names `what`.
  void wait(cudaStream_t stream, const std::string& what);

  int rank() const { return rank_; }
  int world() const { return world_; }
  double timeout_s() const { return timeout_.count(); }
  bool failed() const { return failed_; }  // a peer stopped answering, or NCCL failed: aborted

 private:
  using Clock = std::chrono::steady_clock;
  struct InFlight {
    Clock::time_point since;
    uint64_t sequence;  // its progress slot reads at least this once it is done
  };
  static constexpr uint64_t kProgressSlots = 1 << 16;

  static void configure_environment();
  void check(ncclResult_t result, const char* what);
  void warm_up();
  // Runs one NCCL call under the watchdog's eye and tracks its work until it is done.
  template <typename Call>
  void enqueue(const char* what, cudaStream_t stream, Call call);
  void throw_if_failed();
  void watch();
  void fail(const std::string& reason);  // with mutex_ held; the watchdog aborts

  ncclComm_t comm_ = nullptr;
  int rank_, world_, device_;
  std::chrono::duration<double> timeout_;

  // Operations' completion, written by the GPU into mapped host memory: the watchdog reads
  // it without CUDA calls, which could block behind the very kernel that is stuck.
  uint64_t* progress_ = nullptr;
  uint64_t* progress_on_device_ = nullptr;
  uint64_t enqueued_ = 0;
  std::atomic<Clock::rep> host_call_since_{0};  // 0: the host is not inside an NCCL call
  std::atomic<bool> failed_{false};
  std::mutex mutex_;  // guards what follows
  std::deque<InFlight> in_flight_;
  std::string failure_;
  bool aborted_ = false;
  bool stopping_ = false;
  std::condition_variable stop_;
  std::thread watchdog_;
};

}  // namespace star
