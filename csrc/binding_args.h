// Argument conversion shared by the pybind11 modules _C and _C_cuda: raw addresses (from
// tensor.data_ptr()) and sizes become typed pointers and a Matrix, with the checks that keep
// a malformed call from reaching a kernel (pyconcepts/ops.py validates tensors before this).
#pragma once
#include <cstdint>
#include <stdexcept>

#include "common.h"

namespace pyconcepts {
namespace bind {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline Matrix matrix(uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0, 1 or 2");
  if (rows < 0 || cols < 1 || row_stride < cols)
    throw std::invalid_argument("invalid matrix shape or row stride");
  if (rows > 0 && data == 0) throw std::invalid_argument("null data pointer");
  return Matrix{ptr<const void>(data), static_cast<DType>(dtype), rows, cols, row_stride};
}

// Indices are int32 inside the kernels.
inline void check_k(int64_t k) {
  if (k < 1) throw std::invalid_argument("K must be at least 1");
  if (k > 0x7fffffff) throw std::invalid_argument("K must be below 2^31");
}

}  // namespace bind
}  // namespace pyconcepts
