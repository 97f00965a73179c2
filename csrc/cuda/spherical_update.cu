// spherical_update on CUDA: sort by cluster, then segmented reductions.
//  1. Each row's cluster becomes a 32-bit sort key (out-of-range indices get the key K, which
//     sorts last and is skipped) with the row number as the value.
//  2. cub::DeviceRadixSort over only the bits K needs.
//  3. Counts from segment ends (no atomics), and per-cluster sums by CTAs that each walk a
//     fixed piece of the sorted order and a slice of columns, summing in float64 registers.
//     A CTA writes to global memory only when its cluster changes and at its piece's end, so
//     each output element receives about (members / piece + 1) float64 adds: no contention.
// Rows are processed in chunks of at most 2^26 so the 32-bit row numbers and the sort's
// scratch stay bounded for any N.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>

#include "cuda/cuda_common.cuh"
#include "spherical_update.h"

namespace pyconcepts {

namespace {

constexpr int64_t kChunkRows = int64_t{1} << 26;
constexpr int kKeyThreads = 256;
constexpr int kSumThreads = 128;
constexpr int kColsPerThread = 4;
constexpr int kSliceCols = kSumThreads * kColsPerThread;  // columns per CTA
constexpr int kPiece = 1024;                              // sorted rows per CTA
constexpr int kUnroll = 8;                                // rows in flight per thread

__global__ void make_keys_kernel(const int64_t* __restrict__ index, int64_t rows, int64_t k,
                                 int32_t* __restrict__ keys, int32_t* __restrict__ vals,
                                 int64_t* bad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  bool invalid = false;
  if (i < rows) {
    const int64_t c = index[i];
    invalid = c < 0 || c >= k;
    keys[i] = static_cast<int32_t>(invalid ? k : c);
    vals[i] = static_cast<int32_t>(i);
  }
  const int block_invalid = __syncthreads_count(invalid);
  if (threadIdx.x == 0) cuda::count_bad(bad, 1, static_cast<unsigned long long>(block_invalid));
}

// At the last sorted position of each cluster: counts[key] += its segment length.
__global__ void segment_counts_kernel(const int32_t* __restrict__ keys, int64_t rows, int64_t k,
                                      int64_t* counts) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= rows) return;
  const int32_t key = keys[p];
  if (key >= k || (p + 1 < rows && keys[p + 1] == key)) return;
  int64_t lo = 0, hi = p;  // first position holding key
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < key) lo = mid + 1; else hi = mid;
  }
  counts[key] += p + 1 - lo;  // one writer per cluster per chunk; chunks run in stream order
}

template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    segmented_sums_kernel(const T* __restrict__ x, int64_t d, int64_t ld, int64_t row_base,
                          const int32_t* __restrict__ keys, const int32_t* __restrict__ vals,
                          int64_t rows, int64_t k, double* sums, int64_t* bad) {
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kPiece;
  const int64_t p1 = min(rows, p0 + kPiece);
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kSliceCols + threadIdx.x;

  double acc[kColsPerThread];
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) acc[j] = 0.0;
  int32_t current = -1;
  unsigned nonfinite_rows = 0;

  auto flush = [&]() {
    if (current >= 0) {
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int64_t col = col0 + j * kSumThreads;
        if (col < d) atomicAdd(sums + current * d + col, acc[j]);
        acc[j] = 0.0;
      }
    }
  };

  for (int64_t p = p0; p < p1; p += kUnroll) {
    int32_t key[kUnroll];
    float v[kUnroll][kColsPerThread];
    // All loads of the batch first, so kUnroll rows are in flight at once.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      key[u] = (p + u < p1) ? __ldg(keys + p + u) : static_cast<int32_t>(k);
      const int64_t row = row_base + ((key[u] < k) ? __ldg(vals + p + u) : 0);
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int64_t col = col0 + j * kSumThreads;
        v[u][j] = (key[u] < k && col < d) ? cuda::to_float(x[row * ld + col]) : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (key[u] >= k) continue;  // out-of-range rows sort last; nothing to add
      if (key[u] != current) {
        flush();
        current = key[u];
      }
      float flag = 0.0f;
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        acc[j] += static_cast<double>(v[u][j]);
        flag += cuda::nonfinite_term(v[u][j]);
      }
      nonfinite_rows += !(flag == 0.0f);
    }
  }
  flush();

  // Rows with NaN/Inf, as seen by this CTA's most affected thread: non-zero exactly when
  // the CTA met one (a lower bound on the count, as on the CPU).
  __shared__ unsigned block_max;
  if (threadIdx.x == 0) block_max = 0;
  __syncthreads();
  if (nonfinite_rows) atomicMax(&block_max, nonfinite_rows);
  __syncthreads();
  if (threadIdx.x == 0) cuda::count_bad(bad, 0, block_max);
}

int end_bit_for(int64_t k) {  // bits needed for keys in [0, k]
  int bits = 1;
  while ((int64_t{1} << bits) <= k) ++bits;
  return bits;
}

template <typename T>
void launch_sums(const Matrix& x, int64_t row_base, const int32_t* keys, const int32_t* vals,
                 int64_t rows, int64_t k, double* sums, int64_t* bad, cudaStream_t stream) {
  const dim3 grid(cuda::grid_blocks(rows, kPiece, "spherical_update"),
                  cuda::grid_blocks(x.cols, kSliceCols, "spherical_update"));
  segmented_sums_kernel<T><<<grid, kSumThreads, 0, stream>>>(
      static_cast<const T*>(x.data), x.cols, x.row_stride, row_base, keys, vals, rows, k, sums,
      bad);
  cuda::check_launch("segmented_sums_kernel");
}

}  // namespace

void spherical_update_cuda(const Matrix& x, const int64_t* index, int64_t k, double* sums,
                           int64_t* counts, int64_t* bad, void* stream_handle) {
  const cuda::DeviceGuard device(x.rows > 0 ? x.data : nullptr);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t n = x.rows, d = x.cols;
  cuda::check(cudaMemsetAsync(bad, 0, kBadSlots * sizeof(int64_t), stream), "cudaMemsetAsync");
  cuda::check(cudaMemsetAsync(sums, 0, static_cast<size_t>(k * d) * sizeof(double), stream),
              "cudaMemsetAsync");
  cuda::check(cudaMemsetAsync(counts, 0, static_cast<size_t>(k) * sizeof(int64_t), stream),
              "cudaMemsetAsync");
  if (n == 0) return;
  if (k >= 0x7fffffff) throw std::invalid_argument("spherical_update: K too large");

  const int64_t chunk = std::min(n, kChunkRows);
  const int end_bit = end_bit_for(k);
  size_t sort_bytes = 0;
  cuda::check(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr),
                                              static_cast<int>(chunk), 0, end_bit, stream),
              "cub::DeviceRadixSort (size query)");
  // keys in/out and values in/out, then the sort's own scratch (256-byte aligned).
  const size_t arrays = static_cast<size_t>(chunk) * sizeof(int32_t);
  const size_t arrays_padded = (arrays + 255) / 256 * 256;
  cuda::Workspace ws(4 * arrays_padded + sort_bytes, stream);
  char* base = ws.as<char>();
  int32_t* keys_in = reinterpret_cast<int32_t*>(base);
  int32_t* keys_out = reinterpret_cast<int32_t*>(base + arrays_padded);
  int32_t* vals_in = reinterpret_cast<int32_t*>(base + 2 * arrays_padded);
  int32_t* vals_out = reinterpret_cast<int32_t*>(base + 3 * arrays_padded);
  void* sort_scratch = base + 4 * arrays_padded;

  for (int64_t row_base = 0; row_base < n; row_base += chunk) {
    const int64_t rows = std::min(chunk, n - row_base);
    make_keys_kernel<<<cuda::grid_blocks(rows, kKeyThreads, "spherical_update"), kKeyThreads, 0,
                       stream>>>(index + row_base, rows, k, keys_in, vals_in, bad);
    cuda::check_launch("make_keys_kernel");
    size_t bytes = sort_bytes;
    cuda::check(cub::DeviceRadixSort::SortPairs(sort_scratch, bytes, keys_in, keys_out, vals_in,
                                                vals_out, static_cast<int>(rows), 0, end_bit,
                                                stream),
                "cub::DeviceRadixSort");
    segment_counts_kernel<<<cuda::grid_blocks(rows, kKeyThreads, "spherical_update"),
                            kKeyThreads, 0, stream>>>(keys_out, rows, k, counts);
    cuda::check_launch("segment_counts_kernel");
    switch (x.dtype) {
      case DType::F32:
        launch_sums<float>(x, row_base, keys_out, vals_out, rows, k, sums, bad, stream);
        break;
      case DType::F16:
        launch_sums<__half>(x, row_base, keys_out, vals_out, rows, k, sums, bad, stream);
        break;
      case DType::BF16:
        launch_sums<__nv_bfloat16>(x, row_base, keys_out, vals_out, rows, k, sums, bad, stream);
        break;
    }
  }
}

}  // namespace pyconcepts
