// cosine_assign on the CPU: a blocked GEMM of X against the packed centroids with a running
// top-2 epilogue, so the N x K score matrix only ever exists one register tile at a time.
#include "cosine_assign.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "cpu/assign_block.h"
#include "cpu/screen.h"

namespace pyconcepts {
namespace cpu {

namespace {
const void* row_ptr(const Matrix& x, int64_t i) {
  const int64_t elem = x.dtype == DType::F32 ? 4 : 2;
  return static_cast<const char*>(x.data) + i * x.row_stride * elem;
}
}  // namespace

CentroidPanel::CentroidPanel(const float* centroids, int64_t k_, int64_t d_)
    : k(k_), d(d_), strips((k_ + NR - 1) / NR), data(static_cast<size_t>(strips * d_ * NR), 0.0f) {
  for (int64_t c = 0; c < k; ++c) {
    float* dst = data.data() + (c / NR) * d * NR + (c % NR);
    const float* src = centroids + c * d;
    for (int64_t p = 0; p < d; ++p) dst[p * NR] = src[p];
  }
}

// Rows per block: the fp32 block stays within ~96 KiB of L2 while every centroid strip
// (NR x D, L1-resident for D <= 256) sweeps over it.
int64_t AssignWorkspace::rows_for(int64_t d) {
  return std::max<int64_t>(MR, std::min<int64_t>(40 * MR, (96 * 1024) / (4 * d) / MR * MR));
}

AssignWorkspace::AssignWorkspace(int64_t d)
    : rows_per_block(rows_for(d)),
      xb(static_cast<size_t>(rows_per_block * d)),
      norms(rows_per_block),
      unscale(rows_per_block),
      finite(rows_per_block),
      top_best(rows_per_block * NR),
      top_second(rows_per_block * NR),
      top_index(rows_per_block * NR) {}

bool rescale_row(float* row, int64_t d, float& sumsq, double& unscale) {
  unscale = 1.0;
  if (sumsq >= kMinSafeSumsq && sumsq <= kMaxSafeSumsq) return true;
  float amax = 0.0f;
  for (int64_t p = 0; p < d; ++p) amax = std::max(amax, std::abs(row[p]));
  if (!std::isfinite(amax)) return false;
  if (amax == 0.0f) {
    sumsq = 0.0f;
    return true;
  }
  int e;
  std::frexp(amax, &e);  // amax = m 2^e, m in [0.5, 1)
  const int shift = 1 - e;
  double acc = 0.0;
  for (int64_t p = 0; p < d; ++p) {
    row[p] = std::ldexp(row[p], shift);
    acc += static_cast<double>(row[p]) * row[p];
  }
  sumsq = static_cast<float>(acc);
  unscale = std::ldexp(1.0, -shift);
  return true;
}

int64_t assign_block(const Matrix& x, const CentroidPanel& panel, int64_t r0, int64_t rows,
                     AssignWorkspace& ws, int64_t* index, float* best_cos, float* second_cos,
                     float* group_max, const int64_t* row_index, const float* center,
                     const ScreenPanel* screen) {
  const auto& kern = kernels();
  const int64_t d = x.cols, k = panel.k;
  const int64_t padded = (rows + MR - 1) / MR * MR;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src = row_index ? row_index[r0 + r] : r0 + r;
    float* row = ws.xb.data() + r * d;
    ws.finite[r] = kern.convert_row(row_ptr(x, src), x.dtype, d, center, row, &ws.norms[r]) &&
                   rescale_row(row, d, ws.norms[r], ws.unscale[r]);
  }
  std::fill(ws.xb.begin() + rows * d, ws.xb.begin() + padded * d, 0.0f);
  // The rows the fp32 sweep evaluates: all of them, or those the screen did not certify.
  const float* xs = ws.xb.data();
  const int64_t* block_row = nullptr;  // evaluated row i is row block_row[i] of the block
  int64_t n_eval = rows;
  if (screen) {
    n_eval = screen_block(*screen, panel, ws, rows, r0, index, best_cos);
    xs = ws.fallback.data();
    block_row = ws.fallback_rows.data();
  }
  const int64_t padded_eval = (n_eval + MR - 1) / MR * MR;
  if (screen) std::fill(ws.fallback.begin() + n_eval * d, ws.fallback.begin() + padded_eval * d, 0.0f);
  std::fill(ws.top_best.begin(), ws.top_best.begin() + padded * NR, neg_inf);
  std::fill(ws.top_second.begin(), ws.top_second.begin() + padded * NR, neg_inf);
  std::fill(ws.top_index.begin(), ws.top_index.begin() + padded * NR, 0);

  alignas(64) float tiles[kMaxTiles * MR * NR];
  float row_max[MR];
  const int64_t step = kern.tiles_per_call * MR;
  for (int64_t s = 0; s < panel.strips; ++s) {
    const float* b = panel.data.data() + s * d * NR;
    const int valid = static_cast<int>(std::min<int64_t>(NR, k - s * NR));
    for (int64_t m0 = 0; m0 < padded_eval; m0 += step) {
      const int count = static_cast<int>(std::min<int64_t>(step, padded_eval - m0) / MR);
      kern.gemm_tiles(d, xs + m0 * d, d, count, b, NR, tiles, NR);
      for (int t = 0; t < count; ++t) {
        const int64_t m = m0 + t * MR;
        const float* tile = tiles + t * MR * NR;
        kern.top2_update(tile, static_cast<int32_t>(s * NR), valid, ws.top_best.data() + m * NR,
                         ws.top_second.data() + m * NR, ws.top_index.data() + m * NR);
        if (group_max) {
          kern.tile_row_max(tile, valid, row_max);
          for (int64_t i = 0; i < MR && m + i < rows; ++i) {
            const float inv = row_inverse_norm(ws.norms[m + i]);
            group_max[(r0 + m + i) * panel.strips + s] =
                ws.finite[m + i] ? row_max[i] * inv : std::numeric_limits<float>::quiet_NaN();
          }
        }
      }
    }
  }

  // Reduce the NR lanes of every row: largest value, lowest index among equal values.
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < n_eval; ++i) {
    const RowTop2 top = kern.reduce_lanes(ws.top_best.data() + i * NR,
                                          ws.top_second.data() + i * NR,
                                          ws.top_index.data() + i * NR);
    const float second = top.second;
    const int64_t r = block_row ? block_row[i] : i;
    const int64_t row = r0 + r;
    if (!ws.finite[r]) {
      ++nonfinite;
      index[row] = 0;
      best_cos[row] = std::numeric_limits<float>::quiet_NaN();
      if (second_cos) second_cos[row] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    // Cosine = dot / ||x||; a zero row has all dots 0 and keeps cosine 0.
    const float inv = row_inverse_norm(ws.norms[r]);
    index[row] = top.index;
    best_cos[row] = top.best * inv;
    if (second_cos) second_cos[row] = second == neg_inf ? neg_inf : second * inv;
  }
  return nonfinite;
}

}  // namespace cpu

void cosine_assign_cpu(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                       float* best_cos, float* second_cos, int64_t* bad, int num_threads,
                       float* group_max, const int64_t* row_index, int64_t n_out,
                       const float* center) {
  bad[0] = bad[1] = 0;
  const int64_t n = row_index ? n_out : x.rows;
  if (n == 0) return;
  const cpu::CentroidPanel panel(centroids, k, x.cols);
  std::unique_ptr<cpu::ScreenPanel> screen;
  if (!second_cos && !group_max && cpu::screen_enabled())
    screen.reset(new cpu::ScreenPanel(centroids, k, x.cols));
  if (screen && !screen->usable) screen.reset();
  const int64_t rb = cpu::AssignWorkspace::rows_for(x.cols);
  const int64_t blocks = (n + rb - 1) / rb;
  int64_t nonfinite = 0;
#pragma omp parallel num_threads(cpu::threads_for(num_threads, blocks)) reduction(+ : nonfinite)
  {
    cpu::AssignWorkspace ws(x.cols);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * rb;
      nonfinite += cpu::assign_block(x, panel, r0, std::min(rb, n - r0), ws, index, best_cos,
                                     second_cos, group_max, row_index, center, screen.get());
    }
  }
  bad[0] = nonfinite;
}

}  // namespace pyconcepts
