// pybind11 bindings of pyconcepts._C_cuda. Same Python signatures as pyconcepts._C, with the
// CUDA stream (torch's current stream, as an integer handle) in place of the thread count.
// Arguments are device addresses validated by pyconcepts/ops.py; no torch type crosses here.
// The ops only queue work on that stream: they never synchronise with the host.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "binding_args.h"
#include "cosine_assign.h"
#include "masked_moments.h"
#include "spherical_update.h"

namespace py = pybind11;
using namespace pyconcepts;

using bind::check_k;
using bind::matrix;
using bind::ptr;

namespace {

void* stream_of(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyconcepts CUDA kernels (torch-free; called by pyconcepts.ops)";

  m.def(
      "cosine_assign",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t row_stride, uintptr_t c,
         int64_t k, uintptr_t index, uintptr_t best, uintptr_t second, uintptr_t bad,
         uintptr_t stream) {
        const Matrix mx = matrix(x, dtype, n, d, row_stride);
        check_k(k);
        py::gil_scoped_release release;
        cosine_assign_cuda(mx, ptr<const float>(c), k, ptr<int64_t>(index), ptr<float>(best),
                           second ? ptr<float>(second) : nullptr, ptr<int64_t>(bad),
                           stream_of(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"),
      py::arg("centroids"), py::arg("k"), py::arg("index"), py::arg("best"), py::arg("second"),
      py::arg("bad"), py::arg("stream"));

  m.def(
      "spherical_update",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t row_stride, uintptr_t index,
         int64_t k, uintptr_t sums, uintptr_t counts, uintptr_t bad, uintptr_t stream) {
        const Matrix mx = matrix(x, dtype, n, d, row_stride);
        check_k(k);
        py::gil_scoped_release release;
        spherical_update_cuda(mx, ptr<const int64_t>(index), k, ptr<double>(sums),
                              ptr<int64_t>(counts), ptr<int64_t>(bad), stream_of(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"),
      py::arg("index"), py::arg("k"), py::arg("sums"), py::arg("counts"), py::arg("bad"),
      py::arg("stream"));

  m.def(
      "masked_moments",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t row_stride, uintptr_t w,
         uintptr_t b, uintptr_t center, int64_t k, uintptr_t count, uintptr_t sum_z,
         uintptr_t sum_z2, uintptr_t sum_x, uintptr_t sum_xz, uintptr_t bad, uintptr_t stream) {
        const Matrix mx = matrix(x, dtype, n, d, row_stride);
        check_k(k);
        py::gil_scoped_release release;
        masked_moments_cuda(mx, ptr<const float>(w), ptr<const float>(b),
                            center ? ptr<const float>(center) : nullptr, k, ptr<int64_t>(count),
                            ptr<double>(sum_z), ptr<double>(sum_z2), ptr<double>(sum_x),
                            ptr<double>(sum_xz), ptr<int64_t>(bad), stream_of(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"),
      py::arg("decoding"), py::arg("bias"), py::arg("center"), py::arg("k"), py::arg("count"),
      py::arg("sum_z"), py::arg("sum_z2"), py::arg("sum_x"), py::arg("sum_xz"), py::arg("bad"),
      py::arg("stream"));
}
