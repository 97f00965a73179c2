// spherical_update on the CPU. Threads split the columns, not the rows: every output
// element is then summed by one thread in row order, so the float64 sums are bit-identical
// for any thread count, and no two threads ever write the same cache line of the output.
#include "spherical_update.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/simd.h"

namespace pyconcepts {

namespace {
constexpr int64_t kColumnGrain = 16;  // 16 doubles = two cache lines of the output row
constexpr int64_t kRowBatch = 64;     // rows converted to fp32 at a time
}  // namespace

void spherical_update_cpu(const Matrix& x, const int64_t* index, int64_t k, double* sums,
                          int64_t* counts, int64_t* bad, int num_threads) {
  const auto& kern = cpu::kernels();
  const int64_t n = x.rows, d = x.cols;
  const int64_t elem = x.dtype == DType::F32 ? 4 : 2;
  std::fill(sums, sums + k * d, 0.0);
  std::fill(counts, counts + k, int64_t{0});
  bad[0] = bad[1] = 0;
  if (n == 0) return;

  const int64_t grains = (d + kColumnGrain - 1) / kColumnGrain;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, grains)));
  int64_t nonfinite_rows = 0, out_of_range = 0;

#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t c0 = std::min(d, grains * t / nt * kColumnGrain);
    const int64_t c1 = std::min(d, grains * (t + 1) / nt * kColumnGrain);
    const int64_t w = c1 - c0;
    std::vector<float> buf(static_cast<size_t>(kRowBatch * std::max<int64_t>(w, 1)));
    int64_t my_nonfinite = 0;
    for (int64_t r0 = 0; r0 < n && w > 0; r0 += kRowBatch) {
      const int64_t rows = std::min(kRowBatch, n - r0);
      for (int64_t r = 0; r < rows; ++r) {
        const char* src =
            static_cast<const char*>(x.data) + ((r0 + r) * x.row_stride + c0) * elem;
        if (!kern.convert_row(src, x.dtype, w, nullptr, buf.data() + r * w, nullptr))
          ++my_nonfinite;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = index[r0 + r];
        if (c < 0 || c >= k) continue;
        double* dst = sums + c * d + c0;
        const float* src = buf.data() + r * w;
        for (int64_t j = 0; j < w; ++j) dst[j] += static_cast<double>(src[j]);
      }
    }
    // Counts and index checks need one pass over the indices; the first thread does it.
    if (t == 0) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = index[i];
        if (c < 0 || c >= k) {
          ++out_of_range;
        } else {
          ++counts[c];
        }
      }
    }
#pragma omp critical
    nonfinite_rows = std::max(nonfinite_rows, my_nonfinite);
  }
  // A row is non-finite in at least one column range; the largest per-thread count is a
  // lower bound on the number of such rows, and non-zero exactly when any exists.
  bad[0] = nonfinite_rows;
  bad[1] = out_of_range;
}

}  // namespace pyconcepts
