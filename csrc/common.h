// Shared, torch-free definitions for every native op.
#pragma once
#include <cstdint>

namespace pyconcepts {

// Element type of the activation matrix X. Values match pyconcepts/ops.py.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// A row-major activation matrix: N rows of D elements, row i at data + i * row_stride
// elements; elements within a row are contiguous.
struct Matrix {
  const void* data;
  DType dtype;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
};

// Counters for bad input found while reading X, written by every op (never a crash):
// [0] rows holding NaN or Inf, [1] cluster indices outside [0, K).
constexpr int kBadSlots = 2;

}  // namespace pyconcepts
