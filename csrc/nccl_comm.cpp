#include "nccl_comm.h"

#include "cuda/kernels.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace star {

void NcclComm::configure_environment() {
  // Connect the collectives' peers at start-up, while every rank is known to be here, not
  // lazily at a first call that would block until a (possibly stuck) peer joins. NCCL reads
  // its environment at its first call, so this comes before any. A user's setting wins.
  setenv("NCCL_RUNTIME_CONNECT", "0", /*overwrite=*/0);
}

std::string NcclComm::make_unique_id() {
  configure_environment();
  ncclUniqueId id;
  const ncclResult_t result = ncclGetUniqueId(&id);
  if (result != ncclSuccess) {
    throw std::runtime_error(std::string("ncclGetUniqueId: ") + ncclGetErrorString(result));
  }
  return std::string(id.internal, sizeof(id.internal));
}

NcclComm::NcclComm(const std::string& unique_id, int rank, int world, int device,
                   double timeout_s)
    : rank_(rank), world_(world), device_(device), timeout_(timeout_s) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    throw std::invalid_argument("NCCL unique id must be " + std::to_string(sizeof(id.internal)) +
                                " bytes");
  }
  if (!(timeout_s > 0)) throw std::invalid_argument("NCCL timeout must be > 0 s");
  std::copy(unique_id.begin(), unique_id.end(), id.internal);
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  configure_environment();
  // Blocking configuration: a call returns once its work is enqueued on the stream (it
  // never waits for the GPU), so enqueueing costs microseconds.
  check(ncclCommInitRank(&comm_, world, id, rank), "ncclCommInitRank");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&progress_), kProgressSlots * sizeof(uint64_t),
                           cudaHostAllocMapped),
             "cudaHostAlloc");
  std::fill(progress_, progress_ + kProgressSlots, 0);
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&progress_on_device_), progress_, 0),
             "cudaHostGetDevicePointer");
  watchdog_ = std::thread(&NcclComm::watch, this);
  warm_up();
}

NcclComm::~NcclComm() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  stop_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  if (comm_ != nullptr && !failed_) ncclCommDestroy(comm_);
  if (progress_ != nullptr && !failed_) cudaFreeHost(progress_);  // after a failure, kernels may still write
}

void NcclComm::warm_up() {
  // Point-to-point peers are connected at their first send; connect the ring's now, so
  // that later calls only enqueue.
  void* buffer = nullptr;
  check_cuda(cudaMalloc(&buffer, 4 * static_cast<size_t>(world_)), "cudaMalloc");
  char* bytes = static_cast<char*>(buffer);
  all_gather(bytes, bytes + world_, 1, nullptr);
  broadcast(bytes, 1, world_ - 1, nullptr);
  send_recv(bytes, (rank_ + 1) % world_, bytes + 2 * world_, (rank_ + world_ - 1) % world_, 1,
            nullptr);
  wait(nullptr, "connecting the peers");
  check_cuda(cudaFree(buffer), "cudaFree");
}

void NcclComm::check(ncclResult_t result, const char* what) {
  if (result == ncclSuccess) return;
  std::string message = std::string(what) + ": " + ncclGetErrorString(result);
  if (comm_ != nullptr && !failed_) {
    const char* last = ncclGetLastError(comm_);
    if (last != nullptr && *last) message += std::string(" (") + last + ")";
  }
  throw std::runtime_error(message);
}

template <typename Call>
void NcclComm::enqueue(const char* what, cudaStream_t stream, Call call) {
  throw_if_failed();
  host_call_since_ = Clock::now().time_since_epoch().count();
  const ncclResult_t result = call();
  host_call_since_ = 0;
  throw_if_failed();  // aborted while the host was blocked in the call
  check(result, what);
  cudaStreamCaptureStatus capture;
  check_cuda(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) return;  // a graph's replays are waited on by wait()
  const uint64_t sequence = ++enqueued_;
  signal_progress_cuda(progress_on_device_ + sequence % kProgressSlots, sequence, stream);
  std::lock_guard<std::mutex> lock(mutex_);
  in_flight_.push_back({Clock::now(), sequence});
}

void NcclComm::all_gather(const void* send, void* recv, size_t bytes, cudaStream_t stream) {
  enqueue("ncclAllGather", stream,
          [&] { return ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream); });
}

void NcclComm::broadcast(void* buffer, size_t bytes, int root, cudaStream_t stream) {
  enqueue("ncclBroadcast", stream,
          [&] { return ncclBroadcast(buffer, buffer, bytes, ncclUint8, root, comm_, stream); });
}

void NcclComm::all_reduce_sum(void* buffer, size_t count, ncclDataType_t type, cudaStream_t stream) {
  enqueue("ncclAllReduce", stream,
          [&] { return ncclAllReduce(buffer, buffer, count, type, ncclSum, comm_, stream); });
}

void NcclComm::send_recv(const void* send, int dst, void* recv, int src, size_t bytes,
                         cudaStream_t stream) {
  enqueue("ncclSend/ncclRecv", stream, [&] {
    ncclResult_t result = ncclGroupStart();
    if (result == ncclSuccess) result = ncclSend(send, bytes, ncclUint8, dst, comm_, stream);
    if (result == ncclSuccess) result = ncclRecv(recv, bytes, ncclUint8, src, comm_, stream);
    const ncclResult_t end = ncclGroupEnd();
    return result != ncclSuccess ? result : end;
  });
}

void NcclComm::wait(cudaStream_t stream, const std::string& what) {
  cudaEvent_t done;
  check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
  check_cuda(cudaEventRecord(done, stream), "cudaEventRecord");
  const Clock::time_point deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout_);
  cudaError_t status;
  while ((status = cudaEventQuery(done)) == cudaErrorNotReady && !failed_) {
    if (Clock::now() > deadline) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!failed_) {
        char seconds[32];
        std::snprintf(seconds, sizeof(seconds), "%g", timeout_.count());
        fail(std::string("NCCL: no progress for ") + seconds + " s: " + what +
             " did not complete: a peer rank is dead or stuck; communicator aborted");
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  cudaEventDestroy(done);  // its work may never end: the event is released when it does
  throw_if_failed();
  check_cuda(status, "waiting for the stream");
}

void NcclComm::throw_if_failed() {
  if (!failed_) return;
  std::lock_guard<std::mutex> lock(mutex_);
  throw std::runtime_error(failure_);
}

void NcclComm::fail(const std::string& reason) {
  failure_ = reason;
  failed_ = true;
  stop_.notify_all();  // the watchdog aborts: an abort can wait for the GPU, a failing caller must not
}

void NcclComm::watch() {
  // No CUDA calls here: one could wait behind the stuck kernel (see progress_).
  char seconds[32];
  std::snprintf(seconds, sizeof(seconds), "%g", timeout_.count());
  const std::string stuck = std::string("NCCL: no progress for ") + seconds +
                            " s: a peer rank is dead or stuck; communicator aborted";
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_ && !failed_) {
    stop_.wait_for(lock, std::chrono::milliseconds(20));
    if (stopping_ || failed_) break;
    const Clock::time_point now = Clock::now();
    ncclResult_t async_error = ncclSuccess;
    if (ncclCommGetAsyncError(comm_, &async_error) == ncclSuccess && async_error != ncclSuccess &&
        async_error != ncclInProgress) {
      fail(std::string("NCCL operation failed: ") + ncclGetErrorString(async_error) +
           "; communicator aborted");
      break;
    }
    const Clock::rep host_since = host_call_since_;
    if (host_since != 0 && now - Clock::time_point(Clock::duration(host_since)) > timeout_) {
      fail(stuck);
      break;
    }
    while (!in_flight_.empty()) {
      const InFlight& op = in_flight_.front();
      const volatile uint64_t* slot = progress_ + op.sequence % kProgressSlots;
      if (*slot >= op.sequence) {
        in_flight_.pop_front();
      } else {
        if (now - op.since > timeout_) fail(stuck);
        break;
      }
    }
  }
  if (failed_ && !aborted_) {
    aborted_ = true;
    lock.unlock();
    ncclCommAbort(comm_);  // ends this communicator's kernels; frees it
  }
}

}  // namespace star
