// Pieces the Hopper attention kernels share: tile loads into the 128B-swizzled layout wgmma reads, and the
// bias tile's layout.
#pragma once

#include <cuda.h>  // CUtensorMap

#include "attention/attention_common.cuh"
#include "common/host/tma.h"
#include "common/device/sm90.cuh"
#include "common/device/wgmma.cuh"

namespace fusedkernels::attention {

// Rows [0, kRows) of a [rows, kD] tile whose rows are `stride` elements apart into the swizzled layout;
// rows at or past `valid` become zeros.
template <int kRows, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_swizzled(uint8_t* tile, const T* gmem, int64_t stride, int valid, int tid) {
  constexpr int kChunks = kD / 8, kSteps = kRows * kChunks / kThreads;
  static_assert(kSteps * kThreads == kRows * kChunks);
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int c = tid + step * kThreads, r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < valid;
    cp_async_16(tile + sm90::swizzled(r, col, kRows), ok ? gmem + r * stride + col : gmem, ok);
  }
}

// Byte offset of (row, key) in a bias tile of kKeys-key rows (2 * kKeys bytes, unpadded) whose 16-byte
// chunks are XOR-permuted by the row: chunk c of row r at c ^ (r % 8). A warp's softmax reads the 32-bit pair
// (row 8i + g, keys 8 nt + 2t, +1), g = 0..7, t = 0..3: bank ((nt ^ g) % 8) * 4 + t, 32 distinct banks
// (unswizzled, the 8 rows would share one bank group: rows are 256 bytes apart).
template <int kKeys>
__host__ __device__ constexpr uint32_t bias_swizzled(int row, int key) {
  return uint32_t(row * kKeys * 2 + (((key / 8) ^ (row % 8)) * 16) + (key % 8) * 2);
}

// Bias tile [kRows, kKeys] whose rows are `stride` elements apart into the swizzled layout: 16-byte copies
// when the rows are 16-byte aligned and the chunk lies inside [rows, cols) or wholly in rows past `rows`,
// element loads otherwise; zeros (bits 0) outside [rows, cols), as load_bias_tile.
template <int kRows, int kKeys, int kThreads, typename T>
__device__ __forceinline__ void load_bias_swizzled(uint8_t* tile, const T* gmem, int64_t stride, int rows, int cols,
                                                   bool aligned, int tid) {
  constexpr int kChunks = kKeys / 8, kSteps = kRows * kChunks / kThreads;
  static_assert(kSteps * kThreads == kRows * kChunks);
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int c = tid + step * kThreads, r = c / kChunks, col = (c % kChunks) * 8;
    uint8_t* dst = tile + bias_swizzled<kKeys>(r, col);
    if (aligned && (r >= rows || col + 8 <= cols)) {
      const bool ok = r < rows && col < cols;
      cp_async_16(dst, ok ? gmem + r * stride + col : gmem, ok);
    } else {  // gathered in registers, then one 16-byte store: the loads overlap
      uint32_t words[4] = {};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (r < rows && col + e < cols) words[e / 2] |= uint32_t(bits_of(gmem[r * stride + col + e])) << (16 * (e % 2));
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

// Asks L2 for a bias tile's rows some steps before their cp.async. K and V tiles are read by many CTAs and
// mostly come from L2; the bias is read once, from DRAM, and one step of cp.async lead did not cover that
// latency (docs/perf-notes.md, attention). One 128-byte line per thread and instruction: the bulk prefetch
// takes its address in a uniform register, which per-thread rows would serialise. A hint only; nothing is
// asked past the tile's valid rows and keys.
template <int kRows, int kKeys, int kThreads, typename T>
__device__ __forceinline__ void prefetch_bias_l2(const T* gmem, int64_t stride, int rows, int cols, int tid) {
  constexpr int kLineKeys = 128 / sizeof(T), kLines = kRows * (kKeys / kLineKeys);
  static_assert(kKeys % kLineKeys == 0);
#pragma unroll
  for (int line = tid; line < kLines; line += kThreads) {
    const int r = line / (kKeys / kLineKeys), col = (line % (kKeys / kLineKeys)) * kLineKeys;
    if (r < rows && col < cols) asm volatile("prefetch.global.L2 [%0];" ::"l"(gmem + r * stride + col));
  }
}

// 32 / 16 bits of shared memory at a shared-space address (the bias reads index by swizzled address
// arithmetic). volatile keeps them after the barrier that publishes the tile.
__device__ __forceinline__ uint32_t load_shared_u32(uint32_t address) {
  uint32_t value;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(value) : "r"(address));
  return value;
}

__device__ __forceinline__ uint16_t load_shared_u16(uint32_t address) {
  uint16_t value;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(value) : "r"(address));
  return value;
}

// The map of a [batch, rows, heads, head_dim] 16-bit tensor (q, k, v, out and their gradients; any strides TMA can
// describe) as (head_dim, rows, heads, batch), in boxes of 64 columns (128 bytes) by box_rows rows of one head.
inline bool make_rows_map(CUtensorMap* map, const void* base, const Strides& s, int64_t batch, int64_t rows,
                          int64_t heads, int head_dim, int box_rows) {
  const int64_t sizes[4] = {head_dim, rows, heads, batch};
  const int64_t strides[3] = {s.row * 2, s.head * 2, s.batch * 2};
  const int box[4] = {64, box_rows, 1, 1};
  return make_tensor_map(map, base, 4, sizes, strides, box);
}

// The bias's map as [batch, heads, query rows, keys] in boxes of 64 keys by box_rows rows, a broadcast batch or head
// a dimension of size 1 (read at 0, which the flags say): false for a bias broadcast over the query rows (row
// stride 0: TMA would read zeros past its one row) or one the driver cannot encode (rows not 16-byte aligned).
inline bool make_bias_map(const FwdParams& p, int box_rows, CUtensorMap* map, bool* batch_broadcast,
                          bool* head_broadcast) {
  const Strides& s = p.bias_strides;
  if (s.row == 0 && p.seqlen_q > 1) return false;
  *batch_broadcast = s.batch == 0;
  *head_broadcast = s.head == 0;
  const int64_t heads = *head_broadcast ? 1 : p.heads_q, batch = *batch_broadcast ? 1 : p.batch;
  const int64_t sizes[4] = {p.seqlen_k, p.seqlen_q, heads, batch};
  // byte strides; a broadcast (size 1) dimension's is never stepped, any multiple of 16 will do
  const int64_t row = s.row != 0 ? s.row * 2 : (p.seqlen_k * 2 + 15) / 16 * 16;
  const int64_t head = s.head != 0 ? s.head * 2 : row * p.seqlen_q;
  const int64_t strides[3] = {row, head, s.batch != 0 ? s.batch * 2 : head * heads};
  const int box[4] = {64, box_rows, 1, 1};
  return make_tensor_map(map, p.bias, 4, sizes, strides, box);
}

}  // namespace fusedkernels::attention
