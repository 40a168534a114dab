// Split-KV decode attention: one query token, grouped-query heads, a long KV cache read in
// place. Memory-bound: each key and value row is read once, 16 bytes per lane, coalesced,
// several rows in flight per warp; the G query heads that share a kv head share its loads.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "dtype.cuh"
#include "kernels.h"

namespace star {

namespace {

constexpr int kWarps = 4;
constexpr int kUnroll = 4;  // key rows each lane loads before it uses the first
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
  const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(values[i]);
}

// State of an online softmax over a subset of the keys, in log2 units.
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

// grid (kv_heads, splits), kWarps warps. A key row is D / 8 lanes wide (16 bytes each), so a
// warp works on 32 / (D / 8) rows at a time.
template <typename T, int D, int G>
__global__ void __launch_bounds__(kWarps * 32)
decode_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                    const T* __restrict__ v_cache, int64_t capacity,
                    const int32_t* __restrict__ length, int heads, float scale, int splits,
                    float* __restrict__ o_parts, float* __restrict__ lse_parts) {
  constexpr int kLanesPerKey = D / 8;
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kKeysPerStep = kKeysPerWarp * kWarps;
  const int kv_head = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane % kLanesPerKey;  // which 8 elements of a row this lane holds
  const int64_t len = *length;
  const int64_t chunk = (len + splits - 1) / splits;
  const int64_t start = split * chunk, end = min(len, start + chunk);

  float qv[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load_vec(q + (static_cast<int64_t>(kv_head) * G + g) * D + slot * 8, qv[g]);
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

  const T* k_head = k_cache + static_cast<int64_t>(kv_head) * capacity * D + slot * 8;
  const T* v_head = v_cache + static_cast<int64_t>(kv_head) * capacity * D + slot * 8;
  const int first = warp * kKeysPerWarp + lane / kLanesPerKey;
  for (int64_t base = start; base < end; base += kKeysPerStep * kUnroll) {
    float kv[kUnroll][8], vv[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + first + u * kKeysPerStep;
      if (j < end) {
        load_vec(k_head + j * D, kv[u]);
        load_vec(v_head + j * D, vv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool valid = base + first + u * kKeysPerStep < end;
      float score[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot += qv[g][i] * (valid ? kv[u][i] : 0.0f);
#pragma unroll
        for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) {
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        }
        score[g] = valid ? dot : -INFINITY;
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (!valid) continue;
        const float m = fmaxf(p.max[g], score[g]);
        const float correction = exp2f(p.max[g] - m), weight = exp2f(score[g] - m);
        p.sum[g] = p.sum[g] * correction + weight;
#pragma unroll
        for (int i = 0; i < 8; ++i) p.acc[g][i] = p.acc[g][i] * correction + weight * vv[u][i];
        p.max[g] = m;
      }
    }
  }

  // Merge the rows a warp worked on side by side (lanes kLanesPerKey apart) ...
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
  // ... then the warps, through shared memory.
  __shared__ float s_max[kWarps][G], s_sum[kWarps][G], s_acc[kWarps][G][D];
  if (lane < kLanesPerKey) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (lane == 0) {
        s_max[warp][g] = p.max[g];
        s_sum[warp][g] = p.sum[g];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) s_acc[warp][g][slot * 8 + i] = p.acc[g][i];
    }
  }
  __syncthreads();
  if (warp != 0 || lane >= kLanesPerKey) return;
  for (int w = 1; w < kWarps; ++w) {
    float acc_b[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc_b[g][i] = s_acc[w][g][slot * 8 + i];
    }
    merge_into(p, s_max[w], s_sum[w], acc_b);
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
    decode_split_kernel<T, D, G><<<grid, kWarps * 32, 0, stream>>>(
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
  // Four blocks per multiprocessor (as many as fit beside each other), but no split
  // shorter than 256 keys at full capacity.
  const int64_t wanted = (4LL * multiprocessors + kv_heads - 1) / kv_heads;
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
