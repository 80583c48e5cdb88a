// The Hopper GEMM with a fused epilogue (sm_90a): out = act(x W^T + bias) + residual.
//
// Persistent and warp-specialised: one CTA per SM walks output tiles of 64 x 256. Warpgroup 0 is the
// producer: one thread issues TMA copies of the x and W slices (64 columns of K each) into a ring of
// kStages shared-memory stages, each guarded by a "full" mbarrier (the copy engine completes it when the
// bytes land) and an "empty" one (the consumers arrive when they are done reading). Warpgroups 1 and 2 are
// the consumers: 64 rows of the tile each, the 64 x 256 accumulator in registers (128 a thread), fed by
// wgmma m64n256k16 straight from the swizzled stages, one k-slice's group in flight while the previous
// stage is released. After the last k-slice the consumers apply the epilogue in registers and store; the
// producer is meanwhile already filling stages for the next tile. docs/gemm.md draws it.
#pragma once

#include <cuda.h>  // CUtensorMap

#include "common/device/mma.cuh"  // pack2
#include "common/device/sm90.cuh"
#include "common/device/vec.cuh"
#include "common/device/wgmma.cuh"
#include "common/host/launch.h"
#include "common/host/tma.h"
#include "gemm/activation.cuh"
#include "gemm/gemm.h"

namespace fusedkernels::gemm {

template <typename T_>
struct LinearActSm90Config {
  using T = T_;
  // A tile is 64 x 256, one consumer warpgroup's: the two consumers take the CTA's tiles in turn.
  static constexpr int kBlockM = 64, kBlockN = 256, kBlockK = 64, kStages = 5;
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
  static constexpr int kABytes = kBlockM * kBlockK * 2, kBBytes = kBlockN * kBlockK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  // Stages, their barriers, and slack to align to the 1024-byte swizzle period.
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;
  // Tiles of this many consecutive m-blocks are walked together (all their n-blocks), so the W slices they
  // share stay in L2.
  static constexpr int kGroupM = 8;
};

// Tile `index` of a tiles_m x tiles_n grid, walked in groups of kGroupM m-blocks.
template <int kGroupM>
__device__ __forceinline__ void tile_of(int index, int tiles_m, int tiles_n, int& m_block, int& n_block) {
  const int group = index / (kGroupM * tiles_n), first_m = group * kGroupM;
  const int rows = min(kGroupM, tiles_m - first_m), within = index % (kGroupM * tiles_n);
  m_block = first_m + within % rows;
  n_block = within / rows;
}

// The epilogue of one consumer's 64 x 256 accumulator: rows row0 + 16 warp + g (+ 8), columns col0 + 8j + 2t
// (+ 1), as the accumulator layout has them (common/device/wgmma.cuh).
template <Activation kAct, typename T>
__device__ __forceinline__ void store_tile(const LinearActParams& p, const float (&acc)[128], int64_t row0,
                                           int64_t col0, int warp, int g, int t) {
  const T* bias = static_cast<const T*>(p.bias);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  T* pre = static_cast<T*>(p.pre_activation);
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int64_t col = col0 + 8 * j + 2 * t;
    if (col >= p.n) continue;  // n is a multiple of 8: a pair is all in or all out
    float b0 = 0.0f, b1 = 0.0f;
    if (bias != nullptr) {
      const uint32_t pair = *reinterpret_cast<const uint32_t*>(bias + col);
      b0 = to_float(from_bits<T>(pair & 0xffffu));
      b1 = to_float(from_bits<T>(pair >> 16));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row0 + 16 * warp + g + 8 * r;
      if (row >= p.m) continue;
      const float z0 = acc[4 * j + 2 * r] + b0, z1 = acc[4 * j + 2 * r + 1] + b1;
      if (pre != nullptr) *reinterpret_cast<uint32_t*>(pre + row * p.pre_activation_row_stride + col) = pack2<T>(z0, z1);
      float y0 = activate<kAct>(z0), y1 = activate<kAct>(z1);
      if (residual != nullptr) {
        const uint32_t pair = *reinterpret_cast<const uint32_t*>(residual + row * p.residual_row_stride + col);
        y0 += to_float(from_bits<T>(pair & 0xffffu));
        y1 += to_float(from_bits<T>(pair >> 16));
      }
      *reinterpret_cast<uint32_t*>(out + row * p.out_row_stride + col) = pack2<T>(y0, y1);
    }
  }
}

// The gated epilogue: accumulator columns 0..127 are the gate's and 128..255 the up projection's for the same
// 128 output columns col0 + 8j + 2t (+ 1), j < 16; out = act(gate + bg) * (up + bu) (+ residual).
template <Activation kAct, typename T>
__device__ __forceinline__ void store_gated_tile(const LinearActParams& p, const float (&acc)[128], int64_t row0,
                                                 int64_t col0, int warp, int g, int t) {
  const T* bias = static_cast<const T*>(p.bias);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  T* pre = static_cast<T*>(p.pre_activation);
  const auto pair_of = [](const T* at) {
    const uint32_t pair = *reinterpret_cast<const uint32_t*>(at);
    return make_float2(to_float(from_bits<T>(pair & 0xffffu)), to_float(from_bits<T>(pair >> 16)));
  };
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int64_t col = col0 + 8 * j + 2 * t;
    if (col >= p.n) continue;
    const float2 bg = bias != nullptr ? pair_of(bias + col) : make_float2(0.0f, 0.0f);
    const float2 bu = bias != nullptr ? pair_of(bias + p.n + col) : make_float2(0.0f, 0.0f);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row0 + 16 * warp + g + 8 * r;
      if (row >= p.m) continue;
      const float g0 = acc[4 * j + 2 * r] + bg.x, g1 = acc[4 * j + 2 * r + 1] + bg.y;
      const float u0 = acc[4 * (j + 16) + 2 * r] + bu.x, u1 = acc[4 * (j + 16) + 2 * r + 1] + bu.y;
      if (pre != nullptr) {
        *reinterpret_cast<uint32_t*>(pre + row * p.pre_activation_row_stride + col) = pack2<T>(g0, g1);
        *reinterpret_cast<uint32_t*>(pre + row * p.pre_activation_row_stride + p.n + col) = pack2<T>(u0, u1);
      }
      float y0 = activate<kAct>(g0) * u0, y1 = activate<kAct>(g1) * u1;
      if (residual != nullptr) {
        const float2 res = pair_of(residual + row * p.residual_row_stride + col);
        y0 += res.x;
        y1 += res.y;
      }
      *reinterpret_cast<uint32_t*>(out + row * p.out_row_stride + col) = pack2<T>(y0, y1);
    }
  }
}

template <Activation kAct, typename T>
__device__ __forceinline__ void epilogue(const LinearActParams& p, const float (&acc)[128], int64_t row0,
                                         int64_t col0, int warp, int g, int t) {
  if (p.gated) {
    store_gated_tile<kAct, T>(p, acc, row0, col0, warp, g, t);
  } else {
    store_tile<kAct, T>(p, acc, row0, col0, warp, g, t);
  }
}

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    linear_act_sm90_kernel(const LinearActParams p, const __grid_constant__ CUtensorMap x_map,
                           const __grid_constant__ CUtensorMap w_map) {
#if FUSEDKERNELS_SM90A
  using T = typename Cfg::T;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK, kStages = Cfg::kStages;

  extern __shared__ unsigned char smem_raw[];
  uint8_t* stages = smem_raw + (1024 - sm90::smem_address(smem_raw) % 1024) % 1024;
  uint64_t* full = reinterpret_cast<uint64_t*>(stages + kStages * Cfg::kStageBytes);
  uint64_t* empty = full + kStages;

  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], 1);                    // the producer's arrive.expect_tx
      sm90::mbarrier_init(&empty[s], 4);  // one arrival per warp of the consumer whose tile it holds
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  // a gated tile's 256 accumulator columns are 128 output columns (gate and up)
  const int out_cols = p.gated ? kBlockN / 2 : kBlockN;
  const int tiles_m = int((p.m + kBlockM - 1) / kBlockM), tiles_n = int((p.n + out_cols - 1) / out_cols);
  const int tiles = tiles_m * tiles_n, k_slices = int((p.k + kBlockK - 1) / kBlockK);

  if (wg == 0) {  // producer
    sm90::release_registers<40>();
    if (threadIdx.x != 0) return;
    int stage = 0;
    uint32_t phase = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int m_block, n_block;
      tile_of<Cfg::kGroupM>(tile, tiles_m, tiles_n, m_block, n_block);
      for (int ks = 0; ks < k_slices; ++ks) {
        sm90::mbarrier_wait(&empty[stage], phase ^ 1);  // the first round passes at once (phase "-1" done)
        sm90::mbarrier_arrive_expect_tx(&full[stage], Cfg::kStageBytes);
        uint8_t* a = stages + stage * Cfg::kStageBytes;
        sm90::tma_load_2d(a, &x_map, ks * kBlockK, m_block * kBlockM, &full[stage]);
        if (p.gated) {  // W's map has 128-row boxes: the gate's rows, then the up projection's n rows further
          sm90::tma_load_2d(a + Cfg::kABytes, &w_map, ks * kBlockK, n_block * out_cols, &full[stage]);
          sm90::tma_load_2d(a + Cfg::kABytes + Cfg::kBBytes / 2, &w_map, ks * kBlockK, int(p.n) + n_block * out_cols,
                            &full[stage]);
        } else {
          sm90::tma_load_2d(a + Cfg::kABytes, &w_map, ks * kBlockK, n_block * kBlockN, &full[stage]);
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  // consumers: consumer c takes the CTA's tiles c, c + 2, ... in turns (ping-pong): one's epilogue runs while
  // the other's products use the tensor cores. A consumer starts a tile's products only once the other has
  // issued all of its previous tile's (named barriers 1 and 2): its first ring position is then at most one
  // lap ahead of the producer, as the mbarriers' parity waits need.
  sm90::claim_registers<232>();
  const int consumer = wg - 1, g = lane / 4, t = lane % 4;
  float acc[128];
  int local = consumer;  // the tile's index in the CTA's sequence
  for (int tile = blockIdx.x + consumer * gridDim.x; tile < tiles; tile += 2 * gridDim.x, local += 2) {
    int m_block, n_block;
    tile_of<Cfg::kGroupM>(tile, tiles_m, tiles_n, m_block, n_block);
    if (local > 0) sm90::named_barrier_sync(2 - consumer, 256);  // the other consumer's previous products issued
    const int64_t first = int64_t(local) * k_slices;  // ring position of its first k-slice
    int stage = int(first % kStages);
    uint32_t phase = uint32_t(first / kStages) & 1;
    int previous = -1;
    for (int ks = 0; ks < k_slices; ++ks) {
      sm90::mbarrier_wait(&full[stage], phase);
      const uint32_t a = sm90::smem_address(stages + stage * Cfg::kStageBytes);
      const uint32_t b = sm90::smem_address(stages + stage * Cfg::kStageBytes + Cfg::kABytes);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {  // k16 slices 32 bytes apart in the 128-byte rows
        sm90::Wgmma<kBlockN>::template ss<T, false, false>(acc, sm90::smem_descriptor(a + 32 * kk, 0, 1024),
                                                           sm90::smem_descriptor(b + 32 * kk, 0, 1024),
                                                           ks > 0 || kk > 0);
      }
      sm90::wgmma_commit();
      sm90::wgmma_wait<1>();  // the previous slice's products are done: its stage can be refilled
      if (previous >= 0 && lane == 0) sm90::mbarrier_arrive(&empty[previous]);
      previous = stage;
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    sm90::wgmma_wait<0>();
    sm90::fence_operands(acc);
    if (previous >= 0 && lane == 0) sm90::mbarrier_arrive(&empty[previous]);
    if (tile + gridDim.x < tiles) sm90::named_barrier_arrive(1 + consumer, 256);  // the other's next tile may start

    const int64_t row0 = int64_t(m_block) * kBlockM, col0 = int64_t(n_block) * out_cols;
    if (k_slices == 0) {
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] = 0.0f;  // k = 0: x W^T is all zeros
    }
    switch (p.activation) {
      case Activation::kRelu: epilogue<Activation::kRelu, T>(p, acc, row0, col0, warp, g, t); break;
      case Activation::kGelu: epilogue<Activation::kGelu, T>(p, acc, row0, col0, warp, g, t); break;
      case Activation::kGeluTanh: epilogue<Activation::kGeluTanh, T>(p, acc, row0, col0, warp, g, t); break;
      case Activation::kSilu: epilogue<Activation::kSilu, T>(p, acc, row0, col0, warp, g, t); break;
      case Activation::kSquaredRelu: epilogue<Activation::kSquaredRelu, T>(p, acc, row0, col0, warp, g, t); break;
      default: epilogue<Activation::kNone, T>(p, acc, row0, col0, warp, g, t); break;
    }
  }
#else
  __trap();  // never launched: linear_act_supported() is false without sm_90a code
#endif
}

template <typename T>
bool linear_act_sm90_available() {
#ifdef FUSEDKERNELS_SM90A_BUILT  // else the kernel's only body is the trap
  return compute_capability() == 90 && has_image_for_current_device<linear_act_sm90_kernel<LinearActSm90Config<T>>>();
#else
  return false;
#endif
}

template <typename T>
cudaError_t launch_linear_act_sm90(const LinearActParams& p, cudaStream_t stream) {
  using Cfg = LinearActSm90Config<T>;
  constexpr auto kKernel = linear_act_sm90_kernel<Cfg>;
  const int out_cols = p.gated ? Cfg::kBlockN / 2 : Cfg::kBlockN;  // output columns of a tile
  const int64_t tiles = ceil_div(p.m, Cfg::kBlockM) * ceil_div(p.n, out_cols);
  if (tiles == 0) return cudaSuccess;
  CUtensorMap x_map, w_map;
  if (!make_tensor_map_2d(&x_map, p.x, p.m, p.k, p.x_row_stride, Cfg::kBlockM, Cfg::kBlockK) ||
      !make_tensor_map_2d(&w_map, p.weight, p.gated ? 2 * p.n : p.n, p.k, p.weight_row_stride, out_cols,
                          Cfg::kBlockK)) {
    return cudaErrorInvalidValue;
  }
  resident_blocks<kKernel, Cfg::kThreads, Cfg::kSmemBytes>();  // raises the shared-memory limit
  const int grid = int(std::min<int64_t>(tiles, sm_count()));
  kKernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, x_map, w_map);
  return cudaGetLastError();
}

}  // namespace fusedkernels::gemm

#define FUSEDKERNELS_LINEAR_ACT_SM90_INSTANCE(T)                                \
  template bool fusedkernels::gemm::linear_act_sm90_available<T>();            \
  template cudaError_t fusedkernels::gemm::launch_linear_act_sm90<T>(const fusedkernels::gemm::LinearActParams&, \
                                                                      cudaStream_t);
