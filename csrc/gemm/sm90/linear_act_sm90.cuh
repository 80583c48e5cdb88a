// The Hopper GEMM with a fused epilogue (sm_90a): out = act(x W^T + bias) + residual, and the gated form
// out = act(x Wg^T + bg) * (x Wu^T + bu) + residual.
//
// Persistent and warp-specialised: one CTA per SM walks the output tiles. Warpgroup 0 is the producer: one
// thread issues TMA copies of the x and W slices (64 columns of K each) into a ring of kStages shared-memory
// stages, each guarded by a "full" mbarrier (the copy engine completes it when the bytes land) and an "empty"
// one (the consumers arrive when they are done reading). Warpgroups 1 and 2 are the consumers; each holds a
// 64 x kBlockN fp32 accumulator in registers (kBlockN / 2 a thread), fed by wgmma m64nNk16 straight from the
// swizzled stages, one k-slice's group in flight while the previous stage is released. Tiles are 64 x 256, or
// 64 x 64 / 128 for a convolution's narrow layers (64 output channels would leave 3/4 of a 256-wide product
// idle) and 64 x 64 for linear_act's small m, and the consumers take the CTA's tiles in turns ("ping-pong"), so
// one's epilogue runs while the other's products use the tensor cores; or, for long K loops at N <= 4096, share
// 128 x 256 tiles ("cooperative", LinearActSm90Config). The epilogue applies bias, activation and residual,
// writes the tile into a swizzled shared-memory buffer and stores it with TMA: coalesced, asynchronous, and clipped
// at the tensor's edges (scattered register stores were the first version's bottleneck: docs/perf-notes.md).
// docs/gemm.md draws it.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "common/device/mma.cuh"  // pack2
#include "common/device/sm90.cuh"
#include "common/device/vec.cuh"
#include "common/device/wgmma.cuh"
#include "common/host/launch.h"
#include "common/host/tma.h"
#include "gemm/activation.cuh"
#include "gemm/gemm.h"
#include "gemm/split_k_epilogue.cuh"
#include "gemm/tile_order.cuh"

namespace fusedkernels::gemm {

// kCooperative: the two consumers share 128 x 256 tiles (64 rows each) instead of taking 64 x kBlockN tiles in
// turns: a W slice feeds twice the products, so a k-slice's 48 KiB stage holds twice the work of a ping-pong one, and
// four of them fit beside epilogue buffers of half a tile's width (stored in two turns), at the cost of an epilogue
// the tensor cores wait for: the ungated one pass only.
template <typename T_, int kBlockN_ = 256, bool kCooperative_ = false>
struct LinearActSm90Config {
  using T = T_;
  static_assert(kBlockN_ == 64 || kBlockN_ == 128 || kBlockN_ == 256);
  static_assert(!kCooperative_ || kBlockN_ == 256);
  static constexpr bool kCooperative = kCooperative_;
  // Stages: four of 256-wide tiles (ping-pong 40 KiB, cooperative 48 KiB), else as many as fit in 192 KiB (24 or
  // 16 KiB stages).
  static constexpr int kBlockM = kCooperative ? 128 : 64, kBlockN = kBlockN_, kBlockK = 64;
  static constexpr int kStages = kBlockN == 256 ? 4 : 192 / (kBlockN / 8 + 8);
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
  static constexpr int kAccumulators = kBlockN / 2;  // a consumer thread's share of its 64 x kBlockN fp32 rows
  static constexpr int kABytes = kBlockM * kBlockK * 2, kBBytes = kBlockN * kBlockK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  // Each consumer's epilogue buffer: kBufferCols columns of its 64 rows (the whole tile, or half of a cooperative
  // one) in 64-column boxes of 8 KiB; and its tile's bias.
  static constexpr int kBufferCols = kCooperative ? kBlockN / 2 : kBlockN;
  static constexpr int kBoxBytes = 64 * 64 * 2, kEpilogueBytes = kBufferCols / 64 * kBoxBytes, kBiasBytes = kBlockN * 2;
  // Stages, epilogue buffers, biases, barriers (full and empty per stage, a residual one per consumer), and slack to
  // align to the 1024-byte swizzle period.
  static constexpr int kSmemBytes =
      kStages * kStageBytes + kConsumers * (kEpilogueBytes + kBiasBytes) + (2 * kStages + kConsumers) * 8 + 1024;
  static_assert(kSmemBytes <= 227 * 1024);
  // Tiles of consecutive m-blocks spanning 1024 rows are walked together (all their n-blocks), so the W
  // slices they share stay in L2.
  static constexpr int kGroupM = 1024 / kBlockM;
};

// The tensor maps of one call: operands x [m, k] and W ([n, k], gated [2n, k]) in 64-column boxes of the
// tile's rows; out and, where the one-pass epilogue adds it, the residual (act_grad: z) [m, n] in 64 x 64 boxes; the
// pre-activation as [m, halves, n] (halves 2 when gated: gate | up) in 64 x 1 x 64 boxes, so a gated tile's gate
// columns past n are clipped.
struct LinearActMaps {
  CUtensorMap x, weight, out, residual, pre_activation;
};

// The backward epilogues (gated_grad, act_grad): the GEMM reads W MN-major and applies act' to its product.
__host__ __device__ inline bool dgrad_epilogue(const LinearActParams& p) { return p.gated_grad || p.act_grad; }

// The epilogue in one pass (Epilogue below): no saved pre-activation, not a backward epilogue.
__host__ __device__ inline bool epilogue_in_one_pass(const LinearActParams& p) {
  return !dgrad_epilogue(p) && p.pre_activation == nullptr;
}

// Whether the residual comes into the epilogue buffer by TMA: the one-pass epilogue's (unsplit K), and z for the plain
// backward epilogue, which is one pass too (Epilogue::store_act_grad).
__host__ __device__ inline bool residual_by_tma(const LinearActParams& p) {
  return p.residual != nullptr && p.split_k == 1 && (epilogue_in_one_pass(p) || p.act_grad);
}

// One consumer warpgroup's epilogue. Thread (warp, g, t) holds the accumulators of rows 16 warp + g (+ 8), columns
// 8j + 2t (+ 1) (common/device/wgmma.cuh). Without a saved pre-activation (inference, or no grad), one pass:
// out = act(z) (* z_up) (+ residual), z = acc + bias rounded to T, written to the shared-memory buffer, which holds
// the tile's residual (loaded by TMA while the products ran), and stored (store_out_in_one_pass,
// store_gated_out_in_one_pass). Otherwise two passes over the buffer:
//   1. z = acc + bias, rounded to T (what F.linear returns); stored as the pre-activation when the backward needs it;
//   2. out = act(z) (* up) (+ residual), 8 columns a thread at a time in a loop, written over z and stored.
// Applying the activation to the rounded z matches eager PyTorch (F.linear, then the activation on its
// output). The one pass unrolls a thread's 128 activations (gated: 64; one exponential each, activation.cuh); the
// loop of the second keeps the larger epilogues' code small (docs/perf-notes.md: an unrolled epilogue with erff inlined
// overflowed the instruction cache). Gated tiles hold the gate's z in their first kHalf columns and the up
// projection's in the next kHalf, for output columns col0 .. col0 + kHalf - 1. The backward epilogues: dgrad().
template <typename Cfg>
struct Epilogue {
  using T = typename Cfg::T;
  static constexpr int kBlockN = Cfg::kBlockN, kHalf = kBlockN / 2;
  using Accumulators = float[Cfg::kAccumulators];

  const LinearActParams& p;
  const LinearActMaps& maps;
  uint8_t* buffer;
  // The tile's bias, a pair of columns a thread: loaded into `bias_pair` before the products (a load issued after
  // them stalled the epilogue for its round trip: docs/perf-notes.md, gemm "bias staging"), written to `bias_pairs`
  // in shared memory and read back there by the threads that need each pair.
  uint32_t* bias_pairs;
  uint64_t* residual_full;  // completes when a tile's residual (act_grad: z) has landed in the buffer (residual_by_tma)
  int barrier;  // the warpgroup's named barrier
  int thread;   // in the warpgroup; thread 0 issues the copies
  uint32_t bias_pair = 0;
  uint32_t residual_phase = 0;

  // The buffer may be written: the previous stores have read it.
  __device__ __forceinline__ void wait_buffer() {
    if (thread == 0) sm90::bulk_wait_read<0>();
    sm90::named_barrier_sync(barrier, 128);
  }

  // Loads this thread's pair of the tile's bias: accumulator columns 2 thread and 2 thread + 1 (gated: the gate's
  // bias in the first kHalf columns, the up projection's n further on); zeros past the edge or without a bias.
  __device__ __forceinline__ void load_bias(int col0) {
    const int col = 2 * thread;
    const int64_t at = !p.gated || col < kHalf ? col0 + col : p.n + col0 + col - kHalf;
    const int64_t limit = !p.gated || col < kHalf ? p.n : 2 * p.n;
    bias_pair = p.bias != nullptr && col < kBlockN && at < limit
                    ? *reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.bias) + at)
                    : 0u;
  }

  // The tile's residual (act_grad: z) into the buffer, by TMA (residual_by_tma), once the previous tile's stores have
  // read it: issued before the products, which hide its latency; zeros past the tensor's edges, as the store clips
  // them. A cooperative tile's buffer holds half its columns: the other half is asked of L2 now and loaded once the
  // first half is stored (store_out_in_one_pass).
  __device__ __forceinline__ void load_residual(int row0, int col0) {
    if (!residual_by_tma(p) || thread != 0) return;
    const int cols = p.gated ? kHalf : kBlockN;  // the tile's output columns
    sm90::bulk_wait_read<0>();
    load_residual_columns(row0, col0, cols < Cfg::kBufferCols ? cols : Cfg::kBufferCols);
    for (int col = Cfg::kBufferCols; col < cols; col += 64) sm90::tma_prefetch_2d(&maps.residual, col0 + col, row0);
  }

  // Thread 0: the residual's columns col0 .. col0 + cols - 1 of the tile's rows into the buffer, by TMA.
  __device__ __forceinline__ void load_residual_columns(int row0, int col0, int cols) {
    sm90::mbarrier_arrive_expect_tx(residual_full, cols / 64 * Cfg::kBoxBytes);
    for (int box = 0; box < cols / 64; ++box) {
      sm90::tma_load_2d(buffer + box * Cfg::kBoxBytes, &maps.residual, col0 + 64 * box, row0, residual_full);
    }
  }

  __device__ __forceinline__ void wait_residual() {
    sm90::mbarrier_wait(residual_full, residual_phase);
    residual_phase ^= 1;
  }

  // The pairs to shared memory, then wait_buffer(): its barrier makes them visible to the warpgroup (the previous
  // tile's reads of them ended at that tile's publish_buffer()).
  __device__ __forceinline__ void stage_bias_and_wait_buffer() {
    if (thread < kBlockN / 2) bias_pairs[thread] = bias_pair;
    wait_buffer();
  }

  // All writes to the buffer are done: make them visible to the copy engine.
  __device__ __forceinline__ void publish_buffer() {
    sm90::fence_proxy_async_shared();
    sm90::named_barrier_sync(barrier, 128);
  }

  __device__ __forceinline__ uint8_t* at(int row, int col) const { return buffer + sm90::swizzled(row, col, 64); }

  // The buffer's first kOutCols columns, written by every thread, to out at (row0, col0).
  template <int kOutCols>
  __device__ __forceinline__ void store_buffer_to_out(int row0, int col0) {
    publish_buffer();
    if (thread == 0) {
#pragma unroll
      for (int box = 0; box < kOutCols / 64; ++box) {
        sm90::tma_store_2d(&maps.out, buffer + box * Cfg::kBoxBytes, col0 + 64 * box, row0);
      }
      sm90::bulk_commit();
    }
  }

  // The bias at accumulator columns col, col + 1 (even), from the staged pairs.
  __device__ __forceinline__ float2 staged_bias(int col) const {
    const uint32_t pair = bias_pairs[col / 2];
    return unpack2<T>(pair);
  }

  // fn(pair, z0, z1) for each pair of this thread's accumulators in columns kFirst .. kFirst + kCols - 1: z = acc +
  // bias (fp32) at columns col, col + 1 of a row, and `pair`, their 4-byte place in the buffer, which holds those
  // columns.
  template <int kFirst = 0, int kCols = kBlockN, typename Fn>
  __device__ __forceinline__ void for_each_pair(const Accumulators& acc, Fn&& fn) const {
    const int warp = thread / 32, g = thread % 32 / 4, t = thread % 4;
#pragma unroll
    for (int j = kFirst / 8; j < (kFirst + kCols) / 8; ++j) {
      const int col = 8 * j + 2 * t;
      const float2 b = staged_bias(col);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        fn(reinterpret_cast<uint32_t*>(at(16 * warp + g + 8 * r, col - kFirst)), acc[4 * j + 2 * r] + b.x,
           acc[4 * j + 2 * r + 1] + b.y);
      }
    }
  }

  __device__ __forceinline__ void store_z(const Accumulators& acc, int row0, int col0) {
    stage_bias_and_wait_buffer();
    for_each_pair(acc, [](uint32_t* pair, float z0, float z1) { *pair = pack2<T>(z0, z1); });
    publish_buffer();
    if (p.pre_activation != nullptr) {  // the pass below writes over z: wait until the copy engine has read it
      if (thread == 0) {
#pragma unroll
        for (int box = 0; box < kBlockN / 64; ++box) {
          const int half = p.gated && box >= kBlockN / 128, col = col0 + 64 * box - kHalf * half;
          sm90::tma_store_3d(&maps.pre_activation, buffer + box * Cfg::kBoxBytes, col, half, row0);
        }
        sm90::bulk_commit();
      }
      wait_buffer();
    }
  }

  // Asks L2 for the residual rows of a tile the epilogue will read (called before its products, whose time
  // then hides the fetch).
  __device__ __forceinline__ void prefetch_residual(int row0, int col0) const {
    if (p.residual == nullptr || residual_by_tma(p)) return;
    const int lines_per_row = (p.gated ? kHalf : kBlockN) * int(sizeof(T)) / 128;
    for (int half = 0; half < (p.gated_grad ? 2 : 1); ++half) {  // gated_grad: z's gate and up columns
      for (int i = thread; i < 64 * lines_per_row; i += 128) {
        const int row = row0 + i / lines_per_row, col = col0 + i % lines_per_row * (128 / int(sizeof(T)));
        if (row < p.m && col < p.n) {
          asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const T*>(p.residual) +
                                                         row * p.residual_row_stride + half * p.n + col));
        }
      }
    }
  }

  template <Activation kAct, bool kGated>
  __device__ __forceinline__ void store_out(int row0, int col0) {
    constexpr int kOutCols = kGated ? kHalf : kBlockN, kVectorsPerRow = kOutCols / 8;
    constexpr int kPerThread = 64 * kVectorsPerRow / 128, kBatch = 4;  // residual loads in flight together
    const T* residual = static_cast<const T*>(p.residual);
#pragma unroll 1
    for (int first = 0; first < kPerThread; first += kBatch) {
      // vector v: a warp reads whole rows, so the residual loads are coalesced
      const auto row_of = [&](int i) { return (thread + 128 * (first + i)) / kVectorsPerRow; };
      const auto col_of = [&](int i) { return 8 * ((thread + 128 * (first + i)) % kVectorsPerRow); };
      Vec<T, 8> res[kBatch];
      if (residual != nullptr) {
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          const int row = row0 + row_of(i), col = col0 + col_of(i);
          if (row < p.m && col < p.n) res[i].load(residual + row * p.residual_row_stride + col);
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        uint8_t* z_at = at(row_of(i), col_of(i));
        Vec<T, 8> z, y;
        z.load(reinterpret_cast<const T*>(z_at));
        Vec<T, 8> up;
        if constexpr (kGated) up.load(reinterpret_cast<const T*>(at(row_of(i), col_of(i) + kHalf)));
        const bool has_residual = residual != nullptr;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          y.set(e, epilogue_output<kAct, kGated>(z.get(e), kGated ? up.get(e) : 0.0f,
                                                 has_residual ? res[i].get(e) : 0.0f, has_residual,
                                                 p.residual_before_activation));
        }
        *reinterpret_cast<uint4*>(z_at) = make_uint4(y.w[0], y.w[1], y.w[2], y.w[3]);
      }
    }
    store_buffer_to_out<kOutCols>(row0, col0);
  }

  // The gated backward (p.gated_grad), after store_z put dh in the buffer: z's gate and up vectors come from global
  // memory and dz goes there, 16 bytes a thread (a warp's accesses cover whole rows of the tile: full lines), dh
  // read from the buffer. dz may be z: each vector is loaded before the same thread stores over it.
  template <Activation kAct>
  __device__ __forceinline__ void store_gated_grad(int row0, int col0) {
    constexpr int kVectorsPerRow = kBlockN / 8, kPerThread = 64 * kVectorsPerRow / 128, kBatch = 4;
    const T* z = static_cast<const T*>(p.residual);
    T* dz = static_cast<T*>(p.out);
#pragma unroll 1
    for (int first = 0; first < kPerThread; first += kBatch) {
      const auto row_of = [&](int i) { return (thread + 128 * (first + i)) / kVectorsPerRow; };
      const auto col_of = [&](int i) { return 8 * ((thread + 128 * (first + i)) % kVectorsPerRow); };
      Vec<T, 8> gate[kBatch], up[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t row = row0 + row_of(i), col = col0 + col_of(i);
        if (row < p.m && col < p.n) {
          gate[i].load(z + row * p.residual_row_stride + col);
          up[i].load(z + row * p.residual_row_stride + p.n + col);
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t row = row0 + row_of(i), col = col0 + col_of(i);
        if (row >= p.m || col >= p.n) continue;
        Vec<T, 8> dh, dgate, dup;
        dh.load(reinterpret_cast<const T*>(at(row_of(i), col_of(i))));
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float act, slope;
          activation_and_slope<kAct, true>(gate[i].get(e), act, slope);
          const float g = dh.get(e);
          // relu: a select, as torch's threshold_backward (gated_backward.cu computes the same)
          dgate.set(e, kAct == Activation::kRelu ? (slope != 0.0f ? g * up[i].get(e) : 0.0f)
                                                 : g * up[i].get(e) * slope);
          dup.set(e, g * act);
        }
        dgate.store(dz + row * p.out_row_stride + col);
        dup.store(dz + row * p.out_row_stride + p.n + col);
      }
    }
  }

  // The plain backward (p.act_grad) in one pass: z's tile came into the buffer by TMA during the products
  // (load_residual); dz = dh · act'(z), dh the product rounded to T (what PyTorch's dy @ W returns), is written over it
  // pair by pair and stored by TMA. Then thread t sums columns 2t, 2t + 1 of the stored tile down its 64 rows for the
  // bias gradient (rows and columns past the edges hold zeros: dh is 0 there); fp32, in row order: deterministic.
  template <Activation kAct>
  __device__ __forceinline__ void store_act_grad(const Accumulators& acc, int row0, int col0) {
    wait_residual();
    const int warp = thread / 32, g = thread % 32 / 4, t = thread % 4;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint32_t* pair = reinterpret_cast<uint32_t*>(at(16 * warp + g + 8 * r, 8 * j + 2 * t));
        const float2 dh = unpack2<T>(pack2<T>(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]));
        const float2 z = unpack2<T>(*pair);
        *pair = pack2<T>(activation_grad<kAct>(dh.x, z.x), activation_grad<kAct>(dh.y, z.y));
      }
    }
    store_buffer_to_out<kBlockN>(row0, col0);
    if (p.dbias_partials == nullptr) return;
    const int col = 2 * thread;
    if (row0 < p.m && col0 + col < p.n) {
      float2 total = make_float2(0.0f, 0.0f);
#pragma unroll 8
      for (int row = 0; row < 64; ++row) {
        const float2 dz = unpack2<T>(*reinterpret_cast<const uint32_t*>(at(row, col)));
        total.x += dz.x;
        total.y += dz.y;
      }
      *reinterpret_cast<float2*>(p.dbias_partials + int64_t(row0 / 64) * p.n + col0 + col) = total;
    }
    sm90::named_barrier_sync(barrier, 128);  // every thread's reads are done before the next tile's z lands
  }

  // The backward epilogues: the gated one (dh, the product rounded to T, into the buffer, then the gated act'), or the
  // plain one in one pass.
  __device__ __forceinline__ void dgrad(const Accumulators& acc, int row0, int col0) {
    if (p.gated_grad) store_z(acc, row0, col0);
    const auto with = [&](auto act) {
      constexpr Activation kAct = decltype(act)::value;
      if (p.gated_grad) {
        store_gated_grad<kAct>(row0, col0);
      } else {
        store_act_grad<kAct>(acc, row0, col0);
      }
    };
    switch (p.activation) {
      case Activation::kRelu: with(std::integral_constant<Activation, Activation::kRelu>{}); break;
      case Activation::kGelu: with(std::integral_constant<Activation, Activation::kGelu>{}); break;
      case Activation::kGeluTanh: with(std::integral_constant<Activation, Activation::kGeluTanh>{}); break;
      case Activation::kSquaredRelu:
        if (!p.gated_grad) store_act_grad<Activation::kSquaredRelu>(acc, row0, col0);
        break;
      default: with(std::integral_constant<Activation, Activation::kSilu>{}); break;
    }
  }

  // Split-K: the fp32 partial sums of this tile's slice of K to the workspace plane `split`, in its columns
  // (gated: the gate's, then the up projection's n columns further), 8 bytes a thread, full 32-byte sectors.
  __device__ __forceinline__ void store_partial(const Accumulators& acc, int split, int row0, int col0) const {
    const int warp = thread / 32, g = thread % 32 / 4, t = thread % 4;
    const int64_t workspace_cols = p.gated ? 2 * p.n : p.n;
    float* plane = p.workspace + split * p.m * workspace_cols;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      const int ca = 8 * j + 2 * t, half = p.gated && ca >= kHalf, col = col0 + ca - kHalf * half;
      if (col >= p.n) continue;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 16 * warp + g + 8 * r;
        if (row < p.m) {
          *reinterpret_cast<float2*>(plane + row * workspace_cols + half * p.n + col) =
              make_float2(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
        }
      }
    }
  }

  // out = act(z) (+ residual) straight from the accumulators, with no gate or saved pre-activation: one pass over the
  // buffer instead of two (z rounded to T first, as eager PyTorch's F.linear output is, then the activation and the
  // residual in fp32, rounded once). kResidual: the buffer holds the tile's residual (load_residual); each thread reads
  // its pairs there and writes its outputs over them.
  template <Activation kAct, bool kResidual>
  __device__ __forceinline__ void store_out_in_one_pass(const Accumulators& acc, int row0, int col0) {
    // none and relu commute with the rounding (relu of a T value is one) when nothing is added: else z is rounded
    constexpr bool kRoundZ = kResidual || !(kAct == Activation::kRelu || kAct == Activation::kNone);
    const bool before = p.residual_before_activation;  // act(z + residual)
    constexpr int kCols = Cfg::kBufferCols;  // the tile in kBlockN / kCols turns (two for cooperative tiles)
    stage_bias_and_wait_buffer();
    if constexpr (kResidual) wait_residual();
    const auto write = [&](uint32_t* pair, float z0, float z1) {
      if constexpr (kRoundZ) {  // both with one conversion
        const float2 z = unpack2<T>(pack2<T>(z0, z1));
        z0 = z.x;
        z1 = z.y;
      }
      const float2 r = kResidual ? unpack2<T>(*pair) : make_float2(0.0f, 0.0f);
      *pair = pack2<T>(epilogue_output<kAct, false>(z0, 0.0f, r.x, kResidual, before),
                       epilogue_output<kAct, false>(z1, 0.0f, r.y, kResidual, before));
    };
    for_each_pair<0, kCols>(acc, write);
    store_buffer_to_out<kCols>(row0, col0);
    if constexpr (kCols < kBlockN) {  // the second half once the copy engine has read the first
      wait_buffer();
      if constexpr (kResidual) {  // its residual, from L2 (load_residual asked for it)
        if (thread == 0) load_residual_columns(row0, col0 + kCols, kCols);
        wait_residual();
      }
      for_each_pair<kCols, kCols>(acc, write);
      store_buffer_to_out<kCols>(row0, col0 + kCols);
    }
  }

  // The gated form in one pass (no saved pre-activation): a thread holds the gate's z and the up projection's for the
  // same output columns (accumulator columns c and c + kHalf), so out = act(z_gate) * z_up (+ residual), both z
  // rounded to T first as F.linear's output is, comes straight from the registers into the buffer's first kHalf
  // columns (where the residual's TMA load landed) and is stored.
  template <Activation kAct, bool kResidual>
  __device__ __forceinline__ void store_gated_out_in_one_pass(const Accumulators& acc, int row0, int col0) {
    const bool before = p.residual_before_activation;  // act(z_gate + residual) * z_up
    stage_bias_and_wait_buffer();
    if constexpr (kResidual) wait_residual();
    const int warp = thread / 32, g = thread % 32 / 4, t = thread % 4;
#pragma unroll
    for (int j = 0; j < kHalf / 8; ++j) {
      const int col = 8 * j + 2 * t, up = j + kHalf / 8;  // up: the accumulator block of the same output columns
      const float2 bias_gate = staged_bias(col), bias_up = staged_bias(col + kHalf);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint32_t* pair = reinterpret_cast<uint32_t*>(at(16 * warp + g + 8 * r, col));
        const float2 gate = unpack2<T>(pack2<T>(acc[4 * j + 2 * r] + bias_gate.x, acc[4 * j + 2 * r + 1] + bias_gate.y));
        const float2 z_up = unpack2<T>(pack2<T>(acc[4 * up + 2 * r] + bias_up.x, acc[4 * up + 2 * r + 1] + bias_up.y));
        const float2 res = kResidual ? unpack2<T>(*pair) : make_float2(0.0f, 0.0f);
        *pair = pack2<T>(epilogue_output<kAct, true>(gate.x, z_up.x, res.x, kResidual, before),
                         epilogue_output<kAct, true>(gate.y, z_up.y, res.y, kResidual, before));
      }
    }
    store_buffer_to_out<kHalf>(row0, col0);
  }

  __device__ __forceinline__ void operator()(const Accumulators& acc, int row0, int col0) {
    const bool one_pass = epilogue_in_one_pass(p);
    if constexpr (!Cfg::kCooperative) {
      if (!one_pass) store_z(acc, row0, col0);
    }
    const auto with = [&](auto act) {
      constexpr Activation kAct = decltype(act)::value;
      if constexpr (Cfg::kCooperative) {  // its only epilogues (linear_act_sm90_cooperative)
        if (p.residual != nullptr) {
          store_out_in_one_pass<kAct, true>(acc, row0, col0);
        } else {
          store_out_in_one_pass<kAct, false>(acc, row0, col0);
        }
      } else if (one_pass && p.gated && p.residual != nullptr) {
        store_gated_out_in_one_pass<kAct, true>(acc, row0, col0);
      } else if (one_pass && p.gated) {
        store_gated_out_in_one_pass<kAct, false>(acc, row0, col0);
      } else if (one_pass && p.residual != nullptr) {
        store_out_in_one_pass<kAct, true>(acc, row0, col0);
      } else if (one_pass) {
        store_out_in_one_pass<kAct, false>(acc, row0, col0);
      } else if (p.gated) {
        store_out<kAct, true>(row0, col0);
      } else {
        store_out<kAct, false>(row0, col0);
      }
    };
    switch (p.activation) {
      case Activation::kRelu: with(std::integral_constant<Activation, Activation::kRelu>{}); break;
      case Activation::kGelu: with(std::integral_constant<Activation, Activation::kGelu>{}); break;
      case Activation::kGeluTanh: with(std::integral_constant<Activation, Activation::kGeluTanh>{}); break;
      case Activation::kSilu: with(std::integral_constant<Activation, Activation::kSilu>{}); break;
      case Activation::kSquaredRelu: with(std::integral_constant<Activation, Activation::kSquaredRelu>{}); break;
      default: with(std::integral_constant<Activation, Activation::kNone>{}); break;
    }
  }
};

// kSplitK: the split-K instance (partial sums to the workspace); the other has no trace of it, so the
// epilogue-bound small-K shapes keep their code. kIm2col: the implicit GEMM of a convolution (x through an
// im2col map, K walked tap by tap, 64 channels at a time; geometry g), else g is unused. kDgrad: the backward
// epilogues (p.gated_grad, p.act_grad; W read MN-major), an instance of their own for the same reason.
template <typename Cfg, bool kSplitK, bool kIm2col, bool kDgrad = false>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    linear_act_sm90_kernel(const LinearActParams p, const __grid_constant__ LinearActMaps maps,
                           const Im2colGeometry g) {
#if FUSEDKERNELS_SM90A
  using T = typename Cfg::T;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK, kStages = Cfg::kStages;

  extern __shared__ unsigned char smem_raw[];
  uint8_t* stages = smem_raw + (1024 - sm90::smem_address(smem_raw) % 1024) % 1024;
  uint8_t* epilogue_buffers = stages + kStages * Cfg::kStageBytes;
  uint8_t* biases = epilogue_buffers + Cfg::kConsumers * Cfg::kEpilogueBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(biases + Cfg::kConsumers * Cfg::kBiasBytes);
  uint64_t* empty = full + kStages;
  uint64_t* residual_full = empty + kStages;  // one a consumer

  const int wg = threadIdx.x / 128, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], 1);   // the producer's arrive.expect_tx
      sm90::mbarrier_init(&empty[s], 4 * (Cfg::kCooperative ? 2 : 1));  // one arrival per warp reading it
    }
    for (int c = 0; c < Cfg::kConsumers; ++c) sm90::mbarrier_init(&residual_full[c], 1);  // load_residual's arrival
    sm90::fence_barrier_init();
  }
  __syncthreads();

  // a gated tile's kBlockN accumulator columns are kBlockN / 2 output columns (gate and up)
  const int out_cols = p.gated ? kBlockN / 2 : kBlockN;
  const int tiles_m = int((p.m + kBlockM - 1) / kBlockM), tiles_n = int((p.n + out_cols - 1) / out_cols);
  // Work units: a tile and one of split_k runs of k-slices, all split_slices long (the last run's slices past
  // K read as zeros).
  const int split_k = kSplitK ? p.split_k : 1;
  const int tiles = tiles_m * tiles_n, units = tiles * split_k;
  // an implicit GEMM's k-slice is 64 channels of one filter tap (channels past the image's read as zeros)
  const int channel_slices = kIm2col ? (g.channels + kBlockK - 1) / kBlockK : 1;
  const int k_slices = kIm2col ? g.kernel_h * g.kernel_w * channel_slices : int((p.k + kBlockK - 1) / kBlockK);
  const int split_slices = (k_slices + split_k - 1) / split_k;

  if (wg == 0) {  // producer
    sm90::release_registers<40>();
    if (threadIdx.x != 0) return;
    int stage = 0;
    uint32_t phase = 0;
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
      int m_block, n_block;
      tile_of<Cfg::kGroupM>(unit / split_k, tiles_m, tiles_n, m_block, n_block);
      const int first_slice = unit % split_k * split_slices;
      // an implicit GEMM's tile: its first output pixel, whose filter window's corner the im2col loads start at
      int image = 0, corner_h = 0, corner_w = 0;
      if constexpr (kIm2col) {
        const int pixel = m_block * kBlockM, per_image = g.out_h * g.out_w;
        image = pixel / per_image;
        corner_h = pixel % per_image / g.out_w * g.stride_h - g.pad_h;
        corner_w = pixel % g.out_w * g.stride_w - g.pad_w;
      }
      for (int ks = 0; ks < split_slices; ++ks) {
        sm90::mbarrier_wait(&empty[stage], phase ^ 1);  // the first round passes at once (phase "-1" done)
        sm90::mbarrier_arrive_expect_tx(&full[stage], Cfg::kStageBytes);
        uint8_t* a = stages + stage * Cfg::kStageBytes;
        const int slice = first_slice + ks;
        int k0 = slice * kBlockK;  // W's column
        if constexpr (kIm2col) {
          const int tap = slice / channel_slices, c0 = slice % channel_slices * kBlockK;
          const int r = tap / g.kernel_w, t = tap % g.kernel_w;
          sm90::tma_load_im2col_4d(a, &maps.x, c0, corner_w, corner_h, image, uint16_t(t * g.dilation_w),
                                   uint16_t(r * g.dilation_h), &full[stage]);
          k0 = tap * g.channels + c0;  // past this tap's channels W holds the next tap's, times x's zeros
        } else {
          sm90::tma_load_2d(a, &maps.x, k0, m_block * kBlockM, &full[stage]);
        }
        if constexpr (kDgrad) {  // W stored [k, n] (MN-major): 64 x 64 boxes, the tile's four 64-column blocks
#pragma unroll
          for (int j = 0; j < kBlockN / 64; ++j) {
            sm90::tma_load_2d(a + Cfg::kABytes + j * kBlockK * 128, &maps.weight, n_block * kBlockN + 64 * j, k0,
                              &full[stage]);
          }
        } else if (p.gated) {  // W's map has out_cols-row boxes: the gate's rows, then the up projection's n rows further
          sm90::tma_load_2d(a + Cfg::kABytes, &maps.weight, k0, n_block * out_cols, &full[stage]);
          sm90::tma_load_2d(a + Cfg::kABytes + Cfg::kBBytes / 2, &maps.weight, k0, int(p.n) + n_block * out_cols,
                            &full[stage]);
        } else {
          sm90::tma_load_2d(a + Cfg::kABytes, &maps.weight, k0, n_block * kBlockN, &full[stage]);
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  sm90::claim_registers<232>();
  const int consumer = wg - 1;
  Epilogue<Cfg> epilogue{p, maps, epilogue_buffers + consumer * Cfg::kEpilogueBytes,
                         reinterpret_cast<uint32_t*>(biases + consumer * Cfg::kBiasBytes), residual_full + consumer,
                         3 + consumer, int(threadIdx.x % 128)};
  float acc[Cfg::kAccumulators];
  // Ping-pong: consumer c takes the CTA's tiles c, c + 2, ... It starts a tile's products only once the other
  // has issued all of its previous tile's (named barriers 1 and 2): the tensor cores serve one consumer at a
  // time while the other runs its epilogue, and a consumer's first ring position is at most one lap ahead of
  // the producer, as the mbarriers' parity waits need. Cooperative: both take every tile, consumer c its rows
  // 64 c .. 64 c + 63 (the stage's A rows from 64 c on: 8 KiB, whole swizzle periods).
  constexpr int kStep = Cfg::kCooperative ? 1 : 2;  // tiles between a consumer's turns
  const int first_row = Cfg::kCooperative ? 64 * consumer : 0;
  int local = Cfg::kCooperative ? 0 : consumer;  // the unit's index in the CTA's sequence
  for (int unit = blockIdx.x + local * gridDim.x; unit < units; unit += kStep * gridDim.x, local += kStep) {
    int m_block, n_block;
    tile_of<Cfg::kGroupM>(unit / split_k, tiles_m, tiles_n, m_block, n_block);
    const int row0 = m_block * kBlockM + first_row, col0 = n_block * out_cols;
    if constexpr (!kSplitK) {
      epilogue.prefetch_residual(row0, col0);
      epilogue.load_bias(col0);
      epilogue.load_residual(row0, col0);
    }
    if (!Cfg::kCooperative && local > 0) sm90::named_barrier_sync(2 - consumer, 256);
    const int64_t first = int64_t(local) * split_slices;  // ring position of its first k-slice
    int stage = int(first % kStages);
    uint32_t phase = uint32_t(first / kStages) & 1;
    int previous = -1;
    for (int ks = 0; ks < split_slices; ++ks) {
      sm90::mbarrier_wait(&full[stage], phase);
      const uint32_t a = sm90::smem_address(stages + stage * Cfg::kStageBytes + first_row * kBlockK * 2);
      const uint32_t b = sm90::smem_address(stages + stage * Cfg::kStageBytes + Cfg::kABytes);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {  // k16 slices 32 bytes apart in the 128-byte rows
        if constexpr (kDgrad) {  // B MN-major: k16 slices 16 rows apart, 64-column blocks kBlockK rows apart
          sm90::Wgmma<kBlockN>::template ss<T, false, true>(acc, sm90::smem_descriptor(a + 32 * kk, 0, 1024),
                                                            sm90::smem_descriptor(b + kk * 16 * 128, kBlockK * 128, 1024),
                                                            ks > 0 || kk > 0);
        } else {
          sm90::Wgmma<kBlockN>::template ss<T, false, false>(acc, sm90::smem_descriptor(a + 32 * kk, 0, 1024),
                                                             sm90::smem_descriptor(b + 32 * kk, 0, 1024),
                                                             ks > 0 || kk > 0);
        }
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
    // Every product of this tile is issued: the other consumer's next tile may start issuing its own, which the
    // tensor cores take up as these finish (arriving after the wait below left them idle for the last k-slice).
    if (!Cfg::kCooperative && unit + gridDim.x < units) sm90::named_barrier_arrive(1 + consumer, 256);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(acc);
    if (previous >= 0 && lane == 0) sm90::mbarrier_arrive(&empty[previous]);

    if constexpr (kSplitK) {
      epilogue.store_partial(acc, unit % split_k, row0, col0);
    } else if constexpr (kDgrad) {
      epilogue.dgrad(acc, row0, col0);
    } else {
      epilogue(acc, row0, col0);
    }
  }
  if (epilogue.thread == 0) sm90::bulk_wait_read<0>();  // the buffer outlives the stores' reads of it
#else
  __trap();  // never launched: linear_act_supported() is false without sm_90a code
#endif
}

template <typename T>
bool linear_act_sm90_available() {
#ifdef FUSEDKERNELS_SM90A_BUILT  // else the kernel's only body is the trap
  return compute_capability() == 90 &&
         has_image_for_current_device<linear_act_sm90_kernel<LinearActSm90Config<T>, false, false>>();
#else
  return false;
#endif
}

// Encodes the maps of W, out and the pre-activation into `maps` (x's is the caller's: tiled or im2col) and
// launches the kernel, then split-K's second pass.
template <typename Cfg, bool kIm2col>
cudaError_t launch_sm90(const LinearActParams& p, LinearActMaps& maps, const Im2colGeometry& g, cudaStream_t stream) {
  // a gated tile's halves are whole 64-column boxes; an implicit GEMM does not split K (its m is large)
  if ((p.gated && Cfg::kBlockN < 128) || (kIm2col && p.split_k != 1)) return cudaErrorInvalidValue;
  const int out_cols = p.gated ? Cfg::kBlockN / 2 : Cfg::kBlockN;  // output columns of a tile
  const int64_t units = ceil_div(p.m, Cfg::kBlockM) * ceil_div(p.n, out_cols) * p.split_k;
  if (units == 0) return cudaSuccess;
  const int64_t halves = p.gated ? 2 : 1;
  const int64_t pre_sizes[3] = {p.n, halves, p.m}, pre_strides[2] = {p.n * 2, p.pre_activation_row_stride * 2};
  const int pre_box[3] = {64, 1, 64};
  // the backward epilogues read W as stored, [k, n] (MN-major), in 64 x 64 boxes; the others [n, k] in out_cols x 64
  const bool weight_map = dgrad_epilogue(p)
                              ? make_tensor_map_2d(&maps.weight, p.weight, p.k, p.n, p.weight_row_stride, 64, 64)
                              : make_tensor_map_2d(&maps.weight, p.weight, halves * p.n, p.k, p.weight_row_stride,
                                                   out_cols, Cfg::kBlockK);
  if (!weight_map ||
      !make_tensor_map_2d(&maps.out, p.out, p.m, p.n, p.out_row_stride, 64, 64) ||
      (residual_by_tma(p) &&
       !make_tensor_map_2d(&maps.residual, p.residual, p.m, p.n, p.residual_row_stride, 64, 64)) ||
      (p.pre_activation != nullptr &&
       !make_tensor_map(&maps.pre_activation, p.pre_activation, 3, pre_sizes, pre_strides, pre_box))) {
    return cudaErrorInvalidValue;
  }
  const int grid = int(std::min<int64_t>(units, sm_count()));
  if constexpr (!kIm2col) {
    if (dgrad_epilogue(p)) {  // 256-wide tiles only (linear_act_sm90_block_n)
      if constexpr (Cfg::kBlockN == 256 && !Cfg::kCooperative) {
        if (p.split_k != 1 || p.gated) return cudaErrorInvalidValue;
        constexpr auto kDgradKernel = linear_act_sm90_kernel<Cfg, false, false, true>;
        resident_blocks<kDgradKernel, Cfg::kThreads, Cfg::kSmemBytes>();
        kDgradKernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, maps, g);
        return cudaGetLastError();
      } else {
        return cudaErrorInvalidValue;
      }
    }
    if (p.split_k != 1) {
      if constexpr (!Cfg::kCooperative) {
        constexpr auto kSplitKernel = linear_act_sm90_kernel<Cfg, true, false>;
        resident_blocks<kSplitKernel, Cfg::kThreads, Cfg::kSmemBytes>();  // raises the shared-memory limit
        kSplitKernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, maps, g);
        if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
        return launch_split_k_epilogue<typename Cfg::T>(p, stream);
      }
      return cudaErrorInvalidValue;
    }
  }
  constexpr auto kKernel = linear_act_sm90_kernel<Cfg, false, kIm2col>;
  resident_blocks<kKernel, Cfg::kThreads, Cfg::kSmemBytes>();
  kKernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, maps, g);
  return cudaGetLastError();
}

// FUSEDKERNELS_GEMM_KERNEL (read once per call, so a test can set it in-process) names a Hopper path to take where
// the shape would choose another: "sm90-wide" the ping-pong kernel's 256-wide tiles (small m takes 64 wide),
// "sm90-cooperative" the cooperative tiles without split K, "sm90-pingpong" the ping-pong kernel.
enum class ForcedTiles { kNone, kWide, kCooperative, kPingPong };

inline ForcedTiles forced_tiles() {
  const char* choice = std::getenv("FUSEDKERNELS_GEMM_KERNEL");
  if (choice == nullptr) return ForcedTiles::kNone;
  if (std::strcmp(choice, "sm90-wide") == 0) return ForcedTiles::kWide;
  if (std::strcmp(choice, "sm90-cooperative") == 0) return ForcedTiles::kCooperative;
  if (std::strcmp(choice, "sm90-pingpong") == 0) return ForcedTiles::kPingPong;
  return ForcedTiles::kNone;
}

// Runs of K to split `tiles` output tiles into, k_slices 64-column slices of K long: where the tiles fill at most half
// the SMs (small m), enough runs for one unit per SM, each at least 4 k-slices (256 of K) long, at most 16; else 1.
inline int64_t split_k_for(int64_t tiles, int64_t k_slices, int64_t sms) {
  if (tiles == 0 || 2 * tiles > sms) return 1;
  return std::clamp<int64_t>(std::min(sms / tiles, k_slices / 4), 1, 16);
}

// The tile width for a ping-pong linear_act call: 256, or 64 where 256-wide tiles would fill at most half the SMs
// (small m), the output is not gated, and the 64-wide tiles (four times as many, so K is split less or not at all) run
// in one wave on at least as many SMs as the 256-wide ones with their split. Measured on the H200 (docs/perf-notes.md,
// gemm "small m tiles"): 64-wide tiles take 128 x 1024 x 4096 in 6.3 us against 9.8, 64 x 4096 x 4096 in 10.4 against
// 12.2 (the split's second pass and its fp32 workspace); a second wave of them took m = 136-256 at N = 4096 1.2-1.7x
// the 256-wide tiles' time.
inline int linear_act_sm90_block_n(const LinearActParams& p, ForcedTiles forced) {
  if (p.gated || dgrad_epilogue(p) || forced == ForcedTiles::kWide || forced == ForcedTiles::kCooperative) return 256;
  const int64_t sms = sm_count(), m_blocks = ceil_div(p.m, int64_t(64)), k_slices = ceil_div(p.k, int64_t(64));
  const int64_t wide = m_blocks * ceil_div(p.n, int64_t(256)), narrow = m_blocks * ceil_div(p.n, int64_t(64));
  if (2 * wide > sms || narrow > sms) return 256;
  return narrow * split_k_for(narrow, k_slices, sms) >= wide * split_k_for(wide, k_slices, sms) ? 64 : 256;
}

// Cooperative tiles (LinearActSm90Config), for the ungated one pass, where the 128-row tiles fill every SM, N is at
// most 4096 and K at least 2048, or 1024 with none, relu, squared relu or gelu; with a residual, at least 4096.
// Measured on the H200 (docs/perf-notes.md, "cooperative tiles v3", "... with a residual"): 3-9% faster at
// 16384·3072·768 and 8192·2048·4096, at 4096·1024·4096 relu 3% and gelu 12% faster, gelu_tanh even and silu 4.5% slower
// (the epilogue the tensor cores wait for against a short K loop), slower at K = 768 and at N = 11008 and 16384;
// with a residual (its second half loaded after the first is stored) 3-6% faster at K = 4096 and 11008, even at
// 3072, 3-6% slower at K <= 1024; gated, 3-23% slower.
inline bool linear_act_sm90_cooperative(const LinearActParams& p, ForcedTiles forced) {
  if (p.split_k != 1 || !epilogue_in_one_pass(p) || p.gated) return false;
  if (forced != ForcedTiles::kNone) return forced == ForcedTiles::kCooperative;
  const bool short_k_ok = p.activation != Activation::kSilu && p.activation != Activation::kGeluTanh;
  const int64_t min_k = p.residual != nullptr ? 4096 : short_k_ok ? 1024 : 2048;
  return p.k >= min_k && p.n <= 4096 && ceil_div(p.m, int64_t(128)) * ceil_div(p.n, int64_t(256)) >= sm_count();
}

template <typename T>
cudaError_t launch_linear_act_sm90(const LinearActParams& p, cudaStream_t stream) {
  const auto launch = [&]<int kBlockN, bool kCooperative>() {
    using Cfg = LinearActSm90Config<T, kBlockN, kCooperative>;
    LinearActMaps maps{};
    if (!make_tensor_map_2d(&maps.x, p.x, p.m, p.k, p.x_row_stride, Cfg::kBlockM, Cfg::kBlockK)) {
      return cudaErrorInvalidValue;
    }
    return launch_sm90<Cfg, false>(p, maps, Im2colGeometry{}, stream);
  };
  const ForcedTiles forced = forced_tiles();
  if (linear_act_sm90_cooperative(p, forced)) return launch.template operator()<256, true>();
  return linear_act_sm90_block_n(p, forced) == 64 ? launch.template operator()<64, false>()
                                          : launch.template operator()<256, false>();
}

// The implicit GEMM of a convolution (instantiated by csrc/conv/sm90/, so each family builds alone): p as for
// linear_act with m = batch * out_h * out_w output pixels, n the output channels, k = kernel_h * kernel_w * channels,
// x the NHWC input, weight [n, kernel_h, kernel_w, channels].
// Tiles as wide as the output channels need, up to 256: 64 or 128 channels in 64- or 128-wide tiles.
template <typename T>
cudaError_t launch_conv2d_sm90(const LinearActParams& p, const Im2colGeometry& g, cudaStream_t stream) {
  const auto launch = [&]<int kBlockN>() {
    using Cfg = LinearActSm90Config<T, kBlockN>;
    LinearActMaps maps{};
    if (!make_im2col_map_nhwc(&maps.x, p.x, g.batch, g.in_h, g.in_w, g.channels, g.pad_h, g.pad_w, g.kernel_h,
                              g.kernel_w, g.dilation_h, g.dilation_w, g.stride_h, g.stride_w, Cfg::kBlockM,
                              Cfg::kBlockK)) {
      return cudaErrorInvalidValue;
    }
    return launch_sm90<Cfg, true>(p, maps, g, stream);
  };
  if (p.n <= 64) return launch.template operator()<64>();
  if (p.n <= 128) return launch.template operator()<128>();
  return launch.template operator()<256>();
}

// Split K for the ping-pong tiles of a small m (split_k_for).
template <typename T>
int linear_act_sm90_split_k(const LinearActParams& p) {
  using Cfg = LinearActSm90Config<T>;
  const ForcedTiles forced = forced_tiles();
  if (dgrad_epilogue(p) || forced == ForcedTiles::kCooperative) return 1;
  const int block_n = linear_act_sm90_block_n(p, forced);
  const int64_t tiles = ceil_div(p.m, Cfg::kBlockM) * ceil_div(p.n, p.gated ? block_n / 2 : block_n);
  return int(split_k_for(tiles, ceil_div(p.k, Cfg::kBlockK), sm_count()));
}

}  // namespace fusedkernels::gemm

#define FUSEDKERNELS_LINEAR_ACT_SM90_INSTANCE(T)                                \
  template bool fusedkernels::gemm::linear_act_sm90_available<T>();            \
  template int fusedkernels::gemm::linear_act_sm90_split_k<T>(const fusedkernels::gemm::LinearActParams&); \
  template cudaError_t fusedkernels::gemm::launch_linear_act_sm90<T>(const fusedkernels::gemm::LinearActParams&, \
                                                                      cudaStream_t);
