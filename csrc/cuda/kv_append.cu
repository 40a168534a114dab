// Appends one token's K and V to a layer of the KV arena at the slot that a device-side
// length names, so that a captured decode step writes where the cache has grown to.
#include "kernels.h"

namespace star {

namespace {

// One thread per 16 bytes of a head's row; grid (kv_heads, 2): K, then V.
__global__ void kv_append_kernel(const char* __restrict__ k, const char* __restrict__ v,
                                 int64_t src_head_stride_bytes, char* __restrict__ k_cache,
                                 char* __restrict__ v_cache, int64_t capacity,
                                 const int32_t* __restrict__ length, int row_bytes) {
  const int64_t slot = *length - 1;
  if (slot < 0 || slot >= capacity) return;  // an overrun, which the arena reports on the host
  const int head = blockIdx.x;
  const char* src = (blockIdx.y == 0 ? k : v) + head * src_head_stride_bytes;
  char* dst = (blockIdx.y == 0 ? k_cache : v_cache) +
              (static_cast<int64_t>(head) * capacity + slot) * row_bytes;
  for (int i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) {
    reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  }
}

}  // namespace

void kv_append_cuda(const void* k, const void* v, int64_t src_head_stride_bytes, void* k_cache,
                    void* v_cache, int64_t capacity, const int32_t* length, int kv_heads,
                    int row_bytes, cudaStream_t stream) {
  kv_append_kernel<<<dim3(kv_heads, 2), 64, 0, stream>>>(
      static_cast<const char*>(k), static_cast<const char*>(v), src_head_stride_bytes,
      static_cast<char*>(k_cache), static_cast<char*>(v_cache), capacity, length, row_bytes);
  check_cuda(cudaGetLastError(), "kv_append kernel launch");
}

}  // namespace star
