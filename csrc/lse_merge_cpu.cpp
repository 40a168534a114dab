#include "lse_merge.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <vector>

namespace star {

template <typename T>
void lse_merge_cpu(const T* o_parts, int64_t o_part_stride, const float* lse_parts,
                   int64_t lse_part_stride, int64_t parts, int64_t rows, int64_t dim,
                   T* o_out, float* lse_out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<float> acc(dim);
  for (int64_t row = 0; row < rows; ++row) {
    float max_lse = kNegInf;
    for (int64_t w = 0; w < parts; ++w) {
      max_lse = std::fmax(max_lse, lse_parts[w * lse_part_stride + row]);
    }
    T* o_row = o_out + row * dim;
    if (max_lse == kNegInf) {  // no partition holds a key for this row
      for (int64_t d = 0; d < dim; ++d) o_row[d] = T(0.0f);
      lse_out[row] = kNegInf;
      continue;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    float sum = 0.0f;
    for (int64_t w = 0; w < parts; ++w) {
      const float lse_w = lse_parts[w * lse_part_stride + row];
      if (lse_w == kNegInf) continue;  // exp(-inf) is 0, and o_w may be garbage
      const float weight = std::exp(lse_w - max_lse);
      sum += weight;
      const T* o_w = o_parts + w * o_part_stride + row * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += weight * static_cast<float>(o_w[d]);
    }
    const float inv_sum = 1.0f / sum;
    for (int64_t d = 0; d < dim; ++d) o_row[d] = T(acc[d] * inv_sum);
    lse_out[row] = max_lse + std::log(sum);
  }
}

#define STAR_INSTANTIATE_MERGE(T)                                                        \
  template void lse_merge_cpu<T>(const T*, int64_t, const float*, int64_t, int64_t,      \
                                 int64_t, int64_t, T*, float*);
STAR_INSTANTIATE_MERGE(float)
STAR_INSTANTIATE_MERGE(c10::BFloat16)
STAR_INSTANTIATE_MERGE(c10::Half)
#undef STAR_INSTANTIATE_MERGE

}  // namespace star
