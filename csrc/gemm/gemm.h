// GEMM with a fused epilogue: the parameter struct and launchers shared by the kernels and the bindings.
// No torch headers here: gemm_api.cpp fills the struct from tensors.
//
//   z = x W^T (+ bias),  out = act(z) (+ residual)
//
// x is [m, k] and W [n, k] as nn.Linear stores it (k contiguous in both: both operands of the tensor-core
// product are K-major, no transposes), bias [n], residual and out [m, n] (n contiguous). Row strides are in
// elements, multiples of 8, with 16-byte aligned data (the copy engine and cp.async move 16-byte units); k
// and n are then multiples of 8 too. Tails of m, n and k are handled (out-of-range elements of x and W are
// read as zeros).
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fusedkernels::gemm {

// PyTorch's definitions: gelu is the erf form (F.gelu's default), gelu_tanh F.gelu(approximate="tanh"),
// silu x * sigmoid(x), squared_relu relu(x)^2.
enum class Activation : int { kNone, kRelu, kGelu, kGeluTanh, kSilu, kSquaredRelu };

struct LinearActParams {
  DType dtype;  // of x, weight, bias, residual, out, pre_activation: kFloat16 or kBFloat16
  int64_t m = 0, n = 0, k = 0;
  const void* x = nullptr;  // [m, k]
  int64_t x_row_stride = 0;
  const void* weight = nullptr;  // [n, k]
  int64_t weight_row_stride = 0;
  const void* bias = nullptr;  // [n], contiguous, or nullptr
  const void* residual = nullptr;  // [m, n] or nullptr: added after the activation
  int64_t residual_row_stride = 0;
  void* out = nullptr;  // [m, n]
  int64_t out_row_stride = 0;
  // [m, n] ([m, 2n] gated: gate | up), or nullptr: z (before the activation), rounded to dtype, for the backward
  void* pre_activation = nullptr;
  int64_t pre_activation_row_stride = 0;
  Activation activation = Activation::kNone;
  // The gated form (SwiGLU / GeGLU): weight is [2n, k], the gate's rows then the up projection's (bias [2n]
  // likewise), and out = act(x Wg^T + bg) * (x Wu^T + bu) (+ residual).
  bool gated = false;
  // Add the residual before the activation, act(z + residual) (ResNet's last conv of a block), instead of after.
  bool residual_before_activation = false;
  // The gated form's backward in the epilogue of the GEMM that produces its output's gradient (Hopper kernel
  // only): x is dy [m, k] of the next projection's output, weight that projection's weight as stored, [k, n] (n
  // contiguous, weight_row_stride between its k rows; the kernel reads it MN-major), so the product is dh [m, n]
  // (rounded to dtype, as the unfused GEMM would store it); residual is the gated forward's saved pre-activation
  // z = gate | up [m, 2n], and out receives dz = (dh * up * act'(gate)) | (dh * act(gate)) [m, 2n], which may be z
  // itself (each element is read and then written by one thread). activation: the gate's; no bias, no split-K.
  bool gated_grad = false;
  // The plain MLP's backward in the same place (Hopper kernel only): x, weight and the product dh as for gated_grad;
  // residual is the plain forward's saved pre-activation z [m, n], and out receives dz = dh * act'(z) [m, n] (may be
  // z itself). Where dbias_partials is set, the column sums of dz as stored, over each 64-row tile, go to it
  // ([ceil(m / 64), n] fp32; the caller adds them up, with no atomics: the bias gradient, deterministic).
  // activation: any but none; no bias, no split-K.
  bool act_grad = false;
  float* dbias_partials = nullptr;
  // Split-K, for calls with too few output tiles to fill the GPU (small m): the GEMM writes fp32 partial sums
  // of x W^T over split_k slices of K into workspace [split_k, m, n] ([split_k, m, 2n] gated, gate | up), and a
  // second kernel adds them up and applies the epilogue. split_k from linear_act_split_k.
  int split_k = 1;
  float* workspace = nullptr;
};

// The implicit GEMM of a convolution (csrc/conv): x is an NHWC image batch [batch, in_h, in_w, channels] read
// through the copy engine's im2col mode, the GEMM's rows the output pixels (m = batch * out_h * out_w), its K
// the filter taps times the channels (weight [n, kernel_h, kernel_w, channels]).
struct Im2colGeometry {
  int batch = 0, in_h = 0, in_w = 0, channels = 0, out_h = 0, out_w = 0;
  int kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1;
};

// FUSEDKERNELS_GEMM_KERNEL names a kernel for calls to take where the shape would choose another (tests and
// benchmarks; read per call): "portable" (gemm_dispatch.cu), "sm90-wide", "sm90-cooperative", "sm90-pingpong"
// (sm90/linear_act_sm90.cuh). Whether `value` is one of those: the bindings warn of any other, which is ignored.
inline bool known_kernel_setting(const char* value) {
  for (const char* known : {"portable", "sm90-wide", "sm90-cooperative", "sm90-pingpong"}) {
    if (std::strcmp(value, known) == 0) return true;
  }
  return false;
}

// Whether a kernel takes these params on the current device: the sm_90a kernel on Hopper, from a build that
// holds its code; else the portable mma.sync kernel on sm_80 and newer (A100, RTX 30 / 40, and Hopper when
// FUSEDKERNELS_GEMM_KERNEL=portable), from a build with code for the device, when the rows of out, residual
// and pre_activation are 16-byte aligned as x's, and the bias too. The bindings run the reference otherwise.
bool linear_act_supported(const LinearActParams& p);

// How many slices of K a call linear_act_supported takes should be split into (1: none). When more than one,
// the caller sets p.split_k and a p.workspace of that many fp32 [m, n] ([m, 2n] gated) planes.
int linear_act_split_k(const LinearActParams& p);

// Launch on `stream` (the kernel linear_act_supported found); return the launch error (cudaSuccess when all
// went well).
cudaError_t linear_act(const LinearActParams& p, cudaStream_t stream);

// The backward passes between the gradient GEMMs read dy and the saved pre-activation z as rows and write dz,
// contiguous; fp16 / bf16, n a multiple of 8, 16-byte aligned data and row strides.
struct BackwardRows {
  DType dtype;
  int64_t rows = 0, n = 0;
  const void* dy = nullptr;
  int64_t dy_row_stride = 0;
  const void* z = nullptr;
  int64_t z_row_stride = 0;
  void* dz = nullptr;
  Activation activation = Activation::kRelu;
};

// The gated form's backward as one elementwise pass (gated_backward.cu): z = gate | up [rows, 2n], dy [rows, n];
// writes dz = (dy * up * act'(gate)) | (dy * act(gate)) into [rows, 2n]. activation: the gate's (silu, gelu,
// gelu_tanh or relu; gated_backward_supported).
struct GatedBackwardParams : BackwardRows {};
bool gated_backward_supported(const GatedBackwardParams& p);
cudaError_t gated_backward(const GatedBackwardParams& p, cudaStream_t stream);

// The activation's backward with the bias gradient in the same pass: dz = dy * act'(z) over [rows, n] (fp32
// arithmetic, one rounding), and, where dbias is set, dbias = the column sums of dz (float32 sums, rounded once to
// the dtype): dy and z are read once, dz written once, instead of a second pass over dz for the sum. Column sums go
// through `partials` (act_backward_partials(p) floats), in a fixed order: deterministic.
struct ActBackwardParams : BackwardRows {
  void* dbias = nullptr;  // [n] in dtype, or nullptr
  float* partials = nullptr;
};
bool act_backward_supported(const ActBackwardParams& p);
int64_t act_backward_partials(const ActBackwardParams& p);
cudaError_t act_backward(const ActBackwardParams& p, cudaStream_t stream);

}  // namespace fusedkernels::gemm
