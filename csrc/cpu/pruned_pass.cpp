// pruned_pass on the CPU (semantics in pruned_pass.h). Rows are processed in fixed
// super-blocks (one OpenMP task each). Within a super-block every row is filtered by its
// loosened bounds; rows that survive are converted once, their own cosine tightens the
// bound, and rows that still need some groups are queued (already fp32) in an evaluation
// block. A full block is sorted by label (rows of one cluster tend to need the same groups),
// and each 6-row tile evaluates a centroid strip when any of its rows needs that strip's
// group, with the GEMM tile and top-2 epilogue of cosine_assign.
#include "pruned_pass.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/assign_block.h"
#include "cpu/simd.h"

namespace pyconcepts {

namespace {

using cpu::MR;
using cpu::NR;

// Rows per super-block: fixed, so the work split and the order of the sum corrections never
// depend on the thread count; small, because a pruned pass does little work per row.
constexpr int64_t kSuperRows = 2048;
// Added to (subtracted from) every computed angle: covers acos_approx's error (at most
// 4.4e-7 over every float in [-1, 1], checked exhaustively against double acos) and the
// rounding of one fp32 add of angles <= pi (half an ulp, 1.2e-7).
constexpr float kAngleSlack = 1.5e-6f;
// float(pi) rounds up, so it bounds every angle; a theta_lo of kPiUp never certifies a row.
constexpr float kPiUp = 3.14159274f;

const void* row_ptr(const Matrix& x, int64_t i) {
  const int64_t elem = x.dtype == DType::F32 ? 4 : 2;
  return static_cast<const char*>(x.data) + i * x.row_stride * elem;
}

float round_up(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

float round_down(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

// acos on [-1, 1] without a libm call, so loops over groups vectorise (Abramowitz & Stegun
// 4.4.46: error 2e-8 in exact arithmetic, 4.4e-7 as evaluated here in fp32).
inline float acos_approx(float v) {
  const float a = std::fabs(v);
  float p = -0.0012624911f;
  p = p * a + 0.0066700901f;
  p = p * a - 0.0170881256f;
  p = p * a + 0.0308918810f;
  p = p * a - 0.0501743046f;
  p = p * a + 0.0889789874f;
  p = p * a - 0.2145988016f;
  p = p * a + 1.5707963050f;
  const float r = std::sqrt(1.0f - a) * p;
  return v < 0.0f ? 3.14159265f - r : r;
}

// Upper bound on the (eps-shifted) angle from a cosine; NaN gives pi (never certifies).
inline float angle_up(float cos_minus) {
  return acos_approx(std::min(1.0f, std::max(-1.0f, cos_minus))) + kAngleSlack;
}

// Lower bound on an angle from an upper bound on its cosine (-inf: pi); NaN gives 0, which
// never certifies.
inline float angle_down(float cos_plus) {
  const float a = acos_approx(std::max(-1.0f, std::min(1.0f, cos_plus))) - kAngleSlack;
  return a > 0.0f ? a : 0.0f;
}

// Own-centroid dot product for the filter (8 partial sums: any order is fine, its rounding
// is within eps; labels never depend on it).
inline float dot(const float* a, const float* b, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t q = 0;
  for (; q + 8 <= d; q += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[q + l] * b[q + l];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; q < d; ++q) s += a[q] * b[q];
  return s;
}

// Per-thread float64 sum corrections of the current super-block, for the clusters it touched.
struct Corrections {
  Corrections(int64_t k, int64_t d)
      : sums(static_cast<size_t>(k * d)), counts(k), touched(k, 0) {}
  std::vector<double> sums;
  std::vector<int64_t> counts;
  std::vector<char> touched;
  std::vector<int64_t> touched_list;
  void add(int64_t c, const float* src, double scale, int64_t d) {
    double* dst = sums.data() + c * d;
    const bool first = !touched[c];  // first change of this cluster in the super-block
    if (first) {
      touched[c] = 1;
      touched_list.push_back(c);
      counts[c] = 0;
    }
    cpu::kernels().add_scaled_row(dst, src, d, scale, first);
  }
};

struct Counters {
  int64_t read = 0, cosines = 0, full = 0, moved = 0, nonfinite = 0, bad_label = 0;
};

// Per-thread scratch: the evaluation block and its top-2 / group state.
struct EvalBlock {
  EvalBlock(int64_t d, int64_t groups)
      : cap(cpu::AssignWorkspace::rows_for(d)),
        g(groups),
        staged(static_cast<size_t>(cap * d)),
        sorted(static_cast<size_t>(cap * d)),
        norms(cap),
        unscale(cap),
        rows(cap),
        labels(cap),
        perm(cap),
        masks(static_cast<size_t>(cap * groups)),
        tile_need(static_cast<size_t>((cap / MR) * groups)),
        group_max(static_cast<size_t>(cap * groups)),
        evaluated(static_cast<size_t>(cap * groups)),
        top_best(cap * NR),
        top_second(cap * NR),
        top_index(cap * NR) {}
  int64_t cap, g, n = 0;
  std::vector<float> staged, sorted, norms;
  std::vector<double> unscale;  // staged row * unscale = the row as read (rescale_row)
  std::vector<int64_t> rows, labels, perm;
  std::vector<char> masks, tile_need;
  std::vector<float> group_max;
  std::vector<char> evaluated;
  std::vector<float> top_best, top_second;
  std::vector<int32_t> top_index;
};

struct PassContext {
  const Matrix& x;
  const float* centroids;
  const cpu::CentroidPanel& panel;
  int64_t k, d, groups, strips_per_group;
  float eps, eps3;
  bool normalize;
  int64_t* labels;
  float* theta_lo;
  float* theta_up;
};

// Evaluates the queued rows and writes their labels, bounds and moves.
void flush(const PassContext& ctx, EvalBlock& eb, Corrections& corr, Counters& cnt) {
  const auto& kern = cpu::kernels();
  const int64_t n = eb.n, d = ctx.d, G = ctx.groups;
  if (n == 0) return;
  const int64_t padded = (n + MR - 1) / MR * MR;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Sort by label so that a tile's rows mostly need the same groups; not needed when every
  // row needs every group (early passes), then the staged block is used as it is.
  std::iota(eb.perm.begin(), eb.perm.begin() + n, int64_t{0});
  bool all_need_all = true;
  for (int64_t i = 0; i < n * G && all_need_all; ++i) all_need_all = eb.masks[i] != 0;
  float* xs = eb.staged.data();
  if (!all_need_all) {
    std::sort(eb.perm.begin(), eb.perm.begin() + n, [&](int64_t a, int64_t b) {
      return eb.labels[a] != eb.labels[b] ? eb.labels[a] < eb.labels[b]
                                          : eb.rows[a] < eb.rows[b];
    });
    for (int64_t i = 0; i < n; ++i)
      std::copy_n(eb.staged.data() + eb.perm[i] * d, d, eb.sorted.data() + i * d);
    xs = eb.sorted.data();
  }
  std::fill(xs + n * d, xs + padded * d, 0.0f);
  std::fill(eb.top_best.begin(), eb.top_best.begin() + padded * NR, neg_inf);
  std::fill(eb.top_second.begin(), eb.top_second.begin() + padded * NR, neg_inf);
  std::fill(eb.top_index.begin(), eb.top_index.begin() + padded * NR, 0);
  std::fill(eb.group_max.begin(), eb.group_max.begin() + n * G, neg_inf);
  std::fill(eb.evaluated.begin(), eb.evaluated.begin() + n * G, 0);
  const int64_t tiles = padded / MR;
  std::fill(eb.tile_need.begin(), eb.tile_need.begin() + tiles * G, 0);
  for (int64_t i = 0; i < n; ++i) {
    const char* mk = eb.masks.data() + eb.perm[i] * G;
    char* need = eb.tile_need.data() + (i / MR) * G;
    for (int64_t g = 0; g < G; ++g) need[g] |= mk[g];
  }

  alignas(64) float tile_buf[cpu::kMaxTiles * MR * NR];
  float row_max[MR];
  for (int64_t s = 0; s < ctx.panel.strips; ++s) {
    const int64_t g = s / ctx.strips_per_group;
    const float* b = ctx.panel.data.data() + s * d * NR;
    const int valid = static_cast<int>(std::min<int64_t>(NR, ctx.k - s * NR));
    for (int64_t t0 = 0; t0 < tiles;) {
      if (!eb.tile_need[t0 * G + g]) {
        ++t0;
        continue;
      }
      // consecutive tiles that need this strip share one gemm_tiles call
      int run = 1;
      while (run < kern.tiles_per_call && t0 + run < tiles && eb.tile_need[(t0 + run) * G + g])
        ++run;
      kern.gemm_tiles(d, xs + t0 * MR * d, d, run, b, NR, tile_buf, NR);
      for (int u = 0; u < run; ++u) {
        const int64_t m = (t0 + u) * MR;
        const float* tile = tile_buf + u * MR * NR;
        kern.top2_update(tile, static_cast<int32_t>(s * NR), valid, eb.top_best.data() + m * NR,
                         eb.top_second.data() + m * NR, eb.top_index.data() + m * NR);
        kern.tile_row_max(tile, valid, row_max);
        const int64_t real = std::min<int64_t>(MR, n - m);
        for (int64_t i = 0; i < real; ++i) {
          float& gm = eb.group_max[(m + i) * G + g];
          gm = std::max(gm, row_max[i]);
          eb.evaluated[(m + i) * G + g] = 1;
        }
        cnt.cosines += real * valid;
      }
      t0 += run;
    }
  }

  const int64_t group_width = NR * ctx.strips_per_group;
  for (int64_t i = 0; i < n; ++i) {
    // Largest dot, lowest index among equal ones: the reduction of assign_block.
    const cpu::RowTop2 top = kern.reduce_lanes(
        eb.top_best.data() + i * NR, eb.top_second.data() + i * NR, eb.top_index.data() + i * NR);
    const float second = top.second;
    const int64_t e = eb.perm[i], r = eb.rows[e], old = eb.labels[e];
    const int64_t winner = top.index;
    const float inv = 1.0f / std::max(std::sqrt(eb.norms[e]), 1e-12f);
    float* up = ctx.theta_up + r * G;
    const char* ev = eb.evaluated.data() + i * G;
    float* gm = eb.group_max.data() + i * G;
    // Every centroid of an evaluated group was a candidate; in the winner's group the
    // overall runner-up bounds the others.
    gm[winner / group_width] = second;
    int64_t n_evaluated = 0;
    for (int64_t g = 0; g < G; ++g) {
      const float b = angle_down(gm[g] * inv + ctx.eps);
      up[g] = ev[g] ? b : up[g];
      n_evaluated += ev[g];
    }
    const bool all = n_evaluated == G;
    cnt.full += all;
    ctx.theta_lo[r] = angle_up(top.best * inv - ctx.eps3);
    if (winner != old) {
      ctx.labels[r] = winner;
      ++cnt.moved;
      const double scale =
          ctx.normalize
              ? 1.0 / std::max(std::sqrt(static_cast<double>(eb.norms[e])), 1e-12)
              : eb.unscale[e];
      const float* src = xs + i * d;
      corr.add(winner, src, scale, d);
      corr.add(old, src, -scale, d);
      ++corr.counts[winner];
      --corr.counts[old];
    }
  }
  eb.n = 0;
}

}  // namespace

void pruned_pass_cpu(const Matrix& x, const float* centroids, int64_t k,
                     int64_t strips_per_group, const double* drift, double eps,
                     int64_t* labels, float* theta_lo, float* theta_up, double* sum_corr,
                     int64_t* count_corr, int64_t* stats, int64_t* bad, int num_threads,
                     bool normalize) {
  const int64_t n = x.rows, d = x.cols;
  const int64_t G = pruned_groups(k, strips_per_group);
  std::fill(sum_corr, sum_corr + k * d, 0.0);
  std::fill(count_corr, count_corr + k, int64_t{0});
  std::fill(stats, stats + kPrunedStats, int64_t{0});
  bad[0] = bad[1] = 0;
  if (n == 0) return;

  const cpu::CentroidPanel panel(centroids, k, d);
  // Drifts as fp32 rounded up; a group moves by its largest member drift.
  std::vector<float> drift_f(k), group_drift(G, 0.0f);
  for (int64_t j = 0; j < k; ++j) {
    drift_f[j] = round_up(drift[j]);
    const int64_t g = j / (NR * strips_per_group);
    group_drift[g] = std::max(group_drift[g], drift_f[j]);
  }
  // theta_lo may grow by a drift only while the own angle stays below acos(eps) (where the
  // eps-shifted angle grows no faster than the angle itself); beyond, it becomes pi.
  const float lo_limit = round_down(std::acos(eps));
  const PassContext ctx{x, centroids, panel, k, d, G, strips_per_group, round_up(eps),
                        round_up(3.0 * eps), normalize, labels, theta_lo, theta_up};

  const int64_t supers = (n + kSuperRows - 1) / kSuperRows;
  Counters total;
#pragma omp parallel num_threads(cpu::threads_for(num_threads, supers))
  {
    const auto& kern = cpu::kernels();
    EvalBlock eb(d, G);
    Corrections corr(k, d);
    Counters cnt;
#pragma omp for ordered schedule(dynamic, 1)
    for (int64_t sb = 0; sb < supers; ++sb) {
      const int64_t s0 = sb * kSuperRows, s1 = std::min(n, s0 + kSuperRows);
      for (int64_t r = s0; r < s1; ++r) {
        const int64_t own = labels[r];
        if (own < 0 || own >= k) {
          ++cnt.bad_label;
          continue;
        }
        // Loosen by the drifts; NaN bounds turn into never-certifying ones.
        float lo = theta_lo[r];
        if (drift_f[own] > 0.0f) {
          lo = lo + drift_f[own] + kAngleSlack;
          if (!(lo <= lo_limit)) lo = kPiUp;
        } else if (!(lo == lo)) {
          lo = kPiUp;
        }
        float* up = theta_up + r * G;
        bool certified = true;
        for (int64_t g = 0; g < G; ++g) {
          float b = up[g];
          if (group_drift[g] > 0.0f) b = b - group_drift[g] - kAngleSlack;
          b = b > 0.0f ? b : 0.0f;
          up[g] = b;
          certified &= lo < b;
        }
        if (certified) {
          theta_lo[r] = lo;
          continue;
        }
        // Read the row: exact own cosine, tightened theta_lo, group filter.
        ++cnt.read;
        float* xr = eb.staged.data() + eb.n * d;
        float sumsq = 0.0f;
        double unscale = 1.0;
        if (!kern.convert_row(row_ptr(x, r), x.dtype, d, nullptr, xr, &sumsq) ||
            !cpu::rescale_row(xr, d, sumsq, unscale)) {
          ++cnt.nonfinite;
          theta_lo[r] = lo;
          continue;
        }
        ++cnt.cosines;
        const float inv = 1.0f / std::max(std::sqrt(sumsq), 1e-12f);
        lo = std::min(lo, angle_up(dot(xr, centroids + own * d, d) * inv - ctx.eps3));
        char* mask = eb.masks.data() + eb.n * G;
        bool any = false;
        for (int64_t g = 0; g < G; ++g) {
          mask[g] = !(lo < up[g]);
          any |= mask[g];
        }
        theta_lo[r] = lo;
        if (!any) continue;
        // The own group is always evaluated, so the winner is chosen among kernel dots only.
        mask[own / (NR * strips_per_group)] = 1;
        eb.rows[eb.n] = r;
        eb.labels[eb.n] = own;
        eb.norms[eb.n] = sumsq;
        eb.unscale[eb.n] = unscale;
        if (++eb.n == eb.cap) flush(ctx, eb, corr, cnt);
      }
      flush(ctx, eb, corr, cnt);
      // Merge in super-block order: every sum is formed in the same order for any thread
      // count.
#pragma omp ordered
      {
        for (const int64_t c : corr.touched_list) {
          double* dst = sum_corr + c * d;
          const double* src = corr.sums.data() + c * d;
          for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
          count_corr[c] += corr.counts[c];
          corr.touched[c] = 0;
        }
        corr.touched_list.clear();
      }
    }
#pragma omp critical
    {
      total.read += cnt.read;
      total.cosines += cnt.cosines;
      total.full += cnt.full;
      total.moved += cnt.moved;
      total.nonfinite += cnt.nonfinite;
      total.bad_label += cnt.bad_label;
    }
  }

  stats[0] = total.read;
  stats[1] = total.cosines;
  stats[2] = total.full;
  stats[3] = total.moved;
  bad[0] = total.nonfinite;
  bad[1] = total.bad_label;
}

}  // namespace pyconcepts
