// cosine_assign: for every row x of X the best of K unit centroids by cosine
// (x . c / ||x||), optionally the second best. Ties go to the lowest index.
// A zero row has cosine 0 to every centroid (index 0). A row holding NaN/Inf gets
// best_cos = NaN and is counted in bad[0]. N x K is never materialised.
#pragma once
#include "common.h"

namespace pyconcepts {

// Number of consecutive centroids per group of group_max (the CPU kernel's strip width).
constexpr int64_t kAssignGroup = 16;

// centroids: K x D fp32, contiguous. index: N int64; best_cos, second_cos: N fp32
// (second_cos may be null). bad: kBadSlots int64, overwritten. group_max (CPU only, may be
// null): N x ceil(K / kAssignGroup) fp32, the largest cosine within each group of
// kAssignGroup consecutive centroids (bounds for pruned k-means). row_index (CPU only, may
// be null): assign only the n_out rows x[row_index[i]] (indices already validated), writing
// output row i; the gather happens inside the kernel's conversion, X is not copied.
// center (CPU only, may be null): D floats subtracted from every row as it is read.
void cosine_assign_cpu(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                       float* best_cos, float* second_cos, int64_t* bad, int num_threads,
                       float* group_max = nullptr, const int64_t* row_index = nullptr,
                       int64_t n_out = 0, const float* center = nullptr);

#ifdef PYCONCEPTS_WITH_CUDA
void cosine_assign_cuda(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                        float* best_cos, float* second_cos, int64_t* bad, void* stream);
#endif

}  // namespace pyconcepts
