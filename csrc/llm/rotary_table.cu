// rotary_table (llm.h: RotaryTableParams): one thread per (token, frequency), writing that angle's cos and sin to
// both halves of the token's rows. The angle is the fp32 product and cosf / sinf are the accurate CUDA functions
// (no fast math), what PyTorch's elementwise kernels compute, so the table equals Hugging Face's bit for bit.
#include <cstdint>

#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "common/host/static_switch.h"
#include "llm/llm.h"

namespace fusedkernels::llm {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_table_kernel(const int64_t* __restrict__ positions,
                                                                const float* __restrict__ inv_freq, T* cos, T* sin,
                                                                int64_t pairs, int half, float scaling) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= pairs) return;
  const int64_t token = i / half;
  const int j = int(i - token * half);
  const float angle = static_cast<float>(positions[token]) * inv_freq[j];  // HF: position_ids.float() * inv_freq
  const T c = from_float<T>(cosf(angle) * scaling), s = from_float<T>(sinf(angle) * scaling);
  const int64_t row = token * 2 * half;
  cos[row + j] = c;
  cos[row + half + j] = c;
  sin[row + j] = s;
  sin[row + half + j] = s;
}

}  // namespace

cudaError_t rotary_table(const RotaryTableParams& p, cudaStream_t stream) {
  const int64_t pairs = p.tokens * p.half;
  if (pairs == 0) return cudaSuccess;
  return float_type_switch(p.dtype, [&]<typename T>() {
    rotary_table_kernel<T><<<ceil_div(pairs, kThreads), kThreads, 0, stream>>>(
        p.positions, p.inv_freq, static_cast<T*>(p.cos), static_cast<T*>(p.sin), pairs, p.half, p.scaling);
    return cudaGetLastError();
  });
}

}  // namespace fusedkernels::llm
