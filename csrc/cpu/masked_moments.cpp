// masked_moments on the CPU, per block of rows:
//   1. convert + centre the block:            XB (rows x D, fp32)
//   2. Z = XB W^T with the GEMM tile           (rows x K_t)
//   3. mask and build A^T = [M, M*Z]^T        (2 K_t x rows); counts, sum z, sum z^2 in fp64
//   4. A^T XB with the GEMM tile, every tile merged into the float64 sums.
// Threads split the concepts (strips of NR), so each statistic is accumulated by one thread
// in a fixed order: bit-identical results for any thread count, and no reduction step.
#include "masked_moments.h"

#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/simd.h"

namespace pyconcepts {

namespace {
using cpu::MR;
using cpu::NR;
constexpr int64_t kBlockRows = 96;  // a multiple of MR; fp32 partial sums span 96 rows
}  // namespace

void masked_moments_cpu(const Matrix& x, const float* w, const float* b, const float* center,
                        int64_t k, int64_t* count, double* sum_z, double* sum_z2, double* sum_x,
                        double* sum_xz, int64_t* bad, int num_threads) {
  const auto& kern = cpu::kernels();
  const int64_t n = x.rows, d = x.cols;
  const int64_t elem = x.dtype == DType::F32 ? 4 : 2;
  std::fill(count, count + k, int64_t{0});
  std::fill(sum_z, sum_z + k, 0.0);
  std::fill(sum_z2, sum_z2 + k, 0.0);
  std::fill(sum_x, sum_x + k * d, 0.0);
  std::fill(sum_xz, sum_xz + k * d, 0.0);
  bad[0] = bad[1] = 0;
  if (n == 0) return;

  const int64_t strips = (k + NR - 1) / NR;
  const int64_t dp = (d + NR - 1) / NR * NR;

  // W packed as strips of NR concepts (panel[p][j] = W[s*NR + j][p]); the mask threshold
  // moves with the centre: w.x > b  <=>  w.(x - c) > b - w.c. Padded concepts never fire.
  std::vector<float> panel(static_cast<size_t>(strips * d * NR), 0.0f);
  std::vector<float> threshold(static_cast<size_t>(strips * NR),
                               std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < k; ++c) {
    float* dst = panel.data() + (c / NR) * d * NR + (c % NR);
    double wc = 0.0;
    for (int64_t p = 0; p < d; ++p) {
      dst[p * NR] = w[c * d + p];
      if (center) wc += static_cast<double>(w[c * d + p]) * center[p];
    }
    threshold[c] = static_cast<float>(static_cast<double>(b[c]) - wc);
  }

  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, strips)));
  int64_t nonfinite = 0;

#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t s0 = strips * t / nt, s1 = strips * (t + 1) / nt;
    const int64_t kt = (s1 - s0) * NR;          // this thread's concepts (padded)
    const int64_t a_rows = (2 * kt + MR - 1) / MR * MR;
    std::vector<float> xb(static_cast<size_t>(kBlockRows * dp));
    std::vector<float> zb(static_cast<size_t>(kBlockRows * std::max<int64_t>(kt, 1)));
    std::vector<float> at(static_cast<size_t>(std::max<int64_t>(a_rows, MR) * kBlockRows), 0.0f);
    alignas(64) float tile[cpu::kMaxTiles * MR * NR];
    const int64_t step = kern.tiles_per_call * MR;
    int64_t my_nonfinite = 0;

    for (int64_t r0 = 0; r0 < n && kt > 0; r0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, n - r0);
      const int64_t padded = (rows + MR - 1) / MR * MR;
      // 1. convert and centre; pad columns to dp and rows to a multiple of MR with zeros
      for (int64_t r = 0; r < rows; ++r) {
        const char* src = static_cast<const char*>(x.data) + (r0 + r) * x.row_stride * elem;
        float* dst = xb.data() + r * dp;
        if (!kern.convert_row(src, x.dtype, d, center, dst, nullptr)) ++my_nonfinite;
        std::fill(dst + d, dst + dp, 0.0f);
      }
      std::fill(xb.begin() + rows * dp, xb.begin() + padded * dp, 0.0f);

      // 2. Z = XB W^T for this thread's strips
      for (int64_t s = s0; s < s1; ++s) {
        const float* bp = panel.data() + s * d * NR;
        for (int64_t m = 0; m < padded; m += step) {
          const int count = static_cast<int>(std::min<int64_t>(step, padded - m) / MR);
          kern.gemm_tiles(d, xb.data() + m * dp, dp, count, bp, NR,
                          zb.data() + m * kt + (s - s0) * NR, kt);
        }
      }

      // 3. A^T rows: [0, kt) the mask, [kt, 2kt) mask * z; padded rows stay zero
      for (int64_t j = 0; j < kt; ++j) {
        const int64_t c = s0 * NR + j;
        const float thr = threshold[c];
        float* am = at.data() + j * kBlockRows;
        float* amz = at.data() + (kt + j) * kBlockRows;
        double cz = 0.0, cz2 = 0.0;
        int64_t cn = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const float z = zb[r * kt + j];
          const bool on = z > thr;
          am[r] = on ? 1.0f : 0.0f;
          amz[r] = on ? z : 0.0f;
          if (on) {
            ++cn;
            cz += z;
            cz2 += static_cast<double>(z) * z;
          }
        }
        std::fill(am + rows, am + kBlockRows, 0.0f);
        std::fill(amz + rows, amz + kBlockRows, 0.0f);
        if (c < k) {
          count[c] += cn;
          sum_z[c] += cz;
          sum_z2[c] += cz2;
        }
      }

      // 4. [M, M*Z]^T XB, each register tile merged into the float64 sums
      for (int64_t i = 0; i < a_rows; i += step) {
        const int count = static_cast<int>(std::min<int64_t>(step, a_rows - i) / MR);
        for (int64_t d0 = 0; d0 < dp; d0 += NR) {
          kern.gemm_tiles(rows, at.data() + i * kBlockRows, kBlockRows, count, xb.data() + d0, dp,
                          tile, NR);
          const int64_t cols = std::min<int64_t>(NR, d - d0);
          for (int64_t u = 0; u < count * MR; ++u) {
            const int64_t arow = i + u;
            if (arow >= 2 * kt) break;
            const bool is_mz = arow >= kt;
            const int64_t c = s0 * NR + (is_mz ? arow - kt : arow);
            if (c >= k) continue;
            double* dst = (is_mz ? sum_xz : sum_x) + c * d + d0;
            for (int64_t j = 0; j < cols; ++j) dst[j] += static_cast<double>(tile[u * NR + j]);
          }
        }
      }
    }
    if (t == 0) nonfinite = my_nonfinite;  // every thread reads every row; one reports
  }
  bad[0] = nonfinite;
}

}  // namespace pyconcepts
