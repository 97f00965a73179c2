// The native boundary shared by the pybind11 modules _C and _C_cuda. Every tensor crosses it
// as a plain tuple (address, element code, device type, device index, shape, strides) built
// by pyconcepts/ops.py from the tensor itself, and every op checks here, before any kernel
// runs, everything the kernel indexes with: element types, shapes, strides, devices, size
// products (overflow), and on the CPU the index values and the finiteness of the small
// parameter tensors. So the op registrations (torch.ops.pyconcepts.*, torch.compile) and
// pyconcepts.ops reach the kernels only through these checks. Errors name the argument and
// surface in Python as TypeError (element type) or ValueError (anything else).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace pyconcepts {
namespace bind {

namespace py = pybind11;

// Element codes; must match _ELEM_CODES in pyconcepts/ops.py. X uses the first three, whose
// values are those of DType.
enum class Elem : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, I64 = 4, I32 = 5, Other = 6 };
// Device types; must match pyconcepts/ops.py.
enum class Device : int { CPU = 0, CUDA = 1, Other = 2 };

inline const char* elem_name(Elem e) {
  switch (e) {
    case Elem::F32: return "float32";
    case Elem::F16: return "float16";
    case Elem::BF16: return "bfloat16";
    case Elem::F64: return "float64";
    case Elem::I64: return "int64";
    case Elem::I32: return "int32";
    default: return "another dtype";
  }
}

inline int64_t elem_size(Elem e) {
  switch (e) {
    case Elem::F16:
    case Elem::BF16: return 2;
    case Elem::F32:
    case Elem::I32: return 4;
    default: return 8;
  }
}

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// a * b, or an error naming `what` when the product leaves int64.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out;
  if (__builtin_mul_overflow(a, b, &out))
    fail(std::string(what) + ": size product overflows int64");
  return out;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t out;
  if (__builtin_add_overflow(a, b, &out))
    fail(std::string(what) + ": size sum overflows int64");
  return out;
}

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// One tensor as described by pyconcepts/ops.py.
struct View {
  const char* name = "";
  bool present = false;
  uintptr_t data = 0;
  Elem elem = Elem::Other;
  Device device = Device::Other;
  int64_t device_index = 0;
  std::vector<int64_t> shape, stride;

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (const int64_t s : shape) n = checked_mul(n, s, name);
    return n;
  }
  template <typename T>
  T* ptr() const {
    return present ? reinterpret_cast<T*>(data) : nullptr;
  }
};

// Parses a tuple (address, elem, device type, device index, shape, strides); None gives an
// absent view when `optional`.
inline View view(const py::handle& obj, const char* name, bool optional = false) {
  View v;
  v.name = name;
  if (obj.is_none()) {
    if (!optional) fail(std::string(name) + " is required");
    return v;
  }
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 6)
    throw py::type_error(std::string(name) + " must be a tensor description tuple");
  const auto t = py::reinterpret_borrow<py::tuple>(obj);
  try {
    v.data = t[0].cast<uintptr_t>();
    v.elem = static_cast<Elem>(t[1].cast<int>());
    v.device = static_cast<Device>(t[2].cast<int>());
    v.device_index = t[3].cast<int64_t>();
    v.shape = t[4].cast<std::vector<int64_t>>();
    v.stride = t[5].cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string(name) + ": malformed tensor description");
  }
  if (static_cast<int>(v.elem) < 0 || static_cast<int>(v.elem) > 6) v.elem = Elem::Other;
  if (v.shape.size() != v.stride.size())
    fail(std::string(name) + ": shape and strides differ in length");
  for (size_t i = 0; i < v.shape.size(); ++i) {
    if (v.shape[i] < 0) fail(std::string(name) + ": negative size");
    if (v.stride[i] < 0) fail(std::string(name) + ": negative stride");
  }
  // The furthest element must be addressable: sum (size - 1) * stride * elem in int64.
  int64_t last = 0;
  for (size_t i = 0; i < v.shape.size(); ++i)
    if (v.shape[i] > 0) last = checked_add(last, checked_mul(v.shape[i] - 1, v.stride[i], name), name);
  checked_mul(checked_add(last, 1, name), elem_size(v.elem), name);
  v.present = true;
  if (v.numel() > 0 && v.data == 0) fail(std::string(name) + ": null data pointer");
  return v;
}

inline void expect_elem(const View& v, Elem e) {
  if (v.elem != e)
    throw py::type_error(std::string(v.name) + " must be " + elem_name(e) + ", got " +
                         elem_name(v.elem));
}

// Exact shape and C-contiguous layout (strides of size-1 dimensions are irrelevant).
inline void expect_shape(const View& v, const std::vector<int64_t>& shape) {
  if (v.shape != shape)
    fail(std::string(v.name) + " must have shape " + shape_str(shape) + ", got " +
         shape_str(v.shape));
  int64_t expected = 1;
  for (int64_t i = v.dim() - 1; i >= 0; --i) {
    if (v.shape[i] > 1 && v.stride[i] != expected)
      fail(std::string(v.name) + " must be contiguous");
    expected = checked_mul(expected, v.shape[i], v.name);
  }
}

inline void expect(const View& v, Elem e, const std::vector<int64_t>& shape) {
  expect_elem(v, e);
  expect_shape(v, shape);
}

// All views on the device the module runs on (the first view's device for CUDA).
class DeviceCheck {
 public:
  explicit DeviceCheck(Device device) : device_(device) {}
  void operator()(const View& v) {
    if (!v.present) return;
    if (v.device != device_)
      fail(std::string(v.name) + (device_ == Device::CPU ? " must be a CPU tensor"
                                                         : " must be a CUDA tensor"));
    if (index_ < 0) {
      index_ = v.device_index;
    } else if (v.device_index != index_) {
      fail(std::string(v.name) + " is on another device than x");
    }
  }

 private:
  Device device_;
  int64_t index_ = -1;
};

// X: 2-D float32/float16/bfloat16, rows of contiguous elements.
inline Matrix activations(const View& x) {
  if (x.elem != Elem::F32 && x.elem != Elem::F16 && x.elem != Elem::BF16)
    throw py::type_error(std::string(x.name) + " must be float32, float16 or bfloat16, got " +
                         elem_name(x.elem));
  if (x.dim() != 2) fail(std::string(x.name) + " must be 2-D (N, D)");
  const int64_t n = x.shape[0], d = x.shape[1];
  if (d < 1) fail(std::string(x.name) + " has D = 0 columns");
  if (d > 1 && n > 0 && x.stride[1] != 1)
    fail(std::string(x.name) + " must have contiguous rows (stride 1 along D)");
  // One row needs no row stride; otherwise rows must not overlap.
  const int64_t row_stride = n > 1 ? x.stride[0] : d;
  if (row_stride < d) fail(std::string(x.name) + " has a row stride below D (overlapping rows)");
  checked_mul(checked_mul(n, row_stride, x.name), elem_size(x.elem), x.name);
  return Matrix{reinterpret_cast<const void*>(x.data), static_cast<DType>(x.elem), n, d,
                row_stride};
}

// Indices are int32 inside the kernels.
inline void check_k(int64_t k, const char* name = "centroids") {
  if (k < 1) fail(std::string(name) + " has K = 0 rows; at least one is needed");
  if (k > 0x7fffffff) fail(std::string(name) + " has K >= 2^31 rows");
}

// Threads of an OpenMP region: a positive count the runtime can create.
constexpr int64_t kMaxThreads = 4096;
inline int check_threads(int64_t num_threads) {
  if (num_threads < 1 || num_threads > kMaxThreads)
    fail("num_threads must be in [1, " + std::to_string(kMaxThreads) + "], got " +
         std::to_string(num_threads));
  return static_cast<int>(num_threads);
}

// CPU only: every value finite (parameters the kernels use as given).
template <typename T>
void expect_finite(const View& v) {
  if (!v.present) return;
  const T* p = v.ptr<const T>();
  const int64_t n = v.numel();
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) fail(std::string(v.name) + " contains NaN or Inf");
}

// CPU only: every index in [0, limit).
inline void expect_indices(const View& v, int64_t limit) {
  const int64_t* p = v.ptr<const int64_t>();
  const int64_t n = v.numel();
  for (int64_t i = 0; i < n; ++i)
    if (p[i] < 0 || p[i] >= limit)
      fail(std::string(v.name) + " has values outside [0, " + std::to_string(limit) + ")");
}

}  // namespace bind
}  // namespace pyconcepts
