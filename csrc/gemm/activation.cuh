// The epilogue activations in fp32, shared by the GEMM kernels of every arch.
#pragma once

#include "gemm/gemm.h"

namespace fusedkernels::gemm {

// The standard normal CDF Φ(z) = (1 + erf(z / √2)) / 2, with erf from Abramowitz & Stegun 7.1.26
// (|error| < 1.5e-7, below fp32 rounding of the result's scale): a reciprocal, an exponential and five FMAs,
// a third of erff's instructions.
__device__ __forceinline__ float normal_cdf(float z) {
  const float x = fabsf(z) * 0.70710678118654752f;
  const float t = __fdividef(1.0f, fmaf(0.3275911f, x, 1.0f));
  const float poly =
      t * fmaf(t, fmaf(t, fmaf(t, fmaf(t, 1.061405429f, -1.453152027f), 1.421413741f), -0.284496736f), 0.254829592f);
  const float erf_x = 1.0f - poly * __expf(-x * x);
  return 0.5f + copysignf(0.5f * erf_x, z);
}

// act(z) in fp32, PyTorch's definitions (docs/gemm.md), computed through one exponential each:
//   gelu       z Φ(z)
//   gelu_tanh  z (1 + tanh(u)) / 2 = z sigmoid(2u), u = √(2/π) (z + 0.044715 z³)
//   silu       z sigmoid(z)
template <Activation kAct>
__device__ __forceinline__ float activate(float z) {
  if constexpr (kAct == Activation::kRelu) return fmaxf(z, 0.0f);
  if constexpr (kAct == Activation::kGelu) return z * normal_cdf(z);
  if constexpr (kAct == Activation::kGeluTanh) {
    const float two_u = 1.5957691216057308f * fmaf(0.044715f * z, z * z, z);
    return __fdividef(z, 1.0f + __expf(-two_u));  // a huge denominator gives z * 0
  }
  if constexpr (kAct == Activation::kSilu) return __fdividef(z, 1.0f + __expf(-z));
  if constexpr (kAct == Activation::kSquaredRelu) {
    const float r = fmaxf(z, 0.0f);
    return r * r;
  }
  return z;
}

}  // namespace fusedkernels::gemm
