// The forward kernel: one CTA per (query tile, head, sequence); it streams key/value tiles through shared
// memory and keeps the output tile and the online-softmax statistics in registers (FlashAttention-2's
// algorithm on mma.sync tensor cores). docs/attention.md draws the pipeline.
#pragma once

#include "attention/attention_common.cuh"

namespace fusedkernels::attention {

// kBlockM query rows (kWarps warps, each owning kBlockM / kWarps rows as 16-row m-tiles) against kBlockN keys
// per step.
template <typename T_, int kD_, int kBlockM_, int kBlockN_, int kWarps_>
struct FwdConfig {
  using T = T_;
  static constexpr int kD = kD_, kBlockM = kBlockM_, kBlockN = kBlockN_, kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = kBlockM / (16 * kWarps);
  static_assert(kMTiles * 16 * kWarps == kBlockM && kD % 16 == 0 && kBlockN % 16 == 0);
  static constexpr int kSmemQ = kBlockM * padded(kD), kSmemKV = kBlockN * padded(kD);
  static constexpr int kSmemBias = kBlockM * padded(kBlockN);
  static constexpr int kSmemBytes = (kSmemQ + 2 * kSmemKV + kSmemBias) * int(sizeof(T));
};

template <typename Cfg, bool kDropout>
__global__ void __launch_bounds__(Cfg::kThreads) attention_fwd_kernel(const FwdParams p) {
  using T = typename Cfg::T;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kMTiles = Cfg::kMTiles;
  constexpr int kThreads = Cfg::kThreads, kNTiles = kBlockN / 8, kDTiles = kD / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Cfg::kSmemQ;
  T* sV = sK + Cfg::kSmemKV;
  T* sBias = sV + Cfg::kSmemKV;

  // Heaviest tiles first: under a causal mask the last query tiles see the most keys.
  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  uint64_t seed = 0, offset = 0;
  if constexpr (kDropout) {
    philox_seed_offset(p.philox, seed, offset);
    if (blockIdx.x == 0 && h == 0 && b == 0 && threadIdx.x == 0) {  // for the backward
      p.rng_state[0] = static_cast<int64_t>(seed);
      p.rng_state[1] = static_cast<int64_t>(offset);
    }
  }
  const Seq seq = sequence(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.len_q) return;
  const int m1 = min(m0 + kBlockM, seq.len_q);
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * kMTiles * 16;  // the warp's first row within the tile

  const T* q = static_cast<const T*>(p.q) + offset_of(p.q_strides, b, seq.q_row0 + m0, h);
  const T* k = static_cast<const T*>(p.k) + offset_of(p.k_strides, b, seq.k_row0, h_kv);
  const T* v = static_cast<const T*>(p.v) + offset_of(p.v_strides, b, seq.k_row0, h_kv);
  const T* bias = p.bias == nullptr ? nullptr
                                    : static_cast<const T*>(p.bias) + b * p.bias_strides.batch +
                                          h * p.bias_strides.head + m0 * p.bias_strides.row;
  const bool bias_aligned = bias != nullptr && p.bias_strides.row % 8 == 0 &&
                            reinterpret_cast<uintptr_t>(bias) % 16 == 0;

  const Band band(p, seq.len_k);
  const int n_begin = band.key_begin(m0) / kBlockN;
  const int n_end = ceil_div_device(band.key_end(m1), kBlockN);

  const Dropout dropout(seed, offset, b * p.heads_q + h, kDropout ? p.dropout_p : 0.0f);

  float o[kMTiles][kDTiles][4] = {};
  float row_max[kMTiles][2], row_sum[kMTiles][2] = {};
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) row_max[mt][0] = row_max[mt][1] = -kInf;
  const float scale_log2 = p.scale * kLog2e;

  auto load_k_and_bias = [&](int n) {
    const int n0 = n * kBlockN;
    load_tile<kBlockN, kD, kThreads>(sK, k + n0 * p.k_strides.row, p.k_strides.row, seq.len_k - n0, tid);
    if (bias != nullptr) {
      load_bias_tile<kBlockM, kBlockN, kThreads>(sBias, bias + n0, p.bias_strides.row, m1 - m0, seq.len_k - n0,
                                                 bias_aligned, tid);
    }
    cp_async_commit();
  };

  if (n_begin < n_end) {
    load_tile<kBlockM, kD, kThreads>(sQ, q, p.q_strides.row, m1 - m0, tid);
    load_k_and_bias(n_end - 1);
  }
  // Last key tile first: the tiles that need a mask (the partial last one, the causal diagonal) come first.
  for (int n = n_end - 1; n >= n_begin; --n) {
    const int n0 = n * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K_n (and Q, bias) landed; every warp is done with V_{n+1}
    load_tile<kBlockN, kD, kThreads>(sV, v + n0 * p.v_strides.row, p.v_strides.row, seq.len_k - n0, tid);
    cp_async_commit();

    // S = Q K^T
    float s[kMTiles][kNTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        ldmatrix_x4(a[mt], sQ + (warp_row0 + mt * 16 + lane % 16) * padded(kD) + kk * 16 + (lane / 16) * 8);
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, sK + (np * 16 + lane % 8 + (lane / 16) * 8) * padded(kD) + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16x8x16<T>(s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16x8x16<T>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Online softmax in base 2: x = log2(e) * (scale * q.k + bias), masked keys -inf. Each adjustment is its
    // own loop behind one branch per tile: a branch per element would not be if-converted and costs more
    // than the math.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const int row0 = warp_row0 + mt * 16 + g;  // of element e: row0 + 8 * (e >> 1), key n0 + key_of(nt, e)
      const auto key_of = [&](int nt, int e) { return nt * 8 + 2 * t + (e & 1); };
      for_each_element<kNTiles>([&](int nt, int e) { s[mt][nt][e] *= scale_log2; });
      if (bias != nullptr) {
        for_each_element<kNTiles>([&](int nt, int e) {
          s[mt][nt][e] += to_float(sBias[(row0 + 8 * (e >> 1)) * padded(kBlockN) + key_of(nt, e)]) * kLog2e;
        });
      }
      if (!band.covers(m0, m1, n0, n0 + kBlockN)) {
        for_each_element<kNTiles>([&](int nt, int e) {
          if (!band.visible(m0 + row0 + 8 * (e >> 1), n0 + key_of(nt, e))) s[mt][nt][e] = -kInf;
        });
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        [[maybe_unused]] const int i = m0 + warp_row0 + mt * 16 + g + 8 * r;  // dropout's row
        float mx = -kInf;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        const float new_max = fmaxf(row_max[mt][r], group_max_in_warp<4>(mx));  // the 4 lanes of a row
        const float base = new_max == -kInf ? 0.0f : new_max;  // a row with nothing visible yet stays at 0
        const float correction = fast_exp2(row_max[mt][r] - base);
        row_max[mt][r] = new_max;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const float p0 = fast_exp2(s[mt][nt][2 * r] - base), p1 = fast_exp2(s[mt][nt][2 * r + 1] - base);
          sum += p0 + p1;
          if constexpr (kDropout) {
            const unsigned keep = dropout.keep_pair(i, n0 + nt * 8 + 2 * t);
            s[mt][nt][2 * r] = (keep & 1u) ? p0 : 0.0f;
            s[mt][nt][2 * r + 1] = (keep & 2u) ? p1 : 0.0f;
          } else {
            s[mt][nt][2 * r] = p0;
            s[mt][nt][2 * r + 1] = p1;
          }
        }
        row_sum[mt][r] = row_sum[mt][r] * correction + sum;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[mt][dt][2 * r] *= correction;
          o[mt][dt][2 * r + 1] *= correction;
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V_n landed; every warp is done with K_n and the bias tile
    if (n > n_begin) load_k_and_bias(n - 1);

    // O += P V, P straight from the accumulators
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, sV + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * padded(kD) + dp * 16 + (lane / 16) * 8);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16x8x16<T>(o[mt][2 * dp], a[mt], bv[0], bv[1]);
          mma_16x8x16<T>(o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  // Epilogue: normalise, stage the warp's rows in its own rows of sQ (only it read them), store 16 bytes a lane.
  T* out = static_cast<T*>(p.out) + offset_of(p.out_strides, b, seq.q_row0 + m0, h);
  float* lse = p.lse == nullptr ? nullptr : p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0 + m0;
  const float keep_scale = kDropout ? dropout.rescale : 1.0f;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + mt * 16 + g + 8 * r;
      const float sum = group_sum_in_warp<4>(row_sum[mt][r]);
      const float inv = sum > 0.0f ? keep_scale / sum : 0.0f;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(sQ + row * padded(kD) + dt * 8 + 2 * t) =
            pack2<T>(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
      }
      if (lse != nullptr && t == 0 && m0 + row < m1) {
        lse[row] = sum > 0.0f ? row_max[mt][r] * kLn2 + __logf(sum) : -kInf;
      }
    }
  }
  __syncwarp();
  constexpr int kWarpRows = kMTiles * 16, kChunks = kD / 8;
#pragma unroll
  for (int c = lane; c < kWarpRows * kChunks; c += 32) {
    const int row = warp_row0 + c / kChunks, col = (c % kChunks) * 8;
    if (m0 + row < m1) {
      *reinterpret_cast<uint4*>(out + row * p.out_strides.row + col) =
          *reinterpret_cast<const uint4*>(sQ + row * padded(kD) + col);
    }
  }
}

}  // namespace fusedkernels::attention
