// Internal to the CPU module: exact screening of a block's assignment with low-precision
// dot products, chosen by PYCONCEPTS_SCREEN (off by default): int16 (below) or bf16
// (screen_bf16.cpp, which states its own bound). Neither changes a result bit.
//
// int16: AVX-512 VNNI vpdpwssd, two products per 32-bit lane per instruction.
// Rows and centroids are scaled to norm <= 45900 (norms taken in float64) and to
// |element| <= 32767, and rounded to int16, so every int32 sum
// (and every partial sum, by Cauchy-Schwarz on the prefix) stays below 2^31. With
// x~ = s x + dx and c~ = t c + dc (|dx|, |dc| <= 0.502: rounding plus the fp32 product),
//   |x~ . c~ - s t (x . c)| <= 0.502 (|x~|_1 + |c~|_1) + 0.76 D  (=: E, per row),
// the int32 -> fp32 conversion moves a score by at most 128, and the fp32 kernel's own
// score (a chain of D fused multiply-adds) is within gamma_D |x| |c| (+ D subnormal
// half-spacings) of x . c, at most Phi = gamma_D 46000^2 in integer units. A row whose integer top-2 gap exceeds
// 2 (E + 128 + Phi) therefore has the fp32 kernel's winner, strictly (no tie), and only its
// fp32 dot product is computed, by the same chain of fused multiply-adds as the fp32 tile:
// labels and best cosines are bit-identical to the fp32 path. Every other row (and every
// zero, tiny or non-finite row) takes the fp32 path. Used only without second-best or
// group outputs, on the avx512 path of CPUs with AVX-512 VNNI, when asked for.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/assign_block.h"

namespace pyconcepts {
namespace cpu {

enum class ScreenMode { Off, Int16, Bf16 };

// The bf16 screen's centroids (screen_bf16.cpp has the bound).
struct Bf16Panel {
  Bf16Panel(const float* centroids, int64_t k, int64_t d);
  int64_t k, d, dp, strips, kp;  // kp: k rounded up to whole strips
  const float* centroids;        // the fp32 centroids (K x D), for the candidates' scores
  std::vector<uint16_t> data;    // strip s, pair p: 16 centroids x 2 bf16, one zmm
  int scale_exp = 0;             // centroids scaled by 2^scale_exp before rounding
  double norm_max = 0.0, rounded_norm_max = 0.0, error_norm_max = 0.0;  // scaled, over K
  double gamma = 0.0;            // (D + 2) u / (1 - (D + 2) u)
  bool usable = false;
};

struct ScreenPanel {
  ScreenPanel(const float* centroids, int64_t k, int64_t d);
  ScreenMode mode;
  std::vector<Bf16Panel> bf16;  // one, in bf16 mode
  int64_t k, d, dp, strips;    // dp: d rounded up to even (pairs of int16)
  std::vector<int16_t> data;   // strip s, pair p: 16 centroids x 2 int16, one zmm
  double scale;                // t: c~ = round(t c) for every centroid
  double centroid_l1_max;      // largest |c~|_1
  double phi;                  // fp32 kernel error bound in integer units
  bool usable;                 // false when a scale cannot be formed (all-zero centroids)
};

// The screen in use: PYCONCEPTS_SCREEN=off|int16|bf16 (see screen_mode's definition for
// the default). Throws std::runtime_error for an unknown value or when the avx512 path or
// the instructions are missing; the module calls it at import.
ScreenMode screen_mode();
inline bool screen_enabled() { return screen_mode() != ScreenMode::Off; }
const char* screen_name();

// Adds to the counters screen_counts reports.
void screen_count(int64_t certified, int64_t screened);

int64_t screen_block_bf16_entry(const Bf16Panel& panel16, const CentroidPanel& panel,
                                AssignWorkspace& ws, int64_t rows, int64_t r0, int64_t* index,
                                float* best_cos);

// Screens rows [0, rows) of the block already converted in ws (xb, norms, finite): writes
// index[r0 + r] and best_cos[r0 + r] of every certified row, copies the others to ws.fallback
// (ws.fallback_rows[i] = their row in the block) and returns how many there are.
int64_t screen_block(const ScreenPanel& screen, const CentroidPanel& panel, AssignWorkspace& ws,
                     int64_t rows, int64_t r0, int64_t* index, float* best_cos);

// Rows certified / rows screened since the module was loaded (all threads).
void screen_counts(int64_t* certified, int64_t* screened);

}  // namespace cpu
}  // namespace pyconcepts
