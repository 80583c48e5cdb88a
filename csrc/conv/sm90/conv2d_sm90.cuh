// conv2d on Hopper (sm_90a): the gemm family's warp-specialised GEMM as an implicit GEMM, x read through the
// copy engine's im2col mode (gemm/sm90/linear_act_sm90.cuh, launch_conv2d_sm90). The output pixels are the
// GEMM's rows, the output channels its columns, the filter taps times the input channels its K; bias, the
// residual (before the ReLU) and the ReLU are the GEMM's epilogue.
#pragma once

#include "conv/conv.h"
#include "gemm/sm90/linear_act_sm90.cuh"

namespace fusedkernels::conv {

template <typename T>
bool conv2d_sm90_available() {
#ifdef FUSEDKERNELS_SM90A_BUILT  // else the kernel's only body is the trap
  return compute_capability() == 90 &&
         has_image_for_current_device<gemm::linear_act_sm90_kernel<gemm::LinearActSm90Config<T>, false, true>>();
#else
  return false;
#endif
}

template <typename T>
cudaError_t launch_conv2d_sm90(const Conv2dParams& p, cudaStream_t stream) {
  gemm::LinearActParams g;
  g.dtype = p.dtype;
  g.m = p.batch * p.out_h * p.out_w;
  g.n = p.out_channels;
  g.k = int64_t(p.kernel_h) * p.kernel_w * p.in_channels;
  g.x = p.x;  // read through the im2col map
  g.x_row_stride = p.in_channels;
  g.weight = p.weight;  // [out_channels, kernel_h, kernel_w, in_channels]: [n, k], K-major
  g.weight_row_stride = g.k;
  g.bias = p.bias;
  g.residual = p.residual;
  g.residual_row_stride = p.out_channels;
  g.residual_before_activation = true;
  g.out = p.out;
  g.out_row_stride = p.out_channels;
  g.activation = p.relu ? gemm::Activation::kRelu : gemm::Activation::kNone;
  gemm::Im2colGeometry geometry;
  geometry.batch = int(p.batch);
  geometry.in_h = int(p.in_h);
  geometry.in_w = int(p.in_w);
  geometry.channels = int(p.in_channels);
  geometry.out_h = int(p.out_h);
  geometry.out_w = int(p.out_w);
  geometry.kernel_h = p.kernel_h;
  geometry.kernel_w = p.kernel_w;
  geometry.stride_h = p.stride_h;
  geometry.stride_w = p.stride_w;
  geometry.pad_h = p.pad_h;
  geometry.pad_w = p.pad_w;
  geometry.dilation_h = p.dilation_h;
  geometry.dilation_w = p.dilation_w;
  return gemm::launch_conv2d_sm90<T>(g, geometry, stream);
}

}  // namespace fusedkernels::conv

#define FUSEDKERNELS_CONV2D_SM90_INSTANCE(T)                         \
  template bool fusedkernels::conv::conv2d_sm90_available<T>();     \
  template cudaError_t fusedkernels::conv::launch_conv2d_sm90<T>(const fusedkernels::conv::Conv2dParams&, cudaStream_t);
