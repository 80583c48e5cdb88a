// The backward kernels (FlashAttention-2's algorithm on mma.sync): recompute P from q, k and the saved
// log-sum-exp, never storing it.
//   preprocess   dsum_i = sum_d dout_id * out_id (- dlse_i) per query row (the launcher zeroes the dq accumulator)
//   dkdv         one CTA per (key tile, kv head, sequence; head-dim slice for large heads): loops over the
//                query tiles of every q head of its group, dK and dV in registers; with kAtomicDq it also
//                adds its share of dS K into an fp32 dq accumulator (atomics: run-to-run order varies)
//   dq           deterministic mode: one CTA per query tile loops over the key tiles, dq in registers
//   dq_convert   dq = scale * accumulator, in the input dtype
// docs/attention.md has the formulas.
#pragma once

#include <cstdint>

#include "attention/attention_common.cuh"

namespace fusedkernels::attention {

// The workspace: dsum [total_q][heads_q], then (atomic dq) the dq accumulator [total_q][heads_q][head_dim]
// at a 16-byte boundary (vector reductions add float pairs), then (kv_split > 1) the dK dV accumulator
// [total_k][heads_kv][2][head_dim] (dK unscaled, then dV).
__host__ __device__ constexpr int64_t dq_accum_offset(int64_t total_q, int heads_q) {
  return (total_q * heads_q + 3) / 4 * 4;
}
__host__ __device__ constexpr int64_t dkv_accum_offset(int64_t total_q, int heads_q, int head_dim) {
  return dq_accum_offset(total_q, heads_q) + (total_q * heads_q * head_dim + 3) / 4 * 4;
}
// Row index of query row 0 of sequence b there:
__device__ __forceinline__ int64_t workspace_row0(const FwdParams& p, int b, const Seq& seq) {
  return p.cu_seqlens_q != nullptr ? seq.q_row0 : int64_t(b) * p.seqlen_q;
}
// and of key row 0 in the dK dV accumulator:
__device__ __forceinline__ int64_t workspace_key_row0(const FwdParams& p, int b, const Seq& seq) {
  return p.cu_seqlens_k != nullptr ? seq.k_row0 : int64_t(b) * p.seqlen_k;
}

// The log-sum-exp in base 2 as the backward subtracts it; a row that saw no key (-inf) gets +inf, so its
// probabilities come out 0 rather than NaN.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -kInf ? kInf : lse * kLog2e; }

// Keep bit of key j for query i (the same draw the forward's keep_pair made).
__device__ __forceinline__ bool keep_one(const Dropout& d, int i, int j) {
  return (d.keep_pair(i, j & ~1) >> (j & 1)) & 1u;
}

__device__ __forceinline__ Dropout dropout_of(const BwdParams& bp, int b, int h) {
  const FwdParams& p = bp.fwd;
  if (p.dropout_p <= 0.0f) return Dropout(0, 0, 0, 0.0f);
  return Dropout(static_cast<uint64_t>(p.rng_state[0]), static_cast<uint64_t>(p.rng_state[1]), b * p.heads_q + h,
                 p.dropout_p);
}

// ------------------------------------------------------------------------------------------------
// preprocess: one warp per (query row, head)
// ------------------------------------------------------------------------------------------------

template <typename T, int kD>
__global__ void __launch_bounds__(256) attention_bwd_preprocess_kernel(const BwdParams bp, float* dsum) {
  const FwdParams& p = bp.fwd;
  const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x % 32;
  const int i = blockIdx.x * 8 + threadIdx.x / 32;
  const Seq seq = sequence(p, b);
  if (i >= seq.len_q) return;
  const T* dout = static_cast<const T*>(bp.dout) + offset_of(bp.dout_strides, b, seq.q_row0 + i, h);
  const T* out = static_cast<const T*>(p.out) + offset_of(p.out_strides, b, seq.q_row0 + i, h);
  float acc = 0.0f;
  for (int c = lane * 8; c < kD; c += 32 * 8) {
    const uint4 dv = *reinterpret_cast<const uint4*>(dout + c), ov = *reinterpret_cast<const uint4*>(out + c);
    const T* de = reinterpret_cast<const T*>(&dv);
    const T* oe = reinterpret_cast<const T*>(&ov);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(de[e]) * to_float(oe[e]);
  }
  acc = group_sum_in_warp<32>(acc);
  if (bp.dlse != nullptr) acc -= bp.dlse[b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0 + i];
  if (lane == 0) dsum[(workspace_row0(p, b, seq) + i) * p.heads_q + h] = acc;
}

// ------------------------------------------------------------------------------------------------
// dK, dV (and dQ by atomics)
// ------------------------------------------------------------------------------------------------

// dst[0] += lo, dst[1] += hi (dst 8-byte aligned). sm_90 adds the pair in one reduction
// (red.global.add.v2.f32): half the instructions of two scalar atomics, and each row's 32-byte sector is
// filled by one instruction instead of half-filled by two.
__device__ __forceinline__ void atomic_add_pair(float* dst, float lo, float hi) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(lo, hi));
#else
  atomicAdd(dst, lo);
  atomicAdd(dst + 1, hi);
#endif
}

// kWarps warps, 16 keys each (kBlockN = 16 * kWarps); kBlockM query rows per step; dK/dV/dQ computed for a
// head-dim slice of kDSlice columns (q.k still uses all kD); kStages buffers of the query-side tiles.
template <typename T_, int kD_, int kBlockM_, int kWarps_, int kDSlice_, int kStages_>
struct BwdConfig {
  using T = T_;
  static constexpr int kD = kD_, kBlockM = kBlockM_, kWarps = kWarps_, kDSlice = kDSlice_, kStages = kStages_;
  static constexpr int kBlockN = 16 * kWarps, kThreads = 32 * kWarps, kSlices = kD / kDSlice;
  // dQ = dS K over the kBlockM x kDSlice tile: the warps form a grid of kDqWarpsM by kWarps / kDqWarpsM, each
  // warp kDqMTiles m-tiles of 16 rows by kDqCols columns. Two m-tiles where the columns stay a multiple of 16
  // and the warp tile gets squarer: each k step then reads fewer dS and K fragments (m-tiles + column pairs)
  // for the same MMAs, and shared-memory bandwidth is what the backward runs out of.
  static constexpr int kDqColsOf1 = kDSlice * kBlockM / (16 * kWarps);  // columns a warp gets with one m-tile
  static constexpr int kDqMTiles = kDqColsOf1 > 32 && kDqColsOf1 % 32 == 0 && kBlockM % 32 == 0 ? 2 : 1;
  static constexpr int kDqWarpsM = kBlockM / (16 * kDqMTiles), kDqCols = kDqColsOf1 / kDqMTiles;
  static_assert(kD % kDSlice == 0 && kDSlice % 16 == 0 && kBlockM % 16 == 0);
  static_assert(kWarps % kDqWarpsM == 0 && kDqCols % 16 == 0 && kDqCols * (kWarps / kDqWarpsM) == kDSlice);
  static constexpr int kSmemKV = kBlockN * padded(kD), kSmemQ = kBlockM * padded(kD);
  static constexpr int kSmemDS = kBlockN * padded(kBlockM);
  static constexpr int kSmemBytes =
      (2 * kSmemKV + 2 * kStages * kSmemQ + kSmemDS) * int(sizeof(T)) + 2 * kStages * kBlockM * int(sizeof(float));
};

template <typename Cfg, bool kAtomicDq>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_bwd_dkdv_kernel(const BwdParams bp) {
  using T = typename Cfg::T;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kDSlice = Cfg::kDSlice, kStages = Cfg::kStages, kQTiles = kBlockM / 8, kSTiles = kDSlice / 8;
  const FwdParams& p = bp.fwd;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Cfg::kSmemKV;
  T* sQ = sV + Cfg::kSmemKV;             // [kStages][kBlockM][padded(kD)]
  T* sdO = sQ + kStages * Cfg::kSmemQ;   // same
  T* sdS = sdO + kStages * Cfg::kSmemQ;  // [kBlockN][padded(kBlockM)]: dS^T for dQ = dS K
  float* sLse = reinterpret_cast<float*>(sdS + Cfg::kSmemDS);  // [kStages][kBlockM], base-2 lse
  float* sDsum = sLse + kStages * kBlockM;                     // [kStages][kBlockM]

  const int n_block = blockIdx.x / Cfg::kSlices, d0 = (blockIdx.x % Cfg::kSlices) * kDSlice;
  const int h_kv = blockIdx.y, b = blockIdx.z;
  const Seq seq = sequence(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.len_k) return;
  const int n1 = min(n0 + kBlockN, seq.len_k);
  const int group = p.heads_q / p.heads_kv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int key_row0 = warp * 16;

  const Band band(p, seq.len_k);
  const int m_begin = band.query_begin(n0) / kBlockM;
  const int m_end = ceil_div_device(band.query_end(n1, seq.len_q), kBlockM);
  const int m_count = max(0, m_end - m_begin), iterations = group * m_count;
  const int64_t ws_row0 = workspace_row0(p, b, seq);
  const float* dsum = bp.workspace;
  float* dq_accum = bp.workspace + dq_accum_offset(bp.total_q, p.heads_q);

  load_tile<kBlockN, kD, kThreads>(sK, static_cast<const T*>(p.k) + offset_of(p.k_strides, b, seq.k_row0 + n0, h_kv),
                                   p.k_strides.row, n1 - n0, tid);
  load_tile<kBlockN, kD, kThreads>(sV, static_cast<const T*>(p.v) + offset_of(p.v_strides, b, seq.k_row0 + n0, h_kv),
                                   p.v_strides.row, n1 - n0, tid);
  cp_async_commit();

  // Query-side tiles of iteration `it` (q head, query tile) into stage it % kStages.
  auto prefetch = [&](int it) {
    const int h = h_kv * group + it / m_count, m0 = (m_begin + it % m_count) * kBlockM;
    const int stage = it % kStages, valid = seq.len_q - m0;
    load_tile<kBlockM, kD, kThreads>(sQ + stage * Cfg::kSmemQ,
                                     static_cast<const T*>(p.q) + offset_of(p.q_strides, b, seq.q_row0 + m0, h),
                                     p.q_strides.row, valid, tid);
    load_tile<kBlockM, kD, kThreads>(sdO + stage * Cfg::kSmemQ,
                                     static_cast<const T*>(bp.dout) + offset_of(bp.dout_strides, b, seq.q_row0 + m0, h),
                                     bp.dout_strides.row, valid, tid);
    cp_async_commit();
    const float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0 + m0;
    for (int r = tid; r < kBlockM; r += kThreads) {
      sLse[stage * kBlockM + r] = r < valid ? lse_log2(lse[r]) : kInf;
      sDsum[stage * kBlockM + r] = r < valid ? dsum[(ws_row0 + m0 + r) * p.heads_q + h] : 0.0f;
    }
  };
  if (iterations > 0) prefetch(0);

  float dk[kSTiles][4] = {}, dv[kSTiles][4] = {};
  const float scale_log2 = p.scale * kLog2e;
  for (int it = 0; it < iterations; ++it) {
    const int h = h_kv * group + it / m_count, m0 = (m_begin + it % m_count) * kBlockM, stage = it % kStages;
    const T* q_s = sQ + stage * Cfg::kSmemQ;
    const T* do_s = sdO + stage * Cfg::kSmemQ;
    cp_async_wait<0>();
    __syncthreads();  // this step's tiles landed; every warp is done with the other stage and with sdS
    if (kStages == 2 && it + 1 < iterations) prefetch(it + 1);

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys
    float st[kQTiles][4] = {}, dpt[kQTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldmatrix_x4(ak, sK + (key_row0 + lane % 16) * padded(kD) + kk * 16 + (lane / 16) * 8);
      ldmatrix_x4(av, sV + (key_row0 + lane % 16) * padded(kD) + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < kQTiles / 2; ++np) {
        const int row = (np * 16 + lane % 8 + (lane / 16) * 8) * padded(kD) + kk * 16 + ((lane / 8) % 2) * 8;
        uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, q_s + row);
        ldmatrix_x4(bo, do_s + row);
        mma_16x8x16<T>(st[2 * np], ak, bq[0], bq[1]);
        mma_16x8x16<T>(st[2 * np + 1], ak, bq[2], bq[3]);
        mma_16x8x16<T>(dpt[2 * np], av, bo[0], bo[1]);
        mma_16x8x16<T>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // P and dS, element (key j = row, query i = column); st becomes dropout(P) / (1 - p), dpt becomes dS.
    // One branch per tile for each adjustment (see the forward).
    const Dropout dropout = dropout_of(bp, b, h);
    const T* bias = p.bias == nullptr ? nullptr
                                      : static_cast<const T*>(p.bias) + b * p.bias_strides.batch +
                                            h * p.bias_strides.head;
    float* dbias = bp.dbias == nullptr ? nullptr : bp.dbias + (int64_t(b) * p.heads_q + h) * p.seqlen_q * p.seqlen_k;
    const float* lse_s = sLse + stage * kBlockM;
    const float* dsum_s = sDsum + stage * kBlockM;
    // (key j, query i) of fragment element e of query tile nt
    const auto key_of = [&](int e) { return n0 + key_row0 + g + 8 * (e >> 1); };
    const auto col_of = [&](int nt, int e) { return nt * 8 + 2 * t + (e & 1); };
    for_each_element<kQTiles>([&](int nt, int e) { st[nt][e] *= scale_log2; });
    if (bias != nullptr) {
      for_each_element<kQTiles>([&](int nt, int e) {
        const int i = m0 + col_of(nt, e), j = key_of(e);
        if (i < seq.len_q && j < seq.len_k) st[nt][e] += to_float(bias[i * p.bias_strides.row + j]) * kLog2e;
      });
    }
    for_each_element<kQTiles>([&](int nt, int e) { st[nt][e] = fast_exp2(st[nt][e] - lse_s[col_of(nt, e)]); });
    if (!band.covers(m0, min(m0 + kBlockM, seq.len_q), n0, n0 + kBlockN)) {
      for_each_element<kQTiles>([&](int nt, int e) {
        if (!band.visible(m0 + col_of(nt, e), key_of(e))) st[nt][e] = 0.0f;
      });
    }
    if (p.dropout_p > 0.0f) {  // dP through the mask; st holds P for dS, then dropout(P)
      for_each_element<kQTiles>([&](int nt, int e) {
        const float z = keep_one(dropout, m0 + col_of(nt, e), key_of(e)) ? dropout.rescale : 0.0f;
        const float prob = st[nt][e];
        dpt[nt][e] = prob * (dpt[nt][e] * z - dsum_s[col_of(nt, e)]);
        st[nt][e] = prob * z;
      });
    } else {
      for_each_element<kQTiles>([&](int nt, int e) { dpt[nt][e] = st[nt][e] * (dpt[nt][e] - dsum_s[col_of(nt, e)]); });
    }
    if (dbias != nullptr) {
      for_each_element<kQTiles>([&](int nt, int e) {
        const int i = m0 + col_of(nt, e), j = key_of(e);
        if (i < seq.len_q && j < seq.len_k) dbias[int64_t(i) * p.seqlen_k + j] = dpt[nt][e];
      });
    }

    // dV += dropout(P)^T dO and dK += dS^T Q over the slice, the k dimension being the queries
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t ap[4], as[4];
      ap[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      ap[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      ap[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      as[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
      as[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
      as[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      as[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      if (kAtomicDq) {  // dS^T to shared memory for dQ = dS K
        *reinterpret_cast<uint32_t*>(sdS + (key_row0 + g) * padded(kBlockM) + kk * 16 + 2 * t) = as[0];
        *reinterpret_cast<uint32_t*>(sdS + (key_row0 + g + 8) * padded(kBlockM) + kk * 16 + 2 * t) = as[1];
        *reinterpret_cast<uint32_t*>(sdS + (key_row0 + g) * padded(kBlockM) + kk * 16 + 8 + 2 * t) = as[2];
        *reinterpret_cast<uint32_t*>(sdS + (key_row0 + g + 8) * padded(kBlockM) + kk * 16 + 8 + 2 * t) = as[3];
      }
#pragma unroll
      for (int dp = 0; dp < kDSlice / 16; ++dp) {
        const int row = (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * padded(kD) + d0 + dp * 16 + (lane / 16) * 8;
        uint32_t bo[4], bq[4];
        ldmatrix_x4_trans(bo, do_s + row);
        ldmatrix_x4_trans(bq, q_s + row);
        mma_16x8x16<T>(dv[2 * dp], ap, bo[0], bo[1]);
        mma_16x8x16<T>(dv[2 * dp + 1], ap, bo[2], bo[3]);
        mma_16x8x16<T>(dk[2 * dp], as, bq[0], bq[1]);
        mma_16x8x16<T>(dk[2 * dp + 1], as, bq[2], bq[3]);
      }
    }

    if (kAtomicDq) {
      __syncthreads();  // dS^T complete
      if (kStages == 1 && it + 1 < iterations) prefetch(it + 1);
      // dQ[warp's rows, warp's columns] += dS K, dS read transposed from its [key][query] layout
      constexpr int kMTiles = Cfg::kDqMTiles, kCTiles = Cfg::kDqCols / 8;
      const int row0 = (warp % Cfg::kDqWarpsM) * kMTiles * 16, c0 = d0 + (warp / Cfg::kDqWarpsM) * Cfg::kDqCols;
      float dq[kMTiles][kCTiles][4] = {};
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          ldmatrix_x4_trans(a[mt], sdS + (kk * 16 + lane % 8 + (lane / 16) * 8) * padded(kBlockM) + row0 + mt * 16 +
                                       ((lane / 8) % 2) * 8);
        }
#pragma unroll
        for (int dp = 0; dp < kCTiles / 2; ++dp) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, sK + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * padded(kD) + c0 + dp * 16 + (lane / 16) * 8);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_16x8x16<T>(dq[mt][2 * dp], a[mt], bk[0], bk[1]);
            mma_16x8x16<T>(dq[mt][2 * dp + 1], a[mt], bk[2], bk[3]);
          }
        }
      }
      // The lane's rows are constant pitches apart from its first.
      const int i0 = m0 + row0 + g;
      float* dq_row0 = dq_accum + ((ws_row0 + i0) * p.heads_q + h) * kD + c0 + 2 * t;
      const int64_t dq_pitch = int64_t(p.heads_q) * kD;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int dr = mt * 16 + 8 * r;
          if (i0 + dr >= seq.len_q) continue;
          float* dst = dq_row0 + dr * dq_pitch;
#pragma unroll
          for (int ct = 0; ct < kCTiles; ++ct) atomic_add_pair(dst + ct * 8, dq[mt][ct][2 * r], dq[mt][ct][2 * r + 1]);
        }
      }
    } else if (kStages == 1) {
      __syncthreads();  // every warp is done with this step's tiles
      if (it + 1 < iterations) prefetch(it + 1);
    }
  }

  // dK = scale * sum dS^T Q, dV = sum dropout(P)^T dO; keys past the sequence are not stored.
  T* dk_out = static_cast<T*>(bp.dk) + offset_of(bp.dk_strides, b, seq.k_row0 + n0, h_kv) + d0;
  T* dv_out = static_cast<T*>(bp.dv) + offset_of(bp.dv_strides, b, seq.k_row0 + n0, h_kv) + d0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = key_row0 + g + 8 * r;
    if (n0 + row >= seq.len_k) continue;
#pragma unroll
    for (int ct = 0; ct < kSTiles; ++ct) {
      *reinterpret_cast<uint32_t*>(dk_out + row * bp.dk_strides.row + ct * 8 + 2 * t) =
          pack2<T>(dk[ct][2 * r] * p.scale, dk[ct][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + row * bp.dv_strides.row + ct * 8 + 2 * t) =
          pack2<T>(dv[ct][2 * r], dv[ct][2 * r + 1]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// dQ without atomics (deterministic mode): one CTA per query tile, 4 warps of 16 rows, key tiles of 64
// ------------------------------------------------------------------------------------------------

template <typename T_, int kD_, int kStages_>
struct DqConfig {
  using T = T_;
  static constexpr int kD = kD_, kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = 128, kStages = kStages_;
  static constexpr int kSmemQ = kBlockM * padded(kD), kSmemKV = kBlockN * padded(kD);
  static constexpr int kSmemBytes = (2 * kSmemQ + 2 * kStages * kSmemKV) * int(sizeof(T));
};

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attention_bwd_dq_kernel(const BwdParams bp) {
  using T = typename Cfg::T;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kStages = Cfg::kStages, kNTiles = kBlockN / 8, kDTiles = kD / 8;
  const FwdParams& p = bp.fwd;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + Cfg::kSmemQ;
  T* sK = sdO + Cfg::kSmemQ;          // [kStages][kBlockN][padded(kD)]
  T* sV = sK + kStages * Cfg::kSmemKV;  // same

  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const Seq seq = sequence(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.len_q) return;
  const int m1 = min(m0 + kBlockM, seq.len_q);
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, row0 = warp * 16;
  const int64_t ws_row0 = workspace_row0(p, b, seq);

  const Band band(p, seq.len_k);
  const int n_begin = band.key_begin(m0) / kBlockN;
  const int n_end = ceil_div_device(band.key_end(m1), kBlockN);
  const T* k = static_cast<const T*>(p.k) + offset_of(p.k_strides, b, seq.k_row0, h_kv);
  const T* v = static_cast<const T*>(p.v) + offset_of(p.v_strides, b, seq.k_row0, h_kv);
  const T* bias = p.bias == nullptr ? nullptr
                                    : static_cast<const T*>(p.bias) + b * p.bias_strides.batch + h * p.bias_strides.head;
  const Dropout dropout = dropout_of(bp, b, h);

  auto load_kv = [&](int n) {
    const int n0 = n * kBlockN, stage = (n - n_begin) % kStages;
    load_tile<kBlockN, kD, kThreads>(sK + stage * Cfg::kSmemKV, k + n0 * p.k_strides.row, p.k_strides.row,
                                     seq.len_k - n0, tid);
    load_tile<kBlockN, kD, kThreads>(sV + stage * Cfg::kSmemKV, v + n0 * p.v_strides.row, p.v_strides.row,
                                     seq.len_k - n0, tid);
    cp_async_commit();
  };

  float lse2[2], dsum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + row0 + g + 8 * r;
    lse2[r] = i < m1 ? lse_log2(p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0 + i]) : kInf;
    dsum[r] = i < m1 ? bp.workspace[(ws_row0 + i) * p.heads_q + h] : 0.0f;
  }
  if (n_begin < n_end) {
    load_tile<kBlockM, kD, kThreads>(sQ, static_cast<const T*>(p.q) + offset_of(p.q_strides, b, seq.q_row0 + m0, h),
                                     p.q_strides.row, m1 - m0, tid);
    load_tile<kBlockM, kD, kThreads>(sdO, static_cast<const T*>(bp.dout) + offset_of(bp.dout_strides, b, seq.q_row0 + m0, h),
                                     bp.dout_strides.row, m1 - m0, tid);
    load_kv(n_begin);
  }
  float dq[kDTiles][4] = {};
  const float scale_log2 = p.scale * kLog2e;
  for (int n = n_begin; n < n_end; ++n) {
    const int n0 = n * kBlockN, stage = (n - n_begin) % kStages;
    const T* k_s = sK + stage * Cfg::kSmemKV;
    const T* v_s = sV + stage * Cfg::kSmemKV;
    cp_async_wait<0>();
    __syncthreads();  // this tile landed; every warp is done with the other stage
    if (kStages == 2 && n + 1 < n_end) load_kv(n + 1);

    float s[kNTiles][4] = {}, dp[kNTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t aq[4], ao[4];
      ldmatrix_x4(aq, sQ + (row0 + lane % 16) * padded(kD) + kk * 16 + (lane / 16) * 8);
      ldmatrix_x4(ao, sdO + (row0 + lane % 16) * padded(kD) + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        const int row = (np * 16 + lane % 8 + (lane / 16) * 8) * padded(kD) + kk * 16 + ((lane / 8) % 2) * 8;
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, k_s + row);
        ldmatrix_x4(bv, v_s + row);
        mma_16x8x16<T>(s[2 * np], aq, bk[0], bk[1]);
        mma_16x8x16<T>(s[2 * np + 1], aq, bk[2], bk[3]);
        mma_16x8x16<T>(dp[2 * np], ao, bv[0], bv[1]);
        mma_16x8x16<T>(dp[2 * np + 1], ao, bv[2], bv[3]);
      }
    }
    // (query i, key j) of fragment element e of key tile nt
    const auto row_of = [&](int e) { return m0 + row0 + g + 8 * (e >> 1); };
    const auto key_of = [&](int nt, int e) { return n0 + nt * 8 + 2 * t + (e & 1); };
    for_each_element<kNTiles>([&](int nt, int e) { s[nt][e] *= scale_log2; });
    if (bias != nullptr) {
      for_each_element<kNTiles>([&](int nt, int e) {
        const int i = row_of(e), j = key_of(nt, e);
        if (i < m1 && j < seq.len_k) s[nt][e] += to_float(bias[i * p.bias_strides.row + j]) * kLog2e;
      });
    }
    for_each_element<kNTiles>([&](int nt, int e) { s[nt][e] = fast_exp2(s[nt][e] - lse2[e >> 1]); });
    if (!band.covers(m0, m1, n0, n0 + kBlockN)) {
      for_each_element<kNTiles>([&](int nt, int e) {
        if (!band.visible(row_of(e), key_of(nt, e))) s[nt][e] = 0.0f;
      });
    }
    if (p.dropout_p > 0.0f) {
      for_each_element<kNTiles>([&](int nt, int e) {
        dp[nt][e] *= keep_one(dropout, row_of(e), key_of(nt, e)) ? dropout.rescale : 0.0f;
      });
    }
    for_each_element<kNTiles>([&](int nt, int e) { s[nt][e] *= dp[nt][e] - dsum[e >> 1]; });  // dS
    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dpair = 0; dpair < kD / 16; ++dpair) {
        uint32_t bk[4];
        ldmatrix_x4_trans(bk, k_s + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * padded(kD) + dpair * 16 + (lane / 16) * 8);
        mma_16x8x16<T>(dq[2 * dpair], a, bk[0], bk[1]);
        mma_16x8x16<T>(dq[2 * dpair + 1], a, bk[2], bk[3]);
      }
    }
    if (kStages == 1) {
      __syncthreads();  // every warp is done with this tile
      if (n + 1 < n_end) load_kv(n + 1);
    }
  }

  T* dq_out = static_cast<T*>(bp.dq) + offset_of(bp.dq_strides, b, seq.q_row0 + m0, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (m0 + row >= m1) continue;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(dq_out + row * bp.dq_strides.row + dt * 8 + 2 * t) =
          pack2<T>(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// dq = scale * accumulator (and dk, dv where their accumulator is used): one thread per 8 elements
// ------------------------------------------------------------------------------------------------

// dst[0..8) = scale * src[0..8), rounded to T, in one 16-byte store
template <typename T>
__device__ __forceinline__ void store_scaled_8(T* dst, const float* src, float scale) {
  uint4 packed;
  uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
  for (int e = 0; e < 4; ++e) words[e] = pack2<T>(src[2 * e] * scale, src[2 * e + 1] * scale);
  *reinterpret_cast<uint4*>(dst) = packed;
}

template <typename T, int kD>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(const BwdParams bp) {
  const FwdParams& p = bp.fwd;
  const int h = blockIdx.y, b = blockIdx.z;
  const int i = (blockIdx.x * 256 + threadIdx.x) / (kD / 8), c = ((blockIdx.x * 256 + threadIdx.x) % (kD / 8)) * 8;
  const Seq seq = sequence(p, b);
  if (i >= seq.len_q) return;
  const float* src = bp.workspace + dq_accum_offset(bp.total_q, p.heads_q) + ((workspace_row0(p, b, seq) + i) * p.heads_q + h) * kD + c;
  store_scaled_8(static_cast<T*>(bp.dq) + offset_of(bp.dq_strides, b, seq.q_row0 + i, h) + c, src, p.scale);
}

// dk = scale * accumulator, dv = accumulator (kv_split > 1): one thread per 8 elements of each
template <typename T, int kD>
__global__ void __launch_bounds__(256) attention_bwd_dkv_convert_kernel(const BwdParams bp) {
  const FwdParams& p = bp.fwd;
  const int h = blockIdx.y, b = blockIdx.z;
  const int j = (blockIdx.x * 256 + threadIdx.x) / (kD / 8), c = ((blockIdx.x * 256 + threadIdx.x) % (kD / 8)) * 8;
  const Seq seq = sequence(p, b);
  if (j >= seq.len_k) return;
  const float* src = bp.workspace + dkv_accum_offset(bp.total_q, p.heads_q, kD) +
                     ((workspace_key_row0(p, b, seq) + j) * p.heads_kv + h) * 2 * kD + c;
  store_scaled_8(static_cast<T*>(bp.dk) + offset_of(bp.dk_strides, b, seq.k_row0 + j, h) + c, src, p.scale);
  store_scaled_8(static_cast<T*>(bp.dv) + offset_of(bp.dv_strides, b, seq.k_row0 + j, h) + c, src + kD, 1.0f);
}

}  // namespace fusedkernels::attention
