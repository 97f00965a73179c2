// The CPU building blocks shared by all ops: the MR x NR GEMM register tile, row conversion
// (fp16/bf16 -> fp32 with a finiteness check) and the running top-2 epilogue. Each exists
// as AVX2/FMA/F16C intrinsics (compiled with a target attribute, used only when the CPU
// has them) and portable C++; the AVX-512 table (gemm_microkernel_avx512.cpp) replaces some
// entries of the AVX2 one. Also the run-time choice of table.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "cpu/simd.h"

namespace pyconcepts {
namespace cpu {
namespace {

// ------------------------------------------------------------------ portable versions
void gemm_tile_generic(int64_t p, const float* a, int64_t lda, const float* b, int64_t ldb,
                       float* c, int64_t ldc, bool accumulate) {
  float acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = accumulate ? c[i * ldc + j] : 0.0f;
  for (int64_t q = 0; q < p; ++q) {
    const float* brow = b + q * ldb;
    for (int i = 0; i < MR; ++i) {
      const float av = a[i * lda + q];
      for (int j = 0; j < NR; ++j) acc[i][j] += av * brow[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = acc[i][j];
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

bool convert_row_generic(const void* src, DType dtype, int64_t n, const float* center,
                         float* dst, float* sumsq) {
  float ss = 0.0f, poison = 0.0f;  // poison stays 0 unless some value is NaN or Inf
  for (int64_t j = 0; j < n; ++j) {
    float v;
    if (dtype == DType::F32) {
      v = static_cast<const float*>(src)[j];
    } else if (dtype == DType::F16) {
      v = half_to_float(static_cast<const uint16_t*>(src)[j]);
    } else {
      v = bf16_to_float(static_cast<const uint16_t*>(src)[j]);
    }
    const float w = center ? v - center[j] : v;
    ss += w * w;
    poison += v * 0.0f;
    dst[j] = w;
  }
  if (sumsq) *sumsq = ss;
  return poison == 0.0f;
}

void top2_update_generic(const float* tile, int32_t col0, int valid, float* best,
                         float* second, int32_t* index) {
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < valid; ++j) {
      const float v = tile[i * NR + j];
      const int s = i * NR + j;
      if (v > best[s]) {
        second[s] = best[s];
        best[s] = v;
        index[s] = col0 + j;
      } else if (v > second[s]) {
        second[s] = v;
      }
    }
  }
}

void tile_row_max_generic(const float* tile, int valid, float* out) {
  for (int i = 0; i < MR; ++i) {
    float m = tile[i * NR];
    for (int j = 1; j < valid; ++j) m = std::max(m, tile[i * NR + j]);
    out[i] = m;
  }
}

RowTop2 reduce_lanes_generic(const float* lane_best, const float* lane_second,
                             const int32_t* lane_index) {
  int lane = 0;
  for (int j = 1; j < NR; ++j) {
    if (lane_best[j] > lane_best[lane] ||
        (lane_best[j] == lane_best[lane] && lane_index[j] < lane_index[lane]))
      lane = j;
  }
  float second = lane_second[lane];
  for (int j = 0; j < NR; ++j) {
    if (j != lane && lane_best[j] > second) second = lane_best[j];
  }
  return RowTop2{lane_best[lane], second, lane_index[lane]};
}

void add_scaled_row_generic(double* dst, const float* src, int64_t n, double scale,
                            bool overwrite) {
  if (overwrite) {
    for (int64_t j = 0; j < n; ++j) dst[j] = scale * static_cast<double>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] += scale * static_cast<double>(src[j]);
  }
}

// ------------------------------------------------------------------ AVX2 + FMA + F16C
#define PC_AVX2 __attribute__((target("avx2,fma,f16c")))

PC_AVX2 void gemm_tile_avx2(int64_t p, const float* a, int64_t lda, const float* b,
                            int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = _mm256_loadu_ps(c + 0 * ldc), c01 = _mm256_loadu_ps(c + 0 * ldc + 8);
    c10 = _mm256_loadu_ps(c + 1 * ldc), c11 = _mm256_loadu_ps(c + 1 * ldc + 8);
    c20 = _mm256_loadu_ps(c + 2 * ldc), c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(c + 3 * ldc), c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(c + 4 * ldc), c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(c + 5 * ldc), c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 =
        _mm256_setzero_ps();
  }
  const float* a0 = a;
  const float* a1 = a + lda;
  const float* a2 = a + 2 * lda;
  const float* a3 = a + 3 * lda;
  const float* a4 = a + 4 * lda;
  const float* a5 = a + 5 * lda;
#define PC_STEP(q)                                              \
  {                                                             \
    const __m256 b0 = _mm256_loadu_ps(b + (q) * ldb);           \
    const __m256 b1 = _mm256_loadu_ps(b + (q) * ldb + 8);       \
    __m256 av = _mm256_broadcast_ss(a0 + (q));                  \
    c00 = _mm256_fmadd_ps(av, b0, c00);                         \
    c01 = _mm256_fmadd_ps(av, b1, c01);                         \
    av = _mm256_broadcast_ss(a1 + (q));                         \
    c10 = _mm256_fmadd_ps(av, b0, c10);                         \
    c11 = _mm256_fmadd_ps(av, b1, c11);                         \
    av = _mm256_broadcast_ss(a2 + (q));                         \
    c20 = _mm256_fmadd_ps(av, b0, c20);                         \
    c21 = _mm256_fmadd_ps(av, b1, c21);                         \
    av = _mm256_broadcast_ss(a3 + (q));                         \
    c30 = _mm256_fmadd_ps(av, b0, c30);                         \
    c31 = _mm256_fmadd_ps(av, b1, c31);                         \
    av = _mm256_broadcast_ss(a4 + (q));                         \
    c40 = _mm256_fmadd_ps(av, b0, c40);                         \
    c41 = _mm256_fmadd_ps(av, b1, c41);                         \
    av = _mm256_broadcast_ss(a5 + (q));                         \
    c50 = _mm256_fmadd_ps(av, b0, c50);                         \
    c51 = _mm256_fmadd_ps(av, b1, c51);                         \
  }
  int64_t q = 0;
  for (; q + 4 <= p; q += 4) {
    PC_STEP(q) PC_STEP(q + 1) PC_STEP(q + 2) PC_STEP(q + 3)
  }
  for (; q < p; ++q) PC_STEP(q)
#undef PC_STEP
  _mm256_storeu_ps(c + 0 * ldc, c00), _mm256_storeu_ps(c + 0 * ldc + 8, c01);
  _mm256_storeu_ps(c + 1 * ldc, c10), _mm256_storeu_ps(c + 1 * ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20), _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30), _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40), _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50), _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}

PC_AVX2 inline __m256 load8_as_float(const void* src, DType dtype, int64_t j) {
  if (dtype == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(src) + j);
  const __m128i h =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + j));
  if (dtype == DType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

PC_AVX2 bool convert_row_avx2(const void* src, DType dtype, int64_t n, const float* center,
                              float* dst, float* sumsq) {
  __m256 ss = _mm256_setzero_ps(), poison = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = load8_as_float(src, dtype, j);
    const __m256 w = center ? _mm256_sub_ps(v, _mm256_loadu_ps(center + j)) : v;
    ss = _mm256_fmadd_ps(w, w, ss);
    poison = _mm256_add_ps(poison, _mm256_mul_ps(v, zero));
    _mm256_storeu_ps(dst + j, w);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, ss);
  float total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
                ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  _mm256_store_ps(lanes, poison);
  float bad = 0.0f;
  for (int l = 0; l < 8; ++l) bad += lanes[l];
  if (j < n) {
    float tail_ss = 0.0f;
    const bool ok = convert_row_generic(
        dtype == DType::F32 ? static_cast<const void*>(static_cast<const float*>(src) + j)
                            : static_cast<const void*>(static_cast<const uint16_t*>(src) + j),
        dtype, n - j, center ? center + j : nullptr, dst + j, &tail_ss);
    total += tail_ss;
    if (!ok) bad = std::numeric_limits<float>::quiet_NaN();
  }
  if (sumsq) *sumsq = total;
  return bad == 0.0f;
}

PC_AVX2 void top2_update_avx2(const float* tile, int32_t col0, int valid, float* best,
                              float* second, int32_t* index) {
  if (valid < NR) {  // only the last, partial strip of centroids takes this path
    top2_update_generic(tile, col0, valid, best, second, index);
    return;
  }
  const __m256i cols0 = _mm256_add_epi32(_mm256_set1_epi32(col0),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i cols1 = _mm256_add_epi32(cols0, _mm256_set1_epi32(8));
  for (int s = 0; s < MR * NR; s += 8) {
    const __m256 v = _mm256_loadu_ps(tile + s);
    const __m256 b = _mm256_loadu_ps(best + s);
    const __m256 sec = _mm256_loadu_ps(second + s);
    const __m256 gt = _mm256_cmp_ps(v, b, _CMP_GT_OQ);
    // not a new best: second = max(second, v); new best: second = old best
    const __m256 sec_new = _mm256_blendv_ps(_mm256_max_ps(v, sec), b, gt);
    _mm256_storeu_ps(second + s, sec_new);
    _mm256_storeu_ps(best + s, _mm256_blendv_ps(b, v, gt));
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index + s));
    const __m256i cols = (s % NR == 0) ? cols0 : cols1;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(index + s),
                        _mm256_blendv_epi8(idx, cols, _mm256_castps_si256(gt)));
  }
}

PC_AVX2 void tile_row_max_avx2(const float* tile, int valid, float* out) {
  if (valid < NR) {
    tile_row_max_generic(tile, valid, out);
    return;
  }
  for (int i = 0; i < MR; ++i) {
    const __m256 m8 = _mm256_max_ps(_mm256_loadu_ps(tile + i * NR), _mm256_loadu_ps(tile + i * NR + 8));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    out[i] = _mm_cvtss_f32(m4);
  }
}

// Horizontal max / min of 8 lanes, broadcast to every lane.
PC_AVX2 inline __m256 all_lanes_max(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm256_max_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
}

PC_AVX2 inline __m256i all_lanes_min_epi32(__m256i v) {
  v = _mm256_min_epi32(v, _mm256_permute2x128_si256(v, v, 1));
  v = _mm256_min_epi32(v, _mm256_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm256_min_epi32(v, _mm256_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
}

// The same result as reduce_lanes_generic without its data-dependent branches: the largest
// value, the lowest index among the lanes holding it, and the largest of the other lanes'
// bests and the winning lane's second.
PC_AVX2 RowTop2 reduce_lanes_avx2(const float* lane_best, const float* lane_second,
                                  const int32_t* lane_index) {
  const __m256 b0 = _mm256_loadu_ps(lane_best), b1 = _mm256_loadu_ps(lane_best + 8);
  const __m256 top = all_lanes_max(_mm256_max_ps(b0, b1));
  const __m256 at0 = _mm256_cmp_ps(b0, top, _CMP_EQ_OQ), at1 = _mm256_cmp_ps(b1, top, _CMP_EQ_OQ);
  // NaN lanes (a non-finite row, whose result is discarded) match nothing: the scalar rules
  if (_mm256_movemask_ps(_mm256_or_ps(at0, at1)) == 0)
    return reduce_lanes_generic(lane_best, lane_second, lane_index);
  const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lane_index));
  const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lane_index + 8));
  const __m256i none = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
  const __m256i index = all_lanes_min_epi32(
      _mm256_min_epi32(_mm256_blendv_epi8(none, i0, _mm256_castps_si256(at0)),
                       _mm256_blendv_epi8(none, i1, _mm256_castps_si256(at1))));
  // the winning lane holds the top value and that index (lane indices are distinct among
  // lanes that saw a column; the others hold -inf)
  const __m256 win0 = _mm256_and_ps(at0, _mm256_castsi256_ps(_mm256_cmpeq_epi32(i0, index)));
  const __m256 win1 = _mm256_and_ps(at1, _mm256_castsi256_ps(_mm256_cmpeq_epi32(i1, index)));
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 best = all_lanes_max(
      _mm256_max_ps(_mm256_blendv_ps(neg_inf, b0, win0), _mm256_blendv_ps(neg_inf, b1, win1)));
  const __m256 second = all_lanes_max(
      _mm256_max_ps(_mm256_blendv_ps(b0, _mm256_loadu_ps(lane_second), win0),
                    _mm256_blendv_ps(b1, _mm256_loadu_ps(lane_second + 8), win1)));
  return RowTop2{_mm256_cvtss_f32(best), _mm256_cvtss_f32(second), _mm256_cvtsi256_si32(index)};
}

// AVX2 without FMA on purpose: the multiply and the add must round separately, as in the
// portable loop (a fused multiply-add would change the sums' last bits).
__attribute__((target("avx2"))) void add_scaled_row_avx2(double* dst, const float* src,
                                                         int64_t n, double scale,
                                                         bool overwrite) {
  int64_t j = 0;
  const __m256d s = _mm256_set1_pd(scale);
  const bool unit = scale == 1.0;  // 1.0 * x is exact: no multiply needed
  for (; j + 4 <= n; j += 4) {
    __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(src + j));
    if (!unit) v = _mm256_mul_pd(s, v);
    if (!overwrite) v = _mm256_add_pd(_mm256_loadu_pd(dst + j), v);
    _mm256_storeu_pd(dst + j, v);
  }
  add_scaled_row_generic(dst + j, src + j, n - j, scale, overwrite);
}

#undef PC_AVX2

// gemm_tiles for the paths whose registers hold one tile: one gemm_tile per row tile.
template <void (*Tile)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                       bool)>
void gemm_tiles_by_tile(int64_t p, const float* a, int64_t lda, int tiles, const float* b,
                        int64_t ldb, float* c, int64_t ldc) {
  for (int t = 0; t < tiles; ++t) Tile(p, a + t * MR * lda, lda, b, ldb, c + t * MR * ldc, ldc, false);
}

const Kernels kGeneric{"generic",
                       "generic",
                       gemm_tile_generic,
                       gemm_tiles_by_tile<gemm_tile_generic>,
                       1,
                       convert_row_generic,
                       top2_update_generic,
                       tile_row_max_generic,
                       reduce_lanes_generic,
                       add_scaled_row_generic};

const Kernels kAvx2{"avx2+fma",
                    "avx2",
                    gemm_tile_avx2,
                    gemm_tiles_by_tile<gemm_tile_avx2>,
                    1,
                    convert_row_avx2,
                    top2_update_avx2,
                    tile_row_max_avx2,
                    reduce_lanes_avx2,
                    add_scaled_row_avx2};

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

bool cpu_has_amx() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16");
}

Kernels select_kernels() {
  const char* env = std::getenv("PYCONCEPTS_SIMD");
  const std::string forced = env ? env : "";
  const bool avx2 = cpu_has_avx2(), avx512 = cpu_has_avx512();
  if (forced.empty() || forced == "auto") {
    if (avx512) return avx512_kernels(kAvx2);
    return avx2 ? kAvx2 : kGeneric;
  }
  std::string have;
  for (const auto& p : available_paths()) have += (have.empty() ? "" : ", ") + p;
  const std::string prefix = "PYCONCEPTS_SIMD=" + forced + ": ";
  if (forced == "generic") return kGeneric;
  if (forced == "avx2") {
    if (!avx2) throw std::runtime_error(prefix + "this CPU lacks AVX2/FMA/F16C (paths it runs: " + have + ")");
    return kAvx2;
  }
  if (forced == "avx512") {
    if (!avx512)
      throw std::runtime_error(prefix + "this CPU lacks AVX-512 F/BW/DQ/VL (paths it runs: " +
                               have + ")");
    return avx512_kernels(kAvx2);
  }
  if (forced == "amx") {
    throw std::runtime_error(
        prefix + (cpu_has_amx() ? "this build has no AMX kernels"
                                : "this CPU lacks AMX-TILE/AMX-BF16, and this build has no AMX "
                                  "kernels") +
        " (paths it runs: " + have + ")");
  }
  throw std::runtime_error(prefix + "unknown path; use one of generic, avx2, avx512, amx, auto "
                           "(paths this CPU runs: " + have + ")");
}

}  // namespace

const Kernels& kernels() {
  static const Kernels table = select_kernels();
  return table;
}

std::vector<std::string> available_paths() {
  std::vector<std::string> paths{"generic"};
  if (cpu_has_avx2()) paths.push_back("avx2");
  if (cpu_has_avx512()) paths.push_back("avx512");
  return paths;
}

std::vector<std::pair<std::string, bool>> cpu_features() {
  __builtin_cpu_init();
  return {{"avx2", __builtin_cpu_supports("avx2") != 0},
          {"fma", __builtin_cpu_supports("fma") != 0},
          {"f16c", __builtin_cpu_supports("f16c") != 0},
          {"avx512f", __builtin_cpu_supports("avx512f") != 0},
          {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
          {"avx512dq", __builtin_cpu_supports("avx512dq") != 0},
          {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
          {"avx512vnni", __builtin_cpu_supports("avx512vnni") != 0},
          {"avx512bf16", __builtin_cpu_supports("avx512bf16") != 0},
          {"avx512fp16", __builtin_cpu_supports("avx512fp16") != 0},
          {"avxvnni", __builtin_cpu_supports("avxvnni") != 0},
          {"amx-tile", __builtin_cpu_supports("amx-tile") != 0},
          {"amx-bf16", __builtin_cpu_supports("amx-bf16") != 0},
          {"amx-int8", __builtin_cpu_supports("amx-int8") != 0}};
}

}  // namespace cpu
}  // namespace pyconcepts
