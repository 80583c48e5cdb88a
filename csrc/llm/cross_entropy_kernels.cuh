// The cross-entropy step of the fused linear + cross-entropy (llm.h: CrossEntropyParams), templated on the logits'
// type T. llm_<dtype>.cu instantiate it; llm_dispatch.cu picks one.
//
// One block per row of the chunk, two passes over the row (16-byte loads; the last vocab % kVec columns one at a
// time):
//   1. online max and sum of exp over c = softcap(z) (each thread keeps (m, s), rescaling s when m grows), and
//      sum(c) for label smoothing; the block combines the threads' (m, s) in a fixed order -> lse, loss
//   2. dz = d loss / dz, times the row's scale, written over the logits (the GEMMs that follow read it)
// kGrad starts at pass 2 with the lse given. Every reduction runs in the same order on every call: deterministic.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/device/reduce.cuh"
#include "common/device/vec.cuh"
#include "llm/llm.h"

namespace fusedkernels::llm {

constexpr int kCrossEntropyThreads = 256;

// (m, s) += (m2, s2): the sum of exp(c - m) over both parts, against the larger max.
__device__ __forceinline__ void combine_lse(float& m, float& s, float m2, float s2) {
  if (m2 > m) {
    const float t = m;
    m = m2, m2 = t;
    const float u = s;
    s = s2, s2 = u;
  }
  if (s2 != 0.f) s += s2 * expf(m2 - m);  // (an empty part has m2 = -inf and s2 = 0)
}

// The block's (m, s) combined in a fixed order; the result reaches every thread. scratch: 2 * kThreads / 32 floats.
template <int kThreads>
__device__ __forceinline__ void block_lse(float& m, float& s, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    combine_lse(m, s, m2, s2);
  }
  constexpr int kWarps = kThreads / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = m, scratch[kWarps + threadIdx.x / 32] = s;
  __syncthreads();
  m = scratch[0], s = scratch[kWarps];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) combine_lse(m, s, scratch[w], scratch[kWarps + w]);
}

struct CrossEntropyRow {
  float softcap, inv_softcap, lse, z_grad, smooth, target_weight, scale;
  int64_t target;

  __device__ __forceinline__ float cap(float z) const { return softcap > 0.f ? softcap * tanhf(z * inv_softcap) : z; }

  // d loss / dz at column v, times the row's scale
  __device__ __forceinline__ float grad(float z, int64_t v) const {
    const float c = cap(z);
    float g = expf(c - lse) * z_grad - smooth - (v == target ? target_weight : 0.f);
    if (softcap > 0.f) {
      const float t = c * inv_softcap;
      g *= 1.f - t * t;  // d softcap(z) / dz
    }
    return g * scale;
  }
};

template <typename T>
__global__ void __launch_bounds__(kCrossEntropyThreads) cross_entropy_kernel(const CrossEntropyParams p) {
  constexpr int kThreads = kCrossEntropyThreads;
  constexpr int kVec = kVec16<T>;
  __shared__ float scratch[2 * kThreads / 32];
  const int64_t row = blockIdx.x;
  T* z = static_cast<T*>(p.logits) + row * p.ld;
  const int64_t vocab = p.vocab, nvec = vocab / kVec;
  const int64_t y = p.target[row];
  const bool ignored = y == p.ignore_index;
  const bool bad = !ignored && (y < 0 || y >= vocab);  // no host check: a NaN row says so
  const bool want_loss = p.mode != CrossEntropyMode::kGrad;

  CrossEntropyRow r;
  r.softcap = p.softcap;
  r.inv_softcap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
  r.target = y;

  if (want_loss) {
    float lse = 0.f, loss = 0.f;
    if (bad) {
      lse = loss = NAN;
    } else if (!ignored) {
      float m = -INFINITY, s = 0.f, sum_c = 0.f;
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
        Vec<T, kVec> v;
        v.load(z + i * kVec);
        float c[kVec], mv = -INFINITY;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          c[j] = r.cap(v.get(j));
          mv = fmaxf(mv, c[j]);
          sum_c += c[j];
        }
        if (mv > m) s *= expf(m - mv), m = mv;
        if (m == -INFINITY) continue;  // only -inf so far: nothing to add
#pragma unroll
        for (int j = 0; j < kVec; ++j) s += expf(c[j] - m);
      }
      for (int64_t v = nvec * kVec + threadIdx.x; v < vocab; v += kThreads) {
        const float c = r.cap(to_float(z[v]));
        sum_c += c;
        combine_lse(m, s, c, 1.f);
      }
      // read before the reductions' barriers, so before any thread overwrites the row in pass 2
      const float c_y = threadIdx.x == 0 ? r.cap(to_float(z[y])) : 0.f;
      block_lse<kThreads>(m, s, scratch);
      sum_c = block_sum<kThreads>(sum_c, scratch);
      lse = m + logf(s);
      const float e = p.label_smoothing;
      loss = lse - (1.f - e) * c_y - e / float(vocab) * sum_c + p.z_loss * lse * lse;
    }
    if (threadIdx.x == 0) p.lse[row] = lse, p.loss[row] = loss;
    if (p.mode == CrossEntropyMode::kLoss) return;
    r.lse = lse;
  } else {
    r.lse = ignored ? 0.f : p.lse[row];
  }

  // pass 2: the gradient over the logits
  r.z_grad = 1.f + 2.f * p.z_loss * r.lse;
  r.smooth = p.label_smoothing / float(vocab);
  r.target_weight = 1.f - p.label_smoothing;
  r.scale = ignored ? 0.f : bad ? NAN : p.scale != nullptr ? p.scale[row * p.scale_stride] : 1.f;
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    Vec<T, kVec> v;  // zeros for an ignored row
    if (!ignored) {
      v.load(z + i * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v.set(j, r.grad(v.get(j), i * kVec + j));
    }
    v.store(z + i * kVec);
  }
  for (int64_t v = nvec * kVec + threadIdx.x; v < vocab; v += kThreads) {
    z[v] = from_float<T>(ignored ? 0.f : r.grad(to_float(z[v]), v));
  }
}

template <typename T>
cudaError_t launch_cross_entropy(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  cross_entropy_kernel<T><<<p.rows, kCrossEntropyThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fusedkernels::llm
