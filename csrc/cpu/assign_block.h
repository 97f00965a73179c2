// Internal to the CPU module: the blocked cosine assignment shared by cosine_assign and the
// fused assign_update. A block of rows is converted to fp32 once (the only read of X), then
// every centroid strip sweeps over it with the GEMM tile and the running top-2 epilogue.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu/simd.h"

namespace pyconcepts {
namespace cpu {

// Centroids packed as strips of NR columns: strip s holds data[p][j] = C[s*NR + j][p],
// zero-padded past K (those lanes are masked out of the top-2).
struct CentroidPanel {
  CentroidPanel(const float* centroids, int64_t k, int64_t d);
  int64_t k, d, strips;
  std::vector<float> data;
};

// Per-thread scratch for one block of rows.
struct AssignWorkspace {
  explicit AssignWorkspace(int64_t d);
  static int64_t rows_for(int64_t d);
  int64_t rows_per_block;
  std::vector<float> xb;      // rows_per_block x d, fp32 copy of the block
  std::vector<float> norms;   // squared row norms (of the rows as held in xb)
  std::vector<double> unscale;  // xb row * unscale = the row as read (see rescale_row)
  std::vector<char> finite;   // row holds no NaN/Inf
  std::vector<float> top_best, top_second;
  std::vector<int32_t> top_index;
  // screening (screen.h), sized on first use
  std::vector<int16_t> xq;            // the block's rows in int16
  std::vector<float> gap_needed;      // per row: the certifying top-2 gap (< 0: never)
  std::vector<float> fallback;        // rows that take the fp32 path, fp32, compacted
  std::vector<int64_t> fallback_rows; // their rows in the block
  std::vector<int64_t> certified_rows;  // int16 screen: rows certified, in order
  std::vector<float> scores;          // bf16 screen: the block's scores, rows x K (padded)
  std::vector<int32_t> pair_row, pair_centroid;  // candidates: element offsets of x and c
  std::vector<float> pair_score;      // their fp32 scores
  std::vector<int64_t> row_pairs;     // row r's candidates: [row_pairs[r], row_pairs[r + 1])
};

// Squared norms within which the fp32 squares and dot products of a row neither overflow
// nor lose its small elements to underflow.
constexpr float kMinSafeSumsq = 0x1p-60f;
constexpr float kMaxSafeSumsq = 0x1p+60f;

// A converted row whose squared norm `sumsq` is outside [kMinSafeSumsq, kMaxSafeSumsq] is
// scaled by a power of two (exact) so its largest element lies in [1, 2); sumsq is then
// recomputed and `unscale` receives the factor that undoes the scaling (1 when the row is
// left as it is; a zero row stays zero). Cosines are scale-free, so any finite row gets the
// cosine of the row as read. Returns false when the row holds Inf (x - center overflowed).
bool rescale_row(float* row, int64_t d, float& sumsq, double& unscale);
struct ScreenPanel;

// 1 / |x| from a row's fp32 sum of squares, as the assignment's cosines use it (the screens
// must scale their scores by the very same factor to give the same bits).
inline float row_inverse_norm(float sumsq) { return 1.0f / std::max(std::sqrt(sumsq), 1e-12f); }

// Assigns rows [r0, r0 + rows) of x (rows <= ws.rows_per_block), writing index/best/second
// at those rows; afterwards ws.xb holds the block in fp32. With a non-null row_index, output
// row i reads input row row_index[i] (a gather fused into the conversion, no copy of X).
// With a non-null center (D floats) the rows are assigned as x - center, without a copy. When group_max is non-null it
// receives, per row, the largest cosine within each strip of NR consecutive centroids
// (row-major, panel.strips per row). Returns the number of rows holding NaN/Inf (their
// best cosine is NaN and their index 0). With a screen (never together with second or
// group_max), rows are first screened with integer dot products (screen.h): same results.
int64_t assign_block(const Matrix& x, const CentroidPanel& panel, int64_t r0, int64_t rows,
                     AssignWorkspace& ws, int64_t* index, float* best, float* second,
                     float* group_max, const int64_t* row_index = nullptr,
                     const float* center = nullptr, const ScreenPanel* screen = nullptr);

}  // namespace cpu
}  // namespace pyconcepts
