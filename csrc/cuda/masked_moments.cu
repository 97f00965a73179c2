// masked_moments on CUDA, per chunk of rows (exact fp32 products on the CUDA cores, no TF32):
//   1. thresholds: w.x > b  <=>  w.(x - c) > b - w.c  (w.c in float64), as on the CPU.
//   2. moments_z_kernel: Zc = Xc W^T tile by tile (Xc = X - center, centred on load), the
//      mask Zc > threshold, A = [M, M*Zc] (rows x 2K) into a workspace, and per concept the
//      count, sum zc and sum zc^2 accumulated in float64 registers over many row tiles.
//   3. moments_gemm_kernel: A^T Xc (2K x D), fp32 over blocks of 256 rows, each block merged
//      into float64 registers; one float64 atomic add per output element per row split.
// The chunk bounds the workspace (at most 256 MiB) for any N.
#include <algorithm>

#include "cuda/cuda_common.cuh"
#include "masked_moments.h"

namespace pyconcepts {

namespace {

constexpr int kThreads = cuda::kSimtThreads;  // 256 = 16 x 16
constexpr int kTile = cuda::kSimtTile;        // 64
constexpr int kStep = 16;                     // rows per shared-memory stage in the moment GEMM
constexpr int kFlushSteps = 16;               // fp32 partials span 16 x 16 = 256 rows
constexpr int64_t kWorkspaceFloats = int64_t{1} << 26;

__global__ void thresholds_kernel(const float* __restrict__ w, const float* __restrict__ b,
                                  const float* __restrict__ center, int64_t k, int64_t d,
                                  float* __restrict__ thr) {
  const int64_t c = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (c >= k) return;  // whole warps leave together
  double s = 0.0;
  if (center) {
    for (int64_t p = lane; p < d; p += 32) s += static_cast<double>(w[c * d + p]) * center[p];
  }
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  if (lane == 0) thr[c] = static_cast<float>(static_cast<double>(b[c]) - s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    moments_z_kernel(const T* __restrict__ x, int64_t rows, int64_t d, int64_t ld,
                     const float* __restrict__ center, const float* __restrict__ w, int64_t k,
                     const float* __restrict__ thr, float* __restrict__ amat, int64_t* count,
                     double* sum_z, double* sum_z2, int64_t* bad) {
  __shared__ cuda::SimtSmem sm;
  __shared__ float rowsq[kTile], rowflag[kTile];
  __shared__ unsigned red_count[kThreads / 32][kTile];
  __shared__ double red_z[kThreads / 32][kTile], red_z2[kThreads / 32][kTile];

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t rowtiles = (rows + kTile - 1) / kTile;
  const bool first_col_tile = blockIdx.y == 0;  // counts non-finite rows once

  float col_thr[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t col = col0 + tx + 16 * j;
    col_thr[j] = col < k ? thr[col] : INFINITY;
  }
  unsigned cnt[4] = {0u, 0u, 0u, 0u};
  double sz[4] = {0.0, 0.0, 0.0, 0.0}, sz2[4] = {0.0, 0.0, 0.0, 0.0};
  unsigned nonfinite = 0;

  for (int64_t rt = blockIdx.x; rt < rowtiles; rt += gridDim.x) {
    const int64_t row0 = rt * kTile;
    float acc[4][4];
    cuda::simt_tile(x, rows, d, ld, center, row0, w, k, col0, sm, acc, first_col_tile, rowsq,
                    rowflag);
    if (first_col_tile && tid < kTile && row0 + tid < rows && !(rowflag[tid] == 0.0f))
      ++nonfinite;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + ty + 16 * i;
      if (row >= rows) continue;
      float* arow = amat + row * 2 * k;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = col0 + tx + 16 * j;
        if (col >= k) continue;
        const float zc = acc[i][j];
        const bool on = zc > col_thr[j];
        arow[col] = on ? 1.0f : 0.0f;
        arow[k + col] = on ? zc : 0.0f;
        if (on) {
          ++cnt[j];
          sz[j] += zc;
          sz2[j] += static_cast<double>(zc) * zc;
        }
      }
    }
  }
  if (nonfinite) cuda::count_bad(bad, 0, nonfinite);

  // Reduce over the 16 row groups: lanes tx and tx + 16 of a warp, then the 8 warps.
  const int warp = tid >> 5;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    cnt[j] += __shfl_xor_sync(0xffffffffu, cnt[j], 16);
    sz[j] += __shfl_xor_sync(0xffffffffu, sz[j], 16);
    sz2[j] += __shfl_xor_sync(0xffffffffu, sz2[j], 16);
    if ((tid & 16) == 0) {
      red_count[warp][tx + 16 * j] = cnt[j];
      red_z[warp][tx + 16 * j] = sz[j];
      red_z2[warp][tx + 16 * j] = sz2[j];
    }
  }
  __syncthreads();
  if (tid < kTile && col0 + tid < k) {
    unsigned long long c = 0;
    double a = 0.0, a2 = 0.0;
    for (int wv = 0; wv < kThreads / 32; ++wv) {
      c += red_count[wv][tid];
      a += red_z[wv][tid];
      a2 += red_z2[wv][tid];
    }
    const int64_t col = col0 + tid;
    if (c) atomicAdd(reinterpret_cast<unsigned long long*>(count + col), c);
    atomicAdd(sum_z + col, a);
    atomicAdd(sum_z2 + col, a2);
  }
}

// out[j][c] += sum_r A[r][j] * Xc[r][c] for j < 2K (j < K: sum_x, else sum_xz), c < D.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    moments_gemm_kernel(const T* __restrict__ x, int64_t rows, int64_t d, int64_t ld,
                        const float* __restrict__ center, const float* __restrict__ amat,
                        int64_t k, int64_t rows_per_split, double* sum_x, double* sum_xz) {
  __shared__ float as[kStep][kTile + 4];
  __shared__ float xs[kStep][kTile + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int lr = tid >> 4, lc = (tid & 15) * 4;  // loader: row lr of the stage, 4 columns
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t r_end = min(rows, r_begin + rows_per_split);
  const int64_t two_k = 2 * k;

  float av[4], xv[4];
  auto fetch = [&](int64_t r) {
    const int64_t row = r + lr;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = j0 + lc + e, col = c0 + lc + e;
      av[e] = (row < r_end && j < two_k) ? amat[row * two_k + j] : 0.0f;
      xv[e] = (row < r_end && col < d)
                  ? cuda::to_float(x[row * ld + col]) - (center ? center[col] : 0.0f)
                  : 0.0f;
    }
  };

  float acc[4][4];
  double total[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc[i][j] = 0.0f;
      total[i][j] = 0.0;
    }

  int steps = 0;
  if (r_begin < r_end) fetch(r_begin);
  for (int64_t r = r_begin; r < r_end; r += kStep) {
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      as[lr][lc + e] = av[e];
      xs[lr][lc + e] = xv[e];
    }
    __syncthreads();
    if (r + kStep < r_end) fetch(r + kStep);
#pragma unroll
    for (int kk = 0; kk < kStep; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = xs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    if (++steps == kFlushSteps) {
      steps = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          total[i][j] += acc[i][j];
          acc[i][j] = 0.0f;
        }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t jj = j0 + ty + 16 * i;
    if (jj >= two_k) continue;
    double* out = jj < k ? sum_x + jj * d : sum_xz + (jj - k) * d;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = c0 + tx + 16 * j;
      if (col < d) atomicAdd(out + col, total[i][j] + acc[i][j]);
    }
  }
}

}  // namespace

void masked_moments_cuda(const Matrix& x, const float* w, const float* b, const float* center,
                         int64_t k, int64_t* count, double* sum_z, double* sum_z2,
                         double* sum_x, double* sum_xz, int64_t* bad, void* stream_handle) {
  const cuda::DeviceGuard device(x.rows > 0 ? x.data : nullptr);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t n = x.rows, d = x.cols;
  auto zero = [&](void* p, size_t bytes) {
    cuda::check(cudaMemsetAsync(p, 0, bytes, stream), "cudaMemsetAsync");
  };
  zero(bad, kBadSlots * sizeof(int64_t));
  zero(count, static_cast<size_t>(k) * sizeof(int64_t));
  zero(sum_z, static_cast<size_t>(k) * sizeof(double));
  zero(sum_z2, static_cast<size_t>(k) * sizeof(double));
  zero(sum_x, static_cast<size_t>(k * d) * sizeof(double));
  zero(sum_xz, static_cast<size_t>(k * d) * sizeof(double));
  if (n == 0) return;

  const int64_t chunk = std::min(n, std::max<int64_t>(kTile, kWorkspaceFloats / (2 * k)));
  const size_t thr_bytes = (static_cast<size_t>(k) * sizeof(float) + 255) / 256 * 256;
  cuda::Workspace ws(thr_bytes + static_cast<size_t>(chunk * 2 * k) * sizeof(float), stream);
  float* thr = ws.as<float>();
  float* amat = reinterpret_cast<float*>(ws.as<char>() + thr_bytes);

  thresholds_kernel<<<cuda::grid_blocks(k * 32, 256, "masked_moments"), 256, 0, stream>>>(
      w, b, center, k, d, thr);
  cuda::check_launch("thresholds_kernel");

  const int64_t ktiles = (k + kTile - 1) / kTile;
  const int64_t gemm_tiles = ((2 * k + kTile - 1) / kTile) * ((d + kTile - 1) / kTile);
  for (int64_t row_base = 0; row_base < n; row_base += chunk) {
    const int64_t rows = std::min(chunk, n - row_base);
    const int64_t rowtiles = (rows + kTile - 1) / kTile;
    // Enough CTAs to fill the GPU; each loops over row tiles so the float64 statistics
    // take at most ~2048 / ktiles atomic adds per concept per chunk.
    const dim3 zgrid(static_cast<unsigned>(std::min<int64_t>(
                         rowtiles, std::max<int64_t>(1, 2048 / ktiles))),
                     cuda::grid_blocks(k, kTile, "masked_moments"));
    const int64_t splits = std::max<int64_t>(
        1, std::min<int64_t>((1024 + gemm_tiles - 1) / gemm_tiles, (rows + 255) / 256));
    const int64_t rows_per_split = ((rows + splits - 1) / splits + kStep - 1) / kStep * kStep;
    const dim3 ggrid(cuda::grid_blocks(2 * k, kTile, "masked_moments"),
                     cuda::grid_blocks(d, kTile, "masked_moments"),
                     cuda::grid_blocks(rows, rows_per_split, "masked_moments"));
    if (ggrid.z > 65535) throw std::invalid_argument("masked_moments: too many row splits");
    auto launch = [&](auto tag) {
      using T = decltype(tag);
      const T* xc = static_cast<const T*>(x.data) + row_base * x.row_stride;
      moments_z_kernel<T><<<zgrid, kThreads, 0, stream>>>(xc, rows, d, x.row_stride, center, w,
                                                          k, thr, amat, count, sum_z, sum_z2,
                                                          bad);
      cuda::check_launch("moments_z_kernel");
      moments_gemm_kernel<T><<<ggrid, kThreads, 0, stream>>>(
          xc, rows, d, x.row_stride, center, amat, k, rows_per_split, sum_x, sum_xz);
      cuda::check_launch("moments_gemm_kernel");
    };
    switch (x.dtype) {
      case DType::F32: launch(float{}); break;
      case DType::F16: launch(__half{}); break;
      case DType::BF16: launch(__nv_bfloat16{}); break;
    }
  }
}

}  // namespace pyconcepts
