// Exact 16-bit integer screening of the assignment with AVX-512 VNNI (the bound is proven
// in screen.h). Every function that uses AVX-512 has a target attribute; nothing here runs
// unless screen_enabled() said so.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "cpu/screen.h"

namespace pyconcepts {
namespace cpu {

namespace {

// Scaled norms stay below this, so |x~| |c~| < 2^31 with room for the rounding terms
// (|x~| <= 45900 + 0.502 sqrt(D)).
constexpr double kNormTarget = 45900.0;
constexpr double kInt16Max = 32767.0;

std::atomic<int64_t> g_certified{0}, g_screened{0};

#define PC_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

// R rows x 16 centroids of int32 dot products over `pairs` int16 pairs, converted to fp32
// (exactly rounded) into c (row stride NR).
template <int R>
PC_VNNI inline void int_tile(int64_t pairs, const int16_t* a, int64_t lda, const int16_t* b,
                             float* c) {
  __m512i acc[R];
#pragma GCC unroll 24
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_si512();
  const int32_t* a32 = reinterpret_cast<const int32_t*>(a);
  const int64_t lda32 = lda / 2;
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512i bv = _mm512_loadu_si512(b + q * 32);
#pragma GCC unroll 24
    for (int i = 0; i < R; ++i)
      acc[i] = _mm512_dpwssd_epi32(acc[i], _mm512_set1_epi32(a32[i * lda32 + q]), bv);
  }
#pragma GCC unroll 24
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(c + i * NR, _mm512_cvtepi32_ps(acc[i]));
}

PC_VNNI void int_tiles(int64_t pairs, const int16_t* a, int64_t lda, int tiles,
                       const int16_t* b, float* c) {
  switch (tiles) {
    case 4:
      int_tile<4 * MR>(pairs, a, lda, b, c);
      break;
    case 3:
      int_tile<3 * MR>(pairs, a, lda, b, c);
      break;
    case 2:
      int_tile<2 * MR>(pairs, a, lda, b, c);
      break;
    default:
      int_tile<MR>(pairs, a, lda, b, c);
      break;
  }
}

// One row rounded to int16 at scale s (dp - d trailing zeros); returns |x~|_1.
PC_VNNI int64_t quantize_row(const float* x, int64_t d, int64_t dp, float s, int16_t* out) {
  const __m512 sv = _mm512_set1_ps(s);
  __m512i l1 = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), sv));
    l1 = _mm512_add_epi32(l1, _mm512_abs_epi32(q));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm512_cvtsepi32_epi16(q));
  }
  int64_t total = _mm512_reduce_add_epi32(l1);  // <= 16 * 32767 * (d / 16): no overflow
  for (; j < d; ++j) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(x[j] * s));
    total += std::abs(q);
    out[j] = static_cast<int16_t>(std::max(-32767, std::min(32767, q)));
  }
  for (; j < dp; ++j) out[j] = 0;
  return total;
}

// The fp32 tile's sum for one row and one centroid strip: the same chain of fused
// multiply-adds (p in order, from zero) as gemm_tile, four rows at a time.
PC_VNNI void winner_dots(int count, const float* const* rows, const float* const* strips,
                         int64_t d, __m512* out) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  const float* x0 = rows[0];
  const float* x1 = rows[count > 1 ? 1 : 0];
  const float* x2 = rows[count > 2 ? 2 : 0];
  const float* x3 = rows[count > 3 ? 3 : 0];
  const float* b0 = strips[0];
  const float* b1 = strips[count > 1 ? 1 : 0];
  const float* b2 = strips[count > 2 ? 2 : 0];
  const float* b3 = strips[count > 3 ? 3 : 0];
  for (int64_t q = 0; q < d; ++q) {
    acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(x0[q]), _mm512_loadu_ps(b0 + q * NR), acc[0]);
    acc[1] = _mm512_fmadd_ps(_mm512_set1_ps(x1[q]), _mm512_loadu_ps(b1 + q * NR), acc[1]);
    acc[2] = _mm512_fmadd_ps(_mm512_set1_ps(x2[q]), _mm512_loadu_ps(b2 + q * NR), acc[2]);
    acc[3] = _mm512_fmadd_ps(_mm512_set1_ps(x3[q]), _mm512_loadu_ps(b3 + q * NR), acc[3]);
  }
  for (int i = 0; i < count; ++i) out[i] = acc[i];
}

PC_VNNI int64_t screen_block_vnni(const ScreenPanel& sp, const CentroidPanel& panel,
                                  AssignWorkspace& ws, int64_t rows, int64_t r0,
                                  int64_t* index, float* best_cos) {
  const auto& kern = kernels();
  const int64_t d = sp.d, dp = sp.dp, pairs = dp / 2;
  const int64_t cap = ws.rows_per_block;
  if (static_cast<int64_t>(ws.xq.size()) < cap * dp) {
    ws.xq.assign(static_cast<size_t>(cap * dp), 0);
    ws.gap_needed.assign(static_cast<size_t>(cap), 0.0f);
    ws.fallback.assign(static_cast<size_t>(cap * d), 0.0f);
    ws.fallback_rows.assign(static_cast<size_t>(cap), 0);
    ws.certified_rows.assign(static_cast<size_t>(cap), 0);
  }
  const int64_t padded = (rows + MR - 1) / MR * MR;
  // 1. rows to int16 and each row's certifying gap
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = ws.xb.data() + r * d;
    int16_t* q = ws.xq.data() + r * dp;
    // the norm in float64 (no underflow or overflow for any float row), not the fp32 sum
    double sumsq = 0.0, inf_norm = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const double v = x[j];
      sumsq += v * v;
      inf_norm = std::max(inf_norm, std::fabs(v));
    }
    const double norm = std::sqrt(sumsq) * (1.0 - 1e-12);  // sqrt(sum) >= a hair below |x|
    const double s = std::min(kNormTarget / norm, kInt16Max / inf_norm);
    if (!ws.finite[r] || !(norm > 0.0) || !std::isfinite(norm) || !(s > 0.0) ||
        !std::isfinite(s) || s > 1.0e30) {
      std::fill(q, q + dp, int16_t{0});
      ws.gap_needed[r] = -1.0f;  // never certified: the fp32 path decides
      continue;
    }
    const int64_t l1 = quantize_row(x, d, dp, static_cast<float>(s), q);
    // + the fp32 chain's underflow terms (D half-spacings of subnormals, in integer units)
    const double e = 0.502 * (static_cast<double>(l1) + sp.centroid_l1_max) + 0.76 * d + 1.0 +
                     s * sp.scale * d * std::ldexp(1.0, -149);
    ws.gap_needed[r] = static_cast<float>(2.0 * (e + 128.0 + sp.phi) * (1.0 + 1e-6));
  }
  std::fill(ws.xq.begin() + rows * dp, ws.xq.begin() + padded * dp, int16_t{0});

  // 2. integer scores of every centroid, running top-2 of their fp32 images
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(ws.top_best.begin(), ws.top_best.begin() + padded * NR, neg_inf);
  std::fill(ws.top_second.begin(), ws.top_second.begin() + padded * NR, neg_inf);
  std::fill(ws.top_index.begin(), ws.top_index.begin() + padded * NR, 0);
  alignas(64) float tiles[kMaxTiles * MR * NR];
  const int64_t step = kMaxTiles * MR;
  for (int64_t s = 0; s < sp.strips; ++s) {
    const int16_t* b = sp.data.data() + s * pairs * 32;
    const int valid = static_cast<int>(std::min<int64_t>(NR, sp.k - s * NR));
    for (int64_t m0 = 0; m0 < padded; m0 += step) {
      const int count = static_cast<int>(std::min<int64_t>(step, padded - m0) / MR);
      int_tiles(pairs, ws.xq.data() + m0 * dp, dp, count, b, tiles);
      for (int t = 0; t < count; ++t) {
        const int64_t m = m0 + t * MR;
        kern.top2_update(tiles + t * MR * NR, static_cast<int32_t>(s * NR), valid,
                         ws.top_best.data() + m * NR, ws.top_second.data() + m * NR,
                         ws.top_index.data() + m * NR);
      }
    }
  }

  // 3. certify; the winners' fp32 dots by the fp32 tile's chain, four rows at a time
  int64_t n_fallback = 0, n_certified = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const RowTop2 top = kern.reduce_lanes(ws.top_best.data() + r * NR,
                                          ws.top_second.data() + r * NR,
                                          ws.top_index.data() + r * NR);
    const float need = ws.gap_needed[r];
    if (need >= 0.0f && top.best - top.second > need) {
      index[r0 + r] = top.index;
      ws.certified_rows[n_certified++] = r;
    } else {
      std::memcpy(ws.fallback.data() + n_fallback * d, ws.xb.data() + r * d, d * sizeof(float));
      ws.fallback_rows[n_fallback++] = r;
    }
  }
  alignas(64) float lanes[NR];
  for (int64_t c0 = 0; c0 < n_certified; c0 += 4) {
    const int count = static_cast<int>(std::min<int64_t>(4, n_certified - c0));
    const float* xr[4];
    const float* br[4];
    __m512 dots[4];
    for (int i = 0; i < count; ++i) {
      const int64_t r = ws.certified_rows[c0 + i];
      xr[i] = ws.xb.data() + r * d;
      br[i] = panel.data.data() + (index[r0 + r] / NR) * d * NR;
    }
    winner_dots(count, xr, br, d, dots);
    for (int i = 0; i < count; ++i) {
      const int64_t r = ws.certified_rows[c0 + i];
      _mm512_store_ps(lanes, dots[i]);
      const float inv = row_inverse_norm(ws.norms[r]);
      best_cos[r0 + r] = lanes[index[r0 + r] % NR] * inv;
    }
  }
  screen_count(n_certified, rows);
  return n_fallback;
}

#undef PC_VNNI

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
}

}  // namespace

ScreenPanel::ScreenPanel(const float* centroids, int64_t k_, int64_t d_)
    : mode(screen_mode()), k(k_), d(d_), dp((d_ + 1) / 2 * 2), strips((k_ + NR - 1) / NR),
      scale(0.0), centroid_l1_max(0.0), phi(0.0), usable(false) {
  if (mode == ScreenMode::Bf16) {
    bf16.emplace_back(centroids, k, d);
    usable = bf16.front().usable;
    return;
  }
  data.assign(static_cast<size_t>(strips * dp * NR), 0);
  // one scale t for every centroid, so integer scores compare directly
  double t = std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < k; ++c) {
    double ss = 0.0, mx = 0.0;
    for (int64_t p = 0; p < d; ++p) {
      const double v = centroids[c * d + p];
      ss += v * v;
      mx = std::max(mx, std::fabs(v));
    }
    if (ss > 0.0) t = std::min(t, std::min(kNormTarget / std::sqrt(ss), kInt16Max / mx));
  }
  if (!(t > 0.0) || !std::isfinite(t) || t > 1.0e30) return;
  scale = t;
  for (int64_t c = 0; c < k; ++c) {
    double l1 = 0.0;
    int16_t* strip = data.data() + (c / NR) * (dp / 2) * 32;
    for (int64_t p = 0; p < d; ++p) {
      const double v = std::nearbyint(static_cast<double>(centroids[c * d + p]) * t);
      const int16_t q = static_cast<int16_t>(std::max(-32767.0, std::min(32767.0, v)));
      l1 += std::fabs(static_cast<double>(q));
      strip[(p / 2) * 32 + (c % NR) * 2 + (p % 2)] = q;
    }
    centroid_l1_max = std::max(centroid_l1_max, l1);
  }
  // gamma_D = D u / (1 - D u) for the fp32 chain, times the largest s t |x| |c| (45900^2,
  // rounded up; s and t come from float64 norms)
  const double u = std::ldexp(1.0, -24);
  const double dd = static_cast<double>(d) + 1.0;
  if (dd * u >= 0.5) return;
  phi = dd * u / (1.0 - dd * u) * 46000.0 * 46000.0;
  usable = d <= 16384;  // 0.502 sqrt(D) of rounding keeps |x~| |c~| below 2^31
}

bool cpu_has_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
}

ScreenMode screen_mode() {
  static const ScreenMode mode = [] {
    const char* env = std::getenv("PYCONCEPTS_SCREEN");
    const std::string value = env ? env : "";
    const bool avx512 = std::strcmp(kernels().path, "avx512") == 0;
    if (value.empty() || value == "off") return ScreenMode::Off;
    if (value == "int16") {
      if (!avx512 || !cpu_has_vnni())
        throw std::runtime_error(
            "PYCONCEPTS_SCREEN=int16 needs the avx512 path and AVX-512 VNNI (path in use: " +
            std::string(kernels().path) + ", VNNI: " + (cpu_has_vnni() ? "yes" : "no") + ")");
      return ScreenMode::Int16;
    }
    if (value == "bf16") {
      if (!avx512 || !cpu_has_bf16())
        throw std::runtime_error(
            "PYCONCEPTS_SCREEN=bf16 needs the avx512 path and AVX-512 BF16 (path in use: " +
            std::string(kernels().path) + ", BF16: " + (cpu_has_bf16() ? "yes" : "no") + ")");
      return ScreenMode::Bf16;
    }
    throw std::runtime_error("PYCONCEPTS_SCREEN=" + value + ": unknown; use off, int16 or bf16");
  }();
  return mode;
}

const char* screen_name() {
  switch (screen_mode()) {
    case ScreenMode::Int16:
      return "int16";
    case ScreenMode::Bf16:
      return "bf16";
    default:
      return "off";
  }
}

void screen_count(int64_t certified, int64_t screened) {
  g_certified.fetch_add(certified, std::memory_order_relaxed);
  g_screened.fetch_add(screened, std::memory_order_relaxed);
}

int64_t screen_block(const ScreenPanel& screen, const CentroidPanel& panel, AssignWorkspace& ws,
                     int64_t rows, int64_t r0, int64_t* index, float* best_cos) {
  if (screen.mode == ScreenMode::Bf16)
    return screen_block_bf16_entry(screen.bf16.front(), panel, ws, rows, r0, index, best_cos);
  return screen_block_vnni(screen, panel, ws, rows, r0, index, best_cos);
}

void screen_counts(int64_t* certified, int64_t* screened) {
  *certified = g_certified.load();
  *screened = g_screened.load();
}

}  // namespace cpu
}  // namespace pyconcepts
