// The argument checks of the ops that both native modules (_C and _C_cuda) provide: each
// turns the tensor descriptions of one call into the typed arguments of the kernel, or
// throws naming the argument. On the CPU (`host`) the values the kernels index with or use
// as given are checked too; on CUDA they live in device memory and pyconcepts/ops.py checks
// them before the call.
#pragma once
#include "binding_args.h"
#include "cosine_assign.h"

namespace pyconcepts {
namespace bind {

inline Device module_device(bool host) { return host ? Device::CPU : Device::CUDA; }

// (K, D) float32 contiguous parameter matrix matching X's D.
inline int64_t param_matrix(const View& v, int64_t d) {
  expect_elem(v, Elem::F32);
  if (v.dim() != 2) fail(std::string(v.name) + " must be 2-D (K, D)");
  check_k(v.shape[0], v.name);
  if (v.shape[1] != d)
    fail(std::string(v.name) + " has D = " + std::to_string(v.shape[1]) + " columns but x has D = " +
         std::to_string(d));
  expect_shape(v, v.shape);
  return v.shape[0];
}

inline int64_t assign_groups(int64_t k) { return (k + kAssignGroup - 1) / kAssignGroup; }

struct CosineAssignArgs {
  Matrix x;
  const float* centroids;
  int64_t k;
  int64_t* index;
  float* best;
  float* second;
  int64_t* bad;
  float* group_max;
  const int64_t* rows;
  int64_t n_out;
  const float* center;
  int64_t m;  // output rows: N, or len(rows) when rows is given
};

// Outputs: index int64 (M,), best float32 (M,), second float32 (M,) or None, group_max
// float32 (M, ceil(K / 16)) or None, bad int64 (2,), with M = N or len(rows).
inline CosineAssignArgs cosine_assign_args(const py::handle& x_, const py::handle& c_,
                                           const py::handle& index_, const py::handle& best_,
                                           const py::handle& second_, const py::handle& bad_,
                                           const py::handle& group_max_, const py::handle& rows_,
                                           const py::handle& center_, bool host) {
  const View x = view(x_, "x"), c = view(c_, "centroids"), index = view(index_, "index"),
             best = view(best_, "best"), second = view(second_, "second", true),
             bad = view(bad_, "bad"), group_max = view(group_max_, "group_max", true),
             rows = view(rows_, "rows", true), center = view(center_, "center", true);
  DeviceCheck same(module_device(host));
  for (const View* v : {&x, &c, &index, &best, &second, &bad, &group_max, &rows, &center}) same(*v);
  CosineAssignArgs a{};
  a.x = activations(x);
  a.k = param_matrix(c, a.x.cols);
  if (rows.present) {
    expect_elem(rows, Elem::I64);
    if (rows.dim() != 1) fail("rows must be 1-D");
    expect_shape(rows, rows.shape);
    if (host) expect_indices(rows, a.x.rows);
    a.rows = rows.ptr<const int64_t>();
    a.n_out = rows.shape[0];
  }
  const int64_t m = rows.present ? a.n_out : a.x.rows;
  a.m = m;
  expect(index, Elem::I64, {m});
  expect(best, Elem::F32, {m});
  if (second.present) expect(second, Elem::F32, {m});
  if (group_max.present) expect(group_max, Elem::F32, {m, assign_groups(a.k)});
  expect(bad, Elem::I64, {kBadSlots});
  if (center.present) expect(center, Elem::F32, {a.x.cols});
  if (host) {
    expect_finite<float>(c);
    expect_finite<float>(center);
  }
  a.centroids = c.ptr<const float>();
  a.index = index.ptr<int64_t>();
  a.best = best.ptr<float>();
  a.second = second.ptr<float>();
  a.bad = bad.ptr<int64_t>();
  a.group_max = group_max.ptr<float>();
  a.center = center.ptr<const float>();
  return a;
}

struct SphericalUpdateArgs {
  Matrix x;
  const int64_t* index;
  int64_t k;
  double* sums;
  int64_t* counts;
  int64_t* bad;
};

// index int64 (N,) (values outside [0, K) are counted by the kernel, never used);
// sums float64 (K, D), counts int64 (K,), bad int64 (2,).
inline SphericalUpdateArgs spherical_update_args(const py::handle& x_, const py::handle& index_,
                                                 int64_t k, const py::handle& sums_,
                                                 const py::handle& counts_,
                                                 const py::handle& bad_, bool host) {
  const View x = view(x_, "x"), index = view(index_, "index"), sums = view(sums_, "sums"),
             counts = view(counts_, "counts"), bad = view(bad_, "bad");
  DeviceCheck same(module_device(host));
  for (const View* v : {&x, &index, &sums, &counts, &bad}) same(*v);
  SphericalUpdateArgs a{};
  a.x = activations(x);
  check_k(k, "n_clusters");
  a.k = k;
  expect(index, Elem::I64, {a.x.rows});
  expect(sums, Elem::F64, {k, a.x.cols});
  expect(counts, Elem::I64, {k});
  expect(bad, Elem::I64, {kBadSlots});
  a.index = index.ptr<const int64_t>();
  a.sums = sums.ptr<double>();
  a.counts = counts.ptr<int64_t>();
  a.bad = bad.ptr<int64_t>();
  return a;
}

struct MaskedMomentsArgs {
  Matrix x;
  const float* w;
  const float* b;
  const float* center;
  int64_t k;
  int64_t* count;
  double *sum_z, *sum_z2, *sum_x, *sum_xz;
  int64_t* bad;
};

// decoding float32 (K, D), bias float32 (K,), center float32 (D,) or None; outputs count
// int64 (K,), sum_z, sum_z2 float64 (K,), sum_x, sum_xz float64 (K, D), bad int64 (2,).
inline MaskedMomentsArgs masked_moments_args(
    const py::handle& x_, const py::handle& w_, const py::handle& b_, const py::handle& center_,
    const py::handle& count_, const py::handle& sum_z_, const py::handle& sum_z2_,
    const py::handle& sum_x_, const py::handle& sum_xz_, const py::handle& bad_, bool host) {
  const View x = view(x_, "x"), w = view(w_, "decoding"), b = view(b_, "bias"),
             center = view(center_, "center", true), count = view(count_, "count"),
             sum_z = view(sum_z_, "sum_z"), sum_z2 = view(sum_z2_, "sum_z2"),
             sum_x = view(sum_x_, "sum_x"), sum_xz = view(sum_xz_, "sum_xz"),
             bad = view(bad_, "bad");
  DeviceCheck same(module_device(host));
  for (const View* v : {&x, &w, &b, &center, &count, &sum_z, &sum_z2, &sum_x, &sum_xz, &bad})
    same(*v);
  MaskedMomentsArgs a{};
  a.x = activations(x);
  const int64_t d = a.x.cols;
  a.k = param_matrix(w, d);
  expect(b, Elem::F32, {a.k});
  if (center.present) expect(center, Elem::F32, {d});
  expect(count, Elem::I64, {a.k});
  expect(sum_z, Elem::F64, {a.k});
  expect(sum_z2, Elem::F64, {a.k});
  expect(sum_x, Elem::F64, {a.k, d});
  expect(sum_xz, Elem::F64, {a.k, d});
  expect(bad, Elem::I64, {kBadSlots});
  if (host) {
    expect_finite<float>(w);
    expect_finite<float>(b);
    expect_finite<float>(center);
  }
  a.w = w.ptr<const float>();
  a.b = b.ptr<const float>();
  a.center = center.ptr<const float>();
  a.count = count.ptr<int64_t>();
  a.sum_z = sum_z.ptr<double>();
  a.sum_z2 = sum_z2.ptr<double>();
  a.sum_x = sum_x.ptr<double>();
  a.sum_xz = sum_xz.ptr<double>();
  a.bad = bad.ptr<int64_t>();
  return a;
}

}  // namespace bind
}  // namespace pyconcepts
