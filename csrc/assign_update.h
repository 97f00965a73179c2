// assign_update: cosine_assign and spherical_update fused into one read of X. Every block
// of rows is assigned and, while still in cache as fp32, added to its cluster's sum.
// Rows are grouped into fixed super-blocks whose float64 partial sums are merged in
// super-block order, so the sums are bit-identical for any thread count.
#pragma once
#include "common.h"

namespace pyconcepts {

// Outputs as cosine_assign (index, best_cos, second_cos may be null) plus sums (K x D
// float64) and counts (K int64) of the rows by their new assignment. All overwritten.
// Rows holding NaN/Inf are counted in bad[0] and left out of the sums.
// group_max: as in cosine_assign (may be null). With normalize, the sums are of the unit
// rows x / ||x|| (classic spherical k-means, whose objective is then sum_k ||sums_k||);
// otherwise of the rows as given (a norm-weighted objective). center (may be null): D floats
// subtracted from every row as it is read (rows and sums are then of x - center).
// sum_xz (K x D) and sum_z (K x 2), both null or both set: the signal-vector moments of the
// clusters (METHOD.md section 3 with P_i = the members of cluster i and z = c_i . v), where
// v is the row as summed (centred, unit when normalize): sum_xz[i] = sum v z, sum_z[i] =
// (sum z, sum z^2). Same super-block merge, so also identical for any thread count.
void assign_update_cpu(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                       float* best_cos, float* second_cos, double* sums, int64_t* counts,
                       int64_t* bad, int num_threads, float* group_max = nullptr,
                       bool normalize = false, const float* center = nullptr,
                       double* sum_xz = nullptr, double* sum_z = nullptr);

}  // namespace pyconcepts
