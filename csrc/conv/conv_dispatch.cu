// conv2d: whether a kernel takes the params, and the dtype switch onto the Hopper implicit-GEMM kernel's
// instances (sm90/conv2d_sm90_*.cu); batch_norm_relu: the dtype switch onto its instances
// (batch_norm_relu_{fp32,fp16,bf16}.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/host/launch.h"
#include "common/host/static_switch.h"
#include "conv/batch_norm_relu.h"
#include "conv/conv.h"

namespace fusedkernels::conv {

template <typename T>
bool conv2d_sm90_available();
template <typename T>
cudaError_t launch_conv2d_sm90(const Conv2dParams& p, cudaStream_t stream);
template <typename T>
int64_t batch_norm_relu_workspace_of(int64_t rows, int64_t channels);
template <typename T>
cudaError_t batch_norm_relu_fwd_of(const BatchNormReluParams& p, cudaStream_t stream);
template <typename T>
cudaError_t batch_norm_relu_bwd_of(const BatchNormReluBackwardParams& p, cudaStream_t stream);

namespace {

template <typename Fn>
decltype(auto) with_type(DType dtype, Fn&& fn) {
  return type_switch<DType::kFloat16, DType::kBFloat16>(dtype, std::forward<Fn>(fn));
}

}  // namespace

bool conv2d_supported(const Conv2dParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  // 16-byte pixels (the copy engine's unit) and the epilogue's 16-byte rows
  if (p.in_channels % 8 != 0 || p.out_channels % 8 != 0) return false;
  if (!is_aligned(p.x, 16) || !is_aligned(p.weight, 16) || !is_aligned(p.out, 16) ||
      (p.residual != nullptr && !is_aligned(p.residual, 16)) || (p.bias != nullptr && !is_aligned(p.bias, 16))) {
    return false;
  }
  // what an im2col map encodes: traversal strides up to 8, bounding-box corners in [-128, 127]
  const int lower_h = -p.pad_h, lower_w = -p.pad_w;
  const int upper_h = p.pad_h - (p.kernel_h - 1) * p.dilation_h, upper_w = p.pad_w - (p.kernel_w - 1) * p.dilation_w;
  for (const int corner : {lower_h, lower_w, upper_h, upper_w}) {
    if (corner < -128 || corner > 127) return false;
  }
  if (p.stride_h > 8 || p.stride_w > 8 || p.out_h <= 0 || p.out_w <= 0) return false;
  // the GEMM's row and K indices are 32-bit
  if (p.batch * p.out_h * p.out_w >= (int64_t(1) << 31) || p.in_h * p.in_w * p.batch >= (int64_t(1) << 31)) return false;
  return with_type(p.dtype, [&]<typename T>() { return conv2d_sm90_available<T>(); });
}

cudaError_t conv2d(const Conv2dParams& p, cudaStream_t stream) {
  return with_type(p.dtype, [&]<typename T>() { return launch_conv2d_sm90<T>(p, stream); });
}

bool batch_norm_relu_supported(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

int64_t batch_norm_relu_workspace(DType dtype, int64_t rows, int64_t channels) {
  return float_type_switch(dtype, [&]<typename T>() { return batch_norm_relu_workspace_of<T>(rows, channels); });
}

cudaError_t batch_norm_relu_fwd(const BatchNormReluParams& p, cudaStream_t stream) {
  return float_type_switch(p.dtype, [&]<typename T>() { return batch_norm_relu_fwd_of<T>(p, stream); });
}

cudaError_t batch_norm_relu_bwd(const BatchNormReluBackwardParams& p, cudaStream_t stream) {
  return float_type_switch(p.dtype, [&]<typename T>() { return batch_norm_relu_bwd_of<T>(p, stream); });
}

}  // namespace fusedkernels::conv
