// assign_update on the CPU: one read of X per Lloyd pass (see assign_update.h).
#include "assign_update.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cpu/assign_block.h"
#include "cpu/screen.h"

namespace pyconcepts {

namespace {
// Rows per super-block: fixed, so the summation order never depends on the thread count.
// Large enough that zeroing and merging one K x D partial is cheap next to its GEMM work.
constexpr int64_t kSuperBlockRows = 8192;
}  // namespace

void assign_update_cpu(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                       float* best_cos, float* second_cos, double* sums, int64_t* counts,
                       int64_t* bad, int num_threads, float* group_max, bool normalize,
                       const float* center, double* sum_xz, double* sum_z) {
  const int64_t n = x.rows, d = x.cols;
  const bool moments = sum_xz != nullptr;
  std::fill(sums, sums + k * d, 0.0);
  std::fill(counts, counts + k, int64_t{0});
  if (moments) {
    std::fill(sum_xz, sum_xz + k * d, 0.0);
    std::fill(sum_z, sum_z + 2 * k, 0.0);
  }
  bad[0] = bad[1] = 0;
  if (n == 0) return;
  const cpu::CentroidPanel panel(centroids, k, d);
  std::unique_ptr<cpu::ScreenPanel> screen;
  if (!second_cos && !group_max && cpu::screen_enabled())
    screen.reset(new cpu::ScreenPanel(centroids, k, d));
  if (screen && !screen->usable) screen.reset();
  const auto& kern = cpu::kernels();
  const int64_t rb = cpu::AssignWorkspace::rows_for(d);
  const int64_t supers = (n + kSuperBlockRows - 1) / kSuperBlockRows;
  int64_t nonfinite = 0;

#pragma omp parallel num_threads(cpu::threads_for(num_threads, supers)) reduction(+ : nonfinite)
  {
    cpu::AssignWorkspace ws(d);
    std::vector<double> partial(static_cast<size_t>(k * d));
    std::vector<int64_t> partial_counts(k);
    std::vector<char> touched(k);
    std::vector<double> partial_xz(moments ? static_cast<size_t>(k * d) : 0);
    std::vector<double> partial_z(moments ? static_cast<size_t>(2 * k) : 0);
#pragma omp for ordered schedule(static, 1)
    for (int64_t sb = 0; sb < supers; ++sb) {
      std::fill(touched.begin(), touched.end(), 0);
      const int64_t s0 = sb * kSuperBlockRows, s1 = std::min(n, s0 + kSuperBlockRows);
      for (int64_t r0 = s0; r0 < s1; r0 += rb) {
        const int64_t rows = std::min(rb, s1 - r0);
        nonfinite +=
            cpu::assign_block(x, panel, r0, rows, ws, index, best_cos, second_cos, group_max,
                              nullptr, center, screen.get());
        for (int64_t r = 0; r < rows; ++r) {
          if (!ws.finite[r]) continue;
          const int64_t c = index[r0 + r];
          double* dst = partial.data() + c * d;
          const float* src = ws.xb.data() + r * d;
          // the norm only when it is used (a square root per row shows at small D x K); the
          // block holds the row times 1 / unscale (rescale_row), norm is of the block's row
          const double norm =
              normalize || moments ? std::sqrt(static_cast<double>(ws.norms[r])) : 1.0;
          const double scale = normalize ? 1.0 / std::max(norm, 1e-12) : ws.unscale[r];
          const bool first = !touched[c];  // first member in this super-block: initialise
          if (first) {
            touched[c] = 1;
            partial_counts[c] = 0;
            if (moments) {
              std::fill(partial_xz.begin() + c * d, partial_xz.begin() + (c + 1) * d, 0.0);
              partial_z[2 * c] = partial_z[2 * c + 1] = 0.0;
            }
          }
          kern.add_scaled_row(dst, src, d, scale, first);
          ++partial_counts[c];
          if (moments) {
            // z = c . v from the kernel's cosine: cos for unit rows, cos * ||x|| otherwise
            const double z =
                static_cast<double>(best_cos[r0 + r]) * (normalize ? 1.0 : norm * ws.unscale[r]);
            const double zs = z * scale;
            kern.add_scaled_row(partial_xz.data() + c * d, src, d, zs, false);
            partial_z[2 * c] += z;
            partial_z[2 * c + 1] += z * z;
          }
        }
      }
#pragma omp ordered
      {
        for (int64_t c = 0; c < k; ++c) {
          if (!touched[c]) continue;
          double* dst = sums + c * d;
          const double* src = partial.data() + c * d;
          for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
          counts[c] += partial_counts[c];
          if (moments) {
            const double* pxz = partial_xz.data() + c * d;
            double* oxz = sum_xz + c * d;
            for (int64_t j = 0; j < d; ++j) oxz[j] += pxz[j];
            sum_z[2 * c] += partial_z[2 * c];
            sum_z[2 * c + 1] += partial_z[2 * c + 1];
          }
        }
      }
    }
  }
  bad[0] = nonfinite;
}

}  // namespace pyconcepts
