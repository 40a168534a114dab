// Split-KV decode attention: one query token, grouped-query heads, a long KV cache read in
// place. The kernel is memory-bound, so everything serves keeping HBM busy:
// - K and V stream into shared memory through cp.async, several tiles ahead, and each
//   byte is read once for all G query heads of its kv head;
// - the products run on tensor cores (mma.sync m16n8k16): the G heads are the rows of a
//   16-row tile, so a tile of 16 keys costs a handful of instructions, where a dot product
//   per key on CUDA cores (shuffles, conversions) could not keep up with the memory;
// - the splits of a kv head are merged by whichever of its blocks finishes last, in the
//   same launch, so a short cache does not pay for a second kernel and a serial merge.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "dtype.cuh"
#include "kernels.h"
#include "lse.cuh"
#include "mma.cuh"

namespace star {

namespace {

constexpr int kWarps = 4;
constexpr int kWarpKeys = 16;                  // keys per warp per tile: one mma k-step of P V
constexpr int kTileKeys = kWarps * kWarpKeys;  // keys per pipeline stage
constexpr int kMaxGroup = 8;                   // query heads per kv head: rows 0..7 of the mma tile
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
__host__ __device__ constexpr int stages() { return D == 128 ? 3 : 6; }  // 96 KB: two blocks fit an SM
template <typename T, int D>
constexpr int pipeline_bytes() { return stages<D>() * 2 * kTileKeys * D * static_cast<int>(sizeof(T)); }

// grid (kv_heads, splits), kWarps warps. Each tile of kTileKeys keys gives every warp 16
// keys; a warp keeps its own online softmax (one row per query head) over the keys it saw,
// and the warps, then the splits, are merged at the end. Fragment layout of mma m16n8k16
// (PTX ISA): lane = 4 * row + quad; a thread holds row `row` of the accumulators, columns
// 2 * quad and 2 * quad + 1 of each 8-column tile.
// One row's partial outputs and lse in the workspace, rounded up to 4 floats: the final
// merge reads the outputs as float4, so every row's part must start 16-byte aligned (9
// heads of 64 make 585 floats a split: an odd count put row 1's float4 loads off 16 bytes).
__host__ __device__ inline int64_t row_workspace_floats(int heads, int head_dim, int splits) {
  return (static_cast<int64_t>(splits) * heads * (head_dim + 1) + 3) / 4 * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32)
decode_kernel(const T* __restrict__ q, int64_t q_row_stride, const T* __restrict__ k_cache,
              const T* __restrict__ v_cache, int64_t capacity, const int32_t* __restrict__ length,
              DecodeRows rows, int group, float scale, int splits, float* __restrict__ o_parts,
              float* __restrict__ lse_parts, int32_t* __restrict__ counters, T* __restrict__ o,
              float* __restrict__ lse) {
  constexpr int kKSteps = D / 16;  // mma k-steps of Q K^T
  constexpr int kStages = stages<D>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int kv_head = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = lane / 4, quad = lane % 4;
  // Row blockIdx.z of a batch: its own query, cache, length, partial results and counters.
  const int batch_row = blockIdx.z, batch_rows = gridDim.z;
  if (rows.k != nullptr) {
    k_cache = reinterpret_cast<const T*>(rows.k[batch_row]);
    v_cache = reinterpret_cast<const T*>(rows.v[batch_row]);
    length = reinterpret_cast<const int32_t*>(rows.length[batch_row]);
    capacity = rows.capacity[batch_row];
  }
  const int64_t first_key = rows.first_key != nullptr ? rows.first_key[batch_row] : 0;
  q += batch_row * q_row_stride;
  {
    const int64_t part_floats = row_workspace_floats(gridDim.x * group, D, splits);
    o_parts += batch_row * part_floats;
    lse_parts += batch_row * part_floats;
    counters += batch_row * gridDim.x;
  }
  const int64_t len = max(int64_t{0}, *length - first_key);
  const int64_t chunk = (len + splits - 1) / splits;
  const int64_t start = split * chunk, end = min(len, start + chunk);
  const int tiles = end > start ? static_cast<int>((end - start + kTileKeys - 1) / kTileKeys) : 0;
  const T* k_head = k_cache + (static_cast<int64_t>(kv_head) * capacity + first_key) * D;
  const T* v_head = v_cache + (static_cast<int64_t>(kv_head) * capacity + first_key) * D;

  auto load_tile = [&](int tile) {
    if (tile < tiles) {
      T* k_stage = smem + (tile % kStages) * 2 * kTileKeys * D;
      T* v_stage = k_stage + kTileKeys * D;
      load_kv_tile<T, D, kTileKeys, kWarps * 32>(k_stage, v_stage, k_head, v_head,
                                             start + static_cast<int64_t>(tile) * kTileKeys, end);
    }
    commit_async();  // one group per tile, empty ones too, so that the counting stays simple
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_tile(s);

  // Q as the A operand: rows are the group's heads (zero past G), unscaled so that the
  // products are exact; the scale is applied to the float32 scores.
  unsigned qa[kKSteps][2];
  {
    const bool valid = row < group;
    const T* q_row = q + (static_cast<int64_t>(kv_head) * group + (valid ? row : 0)) * D;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      qa[ks][0] = valid ? *reinterpret_cast<const unsigned*>(q_row + ks * 16 + 2 * quad) : 0u;
      qa[ks][1] = valid ? *reinterpret_cast<const unsigned*>(q_row + ks * 16 + 8 + 2 * quad) : 0u;
    }
  }
  const float scale_log2 = scale * kLog2e;
  float acc[D / 8][4];  // O: 8-column tiles; [0], [1] hold row `row`
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float run_max = -INFINITY, run_sum = 0.0f;  // of row `row`, in log2 units; sum over this lane's columns

  for (int tile = 0; tile < tiles; ++tile) {
    wait_async<kStages - 2>();  // this tile has landed
    __syncthreads();            // for every thread; and the stage refilled next is free
    load_tile(tile + kStages - 1);
    const T* k_stage = smem + (tile % kStages) * 2 * kTileKeys * D;
    const T* v_stage = k_stage + kTileKeys * D;
    const int key0 = warp * kWarpKeys;  // this warp's first key in the tile

    // Scores S = Q K^T of 16 keys: two 8-key column tiles. ldmatrix x4 gives B fragments of
    // two k-steps: matrices (8 keys, 8 dims) with lanes 8j..8j+7 naming the rows of matrix j.
    float s[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int key = key0 + n * 8 + lane % 8;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ks += 2) {
        unsigned b[4];
        ldmatrix_x4(b, k_stage + swizzled<D>(key, 2 * ks + lane / 8));
        mma<T>(s[n], qa[ks][0], 0u, qa[ks][1], 0u, b[0], b[1]);
        mma<T>(s[n], qa[ks + 1][0], 0u, qa[ks + 1][1], 0u, b[2], b[3]);
      }
    }
    // Online softmax of row `row` over these 16 keys (the 4 lanes of a quad share a row).
    const int64_t first = start + static_cast<int64_t>(tile) * kTileKeys + key0;
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool valid = first + n * 8 + 2 * quad + i < end;
        s[n][i] = valid ? s[n][i] * scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, s[n][i]);
      }
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float new_max = fmaxf(run_max, tile_max);
    const float base = new_max == -INFINITY ? 0.0f : new_max;  // no valid key yet: weights 0
    const float correction = exp2f(run_max - base);
    run_max = new_max;
    float p[2][2];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int i = 0; i < 2; ++i) p[n][i] = exp2f(s[n][i] - base);
    }
    run_sum = run_sum * correction + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      acc[n][0] *= correction;
      acc[n][1] *= correction;
    }
    // O += P V: P as the A operand (keys 0-7 in a0, 8-15 in a2: the score tiles' layout),
    // V through ldmatrix.trans: matrices (8 keys, 8 dims) give B fragments of two column tiles.
    const unsigned pa0 = pack2<T>(p[0][0], p[0][1]), pa2 = pack2<T>(p[1][0], p[1][1]);
    const int v_key = key0 + (lane / 8 % 2) * 8 + lane % 8;
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      unsigned b[4];
      ldmatrix_x4_trans(b, v_stage + swizzled<D>(v_key, n + lane / 16));
      mma<T>(acc[n], pa0, 0u, pa2, 0u, b[0], b[1]);
      mma<T>(acc[n + 1], pa0, 0u, pa2, 0u, b[2], b[3]);
    }
  }
  wait_async<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  // Merge the warps: each writes its row maxima, sums and outputs; then thread t merges
  // output elements t, t + blockDim, ... of the G x D outputs of this split.
  run_sum += __shfl_xor_sync(0xffffffffu, run_sum, 1);
  run_sum += __shfl_xor_sync(0xffffffffu, run_sum, 2);
  float* s_max = reinterpret_cast<float*>(smem_raw);   // [kWarps][kMaxGroup]
  float* s_sum = s_max + kWarps * kMaxGroup;           // [kWarps][kMaxGroup]
  float* s_out = s_sum + kWarps * kMaxGroup;           // [kWarps][kMaxGroup][D]
  if (row < group) {
    if (quad == 0) {
      s_max[warp * kMaxGroup + row] = run_max;
      s_sum[warp * kMaxGroup + row] = run_sum;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      float* out = s_out + (warp * kMaxGroup + row) * D + n * 8 + 2 * quad;
      out[0] = acc[n][0];
      out[1] = acc[n][1];
    }
  }
  __syncthreads();
  const int64_t head0 = static_cast<int64_t>(kv_head) * group;
  const int64_t heads = static_cast<int64_t>(gridDim.x) * group;
  for (int e = threadIdx.x; e < group * D; e += kWarps * 32) {
    const int g = e / D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_max[w * kMaxGroup + g]);
    float sum = 0.0f, out = 0.0f;
    if (m != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float c = exp2f(s_max[w * kMaxGroup + g] - m);
        sum += c * s_sum[w * kMaxGroup + g];
        out += c * s_out[(w * kMaxGroup + g) * D + e % D];
      }
    }
    const float value = m == -INFINITY ? 0.0f : out / sum;
    // log2 units back to natural log: lse = (max + log2(sum)) * ln 2.
    const float part_lse = m == -INFINITY ? -INFINITY : (m + log2f(sum)) / kLog2e;
    if (splits == 1) {
      o[((head0 + g) * batch_rows + batch_row) * D + e % D] = from_float<T>(value);
      if (e % D == 0) lse[(head0 + g) * batch_rows + batch_row] = part_lse;
    } else {
      o_parts[(split * heads + head0 + g) * D + e % D] = value;
      if (e % D == 0) lse_parts[split * heads + head0 + g] = part_lse;
    }
  }
  if (splits == 1) return;

  // The last block of this kv head to finish merges the splits (the pattern of CUDA's
  // threadFenceReduction sample): each block publishes its part, then counts itself in.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&counters[kv_head], 1) == splits - 1;
    if (last) counters[kv_head] = 0;  // ready for the next launch (or graph replay)
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  float* s_weight = s_out;  // [group][splits]: exp(lse - max) / sum, then the merged lse
  for (int g = warp; g < group; g += kWarps) {
    float m = -INFINITY;
    for (int sp = lane; sp < splits; sp += 32) m = fmaxf(m, __ldcg(&lse_parts[sp * heads + head0 + g]));
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float sum = 0.0f;
    for (int sp = lane; sp < splits; sp += 32) {
      const float l = __ldcg(&lse_parts[sp * heads + head0 + g]);
      const float w = lse_weight(l, m);
      s_weight[g * splits + sp] = w;
      sum += w;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    __syncwarp();
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int sp = lane; sp < splits; sp += 32) s_weight[g * splits + sp] *= inv;
    if (lane == 0) lse[(head0 + g) * batch_rows + batch_row] = merged_lse(m, sum);
  }
  __syncthreads();
  // Four consecutive outputs per thread: 16-byte loads, as many in flight as unrolled.
  for (int e = 4 * threadIdx.x; e < group * D; e += 4 * kWarps * 32) {
    const int g = e / D;
    const float4* part = reinterpret_cast<const float4*>(o_parts + (head0 + g) * D + e % D);
    float4 out = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (int sp = 0; sp < splits; ++sp) {
      const float w = s_weight[g * splits + sp];  // empty splits wrote o = 0
      const float4 x = __ldcg(part + sp * heads * D / 4);
      out.x += w * x.x;
      out.y += w * x.y;
      out.z += w * x.z;
      out.w += w * x.w;
    }
    T* dst = o + ((head0 + g) * batch_rows + batch_row) * D + e % D;
    dst[0] = from_float<T>(out.x);
    dst[1] = from_float<T>(out.y);
    dst[2] = from_float<T>(out.z);
    dst[3] = from_float<T>(out.w);
  }
}

template <typename T, int D>
void launch(dim3 grid, const void* q, int64_t q_row_stride, const void* k, const void* v,
            int64_t capacity, const int32_t* length, DecodeRows rows, int group, float scale,
            int splits, float* o_parts, float* lse_parts, int32_t* counters, void* o, float* lse,
            cudaStream_t stream) {
  constexpr int kBytes = pipeline_bytes<T, D>();
  static_assert(2 * kWarps * kMaxGroup * 4 + kWarps * kMaxGroup * D * 4 <= kBytes,
                "the final merges reuse the pipeline's memory");
  static const cudaError_t opt_in = cudaFuncSetAttribute(  // once per kernel
      decode_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  check_cuda(opt_in, "decode attention: shared memory opt-in");
  decode_kernel<T, D><<<grid, kWarps * 32, kBytes, stream>>>(
      static_cast<const T*>(q), q_row_stride, static_cast<const T*>(k), static_cast<const T*>(v),
      capacity, length, rows, group, scale, splits, o_parts, lse_parts, counters,
      static_cast<T*>(o), lse);
}

}  // namespace

int64_t decode_workspace_floats(int heads, int head_dim, int splits) {
  return row_workspace_floats(heads, head_dim, splits);
}

int decode_splits(int64_t capacity, int kv_heads, int multiprocessors, int rows) {
  // One wave of blocks (over all rows): one per multiprocessor for caches under 128K keys,
  // two beside each other (96 KB of pipeline each) from there; no split shorter than 256
  // keys at full capacity; few enough splits for the last block's merge weights. Measured
  // on H200 (8 and 3 kv heads, 4K to 1M keys): one block per multiprocessor is best up to
  // 64K keys, where the ramp and the merge weigh; two keep HBM busier on long caches.
  const int64_t per_multiprocessor = capacity >= (128 << 10) ? 2 : 1;
  const int64_t wanted =
      std::max<int64_t>(1, per_multiprocessor * multiprocessors / (static_cast<int64_t>(kv_heads) * rows));
  const int64_t most = std::max<int64_t>(1, capacity / 256);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, most, 256})));
}

void decode_attention_cuda(const void* q, int64_t q_row_stride, const void* k_cache,
                           const void* v_cache, int64_t capacity, const int32_t* length,
                           DecodeRows rows, int batch_rows, int heads, int kv_heads, int head_dim,
                           float scale, DType dtype, int splits, float* workspace,
                           int32_t* counters, void* o, float* lse, cudaStream_t stream) {
  if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > kMaxGroup) {
    throw std::invalid_argument("decode attention: heads must be 1 to 8 times kv_heads, got " +
                                std::to_string(heads) + " and " + std::to_string(kv_heads));
  }
  if (splits < 1 || splits > 256) throw std::invalid_argument("decode attention: splits must be 1..256");
  if (batch_rows < 1 || batch_rows > 65535) throw std::invalid_argument("decode attention: 1 to 65535 rows");
  const int group = heads / kv_heads;
  const dim3 grid(kv_heads, splits, batch_rows);
  float* o_parts = workspace;
  float* lse_parts = workspace + static_cast<int64_t>(splits) * heads * head_dim;
  dispatch_attention(dtype, head_dim, "decode attention", [&](auto t, auto d) {
    launch<decltype(t), decltype(d)::value>(grid, q, q_row_stride, k_cache, v_cache, capacity, length, rows, group,
                                            scale, splits, o_parts, lse_parts, counters, o, lse, stream);
  });
  check_cuda(cudaGetLastError(), "decode attention kernel launch");
}

}  // namespace star
