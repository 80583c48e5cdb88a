// Rotary embedding kernel and launcher (llm.h: RotaryParams), templated on the element type T, the table type CT
// (T or float), the elements kVec a thread moves per access and the pairing. llm_<dtype>.cu instantiate them;
// llm_dispatch.cu picks one.
//
// Work unit: kVec pairs of one head of one token (2 * kVec elements in, the same out), or kVec elements past
// rotary_dim copied out of place. A block takes one token or, for few heads, several, so short rows still fill
// it; the token's cos / sin row is read by every unit that needs it (from L1 / L2: the tables are small).
// Two paths: 16-byte accesses (kVec = 16 B / sizeof(T)) when sizes, strides and pointers allow, else one element
// per access (kVec = 1: any size, stride and alignment).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "llm/llm.h"

namespace fusedkernels::llm {

constexpr int kRotaryThreads = 128;

// kN consecutive elements of T as floats, moved with one access (kN * sizeof(T) of 8 or a multiple of 16 bytes)
// or one element.
template <typename T, int kN>
struct Floats {
  float v[kN];

  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kN == 1) {
      v[0] = to_float(*p);
    } else {
      Vec<T, kN> x;
      x.load(p);
#pragma unroll
      for (int i = 0; i < kN; ++i) v[i] = x.get(i);
    }
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kN == 1) {
      *p = from_float<T>(v[0]);
    } else {
      Vec<T, kN> x;
#pragma unroll
      for (int i = 0; i < kN; ++i) x.set(i, v[i]);
      x.store(p);
    }
  }
};

// Pair i of a unit: the elements a unit loads are [x_a (kVec), x_b (kVec)]; the half split pairs x_a[i] with
// x_b[i], the interleaved form element 2i with 2i + 1 of the concatenation.
template <int kVec, bool kInterleaved>
__device__ __forceinline__ constexpr int first_of(int i) { return kInterleaved ? 2 * i : i; }
template <int kVec, bool kInterleaved>
__device__ __forceinline__ constexpr int second_of(int i) { return kInterleaved ? 2 * i + 1 : kVec + i; }

template <typename T, int kVec>
__device__ __forceinline__ void load_pair(float (&out)[2 * kVec], const T* a, const T* b) {
  Floats<T, kVec> lo, hi;
  lo.load(a);
  hi.load(b);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = lo.v[i], out[kVec + i] = hi.v[i];
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pair(const float (&in)[2 * kVec], T* a, T* b) {
  Floats<T, kVec> lo, hi;
#pragma unroll
  for (int i = 0; i < kVec; ++i) lo.v[i] = in[i], hi.v[i] = in[kVec + i];
  lo.store(a);
  hi.store(b);
}

// Rotates (or copies) one unit of one head: c < rot_units rotates kVec pairs, the rest copy kVec elements past
// rotary_dim (only asked for out of place).
template <typename T, typename CT, int kVec, bool kInterleaved>
__device__ __forceinline__ void rotary_unit(const RotaryParams& p, const RotaryTensor& t, int64_t b, int64_t n,
                                            int head, int c, int rot_units, const CT* cos, const CT* sin,
                                            bool valid) {
  const T* in = static_cast<const T*>(t.in) + b * t.in_sb + n * t.in_sn + head * t.in_sh;
  T* out = static_cast<T*>(t.out) + b * t.out_sb + n * t.out_sn + head * t.out_sh;
  if (c >= rot_units) {  // past rotary_dim: the input as it is
    const int e = p.rotary_dim + (c - rot_units) * kVec;
    Floats<T, kVec> x;  // (exact: every T is a float)
    x.load(in + e);
    x.store(out + e);
    return;
  }
  // the unit's two runs of kVec elements: [a, a + kVec) and [b, b + kVec)
  const int a = kInterleaved ? 2 * c * kVec : c * kVec;
  const int second = kInterleaved ? a + kVec : a + p.rotary_dim / 2;
  float x[2 * kVec], cs[2 * kVec], sn[2 * kVec], o[2 * kVec];
  load_pair<T, kVec>(x, in + a, in + second);
  load_pair<CT, kVec>(cs, cos + a, cos + second);
  load_pair<CT, kVec>(sn, sin + a, sin + second);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int f = first_of<kVec, kInterleaved>(i), s = second_of<kVec, kInterleaved>(i);
    if (!valid) {  // a position outside the table: loud, not a read out of bounds
      o[f] = o[s] = NAN;
    } else if (p.conjugate) {  // out = x cos - rotate(x sin): (x_f c_f + x_s s_s, x_s c_s - x_f s_f)
      o[f] = x[f] * cs[f] + x[s] * sn[s];
      o[s] = x[s] * cs[s] - x[f] * sn[f];
    } else {  // out = x cos + rotate(x) sin: (x_f c_f - x_s s_f, x_s c_s + x_f s_s)
      o[f] = x[f] * cs[f] - x[s] * sn[f];
      o[s] = x[s] * cs[s] + x[f] * sn[s];
    }
  }
  store_pair<T, kVec>(o, out + a, out + second);
}

template <typename T, typename CT, int kVec, bool kInterleaved>
__global__ void __launch_bounds__(kRotaryThreads) rotary_kernel(const RotaryParams p, int tokens_per_block) {
  const int rot_units = p.rotary_dim / (2 * kVec);
  const int tail_units = (p.head_dim - p.rotary_dim) / kVec;
  // units of one head of q and of k: a tensor written in place leaves the elements past rotary_dim alone
  const int q_units = rot_units + (p.q.out != p.q.in ? tail_units : 0);
  const int k_units = rot_units + (p.k.out != p.k.in ? tail_units : 0);
  const int q_total = p.q.heads * q_units;
  const int per_token = q_total + p.k.heads * k_units;
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t first = int64_t(blockIdx.x) * tokens_per_block;

  for (int f = threadIdx.x; f < tokens_per_block * per_token; f += kRotaryThreads) {
    const int64_t token = first + f / per_token;
    if (token >= tokens) break;  // f only grows
    const int u = f % per_token;
    const int64_t b = token / p.seqlen, n = token % p.seqlen;
    const int64_t position = p.position_ids ? p.position_ids[b * p.pos_sb + n * p.pos_sn] : n;
    const bool valid = position >= 0 && position < p.table_len;
    const int64_t row = b * p.table_sb + (valid ? position : 0) * p.table_sn;
    const CT* cos = static_cast<const CT*>(p.cos) + row;
    const CT* sin = static_cast<const CT*>(p.sin) + row;
    if (u < q_total) {
      rotary_unit<T, CT, kVec, kInterleaved>(p, p.q, b, n, u / q_units, u % q_units, rot_units, cos, sin, valid);
    } else {
      const int v = u - q_total;
      rotary_unit<T, CT, kVec, kInterleaved>(p, p.k, b, n, v / k_units, v % k_units, rot_units, cos, sin, valid);
    }
  }
}

// Whether every access of the 16-byte path is whole and aligned: the rotated runs and the copied tail are
// multiples of the vector, and every pointer and stride keeps 16-byte alignment.
template <typename T, typename CT>
bool rotary_vectorizable(const RotaryParams& p) {
  constexpr int kVec = kVec16<T>;
  const int run = p.interleaved ? p.rotary_dim : p.rotary_dim / 2;
  if (run % (p.interleaved ? 2 * kVec : kVec) != 0 || (p.head_dim - p.rotary_dim) % kVec != 0) return false;
  for (const void* ptr : {p.q.in, static_cast<const void*>(p.q.out), p.k.in, static_cast<const void*>(p.k.out),
                          p.cos, p.sin}) {
    if (ptr != nullptr && !is_aligned(ptr, 16)) return false;
  }
  for (int64_t stride : {p.q.in_sb, p.q.in_sn, p.q.in_sh, p.q.out_sb, p.q.out_sn, p.q.out_sh, p.k.in_sb, p.k.in_sn,
                         p.k.in_sh, p.k.out_sb, p.k.out_sn, p.k.out_sh, p.table_sb, p.table_sn}) {
    if (stride % kVec != 0) return false;
  }
  return true;
}

template <typename T, typename CT>
cudaError_t launch_rotary(const RotaryParams& p, cudaStream_t stream) {
  const int64_t tokens = p.batch * p.seqlen;
  if (tokens == 0 || (p.q.heads == 0 && p.k.heads == 0) || p.head_dim == 0) return cudaSuccess;
  const auto launch = [&]<int kVec>() {
    const int rot_units = p.rotary_dim / (2 * kVec), tail_units = (p.head_dim - p.rotary_dim) / kVec;
    const int per_token = (p.q.heads + p.k.heads) * (rot_units + tail_units);
    // several tokens per block when a token has few units, so the block's threads have work
    const int tokens_per_block = per_token >= kRotaryThreads ? 1 : kRotaryThreads / per_token;
    const int64_t blocks = ceil_div(tokens, tokens_per_block);
    if (p.interleaved) {
      rotary_kernel<T, CT, kVec, true><<<blocks, kRotaryThreads, 0, stream>>>(p, tokens_per_block);
    } else {
      rotary_kernel<T, CT, kVec, false><<<blocks, kRotaryThreads, 0, stream>>>(p, tokens_per_block);
    }
  };
  if (rotary_vectorizable<T, CT>(p)) {
    launch.template operator()<kVec16<T>>();
  } else {
    launch.template operator()<1>();
  }
  return cudaGetLastError();
}

}  // namespace fusedkernels::llm
