#include "nccl_comm.h"

#include "cuda/kernels.h"

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <thread>

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

NcclComm::NcclComm(const std::string& unique_id, int rank, int world, int device)
    : rank_(rank), world_(world) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    throw std::invalid_argument("NCCL unique id must be " + std::to_string(sizeof(id.internal)) +
                                " bytes");
  }
  std::copy(unique_id.begin(), unique_id.end(), id.internal);
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  configure_environment();
  // Blocking configuration: a call returns once its work is enqueued on the stream (it
  // never waits for the GPU), so enqueueing costs microseconds; wait() is where a dead
  // peer is noticed and the communicator aborted.
  check(ncclCommInitRank(&comm_, world, id, rank), "ncclCommInitRank");
  warm_up();
}

void NcclComm::warm_up() {
  // Point-to-point peers are connected at their first send; connect the ring's now, so
  // that later calls only enqueue and a peer that stops answering is caught by wait().
  void* buffer = nullptr;
  check_cuda(cudaMalloc(&buffer, 4 * static_cast<size_t>(world_)), "cudaMalloc");
  char* bytes = static_cast<char*>(buffer);
  all_gather(bytes, bytes + world_, 1, nullptr);
  broadcast(bytes, 1, world_ - 1, nullptr);
  send_recv(bytes, (rank_ + 1) % world_, bytes + 2 * world_, (rank_ + world_ - 1) % world_, 1,
            nullptr);
  wait(nullptr, kWarmUpTimeoutS);
  check_cuda(cudaFree(buffer), "cudaFree");
}

NcclComm::~NcclComm() {
  if (comm_ != nullptr && !aborted_) ncclCommDestroy(comm_);
}

void NcclComm::check(ncclResult_t result, const char* what) {
  if (result == ncclSuccess) return;
  std::string message = std::string(what) + ": " + ncclGetErrorString(result);
  if (comm_ != nullptr) {
    const char* last = ncclGetLastError(comm_);
    if (last != nullptr && *last) message += std::string(" (") + last + ")";
  }
  throw std::runtime_error(message);
}

void NcclComm::all_gather(const void* send, void* recv, size_t bytes, cudaStream_t stream) {
  check(ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream), "ncclAllGather");
}

void NcclComm::broadcast(void* buffer, size_t bytes, int root, cudaStream_t stream) {
  check(ncclBroadcast(buffer, buffer, bytes, ncclUint8, root, comm_, stream), "ncclBroadcast");
}

void NcclComm::send_recv(const void* send, int dst, void* recv, int src, size_t bytes,
                         cudaStream_t stream) {
  check(ncclGroupStart(), "ncclGroupStart");
  check(ncclSend(send, bytes, ncclUint8, dst, comm_, stream), "ncclSend");
  check(ncclRecv(recv, bytes, ncclUint8, src, comm_, stream), "ncclRecv");
  check(ncclGroupEnd(), "ncclGroupEnd");
}

void NcclComm::wait(cudaStream_t stream, double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  cudaEvent_t done;
  check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
  check_cuda(cudaEventRecord(done, stream), "cudaEventRecord");
  while (true) {
    const cudaError_t status = cudaEventQuery(done);
    if (status == cudaSuccess) break;
    if (status != cudaErrorNotReady) {
      cudaEventDestroy(done);
      check_cuda(status, "waiting for the stream");
    }
    ncclResult_t async_error = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &async_error), "ncclCommGetAsyncError");
    if (async_error != ncclSuccess) {
      abort();
      cudaEventDestroy(done);
      check(async_error, "NCCL operation failed");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      abort();
      cudaEventDestroy(done);
      throw std::runtime_error("NCCL: no progress for " + std::to_string(timeout_s) +
                               " s: a peer rank is dead or stuck; communicator aborted");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  cudaEventDestroy(done);
}

void NcclComm::abort() {
  if (comm_ != nullptr && !aborted_) {
    aborted_ = true;
    ncclCommAbort(comm_);
  }
}

}  // namespace star
