// LayerNorm / RMSNorm kernels and their launchers, templated on the input type T, the weight type WT
// (T or float), the residual type RT (T or float), kRms and kAdd. norm_{fwd,bwd}_<dtype>.cu and
// add_norm_{fwd,bwd}_<dtype>.cu instantiate them; norm_dispatch.cu picks one.
//
// kAdd (add + norm): the row normalized is h = residual + dropout(x + x_bias), computed in fp32 and rounded
// to RT as it is written out (the new residual); the statistics and y come from the rounded h, so
// y = norm(residual_out) exactly. The backward starts from the saved h (no x, no mask stored): the dropout
// mask is regenerated from the Philox seed and offset the forward used.
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
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/device/cp_async.cuh"
#include "common/device/pdl.cuh"
#include "common/device/philox.cuh"
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
// Add + norm holds x, the residual and h while it loads a row: 32 B of h per thread (twice the threads per
// row), so that it too fits the forward's register budget below; past 2048 vectors the general kernel runs.
template <bool kAdd, int kTpr>
constexpr int kFwdIters = kAdd ? 2 : kTpr == 1024 ? 8 : 4;
constexpr int kFwdMaxTpr = 1024;
// The forward is built for this many resident threads per SM (launch bounds: at most 42 registers a thread;
// 65536 / 1536). A sweep over threads per row, vectors per thread and occupancy on the H200 (docs/perf-notes.md,
// norm v6) found occupancy decides add + norm's: 1536 threads beat 1024 by 5-17% and the unbounded build (78-98
// registers: 2-3 blocks of 256 per SM) by 28-34%; 2048 (32 registers) spills its h. The plain norms measured
// within a few % either way. A float32 residual stream doubles h's registers: 1024 threads for it.
template <typename T, typename RT, bool kAdd, int kThreads>
constexpr int kFwdMinBlocks = std::max(1, ((kAdd && sizeof(RT) > sizeof(T)) ? 1024 : 1536) / kThreads);
// Add + norm rows of 16-bit types that three vectors a thread cover with fewer idle slots than two (H = 768,
// 1536, 3072: 96, 192, 384 vectors, which two vectors a thread round up to 128, 256, 512) take half the threads
// with three vectors each, at 1280 threads per SM (48 registers; at 1536 h spills). Sweep on the H200
// (docs/perf-notes.md, add + norm v4): add_ln 65536x768 116.1 -> 108.7 us, add_rms 109.8 -> 106.9.
constexpr int kAddFwdWideIters = 3;
template <typename T, typename RT>
constexpr bool kAddFwdWideTypes = sizeof(T) == 2 && sizeof(RT) == 2;
template <int kThreads>
constexpr int kAddFwdWideMinBlocks = std::max(1, 1280 / kThreads);
// Full-row forward instances (fwd_registers_kernel's kFullRow): rows of 16-bit types, the weight, bias and
// residual in x's type, that kTpr threads of kIters vectors cover exactly (H = 768, 1024, 1536, 2048, 3072,
// 4096, ...; add + norm without bias and dropout). The plain norms' hold the weight and bias with the row (64
// registers) at 1024 threads per SM, in blocks of one warp or one row. Sweep on the H200 (docs/perf-notes.md,
// norm v9, add + norm v5): LN / RMS 16384x1024 forward 20.8 / 20.1 -> 18.8 / 18.8 us, add_ln 16384x4096 141.8 -> 135.3.
template <typename T, typename WT, typename RT>
constexpr bool kFullRowTypes = sizeof(T) == 2 && std::is_same_v<WT, T> && std::is_same_v<RT, T>;
constexpr int kFullRowMaxTpr = 256;
template <int kTpr>
constexpr int kFullRowNormThreads = kTpr < 32 ? 32 : kTpr;
constexpr int kBwdMaxTpr = 512;
// The backward's 16-byte vectors per thread and resident threads per SM (its launch bounds). Default: 16 elements
// a thread (x, dy and the fp32 dweight / dbias sums for them fit 80 registers at 768 threads per SM; add + norm,
// also holding dresidual_out and dx_bias sums, 128 at 512). Narrow rows (16-bit types, at most
// kBwdNarrowUpTo<kAdd> vectors): a sweep on the H200 (docs/perf-notes.md, norm v7) found the plain norm faster with
// 32 elements a thread at 512 threads per SM, a warp per row, at H = 768 (-13% / -7%; more bytes in flight per row)
// but not at 1024 (+1-3%, and +4-6% in the suite), and add + norm with 8 elements at 1024 threads per SM at
// H = 768 / 1024 (-5 to -8%). kBwdNarrowVectors bounds the narrow instances.
constexpr int kBwdNarrowVectors = 128;
template <bool kAdd>
constexpr int kBwdNarrowUpTo = kAdd ? 128 : 96;
template <typename T, typename RT>
constexpr bool kBwdNarrowTypes = sizeof(T) == 2 && sizeof(RT) == 2;
template <typename T, bool kAdd, bool kNarrow>
constexpr int kBwdIters = !kNarrow ? 16 / kVec16<T> : kAdd ? 1 : 4;
template <bool kAdd, bool kNarrow>
constexpr int kBwdThreadsPerSm = !kNarrow ? (kAdd ? 512 : 768) : kAdd ? 1024 : 512;
constexpr int kGeneralThreads = 256;

template <int kTpr>
__host__ __device__ constexpr int threads_for_tpr() { return kTpr >= 256 ? kTpr : 256; }
inline int threads_for_tpr_host(int tpr) { return tpr >= 256 ? tpr : 256; }

// The type of the row a kernel normalizes: x, or (add + norm) h in the residual's type.
template <typename T, typename RT, bool kAdd>
using RowT = std::conditional_t<kAdd, RT, T>;

// Whether a backward wants any column sum: dweight, dbias (add + norm: or dx_bias).
template <typename P>
__host__ __device__ __forceinline__ bool wants_column_sums(const P& p) {
  if constexpr (std::is_same_v<P, AddBwdParams>) {
    if (p.dx_bias != nullptr) return true;
  }
  return p.dweight != nullptr || p.dbias != nullptr;
}

// Whether a call drops out (add + norm with p > 0).
template <typename P>
__host__ __device__ __forceinline__ bool has_dropout(const P& p) {
  if constexpr (std::is_same_v<P, AddFwdParams> || std::is_same_v<P, AddBwdParams>) {
    return p.dropout_p > 0.f;
  } else {
    return false;
  }
}

// Double-buffered staging of the row groups a backward block works on: while the block computes one
// group from shared memory, cp.async copies the next group's inputs in (one vector of kVec elements of each
// tensor Ts per thread and vector index, 16 or 32 bytes). Layout [stage][i][chunk][thread] of 16-byte
// chunks: each thread reads back only what it copied itself, so the wait needs no barrier, and a warp's
// 16-byte accesses are contiguous.
template <int kTpr, int kIters, int kVec, typename... Ts>
struct RowStager {
  static constexpr int kThreads = threads_for_tpr<kTpr>();
  static constexpr int kTensors = sizeof...(Ts);
  static constexpr int kSlots = (0 + ... + int(sizeof(Ts) * kVec / 16));  // 16-byte chunks per vector index
  static constexpr int kBytes = 2 * kIters * kSlots * kThreads * 16;
  template <int kWhich>
  using Elem = std::tuple_element_t<kWhich, std::tuple<Ts...>>;
  template <int kWhich>
  static constexpr int chunks() { return int(sizeof(Elem<kWhich>) * kVec / 16); }
  template <int kWhich>
  static constexpr int first_chunk() {
    if constexpr (kWhich == 0) {
      return 0;
    } else {
      return first_chunk<kWhich - 1>() + chunks<kWhich - 1>();
    }
  }

  uint4* smem;

  __device__ __forceinline__ uint4* at(int stage, int i, int chunk) const {
    return smem + ((stage * kIters + i) * kSlots + chunk) * kThreads + threadIdx.x;
  }
  // Starts copying the row of this thread's slot in the group at `first` (zeros past the end); a null
  // source is skipped (its chunks are not read back).
  __device__ __forceinline__ void prefetch(const void* const (&src)[kTensors], int64_t first, int stage, int64_t rows,
                                           int hidden) const {
    const int64_t row = first + threadIdx.x / kTpr;
    const int lane = threadIdx.x % kTpr;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = i * kTpr + lane;
      const bool ok = row < rows && c < hidden / kVec;
      const int64_t off = ok ? row * hidden + c * kVec : 0;
      [&]<int... kWhich>(std::integer_sequence<int, kWhich...>) {
        (copy<kWhich>(src[kWhich], off, stage, i, ok), ...);
      }(std::make_integer_sequence<int, kTensors>{});
    }
    cp_async_commit();
  }
  template <int kWhich>
  __device__ __forceinline__ void copy(const void* src, int64_t off, int stage, int i, bool ok) const {
    if (src == nullptr) return;
    const char* from = static_cast<const char*>(src) + off * int64_t(sizeof(Elem<kWhich>));
#pragma unroll
    for (int k = 0; k < chunks<kWhich>(); ++k) cp_async_16(at(stage, i, first_chunk<kWhich>() + k), from + 16 * k, ok);
  }
  template <int kWhich>
  __device__ __forceinline__ Vec<Elem<kWhich>, kVec> get(int stage, int i) const {
    Vec<Elem<kWhich>, kVec> v;
#pragma unroll
    for (int k = 0; k < chunks<kWhich>(); ++k) {
      const uint4 u = *at(stage, i, first_chunk<kWhich>() + k);
      v.w[4 * k] = u.x, v.w[4 * k + 1] = u.y, v.w[4 * k + 2] = u.z, v.w[4 * k + 3] = u.w;
    }
    return v;
  }
};

// The dropout of add + norm: element (row, col) of a call is kept when its 32-bit Philox draw is below
// keep_threshold(p), and then scaled by 1 / (1 - p). One draw (counter: col / 4, the row, the call's offset;
// key: the seed) covers columns 4k..4k+3 of a row, so every kernel path, forward and backward, draws the
// same mask from (seed, offset) alone.
struct RowDropout {
  uint2 key;
  uint32_t offset_lo, offset_hi;
  uint32_t threshold;
  float scale;

  __device__ __forceinline__ static RowDropout make(uint64_t seed, uint64_t offset, float p) {
    return {make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)),
            static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), keep_threshold(p), 1.0f / (1.0f - p)};
  }
  // Keep bits of columns col .. col + 3 of row (col a multiple of 4): bit k for column col + k.
  __device__ __forceinline__ unsigned keep4(int64_t row, int col) const {
    const uint64_t r = static_cast<uint64_t>(row);
    const uint4 d = philox4x32_10(make_uint4(static_cast<uint32_t>(col >> 2), static_cast<uint32_t>(r), offset_lo,
                                             offset_hi + static_cast<uint32_t>(r >> 32)),
                                  key);
    return unsigned(d.x < threshold) | unsigned(d.y < threshold) << 1 | unsigned(d.z < threshold) << 2 |
           unsigned(d.w < threshold) << 3;
  }
  __device__ __forceinline__ bool keep(int64_t row, int col) const { return (keep4(row, col & ~3) >> (col & 3)) & 1u; }
  // Keep bits of kVec columns from col (a multiple of 4).
  template <int kVec>
  __device__ __forceinline__ unsigned keep_vec(int64_t row, int col) const {
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < kVec; k += 4) bits |= keep4(row, col + k) << k;
    return bits;
  }
};

// The dropout of a forward call (p.dropout_p > 0): this call's seed and offset, which the first thread also
// writes to rng_state for the backward.
__device__ __forceinline__ RowDropout forward_dropout(const AddFwdParams& p) {
  uint64_t seed = 0, offset = 0;
  philox_seed_offset(p.philox, seed, offset);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.rng_state[0] = static_cast<int64_t>(seed);
    p.rng_state[1] = static_cast<int64_t>(offset);
  }
  return RowDropout::make(seed, offset, p.dropout_p);
}

__device__ __forceinline__ RowDropout backward_dropout(const AddBwdParams& p) {
  return RowDropout::make(static_cast<uint64_t>(p.rng_state[0]), static_cast<uint64_t>(p.rng_state[1]), p.dropout_p);
}

// h = residual + dropout(x + x_bias) of kVec columns from col, in fp32, rounded to RT.
template <typename T, typename RT, int kVec>
__device__ __forceinline__ Vec<RT, kVec> residual_sum(const Vec<T, kVec>& x, const Vec<RT, kVec>& residual,
                                                      const T* x_bias, bool dropout, const RowDropout& drop,
                                                      int64_t row, int col) {
  Vec<T, kVec> b;
  if (x_bias) b.load(x_bias + col);
  const unsigned keep = dropout ? drop.template keep_vec<kVec>(row, col) : ~0u;
  Vec<RT, kVec> h;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    float t = x_bias ? x.get(j) + b.get(j) : x.get(j);
    if (dropout) t = (keep >> j) & 1u ? t * drop.scale : 0.f;
    h.set(j, residual.get(j) + t);
  }
  return h;
}

// -------------------------------------------------------------------------------------------------
// Forward
// -------------------------------------------------------------------------------------------------

// One row group per block, loaded straight into registers. (Measured slower on the H200: a persistent
// grid staging the next group through shared memory, and forcing 64 registers; docs/perf-notes.md.) kThreads,
// a multiple of kTpr, is the block size (scripts/norm_sweep.cu sweeps it).
// kFullRow: every thread's kIters vectors lie in the row (hidden == kTpr * kIters * kVec), so no column is
// guarded and the code is one straight line; the plain norms' full-row instances also load the weight and bias
// with x, before the reductions (loaded after them, each vector's load waits on the previous vector's store).
// kBiasDropout: add + norm with a bias on x or dropout (else those paths are compiled out).
template <typename T, typename WT, typename RT, bool kRms, bool kAdd, int kTpr, int kIters,
          int kMinBlocks = kFwdMinBlocks<T, RT, kAdd, threads_for_tpr<kTpr>()>, int kThreads = threads_for_tpr<kTpr>(),
          bool kFullRow = false, bool kBiasDropout = kAdd>
__global__ void __launch_bounds__(kThreads, kMinBlocks) fwd_registers_kernel(const FwdParamsT<kAdd> p) {
  grid_dependency_wait();
  static_assert(kThreads % kTpr == 0 && kThreads % 32 == 0 && (kAdd || !kBiasDropout));
  constexpr bool kEarlyAffine = kFullRow && !kAdd;
  using HT = RowT<T, RT, kAdd>;
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
  const auto in_row = [nvec](int c) { return kFullRow || c < nvec; };  // column vector c is in the row
  const float inv_hidden = 1.f / p.hidden;
  [[maybe_unused]] const bool dropout = kBiasDropout && has_dropout(p);
  [[maybe_unused]] RowDropout drop{};
  if constexpr (kAdd) {
    if (dropout) drop = forward_dropout(p);
  }

  // Every thread runs the same number of iterations: the group sums need all of them.
  for (int64_t first = int64_t(blockIdx.x) * kRowsPerBlock; first < p.rows;
       first += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = first + slot;
    const bool row_ok = row < p.rows;
    const int64_t row_offset = row * p.hidden;

    Vec<HT, kVec> xv[kIters];  // xv[i] holds vector i * kTpr + lane of the row (add + norm: of h)
    if constexpr (kAdd) {
      const RT* residual = static_cast<const RT*>(p.residual);
      const T* x_bias = kBiasDropout ? static_cast<const T*>(p.x_bias) : nullptr;
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int c = i * kTpr + lane;
        if (!(row_ok && in_row(c))) continue;
        Vec<T, kVec> xi;
        Vec<RT, kVec> ri;
        xi.load(x + row_offset + c * kVec);
        ri.load(residual + row_offset + c * kVec);
        xv[i] = residual_sum(xi, ri, x_bias, dropout, drop, row, c * kVec);
      }
      // Stored after every load is issued: the compiler cannot move a load above a store it may alias.
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int c = i * kTpr + lane;
        if (row_ok && in_row(c)) xv[i].store(static_cast<RT*>(p.residual_out) + row_offset + c * kVec);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int c = i * kTpr + lane;
        if (row_ok && in_row(c)) xv[i].load(x + row_offset + c * kVec);
      }
    }
    [[maybe_unused]] Vec<WT, kVec> early_w[kEarlyAffine ? kIters : 1], early_b[kEarlyAffine ? kIters : 1];
    if constexpr (kEarlyAffine) {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        if (weight) early_w[i].load(weight + (i * kTpr + lane) * kVec);
        if (bias) early_b[i].load(bias + (i * kTpr + lane) * kVec);
      }
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
      } else if constexpr (kAdd) {  // h is not in memory yet for the other warps: through shared memory
        __shared__ float first_of_slot[kRowsPerBlock];
        if (lane == 0) first_of_slot[slot] = xv[0].get(0);
        __syncthreads();
        shift = first_of_slot[slot];
      } else {
        shift = row_ok ? to_float(x[row_offset]) : 0.f;
      }
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        if (row_ok && in_row(i * kTpr + lane)) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) sum += xv[i].get(j) - shift;
        }
      }
      mean = shift + group_sum<kTpr, kThreads>(sum, scratch) * inv_hidden;
    }
    float sq = 0.f;  // centred second moment: exact two-pass variance, the row is in registers anyway
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if (row_ok && in_row(i * kTpr + lane)) {
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
      if (!in_row(c)) continue;
      Vec<WT, kVec> w, b;
      if constexpr (kEarlyAffine) {
        w = early_w[i], b = early_b[i];
      } else {
        if (weight) w.load(weight + c * kVec);
        if (bias) b.load(bias + c * kVec);
      }
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

template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
__global__ void __launch_bounds__(kGeneralThreads) fwd_general_kernel(const FwdParamsT<kAdd> p) {
  grid_dependency_wait();
  using HT = RowT<T, RT, kAdd>;
  __shared__ float scratch[kGeneralThreads / 32];
  const WT* weight = static_cast<const WT*>(p.weight);
  const WT* bias = static_cast<const WT*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int hidden = p.hidden;
  const float inv_hidden = 1.f / hidden;
  [[maybe_unused]] const bool dropout = has_dropout(p);
  [[maybe_unused]] RowDropout drop{};
  if constexpr (kAdd) {
    if (dropout) drop = forward_dropout(p);
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const HT* xr;  // the row normalized: x, or h once written out
    if constexpr (kAdd) {
      const T* x = static_cast<const T*>(p.x) + row * hidden;
      const RT* residual = static_cast<const RT*>(p.residual) + row * hidden;
      const T* x_bias = static_cast<const T*>(p.x_bias);
      RT* h = static_cast<RT*>(p.residual_out) + row * hidden;
      for (int c = threadIdx.x; c < hidden; c += kGeneralThreads) {
        float t = x_bias ? to_float(x[c]) + to_float(x_bias[c]) : to_float(x[c]);
        if (dropout) t = drop.keep(row, c) ? t * drop.scale : 0.f;
        h[c] = from_float<RT>(to_float(residual[c]) + t);
      }
      __syncthreads();  // h[0], the shift below, is another thread's
      xr = h;
    } else {
      xr = static_cast<const T*>(p.x) + row * hidden;
    }
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
// `rows` are the row tensors (read or written), null ones skipped.
template <typename T, typename WT>
bool registers_fit(std::initializer_list<const void*> rows, const void* weight, const void* bias, int hidden,
                   int max_vectors) {
  constexpr int kVec = kVec16<T>;
  if (hidden % kVec != 0 || hidden / kVec > max_vectors) return false;
  for (const void* t : rows) {
    if (!aligned16(t)) return false;
  }
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
inline int fwd_capacity(bool add, int tpr) { return tpr * (add ? 2 : tpr == 1024 ? 8 : 4); }

// Launches the full-row instance (kFullRowTypes) for rows that kTpr threads cover exactly; false where none
// applies. wide: add + norm at kAddFwdWideIters vectors a thread.
template <typename T, bool kRms, bool kAdd, int kTpr>
bool launch_fwd_full_row(const FwdParamsT<kAdd>& p, bool wide, cudaStream_t stream) {
  const int nvec = p.hidden / kVec16<T>;
  const auto launch = [&]<int kIters, int kThreads, int kMinBlocks>() {
    if (nvec != kTpr * kIters) return false;
    // as many threads in the grid as the general instances launch
    const int64_t max_blocks = int64_t(sm_count()) * 64 * 256 / kThreads;
    const int64_t blocks = std::min<int64_t>(ceil_div(p.rows, kThreads / kTpr), max_blocks);
    launch_with_pdl(fwd_registers_kernel<T, T, T, kRms, kAdd, kTpr, kIters, kMinBlocks, kThreads, true, false>, blocks,
                    kThreads, 0, stream, p);
    return true;
  };
  if constexpr (kAdd) {
    if (p.x_bias || has_dropout(p)) return false;
    constexpr int kThreads = threads_for_tpr<kTpr>();
    if (wide) return launch.template operator()<kAddFwdWideIters, kThreads, kAddFwdWideMinBlocks<kThreads>>();
    return launch.template operator()<kFwdIters<kAdd, kTpr>, kThreads, kFwdMinBlocks<T, T, kAdd, kThreads>>();
  } else {
    constexpr int kThreads = kFullRowNormThreads<kTpr>;
    return launch.template operator()<4, kThreads, 1024 / kThreads>() ||
           launch.template operator()<3, kThreads, 1024 / kThreads>();
  }
}

template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
cudaError_t launch_fwd(const FwdParamsT<kAdd>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const int nvec = p.hidden / kVec16<T>;
  bool fits = registers_fit<T, WT>({p.x, p.y}, p.weight, p.bias, p.hidden, fwd_capacity(kAdd, kFwdMaxTpr));
  if constexpr (kAdd) fits = fits && aligned16(p.residual) && aligned16(p.residual_out) && aligned16(p.x_bias);
  if (fits) {
    int tpr = kFwdMaxTpr;
    for (int t : kTprChoices) {
      if (fwd_capacity(kAdd, t) >= nvec) { tpr = t; break; }
    }
    bool wide = false;  // kAddFwdWideIters vectors a thread at fewer threads per row
    if constexpr (kAdd && kAddFwdWideTypes<T, RT>) {
      for (int t : kTprChoices) {
        if (kAddFwdWideIters * t >= nvec) {
          wide = kAddFwdWideIters * t < fwd_capacity(kAdd, tpr);
          if (wide) tpr = t;
          break;
        }
      }
    }
    with_tpr(tpr, [&]<int kTpr>() {
      if constexpr (kFullRowTypes<T, WT, RT> && kTpr <= kFullRowMaxTpr) {
        if (launch_fwd_full_row<T, kRms, kAdd, kTpr>(p, wide, stream)) return;
      }
      constexpr int kThreads = threads_for_tpr<kTpr>();
      // Enough blocks to fill every SM many times over; the grid-stride loop takes the rest.
      const int64_t blocks = std::min<int64_t>(ceil_div(p.rows, kThreads / kTpr), int64_t(sm_count()) * 64);
      if constexpr (kAdd && kAddFwdWideTypes<T, RT> && kTpr < kFwdMaxTpr) {
        if (wide) {
          launch_with_pdl(fwd_registers_kernel<T, WT, RT, kRms, kAdd, kTpr, kAddFwdWideIters, kAddFwdWideMinBlocks<kThreads>>,
                          blocks, kThreads, 0, stream, p);
          return;
        }
      }
      launch_with_pdl(fwd_registers_kernel<T, WT, RT, kRms, kAdd, kTpr, kFwdIters<kAdd, kTpr>>, blocks, kThreads, 0, stream,
                      p);
    });
    return cudaGetLastError();
  }
  const int64_t blocks = std::min<int64_t>(p.rows, int64_t(sm_count()) * 16);
  launch_with_pdl(fwd_general_kernel<T, WT, RT, kRms, kAdd>, blocks, kGeneralThreads, 0, stream, p);
  return cudaGetLastError();
}

// -------------------------------------------------------------------------------------------------
// Backward
//   xhat = (x - mean) * rstd,  g = dy * weight
//   dx = rstd * (g - mean(g * xhat) * xhat - mean(g))      (RMSNorm: no mean(g) term, mean = 0)
//   dweight = sum_rows dy * xhat,  dbias = sum_rows dy
// Add + norm: x is h; dh = dx above + dresidual_out, dresidual = dh, dx = mask * dh / (1 - p),
//   dx_bias = sum_rows dx
// -------------------------------------------------------------------------------------------------

// Column sums a backward keeps per block: dweight, dbias (and, add + norm, dx_bias).
constexpr int column_sums(bool add) { return add ? 3 : 2; }

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

// What the backward stages per row group: x and dy; add + norm: h, dy and dresidual_out.
template <typename T, typename RT, bool kAdd, int kTpr, int kIters>
using BwdStager = std::conditional_t<kAdd, RowStager<kTpr, kIters, kVec16<T>, RT, T, RT>,
                                     RowStager<kTpr, kIters, kVec16<T>, T, T>>;

// Blocks per SM the backward's registers are sized for (kBwdThreadsPerSm).
template <bool kAdd, bool kNarrow, int kThreads>
constexpr int bwd_min_blocks() { return std::max(1, kBwdThreadsPerSm<kAdd, kNarrow> / kThreads); }

// Each block walks its rows (persistent grid), keeping the column sums of its columns in registers. The
// inputs of the next row group are copied into shared memory (cp.async) while the current one is computed,
// so loads stay in flight through the reductions and stores.
template <typename T, typename WT, typename RT, bool kRms, bool kAdd, int kTpr, int kIters, int kMinBlocks>
__global__ void __launch_bounds__(threads_for_tpr<kTpr>(), kMinBlocks)
bwd_registers_kernel(const BwdParamsT<kAdd> p) {
  grid_dependency_wait();
  using HT = RowT<T, RT, kAdd>;
  constexpr int kThreads = threads_for_tpr<kTpr>();
  constexpr int kRowsPerBlock = kThreads / kTpr;
  constexpr int kVec = kVec16<T>;
  __shared__ float scratch[kThreads / 32];
  extern __shared__ uint4 staged_smem[];
  const BwdStager<T, RT, kAdd, kTpr, kIters> stager{staged_smem};

  const T* dy = static_cast<const T*>(p.dy);
  const WT* weight = static_cast<const WT*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const int lane = threadIdx.x % kTpr;
  const int slot = threadIdx.x / kTpr;
  const int nvec = p.hidden / kVec;
  const float inv_hidden = 1.f / p.hidden;
  const bool want_dw = p.dweight != nullptr, want_db = p.dbias != nullptr;
  const bool has_dy = !kAdd || dy != nullptr;  // add + norm: y may have no grad, only the new residual
  const int64_t stride = int64_t(gridDim.x) * kRowsPerBlock;
  [[maybe_unused]] const bool dropout = has_dropout(p);
  [[maybe_unused]] RowDropout drop{};
  if constexpr (kAdd) {
    if (dropout) drop = backward_dropout(p);
  }
  const void* sources[BwdStager<T, RT, kAdd, kTpr, kIters>::kTensors];
  sources[0] = p.x;
  sources[1] = p.dy;
  if constexpr (kAdd) sources[2] = p.dresidual_out;

  float dw_acc[kIters][kVec] = {};
  float db_acc[kIters][kVec] = {};
  [[maybe_unused]] float dxb_acc[kAdd ? kIters : 1][kVec] = {};

  int stage = 0;
  stager.prefetch(sources, int64_t(blockIdx.x) * kRowsPerBlock, stage, p.rows, p.hidden);
  for (int64_t first = int64_t(blockIdx.x) * kRowsPerBlock; first < p.rows; first += stride, stage ^= 1) {
    stager.prefetch(sources, first + stride, stage ^ 1, p.rows, p.hidden);
    cp_async_wait<1>();
    const int64_t row = first + slot;
    const bool row_ok = row < p.rows;
    const int64_t row_offset = row * p.hidden;

    Vec<HT, kVec> xv[kIters];
    Vec<T, kVec> gv[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      xv[i] = stager.template get<0>(stage, i);
      if (has_dy) gv[i] = stager.template get<1>(stage, i);
    }
    const float mean = (!kRms && row_ok) ? p.mean[row] : 0.f;
    const float rstd = row_ok ? p.rstd[row] : 0.f;

    float sum_gx = 0.f, sum_g = 0.f;  // sum(g * xhat), sum(g)
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = i * kTpr + lane;
      if (!(row_ok && c < nvec && has_dy)) continue;
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
      float dn[kVec];  // the norm's input grad
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float xhat = (xv[i].get(j) - mean) * rstd;
        const float d = gv[i].get(j);
        const float g = weight ? d * w.get(j) : d;
        dn[j] = has_dy ? rstd * (g - c_gx * xhat - c_g) : 0.f;
      }
      Vec<T, kVec> out;
      if constexpr (kAdd) {
        Vec<RT, kVec> dres;
        if (p.dresidual_out) dres = stager.template get<2>(stage, i);
        const unsigned keep = dropout ? drop.template keep_vec<kVec>(row, c * kVec) : ~0u;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float dh = p.dresidual_out ? dn[j] + dres.get(j) : dn[j];
          dres.set(j, dh);
          const float d = !dropout ? dh : (keep >> j) & 1u ? dh * drop.scale : 0.f;
          dxb_acc[i][j] += d;
          out.set(j, d);
        }
        if (p.dresidual) dres.store(static_cast<RT*>(p.dresidual) + row_offset + c * kVec);
        if (dx) out.store(dx + row_offset + c * kVec);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) out.set(j, dn[j]);
        out.store(dx + row_offset + c * kVec);
      }
    }
  }
  cp_async_wait<0>();  // the last prefetch (past the end: zero fill only) before the block exits

  if (!wants_column_sums(p)) return;
  __shared__ float tile[kThreads * (kVec + 1)];
  const int64_t region = int64_t(gridDim.x) * p.hidden;  // one per column sum
  float* partial_row = p.partials + int64_t(blockIdx.x) * p.hidden;
  if (want_dw) store_block_column_sums<kTpr, kThreads, kIters, kVec>(dw_acc, tile, partial_row, nvec);
  if (want_db) store_block_column_sums<kTpr, kThreads, kIters, kVec>(db_acc, tile, partial_row + region, nvec);
  if constexpr (kAdd) {
    if (p.dx_bias) store_block_column_sums<kTpr, kThreads, kIters, kVec>(dxb_acc, tile, partial_row + 2 * region, nvec);
  }
}

// dx for any hidden size: one block per row, the row re-read for the second pass.
template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
__global__ void __launch_bounds__(kGeneralThreads) bwd_dx_general_kernel(const BwdParamsT<kAdd> p) {
  grid_dependency_wait();
  using HT = RowT<T, RT, kAdd>;
  __shared__ float scratch[kGeneralThreads / 32];
  const HT* x = static_cast<const HT*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const WT* weight = static_cast<const WT*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const int hidden = p.hidden;
  const float inv_hidden = 1.f / hidden;
  const bool has_dy = !kAdd || dy != nullptr;
  [[maybe_unused]] const bool dropout = has_dropout(p);
  [[maybe_unused]] RowDropout drop{};
  if constexpr (kAdd) {
    if (dropout) drop = backward_dropout(p);
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t off = row * hidden;
    const float mean = kRms ? 0.f : p.mean[row];
    const float rstd = p.rstd[row];
    float sum_gx = 0.f, sum_g = 0.f;
    for (int c = threadIdx.x; c < hidden && has_dy; c += kGeneralThreads) {
      const float xhat = (to_float(x[off + c]) - mean) * rstd;
      const float g = weight ? to_float(dy[off + c]) * to_float(weight[c]) : to_float(dy[off + c]);
      sum_gx += g * xhat;
      sum_g += g;
    }
    const float c_gx = block_sum<kGeneralThreads>(sum_gx, scratch) * inv_hidden;
    const float c_g = kRms ? 0.f : block_sum<kGeneralThreads>(sum_g, scratch) * inv_hidden;
    for (int c = threadIdx.x; c < hidden; c += kGeneralThreads) {
      float d = 0.f;
      if (has_dy) {
        const float xhat = (to_float(x[off + c]) - mean) * rstd;
        const float g = weight ? to_float(dy[off + c]) * to_float(weight[c]) : to_float(dy[off + c]);
        d = rstd * (g - c_gx * xhat - c_g);
      }
      if constexpr (kAdd) {
        if (p.dresidual_out) d += to_float(static_cast<const RT*>(p.dresidual_out)[off + c]);
        if (p.dresidual) static_cast<RT*>(p.dresidual)[off + c] = from_float<RT>(d);
        if (dropout) d = drop.keep(row, c) ? d * drop.scale : 0.f;
        if (dx) dx[off + c] = from_float<T>(d);
      } else {
        dx[off + c] = from_float<T>(d);
      }
    }
  }
}

// Column sums for any hidden size: block (32 columns) x (8 row lanes) over one chunk of rows;
// partials[which, chunk, col] gets the chunk's sum of dweight (which 0), dbias (1) and, add + norm, dx_bias
// (2, from dx as bwd_dx_general_kernel wrote it).
constexpr int kColTile = 32, kRowLanes = 8;

template <typename T, typename RT, bool kRms, bool kAdd>
__global__ void __launch_bounds__(kColTile * kRowLanes) bwd_dwdb_general_kernel(const BwdParamsT<kAdd> p, int64_t rows_per_chunk) {
  grid_dependency_wait();
  using HT = RowT<T, RT, kAdd>;
  constexpr int kSums = column_sums(kAdd);
  __shared__ float tile[kSums][kRowLanes][kColTile + 1];
  const HT* x = static_cast<const HT*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < p.rows ? begin + rows_per_chunk : p.rows;
  const bool has_dy = !kAdd || dy != nullptr;

  float sums[kSums] = {};
  if (col < p.hidden) {
    for (int64_t row = begin + threadIdx.y; row < end; row += kRowLanes) {
      if (has_dy) {
        const float d = to_float(dy[row * p.hidden + col]);
        const float mean = kRms ? 0.f : p.mean[row];
        sums[0] += d * (to_float(x[row * p.hidden + col]) - mean) * p.rstd[row];
        sums[1] += d;
      }
      if constexpr (kAdd) {
        if (p.dx_bias) sums[2] += to_float(static_cast<const T*>(p.dx)[row * p.hidden + col]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kSums; ++k) tile[k][threadIdx.y][threadIdx.x] = sums[k];
  __syncthreads();
  if (threadIdx.y < kSums && col < p.hidden) {
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < kRowLanes; ++r) sum += tile[threadIdx.y][r][threadIdx.x];
    float* out = p.partials + (int64_t(threadIdx.y) * gridDim.y + blockIdx.y) * p.hidden;
    out[col] = sum;
  }
}

// out[which][col] = sum over r of partials[which][r][col], r in a fixed order; which 0 = first, 1 = second
// (each skipped when null).
template <typename OT>
__global__ void __launch_bounds__(kColTile * 32) reduce_partials_kernel(const float* partials, int num_rows, int hidden,
                                                                        OT* first, OT* second) {
  grid_dependency_wait();
  __shared__ float tile[32][kColTile + 1];
  OT* out = blockIdx.y == 0 ? first : second;
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
    out[col] = from_float<OT>(total);
  }
}

// How the backward splits the rows, shared by the launcher and the workspace query.
struct BwdPlan {
  bool registers;
  bool narrow;             // register path: kBwdNarrowUpTo<kAdd> or fewer 16-byte vectors of 16-bit types
  int tpr;                 // register path
  int64_t blocks;          // register path: persistent blocks; general path: row chunks
  int64_t rows_per_chunk;  // general path
  int64_t partial_rows() const { return blocks; }
};

template <typename T, typename WT, typename RT, bool kRms, bool kAdd, int kTpr, bool kNarrow>
constexpr auto bwd_registers_kernel_for =
    bwd_registers_kernel<T, WT, RT, kRms, kAdd, kTpr, kBwdIters<T, kAdd, kNarrow>,
                         bwd_min_blocks<kAdd, kNarrow, threads_for_tpr<kTpr>()>()>;
template <typename T, typename RT, bool kAdd, int kTpr, bool kNarrow>
constexpr int kBwdSmem = BwdStager<T, RT, kAdd, kTpr, kBwdIters<T, kAdd, kNarrow>>::kBytes;

// Calls fn.template operator()<kTpr, kNarrow>() for the plan's register-path kernel (instantiated only for the
// thread counts each variant can be given).
template <typename T, typename RT, bool kAdd, typename Fn>
void with_bwd_kernel(const BwdPlan& plan, Fn&& fn) {
  with_tpr(plan.tpr, [&]<int kTpr>() {
    if constexpr (kTpr <= kBwdMaxTpr) {
      if constexpr (kBwdNarrowTypes<T, RT> && kTpr * kBwdIters<T, kAdd, true> <= kBwdNarrowVectors) {
        if (plan.narrow) return fn.template operator()<kTpr, true>();
      }
      fn.template operator()<kTpr, false>();
    }
  });
}

template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
BwdPlan plan_bwd(const BwdParamsT<kAdd>& p) {
  BwdPlan plan{};
  const int nvec = p.hidden / kVec16<T>;
  plan.registers = registers_fit<T, WT>({p.x, p.dy, p.dx}, p.weight, nullptr, p.hidden,
                                        kBwdMaxTpr * kBwdIters<T, kAdd, false>);
  if constexpr (kAdd) plan.registers = plan.registers && aligned16(p.dresidual_out) && aligned16(p.dresidual);
  if (plan.registers) {
    plan.narrow = kBwdNarrowTypes<T, RT> && nvec <= kBwdNarrowUpTo<kAdd>;
    const int iters = plan.narrow ? kBwdIters<T, kAdd, true> : kBwdIters<T, kAdd, false>;
    for (int t : kTprChoices) {
      if (t * iters >= nvec) { plan.tpr = t; break; }
    }
    int blocks_per_sm = 1;
    with_bwd_kernel<T, RT, kAdd>(plan, [&]<int kTpr, bool kNarrow>() {
      blocks_per_sm = resident_blocks<bwd_registers_kernel_for<T, WT, RT, kRms, kAdd, kTpr, kNarrow>,
                                      threads_for_tpr<kTpr>(), kBwdSmem<T, RT, kAdd, kTpr, kNarrow>>();
    });
    const int64_t rows_per_block = threads_for_tpr_host(plan.tpr) / plan.tpr;
    // Persistent: as many blocks as are resident at once; each keeps its column sums in registers.
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

template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
int64_t bwd_workspace(const BwdParamsT<kAdd>& p) {
  if (p.rows == 0 || !wants_column_sums(p)) return 0;
  return column_sums(kAdd) * plan_bwd<T, WT, RT, kRms, kAdd>(p).partial_rows() * p.hidden;
}

template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
cudaError_t launch_bwd(const BwdParamsT<kAdd>& p, cudaStream_t stream) {
  if (p.rows == 0) {
    // Sums over no rows: zero gradients for the parameters.
    if (p.dweight) cudaMemsetAsync(p.dweight, 0, sizeof(WT) * p.hidden, stream);
    if (p.dbias) cudaMemsetAsync(p.dbias, 0, sizeof(WT) * p.hidden, stream);
    if constexpr (kAdd) {
      if (p.dx_bias) cudaMemsetAsync(p.dx_bias, 0, sizeof(T) * p.hidden, stream);
    }
    return cudaGetLastError();
  }
  const BwdPlan plan = plan_bwd<T, WT, RT, kRms, kAdd>(p);
  const bool want_sums = wants_column_sums(p);
  if (plan.registers) {
    with_bwd_kernel<T, RT, kAdd>(plan, [&]<int kTpr, bool kNarrow>() {
      constexpr int kSmem = kBwdSmem<T, RT, kAdd, kTpr, kNarrow>;
      constexpr auto kernel = bwd_registers_kernel_for<T, WT, RT, kRms, kAdd, kTpr, kNarrow>;
      // The shared-memory opt-in, on this device. Needed even at kSmem <= 48 KiB: the limit without it
      // counts the static arrays too (scratch, and the column-sum tile of kThreads * (kVec + 1) floats),
      // and add + norm with a 16-bit residual stages exactly 48 KiB at 256 threads (2 stages x 2 vectors x
      // 3 tensors x 256 threads x 16 B) beside a 9 KiB tile: "invalid argument" before resident_blocks
      // opted in for any dynamic size (it did only past 48 KiB of dynamic memory).
      resident_blocks<kernel, threads_for_tpr<kTpr>(), kSmem>();
      launch_with_pdl(kernel, plan.blocks, threads_for_tpr<kTpr>(), kSmem, stream, p);
    });
  } else {
    const int64_t blocks = std::min<int64_t>(p.rows, int64_t(sm_count()) * 16);
    launch_with_pdl(bwd_dx_general_kernel<T, WT, RT, kRms, kAdd>, blocks, kGeneralThreads, 0, stream, p);
    if (want_sums) {
      const dim3 grid(ceil_div(p.hidden, kColTile), plan.blocks);
      launch_with_pdl(bwd_dwdb_general_kernel<T, RT, kRms, kAdd>, grid, dim3(kColTile, kRowLanes), 0, stream, p,
                      plan.rows_per_chunk);
    }
  }
  if (p.dweight || p.dbias) {
    const dim3 grid(ceil_div(p.hidden, kColTile), 2);
    launch_with_pdl(reduce_partials_kernel<WT>, grid, dim3(kColTile, 32), 0, stream, p.partials,
                    int(plan.partial_rows()), p.hidden, static_cast<WT*>(p.dweight), static_cast<WT*>(p.dbias));
  }
  if constexpr (kAdd) {
    if (p.dx_bias) {
      const dim3 grid(ceil_div(p.hidden, kColTile), 1);
      launch_with_pdl(reduce_partials_kernel<T>, grid, dim3(kColTile, 32), 0, stream,
                      p.partials + 2 * plan.partial_rows() * p.hidden, int(plan.partial_rows()),
                      p.hidden, static_cast<T*>(p.dx_bias), static_cast<T*>(nullptr));
    }
  }
  return cudaGetLastError();
}

}  // namespace fusedkernels::norm
