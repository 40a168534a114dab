// A stream's progress, readable by a host thread without a CUDA call (see kernels.h).
#include "kernels.h"

namespace star {

namespace {

__global__ void signal_kernel(volatile uint64_t* slot, uint64_t value) {
  *slot = value;
  __threadfence_system();
}

}  // namespace

void signal_progress_cuda(uint64_t* slot, uint64_t value, cudaStream_t stream) {
  signal_kernel<<<1, 1, 0, stream>>>(slot, value);
  check_cuda(cudaGetLastError(), "signal_progress");
}

}  // namespace star
