// Pieces the forward and backward kernels share: where a sequence lives, which keys a query sees, tile
// loads into padded shared memory, dropout's keep decision. The algorithm is described in docs/attention.md.
#pragma once

#include <cstdint>

#include "attention/attention.h"
#include "common/device/cp_async.cuh"
#include "common/device/mma.cuh"
#include "common/device/philox.cuh"
#include "common/device/reduce.cuh"
#include "common/device/vec.cuh"

namespace fusedkernels::attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ int ceil_div_device(int a, int b) { return (a + b - 1) / b; }

// Shared-memory rows are padded by 16 bytes: eight consecutive rows of an ldmatrix then start on eight
// different bank groups, for every head dim, with no swizzle to get wrong.
__host__ __device__ constexpr int padded(int elements) { return elements + 8; }

// One sequence of the batch: its first packed row (varlen) and its lengths.
struct Seq {
  int64_t q_row0 = 0, k_row0 = 0;
  int len_q = 0, len_k = 0;
};

__device__ __forceinline__ Seq sequence(const FwdParams& p, int b) {
  Seq s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.k_row0 = p.cu_seqlens_k[b];
    s.len_q = p.cu_seqlens_q[b + 1] - static_cast<int>(s.q_row0);
    s.len_k = p.cu_seqlens_k[b + 1] - static_cast<int>(s.k_row0);
  } else {
    s.len_q = p.seqlen_q;
    s.len_k = p.seqlen_k;
  }
  return s;
}

// Element offset of row `row0` of head `h` of sequence b in a [batch, row, head, dim] tensor.
__device__ __forceinline__ int64_t offset_of(const Strides& s, int b, int64_t row0, int h) {
  return b * s.batch + row0 * s.row + h * s.head;
}

// The visible band: query i sees key j when lo(i) <= j <= hi(i), j < len_k. Causal is a right bound of 0.
struct Band {
  int left, right;  // -1: unbounded
  int len_k;

  // window_right >= 0 is never tighter than causal's 0, so causal alone sets the right bound.
  __device__ __forceinline__ Band(const FwdParams& p, int len_k_)
      : left(p.window_left), right(p.causal ? 0 : p.window_right), len_k(len_k_) {}

  // (bitwise, not short-circuit: one predicate chain, no branches)
  __device__ __forceinline__ bool visible(int i, int j) const {
    return (j < len_k) & ((right < 0) | (j <= i + right)) & ((left < 0) | (j >= i - left));
  }
  // Keys [begin, end) that some query of [q0, q1) sees (q1 > q0).
  __device__ __forceinline__ int key_begin(int q0) const { return left < 0 ? 0 : max(0, q0 - left); }
  __device__ __forceinline__ int key_end(int q1) const {
    return right < 0 ? len_k : static_cast<int>(min(int64_t(len_k), int64_t(q1) + right));
  }
  // Queries [begin, end) (within len_q) that see some key of [k0, k1).
  __device__ __forceinline__ int query_begin(int k0) const { return right < 0 ? 0 : max(0, k0 - right); }
  __device__ __forceinline__ int query_end(int k1, int len_q) const {
    return left < 0 ? len_q : static_cast<int>(min(int64_t(len_q), int64_t(k1) + left));
  }
  // Whether every query of [q0, q1) sees every key of [k0, k1): the tile needs no per-element mask.
  __device__ __forceinline__ bool covers(int q0, int q1, int k0, int k1) const {
    return k1 <= len_k && (right < 0 || k1 - 1 <= q0 + right) && (left < 0 || k0 >= q1 - 1 - left);
  }
};

// Copies rows [0, kRows) of a tile whose rows are `stride` elements apart and kCols elements wide (a multiple
// of 8) into shared memory with pitch padded(kCols); rows at or past `valid` become zeros (so a partial tile
// contributes nothing to a product, instead of whatever the memory holds).
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int valid, int tid) {
  constexpr int kChunks = kCols / 8, kSteps = (kRows * kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int c = tid + step * kThreads;
    if (kRows * kChunks % kThreads != 0 && c >= kRows * kChunks) break;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < valid;
    cp_async_16(smem + r * padded(kCols) + col, ok ? gmem + r * stride + col : gmem, ok);
  }
}

// Bias tile [kRows, kCols] at (row, col) -> smem[row * padded(kCols) + col]: 16-byte copies when the rows
// are 16-byte aligned, element loads otherwise; zeros outside [rows, cols).
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_bias_tile(T* smem, const T* gmem, int64_t stride, int rows, int cols,
                                               bool aligned, int tid) {
  constexpr int kChunks = kCols / 8, kSteps = (kRows * kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int c = tid + step * kThreads;
    if (kRows * kChunks % kThreads != 0 && c >= kRows * kChunks) break;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    T* dst = smem + r * padded(kCols) + col;
    if (aligned && (r >= rows || col + 8 <= cols)) {
      const bool ok = r < rows && col < cols;
      cp_async_16(dst, ok ? gmem + r * stride + col : gmem, ok);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dst[e] = r < rows && col + e < cols ? gmem[r * stride + col + e] : from_float<T>(0.0f);
      }
    }
  }
}

// Dropout: Philox keyed by the seed; one draw covers keys 4c..4c+3 of query i in sequence-and-head bh, its
// counter (4c's group, i, offset + bh) unique per element across calls (the op reserves batch * heads_q
// offsets per call). keep(2t) and keep(2t+1) of a fragment come from one draw.
struct Dropout {
  uint2 key;
  uint64_t offset;  // offset + bh
  uint32_t threshold;  // keep when the draw is below: (1 - p) * 2^32
  float rescale;       // 1 / (1 - p)

  __device__ __forceinline__ Dropout(uint64_t seed, uint64_t offset_, int bh, float p)
      : key(make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32))),
        offset(offset_ + bh),
        threshold(keep_threshold(p)),
        rescale(1.0f / (1.0f - p)) {}

  // Keep bits of keys j and j + 1 (j even) of query i: bit 0 for j, bit 1 for j + 1.
  __device__ __forceinline__ unsigned keep_pair(int i, int j) const {
    const uint4 r = philox4x32_10(make_uint4(static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i),
                                             static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)),
                                  key);
    const uint32_t a = (j & 2) ? r.z : r.x, b = (j & 2) ? r.w : r.y;
    return (a < threshold ? 1u : 0u) | (b < threshold ? 2u : 0u);
  }
};

// fn(n, e) for each element e of each of the kN 16x8 accumulator fragments a lane holds, unrolled.
template <int kN, typename Fn>
__device__ __forceinline__ void for_each_element(Fn&& fn) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) fn(n, e);
  }
}

}  // namespace fusedkernels::attention
