// scale_inplace (llm.h: ScaleParams): a grid-stride loop of 16-byte vectors, the tail (n not a multiple of the
// vector, or a pointer off 16 bytes) one element per thread. Every thread reads the scale first and returns when it
// is 1, so the common backward (a loss grad of 1) costs one launch and no traffic.
#include <cstdint>

#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "common/host/static_switch.h"
#include "llm/llm.h"

namespace fusedkernels::llm {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_inplace_kernel(T* data, const float* scale_ptr, int64_t n,
                                                                 int64_t vectors) {
  // rounded to T first, as torch's mul_ converts a 0-d operand to the tensor's type
  const float scale = to_float(from_float<T>(*scale_ptr));
  if (scale == 1.f) return;  // x * 1 == x for every x, NaN and -0 included
  constexpr int kVec = 16 / sizeof(T);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < vectors; i += stride) {
    Vec<T, kVec> v;
    v.load(data + i * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v.set(j, v.get(j) * scale);
    v.store(data + i * kVec);
  }
  for (int64_t i = vectors * kVec + int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    data[i] = from_float<T>(to_float(data[i]) * scale);
  }
}

}  // namespace

cudaError_t scale_inplace(const ScaleParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return float_type_switch(p.dtype, [&]<typename T>() {
    constexpr int kVec = 16 / sizeof(T);
    const bool aligned = reinterpret_cast<uintptr_t>(p.data) % 16 == 0;
    const int64_t vectors = aligned ? p.n / kVec : 0;
    const int64_t work = std::max<int64_t>(vectors, p.n - vectors * kVec);
    const int64_t blocks = std::min<int64_t>(ceil_div(work, kThreads), int64_t(sm_count()) * 8);
    scale_inplace_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(p.data), p.scale, p.n, vectors);
    return cudaGetLastError();
  });
}

}  // namespace fusedkernels::llm
