// spherical_update: per-cluster sums of member rows (float64) and member counts.
// Normalising the sums gives the spherical k-means centroids; empty clusters are left to
// the caller. Indices outside [0, K) are skipped and counted in bad[1]; rows holding
// NaN/Inf are counted in bad[0] (they still enter the sums, which the caller rejects).
#pragma once
#include "common.h"

namespace pyconcepts {

// index: N int64. sums: K x D float64, counts: K int64, both overwritten.
void spherical_update_cpu(const Matrix& x, const int64_t* index, int64_t k, double* sums,
                          int64_t* counts, int64_t* bad, int num_threads);

#ifdef PYCONCEPTS_WITH_CUDA
void spherical_update_cuda(const Matrix& x, const int64_t* index, int64_t k, double* sums,
                           int64_t* counts, int64_t* bad, void* stream);
#endif

}  // namespace pyconcepts
