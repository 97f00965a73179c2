// Shared helpers of the CUDA kernels: error checks, element conversion, stream-ordered
// workspace, the running top-2 of cosine_assign and a small fp32 SIMT GEMM tile.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

namespace pyconcepts {
namespace cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    // Clear a sticky-free error so the next call does not report it again.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("pyconcepts CUDA: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Launch errors (bad configuration, missing kernel image) show up here; execution errors
// surface at the caller's next synchronisation, as for any asynchronous CUDA op.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Scratch memory ordered on the op's stream: allocated and freed asynchronously, so the op
// never synchronises; the free is ordered after every kernel already queued on the stream.
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) check(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync");
  }
  ~Workspace() {
    if (ptr_) (void)cudaFreeAsync(ptr_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Makes the device holding `data` current for the op and restores the previous device after.
// This module links its own (static) CUDA runtime, whose current device is not torch's; the
// pointer's device is the one that matters (torch's stream belongs to it).
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* data) {
    if (!data) return;
    cudaPointerAttributes attr{};
    check(cudaPointerGetAttributes(&attr, data), "cudaPointerGetAttributes");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      throw std::invalid_argument("pyconcepts CUDA: x is not in device memory");
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (attr.device != previous_) {
      check(cudaSetDevice(attr.device), "cudaSetDevice");
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v - v is 0 for finite v and NaN for NaN/Inf: summing it flags a non-finite row with one
// add per element and no branch.
__device__ __forceinline__ float nonfinite_term(float v) { return v - v; }

__device__ __forceinline__ void count_bad(int64_t* bad, int slot, unsigned long long n) {
  if (n) atomicAdd(reinterpret_cast<unsigned long long*>(bad + slot), n);
}

// Running best / second best of one row over columns visited in increasing order.
struct Top2 {
  float best;
  float second;
  int index;

  __device__ __forceinline__ void init() {
    best = -INFINITY;
    second = -INFINITY;
    index = 0;
  }
  // Columns arrive in increasing order: a tie keeps the earlier (lower) index.
  __device__ __forceinline__ void push(float v, int col) {
    if (v > best) {
      second = best;
      best = v;
      index = col;
    } else if (v > second) {
      second = v;
    }
  }
  // Merge with a state over another set of columns; ties go to the lower index.
  __device__ __forceinline__ void merge(float o_best, float o_second, int o_index) {
    const bool other_wins = o_best > best || (o_best == best && o_index < index);
    const float loser = other_wins ? best : o_best;
    if (other_wins) {
      best = o_best;
      index = o_index;
    }
    second = fmaxf(fmaxf(second, o_second), loser);
  }
  // Merge with the state held by lane (lane ^ mask) of the same warp.
  __device__ __forceinline__ void merge_lane(int mask) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, mask);
    const float os = __shfl_xor_sync(0xffffffffu, second, mask);
    const int oi = __shfl_xor_sync(0xffffffffu, index, mask);
    merge(ob, os, oi);
  }
};

// ---------------------------------------------------------------------------------------
// fp32 SIMT tile: acc[i][j] = sum_p X[row0 + ty + 16 i][p] * W[col0 + tx + 16 j][p] over all
// D columns, for a 64 x 64 output tile computed by 256 threads (ty = tid / 16, tx = tid % 16).
// X is any input type (converted to fp32 on load, exact; minus center[p] when center is not
// null), W is K x D fp32 contiguous.
// Every product is an fp32 FMA in increasing p order: no tensor cores, no TF32.
// When track_rows is set, each thread also accumulates the squared norm and the
// non-finite flag of row (tid / 4) over the columns it loads; rowsq_out / rowflag_out
// receive the totals of the tile's 64 rows (shared memory, valid after the call).
constexpr int kSimtTile = 64;
constexpr int kSimtK = 16;
constexpr int kSimtThreads = 256;

struct SimtSmem {
  float xs[kSimtK][kSimtTile + 4];
  float ws[kSimtK][kSimtTile + 4];
};

template <typename T>
__device__ __forceinline__ void simt_load(const T* __restrict__ x, int64_t n, int64_t d,
                                          int64_t ld, const float* __restrict__ center,
                                          int64_t row0, const float* __restrict__ w,
                                          int64_t k, int64_t col0, int64_t p0, float xv[4],
                                          float wv[4]) {
  const int tid = threadIdx.x;
  const int r = tid >> 2;
  const int c = (tid & 3) * 4;
  const int64_t xrow = row0 + r;
  const int64_t wrow = col0 + r;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t p = p0 + c + e;
    xv[e] = (xrow < n && p < d) ? to_float(x[xrow * ld + p]) - (center ? center[p] : 0.0f)
                                : 0.0f;
    wv[e] = (wrow < k && p < d) ? w[wrow * d + p] : 0.0f;
  }
}

template <typename T>
__device__ void simt_tile(const T* __restrict__ x, int64_t n, int64_t d, int64_t ld,
                          const float* __restrict__ center, int64_t row0, const float* __restrict__ w, int64_t k, int64_t col0,
                          SimtSmem& sm, float acc[4][4], bool track_rows, float* rowsq_out,
                          float* rowflag_out) {
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int lr = tid >> 2, lc = (tid & 3) * 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  float sq = 0.0f, flag = 0.0f;
  float xv[4], wv[4];
  simt_load(x, n, d, ld, center, row0, w, k, col0, 0, xv, wv);
  for (int64_t p0 = 0; p0 < d; p0 += kSimtK) {
    __syncthreads();  // the previous step's reads of sm are done
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sm.xs[lc + e][lr] = xv[e];
      sm.ws[lc + e][lr] = wv[e];
      if (track_rows) {
        sq = fmaf(xv[e], xv[e], sq);
        flag += nonfinite_term(xv[e]);
      }
    }
    __syncthreads();
    if (p0 + kSimtK < d) simt_load(x, n, d, ld, center, row0, w, k, col0, p0 + kSimtK, xv, wv);
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sm.xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sm.ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  if (track_rows) {
    // The four threads of a row are consecutive lanes.
    sq += __shfl_xor_sync(0xffffffffu, sq, 1);
    sq += __shfl_xor_sync(0xffffffffu, sq, 2);
    flag += __shfl_xor_sync(0xffffffffu, flag, 1);
    flag += __shfl_xor_sync(0xffffffffu, flag, 2);
    if ((tid & 3) == 0) {
      rowsq_out[lr] = sq;
      rowflag_out[lr] = flag;
    }
  }
  __syncthreads();  // rowsq/rowflag visible; sm free for the caller
}

inline unsigned grid_blocks(int64_t work, int64_t per_block, const char* what) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks > 0x7fffffff) throw std::invalid_argument(std::string(what) + ": input too large");
  return static_cast<unsigned>(blocks);
}

}  // namespace cuda
}  // namespace pyconcepts
