// pybind11 bindings of the CPU module pyconcepts._C. Tensors arrive as description tuples
// (see csrc/binding_args.h) and are checked here, before any kernel runs; no torch type
// crosses this boundary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "assign_update.h"
#include "cosine_assign.h"
#include "cpu/screen.h"
#include "cpu/simd.h"
#include "masked_moments.h"
#include "op_args.h"
#include "pruned_pass.h"
#include "spherical_update.h"

namespace py = pybind11;
using namespace pyconcepts;
using namespace pyconcepts::bind;

namespace {

// Largest deviation of a centroid norm from 1 that pruned_pass accepts; matches
// PRUNED_NORM_TOL in pyconcepts/ops.py.
constexpr double kPrunedNormTol = 1e-5;

// The eps of pruned_pass_eps(D) in pyconcepts/ops.py: a smaller one would let the bounds
// certify rows whose label can change.
double pruned_min_eps(int64_t d) {
  return 2.0 * static_cast<double>(d + 16) * std::ldexp(1.0, -24) + kPrunedNormTol +
         std::ldexp(1.0, -22);
}

void expect_unit_rows(const View& c, int64_t k, int64_t d) {
  const float* p = c.ptr<const float>();
  for (int64_t i = 0; i < k; ++i) {
    double sq = 0.0;
    for (int64_t j = 0; j < d; ++j) sq += static_cast<double>(p[i * d + j]) * p[i * d + j];
    if (!(std::abs(std::sqrt(sq) - 1.0) <= kPrunedNormTol))
      fail("centroids must have unit-norm rows to 1e-05 for pruned_pass");
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyconcepts CPU kernels (torch-free; called by pyconcepts.ops)";
  // Chosen now, so that a PYCONCEPTS_SIMD path this CPU lacks fails the import with its
  // reason instead of inside a parallel region later.
  cpu::kernels();
  cpu::screen_enabled();
  m.def("simd_level", [] { return std::string(cpu::kernels().name); },
        "The SIMD code path selected for this CPU at import time.");
  m.attr("ASSIGN_GROUP") = kAssignGroup;
  m.attr("MAX_THREADS") = kMaxThreads;
  m.def("simd_path", [] { return std::string(cpu::kernels().path); },
        "The PYCONCEPTS_SIMD value of the code path in use (generic, avx2, avx512).");
  m.def("simd_paths", &cpu::available_paths,
        "The PYCONCEPTS_SIMD values this CPU and build can run.");
  m.def("screen", [] { return std::string(cpu::screen_name()); },
        "The exact low-precision screen in use: off, int16 or bf16 (PYCONCEPTS_SCREEN).");
  m.def("screen_counts", [] {
    int64_t certified = 0, screened = 0;
    cpu::screen_counts(&certified, &screened);
    return py::make_tuple(certified, screened);
  }, "(rows certified, rows screened) by the integer screen since import (all threads).");
  m.def("cpu_features", [] {
    py::dict d;
    for (const auto& f : cpu::cpu_features()) d[py::str(f.first)] = f.second;
    return d;
  }, "Instruction-set features of this CPU the kernels look at.");

  m.def(
      "cosine_assign",
      [](py::object x, py::object c, py::object index, py::object best, py::object second,
         py::object bad, int64_t num_threads, py::object group_max, py::object rows,
         py::object center) {
        const CosineAssignArgs a = cosine_assign_args(x, c, index, best, second, bad,
                                                      group_max, rows, center, true);
        const int threads = check_threads(num_threads);
        if (a.m == 0) {  // nothing to assign (an empty rows may have a null address)
          a.bad[0] = a.bad[1] = 0;
          return;
        }
        py::gil_scoped_release release;
        cosine_assign_cpu(a.x, a.centroids, a.k, a.index, a.best, a.second, a.bad, threads,
                          a.group_max, a.rows, a.n_out, a.center);
      },
      py::arg("x"), py::arg("centroids"), py::arg("index"), py::arg("best"), py::arg("second"),
      py::arg("bad"), py::arg("num_threads"), py::arg("group_max") = py::none(),
      py::arg("rows") = py::none(), py::arg("center") = py::none());

  m.def(
      "assign_update",
      [](py::object x_, py::object c_, py::object index_, py::object best_,
         py::object second_, py::object sums_, py::object counts_, py::object bad_,
         int64_t num_threads, py::object group_max_, bool normalize, py::object center_,
         py::object sum_xz_, py::object sum_z_) {
        const CosineAssignArgs a = cosine_assign_args(x_, c_, index_, best_, second_, bad_,
                                                      group_max_, py::none(), center_, true);
        const View sums = view(sums_, "sums"), counts = view(counts_, "counts"),
                   sum_xz = view(sum_xz_, "sum_xz", true), sum_z = view(sum_z_, "sum_z", true);
        DeviceCheck same(Device::CPU);
        for (const View* v : {&sums, &counts, &sum_xz, &sum_z}) same(*v);
        const int64_t k = a.k, d = a.x.cols;
        expect(sums, Elem::F64, {k, d});
        expect(counts, Elem::I64, {k});
        if (sum_xz.present != sum_z.present)
          fail("sum_xz and sum_z are given together or not at all");
        if (sum_xz.present) {
          expect(sum_xz, Elem::F64, {k, d});
          expect(sum_z, Elem::F64, {k, 2});
        }
        const int threads = check_threads(num_threads);
        py::gil_scoped_release release;
        assign_update_cpu(a.x, a.centroids, k, a.index, a.best, a.second, sums.ptr<double>(),
                          counts.ptr<int64_t>(), a.bad, threads, a.group_max, normalize,
                          a.center, sum_xz.ptr<double>(), sum_z.ptr<double>());
      },
      py::arg("x"), py::arg("centroids"), py::arg("index"), py::arg("best"), py::arg("second"),
      py::arg("sums"), py::arg("counts"), py::arg("bad"), py::arg("num_threads"),
      py::arg("group_max") = py::none(), py::arg("normalize") = false,
      py::arg("center") = py::none(), py::arg("sum_xz") = py::none(),
      py::arg("sum_z") = py::none());

  m.def(
      "spherical_update",
      [](py::object x, py::object index, int64_t k, py::object sums, py::object counts,
         py::object bad, int64_t num_threads) {
        const SphericalUpdateArgs a =
            spherical_update_args(x, index, k, sums, counts, bad, true);
        const int threads = check_threads(num_threads);
        py::gil_scoped_release release;
        spherical_update_cpu(a.x, a.index, a.k, a.sums, a.counts, a.bad, threads);
      },
      py::arg("x"), py::arg("index"), py::arg("k"), py::arg("sums"), py::arg("counts"),
      py::arg("bad"), py::arg("num_threads"));

  m.def(
      "masked_moments",
      [](py::object x, py::object w, py::object b, py::object center, py::object count,
         py::object sum_z, py::object sum_z2, py::object sum_x, py::object sum_xz,
         py::object bad, int64_t num_threads) {
        const MaskedMomentsArgs a = masked_moments_args(x, w, b, center, count, sum_z, sum_z2,
                                                        sum_x, sum_xz, bad, true);
        const int threads = check_threads(num_threads);
        py::gil_scoped_release release;
        masked_moments_cpu(a.x, a.w, a.b, a.center, a.k, a.count, a.sum_z, a.sum_z2, a.sum_x,
                           a.sum_xz, a.bad, threads);
      },
      py::arg("x"), py::arg("decoding"), py::arg("bias"), py::arg("center"), py::arg("count"),
      py::arg("sum_z"), py::arg("sum_z2"), py::arg("sum_x"), py::arg("sum_xz"), py::arg("bad"),
      py::arg("num_threads"));

  m.def(
      "pruned_pass",
      [](py::object x_, py::object c_, int64_t strips_per_group, py::object drift_,
         double eps, py::object labels_, py::object theta_lo_, py::object theta_up_,
         py::object sum_corr_, py::object count_corr_, py::object stats_, py::object bad_,
         int64_t num_threads, bool normalize) {
        const View x = view(x_, "x"), c = view(c_, "centroids"), drift = view(drift_, "drift"),
                   labels = view(labels_, "labels"), theta_lo = view(theta_lo_, "theta_lo"),
                   theta_up = view(theta_up_, "theta_up"), sum_corr = view(sum_corr_, "sum_corr"),
                   count_corr = view(count_corr_, "count_corr"), stats = view(stats_, "stats"),
                   bad = view(bad_, "bad");
        DeviceCheck same(Device::CPU);
        for (const View* v : {&x, &c, &drift, &labels, &theta_lo, &theta_up, &sum_corr,
                              &count_corr, &stats, &bad})
          same(*v);
        const Matrix mx = activations(x);
        const int64_t n = mx.rows, d = mx.cols;
        const int64_t k = param_matrix(c, d);
        if (strips_per_group < 1)
          fail("strips_per_group must be >= 1, got " + std::to_string(strips_per_group));
        // Past the number of strips every value means one group; clamping keeps the
        // kernel's group arithmetic (16 * strips_per_group) far from overflow.
        const int64_t strips = assign_groups(k);
        strips_per_group = std::min(strips_per_group, strips);
        const int64_t groups = pruned_groups(k, strips_per_group);
        if (!(eps >= pruned_min_eps(d) && eps < 0.5))
          fail("eps must be in [pruned_pass_eps(D), 0.5), got " +
               py::str(py::float_(eps)).cast<std::string>());
        expect(drift, Elem::F64, {k});
        expect(labels, Elem::I64, {n});
        expect(theta_lo, Elem::F32, {n});
        expect(theta_up, Elem::F32, {n, groups});
        expect(sum_corr, Elem::F64, {k, d});
        expect(count_corr, Elem::I64, {k});
        expect(stats, Elem::I64, {kPrunedStats});
        expect(bad, Elem::I64, {kBadSlots});
        expect_finite<float>(c);
        expect_unit_rows(c, k, d);
        const double* dr = drift.ptr<const double>();
        for (int64_t j = 0; j < k; ++j)
          if (!(std::isfinite(dr[j]) && dr[j] >= 0.0)) fail("drift must hold finite angles >= 0");
        const int threads = check_threads(num_threads);
        py::gil_scoped_release release;
        pruned_pass_cpu(mx, c.ptr<const float>(), k, strips_per_group, dr, eps,
                        labels.ptr<int64_t>(), theta_lo.ptr<float>(), theta_up.ptr<float>(),
                        sum_corr.ptr<double>(), count_corr.ptr<int64_t>(), stats.ptr<int64_t>(),
                        bad.ptr<int64_t>(), threads, normalize);
      },
      py::arg("x"), py::arg("centroids"), py::arg("strips_per_group"), py::arg("drift"),
      py::arg("eps"), py::arg("labels"), py::arg("theta_lo"), py::arg("theta_up"),
      py::arg("sum_corr"), py::arg("count_corr"), py::arg("stats"), py::arg("bad"),
      py::arg("num_threads"), py::arg("normalize"));
}
