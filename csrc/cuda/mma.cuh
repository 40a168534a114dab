// What the attention kernels share of tensor cores and asynchronous copies (sm_80 and newer):
// a swizzled shared-memory layout of K/V tiles, cp.async, ldmatrix and mma.sync m16n8k16.
// Fragment layout of mma m16n8k16 (PTX ISA): lane = 4 * row + quad; a thread holds rows
// `row` and `row + 8` of the accumulators (c0, c1 and c2, c3), columns 2 * quad and
// 2 * quad + 1 of each 8-column tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace star {

// 16-byte pieces of a row of D elements are stored XOR-swizzled by the row's low bits, so
// that the 8 rows an ldmatrix reads at one column fall into 8 different bank groups.
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) * 8);
}

// Copies 16 bytes to shared memory in the background; with valid false it writes zeros
// (and reads nothing), so that rows past the end hold no NaN that a zero weight would keep.
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem, bool valid) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void wait_async() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Starts copying one pipeline stage: keys [first, first + kTileKeys) of one head's K and V
// rows (D elements each) into k_stage and v_stage, swizzled, the block's kThreads threads
// taking 16-byte pieces in turn; keys from `end` on are zeros.
template <typename T, int D, int kTileKeys, int kThreads>
__device__ __forceinline__ void load_kv_tile(T* k_stage, T* v_stage, const T* k_head, const T* v_head,
                                             int64_t first, int64_t end) {
  constexpr int kChunks = D / 8;  // 16-byte pieces per row
#pragma unroll
  for (int c = threadIdx.x; c < kTileKeys * kChunks; c += kThreads) {
    const int key = c / kChunks, piece = c % kChunks;
    const bool valid = first + key < end;
    const int64_t src = valid ? (first + key) * D + piece * 8 : 0;
    copy16_async(k_stage + swizzled<D>(key, piece), k_head + src, valid);
    copy16_async(v_stage + swizzled<D>(key, piece), v_head + src, valid);
  }
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// c += a b for a 16x16 (rows) by 16x8 (columns) tile in float32: a0, a1 hold columns 0-7
// of rows `row` and `row + 8`, a2, a3 columns 8-15; b0, b1 the B fragment's two halves.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Two floats as the element pair of one register, the first in the low half.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&pair);
  } else {
    const __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&pair);
  }
}

}  // namespace star
