// Split-K's second pass: z = Σ_s workspace[s] + bias, out = act(z) (* up) (+ residual; act(z + residual) when
// residual_before_activation), pre_activation = z, from the fp32 partial sums of x W^T the GEMM wrote over
// p.split_k slices of K (workspace [split_k, m, n], gated [split_k, m, 2n]: the gate's n columns, then the up
// projection's, as the bias and the pre-activation have them). The same arithmetic as the fused epilogue: z
// rounded to T, the activation applied to the rounded value, one rounding of the output. One thread per 8
// consecutive output columns.
#pragma once

#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "gemm/activation.cuh"
#include "gemm/gemm.h"

namespace fusedkernels::gemm {

template <typename T, Activation kAct, bool kGated>
__global__ void split_k_epilogue_kernel(const LinearActParams p) {
  const int64_t vectors_per_row = p.n / 8, index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (index >= p.m * vectors_per_row) return;
  const int64_t row = index / vectors_per_row, col = 8 * (index % vectors_per_row);
  const int64_t workspace_cols = kGated ? 2 * p.n : p.n, plane = p.m * workspace_cols;
  const T* bias = static_cast<const T*>(p.bias);

  // z at workspace (and bias, pre-activation) columns c .. c + 7
  const auto sum = [&](int64_t c) {
    float z[8] = {};
    if (bias != nullptr) {
      Vec<T, 8> b;
      b.load(bias + c);
#pragma unroll
      for (int e = 0; e < 8; ++e) z[e] = b.get(e);
    }
    const float* partial = p.workspace + row * workspace_cols + c;
    for (int s = 0; s < p.split_k; ++s, partial += plane) {
      const float4 lo = reinterpret_cast<const float4*>(partial)[0], hi = reinterpret_cast<const float4*>(partial)[1];
      z[0] += lo.x, z[1] += lo.y, z[2] += lo.z, z[3] += lo.w, z[4] += hi.x, z[5] += hi.y, z[6] += hi.z, z[7] += hi.w;
    }
    Vec<T, 8> rounded;
#pragma unroll
    for (int e = 0; e < 8; ++e) rounded.set(e, z[e]);
    if (p.pre_activation != nullptr) {
      rounded.store(static_cast<T*>(p.pre_activation) + row * p.pre_activation_row_stride + c);
    }
    return rounded;
  };

  const Vec<T, 8> z = sum(col);
  Vec<T, 8> up, r;
  if constexpr (kGated) up = sum(p.n + col);
  const bool residual = p.residual != nullptr;
  if (residual) r.load(static_cast<const T*>(p.residual) + row * p.residual_row_stride + col);
  Vec<T, 8> out;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    out.set(e, epilogue_output<kAct, kGated>(z.get(e), kGated ? up.get(e) : 0.0f, residual ? r.get(e) : 0.0f,
                                             residual, p.residual_before_activation));
  }
  out.store(static_cast<T*>(p.out) + row * p.out_row_stride + col);
}

template <typename T>
cudaError_t launch_split_k_epilogue(const LinearActParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div(p.m * (p.n / 8), kThreads);
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  };
  const auto with = [&](auto act) {
    constexpr Activation kAct = decltype(act)::value;
    return p.gated ? launch(split_k_epilogue_kernel<T, kAct, true>) : launch(split_k_epilogue_kernel<T, kAct, false>);
  };
  switch (p.activation) {
    case Activation::kRelu: return with(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGelu: return with(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return with(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSilu: return with(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kSquaredRelu: return with(std::integral_constant<Activation, Activation::kSquaredRelu>{});
    default: return with(std::integral_constant<Activation, Activation::kNone>{});
  }
}

}  // namespace fusedkernels::gemm
