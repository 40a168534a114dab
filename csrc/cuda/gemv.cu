// The matrix products of a decode step: one token, so each is a matrix-vector product
// y = W x that reads every weight once, and the step's time is the weights' bytes over the
// memory bandwidth. One warp per row of W streams it in 16-byte loads, several in flight
// per lane; x stays in L1. The bias, or the residual the product is added into, joins the
// float32 sum before its one rounding, as in cuBLAS's epilogue.
#include <cstring>
#include <stdexcept>

#include "dtype.cuh"
#include "kernels.h"

namespace star {

namespace {

constexpr int kWarps = 8;   // rows per block
constexpr int kUnroll = 4;  // 16-byte loads of W in flight per lane

// W is read once: stream it past the caches (evict first) so that x stays.
template <typename T>
__device__ __forceinline__ Pack<T> load_streaming(const Pack<T>* p) {
  const uint4 bits = __ldcs(reinterpret_cast<const uint4*>(p));
  Pack<T> out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
__device__ __forceinline__ Pack<T> load_cached(const Pack<T>* p) {
  const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T> out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
__device__ __forceinline__ float dot(const Pack<T>& a, const Pack<T>& b) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < Pack<T>::kSize; ++i) sum = fmaf(to_float(a.v[i]), to_float(b.v[i]), sum);
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
gemv_kernel(const T* __restrict__ weight, const T* __restrict__ x, const T* __restrict__ bias,
            T* out, int64_t rows, int cols, bool accumulate) {
  using P = Pack<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp
  const P* w = reinterpret_cast<const P*>(weight + row * cols);
  const P* v = reinterpret_cast<const P*>(x);
  const int packs = cols / P::kSize;
  float acc = 0.0f;
  int p = lane;
  for (; p + 32 * (kUnroll - 1) < packs; p += 32 * kUnroll) {
    P wp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) wp[u] = load_streaming(w + p + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc += dot(wp[u], load_cached(v + p + 32 * u));
  }
  for (; p < packs; p += 32) acc += dot(load_streaming(w + p), load_cached(v + p));
#pragma unroll
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) {
    if (bias != nullptr) acc += to_float(bias[row]);
    if (accumulate) acc += to_float(out[row]);
    out[row] = from_float<T>(acc);
  }
}

}  // namespace

void gemv_cuda(const void* weight, const void* x, const void* bias, void* out, int64_t rows,
               int cols, bool accumulate, DType dtype, cudaStream_t stream) {
  if (rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (cols <= 0 || cols % Pack<T>::kSize != 0) {
      throw std::invalid_argument("gemv: rows of W must be whole 16-byte packs");
    }
    gemv_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(
        static_cast<const T*>(weight), static_cast<const T*>(x), static_cast<const T*>(bias),
        static_cast<T*>(out), rows, cols, accumulate);
  });
  check_cuda(cudaGetLastError(), "gemv kernel launch");
}

}  // namespace star
