// LayerNorm / RMSNorm kernels and their launchers, templated on the input type T, the weight type WT
// (T or float) and kRms. norm_{fwd,bwd}_<dtype>.cu instantiate them; norm_dispatch.cu picks one.
//
// Two paths:
//  * registers: hidden % (16 B / sizeof(T)) == 0 and 16-byte aligned rows. kTpr threads share a row and
//    keep it in registers as 16-byte vectors, so x is read from memory once per pass over the data.
//  * general:   any hidden size and alignment. One block per row, re-reading the row (from L1/L2) for
//    each reduction.
// Backward writes per-block fp32 sums of dweight / dbias to a workspace; reduce_partials_kernel adds them
// up in a fixed order, so the result is the same on every run (no float atomics).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/device/cp_async.cuh"
#include "common/device/reduce.cuh"
#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "common/host/static_switch.h"
#include "norm/norm.h"

namespace fusedkernels::norm {

// Threads per row on the register path, smallest first; a row gets the smallest group that covers it.
constexpr int kTprChoices[] = {8, 16, 32, 64, 128, 256, 512, 1024};
// 16-byte vectors of the row each thread keeps in registers. The forward holds 64 B per thread (128 B
// for the widest rows, so 1024 threads cover 65536 bf16 values); the backward holds x, dy and fp32
// dweight / dbias sums for 16 columns per thread, which is what fits in 128 registers without spills.
template <int kTpr>
constexpr int kFwdIters = kTpr == 1024 ? 8 : 4;
template <typename T>
constexpr int kBwdIters = 16 / kVec16<T>;
constexpr int kBwdMaxTpr = 512;
constexpr int kGeneralThreads = 256;

template <int kTpr>
__host__ __device__ constexpr int threads_for_tpr() { return kTpr >= 256 ? kTpr : 256; }
inline int threads_for_tpr_host(int tpr) { return tpr >= 256 ? tpr : 256; }

// Double-buffered staging of the row groups a backward block works on: while the block computes one
// group from shared memory, cp.async copies the next group's kTensors inputs in. Layout
// [stage][i][tensor][thread] of 16-byte vectors: each thread reads back only what it copied itself, so
// the wait needs no barrier, and a warp's 16-byte accesses are contiguous.
template <typename T, int kTpr, int kIters, int kTensors>
struct RowStager {
  static constexpr int kThreads = threads_for_tpr<kTpr>();
  static constexpr int kVec = kVec16<T>;
  static constexpr int kBytes = 2 * kIters * kTensors * kThreads * 16;

  uint4* smem;

  __device__ __forceinline__ uint4* at(int stage, int i, int which) const {
    return smem + ((stage * kIters + i) * kTensors + which) * kThreads + threadIdx.x;
  }
  // Starts copying the row of this thread's slot in the group at `first` (zeros past the end).
  __device__ __forceinline__ void prefetch(const T* const (&src)[kTensors], int64_t first, int stage, int64_t rows,
                                           int hidden) const {
    const int64_t row = first + threadIdx.x / kTpr;
    const int lane = threadIdx.x % kTpr;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = i * kTpr + lane;
      const bool ok = row < rows && c < hidden / kVec;
      const int64_t off = ok ? row * hidden + c * kVec : 0;
#pragma unroll
      for (int t = 0; t < kTensors; ++t) cp_async_16(at(stage, i, t), src[t] + off, ok);
    }
    cp_async_commit();
  }
  __device__ __forceinline__ Vec<T, kVec> get(int stage, int i, int which) const {
    Vec<T, kVec> v;
    v.load(reinterpret_cast<const T*>(at(stage, i, which)));
    return v;
  }
};

// -------------------------------------------------------------------------------------------------
// Forward
// -------------------------------------------------------------------------------------------------

// One row group per block, loaded straight into registers. (Measured slower on the H200: a persistent
// grid staging the next group through shared memory, and forcing 64 registers; docs/perf-notes.md.)
template <typename T, typename WT, bool kRms, int kTpr, int kIters>
__global__ void __launch_bounds__(threads_for_tpr<kTpr>())
fwd_registers_kernel(const FwdParams p) {
  constexpr int kThreads = threads_for_tpr<kTpr>();
  constexpr int kRowsPerBlock = kThreads / kTpr;
  constexpr int kVec = kVec16<T>;
  __shared__ float scratch[kThreads / 32];

  const T* x = static_cast<const T*>(p.x);
  const WT* weight = static_cast<const WT*>(p.weight);
  const WT* bias = static_cast<const WT*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int lane = threadIdx.x % kTpr;
  const int slot = threadIdx.x / kTpr;
  const int nvec = p.hidden / kVec;
  const float inv_hidden = 1.f / p.hidden;

  // Every thread runs the same number of iterations: the group sums need all of them.
  for (int64_t first = int64_t(blockIdx.x) * kRowsPerBlock; first < p.rows;
       first += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = first + slot;
    const bool row_ok = row < p.rows;
    const int64_t row_offset = row * p.hidden;

    Vec<T, kVec> xv[kIters];  // xv[i] holds vector i * kTpr + lane of the row
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = i * kTpr + lane;
      if (row_ok && c < nvec) xv[i].load(x + row_offset + c * kVec);
    }

    // The mean as shift + mean(x - shift), shift = the row's first element: a row whose mean is far larger
    // than its spread then sums small numbers, keeping the low bits a plain sum drops, which the variance
    // (and rstd, up to 1/sqrt(eps)) would magnify. One subtraction an element, in this pass only: the
    // centred pass uses the mean rounded once, as torch's does.
    float mean = 0.f;
    if constexpr (!kRms) {
      float shift;
      if constexpr (kTpr <= 32) {  // the row's first element is in its group's first lane
        shift = __shfl_sync(0xffffffffu, xv[0].get(0), (threadIdx.x % 32) & ~(kTpr - 1));
      } else {
        shift = row_ok ? to_float(x[row_offset]) : 0.f;
      }
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        if (row_ok && i * kTpr + lane < nvec) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) sum += xv[i].get(j) - shift;
        }
      }
      mean = shift + group_sum<kTpr, kThreads>(sum, scratch) * inv_hidden;
    }
    float sq = 0.f;  // centred second moment: exact two-pass variance, the row is in registers anyway
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if (row_ok && i * kTpr + lane < nvec) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float d = xv[i].get(j) - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(group_sum<kTpr, kThreads>(sq, scratch) * inv_hidden + p.eps);

    if (!row_ok) continue;
    if (lane == 0) {
      if constexpr (!kRms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = i * kTpr + lane;
      if (c >= nvec) continue;
      Vec<WT, kVec> w, b;
      if (weight) w.load(weight + c * kVec);
      if (bias) b.load(bias + c * kVec);
      Vec<T, kVec> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float v = (xv[i].get(j) - mean) * rstd;
        if (weight) v *= w.get(j);
        if (bias) v += b.get(j);
        out.set(j, v);
      }
      out.store(y + row_offset + c * kVec);
    }
  }
}

template <typename T, typename WT, bool kRms>
__global__ void __launch_bounds__(kGeneralThreads) fwd_general_kernel(const FwdParams p) {
  __shared__ float scratch[kGeneralThreads / 32];
  const T* x = static_cast<const T*>(p.x);
  const WT* weight = static_cast<const WT*>(p.weight);
  const WT* bias = static_cast<const WT*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int hidden = p.hidden;
  const float inv_hidden = 1.f / hidden;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    float mean = 0.f;
    if constexpr (!kRms) {  // shifted by the row's first element, as in the register path
      const float shift = to_float(xr[0]);
      float sum = 0.f;
      for (int c = threadIdx.x; c < hidden; c += kGeneralThreads) sum += to_float(xr[c]) - shift;
      mean = shift + block_sum<kGeneralThreads>(sum, scratch) * inv_hidden;
    }
    float sq = 0.f;
    for (int c = threadIdx.x; c < hidden; c += kGeneralThreads) {
      const float d = to_float(xr[c]) - mean;
      sq += d * d;
    }
    const float rstd = rsqrtf(block_sum<kGeneralThreads>(sq, scratch) * inv_hidden + p.eps);
    if (threadIdx.x == 0) {
      if constexpr (!kRms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    T* yr = y + row * hidden;
    for (int c = threadIdx.x; c < hidden; c += kGeneralThreads) {
      float v = (to_float(xr[c]) - mean) * rstd;
      if (weight) v *= to_float(weight[c]);
      if (bias) v += to_float(bias[c]);
      yr[c] = from_float<T>(v);
    }
  }
}

inline bool aligned16(const void* ptr) { return is_aligned(ptr, 16); }

// The register path needs whole 16-byte vectors: hidden a multiple of the vector and aligned pointers
// (the weight vector of kVec elements of WT is 16 or 32 bytes; 16-byte alignment covers both loads).
template <typename T, typename WT>
bool registers_fit(const void* x, const void* other, const void* weight, const void* bias, int hidden,
                   int max_vectors) {
  constexpr int kVec = kVec16<T>;
  if (hidden % kVec != 0 || hidden / kVec > max_vectors) return false;
  if (!aligned16(x) || !aligned16(other)) return false;
  if (weight && reinterpret_cast<uintptr_t>(weight) % (kVec * sizeof(WT)) != 0) return false;
  if (bias && reinterpret_cast<uintptr_t>(bias) % (kVec * sizeof(WT)) != 0) return false;
  return true;
}

// Calls fn.template operator()<kTpr>() with the compile-time value of tpr (one of kTprChoices).
template <typename Fn>
void with_tpr(int tpr, Fn&& fn) {
  static_switch<8, 16, 32, 64, 128, 256, 512, 1024>(tpr, std::forward<Fn>(fn));
}

// Largest row (in 16-byte vectors) the forward register path covers with tpr threads.
inline int fwd_capacity(int tpr) { return tpr * (tpr == 1024 ? 8 : 4); }

template <typename T, typename WT, bool kRms>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const int nvec = p.hidden / kVec16<T>;
  if (registers_fit<T, WT>(p.x, p.y, p.weight, p.bias, p.hidden, fwd_capacity(1024))) {
    int tpr = 1024;
    for (int t : kTprChoices) {
      if (fwd_capacity(t) >= nvec) { tpr = t; break; }
    }
    with_tpr(tpr, [&]<int kTpr>() {
      constexpr int kThreads = threads_for_tpr<kTpr>();
      // Enough blocks to fill every SM many times over; the grid-stride loop takes the rest.
      const int64_t blocks = std::min<int64_t>(ceil_div(p.rows, kThreads / kTpr), int64_t(sm_count()) * 64);
      fwd_registers_kernel<T, WT, kRms, kTpr, kFwdIters<kTpr>><<<blocks, kThreads, 0, stream>>>(p);
    });
    return cudaGetLastError();
  }
  const int64_t blocks = std::min<int64_t>(p.rows, int64_t(sm_count()) * 16);
  fwd_general_kernel<T, WT, kRms><<<blocks, kGeneralThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// -------------------------------------------------------------------------------------------------
// Backward
//   xhat = (x - mean) * rstd,  g = dy * weight
//   dx = rstd * (g - mean(g * xhat) * xhat - mean(g))      (RMSNorm: no mean(g) term, mean = 0)
//   dweight = sum_rows dy * xhat,  dbias = sum_rows dy
// -------------------------------------------------------------------------------------------------

// Writes this block's column sums (acc, kIters x kVec per thread) to partials[blockIdx.x, :] through
// shared memory, adding the kThreads / kTpr row slots of the block in a fixed order.
template <int kTpr, int kThreads, int kIters, int kVec>
__device__ __forceinline__ void store_block_column_sums(const float (&acc)[kIters][kVec], float* tile,
                                                        float* partial_row, int nvec) {
  constexpr int kSlots = kThreads / kTpr;
  constexpr int kPad = kVec + 1;  // odd stride: lanes writing element j fall in different banks
  const int lane = threadIdx.x % kTpr;
  const int slot = threadIdx.x / kTpr;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kVec; ++j) tile[(slot * kTpr + lane) * kPad + j] = acc[i][j];
    __syncthreads();
    const int cols = (nvec - i * kTpr < kTpr ? nvec - i * kTpr : kTpr) * kVec;  // columns of vector block i in this row
    for (int k = threadIdx.x; k < cols; k += kThreads) {
      const int owner = k / kVec, j = k % kVec;
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) sum += tile[(s * kTpr + owner) * kPad + j];
      partial_row[i * kTpr * kVec + k] = sum;
    }
  }
}

// Each block walks its rows (persistent grid), keeping the dweight / dbias sums of its columns in
// registers. x and dy of the next row group are copied into shared memory (cp.async) while the current
// one is computed, so loads stay in flight through the reductions and stores.
template <typename T, typename WT, bool kRms, int kTpr, int kIters>
__global__ void __launch_bounds__(threads_for_tpr<kTpr>(), 768 / threads_for_tpr<kTpr>())
bwd_registers_kernel(const BwdParams p) {
  constexpr int kThreads = threads_for_tpr<kTpr>();
  constexpr int kRowsPerBlock = kThreads / kTpr;
  constexpr int kVec = kVec16<T>;
  __shared__ float scratch[kThreads / 32];
  extern __shared__ uint4 staged_smem[];
  const RowStager<T, kTpr, kIters, 2> stager{staged_smem};

  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const WT* weight = static_cast<const WT*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const int lane = threadIdx.x % kTpr;
  const int slot = threadIdx.x / kTpr;
  const int nvec = p.hidden / kVec;
  const float inv_hidden = 1.f / p.hidden;
  const bool want_dw = p.dweight != nullptr, want_db = p.dbias != nullptr;
  const int64_t stride = int64_t(gridDim.x) * kRowsPerBlock;
  const T* const sources[2] = {x, dy};

  float dw_acc[kIters][kVec] = {};
  float db_acc[kIters][kVec] = {};

  int stage = 0;
  stager.prefetch(sources, int64_t(blockIdx.x) * kRowsPerBlock, stage, p.rows, p.hidden);
  for (int64_t first = int64_t(blockIdx.x) * kRowsPerBlock; first < p.rows; first += stride, stage ^= 1) {
    stager.prefetch(sources, first + stride, stage ^ 1, p.rows, p.hidden);
    cp_async_wait<1>();
    const int64_t row = first + slot;
    const bool row_ok = row < p.rows;
    const int64_t row_offset = row * p.hidden;

    Vec<T, kVec> xv[kIters], gv[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      xv[i] = stager.get(stage, i, 0);
      gv[i] = stager.get(stage, i, 1);
    }
    const float mean = (!kRms && row_ok) ? p.mean[row] : 0.f;
    const float rstd = row_ok ? p.rstd[row] : 0.f;

    float sum_gx = 0.f, sum_g = 0.f;  // sum(g * xhat), sum(g)
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = i * kTpr + lane;
      if (!(row_ok && c < nvec)) continue;
      Vec<WT, kVec> w;
      if (weight) w.load(weight + c * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float xhat = (xv[i].get(j) - mean) * rstd;
        const float d = gv[i].get(j);
        const float g = weight ? d * w.get(j) : d;
        sum_gx += g * xhat;
        sum_g += g;
        dw_acc[i][j] += d * xhat;
        db_acc[i][j] += d;
      }
    }
    const float c_gx = group_sum<kTpr, kThreads>(sum_gx, scratch) * inv_hidden;
    const float c_g = kRms ? 0.f : group_sum<kTpr, kThreads>(sum_g, scratch) * inv_hidden;

#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = i * kTpr + lane;
      if (!(row_ok && c < nvec)) continue;
      Vec<WT, kVec> w;
      if (weight) w.load(weight + c * kVec);
      Vec<T, kVec> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float xhat = (xv[i].get(j) - mean) * rstd;
        const float d = gv[i].get(j);
        const float g = weight ? d * w.get(j) : d;
        out.set(j, rstd * (g - c_gx * xhat - c_g));
      }
      out.store(dx + row_offset + c * kVec);
    }
  }
  cp_async_wait<0>();  // the last prefetch (past the end: zero fill only) before the block exits

  if (!want_dw && !want_db) return;
  __shared__ float tile[kThreads * (kVec + 1)];
  float* dw_partials = p.partials;
  float* db_partials = p.partials + int64_t(gridDim.x) * p.hidden;
  if (want_dw)
    store_block_column_sums<kTpr, kThreads, kIters, kVec>(dw_acc, tile, dw_partials + int64_t(blockIdx.x) * p.hidden,
                                                          nvec);
  if (want_db)
    store_block_column_sums<kTpr, kThreads, kIters, kVec>(db_acc, tile, db_partials + int64_t(blockIdx.x) * p.hidden,
                                                          nvec);
}

// dx for any hidden size: one block per row, the row re-read for the second pass.
template <typename T, typename WT, bool kRms>
__global__ void __launch_bounds__(kGeneralThreads) bwd_dx_general_kernel(const BwdParams p) {
  __shared__ float scratch[kGeneralThreads / 32];
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const WT* weight = static_cast<const WT*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const int hidden = p.hidden;
  const float inv_hidden = 1.f / hidden;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t off = row * hidden;
    const float mean = kRms ? 0.f : p.mean[row];
    const float rstd = p.rstd[row];
    float sum_gx = 0.f, sum_g = 0.f;
    for (int c = threadIdx.x; c < hidden; c += kGeneralThreads) {
      const float xhat = (to_float(x[off + c]) - mean) * rstd;
      const float g = weight ? to_float(dy[off + c]) * to_float(weight[c]) : to_float(dy[off + c]);
      sum_gx += g * xhat;
      sum_g += g;
    }
    const float c_gx = block_sum<kGeneralThreads>(sum_gx, scratch) * inv_hidden;
    const float c_g = kRms ? 0.f : block_sum<kGeneralThreads>(sum_g, scratch) * inv_hidden;
    for (int c = threadIdx.x; c < hidden; c += kGeneralThreads) {
      const float xhat = (to_float(x[off + c]) - mean) * rstd;
      const float g = weight ? to_float(dy[off + c]) * to_float(weight[c]) : to_float(dy[off + c]);
      dx[off + c] = from_float<T>(rstd * (g - c_gx * xhat - c_g));
    }
  }
}

// dweight / dbias sums for any hidden size: block (32 columns) x (8 row lanes) over one chunk of rows;
// partials[chunk, col] gets the chunk's sum.
constexpr int kColTile = 32, kRowLanes = 8;

template <typename T, bool kRms>
__global__ void __launch_bounds__(kColTile * kRowLanes) bwd_dwdb_general_kernel(const BwdParams p, int64_t rows_per_chunk) {
  __shared__ float tile[2][kRowLanes][kColTile + 1];
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < p.rows ? begin + rows_per_chunk : p.rows;

  float dw = 0.f, db = 0.f;
  if (col < p.hidden) {
    for (int64_t row = begin + threadIdx.y; row < end; row += kRowLanes) {
      const float d = to_float(dy[row * p.hidden + col]);
      const float mean = kRms ? 0.f : p.mean[row];
      dw += d * (to_float(x[row * p.hidden + col]) - mean) * p.rstd[row];
      db += d;
    }
  }
  tile[0][threadIdx.y][threadIdx.x] = dw;
  tile[1][threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y < 2 && col < p.hidden) {
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < kRowLanes; ++r) sum += tile[threadIdx.y][r][threadIdx.x];
    float* out = p.partials + (int64_t(threadIdx.y) * gridDim.y + blockIdx.y) * p.hidden;
    out[col] = sum;
  }
}

// out[which][col] = sum over r of partials[which][r][col], r in a fixed order; which 0 = dweight, 1 = dbias.
template <typename WT>
__global__ void __launch_bounds__(kColTile * 32) reduce_partials_kernel(const float* partials, int num_rows, int hidden,
                                                                        WT* dweight, WT* dbias) {
  __shared__ float tile[32][kColTile + 1];
  WT* out = blockIdx.y == 0 ? dweight : dbias;
  if (out == nullptr) return;  // uniform across the block
  const float* src = partials + int64_t(blockIdx.y) * num_rows * hidden;
  const int col = blockIdx.x * kColTile + threadIdx.x;
  float sum = 0.f;
  if (col < hidden) {
    for (int r = threadIdx.y; r < num_rows; r += 32) sum += src[int64_t(r) * hidden + col];
  }
  tile[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    float total = 0.f;
#pragma unroll 8
    for (int r = 0; r < 32; ++r) total += tile[r][threadIdx.x];
    out[col] = from_float<WT>(total);
  }
}

// How the backward splits the rows, shared by the launcher and the workspace query.
struct BwdPlan {
  bool registers;
  int tpr;                 // register path
  int64_t blocks;          // register path: persistent blocks; general path: row chunks
  int64_t rows_per_chunk;  // general path
  int64_t partial_rows() const { return blocks; }
};

template <typename T, typename WT, bool kRms>
BwdPlan plan_bwd(const BwdParams& p) {
  BwdPlan plan{};
  const int nvec = p.hidden / kVec16<T>;
  plan.registers = registers_fit<T, WT>(p.x, p.dy, p.weight, nullptr, p.hidden, kBwdMaxTpr * kBwdIters<T>) &&
                   aligned16(p.dx);
  if (plan.registers) {
    for (int t : kTprChoices) {
      if (t * kBwdIters<T> >= nvec) { plan.tpr = t; break; }
    }
    int blocks_per_sm = 1;
    with_tpr(plan.tpr, [&]<int kTpr>() {
      if constexpr (kTpr <= kBwdMaxTpr) {
        blocks_per_sm = resident_blocks<bwd_registers_kernel<T, WT, kRms, kTpr, kBwdIters<T>>, threads_for_tpr<kTpr>(),
                                        RowStager<T, kTpr, kBwdIters<T>, 2>::kBytes>();
      }
    });
    const int64_t rows_per_block = threads_for_tpr_host(plan.tpr) / plan.tpr;
    // Persistent: as many blocks as are resident at once; each keeps its dweight / dbias sums in registers.
    plan.blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(p.rows, rows_per_block),
                                                         int64_t(sm_count()) * blocks_per_sm));
  } else {
    const int64_t col_tiles = ceil_div(p.hidden, kColTile);
    const int64_t target_chunks = std::max<int64_t>(1, int64_t(sm_count()) * 8 / col_tiles);
    plan.blocks = std::max<int64_t>(1, std::min<int64_t>(target_chunks, ceil_div(p.rows, 64)));
    plan.rows_per_chunk = ceil_div(p.rows, plan.blocks);
  }
  return plan;
}

template <typename T, typename WT, bool kRms>
int64_t bwd_workspace(const BwdParams& p) {
  if (p.rows == 0 || (p.dweight == nullptr && p.dbias == nullptr)) return 0;
  return 2 * plan_bwd<T, WT, kRms>(p).partial_rows() * p.hidden;
}

template <typename T, typename WT, bool kRms>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) {
    // Sums over no rows: zero gradients for the parameters.
    if (p.dweight) cudaMemsetAsync(p.dweight, 0, sizeof(WT) * p.hidden, stream);
    if (p.dbias) cudaMemsetAsync(p.dbias, 0, sizeof(WT) * p.hidden, stream);
    return cudaGetLastError();
  }
  const BwdPlan plan = plan_bwd<T, WT, kRms>(p);
  const bool want_sums = p.dweight != nullptr || p.dbias != nullptr;
  if (plan.registers) {
    with_tpr(plan.tpr, [&]<int kTpr>() {
      if constexpr (kTpr <= kBwdMaxTpr) {
        constexpr int kSmem = RowStager<T, kTpr, kBwdIters<T>, 2>::kBytes;
        constexpr auto kernel = bwd_registers_kernel<T, WT, kRms, kTpr, kBwdIters<T>>;
        resident_blocks<kernel, threads_for_tpr<kTpr>(), kSmem>();  // the shared-memory opt-in, on this device
        kernel<<<plan.blocks, threads_for_tpr<kTpr>(), kSmem, stream>>>(p);
      }
    });
  } else {
    const int64_t blocks = std::min<int64_t>(p.rows, int64_t(sm_count()) * 16);
    bwd_dx_general_kernel<T, WT, kRms><<<blocks, kGeneralThreads, 0, stream>>>(p);
    if (want_sums) {
      const dim3 grid(ceil_div(p.hidden, kColTile), plan.blocks);
      bwd_dwdb_general_kernel<T, kRms><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(p, plan.rows_per_chunk);
    }
  }
  if (want_sums) {
    const dim3 grid(ceil_div(p.hidden, kColTile), 2);
    reduce_partials_kernel<WT><<<grid, dim3(kColTile, 32), 0, stream>>>(
        p.partials, plan.partial_rows(), p.hidden, static_cast<WT*>(p.dweight), static_cast<WT*>(p.dbias));
  }
  return cudaGetLastError();
}

}  // namespace fusedkernels::norm
