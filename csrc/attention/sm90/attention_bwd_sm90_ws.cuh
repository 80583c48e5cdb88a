// The warp-specialised Hopper dK dV kernel (sm_90a): the plain kernel's products and layouts
// (attention_bwd_sm90.cuh) in FlashAttention-3's backward structure. Warpgroup 0 is the producer: warp 0's first
// thread copies the CTA's K and V tiles once and then, step by step, the Q and dO tiles of (q head, query tile)
// into a two-stage ring by TMA; warp 1 writes the step's base-2 log-sum-exp and dsum rows beside them; warps 2
// and 3 each hand one consumer's dQ half, staged in shared memory, to the copy engine, which adds it into the
// fp32 accumulator (a TMA reduce-add, so no consumer issues an atomic). Warpgroups 1 and 2 are the consumers, 64
// keys each, with the registers the producer gave back (setmaxnreg). A ring stage is guarded by a "full" mbarrier
// (the copy engine's bytes plus warp 1's 32 arrivals) and an "empty" one (every consumer thread arrives once its
// products have read the stage); the dQ halves by their own pair. The consumers meet once a step, when both
// halves of dS^T are in shared memory (dQ needs every key); dS^T is double-buffered so that is the only meeting.
// An additive bias (a compile-time variant) rides with Q and dO by TMA, one 64-key box per consumer. No packed
// batches, and no bias TMA cannot read (rows broadcast, rows not 16-byte aligned): the plain kernel takes those.
// docs/attention.md.
#pragma once

#include <cuda.h>  // CUtensorMap

#include "attention/sm90/attention_bwd_sm90.cuh"
#include "common/host/tma.h"

namespace fusedkernels::attention {

// The plain kernel's tiles (the bias tile as [64-key box][kBlockM queries][64], swizzled), and a producer warpgroup.
template <typename T_, int kD_>
struct BwdSm90WsConfig : BwdSm90Config<T_, kD_> {
  using Base = BwdSm90Config<T_, kD_>;
  using Base::kD, Base::kBlockM, Base::kBlockN, Base::kKVBytes, Base::kQBytes, Base::kDSBytes, Base::kBiasBytes;
  static constexpr int kWarpgroups = 2, kThreads = 128 * (kWarpgroups + 1);
  // A consumer's half of the dQ tile, fp32, in boxes of 32 columns (128 bytes) by kBlockM rows, 128B-swizzled.
  static constexpr int kDqCols = kD / 2, kDqBoxes = kDqCols / 32, kDqBytes = kBlockM * kDqCols * 4;
  static constexpr int kBarriers = 1 + 2 + 2 + 2 + 2;  // K V; full and empty per stage; dQ full and empty per consumer
  // K, V; two stages of Q and dO (and of the bias tile); two dS^T buffers; the two dQ halves; two stages of lse and
  // dsum; the barriers; slack to align the start to the 1024-byte swizzle period. hd128: 194 KiB, 226 with a bias
  // (Hopper allows 227).
  static constexpr int smem_bytes(bool bias) {
    return 2 * kKVBytes + 4 * kQBytes + (bias ? 2 * kBiasBytes : 0) + 2 * kDSBytes + 2 * kDqBytes + 4 * kBlockM * 4 +
           kBarriers * 8 + 1024;
  }
  // The forward's split: 24 + 2 x 240 = 3 x 168 registers a lane (launch_bwd_dkdv_sm90 checks the build's 168).
  static constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;
  static constexpr int kLaunchRegisters = (kProducerRegisters + kWarpgroups * kConsumerRegisters) / (kWarpgroups + 1);
};

// The kernel's parameters: the plain kernel's, and tensor maps of q and dout as [batch, heads, rows, head_dim] in
// boxes of 64 columns by kBlockM rows, of k and v likewise by kBlockN rows, and of the fp32 dq accumulator
// [batch, rows, heads, head_dim] in boxes of 32 columns by kBlockM rows of one head; with a bias, its map as
// [batch, heads, query rows, keys] in boxes of 64 keys by kBlockM rows (a broadcast batch or head a dimension of
// size 1, read at 0).
struct BwdWsParams {
  BwdParams p;
  CUtensorMap q, dout, k, v, dq_accum, bias;
  bool bias_batch_broadcast, bias_head_broadcast;
};

template <typename Cfg, bool kBias>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    attention_bwd_dkdv_sm90_ws_kernel(const __grid_constant__ BwdWsParams w) {
#if FUSEDKERNELS_SM90A
  using T = typename Cfg::T;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  constexpr int kDqCols = Cfg::kDqCols;
  const BwdParams& bp = w.p;
  const FwdParams& p = bp.fwd;

  extern __shared__ unsigned char smem_raw[];
  uint8_t* sK = smem_raw + (1024 - sm90::smem_address(smem_raw) % 1024) % 1024;
  uint8_t* sV = sK + Cfg::kKVBytes;
  uint8_t* sQ = sV + Cfg::kKVBytes;       // [2][kBlockM][kD]
  uint8_t* sdO = sQ + 2 * Cfg::kQBytes;   // [2][kBlockM][kD]
  uint8_t* sBias = sdO + 2 * Cfg::kQBytes;  // [2][64-key box][kBlockM][64], kBias only
  uint8_t* sdS = sBias + (kBias ? 2 * Cfg::kBiasBytes : 0);  // [2] dS^T [kBlockN keys][kBlockM queries]
  uint8_t* sDq = sdS + 2 * Cfg::kDSBytes;  // [consumer][box][kBlockM][32] fp32
  float* sLse = reinterpret_cast<float*>(sDq + 2 * Cfg::kDqBytes);  // [2][kBlockM], base 2
  float* sDsum = sLse + 2 * kBlockM;                                 // [2][kBlockM]
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(sDsum + 2 * kBlockM);
  uint64_t* full = kv_full + 1;   // [2]
  uint64_t* empty = full + 2;     // [2]
  uint64_t* dq_full = empty + 2;  // [consumer]
  uint64_t* dq_empty = dq_full + 2;

  const int n_block = blockIdx.x, h_kv = blockIdx.y / bp.kv_split, b = blockIdx.z;
  const int n0 = n_block * kBlockN;
  if (n0 >= p.seqlen_k) return;  // (the whole CTA: no barrier is initialised yet)
  const int n1 = min(n0 + kBlockN, p.seqlen_k);
  const int heads = p.heads_q / p.heads_kv / bp.kv_split;
  const int head0 = h_kv * (p.heads_q / p.heads_kv) + blockIdx.y % bp.kv_split * heads;
  const Band band(p, p.seqlen_k);
  const int m_begin = band.query_begin(n0) / kBlockM;
  const int m_end = ceil_div_device(band.query_end(n1, p.seqlen_q), kBlockM);
  const int m_count = max(0, m_end - m_begin), iterations = heads * m_count;
  const auto query0_of = [&](int it) { return (m_begin + it % m_count) * kBlockM; };
  // fn(step, q head, first query) for every step in order: the producer's loops, without divisions (at 24
  // registers a thread they would spill)
  const auto for_each_step = [&](auto&& fn) {
    for (int h = head0, it = 0; h < head0 + heads; ++h) {
      for (int m0 = m_begin * kBlockM; m0 < m_end * kBlockM; m0 += kBlockM, ++it) fn(it, h, m0);
    }
  };

  if (threadIdx.x == 0) {
    sm90::mbarrier_init(kv_full, 1);
    for (int s = 0; s < 2; ++s) {
      sm90::mbarrier_init(&full[s], 1 + 32);  // the TMA thread's arrive.expect_tx and warp 1's lanes
      sm90::mbarrier_init(&empty[s], 256);    // every consumer thread: each orders its own reads of lse and dsum
      sm90::mbarrier_init(&dq_full[s], 128);  // every thread of consumer s
      sm90::mbarrier_init(&dq_empty[s], 1);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  if (wg == 0) {  // producer
    sm90::release_registers<Cfg::kProducerRegisters>();
    if (iterations == 0) return;
    if (warp == 0 && lane == 0) {  // TMA: K and V once, then Q and dO per step
      sm90::mbarrier_arrive_expect_tx(kv_full, 2 * Cfg::kKVBytes);
#pragma unroll
      for (int box = 0; box < kD / 64; ++box) {
        sm90::tma_load_4d(sK + box * kBlockN * 128, &w.k, 64 * box, n0, h_kv, b, kv_full);
        sm90::tma_load_4d(sV + box * kBlockN * 128, &w.v, 64 * box, n0, h_kv, b, kv_full);
      }
      for_each_step([&](int it, int h, int m0) {
        const int s = it % 2;
        sm90::mbarrier_wait(&empty[s], ((it / 2) & 1) ^ 1);  // a stage's first wait passes at once
        sm90::mbarrier_arrive_expect_tx(&full[s], 2 * Cfg::kQBytes + (kBias ? Cfg::kBiasBytes : 0));
#pragma unroll
        for (int box = 0; box < kD / 64; ++box) {
          sm90::tma_load_4d(sQ + s * Cfg::kQBytes + box * kBlockM * 128, &w.q, 64 * box, m0, h, b, &full[s]);
          sm90::tma_load_4d(sdO + s * Cfg::kQBytes + box * kBlockM * 128, &w.dout, 64 * box, m0, h, b, &full[s]);
        }
        if constexpr (kBias) {
#pragma unroll
          for (int box = 0; box < kBlockN / 64; ++box) {
            sm90::tma_load_4d(sBias + s * Cfg::kBiasBytes + box * kBlockM * 128, &w.bias, n0 + 64 * box, m0,
                              w.bias_head_broadcast ? 0 : h, w.bias_batch_broadcast ? 0 : b, &full[s]);
          }
        }
      });
    } else if (warp == 1) {  // the rows' lse (base 2) and dsum; rows past the sequence: P = 2^-inf = 0
      const float* dsum = bp.workspace;
      for_each_step([&](int it, int h, int m0) {
        const int s = it % 2;
        const float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + m0;
        const int64_t row0 = int64_t(b) * p.seqlen_q + m0;
        sm90::mbarrier_wait(&empty[s], ((it / 2) & 1) ^ 1);
#pragma unroll
        for (int r = lane; r < kBlockM; r += 32) {
          const bool ok = m0 + r < p.seqlen_q;
          sLse[s * kBlockM + r] = ok ? lse_log2(lse[r]) : kInf;
          sDsum[s * kBlockM + r] = ok ? dsum[(row0 + r) * p.heads_q + h] : 0.0f;
        }
        sm90::mbarrier_arrive(&full[s]);
      });
    } else if (lane == 0) {  // warps 2 and 3: consumer warp - 2's dQ half into the accumulator
      const int c = warp - 2;
      for_each_step([&](int it, int h, int m0) {
        sm90::mbarrier_wait(&dq_full[c], it & 1);
#pragma unroll
        for (int box = 0; box < Cfg::kDqBoxes; ++box) {
          sm90::tma_reduce_add_4d(&w.dq_accum, sDq + c * Cfg::kDqBytes + box * kBlockM * 128, kDqCols * c + 32 * box,
                                  h, m0, b);
        }
        sm90::bulk_commit();
        sm90::bulk_wait_read<0>();  // the half may be overwritten once the engine has read it
        sm90::mbarrier_arrive(&dq_empty[c]);
      });
      sm90::bulk_wait_all();
    }
    return;
  }

  sm90::claim_registers<Cfg::kConsumerRegisters>();
  const int consumer = wg - 1, g = lane / 4, t = lane % 4;
  BwdSm90Keys<Cfg, kBias, true> keys(p, band, consumer, n0);
  const uint32_t k_base = sm90::smem_address(sK), v_base = sm90::smem_address(sV);
  uint8_t* my_dq = sDq + consumer * Cfg::kDqBytes;

  if (iterations > 0) sm90::mbarrier_wait(kv_full, 0);
  for (int it = 0; it < iterations; ++it) {
    const int s = it % 2, m0 = query0_of(it);
    const uint32_t q_address = sm90::opaque(sm90::smem_address(sQ + s * Cfg::kQBytes));
    const uint32_t do_address = sm90::opaque(sm90::smem_address(sdO + s * Cfg::kQBytes));
    const uint32_t k_address = sm90::opaque(k_base), v_address = sm90::opaque(v_base);
    uint8_t* ds_tile = sdS + s * Cfg::kDSBytes;
    sm90::mbarrier_wait(&full[s], (it / 2) & 1);

    keys.issue_scores(k_address, v_address, q_address, do_address);
    float* dbias = nullptr;
    if (kBias && bp.dbias != nullptr) {
      dbias = bp.dbias + (int64_t(b) * p.heads_q + head0 + it / m_count) * p.seqlen_q * p.seqlen_k;
    }
    const uint32_t bias_box = kBias ? sm90::smem_address(sBias) + s * Cfg::kBiasBytes + consumer * kBlockM * 128 : 0u;
    keys.probabilities(m0, p.seqlen_q, p.seqlen_k, sLse + s * kBlockM, sDsum + s * kBlockM, bias_box, dbias);
    keys.issue_dv_dk(ds_tile, q_address, do_address);
    sm90::fence_proxy_async_shared();  // dS^T was written through the generic proxy
    sm90::named_barrier_sync(1, 256);  // both consumers' keys of dS^T are in place
    keys.wait_dv_dk();
    sm90::mbarrier_arrive(&empty[s]);  // Q, dO, lse, dsum (and the bias) of this stage are read
    keys.dq_product(sm90::opaque(sm90::smem_address(ds_tile)), k_address);

    // The half into shared memory (box ct / 4 of 32 columns; float pairs, 128B swizzle), then to warp 2 + consumer.
    sm90::mbarrier_wait(&dq_empty[consumer], (it & 1) ^ 1);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * warp + g + 8 * r;
#pragma unroll
      for (int ct = 0; ct < kDqCols / 8; ++ct) {
        const int chunk = 2 * (ct % 4) + t / 2;
        float2* dst = reinterpret_cast<float2*>(my_dq + (ct / 4) * kBlockM * 128 + row * 128 +
                                                ((chunk ^ (row % 8)) * 16) + (t % 2) * 8);
        *dst = make_float2(keys.dq[4 * ct + 2 * r], keys.dq[4 * ct + 2 * r + 1]);
      }
    }
    sm90::fence_proxy_async_shared();
    sm90::mbarrier_arrive(&dq_full[consumer]);
  }
  keys.store(bp, b, h_kv, 0, int64_t(b) * p.seqlen_k);
#else
  __trap();  // never launched: bwd_sm90_available() is false without sm_90a code
#endif
}

// The maps of q, dout, k, v, the dq accumulator and the bias: false where the driver cannot encode them (strides not
// multiples of 16 bytes, a misaligned base) or the call is not one the kernel takes (a packed batch, the deterministic
// backward, which has no accumulator, a bias broadcast over the query rows); the plain kernel then runs.
template <typename Cfg>
bool make_bwd_ws_params(const BwdParams& bp, BwdWsParams& w) {
  const FwdParams& p = bp.fwd;
  if (p.cu_seqlens_q != nullptr || bp.deterministic) return false;
  w.p = bp;
  const auto map = [&](CUtensorMap* m, const void* base, const Strides& s, int rows, int heads, int box_rows) {
    return make_rows_map(m, base, s, p.batch, rows, heads, Cfg::kD, box_rows);
  };
  if (!map(&w.q, p.q, p.q_strides, p.seqlen_q, p.heads_q, Cfg::kBlockM) ||
      !map(&w.dout, bp.dout, bp.dout_strides, p.seqlen_q, p.heads_q, Cfg::kBlockM) ||
      !map(&w.k, p.k, p.k_strides, p.seqlen_k, p.heads_kv, Cfg::kBlockN) ||
      !map(&w.v, p.v, p.v_strides, p.seqlen_k, p.heads_kv, Cfg::kBlockN)) {
    return false;
  }
  const float* dq_accum = bp.workspace + dq_accum_offset(bp.total_q, p.heads_q);
  const int64_t sizes[4] = {Cfg::kD, p.heads_q, p.seqlen_q, p.batch};
  const int64_t row = int64_t(p.heads_q) * Cfg::kD * 4;
  const int64_t strides[3] = {Cfg::kD * 4, row, row * p.seqlen_q};
  const int box[4] = {32, 1, Cfg::kBlockM, 1};
  if (!make_tensor_map(&w.dq_accum, dq_accum, 4, sizes, strides, box, CU_TENSOR_MAP_DATA_TYPE_FLOAT32)) return false;
  return p.bias == nullptr ||
         make_bias_map(p, Cfg::kBlockM, &w.bias, &w.bias_batch_broadcast, &w.bias_head_broadcast);
}

template <typename T, int kD>
bool bwd_sm90_available() {
#ifdef FUSEDKERNELS_SM90A_BUILT  // else the kernels' only body is the trap
  return compute_capability() == 90 &&
         has_image_for_current_device<attention_bwd_dkdv_sm90_kernel<BwdSm90Config<T, kD>, false>>();
#else
  return false;
#endif
}

// The warp-specialised kernel wherever it takes the call (make_bwd_ws_params) and FUSEDKERNELS_ATTENTION_KERNEL is not
// "sm90"; else the plain one.
template <typename T, int kD>
cudaError_t launch_bwd_dkdv_sm90(const BwdParams& p, cudaStream_t stream) {
  using Cfg = BwdSm90Config<T, kD>;
  using WsCfg = BwdSm90WsConfig<T, kD>;
  static_assert(WsCfg::kBlockN == Cfg::kBlockN && WsCfg::smem_bytes(true) <= 227 * 1024);
  const dim3 grid(ceil_div(p.fwd.seqlen_k, Cfg::kBlockN), p.fwd.heads_kv * p.kv_split, p.fwd.batch);
  constexpr auto kWs = attention_bwd_dkdv_sm90_ws_kernel<WsCfg, false>;
  constexpr auto kWsBias = attention_bwd_dkdv_sm90_ws_kernel<WsCfg, true>;
  const bool registers = kernel_registers<kWs>() == WsCfg::kLaunchRegisters &&
                         kernel_registers<kWsBias>() == WsCfg::kLaunchRegisters;
  BwdWsParams w;
  if (sm90_kernel_asked() != Sm90Kernel::kPlain && registers && make_bwd_ws_params<WsCfg>(p, w)) {
    if (p.fwd.bias != nullptr) return launch<kWsBias, WsCfg::kThreads, WsCfg::smem_bytes(true)>(grid, w, stream);
    return launch<kWs, WsCfg::kThreads, WsCfg::smem_bytes(false)>(grid, w, stream);
  }
  if (p.fwd.bias != nullptr) {
    return launch<attention_bwd_dkdv_sm90_kernel<Cfg, true>, Cfg::kThreads, Cfg::smem_bytes(true)>(grid, p, stream);
  }
  return launch<attention_bwd_dkdv_sm90_kernel<Cfg, false>, Cfg::kThreads, Cfg::smem_bytes(false)>(grid, p, stream);
}

}  // namespace fusedkernels::attention

#define FUSEDKERNELS_ATTENTION_BWD_SM90_INSTANCE(T, D)                  \
  template bool fusedkernels::attention::bwd_sm90_available<T, D>(); \
  template cudaError_t fusedkernels::attention::launch_bwd_dkdv_sm90<T, D>(const fusedkernels::attention::BwdParams&, cudaStream_t);
