// transpose16 (gemm.h): 64 x 64 tiles through shared memory, so both the reads of src's rows and the writes of
// dst's rows are 16-byte vectors a warp lays side by side (PyTorch's strided copy of a transposed view writes
// 2-byte elements a row apart: ~0.6 TB/s at 4096 x 11008, against ~3.5 for this).
#include <cstdint>

#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "gemm/gemm.h"

namespace fusedkernels::gemm {

namespace {

constexpr int kTile = 64, kThreads = 256;
// A tile row is 66 elements (33 words): the 16-byte writes of its rows land on distinct banks, the 2-byte column
// reads on at most two ways.
constexpr int kPitch = kTile + 2;

__global__ void __launch_bounds__(kThreads) transpose16_kernel(const TransposeParams p) {
  __shared__ uint16_t tile[kTile][kPitch];
  const uint16_t* src = static_cast<const uint16_t*>(p.src);
  uint16_t* dst = static_cast<uint16_t*>(p.dst);
  const int64_t row0 = int64_t(blockIdx.y) * kTile, col0 = int64_t(blockIdx.x) * kTile;
  constexpr int kVectors = kTile / 8;  // 16-byte vectors in a tile row
#pragma unroll
  for (int i = threadIdx.x; i < kTile * kVectors; i += kThreads) {
    const int r = i / kVectors, v = i % kVectors;
    if (row0 + r < p.rows && col0 + 8 * v < p.cols) {  // cols is a multiple of 8: whole vectors
      const uint4 x = *reinterpret_cast<const uint4*>(src + (row0 + r) * p.src_row_stride + col0 + 8 * v);
      uint32_t* to = reinterpret_cast<uint32_t*>(&tile[r][8 * v]);
      to[0] = x.x, to[1] = x.y, to[2] = x.z, to[3] = x.w;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = threadIdx.x; i < kTile * kVectors; i += kThreads) {
    const int c = i / kVectors, u = i % kVectors;  // dst row col0 + c, its elements row0 + 8u .. + 7
    if (col0 + c < p.cols && row0 + 8 * u < p.rows) {
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) w[e] = tile[8 * u + 2 * e][c] | uint32_t(tile[8 * u + 2 * e + 1][c]) << 16;
      *reinterpret_cast<uint4*>(dst + (col0 + c) * p.rows + row0 + 8 * u) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

}  // namespace

bool transpose16_supported(const TransposeParams& p) {
  return p.rows % 8 == 0 && p.cols % 8 == 0 && p.src_row_stride % 8 == 0 && is_aligned(p.src, 16) &&
         is_aligned(p.dst, 16) && ceil_div(p.rows, int64_t(kTile)) <= 65535;
}

cudaError_t transpose16(const TransposeParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const dim3 grid(unsigned(ceil_div(p.cols, int64_t(kTile))), unsigned(ceil_div(p.rows, int64_t(kTile))));
  transpose16_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fusedkernels::gemm
