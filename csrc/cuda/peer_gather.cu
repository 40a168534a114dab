// One-shot gather + merge between the GPUs of one node over their peer memory (NVLink): a
// single small kernel per layer where NCCL's all-gather runs its protocol and a second
// kernel merges. Each rank stores its packed (o, lse) into every rank's exchange buffer,
// raises its flag there, waits for everyone's flag in its own buffer, and merges.
//
// Two parities of slots: a rank can be at most one call ahead of another (it cannot finish
// call n + 1 before every rank has sent, which each does only after finishing call n), so
// call n + 2 may reuse call n's slots.
#include <cmath>
#include <stdexcept>

#include "dtype.cuh"
#include "kernels.h"
#include "lse.cuh"

namespace star {

namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ void store_release(uint32_t* flag, uint32_t value) {
  asm volatile("st.release.sys.global.u32 [%0], %1;\n" ::"l"(flag), "r"(value) : "memory");
}
__device__ __forceinline__ uint32_t load_acquire(const uint32_t* flag) {
  uint32_t value;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];\n" : "=r"(value) : "l"(flag) : "memory");
  return value;
}
__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;\n" : "=l"(t));
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
peer_gather_merge_kernel(PeerBuffers peers, int rank, int world, int64_t slot_bytes,
                         const char* __restrict__ part, int64_t part_bytes, int64_t rows, int dim,
                         uint32_t* __restrict__ epoch, uint64_t timeout_ns, int* failed,
                         T* __restrict__ o_out, float* __restrict__ lse_out) {
  __shared__ uint32_t call;
  if (threadIdx.x == 0) call = *epoch + 1;
  __syncthreads();
  const int parity = call & 1;
  const int64_t flags_offset = 2 * world * slot_bytes;

  // 1. My part into slot (parity, rank) of every rank's buffer, 16 bytes at a time where
  // the part is 16-byte aligned (slots always are), else 4.
  const int64_t pieces = reinterpret_cast<uintptr_t>(part) % 16 == 0 ? part_bytes / 16 : 0;
  for (int r = 0; r < world; ++r) {
    char* slot = peers.base[r] + (parity * world + rank) * slot_bytes;
    for (int64_t i = threadIdx.x; i < pieces; i += kThreads) {
      reinterpret_cast<uint4*>(slot)[i] = reinterpret_cast<const uint4*>(part)[i];
    }
    for (int64_t i = pieces * 4 + threadIdx.x; i < part_bytes / 4; i += kThreads) {
      reinterpret_cast<uint32_t*>(slot)[i] = reinterpret_cast<const uint32_t*>(part)[i];
    }
  }
  __threadfence_system();
  __syncthreads();
  // 2. My flag at every rank; 3. every rank's flag here, waited for with a deadline.
  if (threadIdx.x < world) {
    uint32_t* flags = reinterpret_cast<uint32_t*>(peers.base[threadIdx.x] + flags_offset);
    store_release(flags + parity * world + rank, call);
    const uint32_t* mine = reinterpret_cast<const uint32_t*>(peers.base[rank] + flags_offset);
    const uint64_t start = now_ns();
    while (load_acquire(mine + parity * world + threadIdx.x) != call) {
      if (now_ns() - start > timeout_ns) {
        *reinterpret_cast<volatile int*>(failed) = 1;  // the host sees it, and ends the job
        break;
      }
    }
  }
  __syncthreads();

  // 4. Merge: part r is rows x dim of T, then rows float32 log-sum-exps. Weights first,
  // one row per thread; then the outputs. Reads go to L2 (__ldcg): peers wrote there, and
  // L1 may still hold these slots from two calls ago.
  __shared__ float weights[kMaxPeers][kMaxRows];
  const char* slots = peers.base[rank] + parity * world * slot_bytes;
  const int64_t o_bytes = rows * dim * static_cast<int64_t>(sizeof(T));
  for (int row = threadIdx.x; row < rows; row += kThreads) {
    float lse[kMaxPeers], max_lse = -INFINITY;
    for (int r = 0; r < world; ++r) {
      lse[r] = __ldcg(reinterpret_cast<const float*>(slots + r * slot_bytes + o_bytes) + row);
      max_lse = fmaxf(max_lse, lse[r]);
    }
    float sum = 0.0f;
    for (int r = 0; r < world; ++r) {
      weights[r][row] = lse_weight(lse[r], max_lse);
      sum += weights[r][row];
    }
    for (int r = 0; r < world; ++r) weights[r][row] = sum > 0.0f ? weights[r][row] / sum : 0.0f;
    lse_out[row] = merged_lse(max_lse, sum);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < rows * dim; e += kThreads) {
    const int64_t row = e / dim;
    float acc = 0.0f;
    for (int r = 0; r < world; ++r) {
      const float w = weights[r][row];
      if (w != 0.0f) acc += w * to_float(__ldcg(reinterpret_cast<const T*>(slots + r * slot_bytes) + e));
    }
    o_out[e] = from_float<T>(acc);  // a part without keys may hold anything: it is not read
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
  if (part_bytes > slot_bytes || part_bytes % 4 != 0 || rows > kMaxRows) {
    throw std::invalid_argument("peer gather: the part must fit a slot, fill whole words and "
                                "hold at most 256 rows");
  }
  const uint64_t timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    peer_gather_merge_kernel<T><<<1, kThreads, 0, stream>>>(
        peers, rank, world, slot_bytes, static_cast<const char*>(part), part_bytes, rows, dim,
        epoch, timeout_ns, failed, static_cast<T*>(o_out), lse_out);
  });
  check_cuda(cudaGetLastError(), "peer gather kernel launch");
}

}  // namespace star
