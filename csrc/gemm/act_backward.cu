// linear_act's backward between the gradient GEMMs: dz = dy * act'(z) and the bias gradient (the column sums of dz)
// in one pass. A CTA takes 32 column vectors (256 columns of 16-bit data) of a chunk of rows: its 8 warps read the
// chunk's rows 8 apart, each lane one 16-byte vector of a row (a warp reads 512 contiguous bytes), four rows' loads
// issued before their arithmetic (one row at a time left too few bytes in flight to reach the copy bandwidth),
// keeping float32 sums of its 8 columns; the warps' sums meet in shared memory and go out as the chunk's partial
// row, which a second kernel adds up over the chunks in order. Torch's formulas run the activation's backward, then
// a sum over dz: one more read of the whole of dz.
#include <algorithm>

#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "common/host/static_switch.h"
#include "gemm/activation.cuh"
#include "gemm/gemm.h"

namespace fusedkernels::gemm {
namespace {

constexpr int kLanes = 32, kWarps = 8, kVec = 8;  // a CTA: 32 vectors of 8 columns by 8 rows at a time
constexpr int kRowsInFlight = 4;                   // a warp's rows loaded together
constexpr int kBlocksPerSm = 3;                    // resident CTAs an SM (85 registers a thread: no spill)

int64_t column_chunks(const ActBackwardParams& p) { return ceil_div(p.n, kLanes * kVec); }

// Row chunks: as many CTAs as are resident at once (kBlocksPerSm per SM) but not more, so the grid is one wave (a
// second wave of a few CTAs doubled the pass's time at n = 16384); at least 8 rows a chunk (one per warp), at most
// 1024 chunks.
int64_t row_chunks(const ActBackwardParams& p) {
  const int64_t wanted = kBlocksPerSm * int64_t(sm_count()) / column_chunks(p);
  return std::clamp<int64_t>(wanted, 1, std::min<int64_t>(ceil_div(p.rows, kWarps), 1024));
}

template <typename T, Activation kAct, bool kBias>
__global__ void __launch_bounds__(kLanes * kWarps, kBlocksPerSm) act_backward_kernel(const ActBackwardParams p) {
  __shared__ float sums[kWarps][kLanes * kVec];
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes;
  const int64_t col = (int64_t(blockIdx.x) * kLanes + lane) * kVec;
  const int64_t chunk_rows = ceil_div(p.rows, int64_t(gridDim.y));
  const int64_t row0 = blockIdx.y * chunk_rows, row1 = std::min(p.rows, row0 + chunk_rows);
  const T* dy = static_cast<const T*>(p.dy);
  const T* z = static_cast<const T*>(p.z);
  T* dz = static_cast<T*>(p.dz);
  float sum[kVec] = {};
  if (col < p.n) {
    for (int64_t first = row0 + warp; first < row1; first += kWarps * kRowsInFlight) {
      Vec<T, kVec> d[kRowsInFlight], g[kRowsInFlight];
#pragma unroll
      for (int i = 0; i < kRowsInFlight; ++i) {
        const int64_t row = first + i * kWarps;
        if (row < row1) {
          d[i].load(dy + row * p.dy_row_stride + col);
          g[i].load(z + row * p.z_row_stride + col);
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsInFlight; ++i) {
        const int64_t row = first + i * kWarps;
        if (row >= row1) break;
        Vec<T, kVec> out;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          out.set(j, activation_grad<kAct>(d[i].get(j), g[i].get(j)));
          if constexpr (kBias) sum[j] += out.get(j);  // the sum of dz as stored, as torch sums the rounded dz
        }
        out.store(dz + row * p.n + col);
      }
    }
  }
  if constexpr (kBias) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) sums[warp][lane * kVec + j] = sum[j];
    __syncthreads();
    // the chunk's partial sums: thread c of the CTA's 256 adds column c over the 8 warps, in order
    const int c = threadIdx.x;
    const int64_t column = int64_t(blockIdx.x) * kLanes * kVec + c;
    if (column < p.n) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += sums[w][c];
      p.partials[blockIdx.y * p.n + column] = total;
    }
  }
}

// dbias[c] = the sum of the chunks' partials of column c, in chunk order
template <typename T>
__global__ void __launch_bounds__(256) act_backward_bias_kernel(const ActBackwardParams p, int64_t chunks) {
  const int64_t column = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= p.n) return;
  float total = 0.0f;
  for (int64_t i = 0; i < chunks; ++i) total += p.partials[i * p.n + column];
  static_cast<T*>(p.dbias)[column] = from_float<T>(total);
}

}  // namespace

bool act_backward_supported(const ActBackwardParams& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && p.n % kVec == 0 &&
         p.dy_row_stride % kVec == 0 && p.z_row_stride % kVec == 0 && aligned(p.dy) && aligned(p.z) &&
         aligned(p.dz) && (p.dbias == nullptr || p.partials != nullptr);
}

int64_t act_backward_partials(const ActBackwardParams& p) {
  return p.rows == 0 || p.n == 0 ? 0 : row_chunks(p) * p.n;
}

cudaError_t act_backward(const ActBackwardParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.rows == 0) {  // no rows: dbias is zeros
    return p.dbias == nullptr ? cudaSuccess : cudaMemsetAsync(p.dbias, 0, p.n * 2, stream);
  }
  const int64_t chunks = row_chunks(p);
  const dim3 grid(static_cast<unsigned>(column_chunks(p)), static_cast<unsigned>(chunks));
  return type_switch<DType::kFloat16, DType::kBFloat16>(p.dtype, [&]<typename T>() {
    const auto launch = [&]<Activation kAct>() {
      if (p.dbias != nullptr) {
        act_backward_kernel<T, kAct, true><<<grid, kLanes * kWarps, 0, stream>>>(p);
        act_backward_bias_kernel<T><<<ceil_div(p.n, 256), 256, 0, stream>>>(p, chunks);
      } else {
        act_backward_kernel<T, kAct, false><<<grid, kLanes * kWarps, 0, stream>>>(p);
      }
      return cudaGetLastError();
    };
    switch (p.activation) {
      case Activation::kRelu: return launch.template operator()<Activation::kRelu>();
      case Activation::kGelu: return launch.template operator()<Activation::kGelu>();
      case Activation::kGeluTanh: return launch.template operator()<Activation::kGeluTanh>();
      case Activation::kSilu: return launch.template operator()<Activation::kSilu>();
      case Activation::kSquaredRelu: return launch.template operator()<Activation::kSquaredRelu>();
      default: return launch.template operator()<Activation::kNone>();
    }
  });
}

}  // namespace fusedkernels::gemm
