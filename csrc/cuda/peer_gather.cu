// One-shot gather + merge between the GPUs of one node over their peer memory (NVLink): a
// single small kernel per layer where NCCL's all-gather runs its protocol and a second
// kernel merges. Each rank stores its packed (o, lse) into every rank's exchange buffer and
// merges what the others stored into its own.
//
// No fences and no separate flags: every 4-byte word travels in an 8-byte cell with the
// call's number beside it, written by one 8-byte store, so a reader knows a word has
// arrived when its cell carries the current call (the "low latency" protocol of NCCL).
// Two parities of slots: a rank can be at most one call ahead of another (it cannot finish
// call n + 1 before every rank has sent, which each does only after finishing call n), so
// call n + 2 may reuse call n's slots, whose cells carry n, not n + 2.
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "dtype.cuh"
#include "kernels.h"
#include "lse.cuh"

namespace star {

namespace {

// Enough threads that each has a cell or two of a decode step's part per rank: the loads of
// a kernel this small are latency, so every thread issues all its ranks' loads at once.
constexpr int kThreads = 1024;

__device__ __forceinline__ void store_cell(uint2* cell, uint32_t word, uint32_t call) {
  asm volatile("st.volatile.global.v2.u32 [%0], {%1, %2};\n" ::"l"(cell), "r"(word), "r"(call) : "memory");
}
__device__ __forceinline__ uint2 load_cell(const uint2* cell) {
  uint2 c;  // read whole, as it was written
  asm volatile("ld.volatile.global.v2.u32 {%0, %1}, [%2];\n" : "=r"(c.x), "=r"(c.y) : "l"(cell) : "memory");
  return c;
}
__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;\n" : "=l"(t));
  return t;
}

// Element k of the 4 / sizeof(T) elements of type T in a word (little-endian).
template <typename T>
__device__ __forceinline__ float element(uint32_t word, int k) {
  const uint32_t bits = sizeof(T) == 4 ? word : word >> (16 * k);
  T value;
  memcpy(&value, &bits, sizeof(T));
  return to_float(value);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
peer_gather_merge_kernel(PeerBuffers peers, int rank, int world, int64_t slot_bytes,
                         const uint32_t* __restrict__ part, int64_t words, int64_t rows, int dim,
                         uint32_t* __restrict__ epoch, uint64_t timeout_ns, int* failed,
                         T* __restrict__ o_out, float* __restrict__ lse_out) {
  __shared__ uint32_t call;
  __shared__ uint64_t deadline;
  __shared__ float weights[kMaxPeers][kMaxRows];  // each rank's lse, then its merge weight
  if (threadIdx.x == 0) {
    call = *epoch + 1;
    deadline = now_ns() + timeout_ns;
  }
  __syncthreads();
  const int parity = call & 1;
  const char* slots = peers.base[rank] + parity * world * slot_bytes;
  auto cells_of = [&](int r) { return reinterpret_cast<const uint2*>(slots + r * slot_bytes); };
  const int64_t lse_first = rows * dim * static_cast<int64_t>(sizeof(T)) / 4;  // word index

  // 1. My part into slot (parity, rank) of every rank's buffer, a word per cell.
  for (int r = 0; r < world; ++r) {
    uint2* cells = reinterpret_cast<uint2*>(peers.base[r] + (parity * world + rank) * slot_bytes);
    for (int64_t i = threadIdx.x; i < words; i += kThreads) store_cell(cells + i, part[i], call);
  }
  // 2. Every rank's cells of my words here, waited for with a deadline; the lse words go to
  // shared memory.
  bool in_time = true;
  for (int64_t i = threadIdx.x; i < words; i += kThreads) {
    uint2 cell[kMaxPeers];
#pragma unroll
    for (int r = 0; r < kMaxPeers; ++r) {
      if (r < world) cell[r] = load_cell(cells_of(r) + i);
    }
#pragma unroll
    for (int r = 0; r < kMaxPeers; ++r) {
      if (r < world) {
        while (cell[r].y != call && in_time) {
          cell[r] = load_cell(cells_of(r) + i);
          in_time = now_ns() <= deadline;
        }
        if (i >= lse_first) weights[r][i - lse_first] = __uint_as_float(cell[r].x);
      }
    }
  }
  if (!in_time) *reinterpret_cast<volatile int*>(failed) = 1;  // the host sees it, ends the job
  __syncthreads();

  // 3. The merge weights, a row per thread.
  for (int row = threadIdx.x; row < rows; row += kThreads) {
    float max_lse = -INFINITY, sum = 0.0f;
    for (int r = 0; r < world; ++r) max_lse = fmaxf(max_lse, weights[r][row]);
    for (int r = 0; r < world; ++r) {
      weights[r][row] = lse_weight(weights[r][row], max_lse);
      sum += weights[r][row];
    }
    for (int r = 0; r < world; ++r) weights[r][row] = sum > 0.0f ? weights[r][row] / sum : 0.0f;
    lse_out[row] = merged_lse(max_lse, sum);
  }
  __syncthreads();

  // 4. The outputs of my words of o, every rank's loaded at once (from L2, where the peers
  // wrote: L1 may hold these cells from two calls ago).
  constexpr int kPerWord = 4 / sizeof(T);
  for (int64_t i = threadIdx.x; i < lse_first; i += kThreads) {
    uint32_t word[kMaxPeers];
#pragma unroll
    for (int r = 0; r < kMaxPeers; ++r) {
      if (r < world) word[r] = __ldcg(cells_of(r) + i).x;
    }
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) {
      const int64_t e = i * kPerWord + k, row = e / dim;
      float acc = 0.0f;
#pragma unroll
      for (int r = 0; r < kMaxPeers; ++r) {
        // A part without keys (weight 0) may hold anything: it is not read.
        if (r < world && weights[r][row] != 0.0f) acc += weights[r][row] * element<T>(word[r], k);
      }
      o_out[e] = from_float<T>(acc);
    }
  }
  // 5. The next call's epoch (graph replays read it from here).
  if (threadIdx.x == 0) *epoch = call;
}

}  // namespace

void peer_gather_merge_cuda(const PeerBuffers& peers, int rank, int world, int64_t slot_bytes,
                            const void* part, int64_t part_bytes, int64_t rows, int dim,
                            DType dtype, uint32_t* epoch, double timeout_s, int* failed,
                            void* o_out, float* lse_out, cudaStream_t stream) {
  if (world < 1 || world > kMaxPeers) throw std::invalid_argument("peer gather: 1 to 8 ranks");
  if (2 * part_bytes > slot_bytes || part_bytes % 4 != 0 || rows > kMaxRows ||
      reinterpret_cast<uintptr_t>(part) % 4 != 0) {
    throw std::invalid_argument("peer gather: the part must fill whole aligned words, take at "
                                "most half a slot (a cell per word) and hold at most 256 rows");
  }
  const uint64_t timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    peer_gather_merge_kernel<T><<<1, kThreads, 0, stream>>>(
        peers, rank, world, slot_bytes, static_cast<const uint32_t*>(part), part_bytes / 4, rows,
        dim, epoch, timeout_ns, failed, static_cast<T*>(o_out), lse_out);
  });
  check_cuda(cudaGetLastError(), "peer gather kernel launch");
}

}  // namespace star
