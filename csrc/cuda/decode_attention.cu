// Split-KV decode attention: one query token, grouped-query heads, a long KV cache read in
// place. Memory-bound: each key and value row is read once, in 16-byte pieces streamed to
// shared memory several tiles ahead; the G query heads that share a kv head share its loads.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "dtype.cuh"
#include "kernels.h"

namespace star {

namespace {

constexpr int kWarps = 4;
constexpr int kTileKeys = 32;  // keys per pipeline stage
constexpr int kStages = 4;     // tiles in flight per block
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ void to_floats(const uint4& raw, float (&out)[8]) {
  const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(values[i]);
}

// Copies 16 bytes to shared memory in the background; with valid false it writes zeros
// (and reads nothing), so that rows past the end can never hold a NaN that a zero weight
// would not cancel.
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem, bool valid) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void wait_async() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// State of an online softmax over a subset of the keys, in log2 units: per query head of
// the group, the running max, the sum of weights and this lane's 8 output dimensions.
template <int G>
struct Partial {
  float max[G], sum[G], acc[G][8];
};

template <int G>
__device__ __forceinline__ void merge_into(Partial<G>& a, const float (&max_b)[G],
                                           const float (&sum_b)[G], const float (&acc_b)[G][8]) {
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float m = fmaxf(a.max[g], max_b[g]);
    if (m == -INFINITY) continue;  // both empty
    const float ca = exp2f(a.max[g] - m), cb = exp2f(max_b[g] - m);
    a.sum[g] = a.sum[g] * ca + sum_b[g] * cb;
#pragma unroll
    for (int i = 0; i < 8; ++i) a.acc[g][i] = a.acc[g][i] * ca + acc_b[g][i] * cb;
    a.max[g] = m;
  }
}

// Bytes of dynamic shared memory: kStages tiles of K and V.
template <typename T, int D>
constexpr int pipeline_bytes() {
  return kStages * 2 * kTileKeys * D * static_cast<int>(sizeof(T));
}

// grid (kv_heads, splits), kWarps warps. Tiles of kTileKeys keys stream from global to
// shared memory through cp.async, kStages deep, so that many bytes are in flight without
// holding registers. A key row is D / 8 lanes wide (16 bytes each); a warp takes
// kTileKeys / kWarps keys of each tile, 32 / (D / 8) at a time.
template <typename T, int D, int G>
__global__ void __launch_bounds__(kWarps * 32)
decode_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                    const T* __restrict__ v_cache, int64_t capacity,
                    const int32_t* __restrict__ length, int heads, float scale, int splits,
                    float* __restrict__ o_parts, float* __restrict__ lse_parts) {
  constexpr int kLanesPerKey = D / 8;
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;        // keys a warp works on at once
  constexpr int kWarpKeys = kTileKeys / kWarps;           // keys of a tile per warp
  constexpr int kRounds = kWarpKeys / kKeysPerWarp;       // per tile
  constexpr int kChunksPerTile = kTileKeys * D / 8;       // 16-byte pieces of K (or V)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int kv_head = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane % kLanesPerKey;  // which 8 elements of a row this lane holds
  const int64_t len = *length;
  const int64_t chunk = (len + splits - 1) / splits;
  const int64_t start = split * chunk, end = min(len, start + chunk);
  const int tiles = end > start ? static_cast<int>((end - start + kTileKeys - 1) / kTileKeys) : 0;
  const T* k_head = k_cache + static_cast<int64_t>(kv_head) * capacity * D;
  const T* v_head = v_cache + static_cast<int64_t>(kv_head) * capacity * D;

  auto load_tile = [&](int tile) {
    if (tile < tiles) {
      T* k_stage = smem + (tile % kStages) * 2 * kTileKeys * D;
      T* v_stage = k_stage + kTileKeys * D;
      const int64_t first = start + static_cast<int64_t>(tile) * kTileKeys;
      for (int c = threadIdx.x; c < kChunksPerTile; c += kWarps * 32) {
        const int row = c / (D / 8), col = (c % (D / 8)) * 8;
        const bool valid = first + row < end;
        const int64_t src = valid ? (first + row) * D + col : 0;
        copy16_async(k_stage + row * D + col, k_head + src, valid);
        copy16_async(v_stage + row * D + col, v_head + src, valid);
      }
    }
    commit_async();  // one group per tile, empty ones too, so that the counting stays simple
  };

  float qv[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const uint4 raw = *reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(kv_head) * G + g) * D + slot * 8);
    to_floats<T>(raw, qv[g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[g][i] *= scale * kLog2e;
  }
  Partial<G> p;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    p.max[g] = -INFINITY;
    p.sum[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) p.acc[g][i] = 0.0f;
  }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_tile(s);
  for (int tile = 0; tile < tiles; ++tile) {
    wait_async<kStages - 2>();  // this tile has landed
    __syncthreads();            // for every thread; and the stage refilled next is free
    load_tile(tile + kStages - 1);
    const T* k_stage = smem + (tile % kStages) * 2 * kTileKeys * D;
    const T* v_stage = k_stage + kTileKeys * D;
    const int64_t first = start + static_cast<int64_t>(tile) * kTileKeys;

    // Scores of this lane's kRounds keys of the tile, then one rescale for all of them.
    float score[kRounds][G];
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int row = warp * kWarpKeys + r * kKeysPerWarp + lane / kLanesPerKey;
      const bool valid = first + row < end;
      float kf[8];
      to_floats<T>(*reinterpret_cast<const uint4*>(k_stage + row * D + slot * 8), kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot += qv[g][i] * kf[i];
#pragma unroll
        for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) {
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        }
        score[r][g] = valid ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float m = p.max[g];
#pragma unroll
      for (int r = 0; r < kRounds; ++r) m = fmaxf(m, score[r][g]);
      if (m == -INFINITY) continue;  // nothing valid yet
      const float correction = exp2f(p.max[g] - m);
      p.sum[g] *= correction;
#pragma unroll
      for (int i = 0; i < 8; ++i) p.acc[g][i] *= correction;
      p.max[g] = m;
#pragma unroll
      for (int r = 0; r < kRounds; ++r) score[r][g] = exp2f(score[r][g] - m);  // weights
    }
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int row = warp * kWarpKeys + r * kKeysPerWarp + lane / kLanesPerKey;
      float vf[8];
      to_floats<T>(*reinterpret_cast<const uint4*>(v_stage + row * D + slot * 8), vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (p.max[g] == -INFINITY) continue;
        p.sum[g] += score[r][g];
#pragma unroll
        for (int i = 0; i < 8; ++i) p.acc[g][i] += score[r][g] * vf[i];
      }
    }
  }
  wait_async<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  // Merge the key groups of a warp (lanes kLanesPerKey apart) ...
#pragma unroll
  for (int offset = kLanesPerKey; offset < 32; offset *= 2) {
    float max_b[G], sum_b[G], acc_b[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      max_b[g] = __shfl_xor_sync(0xffffffffu, p.max[g], offset);
      sum_b[g] = __shfl_xor_sync(0xffffffffu, p.sum[g], offset);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc_b[g][i] = __shfl_xor_sync(0xffffffffu, p.acc[g][i], offset);
    }
    merge_into(p, max_b, sum_b, acc_b);
  }
  // ... then the warps, through shared memory: per warp G maxima, G sums, G x D outputs.
  float* s_max = reinterpret_cast<float*>(smem_raw);
  float* s_sum = s_max + kWarps * G;
  float* s_acc = s_sum + kWarps * G;
  if (lane < kLanesPerKey) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (lane == 0) {
        s_max[warp * G + g] = p.max[g];
        s_sum[warp * G + g] = p.sum[g];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) s_acc[(warp * G + g) * D + slot * 8 + i] = p.acc[g][i];
    }
  }
  __syncthreads();
  if (warp != 0 || lane >= kLanesPerKey) return;
  for (int w = 1; w < kWarps; ++w) {
    float max_b[G], sum_b[G], acc_b[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      max_b[g] = s_max[w * G + g];
      sum_b[g] = s_sum[w * G + g];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc_b[g][i] = s_acc[(w * G + g) * D + slot * 8 + i];
    }
    merge_into(p, max_b, sum_b, acc_b);
  }
  const int64_t row0 = static_cast<int64_t>(split) * heads + static_cast<int64_t>(kv_head) * G;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const bool empty = p.max[g] == -INFINITY;
    const float inv_sum = empty ? 0.0f : 1.0f / p.sum[g];
    float* out = o_parts + (row0 + g) * D + slot * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = p.acc[g][i] * inv_sum;
    if (slot == 0) {
      // log2 units back to natural log: lse = (max + log2(sum)) * ln 2.
      lse_parts[row0 + g] = empty ? -INFINITY : (p.max[g] + log2f(p.sum[g])) / kLog2e;
    }
  }
}

template <typename T, int D>
void launch_split(int group, dim3 grid, const void* q, const void* k, const void* v,
                  int64_t capacity, const int32_t* length, int heads, float scale, int splits,
                  float* o_parts, float* lse_parts, cudaStream_t stream) {
  auto launch = [&](auto g) {
    constexpr int G = decltype(g)::value;
    constexpr int kBytes = pipeline_bytes<T, D>();
    static_assert(kWarps * G * (D + 2) * 4 <= kBytes, "the final merge reuses the pipeline's memory");
    static const cudaError_t opt_in = cudaFuncSetAttribute(  // once per kernel
        decode_split_kernel<T, D, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    check_cuda(opt_in, "decode attention: shared memory opt-in");
    decode_split_kernel<T, D, G><<<grid, kWarps * 32, kBytes, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), capacity,
        length, heads, scale, splits, o_parts, lse_parts);
  };
  switch (group) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 3: launch(std::integral_constant<int, 3>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 5: launch(std::integral_constant<int, 5>{}); break;
    case 6: launch(std::integral_constant<int, 6>{}); break;
    case 7: launch(std::integral_constant<int, 7>{}); break;
    case 8: launch(std::integral_constant<int, 8>{}); break;
    default:
      throw std::invalid_argument("decode attention: heads per kv head must be 1..8, got " +
                                  std::to_string(group));
  }
}

}  // namespace

int64_t decode_workspace_floats(int heads, int head_dim, int splits) {
  return static_cast<int64_t>(splits) * heads * (head_dim + 1);
}

int decode_splits(int64_t capacity, int kv_heads, int multiprocessors) {
  // One wave of three blocks per multiprocessor (what fits beside each other with their
  // pipelines), but no split shorter than 256 keys at full capacity.
  const int64_t wanted = std::max<int64_t>(1, 3LL * multiprocessors / kv_heads);
  const int64_t most = std::max<int64_t>(1, capacity / 256);
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, most)));
}

void decode_attention_cuda(const void* q, const void* k_cache, const void* v_cache,
                           int64_t capacity, const int32_t* length, int heads, int kv_heads,
                           int head_dim, float scale, DType dtype, int splits, float* workspace,
                           void* o, float* lse, cudaStream_t stream) {
  if (kv_heads <= 0 || heads % kv_heads != 0) {
    throw std::invalid_argument("decode attention: heads must be a multiple of kv_heads");
  }
  if (splits < 1) throw std::invalid_argument("decode attention: splits must be >= 1");
  const int group = heads / kv_heads;
  const dim3 grid(kv_heads, splits);
  float* o_parts = workspace;
  float* lse_parts = workspace + static_cast<int64_t>(splits) * heads * head_dim;
  auto by_dim = [&](auto t) {
    using T = decltype(t);
    if (head_dim == 64) {
      launch_split<T, 64>(group, grid, q, k_cache, v_cache, capacity, length, heads, scale,
                          splits, o_parts, lse_parts, stream);
    } else if (head_dim == 128) {
      launch_split<T, 128>(group, grid, q, k_cache, v_cache, capacity, length, heads, scale,
                           splits, o_parts, lse_parts, stream);
    } else {
      throw std::invalid_argument("decode attention: head_dim must be 64 or 128, got " +
                                  std::to_string(head_dim));
    }
  };
  if (dtype == DType::kFloat16) {
    by_dim(__half{});
  } else if (dtype == DType::kBFloat16) {
    by_dim(__nv_bfloat16{});
  } else {
    throw std::invalid_argument("decode attention: dtype must be float16 or bfloat16");
  }
  check_cuda(cudaGetLastError(), "decode attention kernel launch");
  lse_merge_cuda(o_parts, static_cast<int64_t>(heads) * head_dim, DType::kFloat32, lse_parts,
                 heads, splits, heads, head_dim, o, dtype, lse, stream);
}

}  // namespace star
