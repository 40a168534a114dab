// The per-token work of a decoder layer besides its matrix products: RMSNorm, rotary
// embedding, SiLU-gated product. Each is one launch where PyTorch's eager ops take several
// (casts, reductions, temporaries); in a decode step, which moves little data per launch,
// the launches are what costs. Each rounds where PyTorch's reference ops round, so the
// results agree with the model's CPU path to the last bit in most elements.
#include <algorithm>

#include "dtype.cuh"
#include "kernels.h"

namespace star {

namespace {

constexpr int kThreads = 256;

// 16 bytes of elements: the unit of every load and store of rms_norm.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// One block per row: y = weight * T(x * rsqrt(mean(x^2) + eps)), the sum in float32.
template <typename T>
__global__ void __launch_bounds__(kThreads)
rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ y, int dim,
                float eps) {
  using P = Pack<T>;
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * dim;
  const P* row = reinterpret_cast<const P*>(x + offset);
  const P* w = reinterpret_cast<const P*>(weight);
  P* out = reinterpret_cast<P*>(y + offset);
  const int packs = dim / P::kSize;
  float sum = 0.0f;
  for (int p = threadIdx.x; p < packs; p += kThreads) {
    const P in = row[p];
#pragma unroll
    for (int i = 0; i < P::kSize; ++i) sum += to_float(in.v[i]) * to_float(in.v[i]);
  }
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) sum += warp_sums[i];
  const float inv = rsqrtf(sum / dim + eps);
  for (int p = threadIdx.x; p < packs; p += kThreads) {
    const P in = row[p], scale = w[p];
    P result;
#pragma unroll
    for (int i = 0; i < P::kSize; ++i) {
      result.v[i] = from_float<T>(to_float(scale.v[i]) * to_float(from_float<T>(to_float(in.v[i]) * inv)));
    }
    out[p] = result;
  }
}

// In place on x [tokens, heads, dim] (any token stride, heads dim apart): the halves
// convention, x' = x * cos + rotate_half(x) * sin, in float32; cos, sin [tokens, dim].
// Block (token, head), one thread per rotated pair.
template <typename T>
__global__ void rope_kernel(T* __restrict__ x, int64_t token_stride, int dim,
                            const float* __restrict__ cos, const float* __restrict__ sin) {
  const int token = blockIdx.x, i = threadIdx.x, half = dim / 2;
  const float* c = cos + static_cast<int64_t>(token) * dim;
  const float* s = sin + static_cast<int64_t>(token) * dim;
  T* head = x + token * token_stride + static_cast<int64_t>(blockIdx.y) * dim;
  const float lo = to_float(head[i]), hi = to_float(head[i + half]);
  head[i] = from_float<T>(lo * c[i] - hi * s[i]);
  head[i + half] = from_float<T>(hi * c[i + half] + lo * s[i + half]);
}

// out [tokens, inner] = T(silu(gate)) * up, with gate_up [tokens, 2 * inner].
template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int inner,
                                int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = e / inner, i = e % inner;
    const float gate = to_float(gate_up[token * 2 * inner + i]);
    const float silu = to_float(from_float<T>(gate / (1.0f + __expf(-gate))));
    out[e] = from_float<T>(silu * to_float(gate_up[token * 2 * inner + inner + i]));
  }
}

}  // namespace

void rms_norm_cuda(const void* x, const void* weight, void* y, int64_t rows, int dim, float eps,
                   DType dtype, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    rms_norm_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(y), dim, eps);
  });
  check_cuda(cudaGetLastError(), "rms_norm kernel launch");
}

void rope_cuda(void* x, int64_t tokens, int64_t token_stride, int heads, int dim, const float* cos,
               const float* sin, DType dtype, cudaStream_t stream) {
  if (tokens == 0) return;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    rope_kernel<T><<<dim3(static_cast<unsigned>(tokens), heads), dim / 2, 0, stream>>>(
        static_cast<T*>(x), token_stride, dim, cos, sin);
  });
  check_cuda(cudaGetLastError(), "rope kernel launch");
}

void silu_mul_cuda(const void* gate_up, void* out, int64_t tokens, int inner, DType dtype,
                   cudaStream_t stream) {
  const int64_t total = tokens * inner;
  if (total == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    silu_mul_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(gate_up),
                                                        static_cast<T*>(out), inner, total);
  });
  check_cuda(cudaGetLastError(), "silu_mul kernel launch");
}

}  // namespace star
