// PyTorch glue of the CUDA side (cuda_glue.cpp), present when PyTorch has CUDA.
#pragma once

#include <torch/extension.h>

namespace star {

// Merges o_parts [W, rows, dim] / lse_parts [W, rows] into o [rows, dim] / lse [rows] on
// the current stream; shapes already checked by the caller.
void lse_merge_gpu(const at::Tensor& o_parts, const at::Tensor& lse_parts, at::Tensor& o,
                   at::Tensor& lse);

void register_cuda_bindings(pybind11::module& m);

}  // namespace star
