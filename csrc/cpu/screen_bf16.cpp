// Exact screening with bf16 dot products (AVX-512 BF16 vdpbf16ps, two products per fp32
// lane per instruction: twice the fp32 FMA tile's products per cycle where measured).
//
// Rows and centroids are scaled by powers of two (exact) so their largest element lies in
// [1, 2), and rounded to bf16: x~ = x + dx, c~_j = c_j + dc_j. The bf16 score S_j (products
// exact in fp32, D roundings of the sums, subnormal inputs and products flushed) and the
// fp32 kernel's score f_j (a chain of D fused multiply-adds) both lie near x . c_j:
//   |S_j - x . c_j| <= |dx| |c~_j| + |x| |dc_j| + gamma_D |x~| |c~_j| + D 2^-124
//   |f_j - x . c_j| <= gamma_D |x| |c_j| + D 2^-149 (scaled as the scores)
// so with E_r bounding both sums over j, every centroid whose fp32 score could be the
// largest has S_j >= max S - 2 E_r. Those candidates (usually one or two of K) get their
// fp32 score by the fp32 tile's own chain of fused multiply-adds on the packed strips (same
// order, same bits),
// and the largest wins, ties to the lowest index: the fp32 path's label and cosine exactly.
// Rows with more than kMaxCandidates candidates, and zero, tiny, huge or non-finite rows,
// take the fp32 sweep.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/screen.h"

namespace pyconcepts {
namespace cpu {

namespace {

constexpr int kMaxCandidates = 16;

#define PC_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")))

// R rows x 16 centroids of bf16 dot products over `pairs` pairs, fp32 into c (stride ldc).
template <int R>
PC_BF16 inline void bf16_tile(int64_t pairs, const uint16_t* a, int64_t lda, const uint16_t* b,
                              float* c, int64_t ldc) {
  __m512 acc[R];
#pragma GCC unroll 24
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const int32_t* a32 = reinterpret_cast<const int32_t*>(a);
  const int64_t lda32 = lda / 2;
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh bv = (__m512bh)_mm512_loadu_si512(b + q * 32);
#pragma GCC unroll 24
    for (int i = 0; i < R; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(a32[i * lda32 + q]), bv);
  }
#pragma GCC unroll 24
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(c + i * ldc, acc[i]);
}

PC_BF16 void bf16_tiles(int64_t pairs, const uint16_t* a, int64_t lda, int tiles,
                        const uint16_t* b, float* c, int64_t ldc) {
  switch (tiles) {
    case 4:
      bf16_tile<4 * MR>(pairs, a, lda, b, c, ldc);
      break;
    case 3:
      bf16_tile<3 * MR>(pairs, a, lda, b, c, ldc);
      break;
    case 2:
      bf16_tile<2 * MR>(pairs, a, lda, b, c, ldc);
      break;
    default:
      bf16_tile<MR>(pairs, a, lda, b, c, ldc);
      break;
  }
}

// Round-to-nearest-even fp32 -> bf16 of finite values.
inline uint16_t to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline double from_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Four (row, centroid) fp32 scores by the fp32 tile's chain: acc = fma(x[q], c[q], acc)
// for q in order from zero, on the centroid's whole strip (contiguous loads; the lane of
// the centroid is kept).
PC_BF16 void chain_dots(const float* xb, const float* strips, int64_t d, int count,
                        const int32_t* row_offset, const int32_t* centroid, float* out) {
  const float* x[4];
  const float* b[4];
  for (int i = 0; i < 4; ++i) {
    const int k = i < count ? i : 0;
    x[i] = xb + row_offset[k];
    b[i] = strips + static_cast<int64_t>(centroid[k] / NR) * d * NR;
  }
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
         acc3 = _mm512_setzero_ps();
  for (int64_t q = 0; q < d; ++q) {
    acc0 = _mm512_fmadd_ps(_mm512_set1_ps(x[0][q]), _mm512_loadu_ps(b[0] + q * NR), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_set1_ps(x[1][q]), _mm512_loadu_ps(b[1] + q * NR), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_set1_ps(x[2][q]), _mm512_loadu_ps(b[2] + q * NR), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_set1_ps(x[3][q]), _mm512_loadu_ps(b[3] + q * NR), acc3);
  }
  alignas(64) float lanes[4][NR];
  _mm512_store_ps(lanes[0], acc0);
  _mm512_store_ps(lanes[1], acc1);
  _mm512_store_ps(lanes[2], acc2);
  _mm512_store_ps(lanes[3], acc3);
  for (int i = 0; i < count; ++i) out[i] = lanes[i][centroid[i] % NR];
}

}  // namespace

Bf16Panel::Bf16Panel(const float* centroids_, int64_t k_, int64_t d_)
    : k(k_), d(d_), dp((d_ + 1) / 2 * 2), strips((k_ + NR - 1) / NR), kp(strips * NR),
      centroids(centroids_), data(static_cast<size_t>(strips * dp * NR), 0) {
  double mx = 0.0;
  for (int64_t i = 0; i < k * d; ++i) mx = std::max(mx, std::fabs(static_cast<double>(centroids[i])));
  if (!(mx > 0.0) || !std::isfinite(mx) || k >= (int64_t{1} << 31)) return;
  scale_exp = -std::ilogb(mx);  // max |element| * 2^scale_exp in [1, 2)
  for (int64_t c = 0; c < k; ++c) {
    double ss = 0.0, ss_t = 0.0, ss_d = 0.0;
    uint16_t* strip = data.data() + (c / NR) * (dp / 2) * 32;
    for (int64_t p = 0; p < d; ++p) {
      const double v = std::ldexp(static_cast<double>(centroids[c * d + p]), scale_exp);
      const uint16_t h = to_bf16(static_cast<float>(v));
      const double t = from_bf16(h);
      ss += v * v;
      ss_t += t * t;
      ss_d += (v - t) * (v - t);
      strip[(p / 2) * 32 + (c % NR) * 2 + (p % 2)] = h;
    }
    norm_max = std::max(norm_max, std::sqrt(ss));
    rounded_norm_max = std::max(rounded_norm_max, std::sqrt(ss_t));
    error_norm_max = std::max(error_norm_max, std::sqrt(ss_d));
  }
  const double u = std::ldexp(1.0, -24), dd = static_cast<double>(d) + 2.0;
  if (dd * u >= 0.25) return;
  gamma = dd * u / (1.0 - dd * u);
  usable = true;
}

PC_BF16 int64_t screen_block_bf16(const Bf16Panel& sp, const CentroidPanel& panel,
                                  AssignWorkspace& ws, int64_t rows, int64_t r0,
                                  int64_t* index, float* best_cos) {
  const int64_t d = sp.d, dp = sp.dp, pairs = dp / 2, kp = sp.kp;
  const int64_t cap = ws.rows_per_block;
  if (static_cast<int64_t>(ws.xq.size()) < cap * dp) {
    ws.xq.assign(static_cast<size_t>(cap * dp), 0);
    ws.gap_needed.assign(static_cast<size_t>(cap), 0.0f);
    ws.fallback.assign(static_cast<size_t>(cap * d), 0.0f);
    ws.fallback_rows.assign(static_cast<size_t>(cap), 0);
    ws.scores.assign(static_cast<size_t>(cap * kp), 0.0f);
    ws.pair_row.assign(static_cast<size_t>(cap * kMaxCandidates + 16), 0);
    ws.pair_centroid.assign(static_cast<size_t>(cap * kMaxCandidates + 16), 0);
    ws.pair_score.assign(static_cast<size_t>(cap * kMaxCandidates + 16), 0.0f);
    ws.row_pairs.assign(static_cast<size_t>(cap + 1), 0);
  }
  const int64_t padded = (rows + MR - 1) / MR * MR;
  uint16_t* xq = reinterpret_cast<uint16_t*>(ws.xq.data());
  // 1. rows to bf16 (scaled by a power of two) and each row's window half-width E_r
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = ws.xb.data() + r * d;
    uint16_t* q = xq + r * dp;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 m = d - j >= 16 ? static_cast<__mmask16>(0xffffu)
                                      : static_cast<__mmask16>((1u << (d - j)) - 1u);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + j)));
    }
    const double inf_norm = _mm512_reduce_max_ps(mx);  // finite rows only (checked below)
    const bool ok = ws.finite[r] && std::isfinite(inf_norm) && inf_norm > 1e-30 &&
                    inf_norm < 1e30 &&
                    // no fp32 score can overflow: |x| |c| < 1e37 (|x| <= sqrt(D) |x|_inf)
                    std::sqrt(static_cast<double>(d)) * inf_norm *
                            std::ldexp(sp.norm_max, -sp.scale_exp) < 1e37;
    if (!ok) {
      std::fill(q, q + dp, uint16_t{0});
      ws.gap_needed[r] = -1.0f;
      continue;
    }
    const int e = -std::ilogb(inf_norm);  // |e| < 100: 2^e and x 2^e are normal floats
    // x 2^e exact for normal results (an underflowing element moves by < 2^-149, covered by
    // the D 2^-124 term); bf16 by round-to-nearest-even; norms summed in fp32 over 16
    // lanes, inflated below for their rounding
    const __m512 pow2 = _mm512_set1_ps(std::ldexp(1.0f, e));
    __m512 acc_v = _mm512_setzero_ps(), acc_t = _mm512_setzero_ps(), acc_d = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 m = d - j >= 16 ? static_cast<__mmask16>(0xffffu)
                                      : static_cast<__mmask16>((1u << (d - j)) - 1u);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), pow2);
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
      const __m512 t = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      const __m512 dv = _mm512_sub_ps(v, t);  // exact: t is v rounded to 8 bits (or 0)
      acc_v = _mm512_fmadd_ps(v, v, acc_v);
      acc_t = _mm512_fmadd_ps(t, t, acc_t);
      acc_d = _mm512_fmadd_ps(dv, dv, acc_d);
      _mm256_mask_storeu_epi16(q + j, m, h);
    }
    for (int64_t j = d; j < dp; ++j) q[j] = 0;
    const double inflate = 1.0 + (d + 16) * std::ldexp(1.0, -23), floor_sq = d * std::ldexp(1.0, -120);
    const double ss = _mm512_reduce_add_ps(acc_v) * inflate + floor_sq;
    const double ss_t = _mm512_reduce_add_ps(acc_t) * inflate + floor_sq;
    const double ss_d = _mm512_reduce_add_ps(acc_d) * inflate + floor_sq;
    const double xn = std::sqrt(ss), xtn = std::sqrt(ss_t), xdn = std::sqrt(ss_d);
    // scores are of x 2^e and c 2^g; the fp32 chain's subnormal terms scale by 2^(e+g)
    const double e_bf16 = xdn * sp.rounded_norm_max + xn * sp.error_norm_max +
                          sp.gamma * xtn * sp.rounded_norm_max + d * std::ldexp(1.0, -124);
    const double e_fp32 = sp.gamma * xn * sp.norm_max + d * std::ldexp(1.0, e + sp.scale_exp - 149);
    const double half_width = (e_bf16 + e_fp32) * (1.0 + 1e-6) + std::ldexp(1.0, -140);
    ws.gap_needed[r] = static_cast<float>(2.0 * half_width * (1.0 + 1e-6));
  }
  std::fill(xq + rows * dp, xq + padded * dp, uint16_t{0});

  // 2. bf16 scores of every centroid
  const int64_t step = kMaxTiles * MR;
  for (int64_t s = 0; s < sp.strips; ++s) {
    const uint16_t* b = sp.data.data() + s * pairs * 32;
    for (int64_t m0 = 0; m0 < padded; m0 += step) {
      const int count = static_cast<int>(std::min<int64_t>(step, padded - m0) / MR);
      // rows past `rows` land in the padded rows of the score matrix (cap >= padded)
      bf16_tiles(pairs, xq + m0 * dp, dp, count, b, ws.scores.data() + m0 * kp + s * NR, kp);
    }
  }

  // 3. candidates per row: every centroid within 2 E_r of the best bf16 score
  const __mmask16 tail = static_cast<__mmask16>(
      sp.k % NR == 0 ? 0xffffu : (1u << (sp.k % NR)) - 1u);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t n_fallback = 0, n_pairs = 0;
  for (int64_t r = 0; r < rows; ++r) {
    ws.row_pairs[r] = n_pairs;
    const float need = ws.gap_needed[r];
    bool fallback = !(need >= 0.0f);
    if (!fallback) {
      const float* sc = ws.scores.data() + r * kp;
      __m512 mx = neg_inf;
      for (int64_t s = 0; s < sp.strips; ++s) {
        const __mmask16 live = s + 1 == sp.strips ? tail : static_cast<__mmask16>(0xffffu);
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(neg_inf, live, sc + s * NR));
      }
      // threshold rounded down: the candidate set can only grow
      const double thr_d = static_cast<double>(_mm512_reduce_max_ps(mx)) - need;
      float thr = static_cast<float>(thr_d);
      if (static_cast<double>(thr) > thr_d) thr = std::nextafter(thr, -std::numeric_limits<float>::infinity());
      const __m512 tv = _mm512_set1_ps(thr);
      int64_t found = 0;
      for (int64_t s = 0; s < sp.strips && !fallback; ++s) {
        const __mmask16 live = s + 1 == sp.strips ? tail : static_cast<__mmask16>(0xffffu);
        uint32_t hit = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(sc + s * NR), tv, _CMP_GE_OQ);
        while (hit) {
          const int lane = __builtin_ctz(hit);
          hit &= hit - 1;
          if (found == kMaxCandidates) {
            fallback = true;
            break;
          }
          ws.pair_row[n_pairs + found] = static_cast<int32_t>(r * d);
          ws.pair_centroid[n_pairs + found] = static_cast<int32_t>(s * NR + lane);
          ++found;
        }
      }
      if (found == 0) fallback = true;  // cannot happen for finite scores; be safe
      if (!fallback) n_pairs += found;
    }
    if (fallback) {
      std::memcpy(ws.fallback.data() + n_fallback * d, ws.xb.data() + r * d, d * sizeof(float));
      ws.fallback_rows[n_fallback++] = r;
      ws.row_pairs[r] = n_pairs;
    }
  }
  ws.row_pairs[rows] = n_pairs;

  // 4. the candidates' fp32 scores, four at a time
  for (int64_t p0 = 0; p0 < n_pairs; p0 += 4) {
    const int cnt = static_cast<int>(std::min<int64_t>(4, n_pairs - p0));
    chain_dots(ws.xb.data(), panel.data.data(), d, cnt, ws.pair_row.data() + p0,
               ws.pair_centroid.data() + p0, ws.pair_score.data() + p0);
  }

  // 5. the largest fp32 score among a row's candidates (ascending index: ties to the lowest)
  int64_t n_certified = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p0 = ws.row_pairs[r], p1 = ws.row_pairs[r + 1];
    if (p1 == p0) continue;  // a fallback row
    int64_t best_p = p0;
    for (int64_t p = p0 + 1; p < p1; ++p)
      if (ws.pair_score[p] > ws.pair_score[best_p]) best_p = p;
    index[r0 + r] = ws.pair_centroid[best_p];
    const float inv = row_inverse_norm(ws.norms[r]);
    best_cos[r0 + r] = ws.pair_score[best_p] * inv;
    ++n_certified;
  }
  screen_count(n_certified, rows);
  return n_fallback;
}

#undef PC_BF16

int64_t screen_block_bf16_entry(const Bf16Panel& sp, const CentroidPanel& panel,
                                AssignWorkspace& ws, int64_t rows, int64_t r0, int64_t* index,
                                float* best_cos) {
  return screen_block_bf16(sp, panel, ws, rows, r0, index, best_cos);
}

}  // namespace cpu
}  // namespace pyconcepts
