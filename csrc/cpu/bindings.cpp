// pybind11 bindings of the CPU module pyconcepts._C. Arguments are raw addresses, sizes and
// strides (validated by pyconcepts/ops.py); no torch type crosses this boundary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>

#include "assign_update.h"
#include "binding_args.h"
#include "cosine_assign.h"
#include "cpu/screen.h"
#include "cpu/simd.h"
#include "masked_moments.h"
#include "pruned_pass.h"
#include "spherical_update.h"

namespace py = pybind11;
using namespace pyconcepts;

using bind::check_k;
using bind::matrix;
using bind::ptr;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyconcepts CPU kernels (torch-free; called by pyconcepts.ops)";
  // Chosen now, so that a PYCONCEPTS_SIMD path this CPU lacks fails the import with its
  // reason instead of inside a parallel region later.
  cpu::kernels();
  cpu::screen_enabled();
  m.def("simd_level", [] { return std::string(cpu::kernels().name); },
        "The SIMD code path selected for this CPU at import time.");
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
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t row_stride, uintptr_t c,
         int64_t k, uintptr_t index, uintptr_t best, uintptr_t second, uintptr_t bad,
         int num_threads, uintptr_t group_max, uintptr_t row_index, int64_t n_out,
         uintptr_t center) {
        const Matrix mx = matrix(x, dtype, n, d, row_stride);
        check_k(k);
        if (n_out < 0) throw std::invalid_argument("n_out must be >= 0");
        py::gil_scoped_release release;
        cosine_assign_cpu(mx, ptr<const float>(c), k, ptr<int64_t>(index), ptr<float>(best),
                          second ? ptr<float>(second) : nullptr, ptr<int64_t>(bad), num_threads,
                          group_max ? ptr<float>(group_max) : nullptr,
                          row_index ? ptr<const int64_t>(row_index) : nullptr, n_out,
                          center ? ptr<const float>(center) : nullptr);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"),
      py::arg("centroids"), py::arg("k"), py::arg("index"), py::arg("best"), py::arg("second"),
      py::arg("bad"), py::arg("num_threads"), py::arg("group_max") = 0,
      py::arg("row_index") = 0, py::arg("n_out") = 0, py::arg("center") = 0);
  m.attr("ASSIGN_GROUP") = kAssignGroup;

  m.def(
      "assign_update",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t row_stride, uintptr_t c,
         int64_t k, uintptr_t index, uintptr_t best, uintptr_t second, uintptr_t sums,
         uintptr_t counts, uintptr_t bad, int num_threads, uintptr_t group_max, bool normalize,
         uintptr_t center, uintptr_t sum_xz, uintptr_t sum_z) {
        if ((sum_xz == 0) != (sum_z == 0))
          throw std::invalid_argument("sum_xz and sum_z are given together or not at all");
        const Matrix mx = matrix(x, dtype, n, d, row_stride);
        check_k(k);
        py::gil_scoped_release release;
        assign_update_cpu(mx, ptr<const float>(c), k, ptr<int64_t>(index), ptr<float>(best),
                          second ? ptr<float>(second) : nullptr, ptr<double>(sums),
                          ptr<int64_t>(counts), ptr<int64_t>(bad), num_threads,
                          group_max ? ptr<float>(group_max) : nullptr, normalize,
                          center ? ptr<const float>(center) : nullptr,
                          sum_xz ? ptr<double>(sum_xz) : nullptr,
                          sum_z ? ptr<double>(sum_z) : nullptr);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"),
      py::arg("centroids"), py::arg("k"), py::arg("index"), py::arg("best"), py::arg("second"),
      py::arg("sums"), py::arg("counts"), py::arg("bad"), py::arg("num_threads"),
      py::arg("group_max") = 0, py::arg("normalize") = false, py::arg("center") = 0,
      py::arg("sum_xz") = 0, py::arg("sum_z") = 0);

  m.def(
      "spherical_update",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t row_stride, uintptr_t index,
         int64_t k, uintptr_t sums, uintptr_t counts, uintptr_t bad, int num_threads) {
        const Matrix mx = matrix(x, dtype, n, d, row_stride);
        check_k(k);
        py::gil_scoped_release release;
        spherical_update_cpu(mx, ptr<const int64_t>(index), k, ptr<double>(sums),
                             ptr<int64_t>(counts), ptr<int64_t>(bad), num_threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"),
      py::arg("index"), py::arg("k"), py::arg("sums"), py::arg("counts"), py::arg("bad"),
      py::arg("num_threads"));

  m.def(
      "masked_moments",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t row_stride, uintptr_t w,
         uintptr_t b, uintptr_t center, int64_t k, uintptr_t count, uintptr_t sum_z,
         uintptr_t sum_z2, uintptr_t sum_x, uintptr_t sum_xz, uintptr_t bad, int num_threads) {
        const Matrix mx = matrix(x, dtype, n, d, row_stride);
        check_k(k);
        py::gil_scoped_release release;
        masked_moments_cpu(mx, ptr<const float>(w), ptr<const float>(b),
                           center ? ptr<const float>(center) : nullptr, k, ptr<int64_t>(count),
                           ptr<double>(sum_z), ptr<double>(sum_z2), ptr<double>(sum_x),
                           ptr<double>(sum_xz), ptr<int64_t>(bad), num_threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"),
      py::arg("decoding"), py::arg("bias"), py::arg("center"), py::arg("k"), py::arg("count"),
      py::arg("sum_z"), py::arg("sum_z2"), py::arg("sum_x"), py::arg("sum_xz"), py::arg("bad"),
      py::arg("num_threads"));
  m.def(
      "pruned_pass",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t row_stride, uintptr_t c,
         int64_t k, int64_t strips_per_group, uintptr_t drift, double eps, uintptr_t labels,
         uintptr_t theta_lo, uintptr_t theta_up, uintptr_t sum_corr, uintptr_t count_corr,
         uintptr_t stats, uintptr_t bad, int num_threads, bool normalize) {
        const Matrix mx = matrix(x, dtype, n, d, row_stride);
        check_k(k);
        if (strips_per_group < 1) throw std::invalid_argument("strips_per_group must be >= 1");
        if (!(eps > 0.0 && eps < 0.5)) throw std::invalid_argument("eps must be in (0, 0.5)");
        py::gil_scoped_release release;
        pruned_pass_cpu(mx, ptr<const float>(c), k, strips_per_group, ptr<const double>(drift),
                        eps, ptr<int64_t>(labels), ptr<float>(theta_lo), ptr<float>(theta_up),
                        ptr<double>(sum_corr), ptr<int64_t>(count_corr), ptr<int64_t>(stats),
                        ptr<int64_t>(bad), num_threads, normalize);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"),
      py::arg("centroids"), py::arg("k"), py::arg("strips_per_group"), py::arg("drift"),
      py::arg("eps"), py::arg("labels"), py::arg("theta_lo"), py::arg("theta_up"),
      py::arg("sum_corr"), py::arg("count_corr"), py::arg("stats"), py::arg("bad"),
      py::arg("num_threads"), py::arg("normalize"));
}
