// The two formulas of a log-sum-exp merge, shared by every kernel that merges partial
// attention results (across ranks, across the splits of a decode, or both).
#pragma once

#include <cmath>

namespace star {

// Unnormalised weight of a part: exp(lse - max). A part without keys (lse = -inf) weighs 0,
// and its o, which may be anything, must not be read.
__device__ __forceinline__ float lse_weight(float lse, float max_lse) {
  return lse == -INFINITY ? 0.0f : __expf(lse - max_lse);
}

// Log-sum-exp of the union of the parts, from their maximum and summed weights; -inf when
// no part holds a key.
__device__ __forceinline__ float merged_lse(float max_lse, float sum) {
  return max_lse == -INFINITY ? -INFINITY : max_lse + logf(sum);
}

}  // namespace star
