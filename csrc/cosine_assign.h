// cosine_assign: for every row x of X the best of K unit centroids by cosine
// (x . c / ||x||), optionally the second best. Ties go to the lowest index.
// A zero row has cosine 0 to every centroid (index 0). A row holding NaN/Inf gets
// best_cos = NaN and is counted in bad[0]. N x K is never materialised.
#pragma once
#include "common.h"

namespace pyconcepts {

// centroids: K x D fp32, contiguous. index: N int64; best_cos, second_cos: N fp32
// (second_cos may be null). bad: kBadSlots int64, overwritten.
void cosine_assign_cpu(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                       float* best_cos, float* second_cos, int64_t* bad, int num_threads);

#ifdef PYCONCEPTS_WITH_CUDA
void cosine_assign_cuda(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                        float* best_cos, float* second_cos, int64_t* bad, void* stream);
#endif

}  // namespace pyconcepts
