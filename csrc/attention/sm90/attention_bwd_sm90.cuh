// The Hopper backward's dK dV kernel (sm_90a): the portable dkdv kernel's algorithm (attention_bwd.cuh) with
// its five products on warpgroup MMA. One CTA of two warpgroups per (128-key tile, kv head, sequence), or per
// slice of the kv head's q heads (kv_split); each warpgroup owns 64 keys and keeps their dK and dV in registers
// while the CTA loops over the query tiles (64 rows) of every q head of its group or slice (an additive bias, and
// its gradient dS, are a compile-time variant):
//   S^T = K Q^T, dP^T = V dO^T          both operands from shared memory (K-major)
//   P^T = 2^(S^T + bias - lse), dS^T = P^T (dP^T - dsum)
//   dV += P^T dO, dK += dS^T Q          P^T, dS^T from registers; dO, Q N-major from shared memory
//   dQ += dS K                          dS^T staged in shared memory, read M-major; each warpgroup computes
//                                       half of dQ's columns and adds them to the fp32 accumulator (atomics)
// The preprocess and dq-convert kernels are the portable ones. docs/attention.md has the formulas.
#pragma once

#include "attention/attention_launch.cuh"
#include "attention/sm90/attention_sm90_common.cuh"

namespace fusedkernels::attention {

template <typename T_, int kD_>
struct BwdSm90Config {
  using T = T_;
  static constexpr int kD = kD_, kBlockM = 64, kBlockN = 128, kThreads = 256;
  static_assert(kD % 64 == 0, "the swizzled layout is built of 64-column blocks");
  static constexpr int kKVBytes = kBlockN * kD * 2, kQBytes = kBlockM * kD * 2, kDSBytes = kBlockN * kBlockM * 2;
  static constexpr int kBiasBytes = kBlockM * kBlockN * 2;
  // K, V; two stages of Q and dO; dS^T; two stages of lse and dsum (and of the bias tile, with a bias);
  // slack to align to the swizzle period.
  static constexpr int smem_bytes(bool bias) {
    return 2 * kKVBytes + 4 * kQBytes + kDSBytes + 4 * kBlockM * 4 + (bias ? 2 * kBiasBytes : 0) + 1024;
  }
};

// A consumer warpgroup's 64 keys of a dK dV CTA: their dK and dV accumulators and the step's scores, with the
// steps both Hopper backwards take on them (this kernel's and the warp-specialised one's,
// attention_bwd_sm90_ws.cuh). kTmaBias: the bias tile in the 128B-swizzled layout of 64-key boxes, one per warpgroup,
// that a TMA copy writes (the warp-specialised kernel), else [query][kBlockN keys] in bias_swizzled's rows (this
// kernel's cp.async).
template <typename Cfg, bool kBias, bool kTmaBias = false>
struct BwdSm90Keys {
  using T = typename Cfg::T;
  static constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  static constexpr int kQTiles = kBlockM / 8, kDTiles = kD / 8, kDqCols = kD / 2;

  const Band& band;
  const float scale_log2;
  const int wg, n0;
  float dk[kDTiles * 4] = {}, dv[kDTiles * 4] = {};
  float st[kQTiles * 4], dpt[kQTiles * 4], dq[kDqCols / 8 * 4];
  uint32_t pf[kBlockM / 16][4], dsf[kBlockM / 16][4];  // P^T and dS^T as A operands

  // wg: the warpgroup's index among the CTA's consumers; n0: the tile's first key
  __device__ __forceinline__ BwdSm90Keys(const FwdParams& p, const Band& band_, int wg_, int n0_)
      : band(band_), scale_log2(p.scale * kLog2e), wg(wg_), n0(n0_) {}
  // The thread's warp in the warpgroup and its place in the accumulator layout (common/device/wgmma.cuh); element i
  // of the score tile is (key row(i), query col(i)), both within the tile.
  __device__ __forceinline__ static int warp() { return threadIdx.x / 32 % 4; }
  __device__ __forceinline__ static int g() { return threadIdx.x % 32 / 4; }
  __device__ __forceinline__ static int t() { return threadIdx.x % 4; }
  __device__ __forceinline__ int row(int i) const { return 64 * wg + 16 * warp() + g() + 8 * ((i % 4) >> 1); }
  __device__ __forceinline__ static int col(int i) { return (i / 4) * 8 + 2 * t() + (i & 1); }

  // S^T = K Q^T and dP^T = V dO^T for the warpgroup's 64 keys (k16 slices 32 bytes apart in a row), one wgmma
  // group each.
  __device__ __forceinline__ void issue_scores(uint32_t k_tile, uint32_t v_tile, uint32_t q_tile, uint32_t do_tile) {
    sm90::wgmma_fence();
    issue_keys_by_queries(st, k_tile, q_tile);
    issue_keys_by_queries(dpt, v_tile, do_tile);
  }

  // P^T = 2^(scale S^T + bias - lse) while dP^T is still on the tensor cores, masked; then dS^T = P^T (dP^T - dsum),
  // also written to dbias (the head's [len_q, seqlen_k] fp32 plane) when it is not null. Queries from m0.
  __device__ __forceinline__ void probabilities(int m0, int len_q, int seqlen_k, const float* lse, const float* dsum,
                                                uint32_t bias_tile, float* dbias) {
    sm90::wgmma_wait<1>();
    sm90::fence_operands(st);
    if constexpr (kBias) {  // one branch-free loop: the four addresses of query tile 0, then immediates
      uint32_t element0[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) element0[e] = bias_tile + bias_offset(col(e), row(e));
      constexpr uint32_t kQueryTile = kTmaBias ? 8 * 128 : 8 * kBlockN * 2;  // 8 query rows
#pragma unroll
      for (int i = 0; i < kQTiles * 4; ++i) {
        const uint16_t x = load_shared_u16(element0[i % 4] + (i / 4) * kQueryTile);
        st[i] = st[i] * scale_log2 + to_float(from_bits<T>(x)) * kLog2e;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kQTiles * 4; ++i) st[i] *= scale_log2;
    }
#pragma unroll
    for (int i = 0; i < kQTiles * 4; ++i) st[i] = fast_exp2(st[i] - lse[col(i)]);
    const int wg_n0 = n0 + 64 * wg;
    if (!band.covers(m0, min(m0 + kBlockM, len_q), wg_n0, wg_n0 + 64)) {
#pragma unroll
      for (int i = 0; i < kQTiles * 4; ++i) {
        if (!band.visible(m0 + col(i), n0 + row(i))) st[i] = 0.0f;
      }
    }
    sm90::fence_operands(st);  // the exponentials before the wait: left alone, the compiler sinks them past it
    sm90::wgmma_wait<0>();
    sm90::fence_operands(dpt);
#pragma unroll
    for (int i = 0; i < kQTiles * 4; ++i) dpt[i] = st[i] * (dpt[i] - dsum[col(i)]);
    if (kBias && dbias != nullptr) {  // the bias gradient is dS, at full size
#pragma unroll
      for (int i = 0; i < kQTiles * 4; ++i) {
        const int qi = m0 + col(i), kj = n0 + row(i);
        if (qi < len_q && kj < band.len_k) dbias[int64_t(qi) * seqlen_k + kj] = dpt[i];
      }
    }
  }

  // P^T and dS^T as the A operands of dV and dK (the k dimension being the queries), dS^T also into ds_tile
  // [kBlockN keys][kBlockM queries] for dQ; then dV += P^T dO and dK += dS^T Q issued (dO and Q N-major: a k16 step
  // is 16 rows), one wgmma group.
  __device__ __forceinline__ void issue_dv_dk(uint8_t* ds_tile, uint32_t q_tile, uint32_t do_tile) {
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
      for (int f = 0; f < 4; ++f) {  // fragment f: n8 tile 2kk + f / 2, rows g (+8 for odd f)
        const int i = 4 * (2 * kk + f / 2) + 2 * (f % 2);
        pf[kk][f] = pack2<T>(st[i], st[i + 1]);
        dsf[kk][f] = pack2<T>(dpt[i], dpt[i + 1]);
        *reinterpret_cast<uint32_t*>(ds_tile + sm90::swizzled(row(i), 16 * kk + 8 * (f / 2), kBlockN) + 4 * t()) =
            dsf[kk][f];
      }
    }
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      const uint64_t dout_rows = sm90::smem_descriptor(do_tile + kk * 16 * 128, kBlockM * 128, 1024);
      sm90::Wgmma<kD>::template rs<T, true>(dv, pf[kk], dout_rows, true);
    }
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      const uint64_t q_rows = sm90::smem_descriptor(q_tile + kk * 16 * 128, kBlockM * 128, 1024);
      sm90::Wgmma<kD>::template rs<T, true>(dk, dsf[kk], q_rows, true);
    }
    sm90::wgmma_commit();
  }

  // Waits for dV and dK: dQ's accumulators then take the registers P^T and dS^T held (no spills at head dim 128).
  __device__ __forceinline__ void wait_dv_dk() {
    sm90::wgmma_wait<0>();
    sm90::fence_operands(dv);
    sm90::fence_operands(dk);
    sm90::fence_operands(pf);
    sm90::fence_operands(dsf);
  }

  // dQ[:, warpgroup half] = dS K into dq: dS^T read M-major from ds_tile (a k16 step is 16 keys), K N-major; once
  // every warpgroup's keys of dS^T are in place.
  __device__ __forceinline__ void dq_product(uint32_t ds_tile, uint32_t k_tile) {
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t k_cols = (kDqCols * wg / 64) * kBlockN * 128 + (kDqCols * wg % 64) * 2;
      sm90::Wgmma<kDqCols>::template ss<T, true, true>(
          dq, sm90::smem_descriptor(ds_tile + kk * 16 * 128, kBlockN * 128, 1024),
          sm90::smem_descriptor(k_tile + k_cols + kk * 16 * 128, kBlockN * 128, 1024), kk > 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(dq);
  }

  // dK = scale * sum dS^T Q, dV = sum P^T dO; keys past len_k are not stored. A slice of the group's q heads
  // (bp.kv_split > 1) adds its sums into the fp32 accumulator instead (unscaled; attention_bwd_dkv_convert_kernel
  // finishes): its rows of kv head h_kv from key row accum_row0 + n0.
  __device__ __forceinline__ void store(const BwdParams& bp, int b, int h_kv, int64_t k_row0, int64_t accum_row0) {
    const FwdParams& p = bp.fwd;
    if (bp.kv_split > 1) {
      float* accum = bp.workspace + dkv_accum_offset(bp.total_q, p.heads_q, kD) +
                     ((accum_row0 + n0) * p.heads_kv + h_kv) * 2 * kD;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int key = row(2 * r);
        if (n0 + key >= band.len_k) continue;
        float* dst = accum + int64_t(key) * p.heads_kv * 2 * kD + 2 * t();
#pragma unroll
        for (int ct = 0; ct < kDTiles; ++ct) {
          atomic_add_pair(dst + ct * 8, dk[4 * ct + 2 * r], dk[4 * ct + 2 * r + 1]);
          atomic_add_pair(dst + kD + ct * 8, dv[4 * ct + 2 * r], dv[4 * ct + 2 * r + 1]);
        }
      }
      return;
    }
    T* dk_out = static_cast<T*>(bp.dk) + offset_of(bp.dk_strides, b, k_row0 + n0, h_kv);
    T* dv_out = static_cast<T*>(bp.dv) + offset_of(bp.dv_strides, b, k_row0 + n0, h_kv);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = row(2 * r);
      if (n0 + key >= band.len_k) continue;
#pragma unroll
      for (int ct = 0; ct < kDTiles; ++ct) {
        *reinterpret_cast<uint32_t*>(dk_out + key * bp.dk_strides.row + ct * 8 + 2 * t()) =
            pack2<T>(dk[4 * ct + 2 * r] * bp.fwd.scale, dk[4 * ct + 2 * r + 1] * bp.fwd.scale);
        *reinterpret_cast<uint32_t*>(dv_out + key * bp.dv_strides.row + ct * 8 + 2 * t()) =
            pack2<T>(dv[4 * ct + 2 * r], dv[4 * ct + 2 * r + 1]);
      }
    }
  }

 private:
  __device__ __forceinline__ void issue_keys_by_queries(float (&acc)[kQTiles * 4], uint32_t keys, uint32_t queries) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t key_step = (kk / 4) * kBlockN * 128 + 64 * wg * 128 + (kk % 4) * 32;
      const uint32_t query_step = (kk / 4) * kBlockM * 128 + (kk % 4) * 32;
      sm90::Wgmma<kBlockM>::template ss<T, false, false>(acc, sm90::smem_descriptor(keys + key_step, 0, 1024),
                                                         sm90::smem_descriptor(queries + query_step, 0, 1024), kk > 0);
    }
    sm90::wgmma_commit();
  }
  // Byte offset of (query, key) in the bias tile; the swizzle depends on the query mod 8 only.
  __device__ __forceinline__ uint32_t bias_offset(int query, int key) const {
    if constexpr (kTmaBias) {  // the warpgroup's box [query][64 keys] (it is passed the box's address)
      const int k = key - 64 * wg;
      return uint32_t(query * 128 + (((k / 8) ^ (query % 8)) * 16) + (k % 8) * 2);
    } else {
      return bias_swizzled<kBlockN>(query, key);
    }
  }
};

template <typename Cfg, bool kBias>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_bwd_dkdv_sm90_kernel(const BwdParams bp) {
#if FUSEDKERNELS_SM90A
  using T = typename Cfg::T;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kDqCols = kD / 2;
  const FwdParams& p = bp.fwd;

  extern __shared__ unsigned char smem_raw[];
  // aligned to the swizzle period by an offset, so the compiler still knows these point to shared memory
  uint8_t* sK = smem_raw + (1024 - sm90::smem_address(smem_raw) % 1024) % 1024;
  uint8_t* sV = sK + Cfg::kKVBytes;
  uint8_t* sQ = sV + Cfg::kKVBytes;         // [2][kBlockM][kD]
  uint8_t* sdO = sQ + 2 * Cfg::kQBytes;     // [2][kBlockM][kD]
  uint8_t* sdS = sdO + 2 * Cfg::kQBytes;    // dS^T [kBlockN keys][kBlockM queries]
  float* sLse = reinterpret_cast<float*>(sdS + Cfg::kDSBytes);  // [2][kBlockM], base 2
  float* sDsum = sLse + 2 * kBlockM;                            // [2][kBlockM]
  uint8_t* sBias = reinterpret_cast<uint8_t*>(sDsum + 2 * kBlockM);  // [2][kBlockM queries][kBlockN keys], kBias only

  // blockIdx.y: kv head and slice of its q heads (bp.kv_split slices; attention_launch.cuh, bwd_kv_split)
  const int n_block = blockIdx.x, h_kv = blockIdx.y / bp.kv_split, b = blockIdx.z;
  const Seq seq = sequence(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.len_k) return;
  const int n1 = min(n0 + kBlockN, seq.len_k);
  const int heads = p.heads_q / p.heads_kv / bp.kv_split;  // q heads of this CTA's slice of the group
  const int head0 = h_kv * (p.heads_q / p.heads_kv) + blockIdx.y % bp.kv_split * heads;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;

  const Band band(p, seq.len_k);
  const int m_begin = band.query_begin(n0) / kBlockM;
  const int m_end = ceil_div_device(band.query_end(n1, seq.len_q), kBlockM);
  const int m_count = max(0, m_end - m_begin), iterations = heads * m_count;
  const int64_t ws_row0 = workspace_row0(p, b, seq);
  const float* dsum = bp.workspace;
  float* dq_accum = bp.workspace + dq_accum_offset(bp.total_q, p.heads_q);

  load_swizzled<kBlockN, kD, kThreads>(
      sK, static_cast<const T*>(p.k) + offset_of(p.k_strides, b, seq.k_row0 + n0, h_kv), p.k_strides.row, n1 - n0, tid);
  load_swizzled<kBlockN, kD, kThreads>(
      sV, static_cast<const T*>(p.v) + offset_of(p.v_strides, b, seq.k_row0 + n0, h_kv), p.v_strides.row, n1 - n0, tid);

  // Query-side tiles of iteration `it` (q head, query tile) into stage it % 2.
  const auto prefetch = [&](int it) {
    const int h = head0 + it / m_count, m0 = (m_begin + it % m_count) * kBlockM;
    const int stage = it % 2, valid = seq.len_q - m0;
    load_swizzled<kBlockM, kD, kThreads>(sQ + stage * Cfg::kQBytes,
                                              static_cast<const T*>(p.q) + offset_of(p.q_strides, b, seq.q_row0 + m0, h),
                                              p.q_strides.row, valid, tid);
    load_swizzled<kBlockM, kD, kThreads>(
        sdO + stage * Cfg::kQBytes, static_cast<const T*>(bp.dout) + offset_of(bp.dout_strides, b, seq.q_row0 + m0, h),
        bp.dout_strides.row, valid, tid);
    if constexpr (kBias) {  // with Q and dO, same stage
      const T* bias = static_cast<const T*>(p.bias) + b * p.bias_strides.batch + h * p.bias_strides.head +
                      m0 * p.bias_strides.row + n0;
      const bool aligned = p.bias_strides.row % 8 == 0 && reinterpret_cast<uintptr_t>(bias) % 16 == 0;
      load_bias_swizzled<kBlockM, kBlockN, kThreads>(sBias + stage * Cfg::kBiasBytes, bias, p.bias_strides.row,
                                                     valid, seq.len_k - n0, aligned, tid);
    }
    cp_async_commit();
    const float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0 + m0;
    if (tid < kBlockM) {  // rows past the sequence: P = 2^-inf = 0, so they add nothing
      sLse[stage * kBlockM + tid] = tid < valid ? lse_log2(lse[tid]) : kInf;
      sDsum[stage * kBlockM + tid] = tid < valid ? dsum[(ws_row0 + m0 + tid) * p.heads_q + h] : 0.0f;
    }
  };
  // The bias tile of iteration `it` into L2, kBiasLead iterations before its cp.async (prefetch_bias_l2).
  constexpr int kBiasLead = 2;
  const auto prefetch_bias = [&](int it) {
    if constexpr (kBias) {
      if (it < iterations) {
        const int h = head0 + it / m_count, m0 = (m_begin + it % m_count) * kBlockM;
        const T* bias = static_cast<const T*>(p.bias) + b * p.bias_strides.batch + h * p.bias_strides.head +
                        m0 * p.bias_strides.row + n0;
        prefetch_bias_l2<kBlockM, kBlockN, kThreads>(bias, p.bias_strides.row, seq.len_q - m0, seq.len_k - n0, tid);
      }
    }
  };
#pragma unroll
  for (int it = 1; it < 1 + kBiasLead; ++it) prefetch_bias(it);
  if (iterations > 0) prefetch(0);

  BwdSm90Keys<Cfg, kBias> keys(p, band, wg, n0);
  const uint32_t k_base = sm90::smem_address(sK), v_base = sm90::smem_address(sV), ds_base = sm90::smem_address(sdS);

  for (int it = 0; it < iterations; ++it) {
    const int h = head0 + it / m_count, m0 = (m_begin + it % m_count) * kBlockM, stage = it % 2;
    const uint32_t q_address = sm90::smem_address(sQ + stage * Cfg::kQBytes);
    const uint32_t do_address = sm90::smem_address(sdO + stage * Cfg::kQBytes);
    const uint32_t k_address = sm90::opaque(k_base), v_address = sm90::opaque(v_base);
    cp_async_wait<0>();
    sm90::fence_proxy_async_shared();
    __syncthreads();  // this step's tiles landed; every warpgroup is done with the other stage and with dS^T
    if (it + 1 < iterations) prefetch(it + 1);
    prefetch_bias(it + 1 + kBiasLead);

    keys.issue_scores(k_address, v_address, q_address, do_address);
    float* dbias = kBias && bp.dbias != nullptr ? bp.dbias + (int64_t(b) * p.heads_q + h) * p.seqlen_q * p.seqlen_k
                                                : nullptr;
    keys.probabilities(m0, seq.len_q, p.seqlen_k, sLse + stage * kBlockM, sDsum + stage * kBlockM,
                       kBias ? sm90::smem_address(sBias) + stage * Cfg::kBiasBytes : 0u, dbias);
    keys.issue_dv_dk(sdS, q_address, do_address);
    sm90::fence_proxy_async_shared();  // dS^T was written through the generic proxy
    __syncthreads();                   // both warpgroups' keys of dS^T are in place
    keys.wait_dv_dk();
    keys.dq_product(sm90::opaque(ds_base), k_address);

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = m0 + 16 * warp + g + 8 * r;
      if (i >= seq.len_q) continue;
      float* dst = dq_accum + ((ws_row0 + i) * p.heads_q + h) * kD + kDqCols * wg + 2 * t;
#pragma unroll
      for (int ct = 0; ct < kDqCols / 8; ++ct) {
        atomic_add_pair(dst + ct * 8, keys.dq[4 * ct + 2 * r], keys.dq[4 * ct + 2 * r + 1]);
      }
    }
  }
  keys.store(bp, b, h_kv, seq.k_row0, workspace_key_row0(p, b, seq));
#else
  __trap();  // never launched: bwd_sm90_available() is false without sm_90a code
#endif
}

}  // namespace fusedkernels::attention
