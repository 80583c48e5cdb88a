// loss_reduce (llm.h: LossReduceParams): one block; each thread adds a strided part of the rows, then the warps'
// totals are added in a fixed order. The losses sum in double (one rounding at the end), the count in integers
// (exact; rounded to float as torch's `(target != ignore_index).sum().to(float)`).
#include <cstdint>

#include "llm/llm.h"

namespace fusedkernels::llm {

namespace {

constexpr int kThreads = 1024;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__global__ void __launch_bounds__(kThreads) loss_reduce_kernel(const LossReduceParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double sums[kWarps];
  __shared__ unsigned long long counts[kWarps];
  const bool want_sum = p.mode != LossReduction::kGradScale, want_count = p.mode != LossReduction::kSum;
  double sum = 0.0;
  unsigned long long count = 0;
  for (int64_t r = threadIdx.x; r < p.rows; r += kThreads) {
    if (want_sum) sum += p.loss[r];
    if (want_count) count += p.target[r] != p.ignore_index;
  }
  sum = warp_sum(sum);
  count = warp_sum(count);
  if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = sum, counts[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x != 0) return;
  sum = 0.0, count = 0;
  for (int w = 0; w < kWarps; ++w) sum += sums[w], count += counts[w];
  switch (p.mode) {
    // no token counts: the gradients are zero, as torch's (the mean itself is 0 / 0, NaN)
    case LossReduction::kGradScale: *p.out = count > 0 ? 1.f / static_cast<float>(count) : 0.f; break;
    case LossReduction::kSum: *p.out = static_cast<float>(sum); break;
    case LossReduction::kMean: *p.out = static_cast<float>(sum / static_cast<double>(count)); break;
  }
}

}  // namespace

cudaError_t loss_reduce(const LossReduceParams& p, cudaStream_t stream) {
  loss_reduce_kernel<<<1, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fusedkernels::llm
