// The Hopper forward kernel (sm_90a): the portable kernel's algorithm with both matmuls on warpgroup MMA.
// Two warpgroups of 64 query rows share each key/value tile; S = Q K^T reads both operands from shared
// memory, O += P V takes P from registers. Each step issues the next tile's Q K^T and this tile's P V
// together, then runs the next tile's softmax while P V is still on the tensor cores (FlashAttention-3's
// intra-warpgroup overlap). Tiles arrive by cp.async, double-buffered, in the 128B-swizzled layout
// wgmma reads (common/device/wgmma.cuh). docs/attention.md draws the schedule. The additive bias is a
// compile-time variant (kBias), so the kernel without it keeps its registers and shared memory.
#pragma once

#include "attention/sm90/attention_sm90_common.cuh"

namespace fusedkernels::attention {

// kMinBlocks: CTAs per SM the registers are budgeted for.
template <typename T_, int kD_, int kBlockN_, int kMinBlocks_>
struct FwdSm90Config {
  using T = T_;
  static constexpr int kD = kD_, kBlockM = 128, kBlockN = kBlockN_, kWarpgroups = kBlockM / 64;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static_assert(kD % 64 == 0, "the swizzled layout is built of 64-column blocks");
  static constexpr int kQBytes = kBlockM * kD * 2, kKVBytes = kBlockN * kD * 2, kBiasBytes = kBlockM * kBlockN * 2;
  // Q, two K and two V buffers, two bias buffers with a bias, and slack to align the start to the 1024-byte
  // swizzle period. hd128 with a bias: 161 + 64 = 225 KiB, just under Hopper's 227 KiB opt-in limit, which
  // is why the bias rows are swizzled rather than padded.
  static constexpr int smem_bytes(bool bias) { return kQBytes + 4 * kKVBytes + (bias ? 2 * kBiasBytes : 0) + 1024; }
};

// Tiles per head dim, measured on the H200 (docs/perf-notes.md): head dim 128 takes 128-key tiles, one CTA
// per SM (255 registers: 64 + 64 accumulators of S and O, and P); head dim 64 is bound by the exponentials
// (16 a clock per SM), so it takes 64-key tiles in 128 registers, two CTAs per SM whose steps fall out of
// phase: one's softmax runs under the other's products.
template <typename T, int kD>
using FwdSm90ConfigFor = FwdSm90Config<T, kD, (kD == 64 ? 64 : 128), (kD == 64 ? 2 : 1)>;

// A forward CTA's query tile, head and sequence. Under a causal mask the last query tiles see the most
// keys, and the grid is (heads, batch, tiles) with the tile a parameter minus blockIdx.z (launch_fwd_tiles): every
// head's and sequence's last tile starts before any next-to-last one, the longest first and the short ones filling
// in behind (longest-processing-time-first). Otherwise the tiles, all alike, are fastest (tiles, heads, batch): the
// CTAs that run together are one head's and share its K and V in L2. Each index is a select by multiplication of
// special registers and parameters, which the compiler rebuilds where it is used instead of holding it (ptxas:
// hd128 0 bytes of spill; a branch between the two orders spilled 60).
struct FwdTile {
  int m_block, head, batch;
};
__device__ __forceinline__ FwdTile fwd_tile(const FwdParams& p) {
  const int slowest = p.tiles_slowest;
  const int x = blockIdx.x, y = blockIdx.y, z = blockIdx.z;
  return {p.tile_offset - (slowest * z + (1 - slowest) * x), slowest * x + (1 - slowest) * y,
          slowest * y + (1 - slowest) * z};
}

// A warpgroup's 64 query rows of a forward CTA: the output accumulators, the score tile, P as an A operand and the
// online softmax's state, with the steps the Hopper forwards take on them (this kernel's and the warp-specialised
// one's, attention_fwd_sm90_ws.cuh). kTmaBias: the bias tile in the 128B-swizzled layout of 64-key column blocks
// that a TMA copy writes (the warp-specialised kernel), else in bias_swizzled's rows (this kernel's cp.async).
template <typename Cfg, bool kBias, bool kTmaBias = false>
struct FwdSm90Rows {
  using T = typename Cfg::T;
  static constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  static constexpr int kNTiles = kBlockN / 8, kDTiles = kD / 8;

  const Band band;
  const float scale_log2;
  const int wg;
  const int wg_m0, wg_m1;  // the rows [wg_m0, wg_m1); past the sequence's end a warpgroup computes on zero rows
  float o[kDTiles * 4] = {};
  float s[kNTiles * 4];
  uint32_t pf[kBlockN / 16][4];  // P as the A operand of P V
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.0f, 0.0f};

  // wg: the warpgroup's index among the CTA's consumers (threads 128 wg .. 128 wg + 127 of them)
  __device__ __forceinline__ FwdSm90Rows(const FwdParams& p, const Band& band_, int m0, int m1, int wg_)
      : band(band_),
        scale_log2(p.scale * kLog2e),
        wg(wg_),
        wg_m0(m0 + 64 * wg_),
        wg_m1(max(min(m0 + 64 * wg_ + 64, m1), m0 + 64 * wg_ + 1)) {}
  // The thread's warp in the warpgroup, and its place in the accumulator layout (common/device/wgmma.cuh).
  __device__ __forceinline__ static int warp() { return threadIdx.x / 32 % 4; }
  __device__ __forceinline__ static int g() { return threadIdx.x % 32 / 4; }
  __device__ __forceinline__ static int t() { return threadIdx.x % 4; }

  // S = Q K^T for the warpgroup's 64 rows: K-major operands, k16 slices 32 bytes apart in a 128-byte row.
  __device__ __forceinline__ void issue_qk(uint32_t q_tile, uint32_t k_tile) {
    const uint32_t q_address = q_tile + wg * 64 * 128;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t step = (kk % 4) * 32;
      const uint64_t a = sm90::smem_descriptor(q_address + (kk / 4) * kBlockM * 128 + step, 0, 1024);
      const uint64_t bk = sm90::smem_descriptor(k_tile + (kk / 4) * kBlockN * 128 + step, 0, 1024);
      sm90::Wgmma<kBlockN>::template ss<T, false, false>(s, a, bk, kk > 0);
    }
    sm90::wgmma_commit();
  }

  // O += P V: V is [keys, d] (d contiguous), the MN-major B operand; a k16 step is 16 rows (2048 bytes).
  __device__ __forceinline__ void issue_pv(uint32_t v_tile) {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint64_t bv = sm90::smem_descriptor(v_tile + kk * 16 * 128, kBlockN * 128, 1024);
      sm90::Wgmma<kD>::template rs<T, true>(o, pf[kk], bv, true);
    }
    sm90::wgmma_commit();
  }

  // Online softmax of the keys [n0, n0 + kBlockN) in base 2 (as the portable kernel): x = log2(e) * (scale * q.k +
  // bias), masked keys -inf; bias_tile: their bias tile's shared-memory address (kBias only). The output's rescale
  // factors go to `correction`, the probabilities stay in s.
  __device__ __forceinline__ void softmax(int n0, uint32_t bias_tile, float (&correction)[2]) {
#pragma unroll
    for (int i = 0; i < kNTiles * 4; ++i) s[i] *= scale_log2;
    if constexpr (kBias) {  // one branch-free loop: a per-element branch here costs more than the math
      // The lane's pair in key tile 0; the swizzle only XORs address bits 4-7 (the buffer is 1024-byte
      // aligned), so key tile nt is at lane_pair ^ (16 nt) (TMA's layout: of tile nt % 8, in column block nt / 8),
      // and row + 8 is 8 rows further on.
      const int row = 64 * wg + 16 * warp() + g();
      const uint32_t lane_pair =
          bias_tile + (kTmaBias ? sm90::swizzled(row, 2 * t(), kBlockM) : bias_swizzled<kBlockN>(row, 2 * t()));
      constexpr uint32_t kRowBytes = kTmaBias ? 128 : kBlockN * 2;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const uint32_t tile = kTmaBias ? (lane_pair ^ (16 * (nt % 8))) + (nt / 8) * kBlockM * 128 : lane_pair ^ (16 * nt);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t pair = load_shared_u32(tile + r * 8 * kRowBytes);
          s[4 * nt + 2 * r] += to_float(from_bits<T>(pair & 0xffffu)) * kLog2e;
          s[4 * nt + 2 * r + 1] += to_float(from_bits<T>(pair >> 16)) * kLog2e;
        }
      }
    }
    if (!band.covers(wg_m0, wg_m1, n0, n0 + kBlockN)) {
      const int row0 = wg_m0 + 16 * warp() + g();
#pragma unroll
      for (int i = 0; i < kNTiles * 4; ++i) {
        const int e = i % 4, key = n0 + (i / 4) * 8 + 2 * t() + (e & 1);
        if (!band.visible(row0 + 8 * (e >> 1), key)) s[i] = -kInf;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
      const float new_max = fmaxf(row_max[r], group_max_in_warp<4>(mx));
      const float base = new_max == -kInf ? 0.0f : new_max;  // a row with nothing visible yet stays at 0
      correction[r] = fast_exp2(row_max[r] - base);
      row_max[r] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        s[4 * nt + 2 * r] = fast_exp2(s[4 * nt + 2 * r] - base);
        s[4 * nt + 2 * r + 1] = fast_exp2(s[4 * nt + 2 * r + 1] - base);
        sum += s[4 * nt + 2 * r] + s[4 * nt + 2 * r + 1];
      }
      row_sum[r] = row_sum[r] * correction[r] + sum;
    }
  }

  // P (the probabilities in s) as the A operand fragments of P V.
  __device__ __forceinline__ void pack_p() {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pf[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pf[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pf[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pf[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  }

  __device__ __forceinline__ void rescale(const float (&correction)[2]) {
#pragma unroll
    for (int i = 0; i < kDTiles * 4; ++i) o[i] *= correction[(i % 4) / 2];
  }

  // Epilogue: normalise; stage the warp's 16 rows in its own rows of the Q tile sQ (swizzled, so the 8 rows a
  // store instruction covers hit distinct banks; the warpgroup's products must be done), then 16-byte stores of the
  // rows below m1 (tile rows from m0) to `out` (the tile's row 0) and the log-sum-exp to `lse` (nullptr: none).
  __device__ __forceinline__ void store(uint8_t* sQ, T* out, int64_t out_row_stride, float* lse, int m0, int m1,
                                        int lane) {
    const int warp_row0 = 64 * wg + 16 * warp(), g = FwdSm90Rows::g(), t = FwdSm90Rows::t();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + g + 8 * r;
      const float sum = group_sum_in_warp<4>(row_sum[r]);
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(sQ + sm90::swizzled(row, dt * 8, kBlockM) + 4 * t) =
            pack2<T>(o[4 * dt + 2 * r] * inv, o[4 * dt + 2 * r + 1] * inv);
      }
      if (lse != nullptr && t == 0 && m0 + row < m1) {
        lse[row] = sum > 0.0f ? row_max[r] * kLn2 + __logf(sum) : -kInf;
      }
    }
    __syncwarp();
    constexpr int kChunks = kD / 8;
#pragma unroll
    for (int c = lane; c < 16 * kChunks; c += 32) {
      const int row = warp_row0 + c / kChunks, col = (c % kChunks) * 8;
      if (m0 + row < m1) {
        *reinterpret_cast<uint4*>(out + row * out_row_stride + col) =
            *reinterpret_cast<const uint4*>(sQ + sm90::swizzled(row, col, kBlockM));
      }
    }
  }
};

template <typename Cfg, bool kBias>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) attention_fwd_sm90_kernel(const FwdParams p) {
#if FUSEDKERNELS_SM90A
  using T = typename Cfg::T;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;

  extern __shared__ unsigned char smem_raw[];
  // Aligned to the swizzle period by an offset (not through uintptr_t, which would leave the compiler not
  // knowing these point to shared memory)
  uint8_t* sQ = smem_raw + (1024 - sm90::smem_address(smem_raw) % 1024) % 1024;
  uint8_t* sK = sQ + Cfg::kQBytes;
  uint8_t* sV = sK + 2 * Cfg::kKVBytes;
  uint8_t* sBias = sV + 2 * Cfg::kKVBytes;  // kBias only

  const auto [m_block, h, b] = fwd_tile(p);  // heaviest first under a causal mask
  const Seq seq = sequence(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.len_q) return;
  const int m1 = min(m0 + kBlockM, seq.len_q);
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int tid = threadIdx.x, lane = tid % 32;

  const T* q = static_cast<const T*>(p.q) + offset_of(p.q_strides, b, seq.q_row0 + m0, h);
  const T* k = static_cast<const T*>(p.k) + offset_of(p.k_strides, b, seq.k_row0, h_kv);
  const T* v = static_cast<const T*>(p.v) + offset_of(p.v_strides, b, seq.k_row0, h_kv);
  const T* bias = kBias ? static_cast<const T*>(p.bias) + b * p.bias_strides.batch + h * p.bias_strides.head +
                              m0 * p.bias_strides.row
                        : nullptr;
  const bool bias_aligned = p.bias_strides.row % 8 == 0 && reinterpret_cast<uintptr_t>(bias) % 16 == 0;

  const Band band(p, seq.len_k);
  const int n_begin = band.key_begin(m0) / kBlockN;
  const int n_end = ceil_div_device(band.key_end(m1), kBlockN);
  const int tiles = max(n_end - n_begin, 0);
  const auto key0 = [&](int j) { return (n_end - 1 - j) * kBlockN; };  // last tile first, as the portable one

  // Bias_j travels with K_j (same cp.async group) into buffer j % 2. Softmax(j) reads it in step j - 1 (the
  // prologue for j = 0); buffer j % 2 is next written at the top of step j (bias_{j+2}), after the
  // __syncthreads that follows every warp's step j - 1: two buffers are enough.
  const auto load_k_and_bias = [&](int j) {
    load_swizzled<kBlockN, kD, kThreads>(sK + (j % 2) * Cfg::kKVBytes, k + key0(j) * p.k_strides.row,
                                         p.k_strides.row, seq.len_k - key0(j), tid);
    if constexpr (kBias) {
      load_bias_swizzled<kBlockM, kBlockN, kThreads>(sBias + (j % 2) * Cfg::kBiasBytes, bias + key0(j),
                                                     p.bias_strides.row, m1 - m0, seq.len_k - key0(j),
                                                     bias_aligned, tid);
    }
  };
  // The bias tile three steps ahead of its cp.async's step into L2 (prefetch_bias_l2).
  constexpr int kBiasLead = 3;
  const auto prefetch_bias = [&](int j) {
    if constexpr (kBias) {
      if (j < tiles) {
        prefetch_bias_l2<kBlockM, kBlockN, kThreads>(bias + key0(j), p.bias_strides.row, m1 - m0,
                                                     seq.len_k - key0(j), tid);
      }
    }
  };
  const auto load_v = [&](int j) {
    load_swizzled<kBlockN, kD, kThreads>(sV + (j % 2) * Cfg::kKVBytes, v + key0(j) * p.v_strides.row,
                                         p.v_strides.row, seq.len_k - key0(j), tid);
  };

  FwdSm90Rows<Cfg, kBias> rows(p, band, m0, m1, tid / 128);
  const uint32_t q_tile = sm90::smem_address(sQ);
  const auto k_tile = [&](int j) { return sm90::smem_address(sK + (j % 2) * Cfg::kKVBytes); };
  const auto v_tile = [&](int j) { return sm90::smem_address(sV + (j % 2) * Cfg::kKVBytes); };
  const auto bias_tile = [&](int j) { return kBias ? sm90::smem_address(sBias) + (j % 2) * Cfg::kBiasBytes : 0u; };

  if (tiles > 0) {
#pragma unroll
    for (int j = 2; j < 2 + kBiasLead; ++j) prefetch_bias(j);
    load_swizzled<kBlockM, kD, kThreads>(sQ, q, p.q_strides.row, m1 - m0, tid);
    load_k_and_bias(0);
    cp_async_commit();
    load_v(0);
    if (tiles > 1) load_k_and_bias(1);
    cp_async_commit();
    cp_async_wait<1>();
    sm90::fence_proxy_async_shared();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();
    sm90::wgmma_fence();
    rows.issue_qk(q_tile, k_tile(0));
    sm90::wgmma_wait<0>();
    sm90::fence_operands(rows.s);
    float unused[2];
    rows.softmax(key0(0), bias_tile(0), unused);
  }
  // Steps 0 .. tiles-2 overlap; the last step only has P V left. (No wgmma sits behind a branch inside a
  // step: ptxas then cannot prove the overlap safe and serialises every wgmma.)
  const auto begin_step = [&](int j) {
    cp_async_wait<0>();
    sm90::fence_proxy_async_shared();
    __syncthreads();  // V_j and K_{j+1} landed; every warpgroup is done with V_{j-1}, K_j and bias_j
    if (j + 1 < tiles) load_v(j + 1);
    if (j + 2 < tiles) load_k_and_bias(j + 2);
    cp_async_commit();
    prefetch_bias(j + 2 + kBiasLead);
    rows.pack_p();
    sm90::wgmma_fence();
  };
  for (int j = 0; j + 1 < tiles; ++j) {
    begin_step(j);
    rows.issue_qk(q_tile, k_tile(j + 1));
    rows.issue_pv(v_tile(j));
    sm90::wgmma_wait<1>();  // Q K_{j+1}^T done; P V_j still running
    sm90::fence_operands(rows.s);
    float correction[2];
    rows.softmax(key0(j + 1), bias_tile(j + 1), correction);
    sm90::fence_operands(rows.s);  // the exponentials before the wait: left alone, the compiler sinks them past it
    sm90::fence_operands(correction);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(rows.o);
    sm90::fence_operands(rows.pf);
    rows.rescale(correction);
  }
  if (tiles > 0) {
    begin_step(tiles - 1);
    rows.issue_pv(v_tile(tiles - 1));
    sm90::wgmma_wait<0>();
    sm90::fence_operands(rows.o);
  }

  T* out = static_cast<T*>(p.out) + offset_of(p.out_strides, b, seq.q_row0 + m0, h);
  float* lse = p.lse == nullptr ? nullptr : p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0 + m0;
  rows.store(sQ, out, p.out_strides.row, lse, m0, m1, lane);
#else
  __trap();  // never launched: fwd_sm90_available() is false without sm_90a code
#endif
}

}  // namespace fusedkernels::attention
