// cosine_assign on CUDA: a GEMM of X against the centroids with a running top-2 epilogue in
// registers; the N x K score matrix never leaves the chip.
//  - fp16 / bf16 X: tensor cores (mma.sync m16n8k16, fp32 accumulation). The centroids are
//    rounded once to X's type into a zero-padded workspace (the products then carry the
//    rounding of both operands, as torch.mm in that type would). Row norms come from the
//    same staged tiles, in fp32.
//  - fp32 X: fp32 FMA on the CUDA cores (no TF32), so the scores match an fp32 CPU GEMM.
#include "cosine_assign.h"
#include "cuda/cuda_common.cuh"

namespace pyconcepts {

namespace {

using cuda::Top2;

// ------------------------------------------------------------------ shared finalisation
// Writes one row's outputs from its merged top-2, its squared norm and non-finite flag.
__device__ __forceinline__ void write_row(const Top2& st, float sq, float flag, int64_t row,
                                          int64_t* index, float* best, float* second,
                                          int64_t* bad) {
  if (!(flag == 0.0f)) {  // NaN flag: the row holds NaN or Inf
    index[row] = 0;
    best[row] = NAN;
    if (second) second[row] = NAN;
    cuda::count_bad(bad, 0, 1);
    return;
  }
  // Cosine = dot / ||x||; a zero row has all dots 0 and keeps cosine 0 (index 0).
  const float inv = 1.0f / fmaxf(sqrtf(sq), 1e-12f);
  index[row] = st.index;
  best[row] = st.best * inv;
  if (second) second[row] = st.second == -INFINITY ? -INFINITY : st.second * inv;
}

// ------------------------------------------------------------------ fp32 SIMT kernel
template <typename T>
__global__ void __launch_bounds__(cuda::kSimtThreads)
    cosine_assign_simt_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ld,
                              const float* __restrict__ c, int64_t k, int64_t* index,
                              float* best, float* second, int64_t* bad) {
  __shared__ cuda::SimtSmem sm;
  __shared__ float rowsq[cuda::kSimtTile], rowflag[cuda::kSimtTile];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * cuda::kSimtTile;

  Top2 st[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) st[i].init();
  for (int64_t col0 = 0; col0 < k; col0 += cuda::kSimtTile) {
    float acc[4][4];
    cuda::simt_tile(x, n, d, ld, nullptr, row0, c, k, col0, sm, acc, col0 == 0, rowsq, rowflag);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // increasing column order within the thread
      const int64_t col = col0 + tx + 16 * j;
      if (col < k) {
#pragma unroll
        for (int i = 0; i < 4; ++i) st[i].push(acc[i][j], static_cast<int>(col));
      }
    }
  }
  // The 16 threads sharing a row are lanes differing in their low 4 bits.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int mask = 1; mask < 16; mask <<= 1) st[i].merge_lane(mask);
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      const int64_t row = row0 + r;
      if (row < n) write_row(st[i], rowsq[r], rowflag[r], row, index, best, second, bad);
    }
  }
}

// ------------------------------------------------------------------ tensor-core kernel
constexpr int kBM = 128;           // rows of X per CTA
constexpr int kBN = 128;           // centroids per pass
constexpr int kBK = 32;            // columns per stage
constexpr int kSK = kBK + 8;       // padded smem row (80 B): conflict-free fragment loads
constexpr int kMmaThreads = 256;   // 8 warps: 4 along rows (32 each) x 2 along centroids (64)

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4],
                                             const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4],
                                             const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// Rounds the fp32 centroids to T into a kp x dp zero-padded matrix (no bounds checks later).
template <typename T>
__global__ void pack_centroids_kernel(const float* __restrict__ c, int64_t k, int64_t d,
                                      T* __restrict__ out, int64_t kp, int64_t dp) {
  const int64_t total = kp * dp;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dp, p = i % dp;
    out[i] = cuda::from_float<T>(r < k && p < d ? c[r * d + p] : 0.0f);
  }
}

// Eight consecutive elements of row `row` from column `col`, as raw 16-bit words packed in a
// uint4; zeros past the last row or column. kAligned: X's base and row stride allow 16-byte
// loads (checked on the host); otherwise, and at the row's tail, element loads.
template <bool kAligned>
__device__ __forceinline__ uint4 load8(const uint16_t* __restrict__ x, int64_t n, int64_t d,
                                       int64_t ld, int64_t row, int64_t col) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (row >= n) return v;
  const uint16_t* src = x + row * ld + col;
  if (kAligned && col + 8 <= d) return __ldg(reinterpret_cast<const uint4*>(src));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const uint32_t h = (col + e < d) ? static_cast<uint32_t>(__ldg(src + e)) : 0u;
    w[e >> 1] |= h << (16 * (e & 1));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ __forceinline__ float half_bits_to_float(uint32_t bits16);
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}
template <>
__device__ __forceinline__ float half_bits_to_float<__half>(uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

template <typename T>
__device__ __forceinline__ void accumulate_norm(const uint4& v, float& sq, float& flag) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float f = half_bits_to_float<T>((w[e >> 1] >> (16 * (e & 1))) & 0xffffu);
    sq = fmaf(f, f, sq);
    flag += cuda::nonfinite_term(f);
  }
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kMmaThreads, 2)
    cosine_assign_mma_kernel(const uint16_t* __restrict__ x, int64_t n, int64_t d, int64_t ld,
                             const uint16_t* __restrict__ cw, int64_t k, int64_t kp, int64_t dp,
                             int64_t* index, float* best, float* second, int64_t* bad) {
  __shared__ __align__(16) uint16_t xs[2][kBM][kSK];
  __shared__ __align__(16) uint16_t cs[2][kBN][kSK];
  __shared__ float rowsq[kBM], rowflag[kBM];
  __shared__ float red_best[2][kBM], red_second[2][kBM];
  __shared__ int red_index[2][kBM];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int warp_m = warp & 3, warp_n = warp >> 2;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  // Loader: thread tid moves 8-element segments (row lrow + 64 i, column lcol), i = 0, 1.
  const int lrow = tid >> 2, lcol = (tid & 3) * 8;

  float sq[2] = {0.0f, 0.0f}, flag[2] = {0.0f, 0.0f};
  Top2 st[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    st[mt][0].init();
    st[mt][1].init();
  }

  const int64_t ktiles = kp / kBN, chunks = dp / kBK;
  uint4 xr[2], cr[2];
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const bool first_pass = kt == 0;
    const uint16_t* ctile = cw + kt * kBN * dp;
    auto fetch = [&](int64_t p0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        xr[i] = load8<kAligned>(x, n, d, ld, row0 + lrow + 64 * i, p0 + lcol);
        cr[i] = __ldg(reinterpret_cast<const uint4*>(ctile + (lrow + 64 * i) * dp + p0 + lcol));
        if (first_pass) accumulate_norm<T>(xr[i], sq[i], flag[i]);
      }
    };
    auto stash = [&](int buf) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        *reinterpret_cast<uint4*>(&xs[buf][lrow + 64 * i][lcol]) = xr[i];
        *reinterpret_cast<uint4*>(&cs[buf][lrow + 64 * i][lcol]) = cr[i];
      }
    };

    float acc[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

    fetch(0);
    stash(0);
    __syncthreads();
    for (int64_t c = 0; c < chunks; ++c) {
      const int buf = static_cast<int>(c & 1);
      const bool more = c + 1 < chunks;
      if (more) fetch((c + 1) * kBK);  // in flight while the tensor cores work
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 16) {
        uint32_t a[2][4], b[8][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int r = warp_m * 32 + mt * 16 + g;
          a[mt][0] = *reinterpret_cast<const uint32_t*>(&xs[buf][r][ks + tig * 2]);
          a[mt][1] = *reinterpret_cast<const uint32_t*>(&xs[buf][r + 8][ks + tig * 2]);
          a[mt][2] = *reinterpret_cast<const uint32_t*>(&xs[buf][r][ks + tig * 2 + 8]);
          a[mt][3] = *reinterpret_cast<const uint32_t*>(&xs[buf][r + 8][ks + tig * 2 + 8]);
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int cc = warp_n * 64 + nt * 8 + g;
          b[nt][0] = *reinterpret_cast<const uint32_t*>(&cs[buf][cc][ks + tig * 2]);
          b[nt][1] = *reinterpret_cast<const uint32_t*>(&cs[buf][cc][ks + tig * 2 + 8]);
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) Mma<T>::run(acc[mt][nt], a[mt], b[nt]);
      }
      if (more) stash(buf ^ 1);  // buf ^ 1 was last read before the previous barrier
      __syncthreads();
    }

    // Epilogue of this centroid tile: accumulator (mt, nt, e) is row g (+8 for e >= 2) of
    // m-tile mt, column tig * 2 + (e & 1) of n-tile nt; visit columns in increasing order.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t col = kt * kBN + warp_n * 64 + nt * 8 + tig * 2 + e;
            if (col < k) st[mt][h].push(acc[mt][nt][2 * h + e], static_cast<int>(col));
          }
  }

  // Row norms: the four loader threads of a row are consecutive lanes.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    sq[i] += __shfl_xor_sync(0xffffffffu, sq[i], 1);
    sq[i] += __shfl_xor_sync(0xffffffffu, sq[i], 2);
    flag[i] += __shfl_xor_sync(0xffffffffu, flag[i], 1);
    flag[i] += __shfl_xor_sync(0xffffffffu, flag[i], 2);
    if ((tid & 3) == 0) {
      rowsq[lrow + 64 * i] = sq[i];
      rowflag[lrow + 64 * i] = flag[i];
    }
  }
  // Top-2: merge the quad (same row g, columns tig), then the two column warps via smem.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      st[mt][h].merge_lane(1);
      st[mt][h].merge_lane(2);
      if (tig == 0) {
        const int r = warp_m * 32 + mt * 16 + g + 8 * h;
        red_best[warp_n][r] = st[mt][h].best;
        red_second[warp_n][r] = st[mt][h].second;
        red_index[warp_n][r] = st[mt][h].index;
      }
    }
  __syncthreads();
  if (tid < kBM) {
    const int64_t row = row0 + tid;
    if (row < n) {
      Top2 s;
      s.best = red_best[0][tid];
      s.second = red_second[0][tid];
      s.index = red_index[0][tid];
      s.merge(red_best[1][tid], red_second[1][tid], red_index[1][tid]);
      write_row(s, rowsq[tid], rowflag[tid], row, index, best, second, bad);
    }
  }
}

template <typename T>
void launch_mma(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                float* best, float* second, int64_t* bad, cudaStream_t stream) {
  const int64_t n = x.rows, d = x.cols;
  const int64_t kp = (k + kBN - 1) / kBN * kBN, dp = (d + kBK - 1) / kBK * kBK;
  cuda::Workspace packed(static_cast<size_t>(kp * dp) * sizeof(uint16_t), stream);
  const int64_t total = kp * dp;
  const unsigned pack_blocks =
      static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
  pack_centroids_kernel<T><<<pack_blocks, 256, 0, stream>>>(centroids, k, d, packed.as<T>(),
                                                            kp, dp);
  cuda::check_launch("pack_centroids_kernel");

  const uint16_t* xp = static_cast<const uint16_t*>(x.data);
  const bool aligned = reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && x.row_stride % 8 == 0;
  const unsigned blocks = cuda::grid_blocks(n, kBM, "cosine_assign");
  const uint16_t* cw = packed.as<const uint16_t>();
  if (aligned) {
    cosine_assign_mma_kernel<T, true><<<blocks, kMmaThreads, 0, stream>>>(
        xp, n, d, x.row_stride, cw, k, kp, dp, index, best, second, bad);
  } else {
    cosine_assign_mma_kernel<T, false><<<blocks, kMmaThreads, 0, stream>>>(
        xp, n, d, x.row_stride, cw, k, kp, dp, index, best, second, bad);
  }
  cuda::check_launch("cosine_assign_mma_kernel");
}

}  // namespace

void cosine_assign_cuda(const Matrix& x, const float* centroids, int64_t k, int64_t* index,
                        float* best_cos, float* second_cos, int64_t* bad, void* stream_handle) {
  const cuda::DeviceGuard device(x.rows > 0 ? x.data : nullptr);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  cuda::check(cudaMemsetAsync(bad, 0, kBadSlots * sizeof(int64_t), stream), "cudaMemsetAsync");
  if (x.rows == 0) return;
  if (k > 0x7fffffff) throw std::invalid_argument("cosine_assign: K too large");
  switch (x.dtype) {
    case DType::F32: {
      const unsigned blocks = cuda::grid_blocks(x.rows, cuda::kSimtTile, "cosine_assign");
      cosine_assign_simt_kernel<float><<<blocks, cuda::kSimtThreads, 0, stream>>>(
          static_cast<const float*>(x.data), x.rows, x.cols, x.row_stride, centroids, k, index,
          best_cos, second_cos, bad);
      cuda::check_launch("cosine_assign_simt_kernel");
      break;
    }
    case DType::F16:
      launch_mma<__half>(x, centroids, k, index, best_cos, second_cos, bad, stream);
      break;
    case DType::BF16:
      launch_mma<__nv_bfloat16>(x, centroids, k, index, best_cos, second_cos, bad, stream);
      break;
  }
}

}  // namespace pyconcepts
