// Conv2d with a fused epilogue: the parameter struct and launchers shared by the kernels and the bindings.
// No torch headers here: conv_api.cpp fills the struct from tensors.
//
//   z = conv2d(x, w) (+ bias) (+ residual),  out = relu(z) (or z when relu is false)
//
// as an implicit GEMM over NHWC (channels_last) tensors: x [batch, in_h, in_w, in_channels], weight
// [out_channels, kernel_h, kernel_w, in_channels], residual and out [batch, out_h, out_w, out_channels], all
// contiguous in that order, 16-byte aligned, channels multiples of 8 (16-byte pixels); groups = 1.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fusedkernels::conv {

struct Conv2dParams {
  DType dtype;  // of x, weight, bias, residual, out: kFloat16 or kBFloat16
  int64_t batch = 0, in_h = 0, in_w = 0, in_channels = 0;
  int64_t out_h = 0, out_w = 0, out_channels = 0;
  int kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;      // [out_channels] or nullptr
  const void* residual = nullptr;  // like out, or nullptr: added before the ReLU (ResNet's bottleneck)
  void* out = nullptr;
  bool relu = true;
};

// Whether a kernel takes these params on the current device (the bindings run the reference otherwise).
bool conv2d_supported(const Conv2dParams& p);

// Launch on `stream`; return the launch error (cudaSuccess when all went well).
cudaError_t conv2d(const Conv2dParams& p, cudaStream_t stream);

}  // namespace fusedkernels::conv
