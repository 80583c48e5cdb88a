// The epilogue activations in fp32, shared by the GEMM kernels of every arch.
#pragma once

#include "gemm/gemm.h"

namespace fusedkernels::gemm {

// act(z) in fp32, PyTorch's definitions.
template <Activation kAct>
__device__ __forceinline__ float activate(float z) {
  if constexpr (kAct == Activation::kRelu) return fmaxf(z, 0.0f);
  if constexpr (kAct == Activation::kGelu) return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
  if constexpr (kAct == Activation::kGeluTanh) {
    return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
  }
  if constexpr (kAct == Activation::kSilu) return z / (1.0f + __expf(-z));
  if constexpr (kAct == Activation::kSquaredRelu) {
    const float r = fmaxf(z, 0.0f);
    return r * r;
  }
  return z;
}

}  // namespace fusedkernels::gemm
