// Multi-tensor apply: a persistent grid walks the chunks of every tensor in a TensorTable.
#pragma once

#include <algorithm>
#include <type_traits>

#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "common/host/static_switch.h"
#include "optim/optim.h"

namespace fusedkernels::optim {

constexpr int kThreads = 512;

// Elements per thread per step for a kernel whose tensors have types T...: the widest one moves 16 bytes
// an access (4 when any list is fp32, 8 when all are 16-bit). 16384-element chunks take whole steps.
template <typename... T>
constexpr int kElemsFor = 16 / std::max({sizeof(T)...});

// The type the weights are read as: the fp32 masters when there are, else the params.
template <typename P, bool kHasMaster>
using WeightType = std::conditional_t<kHasMaster, float, P>;

// Calls body(tensor, begin, end) for every chunk this block owns: chunks c = blockIdx.x, + gridDim.x, ...
// The table is a __grid_constant__ parameter: indexing it reads the constant bank, with one address per
// block (the chunk is uniform), so nothing is copied.
template <typename Body>
__device__ __forceinline__ void for_each_chunk(const TensorTable& t, Body&& body) {
  const int total = t.chunk_start[t.num_tensors];
  for (int c = blockIdx.x; c < total; c += gridDim.x) {
    int lo = 0, hi = t.num_tensors - 1;  // the last tensor whose first chunk is <= c
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (t.chunk_start[mid] <= c) lo = mid; else hi = mid - 1;
    }
    const int64_t begin = int64_t(c - t.chunk_start[lo]) * kChunk;
    const int64_t end = begin + kChunk < t.numel[lo] ? begin + kChunk : t.numel[lo];
    body(lo, begin, end);
  }
}

// Runs per(i, count, vector) for each group of N elements of [begin, end) this thread owns; vector is true
// when the group is whole and may be moved with vector accesses.
template <int N, typename Per>
__device__ __forceinline__ void for_each_group(const TensorTable& t, int tensor, int64_t begin, int64_t end,
                                               Per&& per) {
  const bool aligned = t.aligned[tensor];
  for (int64_t i = begin + int64_t(threadIdx.x) * N; i < end; i += int64_t(kThreads) * N) {
    const int count = end - i < N ? int(end - i) : N;
    per(i, count, aligned && count == N);
  }
}

template <typename T, int N>
__device__ __forceinline__ void load_group(const void* base, int64_t i, int count, bool vector, float (&out)[N]) {
  const T* p = static_cast<const T*>(base) + i;
  if (vector) {
    Vec<T, N> v;
    v.load(p);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = v.get(k);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = k < count ? to_float(p[k]) : 0.f;
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_group(void* base, int64_t i, int count, bool vector, const float (&in)[N]) {
  T* p = static_cast<T*>(base) + i;
  if (vector) {
    Vec<T, N> v;
#pragma unroll
    for (int k = 0; k < N; ++k) v.set(k, in[k]);
    v.store(p);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < count) p[k] = from_float<T>(in[k]);
    }
  }
}

// Grad scaling shared by the optimizers: unscale (AMP), deferred clip, maximize. Returns the factor the
// raw grad is multiplied by before maximize; `unscale` is the AMP part alone (for the write-back).
struct GradFactor {
  float unscale, total;
};

__device__ __forceinline__ GradFactor grad_factor(const StepScalars& s) {
  const float unscale = s.grad_scale ? 1.f / *s.grad_scale : 1.f;
  const float clip = s.clip_coef ? *s.clip_coef : 1.f;
  return {unscale, unscale * clip * (s.maximize ? -1.f : 1.f)};
}

__device__ __forceinline__ bool step_skipped(const StepScalars& s) { return s.found_inf && *s.found_inf != 0.f; }

// The weights a step updates: the fp32 masters when there are (kHasMaster), else the params. (A flag
// named kMaster would hide the slot: t.ptr[kMaster] would then read ptr[true], the grads.)
template <typename P, bool kHasMaster, int N>
__device__ __forceinline__ void load_weights(const TensorTable& t, int tensor, int64_t i, int count, bool vector,
                                             float (&w)[N]) {
  if constexpr (kHasMaster) {
    load_group<float>(t.ptr[kMaster][tensor], i, count, vector, w);
  } else {
    load_group<P>(t.ptr[kParam][tensor], i, count, vector, w);
  }
}

// Writes the updated weights to the params, and to the masters when there are.
template <typename P, bool kHasMaster, int N>
__device__ __forceinline__ void store_weights(const TensorTable& t, int tensor, int64_t i, int count, bool vector,
                                              const float (&w)[N]) {
  store_group<P>(t.ptr[kParam][tensor], i, count, vector, w);
  if constexpr (kHasMaster) store_group<float>(t.ptr[kMaster][tensor], i, count, vector, w);
}

// Stores grad * unscale back into the grads (torch's fused optimizers leave unscaled grads behind).
template <typename P, int N>
__device__ __forceinline__ void write_back_unscaled(const TensorTable& t, int tensor, int64_t i, int count, bool vector,
                                                    const float (&g)[N], float unscale) {
  float unscaled[N];
#pragma unroll
  for (int k = 0; k < N; ++k) unscaled[k] = g[k] * unscale;
  store_group<P>(t.ptr[kGrad][tensor], i, count, vector, unscaled);
}

// ---- host side: launching over a table ----

// Persistent grid: as many blocks as are resident at once, never more than there are chunks.
template <auto Kernel>
int grid_for(const TensorTable& t) {
  const int resident = sm_count() * resident_blocks<Kernel, kThreads>();
  return std::max(1, std::min(t.chunk_start[t.num_tensors], resident));
}

template <auto Kernel, typename Params>
void launch(const TensorTable& t, const Params& p, cudaStream_t stream) {
  Kernel<<<grid_for<Kernel>(t), kThreads, 0, stream>>>(t, p);
}

}  // namespace fusedkernels::optim
