// Decode attention over a context that several rows of a batch share: its K/V is held once
// and read once per step for all of them. The query heads of all the rows that read a
// context, for one kv head, are the rows of a matrix (up to 128: readers x group), so each
// tile of keys costs one matrix product on tensor cores for all of them, where reading the
// context once per row would read the same bytes as many times as there are rows.
// - grid (kv_heads, splits, entries): a block streams its split of one kv head of one
//   context through shared memory (cp.async, several tiles ahead, as decode_attention.cu);
// - warps split the query rows, 16 each (one mma tile), and run FlashAttention-2's online
//   softmax over every key of the split, so no merge across warps is needed;
// - a second launch, a warp per query row, merges the splits and the row's result over its
//   own keys (the tail decode_attention wrote) by log-sum-exp, in place.
#include <cmath>
#include <stdexcept>

#include "dtype.cuh"
#include "kernels.h"
#include "lse.cuh"
#include "mma.cuh"

namespace star {

namespace {

constexpr int kWarps = kMaxSharedQueryRows / 16;  // one 16-row mma tile of queries each
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 64;                      // keys per pipeline stage
constexpr int kMergeWarps = 4;                     // query rows a merge block takes
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
__host__ __device__ constexpr int stages() { return D == 128 ? 3 : 6; }  // 96 KB
template <typename T, int D>
constexpr int pipeline_bytes() { return stages<D>() * 2 * kTileKeys * D * static_cast<int>(sizeof(T)); }

// The row of the workspace's parts where a reader's query head writes its result over one
// split: o_parts [splits][batch_rows][heads] rows of D floats, lse_parts as many floats; a
// reader's slot is its place in reader_rows.
__device__ __forceinline__ int64_t part_row(int split, int slot, int head, int batch_rows, int heads) {
  return (static_cast<int64_t>(split) * batch_rows + slot) * heads + head;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
shared_context_kernel(const T* __restrict__ q, int64_t q_row_stride, SharedContexts contexts, int group,
                      float scale, int batch_rows, int heads, float* __restrict__ o_parts,
                      float* __restrict__ lse_parts) {
  constexpr int kKSteps = D / 16;  // mma k-steps of Q K^T
  constexpr int kStages = stages<D>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int kv_head = blockIdx.x, split = blockIdx.y, entry = blockIdx.z, splits = gridDim.y;
  const int readers = contexts.readers[entry];
  if (readers == 0) return;  // an unused entry: the same for the whole block
  const int query_rows = readers * group, first_reader = contexts.first_reader[entry];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row = lane / 4, quad = lane % 4;
  const bool computes = warp * 16 < query_rows;  // warps past the rows only load

  const int64_t capacity = contexts.capacity[entry];
  const int64_t len = contexts.length[entry];
  const int64_t chunk = (len + splits - 1) / splits;
  const int64_t start = split * chunk, end = min(len, start + chunk);
  const int tiles = end > start ? static_cast<int>((end - start + kTileKeys - 1) / kTileKeys) : 0;
  const T* k_head = reinterpret_cast<const T*>(contexts.k[entry]) + static_cast<int64_t>(kv_head) * capacity * D;
  const T* v_head = reinterpret_cast<const T*>(contexts.v[entry]) + static_cast<int64_t>(kv_head) * capacity * D;

  auto load_tile = [&](int tile) {
    if (tile < tiles) {
      T* k_stage = smem + (tile % kStages) * 2 * kTileKeys * D;
      T* v_stage = k_stage + kTileKeys * D;
      load_kv_tile<T, D, kTileKeys, kThreads>(k_stage, v_stage, k_head, v_head,
                                             start + static_cast<int64_t>(tile) * kTileKeys, end);
    }
    commit_async();  // one group per tile, empty ones too, so that the counting stays simple
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_tile(s);

  // This thread's two query rows (row and row + 8 of the warp's tile), as the A operand;
  // zero past the entry's rows. Unscaled, so that the products are exact.
  const int query_row[2] = {warp * 16 + row, warp * 16 + row + 8};
  unsigned qa[kKSteps][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool valid = computes && query_row[h] < query_rows;
    const int reader = valid ? contexts.reader_rows[first_reader + query_row[h] / group] : 0;
    const T* q_row = q + reader * q_row_stride + (static_cast<int64_t>(kv_head) * group + query_row[h] % group) * D;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      qa[ks][h] = valid ? *reinterpret_cast<const unsigned*>(q_row + ks * 16 + 2 * quad) : 0u;
      qa[ks][h + 2] = valid ? *reinterpret_cast<const unsigned*>(q_row + ks * 16 + 8 + 2 * quad) : 0u;
    }
  }
  const float scale_log2 = scale * kLog2e;
  float acc[D / 8][4];  // O: 8-column tiles; [0], [1] of row `row`, [2], [3] of row `row + 8`
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};  // log2 units; this lane's columns

  for (int tile = 0; tile < tiles; ++tile) {
    wait_async<kStages - 2>();  // this tile has landed
    __syncthreads();            // for every thread; and the stage refilled next is free
    load_tile(tile + kStages - 1);
    if (!computes) continue;
    const T* k_stage = smem + (tile % kStages) * 2 * kTileKeys * D;
    const T* v_stage = k_stage + kTileKeys * D;

    // S = Q K^T over the tile's 64 keys: eight 8-key column tiles.
    float s[kTileKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kTileKeys / 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      const int key = n * 8 + lane % 8;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ks += 2) {
        unsigned b[4];
        ldmatrix_x4(b, k_stage + swizzled<D>(key, 2 * ks + lane / 8));
        mma<T>(s[n], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], b[0], b[1]);
        mma<T>(s[n], qa[ks + 1][0], qa[ks + 1][1], qa[ks + 1][2], qa[ks + 1][3], b[2], b[3]);
      }
    }
    // Online softmax of both rows over these keys (the 4 lanes of a quad share a row).
    const int64_t first = start + static_cast<int64_t>(tile) * kTileKeys;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kTileKeys / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool valid = first + n * 8 + 2 * quad + (i & 1) < end;
        s[n][i] = valid ? s[n][i] * scale_log2 : -INFINITY;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], s[n][i]);
      }
    }
    float base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float new_max = fmaxf(run_max[h], tile_max[h]);
      base[h] = new_max == -INFINITY ? 0.0f : new_max;  // no valid key yet: weights 0
      const float correction = exp2f(run_max[h] - base[h]);
      run_max[h] = new_max;
      run_sum[h] *= correction;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[n][2 * h] *= correction;
        acc[n][2 * h + 1] *= correction;
      }
    }
#pragma unroll
    for (int n = 0; n < kTileKeys / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[n][i] = exp2f(s[n][i] - base[i / 2]);
        run_sum[i / 2] += s[n][i];
      }
    }
    // O += P V, 16 keys a k-step: P as the A operand (the score tiles 2kk and 2kk + 1 are
    // its columns 0-7 and 8-15), V through ldmatrix.trans as in decode_attention.cu.
#pragma unroll
    for (int kk = 0; kk < kTileKeys / 16; ++kk) {
      const unsigned a0 = pack2<T>(s[2 * kk][0], s[2 * kk][1]), a1 = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      const unsigned a2 = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      const unsigned a3 = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int v_key = kk * 16 + (lane / 8 % 2) * 8 + lane % 8;
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        unsigned b[4];
        ldmatrix_x4_trans(b, v_stage + swizzled<D>(v_key, n + lane / 16));
        mma<T>(acc[n], a0, a1, a2, a3, b[0], b[1]);
        mma<T>(acc[n + 1], a0, a1, a2, a3, b[2], b[3]);
      }
    }
  }
  wait_async<0>();
  if (!computes) return;

  // This split's result of each of the thread's rows: o normalised, lse in natural log.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = run_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (query_row[h] >= query_rows) continue;
    const int slot = first_reader + query_row[h] / group;
    const int head = kv_head * group + query_row[h] % group;
    const int64_t at = part_row(split, slot, head, batch_rows, heads);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    float* out = o_parts + at * D + 2 * quad;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<float2*>(out + n * 8) = make_float2(acc[n][2 * h] * inv, acc[n][2 * h + 1] * inv);
    }
    if (quad == 0) lse_parts[at] = sum > 0.0f ? (run_max[h] + log2f(sum)) / kLog2e : -INFINITY;
  }
}

// grid (entries, kv_heads, kMaxSharedQueryRows / kMergeWarps), a warp per query row: the
// splits' parts and the row's own result (o, lse of decode_attention, in place) merged by
// log-sum-exp. A lane weighs 32 splits at once, then the warp adds the parts up with loads
// that do not wait on each other: a few blocks looping over rows and splits one load after
// another took longer than the product itself.
template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32)
merge_shared_kernel(SharedContexts contexts, int group, int splits, int batch_rows, int heads,
                    const float* __restrict__ o_parts, const float* __restrict__ lse_parts, T* __restrict__ o,
                    float* __restrict__ lse) {
  const int entry = blockIdx.x, kv_head = blockIdx.y;
  const int m = blockIdx.z * kMergeWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int readers = contexts.readers[entry], first_reader = contexts.first_reader[entry];
  if (m >= readers * group) return;  // the same for the whole warp
  const int slot = first_reader + m / group, head = kv_head * group + m % group;
  const int64_t own = static_cast<int64_t>(head) * batch_rows + contexts.reader_rows[slot];
  const float own_lse = lse[own];
  float max_lse = own_lse;
  for (int sp = lane; sp < splits; sp += 32) {
    max_lse = fmaxf(max_lse, lse_parts[part_row(sp, slot, head, batch_rows, heads)]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));
  const float own_weight = lse_weight(own_lse, max_lse);
  float sum = own_weight;
  float out[D / 32];
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    out[i] = own_weight > 0.0f ? own_weight * to_float(o[own * D + lane + 32 * i]) : 0.0f;
  }
  for (int first = 0; first < splits; first += 32) {
    const int sp = first + lane, count = min(32, splits - first);
    const float mine = sp < splits ? lse_weight(lse_parts[part_row(sp, slot, head, batch_rows, heads)], max_lse) : 0.0f;
#pragma unroll 4
    for (int j = 0; j < count; ++j) {
      const float w = __shfl_sync(0xffffffffu, mine, j);
      const float* part = o_parts + part_row(first + j, slot, head, batch_rows, heads) * D + lane;
      sum += w;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) {
        const float x = part[32 * i];  // loaded whatever its weight, so that no load waits on it
        out[i] += w == 0.0f ? 0.0f : w * x;  // a part of weight 0 adds nothing, whatever it holds
      }
    }
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) o[own * D + lane + 32 * i] = from_float<T>(out[i] * inv);
  __syncwarp();  // every lane has read lse[own] before it is replaced
  if (lane == 0) lse[own] = merged_lse(max_lse, sum);
}

template <typename T, int D>
void launch(const void* q, int64_t q_row_stride, SharedContexts contexts, int entries, int batch_rows,
            int heads, int kv_heads, float scale, int splits, float* workspace, void* o, float* lse,
            cudaStream_t stream) {
  constexpr int kBytes = pipeline_bytes<T, D>();
  static const cudaError_t opt_in = cudaFuncSetAttribute(  // once per kernel
      shared_context_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  check_cuda(opt_in, "shared-context attention: shared memory opt-in");
  const int group = heads / kv_heads;
  float* o_parts = workspace;
  float* lse_parts = workspace + static_cast<int64_t>(splits) * batch_rows * heads * D;
  shared_context_kernel<T, D><<<dim3(kv_heads, splits, entries), kThreads, kBytes, stream>>>(
      static_cast<const T*>(q), q_row_stride, contexts, group, scale, batch_rows, heads, o_parts, lse_parts);
  check_cuda(cudaGetLastError(), "shared-context attention kernel launch");
  merge_shared_kernel<T, D><<<dim3(entries, kv_heads, kMaxSharedQueryRows / kMergeWarps), kMergeWarps * 32, 0, stream>>>(
      contexts, group, splits, batch_rows, heads, o_parts, lse_parts, static_cast<T*>(o), lse);
  check_cuda(cudaGetLastError(), "shared-context merge kernel launch");
}

}  // namespace

int64_t shared_context_workspace_floats(int batch_rows, int heads, int head_dim, int splits) {
  return static_cast<int64_t>(splits) * batch_rows * heads * (head_dim + 1);
}

void shared_context_attention_cuda(const void* q, int64_t q_row_stride, SharedContexts contexts,
                                   int entries, int batch_rows, int heads, int kv_heads, int head_dim,
                                   float scale, DType dtype, int splits, float* workspace, void* o,
                                   float* lse, cudaStream_t stream) {
  if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > kMaxSharedQueryRows) {
    throw std::invalid_argument("shared-context attention: heads must be a multiple of kv_heads");
  }
  if (splits < 1 || splits > 65535 || entries < 1 || entries > 65535) {
    throw std::invalid_argument("shared-context attention: 1 to 65535 splits and entries");
  }
  dispatch_attention(dtype, head_dim, "shared-context attention", [&](auto t, auto d) {
    launch<decltype(t), decltype(d)::value>(q, q_row_stride, contexts, entries, batch_rows, heads, kv_heads, scale,
                                            splits, workspace, o, lse, stream);
  });
}

}  // namespace star
