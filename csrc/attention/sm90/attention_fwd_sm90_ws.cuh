// The warp-specialised Hopper forward (sm_90a), FlashAttention-3's structure on FwdSm90Rows's steps. Warpgroup 0
// is the producer: one thread copies the CTA's Q tile and then, tile by tile, K and V into a two-stage ring by TMA,
// each stage guarded by a "full" mbarrier (the copy engine completes it when the bytes land) and an "empty" one
// (every consumer warp arrives once its products have read the stage). Warpgroups 1 and 2 are the consumers, 64
// query rows each, with the registers the producer gave back (setmaxnreg). Nothing in the loop waits for the whole
// CTA: a consumer waits only for the stages it reads. The consumers take turns issuing their products (named
// barriers, FlashAttention-3's ping-pong), so one's softmax runs while the other's products use the tensor cores;
// inside a consumer the next tile's Q K^T still runs under this tile's softmax as in the plain kernel.
// A bias tile travels with its K tile (same stage and barriers), by TMA too, where its layout allows (see
// make_fwd_ws_params). No packed batches: the plain kernel (attention_fwd_sm90.cuh) takes those. docs/attention.md.
#pragma once

#include <cuda.h>  // CUtensorMap

#include "attention/sm90/attention_fwd_sm90.cuh"
#include "common/host/tma.h"

namespace fusedkernels::attention {

template <typename T_, int kD_>
struct FwdSm90WsConfig {
  using T = T_;
  static constexpr int kD = kD_, kBlockM = 128, kBlockN = 128, kWarpgroups = 2;
  static constexpr int kThreads = 128 * (kWarpgroups + 1);
  static_assert(kD % 64 == 0, "the swizzled layout is built of 64-column blocks");
  static constexpr int kQBytes = kBlockM * kD * 2, kKVBytes = kBlockN * kD * 2, kBiasBytes = kBlockM * kBlockN * 2;
  // Q, two K and two V stages (and two bias stages), nine mbarriers (Q; K and V full and empty per stage), slack to
  // align the start to the 1024-byte swizzle period. hd128 with a bias: 224 KiB of Hopper's 227.
  static constexpr int smem_bytes(bool bias) { return kQBytes + 4 * kKVBytes + (bias ? 2 * kBiasBytes : 0) + 9 * 8 + 1024; }
  // Registers: the producer keeps 24, the consumers take 240: 24 + 2 x 240 = 504 = 3 x 168 per lane, so the kernel
  // must be compiled to 168 a thread at launch (its launch bounds give that; launch_fwd_sm90 checks it).
  static constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;
  static constexpr int kLaunchRegisters = (kProducerRegisters + kWarpgroups * kConsumerRegisters) / (kWarpgroups + 1);
};

// The kernel's parameters: the plain kernel's, tensor maps of q, k and v as [batch, heads, rows, head_dim] in boxes
// of 64 columns (128 bytes) by the tile's rows, and of the bias as [batch, heads, query rows, keys] in boxes of 64
// keys by 128 rows (a broadcast batch or head a dimension of size 1, read at 0).
struct FwdWsParams {
  FwdParams p;
  CUtensorMap q, k, v, bias;
  bool bias_batch_broadcast, bias_head_broadcast;
};

template <typename Cfg, bool kBias>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_fwd_sm90_ws_kernel(const __grid_constant__ FwdWsParams w) {
#if FUSEDKERNELS_SM90A
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  const FwdParams& p = w.p;

  extern __shared__ unsigned char smem_raw[];
  uint8_t* sQ = smem_raw + (1024 - sm90::smem_address(smem_raw) % 1024) % 1024;
  uint8_t* sK = sQ + Cfg::kQBytes;         // [2][kBlockN][kD], swizzled
  uint8_t* sV = sK + 2 * Cfg::kKVBytes;    // [2][kBlockN][kD], swizzled
  uint8_t* sBias = sV + 2 * Cfg::kKVBytes;  // [2][64-key blocks][kBlockM][64], swizzled; kBias only
  uint64_t* q_full = reinterpret_cast<uint64_t*>(sBias + (kBias ? 2 * Cfg::kBiasBytes : 0));
  uint64_t* k_full = q_full + 1;  // [2]
  uint64_t* k_empty = k_full + 2;
  uint64_t* v_full = k_empty + 2;
  uint64_t* v_empty = v_full + 2;

  const auto [m_block, h, b] = fwd_tile(p);  // heaviest first under a causal mask
  const int m0 = m_block * kBlockM;
  if (m0 >= p.seqlen_q) return;  // (the whole CTA: no barrier is initialised yet)
  const int m1 = min(m0 + kBlockM, p.seqlen_q);
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const Band band(p, p.seqlen_k);
  const int n_begin = band.key_begin(m0) / kBlockN;
  const int n_end = ceil_div_device(band.key_end(m1), kBlockN);
  const int tiles = max(n_end - n_begin, 0);
  const auto key0 = [&](int j) { return (n_end - 1 - j) * kBlockN; };  // last tile first, as the plain kernel

  if (threadIdx.x == 0) {
    sm90::mbarrier_init(q_full, 1);
    for (int s = 0; s < 2; ++s) {
      sm90::mbarrier_init(&k_full[s], 1);  // the producer's arrive.expect_tx
      sm90::mbarrier_init(&v_full[s], 1);
      sm90::mbarrier_init(&k_empty[s], 4 * Cfg::kWarpgroups);  // one arrival per consumer warp
      sm90::mbarrier_init(&v_empty[s], 4 * Cfg::kWarpgroups);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128, lane = threadIdx.x % 32;
  if (wg == 0) {  // producer
    sm90::release_registers<Cfg::kProducerRegisters>();
    if (threadIdx.x != 0 || tiles == 0) return;
    sm90::mbarrier_arrive_expect_tx(q_full, Cfg::kQBytes);
#pragma unroll
    for (int box = 0; box < kD / 64; ++box) {
      sm90::tma_load_4d(sQ + box * kBlockM * 128, &w.q, 64 * box, m0, h, b, q_full);
    }
    // stage j % 2's (j / 2)-th use; its first wait for "empty" passes at once (phase "-1" done)
    for (int j = 0; j < tiles; ++j) {
      const int s = j % 2;
      const uint32_t phase = (j / 2) & 1;
      sm90::mbarrier_wait(&k_empty[s], phase ^ 1);
      sm90::mbarrier_arrive_expect_tx(&k_full[s], Cfg::kKVBytes + (kBias ? Cfg::kBiasBytes : 0));
#pragma unroll
      for (int box = 0; box < kD / 64; ++box) {
        sm90::tma_load_4d(sK + s * Cfg::kKVBytes + box * kBlockN * 128, &w.k, 64 * box, key0(j), h_kv, b, &k_full[s]);
      }
      if constexpr (kBias) {
#pragma unroll
        for (int box = 0; box < kBlockN / 64; ++box) {
          sm90::tma_load_4d(sBias + s * Cfg::kBiasBytes + box * kBlockM * 128, &w.bias, key0(j) + 64 * box, m0,
                      w.bias_head_broadcast ? 0 : h, w.bias_batch_broadcast ? 0 : b, &k_full[s]);
        }
      }
      sm90::mbarrier_wait(&v_empty[s], phase ^ 1);
      sm90::mbarrier_arrive_expect_tx(&v_full[s], Cfg::kKVBytes);
#pragma unroll
      for (int box = 0; box < kD / 64; ++box) {
        sm90::tma_load_4d(sV + s * Cfg::kKVBytes + box * kBlockN * 128, &w.v, 64 * box, key0(j), h_kv, b, &v_full[s]);
      }
    }
    return;
  }

  sm90::claim_registers<Cfg::kConsumerRegisters>();
  const int consumer = wg - 1;
  FwdSm90Rows<Cfg, kBias, true> rows(p, band, m0, m1, consumer);
  const uint32_t q_tile = sm90::smem_address(sQ);
  const auto k_tile = [&](int j) { return sm90::smem_address(sK + (j % 2) * Cfg::kKVBytes); };
  const auto v_tile = [&](int j) { return sm90::smem_address(sV + (j % 2) * Cfg::kKVBytes); };
  const auto bias_tile = [&](int j) { return kBias ? sm90::smem_address(sBias + (j % 2) * Cfg::kBiasBytes) : 0u; };
  const auto release = [&](uint64_t* empty, int j) {
    if (lane == 0) sm90::mbarrier_arrive(&empty[j % 2]);
  };
  // Ping-pong: consumer c issues its products after the other has issued its own (named barrier 1 + c, the other's
  // arrival), consumer 0 first; issues 0 .. tiles of each, consumer 1's last arrival left out (nobody waits for it).
  int issue = 0;
  const auto my_turn = [&] {
    if (consumer == 1 || issue > 0) sm90::named_barrier_sync(1 + consumer, 256);
  };
  const auto your_turn = [&] {
    if (consumer == 0 || issue < tiles) sm90::named_barrier_arrive(2 - consumer, 256);
    ++issue;
  };

  if (tiles > 0) {
    sm90::mbarrier_wait(q_full, 0);
    sm90::mbarrier_wait(&k_full[0], 0);
    my_turn();
    sm90::wgmma_fence();
    rows.issue_qk(q_tile, k_tile(0));
    your_turn();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(rows.s);
    if (!kBias) release(k_empty, 0);  // (with a bias, once the softmax has read the stage's bias tile)
    float unused[2];
    rows.softmax(key0(0), bias_tile(0), unused);
    if (kBias) release(k_empty, 0);
  }
  // Steps 0 .. tiles-2 overlap; the last step only has P V left. (No wgmma sits behind a branch inside a step:
  // ptxas then cannot prove the overlap safe and serialises every wgmma.)
  for (int j = 0; j + 1 < tiles; ++j) {
    rows.pack_p();
    sm90::mbarrier_wait(&k_full[(j + 1) % 2], ((j + 1) / 2) & 1);
    sm90::mbarrier_wait(&v_full[j % 2], (j / 2) & 1);
    my_turn();
    sm90::wgmma_fence();
    rows.issue_qk(q_tile, k_tile(j + 1));
    rows.issue_pv(v_tile(j));
    your_turn();
    sm90::wgmma_wait<1>();  // Q K_{j+1}^T done; P V_j still running
    sm90::fence_operands(rows.s);
    if (!kBias) release(k_empty, j + 1);
    float correction[2];
    rows.softmax(key0(j + 1), bias_tile(j + 1), correction);
    sm90::fence_operands(rows.s);  // the exponentials before the wait: left alone, the compiler sinks them past it
    sm90::fence_operands(correction);
    if (kBias) release(k_empty, j + 1);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(rows.o);
    sm90::fence_operands(rows.pf);
    release(v_empty, j);
    rows.rescale(correction);
  }
  if (tiles > 0) {
    rows.pack_p();
    sm90::mbarrier_wait(&v_full[(tiles - 1) % 2], ((tiles - 1) / 2) & 1);
    my_turn();
    sm90::wgmma_fence();
    rows.issue_pv(v_tile(tiles - 1));
    your_turn();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(rows.o);
    release(v_empty, tiles - 1);
  }

  using T = typename Cfg::T;
  T* out = static_cast<T*>(p.out) + offset_of(p.out_strides, b, m0, h);
  float* lse = p.lse == nullptr ? nullptr : p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + m0;
  rows.store(sQ, out, p.out_strides.row, lse, m0, m1, lane);
#else
  __trap();  // never launched: fwd_sm90_available() is false without sm_90a code
#endif
}

// The maps of q, k and v for the warp-specialised kernel: false where the driver cannot encode them (a layout
// TMA cannot describe: strides not multiples of 16 bytes, a misaligned base) or the call is not one it takes
// (a bias, a packed batch); the plain kernel then runs.
template <typename Cfg>
bool make_fwd_ws_params(const FwdParams& p, FwdWsParams& w) {
  if (p.cu_seqlens_q != nullptr) return false;
  w.p = p;
  const auto map = [&](CUtensorMap* m, const void* base, const Strides& s, int rows, int heads, int box_rows) {
    return make_rows_map(m, base, s, p.batch, rows, heads, Cfg::kD, box_rows);
  };
  if (!map(&w.q, p.q, p.q_strides, p.seqlen_q, p.heads_q, Cfg::kBlockM) ||
      !map(&w.k, p.k, p.k_strides, p.seqlen_k, p.heads_kv, Cfg::kBlockN) ||
      !map(&w.v, p.v, p.v_strides, p.seqlen_k, p.heads_kv, Cfg::kBlockN)) {
    return false;
  }
  return p.bias == nullptr ||
         make_bias_map(p, Cfg::kBlockM, &w.bias, &w.bias_batch_broadcast, &w.bias_head_broadcast);
}

}  // namespace fusedkernels::attention
