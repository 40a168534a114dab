// Log-sum-exp merge of partial attention results.
//
// W partitions of the keys each give, per row (a token and head), an attention
// output o_w (dim values) and its log-sum-exp lse_w (natural log, fp32). The
// attention over the union of the keys is
//   lse = log(sum_w exp(lse_w)),  o = sum_w exp(lse_w - lse) * o_w.
// A partition that holds no keys has lse_w = -inf and contributes nothing; a
// row that no partition covers comes out as o = 0, lse = -inf.
#pragma once

#include <cstdint>

namespace star {

// Part w of the inputs starts at o_parts + w * o_part_stride and
// lse_parts + w * lse_part_stride; inside a part, rows are contiguous
// (o: rows x dim, lse: rows). Outputs are contiguous. Arithmetic is fp32.
template <typename T>
void lse_merge_cpu(const T* o_parts, int64_t o_part_stride, const float* lse_parts,
                   int64_t lse_part_stride, int64_t parts, int64_t rows, int64_t dim,
                   T* o_out, float* lse_out);

}  // namespace star
