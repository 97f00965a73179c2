// pybind11 bindings of pyconcepts._C_cuda. Same Python signatures as pyconcepts._C, with the
// CUDA stream (torch's current stream, as an integer handle) in place of the thread count.
// Tensors arrive as description tuples checked here (csrc/op_args.h); the values held in
// device memory (finiteness of the parameters) are checked by pyconcepts/ops.py. No torch
// type crosses here. The ops only queue work on that stream: they never synchronise with
// the host.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "cosine_assign.h"
#include "masked_moments.h"
#include "op_args.h"
#include "spherical_update.h"

namespace py = pybind11;
using namespace pyconcepts;
using namespace pyconcepts::bind;

namespace {

void* stream_of(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyconcepts CUDA kernels (torch-free; called by pyconcepts.ops)";

  m.def(
      "cosine_assign",
      [](py::object x, py::object c, py::object index, py::object best, py::object second,
         py::object bad, uintptr_t stream) {
        const CosineAssignArgs a = cosine_assign_args(x, c, index, best, second, bad,
                                                      py::none(), py::none(), py::none(), false);
        if (a.x.rows == 0) return;  // outputs are zeroed by the caller
        py::gil_scoped_release release;
        cosine_assign_cuda(a.x, a.centroids, a.k, a.index, a.best, a.second, a.bad,
                           stream_of(stream));
      },
      py::arg("x"), py::arg("centroids"), py::arg("index"), py::arg("best"), py::arg("second"),
      py::arg("bad"), py::arg("stream"));

  m.def(
      "spherical_update",
      [](py::object x, py::object index, int64_t k, py::object sums, py::object counts,
         py::object bad, uintptr_t stream) {
        const SphericalUpdateArgs a =
            spherical_update_args(x, index, k, sums, counts, bad, false);
        if (a.x.rows == 0) return;  // outputs are zeroed by the caller
        py::gil_scoped_release release;
        spherical_update_cuda(a.x, a.index, a.k, a.sums, a.counts, a.bad, stream_of(stream));
      },
      py::arg("x"), py::arg("index"), py::arg("k"), py::arg("sums"), py::arg("counts"),
      py::arg("bad"), py::arg("stream"));

  m.def(
      "masked_moments",
      [](py::object x, py::object w, py::object b, py::object center, py::object count,
         py::object sum_z, py::object sum_z2, py::object sum_x, py::object sum_xz,
         py::object bad, uintptr_t stream) {
        const MaskedMomentsArgs a = masked_moments_args(x, w, b, center, count, sum_z, sum_z2,
                                                        sum_x, sum_xz, bad, false);
        if (a.x.rows == 0) return;  // outputs are zeroed by the caller
        py::gil_scoped_release release;
        masked_moments_cuda(a.x, a.w, a.b, a.center, a.k, a.count, a.sum_z, a.sum_z2, a.sum_x,
                            a.sum_xz, a.bad, stream_of(stream));
      },
      py::arg("x"), py::arg("decoding"), py::arg("bias"), py::arg("center"), py::arg("count"),
      py::arg("sum_z"), py::arg("sum_z2"), py::arg("sum_x"), py::arg("sum_xz"), py::arg("bad"),
      py::arg("stream"));
}
