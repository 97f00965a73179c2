// cosine_assign on the CPU: a blocked GEMM of X against the packed centroids with a running
// top-2 epilogue, so the N x K score matrix only ever exists one register tile at a time.
#include "cosine_assign.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/simd.h"

namespace pyconcepts {

namespace {

using cpu::MR;
using cpu::NR;

const void* row_ptr(const Matrix& x, int64_t i) {
  const int64_t elem = x.dtype == DType::F32 ? 4 : 2;
  return static_cast<const char*>(x.data) + i * x.row_stride * elem;
}

// Rows per block: the block of X (fp32) stays within ~96 KiB of L2 while every centroid
// strip (NR x D, L1-resident for D <= 256) sweeps over it.
int64_t rows_per_block(int64_t d) {
  const int64_t budget = (96 * 1024) / (4 * d);
  return std::max<int64_t>(MR, std::min<int64_t>(40 * MR, budget / MR * MR));
}

}  // namespace

void cosine_assign_cpu(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                       float* best_cos, float* second_cos, int64_t* bad, int num_threads) {
  const auto& kern = cpu::kernels();
  const int64_t n = x.rows, d = x.cols;
  bad[0] = bad[1] = 0;
  if (n == 0) return;

  // Centroids packed as strips of NR columns: strip s holds panel[p][j] = C[s*NR + j][p],
  // zero-padded past K (those lanes are masked out of the top-2).
  const int64_t strips = (k + NR - 1) / NR;
  std::vector<float> panel(static_cast<size_t>(strips * d * NR), 0.0f);
  for (int64_t c = 0; c < k; ++c) {
    float* dst = panel.data() + (c / NR) * d * NR + (c % NR);
    const float* src = centroids + c * d;
    for (int64_t p = 0; p < d; ++p) dst[p * NR] = src[p];
  }

  const int64_t rb = rows_per_block(d);
  const int64_t blocks = (n + rb - 1) / rb;
  int64_t nonfinite = 0;
  const float neg_inf = -std::numeric_limits<float>::infinity();

#pragma omp parallel num_threads(std::max(1, num_threads)) reduction(+ : nonfinite)
  {
    std::vector<float> xb(static_cast<size_t>(rb * d));
    std::vector<float> norms(rb);
    std::vector<char> finite(rb);
    std::vector<float> top_best(rb * NR), top_second(rb * NR);
    std::vector<int32_t> top_index(rb * NR);
    alignas(64) float tile[MR * NR];

#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * rb;
      const int64_t rows = std::min(rb, n - r0);
      const int64_t padded = (rows + MR - 1) / MR * MR;
      for (int64_t r = 0; r < rows; ++r) {
        finite[r] = kern.convert_row(row_ptr(x, r0 + r), x.dtype, d, nullptr,
                                     xb.data() + r * d, &norms[r]);
      }
      std::fill(xb.begin() + rows * d, xb.begin() + padded * d, 0.0f);
      std::fill(top_best.begin(), top_best.begin() + padded * NR, neg_inf);
      std::fill(top_second.begin(), top_second.begin() + padded * NR, neg_inf);
      std::fill(top_index.begin(), top_index.begin() + padded * NR, 0);

      for (int64_t s = 0; s < strips; ++s) {
        const float* b = panel.data() + s * d * NR;
        const int valid = static_cast<int>(std::min<int64_t>(NR, k - s * NR));
        for (int64_t m = 0; m < padded; m += MR) {
          kern.gemm_tile(d, xb.data() + m * d, d, b, NR, tile, NR, false);
          kern.top2_update(tile, static_cast<int32_t>(s * NR), valid,
                           top_best.data() + m * NR, top_second.data() + m * NR,
                           top_index.data() + m * NR);
        }
      }

      // Reduce the NR lanes of every row: largest value, lowest index among equal values.
      for (int64_t r = 0; r < rows; ++r) {
        const float* lb = top_best.data() + r * NR;
        const float* ls = top_second.data() + r * NR;
        const int32_t* li = top_index.data() + r * NR;
        int lane = 0;
        for (int j = 1; j < NR; ++j) {
          if (lb[j] > lb[lane] || (lb[j] == lb[lane] && li[j] < li[lane])) lane = j;
        }
        float second = ls[lane];
        for (int j = 0; j < NR; ++j) {
          if (j != lane) second = std::max(second, lb[j]);
        }
        const int64_t row = r0 + r;
        if (!finite[r]) {
          ++nonfinite;
          index[row] = 0;
          best_cos[row] = std::numeric_limits<float>::quiet_NaN();
          if (second_cos) second_cos[row] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        // Cosine = dot / ||x||; a zero row has all dots 0 and keeps cosine 0.
        const float inv = 1.0f / std::max(std::sqrt(norms[r]), 1e-12f);
        index[row] = li[lane];
        best_cos[row] = lb[lane] * inv;
        if (second_cos) second_cos[row] = second == neg_inf ? neg_inf : second * inv;
      }
    }
  }
  bad[0] = nonfinite;
}

}  // namespace pyconcepts
