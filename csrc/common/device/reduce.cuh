// Sums across a group of threads: a sub-warp group (shuffles) or several warps (shuffles + shared memory).
#pragma once

namespace fusedkernels {

// Sum over aligned groups of `kGroup` lanes (a power of two, at most 32). Every lane of the warp must call it.
template <int kGroup>
__device__ __forceinline__ float group_sum_in_warp(float v) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Max over aligned groups of `kGroup` lanes, as group_sum_in_warp.
template <int kGroup>
__device__ __forceinline__ float group_max_in_warp(float v) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over groups of `kGroup` consecutive threads (a multiple of 32) of a block of `kThreads`.
// Every thread of the block must call it. `scratch` holds kThreads / 32 floats. The leading barrier
// lets back-to-back calls reuse one scratch buffer.
template <int kGroup, int kThreads>
__device__ __forceinline__ float group_sum_in_block(float v, float* scratch) {
  static_assert(kGroup % 32 == 0 && kThreads % kGroup == 0, "group must be whole warps of the block");
  constexpr int kWarpsPerGroup = kGroup / 32;
  v = group_sum_in_warp<32>(v);
  const int warp = threadIdx.x / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  const float* mine = scratch + (warp / kWarpsPerGroup) * kWarpsPerGroup;
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarpsPerGroup; ++w) total += mine[w];  // same order in every thread: deterministic
  return total;
}

// Either of the two above, picked by the group size.
template <int kGroup, int kThreads>
__device__ __forceinline__ float group_sum(float v, float* scratch) {
  if constexpr (kGroup <= 32) {
    return group_sum_in_warp<kGroup>(v);
  } else {
    return group_sum_in_block<kGroup, kThreads>(v, scratch);
  }
}

// Sum over the whole block (any multiple of 32 threads, at most 1024); the result reaches every thread.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  if constexpr (kThreads == 32) {
    return group_sum_in_warp<32>(v);
  } else {
    return group_sum_in_block<kThreads, kThreads>(v, scratch);
  }
}

}  // namespace fusedkernels
