// pruned_pass: one exact Lloyd assignment pass of spherical k-means that reads only the rows
// its angle bounds cannot certify (Yinyang-style group bounds on the sphere).
//
// State per row r (kept by the caller between passes, updated in place):
//   labels[r]              the cluster of the previous pass;
//   theta_lo[r]            an upper bound on f(phi_own), where phi_own is the true angle from
//                          x_r to its own centroid and f(t) = acos(max(-1, cos t - 2 eps)):
//                          the own angle with the kernel's rounding folded in;
//   theta_up[r * G + g]    a lower bound on the true angle from x_r to every centroid of
//                          group g other than its own. Group g = strips
//                          [g * strips_per_group, (g + 1) * strips_per_group) of 16 centroids.
// "True" angles are between x_r and c_j / ||c_j||. eps bounds |kernel cosine - true cosine|
// for every row and centroid (fp32 dot rounding, norm rounding, centroid norm error); the
// op in pyconcepts/ops.py derives it from D.
//
// The pass: with drift[j] >= the true angle centroid j moved since the bounds were made,
// theta_lo += drift[own] and theta_up[g] -= max drift in g. A row whose theta_lo is below
// every theta_up[g] keeps its label and is not read: then every other centroid j has
// true_cos_j < true_cos_own - 2 eps, so its fp32 dot is strictly below the own one. Other
// rows are converted once; their own cosine tightens theta_lo; the groups whose bound still
// reaches theta_lo, plus the own group, are evaluated with the same GEMM tile as
// cosine_assign (bit-identical dot products), and the row takes the largest dot among them,
// lowest index on ties. So the labels are exactly those cosine_assign gives with the new
// centroids. Evaluated groups get fresh bounds, unevaluated ones keep the loosened ones.
//
// Outputs (overwritten): sum_corr (K x D float64) and count_corr (K) hold, for the rows
// that changed cluster, +row at the new and -row at the old cluster (unit rows when
// normalize, as assign_update), partial sums of fixed row super-blocks merged in order:
// identical for any thread count.
// stats[kPrunedStats]: rows read, point-centroid cosines computed, rows for which every
// group was evaluated, rows moved. bad[0]: rows read that hold NaN/Inf (left unchanged);
// bad[1]: labels outside [0, K) (row left unchanged). Rows not read are not checked.
#pragma once
#include "common.h"
#include "cosine_assign.h"

namespace pyconcepts {

constexpr int kPrunedStats = 4;

// Number of bound groups for K centroids.
inline int64_t pruned_groups(int64_t k, int64_t strips_per_group) {
  const int64_t strips = (k + kAssignGroup - 1) / kAssignGroup;
  return (strips + strips_per_group - 1) / strips_per_group;
}

// centroids: K x D fp32 contiguous (unit rows). drift: K float64 >= 0. labels: N int64;
// theta_lo: N fp32; theta_up: N x G fp32 (G = pruned_groups(k, strips_per_group)).
void pruned_pass_cpu(const Matrix& x, const float* centroids, int64_t k,
                     int64_t strips_per_group, const double* drift, double eps,
                     int64_t* labels, float* theta_lo, float* theta_up, double* sum_corr,
                     int64_t* count_corr, int64_t* stats, int64_t* bad, int num_threads,
                     bool normalize);

}  // namespace pyconcepts
