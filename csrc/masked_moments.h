// masked_moments: the signal-vector sufficient statistics of all K concepts in one pass.
// With z = W x (raw activations) and mask m_i = [z_i > b_i], and shifted values
// xc = x - center, zc_i = w_i . xc (center = 0 when null):
//   count_i = sum m_i,  sum_z_i = sum m_i zc_i,  sum_z2_i = sum m_i zc_i^2,
//   sum_x_i = sum m_i xc,  sum_xz_i = sum m_i zc_i xc.
// Products are formed in fp32 over blocks of rows and every block is merged in float64, so
// long streams lose no precision; the shift removes the cancellation in Cov = E[xz]-E[x]E[z].
// Rows holding NaN/Inf are counted in bad[0].
#pragma once
#include "common.h"

namespace pyconcepts {

// w: K x D fp32 contiguous; b: K fp32; center: D fp32 or null.
// count: K int64; sum_z, sum_z2: K float64; sum_x, sum_xz: K x D float64. All overwritten.
void masked_moments_cpu(const Matrix& x, const float* w, const float* b, const float* center,
                        int64_t k, int64_t* count, double* sum_z, double* sum_z2, double* sum_x,
                        double* sum_xz, int64_t* bad, int num_threads);

#ifdef PYCONCEPTS_WITH_CUDA
void masked_moments_cuda(const Matrix& x, const float* w, const float* b, const float* center,
                         int64_t k, int64_t* count, double* sum_z, double* sum_z2,
                         double* sum_x, double* sum_xz, int64_t* bad, void* stream);
#endif

}  // namespace pyconcepts
