// PyTorch glue of the CUDA side (cuda_glue.cpp), present when PyTorch has CUDA.
#pragma once

#include <torch/extension.h>

namespace star {

// Merges o_parts [W, rows, dim] / lse_parts [W, rows] into o [rows, dim] / lse [rows] on
// the current stream; shapes already checked by the caller.
void lse_merge_gpu(const at::Tensor& o_parts, const at::Tensor& lse_parts, at::Tensor& o,
                   at::Tensor& lse);

// Writes one token's k, v [KV, 1, D] into slot length - 1 of a cache layer [KV, capacity, D]
// (length: int32 [1], read on the device; a slot outside the layer is not written).
void kv_append(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& length);

void register_cuda_bindings(pybind11::module& m);

}  // namespace star
