// The epilogue activations in fp32, shared by the GEMM kernels of every arch.
#pragma once

#include "common/device/mma.cuh"  // fast_exp2
#include "common/device/relu.cuh"
#include "gemm/gemm.h"

namespace fusedkernels::gemm {

// The standard normal CDF Φ(z) through its tail Φ(-|z|) = erfc(|z| / √2) / 2, erfc by Abramowitz & Stegun 7.1.26
// (|error| < 1.5e-7; the 1/√2 and the halving folded into its constants): 1 - tail for z >= 0, tail below. A
// reciprocal, an exponential and ten other instructions, a third of erff's. Forming the tail, not (1 + erf) / 2, keeps
// the relative error of Φ at negative z under 2e-3 down to z = -5, where the sum in fp32 (torch's too) has lost 4% to
// cancellation, and 57% by z = -5.5.
__device__ __forceinline__ float normal_cdf(float z) {
  const float t = fast_rcp(fmaf(0.3275911f * 0.70710678118654752f, fabsf(z), 1.0f));
  const float poly = t * fmaf(t, fmaf(t, fmaf(t, fmaf(t, 0.5307027145f, -0.7265760135f), 0.7107068705f),
                                      -0.142248368f), 0.127414796f);
  const float tail = poly * fast_exp2(z * (z * -0.72134752044448170f));  // e^(-z²/2) = 2^(-z² / (2 ln 2))
  return z >= 0.0f ? 1.0f - tail : tail;
}

// act(z) in fp32, PyTorch's definitions (docs/gemm.md), computed through one exponential and one reciprocal each
// (fast_exp2, fast_rcp: the hardware's approximations without __expf's and __fdividef's denormal rescaling):
//   gelu       z Φ(z)
//   gelu_tanh  z (1 + tanh(u)) / 2 = z sigmoid(2u), u = √(2/π) (z + 0.044715 z³)
//   silu       z sigmoid(z)
template <Activation kAct>
__device__ __forceinline__ float activate(float z) {
  if constexpr (kAct == Activation::kRelu) return relu(z);
  if constexpr (kAct == Activation::kGelu) return z * normal_cdf(z);
  if constexpr (kAct == Activation::kGeluTanh) {
    // e^(-2u) = 2^(-2 √(2/π) log2(e) (z + 0.044715 z³)); a huge denominator gives z * 0
    return z * fast_rcp(1.0f + fast_exp2(-2.3022082f * fmaf(0.044715f * z, z * z, z)));
  }
  if constexpr (kAct == Activation::kSilu) return z * fast_rcp(1.0f + fast_exp2(z * -1.4426950408889634f));
  if constexpr (kAct == Activation::kSquaredRelu) {
    const float r = relu(z);
    return r * r;
  }
  return z;
}

// An epilogue's output before its rounding, from z (the gate's when kGated; up the up projection's z) and the residual
// r, formed alike by every kernel and instance: act(z) + r adds the activation's fp32 value (an addition the compiler
// may not contract: left to it, some instances fused it with the activation's last product into an FMA and others
// did not, one ulp apart), act(z) * up + r is one FMA; without a residual act(z) (* up). before (the convolution's):
// act(z + r) (* up).
template <Activation kAct, bool kGated>
__device__ __forceinline__ float epilogue_output(float z, float up, float r, bool residual, bool before) {
  if (!residual || before) {
    const float a = activate<kAct>(residual ? z + r : z);
    return kGated ? a * up : a;
  }
  return kGated ? fmaf(activate<kAct>(z), up, r) : __fadd_rn(activate<kAct>(z), r);
}

// act(g) and act'(g) in fp32, PyTorch's definitions, for the backward passes. gated_backward.cu takes the exact
// division, erf and tanh. kFast, the GEMM epilogue's and act_backward.cu's: the epilogue's arithmetic slows the other
// consumer's products on the SM (docs/perf-notes.md, gemm: gated MLP backward v1.4), and with erff the activation
// pass ran at half the copy bandwidth (its two loads an element against about 40 instructions for gelu'), so
// silu's division is the approximate one (2 ulp), gelu's erf and gelu_tanh's tanh go through one exponential
// (normal_cdf above; tanh(u) = 1 - 2 / (1 + e^2u)), and the exponentials and reciprocals are the hardware's without
// the denormal rescaling (fast_exp2, fast_rcp: the same results but below 2^-126): errors near fp32's rounding, far
// below the output's.
template <Activation kAct, bool kFast = false>
__device__ __forceinline__ void activation_and_slope(float g, float& act, float& slope) {
  if constexpr (kAct == Activation::kSilu) {
    const float e = kFast ? fast_exp2(g * -1.4426950408889634f) : __expf(-g);
    const float s = kFast ? fast_rcp(1.0f + e) : 1.0f / (1.0f + e);
    act = g * s;
    slope = s * fmaf(g, 1.0f - s, 1.0f);
  } else if constexpr (kAct == Activation::kGelu) {  // g Φ(g): Φ(g) + g φ(g)
    const float cdf = kFast ? normal_cdf(g) : 0.5f * (1.0f + erff(g * 0.70710678118654752f));
    act = g * cdf;
    const float density = kFast ? fast_exp2(g * (g * -0.72134752044448170f)) : __expf(-0.5f * g * g);
    slope = fmaf(g * 0.39894228040143268f, density, cdf);
  } else if constexpr (kAct == Activation::kGeluTanh) {  // g (1 + tanh(u)) / 2, u = √(2/π) (g + 0.044715 g³)
    const float u = 0.79788456080286536f * fmaf(0.044715f * g, g * g, g);
    const float t = kFast ? fmaf(-2.0f, fast_rcp(1.0f + fast_exp2(u * 2.8853900817779268f)), 1.0f)  // e^2u = inf: 1
                          : tanhf(u);
    act = 0.5f * g * (1.0f + t);
    slope = fmaf(0.5f * g * (1.0f - t * t), 0.79788456080286536f * fmaf(0.134145f * g, g, 1.0f), 0.5f * (1.0f + t));
  } else if constexpr (kAct == Activation::kSquaredRelu) {  // relu(g)^2: 2 relu(g)
    const float r = relu(g);
    act = r * r;
    slope = 2.0f * r;
  } else if constexpr (kAct == Activation::kRelu) {  // torch's threshold_backward: the gradient unless g <= 0
    act = relu(g);
    slope = g <= 0.0f ? 0.0f : 1.0f;
  } else {
    act = g;
    slope = 1.0f;
  }
}

// dz = dy · act'(z) in fp32 by the fast forms above (act_backward.cu and the GEMM's plain backward epilogue); relu by
// a select, as torch's threshold_backward: a NaN dy where z <= 0 gives 0.
template <Activation kAct>
__device__ __forceinline__ float activation_grad(float dy, float z) {
  float act, slope;
  activation_and_slope<kAct, true>(z, act, slope);
  return kAct == Activation::kRelu ? (slope != 0.0f ? dy : 0.0f) : dy * slope;
}

}  // namespace fusedkernels::gemm
