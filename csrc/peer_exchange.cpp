#include "peer_exchange.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace star {

PeerExchange::PeerExchange(int rank, int world, int device, int64_t slot_bytes, double timeout_s)
    : rank_(rank), world_(world), device_(device), slot_bytes_(slot_bytes), timeout_s_(timeout_s) {
  if (world < 1 || world > kMaxPeers) throw std::invalid_argument("peer exchange: 1 to 8 ranks");
  if (slot_bytes <= 0 || slot_bytes % 16 != 0) {
    throw std::invalid_argument("peer exchange: slots must be a positive multiple of 16 bytes");
  }
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  const size_t bytes = 2 * world * slot_bytes;
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&buffer_), bytes), "peer exchange: cudaMalloc");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&epoch_), sizeof(uint32_t)), "peer exchange: cudaMalloc");
  check_cuda(cudaMemset(buffer_, 0, bytes), "peer exchange: cudaMemset");  // calls count from 1
  check_cuda(cudaMemset(epoch_, 0, sizeof(uint32_t)), "peer exchange: cudaMemset");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&failed_), sizeof(int), cudaHostAllocMapped),
             "peer exchange: cudaHostAlloc");
  *failed_ = 0;
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&failed_on_device_), failed_, 0),
             "peer exchange: cudaHostGetDevicePointer");
  check_cuda(cudaDeviceSynchronize(), "peer exchange: zeroing");  // before any peer writes
  peers_.base[rank] = buffer_;
}

PeerExchange::~PeerExchange() {
  cudaSetDevice(device_);
  for (char* peer : opened_) cudaIpcCloseMemHandle(peer);
  if (buffer_ != nullptr) cudaFree(buffer_);
  if (epoch_ != nullptr) cudaFree(epoch_);
  if (failed_ != nullptr) cudaFreeHost(failed_);
}

std::string PeerExchange::handle() const {
  cudaIpcMemHandle_t handle;
  check_cuda(cudaIpcGetMemHandle(&handle, buffer_), "peer exchange: cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void PeerExchange::connect(const std::vector<std::string>& handles) {
  if (static_cast<int>(handles.size()) != world_) {
    throw std::invalid_argument("peer exchange: one handle per rank expected");
  }
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    cudaIpcMemHandle_t handle;
    if (handles[r].size() != sizeof(handle)) throw std::invalid_argument("peer exchange: bad handle");
    std::copy(handles[r].begin(), handles[r].end(), reinterpret_cast<char*>(&handle));
    void* peer = nullptr;
    check_cuda(cudaIpcOpenMemHandle(&peer, handle, cudaIpcMemLazyEnablePeerAccess),
               "peer exchange: cudaIpcOpenMemHandle");
    opened_.push_back(static_cast<char*>(peer));
    peers_.base[r] = static_cast<char*>(peer);
  }
}

void PeerExchange::gather_merge(const void* part, int64_t part_bytes, int64_t rows, int dim,
                                DType dtype, void* o_out, float* lse_out, cudaStream_t stream) {
  check();
  if (static_cast<int>(opened_.size()) != world_ - 1) throw std::logic_error("peer exchange: not connected");
  peer_gather_merge_cuda(peers_, rank_, world_, slot_bytes_, part, part_bytes, rows, dim, dtype,
                         epoch_, timeout_s_, failed_on_device_, o_out, lse_out, stream);
}

void PeerExchange::check() const {
  if (*reinterpret_cast<volatile int*>(failed_) != 0) {
    char seconds[32];
    std::snprintf(seconds, sizeof(seconds), "%g", timeout_s_);
    throw std::runtime_error(std::string("peer exchange: no word from a peer for ") + seconds +
                             " s: a peer rank is dead or stuck");
  }
}

}  // namespace star
