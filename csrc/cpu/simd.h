// CPU kernel table, selected once at run time from the processor's features, so the module
// is built without -march flags and runs on any x86-64. Paths: generic (portable C++),
// avx2 (AVX2+FMA+F16C) and avx512 (AVX-512 F/BW/DQ/VL on top of avx2). PYCONCEPTS_SIMD=
// generic|avx2|avx512|amx forces one; a path this CPU (or this build) lacks is an error.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <utility>

#include "common.h"

namespace pyconcepts {
namespace cpu {

// Register tile of the GEMM micro-kernel: MR rows of A times NR columns of B.
constexpr int MR = 6;
constexpr int NR = 16;
// Most MR x NR tiles one gemm_tiles call computes (the AVX-512 register file holds 4).
constexpr int kMaxTiles = 4;

// One row's lanes of the running top-2 (top2_update) reduced to the row's result: the
// largest value (lowest index among equal values), its index, and the second best.
struct RowTop2 {
  float best;
  float second;
  int32_t index;
};

struct Kernels {
  const char* name;  // what simd_level() reports
  const char* path;  // the PYCONCEPTS_SIMD value that selects this table
  // c[i*ldc + j] = (accumulate ? c : 0) + sum_p a[i*lda + p] * b[p*ldb + j], i < MR, j < NR.
  // The avx2 and avx512 versions form every sum in the same order with fused multiply-adds
  // (one per p, in order), so they give the same bits; the generic one rounds the product
  // and the sum separately.
  void (*gemm_tile)(int64_t p, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool accumulate);
  // `tiles` (1..kMaxTiles) row tiles stacked: rows i < tiles * MR of a and c, without
  // accumulation; the same bits as gemm_tile called once per tile.
  void (*gemm_tiles)(int64_t p, const float* a, int64_t lda, int tiles, const float* b,
                     int64_t ldb, float* c, int64_t ldc);
  // Row tiles per gemm_tiles call that this path's registers hold (1 when it loops).
  int tiles_per_call;
  // Converts n elements of one row to fp32; returns false when the row holds NaN or Inf.
  // When center is non-null it is subtracted. sumsq (may be null) receives the sum of
  // squares of the values written (centred when center is given).
  bool (*convert_row)(const void* src, DType dtype, int64_t n, const float* center, float* dst,
                      float* sumsq);
  // Lane-wise running top-2 over one MR x NR tile of scores: for every row i and lane j,
  // tile[i][j] (column col0 + j) enters best/second/index arrays of shape [MR][NR].
  // Lanes j >= valid are ignored. Strictly greater wins, so earlier columns win ties.
  void (*top2_update)(const float* tile, int32_t col0, int valid, float* best, float* second,
                      int32_t* index);
  // out[i] = max_{j < valid} tile[i][j] for the MR rows of one tile.
  void (*tile_row_max)(const float* tile, int valid, float* out);
  // The NR lanes of one row's running top-2 reduced to the row's result (branch-free in the
  // AVX2 version: with few centroids per row this reduction costs as much as the GEMM).
  RowTop2 (*reduce_lanes)(const float* lane_best, const float* lane_second,
                          const int32_t* lane_index);
  // dst[j] (= or +=) scale * src[j] for j < n, in float64, the product rounded before the
  // sum (never fused), so every path gives the same bits.
  void (*add_scaled_row)(double* dst, const float* src, int64_t n, double scale,
                         bool overwrite);
};

// The table in use: chosen on first call (PYCONCEPTS_SIMD, else the best this CPU runs).
// Throws std::runtime_error when PYCONCEPTS_SIMD names an unknown path or one this CPU or
// build cannot run; the module calls it at import, so that error surfaces there.
const Kernels& kernels();

// The PYCONCEPTS_SIMD values this CPU and build can run, slowest first.
std::vector<std::string> available_paths();

// Instruction-set features of this CPU that the kernels care about, as (name, present).
std::vector<std::pair<std::string, bool>> cpu_features();

// The AVX-512 table (gemm_microkernel_avx512.cpp): its own GEMM tiles, top-2 update and
// float64 row add, the avx2 table's entries elsewhere (bit-identical results either way).
Kernels avx512_kernels(const Kernels& avx2);

// Threads for a parallel loop over `work` independent items: never more threads than items.
// A thread with nothing to do still joins the region's barrier, and on a busy machine one
// descheduled idle thread costs milliseconds per call.
inline int threads_for(int requested, int64_t work) {
  const int64_t t = requested < work ? requested : work;
  return t < 1 ? 1 : static_cast<int>(t);
}

}  // namespace cpu
}  // namespace pyconcepts
