// BatchNorm + residual + ReLU over channels_last (NHWC) activations: the parameter structs and launchers shared by
// the kernels and the bindings. No torch headers here: conv_api.cpp fills the structs from tensors.
//
//   forward:  y = relu((x - mean) * invstd * weight + bias + residual)        per channel c, over rows N·H·W
//   backward: g = dy * (y > 0),  xhat = (x - mean) * invstd
//             dbias = Σ g,  dweight = Σ g·xhat,  dresidual = g
//             dx = weight * invstd * (g - Σg / n - xhat * Σ(g·xhat) / n)    (training: batch statistics)
//             dx = weight * invstd * g                                     (eval: running statistics)
//
// x, residual, y, dy, dx, dresidual: [rows, channels] dense (NHWC with rows = N·H·W), one dtype; every per-channel
// vector is float32 [channels], dense.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fusedkernels::conv {

struct BatchNormReluParams {
  DType dtype;  // of x, residual, y: kFloat32, kFloat16 or kBFloat16
  int64_t rows = 0, channels = 0;
  const void* x = nullptr;
  const void* residual = nullptr;  // like x, or nullptr: added before the ReLU
  void* y = nullptr;
  const float* weight = nullptr;  // or nullptr (1)
  const float* bias = nullptr;    // or nullptr (0)
  // training: updated in place when not nullptr (mean with momentum, the variance unbiased); eval: read
  float* running_mean = nullptr;
  float* running_var = nullptr;
  float* save_mean = nullptr;    // out: the mean used (batch or running)
  float* save_invstd = nullptr;  // out: 1 / sqrt(var + eps) used (biased batch variance, or running)
  bool training = true;
  float momentum = 0.1f, eps = 1e-5f;
  float* workspace = nullptr;  // batch_norm_relu_workspace(...) floats (training only)
};

struct BatchNormReluBackwardParams {
  DType dtype;  // of dy, x, y, dx, dresidual
  int64_t rows = 0, channels = 0;
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* y = nullptr;  // the forward's output: its ReLU mask is y > 0
  const float* weight = nullptr;  // or nullptr (1)
  const float* save_mean = nullptr;
  const float* save_invstd = nullptr;
  bool training = true;
  void* dx = nullptr;         // or nullptr: not wanted
  void* dresidual = nullptr;  // or nullptr: not wanted
  float* dweight = nullptr;   // [channels] out (Σ g·xhat), needed in training whenever dx is
  float* dbias = nullptr;     // [channels] out (Σ g), likewise
  float* workspace = nullptr;  // batch_norm_relu_workspace(...) floats
};

// Whether a kernel takes this dtype (every size, alignment and channel count is taken).
bool batch_norm_relu_supported(DType dtype);

// Floats of workspace the per-block partial sums of a call with these sizes need on the current device.
int64_t batch_norm_relu_workspace(DType dtype, int64_t rows, int64_t channels);

// Launch on `stream`; return the launch error (cudaSuccess when all went well).
cudaError_t batch_norm_relu_fwd(const BatchNormReluParams& p, cudaStream_t stream);
cudaError_t batch_norm_relu_bwd(const BatchNormReluBackwardParams& p, cudaStream_t stream);

}  // namespace fusedkernels::conv
