// The portable GEMM with a fused epilogue (mma.sync; sm_80 and newer): out = act(x W^T + bias) + residual.
//
// One CTA per 128 x 256 tile of x W^T (128 output columns in the gated form: the tile's first 128 columns are
// the gate's, the last 128 the up projection's), eight warps of 64 x 64. K is walked in slices of 32 through a
// ring of kStages shared-memory stages that cp.async fills kStages - 1 slices ahead of the tensor cores; each
// warp feeds mma.sync m16n8k16 from ldmatrix, loading the next k16 step's fragments while the current one
// multiplies. The epilogue stages the fp32 accumulators in shared memory, half the tile at a time, then
// applies bias, activation and residual to 8 consecutive columns per thread: every global access is a 16-byte
// one and a warp covers whole rows. docs/gemm.md draws it.
#pragma once

#include <cstdint>

#include "common/device/cp_async.cuh"
#include "common/device/mma.cuh"
#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "gemm/activation.cuh"
#include "gemm/gemm.h"
#include "gemm/tile_order.cuh"

namespace fusedkernels::gemm {

template <typename T_>
struct LinearActSm80Config {
  using T = T_;
  // 64 x 64 warp tiles: per k16 step a warp issues 8 ldmatrix.x4 for 32 MMAs, so on the A100 (per SM and clock
  // 128 bytes of shared memory, 1024 fp16 FMAs) the ldmatrix reads and cp.async writes keep shared memory ~70%
  // as busy as the tensor cores; 64 x 32 warp tiles (a 128 x 128 CTA) would keep it as busy as the MMAs.
  static constexpr int kBlockM = 128, kBlockN = 256, kBlockK = 32, kStages = 4;
  static constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpN = kBlockN / kWarpsN;
  static constexpr int kMTiles = kBlockM / kWarpsM / 16, kNTiles = kWarpN / 8;  // a warp's m16 and n8 tiles
  static constexpr int kABytes = kBlockM * kBlockK * 2, kStageBytes = (kBlockM + kBlockN) * kBlockK * 2;
  // The epilogue's fp32 half tile, rows padded by 8 floats: the fragment pairs a half-warp writes (rows g = 0..3,
  // columns 2t) then fall on distinct banks.
  static constexpr int kStagedRows = kBlockM / 2, kStagedPitch = kBlockN + 8;
  // 96 KiB: within the 99 KiB a block may have on sm_86 / sm_89.
  static constexpr int kSmemBytes = std::max(kStages * kStageBytes, kStagedRows * kStagedPitch * 4);
  // Tiles of this many consecutive m-blocks run together (all their n-blocks), so the W slices they share
  // stay in L2.
  static constexpr int kGroupM = 8;
  static_assert(kBlockK == 32, "swizzled() is for 64-byte rows");
  static_assert(kWarpsM == 2 && kMTiles == 4, "m_tile_row() gives each warp two m-tiles in each half of the tile");
};

namespace sm80 {

// Byte offset of 16-byte chunk `chunk` (of 4) of row `row` of an operand tile whose rows are 64 bytes (32
// elements of K). The chunk is XORed with bits 1-2 of the row, so the eight rows an ldmatrix phase reads
// (one chunk of rows r..r+7, r a multiple of 8) fall on eight different 16-byte bank groups.
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * 64 + ((chunk ^ (row >> 1)) & 3) * 16; }

// The first row of m-tile mt of warp row warp_m: its m-tiles 0, 1 lie in the tile's first half, 2, 3 in the
// second, so the epilogue stages one half (two m-tiles of every warp) at a time.
template <typename Cfg>
__device__ __forceinline__ int m_tile_row(int mt, int warp_m) {
  return (mt / 2) * Cfg::kStagedRows + warp_m * 32 + (mt % 2) * 16;
}

// Accumulator m-tiles 2 kHalf and 2 kHalf + 1 into the staged half: element (g (+8), 2t (+1)) of n-tile nt at
// row m_tile_row - 64 kHalf, column kWarpN warp_n + 8 nt.
template <typename Cfg, int kHalf>
__device__ __forceinline__ void stage_half(float* staged, const float (&acc)[Cfg::kMTiles][Cfg::kNTiles][4],
                                           int warp_m, int warp_n, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int mt = 2 * kHalf + i, row = m_tile_row<Cfg>(mt, warp_m) - kHalf * Cfg::kStagedRows + g;
#pragma unroll
    for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
      float* at = staged + row * Cfg::kStagedPitch + warp_n * Cfg::kWarpN + 8 * nt + 2 * t;
      *reinterpret_cast<float2*>(at) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(at + 8 * Cfg::kStagedPitch) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
}

// The 8 staged floats of 16-byte chunk `chunk` of a row, from `at`. Chunks c and c + 4 start on the same bank
// (32 floats apart); eight lanes read eight consecutive chunks per phase, and those with bit 2 of the chunk
// set read their second four floats first, so the phase covers all 32 banks.
__device__ __forceinline__ void read_staged(const float* at, int chunk, float (&v)[8]) {
  const int first = (chunk >> 2) & 1;
  const float4 a = *reinterpret_cast<const float4*>(at + 4 * first);
  const float4 b = *reinterpret_cast<const float4*>(at + 4 * (first ^ 1));
  const float4 lo = first ? b : a, hi = first ? a : b;
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}

// v += 8 elements at `from` (16-byte aligned).
template <typename T>
__device__ __forceinline__ void add8(float (&v)[8], const T* from) {
  Vec<T, 8> in;
  in.load(from);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] += in.get(e);
}

// v rounded to T (kept in fp32): z as F.linear returns it, which the activation then takes, as eager PyTorch's does.
template <typename T>
__device__ __forceinline__ void round8(float (&v)[8]) {
#pragma unroll
  for (int e = 0; e < 8; e += 2) {
    const float2 rounded = unpack2<T>(pack2<T>(v[e], v[e + 1]));
    v[e] = rounded.x;
    v[e + 1] = rounded.y;
  }
}

// 8 elements rounded to T, one 16-byte store.
template <typename T>
__device__ __forceinline__ void store8(T* to, const float (&v)[8]) {
  Vec<T, 8> out;
#pragma unroll
  for (int e = 0; e < 4; ++e) out.w[e] = pack2<T>(v[2 * e], v[2 * e + 1]);
  out.store(to);
}

// The staged half's rows into global memory from (row0, col0): z = acc + bias rounded to T, pre-activation z, out =
// act(z) + residual, or gated act(z_gate) * z_up + residual (epilogue_output: the Hopper kernel's arithmetic). Thread
// by thread, consecutive 16-byte chunks of a row: a warp reads and writes 512 (gated 2 x 256) contiguous bytes of
// each array.
template <typename Cfg, Activation kAct, bool kGated>
__device__ __forceinline__ void store_half(const LinearActParams& p, const float* staged, int64_t row0, int64_t col0) {
  using T = typename Cfg::T;
  constexpr int kCols = kGated ? Cfg::kBlockN / 2 : Cfg::kBlockN, kChunks = kCols / 8;  // of the output
  const T* bias = static_cast<const T*>(p.bias);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  T* pre = static_cast<T*>(p.pre_activation);
  // Four chunks' loads in flight at a time; a full unroll runs out of registers beside the accumulators of the
  // half still to stage.
#pragma unroll 4
  for (int i = 0; i < Cfg::kStagedRows * kChunks / Cfg::kThreads; ++i) {
    const int c = threadIdx.x + i * Cfg::kThreads, r = c / kChunks, chunk = c % kChunks;
    const int64_t row = row0 + r, col = col0 + 8 * chunk;
    if (row >= p.m || col >= p.n) continue;  // n is a multiple of 8: a chunk is all in or all out
    const float* at = staged + r * Cfg::kStagedPitch + 8 * chunk;
    float z[8], up[8] = {}, res[8] = {}, y[8];
    read_staged(at, chunk, z);
    if (bias != nullptr) add8(z, bias + col);
    round8<T>(z);
    if (pre != nullptr) store8(pre + row * p.pre_activation_row_stride + col, z);
    if constexpr (kGated) {
      read_staged(at + kCols, chunk, up);
      if (bias != nullptr) add8(up, bias + p.n + col);
      round8<T>(up);
      if (pre != nullptr) store8(pre + row * p.pre_activation_row_stride + p.n + col, up);
    }
    if (residual != nullptr) add8(res, residual + row * p.residual_row_stride + col);
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] = epilogue_output<kAct, kGated>(z[e], up[e], res[e], residual != nullptr, false);
    store8(out + row * p.out_row_stride + col, y);
  }
}

// The tile's epilogue: each half staged by every warp, then stored by every thread. The pipeline's stages are
// free by now (the caller's barrier), and hold the staged half.
template <typename Cfg, Activation kAct>
__device__ __forceinline__ void epilogue(const LinearActParams& p, const float (&acc)[Cfg::kMTiles][Cfg::kNTiles][4],
                                         float* staged, int64_t row0, int64_t col0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
#pragma unroll 1
  for (int half = 0; half < 2; ++half) {
    if (half == 0) {
      stage_half<Cfg, 0>(staged, acc, warp_m, warp_n, lane);
    } else {
      __syncthreads();  // every thread has stored the first half
      stage_half<Cfg, 1>(staged, acc, warp_m, warp_n, lane);
    }
    __syncthreads();
    const int64_t rows = row0 + half * Cfg::kStagedRows;
    if (p.gated) {
      store_half<Cfg, kAct, true>(p, staged, rows, col0);
    } else {
      store_half<Cfg, kAct, false>(p, staged, rows, col0);
    }
  }
}

}  // namespace sm80

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) linear_act_sm80_kernel(const LinearActParams p) {
  using T = typename Cfg::T;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK, kStages = Cfg::kStages;
  constexpr int kMTiles = Cfg::kMTiles, kNTiles = Cfg::kNTiles, kSteps = kBlockK / 16;
  static_assert(kSteps % 2 == 0, "fragment buffers alternate by k16 step, the same ones in every slice");
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
  const int out_cols = p.gated ? kBlockN / 2 : kBlockN;  // output columns of a tile
  const int tiles_m = int((p.m + kBlockM - 1) / kBlockM), tiles_n = int((p.n + out_cols - 1) / out_cols);
  int m_block, n_block;
  tile_of<Cfg::kGroupM>(blockIdx.x, tiles_m, tiles_n, m_block, n_block);
  const int64_t row0 = int64_t(m_block) * kBlockM, col0 = int64_t(n_block) * out_cols;

  // This thread's part of each stage: chunk `chunk` (8 elements of K) of the tile's x rows first + 64 i and W
  // rows first + 64 j. W's tile rows are output columns col0 + r; gated, rows 128.. are the up projection's, n
  // weight rows further down. Rows past the matrix, and chunks past k, land as zeros.
  constexpr int kRowsPerPass = Cfg::kThreads / 4, kAPasses = kBlockM / kRowsPerPass, kBPasses = kBlockN / kRowsPerPass;
  const int chunk = tid % 4, first = tid / 4;
  const T* a_src[kAPasses];
  const T* b_src[kBPasses];
  bool a_in[kAPasses], b_in[kBPasses];
#pragma unroll
  for (int i = 0; i < kAPasses; ++i) {
    const int64_t row = row0 + first + kRowsPerPass * i;
    a_in[i] = row < p.m;
    a_src[i] = static_cast<const T*>(p.x) + (a_in[i] ? row : 0) * p.x_row_stride + 8 * chunk;
  }
#pragma unroll
  for (int j = 0; j < kBPasses; ++j) {
    const int r = first + kRowsPerPass * j;
    const bool up = p.gated && r >= kBlockN / 2;
    const int64_t col = col0 + (up ? r - kBlockN / 2 : r);
    b_in[j] = col < p.n;
    b_src[j] = static_cast<const T*>(p.weight) + (b_in[j] ? (up ? p.n : 0) + col : 0) * p.weight_row_stride + 8 * chunk;
  }
  const auto load_slice = [&](int ks) {
    uint8_t* a = smem + (ks % kStages) * Cfg::kStageBytes;
    uint8_t* b = a + Cfg::kABytes;
    const int k0 = ks * kBlockK;
    const bool k_in = k0 + 8 * chunk < p.k;
#pragma unroll
    for (int i = 0; i < kAPasses; ++i) {
      const bool in = a_in[i] && k_in;
      cp_async_16(a + sm80::swizzled(first + kRowsPerPass * i, chunk), in ? a_src[i] + k0 : a_src[i], in);
    }
#pragma unroll
    for (int j = 0; j < kBPasses; ++j) {
      const bool in = b_in[j] && k_in;
      cp_async_16(b + sm80::swizzled(first + kRowsPerPass * j, chunk), in ? b_src[j] + k0 : b_src[j], in);
    }
  };

  // Fragments of one k16 step, two sets: lane l addresses row l % 16 of an A m-tile (chunk 2 kk + l / 16: the
  // four 8 x 8 matrices in a0..a3 order) and row l % 8 + 8 (l / 16) of a pair of B n-tiles (chunk 2 kk + (l / 8)
  // % 2: b0, b1 of the first n-tile, then of the second).
  uint32_t a_frag[2][kMTiles][4], b_frag[2][kNTiles / 2][4];
  const auto load_fragments = [&](int set, int stage, int kk) {
    const uint8_t* a = smem + stage * Cfg::kStageBytes;
    const uint8_t* b = a + Cfg::kABytes;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const int row = sm80::m_tile_row<Cfg>(mt, warp_m) + lane % 16;
      ldmatrix_x4(a_frag[set][mt], a + sm80::swizzled(row, 2 * kk + lane / 16));
    }
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      const int row = warp_n * Cfg::kWarpN + 16 * np + lane % 8 + 8 * (lane / 16);
      ldmatrix_x4(b_frag[set][np], b + sm80::swizzled(row, 2 * kk + (lane / 8) % 2));
    }
  };

  float acc[kMTiles][kNTiles][4] = {};
  const int k_slices = int((p.k + kBlockK - 1) / kBlockK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_slices) load_slice(s);
    cp_async_commit();  // empty groups too: the waits below count kStages - 1 groups ahead
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();
  load_fragments(0, 0, 0);
  for (int ks = 0; ks < k_slices; ++ks) {
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      if (kk == 0) {  // the stage of slice ks - 1: every warp read its last fragments before the previous barrier
        if (ks + kStages - 1 < k_slices) load_slice(ks + kStages - 1);
        cp_async_commit();
      }
      if (kk == kSteps - 1) {  // slice ks + 1 has landed, and every warp is done with slice ks's stage
        cp_async_wait<kStages - 2>();
        __syncthreads();
        load_fragments((kk + 1) % 2, (ks + 1) % kStages, 0);
      } else {
        load_fragments((kk + 1) % 2, ks % kStages, kk + 1);
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          const uint32_t(&b)[4] = b_frag[kk % 2][np];
          mma_16x8x16<T>(acc[mt][2 * np], a_frag[kk % 2][mt], b[0], b[1]);
          mma_16x8x16<T>(acc[mt][2 * np + 1], a_frag[kk % 2][mt], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();  // (only empty groups are left)
  __syncthreads();     // every warp is past its last ldmatrix: the stages hold the epilogue's staged halves

  float* staged = reinterpret_cast<float*>(smem);
  switch (p.activation) {
    case Activation::kRelu: sm80::epilogue<Cfg, Activation::kRelu>(p, acc, staged, row0, col0); break;
    case Activation::kGelu: sm80::epilogue<Cfg, Activation::kGelu>(p, acc, staged, row0, col0); break;
    case Activation::kGeluTanh: sm80::epilogue<Cfg, Activation::kGeluTanh>(p, acc, staged, row0, col0); break;
    case Activation::kSilu: sm80::epilogue<Cfg, Activation::kSilu>(p, acc, staged, row0, col0); break;
    case Activation::kSquaredRelu: sm80::epilogue<Cfg, Activation::kSquaredRelu>(p, acc, staged, row0, col0); break;
    default: sm80::epilogue<Cfg, Activation::kNone>(p, acc, staged, row0, col0); break;
  }
}

template <typename T>
bool linear_act_sm80_available() {
  return compute_capability() >= 80 && has_image_for_current_device<linear_act_sm80_kernel<LinearActSm80Config<T>>>();
}

template <typename T>
cudaError_t launch_linear_act_sm80(const LinearActParams& p, cudaStream_t stream) {
  using Cfg = LinearActSm80Config<T>;
  constexpr auto kKernel = linear_act_sm80_kernel<Cfg>;
  const int out_cols = p.gated ? Cfg::kBlockN / 2 : Cfg::kBlockN;
  const int64_t tiles = ceil_div(p.m, Cfg::kBlockM) * ceil_div(p.n, out_cols);
  if (tiles == 0) return cudaSuccess;
  resident_blocks<kKernel, Cfg::kThreads, Cfg::kSmemBytes>();  // raises the shared-memory limit
  kKernel<<<unsigned(tiles), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fusedkernels::gemm

#define FUSEDKERNELS_LINEAR_ACT_SM80_INSTANCE(T)                                \
  template bool fusedkernels::gemm::linear_act_sm80_available<T>();            \
  template cudaError_t fusedkernels::gemm::launch_linear_act_sm80<T>(const fusedkernels::gemm::LinearActParams&, \
                                                                      cudaStream_t);
