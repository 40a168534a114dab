// Element types of the kernels and the dispatch from DType to them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels.h"

namespace star {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Calls fn(T{}) with the C++ type of `dtype`.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(__half{}); return;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return;
  }
  throw std::invalid_argument("unknown dtype");
}

// Calls fn(T{}, std::integral_constant<int, D>{}) for the attention kernels' types: T of a
// 16-bit `dtype` (tensor-core inputs), head_dim D of 64 or 128; else invalid_argument,
// `what` naming the kernel.
template <typename Fn>
void dispatch_attention(DType dtype, int head_dim, const char* what, Fn&& fn) {
  auto by_dim = [&](auto t) {
    if (head_dim == 64) {
      fn(t, std::integral_constant<int, 64>{});
    } else if (head_dim == 128) {
      fn(t, std::integral_constant<int, 128>{});
    } else {
      throw std::invalid_argument(std::string(what) + ": head_dim must be 64 or 128, got " +
                                  std::to_string(head_dim));
    }
  };
  if (dtype == DType::kFloat16) {
    by_dim(__half{});
  } else if (dtype == DType::kBFloat16) {
    by_dim(__nv_bfloat16{});
  } else {
    throw std::invalid_argument(std::string(what) + ": dtype must be float16 or bfloat16");
  }
}

}  // namespace star
