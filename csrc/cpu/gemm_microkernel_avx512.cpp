// AVX-512 versions of the kernel-table entries that carry the arithmetic: the GEMM register
// tiles (one zmm per row of 16 centroids, up to 24 rows per pass), the running top-2 update
// and the float64 row add. Every function has a target attribute (no per-file ISA flag, so
// no inline helper compiled for AVX-512 can leak into the other paths); the table is used
// only when the CPU reports AVX-512 F/BW/DQ/VL.
//
// Bit-identical to the avx2 path: each output element is the same chain of fused
// multiply-adds over p in order, the top-2 update is the same lane-wise comparisons, and the
// float64 add rounds the product and the sum separately, as before. Labels, scores and sums
// therefore do not depend on which of the two paths ran.
#include <immintrin.h>

#include "cpu/simd.h"

namespace pyconcepts {
namespace cpu {
namespace {

#define PC_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

// R rows (a multiple of MR, at most kMaxTiles * MR) x 16 columns: R accumulators, one
// 16-wide load of b and R broadcasts of a per step. Rows are addressed from R / 3 base
// pointers plus 0, 1 or 2 times lda, so the addresses need few registers.
template <int R>
PC_AVX512 inline void gemm_rows(int64_t p, const float* a, int64_t lda, const float* b,
                                int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  static_assert(R % 3 == 0 && R <= 3 * 8, "rows come in groups of three");
  constexpr int G = R / 3;
  __m512 acc[R];
#pragma GCC unroll 24
  for (int i = 0; i < R; ++i) acc[i] = accumulate ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
  const float* base[G];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) base[g] = a + 3 * g * lda;
  for (int64_t q = 0; q < p; ++q) {
    const __m512 bv = _mm512_loadu_ps(b + q * ldb);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      acc[3 * g] = _mm512_fmadd_ps(_mm512_set1_ps(base[g][q]), bv, acc[3 * g]);
      acc[3 * g + 1] = _mm512_fmadd_ps(_mm512_set1_ps(base[g][q + lda]), bv, acc[3 * g + 1]);
      acc[3 * g + 2] =
          _mm512_fmadd_ps(_mm512_set1_ps(base[g][q + 2 * lda]), bv, acc[3 * g + 2]);
    }
  }
#pragma GCC unroll 24
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(c + i * ldc, acc[i]);
}

PC_AVX512 void gemm_tile_avx512(int64_t p, const float* a, int64_t lda, const float* b,
                                int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  gemm_rows<MR>(p, a, lda, b, ldb, c, ldc, accumulate);
}

PC_AVX512 void gemm_tiles_avx512(int64_t p, const float* a, int64_t lda, int tiles,
                                 const float* b, int64_t ldb, float* c, int64_t ldc) {
  static_assert(kMaxTiles == 4, "one case per tile count");
  switch (tiles) {
    case 4:
      gemm_rows<4 * MR>(p, a, lda, b, ldb, c, ldc, false);
      break;
    case 3:
      gemm_rows<3 * MR>(p, a, lda, b, ldb, c, ldc, false);
      break;
    case 2:
      gemm_rows<2 * MR>(p, a, lda, b, ldb, c, ldc, false);
      break;
    default:
      gemm_rows<MR>(p, a, lda, b, ldb, c, ldc, false);
      break;
  }
}

// The avx2 update on 16 lanes at a time, with the lanes at and past `valid` masked out
// (the avx2 version hands a partial strip to the scalar loop; the comparisons are the same).
PC_AVX512 void top2_update_avx512(const float* tile, int32_t col0, int valid, float* best,
                                  float* second, int32_t* index) {
  const __mmask16 live = static_cast<__mmask16>(valid >= NR ? 0xffffu : (1u << valid) - 1u);
  const __m512i cols = _mm512_add_epi32(
      _mm512_set1_epi32(col0),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    const int s = i * NR;
    const __m512 v = _mm512_loadu_ps(tile + s);
    const __m512 b = _mm512_loadu_ps(best + s);
    const __m512 sec = _mm512_loadu_ps(second + s);
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(live, v, b, _CMP_GT_OQ);
    // not a new best: second = max(second, v) (v NaN keeps second, as `v > second` would);
    // new best: second = old best; dead lanes keep their values
    const __m512 sec_live = _mm512_mask_blend_ps(gt, _mm512_max_ps(v, sec), b);
    _mm512_storeu_ps(second + s, _mm512_mask_blend_ps(live, sec, sec_live));
    _mm512_storeu_ps(best + s, _mm512_mask_blend_ps(gt, b, v));
    const __m512i idx = _mm512_loadu_si512(index + s);
    _mm512_storeu_si512(index + s, _mm512_mask_blend_epi32(gt, idx, cols));
  }
}

// No fused multiply-add: the product and the sum round separately, as on the other paths.
// GCC writes _mm512_mul_pd / _mm512_add_pd as plain vector arithmetic, which it may fuse
// (-ffp-contract=fast); the explicit-rounding forms are builtins it never contracts.
PC_AVX512 inline __m512d mul_pd(__m512d a, __m512d b) {
  return _mm512_mul_round_pd(a, b, _MM_FROUND_CUR_DIRECTION);
}
PC_AVX512 inline __m512d add_pd(__m512d a, __m512d b) {
  return _mm512_add_round_pd(a, b, _MM_FROUND_CUR_DIRECTION);
}

PC_AVX512 void add_scaled_row_avx512(double* dst, const float* src, int64_t n, double scale,
                                     bool overwrite) {
  int64_t j = 0;
  const __m512d s = _mm512_set1_pd(scale);
  const bool unit = scale == 1.0;
  for (; j + 8 <= n; j += 8) {
    __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(src + j));
    if (!unit) v = mul_pd(s, v);
    if (!overwrite) v = add_pd(_mm512_loadu_pd(dst + j), v);
    _mm512_storeu_pd(dst + j, v);
  }
  if (j < n) {
    const __mmask8 m = static_cast<__mmask8>((1u << (n - j)) - 1u);
    __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, src + j));
    if (!unit) v = mul_pd(s, v);
    if (!overwrite) v = add_pd(_mm512_maskz_loadu_pd(m, dst + j), v);
    _mm512_mask_storeu_pd(dst + j, m, v);
  }
}

#undef PC_AVX512

}  // namespace

Kernels avx512_kernels(const Kernels& avx2) {
  Kernels k = avx2;
  k.name = "avx512";
  k.path = "avx512";
  k.gemm_tile = gemm_tile_avx512;
  k.gemm_tiles = gemm_tiles_avx512;
  k.tiles_per_call = kMaxTiles;
  k.top2_update = top2_update_avx512;
  k.add_scaled_row = add_scaled_row_avx512;
  return k;
}

}  // namespace cpu
}  // namespace pyconcepts
