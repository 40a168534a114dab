// The one-shot exchange between the GPUs of one node (cuda/peer_gather.cu) of one rank:
// its exchange buffer, shared with the other ranks' processes through CUDA IPC handles,
// and the mapped buffers of theirs (no PyTorch).
//
// Made in two steps, with the handles passed between them over MPI by the caller: every
// rank makes its PeerExchange and gives handle() to all; then each connect()s to everyone's.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace star {

class PeerExchange {
 public:
  PeerExchange(int rank, int world, int device, int64_t slot_bytes, double timeout_s);
  ~PeerExchange();
  PeerExchange(const PeerExchange&) = delete;
  PeerExchange& operator=(const PeerExchange&) = delete;

  std::string handle() const;  // of this rank's buffer, for every other rank
  void connect(const std::vector<std::string>& handles);  // every rank's, by rank

  // Enqueues the exchange of `part` and the merge (see peer_gather_merge_cuda).
  void gather_merge(const void* part, int64_t part_bytes, int64_t rows, int dim, DType dtype,
                    void* o_out, float* lse_out, cudaStream_t stream);
  // Throws if a call waited past the timeout for a peer (that is, one is dead or stuck).
  void check() const;

  // Whether a slot holds a part of part_bytes and rows (larger gathers go elsewhere).
  bool slot_holds(int64_t part_bytes, int64_t rows) const {
    return 2 * part_bytes <= slot_bytes_ && rows <= kMaxRows;  // a word per 8-byte cell
  }

 private:
  int rank_, world_, device_;
  int64_t slot_bytes_;
  double timeout_s_;
  char* buffer_ = nullptr;
  uint32_t* epoch_ = nullptr;
  int* failed_ = nullptr;            // mapped host memory
  int* failed_on_device_ = nullptr;
  PeerBuffers peers_{};
  std::vector<char*> opened_;        // other ranks' buffers, to close
};

}  // namespace star
