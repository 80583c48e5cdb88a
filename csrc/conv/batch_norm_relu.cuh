// BatchNorm + residual + ReLU over NHWC activations, seen as a [rows, channels] matrix (rows = N·H·W): the kernels
// and their launchers, instantiated per dtype in batch_norm_relu_{fp32,fp16,bf16}.cu. docs/conv.md has the algorithm.
//
// Every pass uses one tiling: a block of 256 threads is col_threads x row_threads; a thread owns kVec consecutive
// channels (one 16-byte access where the channel count and the pointers allow, else one element) and walks the rows
// of its block's row range with stride row_threads, so a warp reads whole runs of consecutive rows (contiguous in
// NHWC). grid = (channel tiles, row blocks); the row blocks' per-channel partials go to a float32 workspace
// [2, row_blocks, channels] and a small finalize kernel (8 channels x 32 lanes a block) combines them in a fixed
// order: deterministic.
//
//   forward, training:  stats (Welford per thread, Chan's combination across threads and blocks), finalize (mean,
//                       invstd, running statistics), normalize
//   forward, eval:      finalize (mean and invstd from the running statistics), normalize
//   backward:           reduce (Σ g, Σ g·(x - mean) with g = dy·(y > 0)), finalize (dbias, dweight), input grad
//
// normalize and input grad walk each block's rows backwards: a tensor larger than L2 still has the rows the previous
// pass read last in L2, and those are the ones read first.
#pragma once

#include <algorithm>

#include "common/device/relu.cuh"
#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "conv/batch_norm_relu.h"

namespace fusedkernels::conv::bn {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // rows a thread loads before using them: loads in flight per thread
// finalize: a block per 8 channels, 32 lanes over the row blocks, each lane with kUnroll partials' loads in flight
// (a lane walking hundreds of row blocks one dependent load at a time took 10-20 µs)
constexpr int kFinalizeChannels = 8, kFinalizeLanes = kThreads / kFinalizeChannels;

// How a launch covers [rows, channels]; the same for every pass of a call, so the workspace's row blocks agree.
struct Tile {
  int col_shift = 0;    // col_threads = 1 << col_shift, at most 32
  int row_threads = 0;  // kThreads / col_threads
  int64_t col_tiles = 0, row_blocks = 0, rows_per_block = 0;
};

inline Tile plan_tile(int64_t rows, int64_t channels, int vec) {
  Tile t;
  const int64_t vec_cols = ceil_div(channels, vec);
  while (t.col_shift < 5 && (int64_t(1) << t.col_shift) < vec_cols) ++t.col_shift;
  const int col_threads = 1 << t.col_shift;
  t.row_threads = kThreads / col_threads;
  t.col_tiles = ceil_div(vec_cols, col_threads);
  // about four blocks per SM in all (enough loads in flight for HBM), each row thread with a few kUnroll batches
  // (the block's combination is amortised over them)
  const int64_t wanted = std::max<int64_t>(1, 4 * sm_count() / t.col_tiles);
  const int64_t most = std::max<int64_t>(1, ceil_div(rows, int64_t(t.row_threads) * 2 * kUnroll));
  t.rows_per_block = ceil_div(rows, std::min(wanted, most));
  t.row_blocks = ceil_div(rows, t.rows_per_block);  // every row block holds at least one row
  return t;
}

template <typename T>
bool vectorizable(int64_t channels, std::initializer_list<const void*> pointers) {
  if (channels % kVec16<T> != 0) return false;
  for (const void* q : pointers) {
    if (q != nullptr && !is_aligned(q, 16)) return false;
  }
  return true;
}

// kVec elements of one row at channels [c, c + kVec), moved in one access and held packed (16-bit elements two to a
// register) until used.
template <typename T, int kVec>
struct Pack {
  Vec<T, kVec> w;
  __device__ __forceinline__ void load(const T* p) { w.load(p); }
  __device__ __forceinline__ void store(T* p) const { w.store(p); }
  __device__ __forceinline__ float operator[](int i) const { return w.get(i); }
  __device__ __forceinline__ void set(int i, float v) { w.set(i, v); }
};

template <typename T>
struct Pack<T, 1> {
  T e;
  __device__ __forceinline__ void load(const T* p) { e = *p; }
  __device__ __forceinline__ void store(T* p) const { *p = e; }
  __device__ __forceinline__ float operator[](int) const { return to_float(e); }
  __device__ __forceinline__ void set(int, float v) { e = from_float<T>(v); }
};

// Chan, Golub and LeVeque's pairwise update: (n, mean, m2) of a set absorbs (nb, mean_b, m2_b) of another; m2 is the
// sum of squared deviations from the mean. Either set may be empty.
__device__ __forceinline__ void chan_combine(float& n, float& mean, float& m2, float nb, float mean_b, float m2_b) {
  if (nb == 0.f) return;
  const float total = n + nb, share = nb / total, delta = mean_b - mean;
  mean += delta * share;
  m2 += m2_b + delta * delta * n * share;
  n = total;
}

// The rows of row block `j` of a tile.
__device__ __forceinline__ int64_t rows_in_block(const Tile& t, int64_t rows, int64_t j) {
  return std::min(rows, (j + 1) * t.rows_per_block) - j * t.rows_per_block;
}

// Where a thread's channels and rows are.
struct Place {
  int tx, ty;
  int64_t c;           // first channel
  int64_t begin, end;  // the block's rows
};

// The row a pass that follows another over the same rows visits in place of `row`: the block's range backwards, so it
// starts on the rows the previous pass read last, which are still in L2.
__device__ __forceinline__ int64_t mirrored(const Place& at, int64_t row) { return at.begin + at.end - 1 - row; }

template <int kVec>
__device__ __forceinline__ Place place(const Tile& t, int64_t rows) {
  Place at;
  at.tx = threadIdx.x & ((1 << t.col_shift) - 1);
  at.ty = threadIdx.x >> t.col_shift;
  at.c = ((int64_t(blockIdx.x) << t.col_shift) + at.tx) * kVec;
  at.begin = int64_t(blockIdx.y) * t.rows_per_block;
  at.end = std::min(rows, at.begin + t.rows_per_block);
  return at;
}

// Pass 1 of training: per-channel (count, mean, m2) of each row block, Welford over a thread's rows (one reciprocal a
// row, shared by its channels), then Chan's combination over the block's row lanes; to workspace [2][row_blocks][C].
// Every thread works on x - x[row 0] (the same shift for a channel everywhere; finalize adds it back): the running
// means stay near zero, so their rounding does not grow with a mean far from zero.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) stats_kernel(const BatchNormReluParams p, const Tile t) {
  __shared__ float s_n[kThreads], s_mean[kVec][kThreads], s_m2[kVec][kThreads];
  const Place at = place<kVec>(t, p.rows);
  const int64_t C = p.channels;
  const bool active = at.c < C;
  const T* x = static_cast<const T*>(p.x) + at.c;
  float n = 0.f, mean[kVec] = {}, m2[kVec] = {}, shift[kVec] = {};
  if (active) {
    Pack<T, kVec> first;
    first.load(x);
#pragma unroll
    for (int i = 0; i < kVec; ++i) shift[i] = first[i];
    for (int64_t r = at.begin + at.ty; r < at.end; r += kUnroll * t.row_threads) {
      Pack<T, kVec> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * t.row_threads < at.end) v[u].load(x + (r + u * t.row_threads) * C);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * t.row_threads >= at.end) break;
        n += 1.f;
        const float inv_n = 1.f / n;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float value = v[u][i] - shift[i], delta = value - mean[i];
          mean[i] += delta * inv_n;
          m2[i] += delta * (value - mean[i]);
        }
      }
    }
  }
  s_n[threadIdx.x] = n;
#pragma unroll
  for (int i = 0; i < kVec; ++i) s_mean[i][threadIdx.x] = mean[i], s_m2[i][threadIdx.x] = m2[i];
  for (int half = t.row_threads / 2; half > 0; half /= 2) {
    __syncthreads();
    if (at.ty < half) {
      const int other = threadIdx.x + (half << t.col_shift);
      const float nb = s_n[other];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        float n_i = n;
        chan_combine(n_i, mean[i], m2[i], nb, s_mean[i][other], s_m2[i][other]);
        s_mean[i][threadIdx.x] = mean[i], s_m2[i][threadIdx.x] = m2[i];
      }
      n += nb;
      s_n[threadIdx.x] = n;
    }
  }
  if (at.ty == 0 && active) {
    float* ws_mean = p.workspace + blockIdx.y * C + at.c;
    float* ws_m2 = ws_mean + t.row_blocks * C;
#pragma unroll
    for (int i = 0; i < kVec; ++i) ws_mean[i] = mean[i], ws_m2[i] = m2[i];
  }
}

// Per channel: training, the row blocks' partials combined into the batch mean and invstd, and the running
// statistics updated as torch does (the variance unbiased, n / (n - 1)); eval, mean and invstd from the running
// statistics.
template <typename T>
__global__ void __launch_bounds__(kThreads) finalize_stats_kernel(const BatchNormReluParams p, const Tile t) {
  __shared__ float s_n[kThreads], s_mean[kThreads], s_m2[kThreads];
  const int lane = threadIdx.x / kFinalizeChannels;
  const int64_t C = p.channels, c = int64_t(blockIdx.x) * kFinalizeChannels + threadIdx.x % kFinalizeChannels;
  if (!p.training) {
    if (lane == 0 && c < C) {
      p.save_mean[c] = p.running_mean[c];
      p.save_invstd[c] = rsqrtf(p.running_var[c] + p.eps);
    }
    return;
  }
  float n = 0.f, mean = 0.f, m2 = 0.f;
  if (c < C) {
    for (int64_t j0 = lane; j0 < t.row_blocks; j0 += kUnroll * kFinalizeLanes) {
      float block_mean[kUnroll], block_m2[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kFinalizeLanes;
        if (j < t.row_blocks) block_mean[u] = p.workspace[j * C + c], block_m2[u] = p.workspace[(t.row_blocks + j) * C + c];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kFinalizeLanes;
        if (j >= t.row_blocks) break;
        chan_combine(n, mean, m2, float(rows_in_block(t, p.rows, j)), block_mean[u], block_m2[u]);
      }
    }
  }
  s_n[threadIdx.x] = n, s_mean[threadIdx.x] = mean, s_m2[threadIdx.x] = m2;
  for (int half = kFinalizeLanes / 2; half > 0; half /= 2) {
    __syncthreads();
    if (lane < half) {
      const int other = threadIdx.x + half * kFinalizeChannels;
      chan_combine(n, mean, m2, s_n[other], s_mean[other], s_m2[other]);
      s_n[threadIdx.x] = n, s_mean[threadIdx.x] = mean, s_m2[threadIdx.x] = m2;
    }
  }
  if (lane != 0 || c >= C) return;
  const float count = float(p.rows);  // n summed in order may round past 2^24 rows; the count is known
  const float var = m2 / count;
  mean += to_float(static_cast<const T*>(p.x)[c]);  // the stats pass's shift
  p.save_mean[c] = mean;
  p.save_invstd[c] = rsqrtf(var + p.eps);
  if (p.running_mean != nullptr) p.running_mean[c] = (1.f - p.momentum) * p.running_mean[c] + p.momentum * mean;
  if (p.running_var != nullptr) {
    p.running_var[c] = (1.f - p.momentum) * p.running_var[c] + p.momentum * (m2 / (count - 1.f));
  }
}

// Pass 2: y = relu((x - mean) * (weight * invstd) + bias (+ residual)).
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) normalize_kernel(const BatchNormReluParams p, const Tile t) {
  const Place at = place<kVec>(t, p.rows);
  const int64_t C = p.channels;
  if (at.c >= C) return;
  float mean[kVec], scale[kVec], shift[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int64_t c = at.c + i;
    mean[i] = p.save_mean[c];
    scale[i] = p.save_invstd[c] * (p.weight != nullptr ? p.weight[c] : 1.f);
    shift[i] = p.bias != nullptr ? p.bias[c] : 0.f;
  }
  const T* __restrict__ x = static_cast<const T*>(p.x) + at.c;
  const T* __restrict__ residual = p.residual != nullptr ? static_cast<const T*>(p.residual) + at.c : nullptr;
  T* __restrict__ y = static_cast<T*>(p.y) + at.c;
  for (int64_t r = at.begin + at.ty; r < at.end; r += kUnroll * t.row_threads) {
    Pack<T, kVec> v[kUnroll], res[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * t.row_threads;
      if (row < at.end) {
        const int64_t at_row = mirrored(at, row) * C;
        v[u].load(x + at_row);
        if (residual != nullptr) res[u].load(residual + at_row);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * t.row_threads;
      if (row >= at.end) break;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float z = (v[u][i] - mean[i]) * scale[i] + shift[i];
        v[u].set(i, relu(residual != nullptr ? z + res[u][i] : z));
      }
      v[u].store(y + mirrored(at, row) * C);  // the row it loaded
    }
  }
}

// Backward pass 1: per row block and channel, Σ g and Σ g·(x - mean), g = dy where y > 0, else 0; to workspace
// [2][row_blocks][C].
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) reduce_grad_kernel(const BatchNormReluBackwardParams p, const Tile t) {
  __shared__ float s_g[kVec][kThreads], s_gx[kVec][kThreads];
  const Place at = place<kVec>(t, p.rows);
  const int64_t C = p.channels;
  const bool active = at.c < C;
  float sum_g[kVec] = {}, sum_gx[kVec] = {}, mean[kVec];
  if (active) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) mean[i] = p.save_mean[at.c + i];
    const T* dy = static_cast<const T*>(p.dy) + at.c;
    const T* x = static_cast<const T*>(p.x) + at.c;
    const T* y = static_cast<const T*>(p.y) + at.c;
    for (int64_t r = at.begin + at.ty; r < at.end; r += kUnroll * t.row_threads) {
      Pack<T, kVec> vdy[kUnroll], vx[kUnroll], vy[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + u * t.row_threads;
        if (row < at.end) vdy[u].load(dy + row * C), vx[u].load(x + row * C), vy[u].load(y + row * C);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * t.row_threads >= at.end) break;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float g = vy[u][i] > 0.f ? vdy[u][i] : 0.f;
          sum_g[i] += g;
          sum_gx[i] += g * (vx[u][i] - mean[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) s_g[i][threadIdx.x] = sum_g[i], s_gx[i][threadIdx.x] = sum_gx[i];
  for (int half = t.row_threads / 2; half > 0; half /= 2) {
    __syncthreads();
    if (at.ty < half) {
      const int other = threadIdx.x + (half << t.col_shift);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        sum_g[i] += s_g[i][other], sum_gx[i] += s_gx[i][other];
        s_g[i][threadIdx.x] = sum_g[i], s_gx[i][threadIdx.x] = sum_gx[i];
      }
    }
  }
  if (at.ty == 0 && active) {
    float* ws_g = p.workspace + blockIdx.y * C + at.c;
    float* ws_gx = ws_g + t.row_blocks * C;
#pragma unroll
    for (int i = 0; i < kVec; ++i) ws_g[i] = sum_g[i], ws_gx[i] = sum_gx[i];
  }
}

// dbias = Σ g and dweight = invstd · Σ g·(x - mean) per channel, the row blocks summed in a fixed order.
// (static: one copy per instance file)
static __global__ void __launch_bounds__(kThreads) finalize_grad_kernel(const BatchNormReluBackwardParams p, const Tile t) {
  __shared__ float s_g[kThreads], s_gx[kThreads];
  const int lane = threadIdx.x / kFinalizeChannels;
  const int64_t C = p.channels, c = int64_t(blockIdx.x) * kFinalizeChannels + threadIdx.x % kFinalizeChannels;
  float sum_g = 0.f, sum_gx = 0.f;
  if (c < C) {
    for (int64_t j0 = lane; j0 < t.row_blocks; j0 += kUnroll * kFinalizeLanes) {
      float block_g[kUnroll], block_gx[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kFinalizeLanes;
        const bool in = j < t.row_blocks;
        block_g[u] = in ? p.workspace[j * C + c] : 0.f;
        block_gx[u] = in ? p.workspace[(t.row_blocks + j) * C + c] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) sum_g += block_g[u], sum_gx += block_gx[u];
    }
  }
  s_g[threadIdx.x] = sum_g, s_gx[threadIdx.x] = sum_gx;
  for (int half = kFinalizeLanes / 2; half > 0; half /= 2) {
    __syncthreads();
    if (lane < half) {
      sum_g += s_g[threadIdx.x + half * kFinalizeChannels], sum_gx += s_gx[threadIdx.x + half * kFinalizeChannels];
      s_g[threadIdx.x] = sum_g, s_gx[threadIdx.x] = sum_gx;
    }
  }
  if (lane != 0 || c >= C) return;
  p.dbias[c] = sum_g;
  p.dweight[c] = sum_gx * p.save_invstd[c];
}

// Backward pass 2: dresidual = g; dx = weight·invstd·(g - Σg/n - xhat·Σ(g·xhat)/n) in training, weight·invstd·g in
// eval.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) input_grad_kernel(const BatchNormReluBackwardParams p, const Tile t) {
  const Place at = place<kVec>(t, p.rows);
  const int64_t C = p.channels;
  if (at.c >= C) return;
  // dx = a·g - b·(x - mean) - d per channel
  float mean[kVec], a[kVec], b[kVec], d[kVec];
  const float inv_rows = 1.f / float(p.rows);
  const bool centered = p.training && p.dx != nullptr;  // the batch statistics' terms (the sums exist then)
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int64_t c = at.c + i;
    const float invstd = p.save_invstd[c];
    mean[i] = p.save_mean[c];
    a[i] = invstd * (p.weight != nullptr ? p.weight[c] : 1.f);
    b[i] = centered ? a[i] * invstd * p.dweight[c] * inv_rows : 0.f;
    d[i] = centered ? a[i] * p.dbias[c] * inv_rows : 0.f;
  }
  const T* __restrict__ dy = static_cast<const T*>(p.dy) + at.c;
  const T* __restrict__ x = static_cast<const T*>(p.x) + at.c;
  const T* __restrict__ y = static_cast<const T*>(p.y) + at.c;
  T* __restrict__ dx = p.dx != nullptr ? static_cast<T*>(p.dx) + at.c : nullptr;
  T* __restrict__ dresidual = p.dresidual != nullptr ? static_cast<T*>(p.dresidual) + at.c : nullptr;
  for (int64_t r = at.begin + at.ty; r < at.end; r += kUnroll * t.row_threads) {
    Pack<T, kVec> vdy[kUnroll], vx[kUnroll], vy[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * t.row_threads;
      if (row < at.end) {
        const int64_t at_row = mirrored(at, row) * C;
        vdy[u].load(dy + at_row), vy[u].load(y + at_row);
        if (dx != nullptr) vx[u].load(x + at_row);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * t.row_threads;
      if (row >= at.end) break;
#pragma unroll
      for (int i = 0; i < kVec; ++i) vdy[u].set(i, vy[u][i] > 0.f ? vdy[u][i] : 0.f);
      const int64_t at_row = mirrored(at, row) * C;
      if (dresidual != nullptr) vdy[u].store(dresidual + at_row);
      if (dx != nullptr) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) vx[u].set(i, a[i] * vdy[u][i] - b[i] * (vx[u][i] - mean[i]) - d[i]);
        vx[u].store(dx + at_row);
      }
    }
  }
}

template <typename T, int kVec>
cudaError_t launch_fwd(const BatchNormReluParams& p, cudaStream_t stream) {
  const Tile t = plan_tile(p.rows, p.channels, kVec);
  const dim3 grid(static_cast<unsigned>(t.col_tiles), static_cast<unsigned>(t.row_blocks));
  if (p.training) stats_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(p, t);
  finalize_stats_kernel<T><<<ceil_div(p.channels, kFinalizeChannels), kThreads, 0, stream>>>(p, t);
  normalize_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(p, t);
  return cudaGetLastError();
}

template <typename T, int kVec>
cudaError_t launch_bwd(const BatchNormReluBackwardParams& p, cudaStream_t stream) {
  const Tile t = plan_tile(p.rows, p.channels, kVec);
  const dim3 grid(static_cast<unsigned>(t.col_tiles), static_cast<unsigned>(t.row_blocks));
  if (p.dweight != nullptr) {  // the sums: dweight, dbias, and in training dx's per-channel terms
    reduce_grad_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(p, t);
    finalize_grad_kernel<<<ceil_div(p.channels, kFinalizeChannels), kThreads, 0, stream>>>(p, t);
  }
  if (p.dx != nullptr || p.dresidual != nullptr) input_grad_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(p, t);
  return cudaGetLastError();
}

}  // namespace fusedkernels::conv::bn

namespace fusedkernels::conv {

template <typename T>
int64_t batch_norm_relu_workspace_of(int64_t rows, int64_t channels) {
  // either access width may run (it depends on the pointers): room for the larger
  const int64_t blocks = std::max(bn::plan_tile(rows, channels, kVec16<T>).row_blocks, bn::plan_tile(rows, channels, 1).row_blocks);
  return 2 * blocks * channels;
}

template <typename T>
cudaError_t batch_norm_relu_fwd_of(const BatchNormReluParams& p, cudaStream_t stream) {
  return bn::vectorizable<T>(p.channels, {p.x, p.residual, p.y}) ? bn::launch_fwd<T, kVec16<T>>(p, stream)
                                                                 : bn::launch_fwd<T, 1>(p, stream);
}

template <typename T>
cudaError_t batch_norm_relu_bwd_of(const BatchNormReluBackwardParams& p, cudaStream_t stream) {
  return bn::vectorizable<T>(p.channels, {p.dy, p.x, p.y, p.dx, p.dresidual}) ? bn::launch_bwd<T, kVec16<T>>(p, stream)
                                                                              : bn::launch_bwd<T, 1>(p, stream);
}

}  // namespace fusedkernels::conv

// One dtype's instances, in its own translation unit.
#define FUSEDKERNELS_BATCH_NORM_RELU_INSTANCE(T)                                                                   \
  template int64_t fusedkernels::conv::batch_norm_relu_workspace_of<T>(int64_t, int64_t);                          \
  template cudaError_t fusedkernels::conv::batch_norm_relu_fwd_of<T>(const fusedkernels::conv::BatchNormReluParams&, \
                                                                     cudaStream_t);                                 \
  template cudaError_t fusedkernels::conv::batch_norm_relu_bwd_of<T>(                                               \
      const fusedkernels::conv::BatchNormReluBackwardParams&, cudaStream_t);
