// Appends one token's K and V to a layer of the KV arena at the slot that a device-side
// length names, so that a captured decode step writes where the cache has grown to.
#include <stdexcept>

#include "kernels.h"

namespace star {

namespace {

// One thread per 16 bytes of a head's row; grid (kv_heads, 2, batch rows): K, then V.
__global__ void kv_append_kernel(const char* __restrict__ k, const char* __restrict__ v,
                                 int64_t src_head_stride_bytes, int64_t src_row_stride_bytes,
                                 char* __restrict__ k_cache, char* __restrict__ v_cache,
                                 int64_t capacity, const int32_t* __restrict__ length,
                                 DecodeRows rows, int row_bytes) {
  const int batch_row = blockIdx.z;
  if (rows.k != nullptr) {
    k_cache = reinterpret_cast<char*>(rows.k[batch_row]);
    v_cache = reinterpret_cast<char*>(rows.v[batch_row]);
    length = reinterpret_cast<const int32_t*>(rows.length[batch_row]);
    capacity = rows.capacity[batch_row];
  }
  const int64_t slot = *length - 1;
  if (slot < 0 || slot >= capacity) return;  // an overrun, which the arena reports on the host
  const int head = blockIdx.x;
  const char* src = (blockIdx.y == 0 ? k : v) + batch_row * src_row_stride_bytes + head * src_head_stride_bytes;
  char* dst = (blockIdx.y == 0 ? k_cache : v_cache) +
              (static_cast<int64_t>(head) * capacity + slot) * row_bytes;
  for (int i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) {
    reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  }
}

// One thread per row: the rows before *active count one more token each.
__global__ void add_token_rows_kernel(const int64_t* __restrict__ lengths, const int32_t* __restrict__ active,
                                      int rows) {
  const int row = threadIdx.x;
  if (row < rows && row < *active) ++*reinterpret_cast<int32_t*>(lengths[row]);
}

}  // namespace

void add_token_rows_cuda(const int64_t* lengths, const int32_t* active, int rows, cudaStream_t stream) {
  if (rows < 1 || rows > 1024) throw std::invalid_argument("add_token_rows: 1 to 1024 rows");
  add_token_rows_kernel<<<1, rows, 0, stream>>>(lengths, active, rows);
  check_cuda(cudaGetLastError(), "add_token_rows kernel launch");
}

void kv_append_cuda(const void* k, const void* v, int64_t src_head_stride_bytes,
                    int64_t src_row_stride_bytes, void* k_cache, void* v_cache, int64_t capacity,
                    const int32_t* length, DecodeRows rows, int batch_rows, int kv_heads,
                    int row_bytes, cudaStream_t stream) {
  kv_append_kernel<<<dim3(kv_heads, 2, batch_rows), 64, 0, stream>>>(
      static_cast<const char*>(k), static_cast<const char*>(v), src_head_stride_bytes,
      src_row_stride_bytes, static_cast<char*>(k_cache), static_cast<char*>(v_cache), capacity,
      length, rows, row_bytes);
  check_cuda(cudaGetLastError(), "kv_append kernel launch");
}

}  // namespace star
