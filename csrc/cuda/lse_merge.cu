// Log-sum-exp merge on the GPU: one warp per row (a token and head).
#include <cmath>
#include <stdexcept>
#include <string>

#include "dtype.cuh"
#include "kernels.h"
#include "lse.cuh"

namespace star {

namespace {

template <typename TIn, typename TOut>
__global__ void lse_merge_kernel(const TIn* __restrict__ o_parts, int64_t o_part_stride,
                                 const float* __restrict__ lse_parts, int64_t lse_part_stride,
                                 int parts, int64_t rows, int dim, TOut* __restrict__ o_out,
                                 float* __restrict__ lse_out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float max_lse = -INFINITY;
  for (int w = 0; w < parts; ++w) max_lse = fmaxf(max_lse, lse_parts[w * lse_part_stride + row]);
  TOut* out = o_out + row * dim;
  if (max_lse == -INFINITY) {  // no partition holds a key for this row
    for (int d = lane; d < dim; d += 32) out[d] = from_float<TOut>(0.0f);
    if (lane == 0) lse_out[row] = -INFINITY;
    return;
  }
  float sum = 0.0f;
  for (int w = 0; w < parts; ++w) sum += lse_weight(lse_parts[w * lse_part_stride + row], max_lse);
  const float inv_sum = 1.0f / sum;
  for (int d = lane; d < dim; d += 32) {
    float acc = 0.0f;
    for (int w = 0; w < parts; ++w) {
      const float weight = lse_weight(lse_parts[w * lse_part_stride + row], max_lse);
      if (weight != 0.0f) acc += weight * to_float(o_parts[w * o_part_stride + row * dim + d]);
    }
    out[d] = from_float<TOut>(acc * inv_sum);
  }
  if (lane == 0) lse_out[row] = merged_lse(max_lse, sum);
}

}  // namespace

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

void lse_merge_cuda(const void* o_parts, int64_t o_part_stride, DType in_dtype,
                    const float* lse_parts, int64_t lse_part_stride, int parts, int64_t rows,
                    int dim, void* o_out, DType out_dtype, float* lse_out, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kWarps = 4;
  const unsigned blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  dispatch_dtype(in_dtype, [&](auto in) {
    using TIn = decltype(in);
    dispatch_dtype(out_dtype, [&](auto out) {
      using TOut = decltype(out);
      lse_merge_kernel<TIn, TOut><<<blocks, kWarps * 32, 0, stream>>>(
          static_cast<const TIn*>(o_parts), o_part_stride, lse_parts, lse_part_stride, parts,
          rows, dim, static_cast<TOut*>(o_out), lse_out);
    });
  });
  check_cuda(cudaGetLastError(), "lse_merge kernel launch");
}

}  // namespace star
