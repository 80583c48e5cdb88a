// CUDA kernel of fusedkernels::conv2d_bias_relu_fwd: check the tensors, then route the call.
//   - our Hopper implicit-GEMM kernel (conv/sm90) for the layer class where it measured faster than cuDNN's fused
//     call on the H200 (1x1, stride 1, C_in <= 64, C_out >= 4 C_in: ResNet's first-stage expansion; docs/perf-notes.md,
//     conv v4), where conv::conv2d_supported takes the call (Conv2dParams from channels_last (NHWC) tensors, launched
//     on the current stream);
//   - otherwise cuDNN's fused convolution + bias (+ residual) + ReLU (aten::cudnn_convolution_relu / _add_relu)
//     where cuDNN is enabled and has an engine for the call, and our kernel where cuDNN does not take it;
//   - FUSEDKERNELS_CONV_KERNEL=sm90 / cudnn: that one alone (benchmarks and tests of each path);
//   - else the reference, with one warning per reason (tensors not NHWC-dense, no kernel takes the call).
// CUDA kernels of fusedkernels::batch_norm_relu_fwd / _bwd: the BatchNorm + residual + ReLU kernels
// (batch_norm_relu.cuh) on channels_last tensors, the per-channel vectors in float32.
// The public ops, autograd and the CPU / meta kernels are in conv_ops.cpp. Nothing here syncs or calls cudaMalloc:
// CUDA-graph capture safe.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cstdlib>
#include <string_view>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "conv/batch_norm_relu.h"
#include "conv/conv.h"

namespace fusedkernels::conv {

// Defined in conv_ops.cpp (it is also the CPU kernel): relu(F.conv2d(x, weight, bias, ...) + residual) in PyTorch
// ops.
at::Tensor conv2d_bias_relu_reference(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      const std::optional<at::Tensor>& residual);

// Defined in conv_ops.cpp (the CPU kernels): batch_norm_relu_fwd / _bwd in PyTorch ops.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_fwd_reference(
    const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool training, double momentum, double eps,
    const std::optional<at::Tensor>& residual);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_bwd_reference(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, std::array<bool, 4> output_mask);

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// The internal op's contract (the public op checks what a user passes, in torch's words; these guard the raw op):
// CUDA fp16 / bf16 tensors of one dtype and device, x and weight 4-D with as many input channels, pairs of
// positive strides and dilations and non-negative paddings, bias [C_out], residual the output's shape.
void check_inputs(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  const OptTensor& residual) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device().str());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
                   ": x must be float16 or bfloat16, got ", name_of(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4 && x.size(1) == weight.size(1), op,
                    ": x must be [N, C_in, H, W] and weight [C_out, C_in, kh, kw], got ", shape(x), " and ",
                    shape(weight));
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] > 0 &&
                        stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 && dilation[0] > 0 && dilation[1] > 0,
                    op, ": stride, padding and dilation must be pairs, positive (padding: non-negative), got ",
                    shape(stride), ", ", shape(padding), ", ", shape(dilation));
  check_operands_like_x(op, x, weight, bias, residual, /*residual_any_dtype=*/false, /*internal=*/true);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)), op,
                    ": bias must be [C_out], got ", shape(*bias));
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(x.size(2 + d) + 2 * padding[d] >= dilation[d] * (weight.size(2 + d) - 1) + 1, op,
                      ": the padded input ", shape(x), " is smaller than the dilated kernel ", shape(weight));
  }
}

// FUSEDKERNELS_CONV_KERNEL: unset (or any other value) routes by layer class, with the other kernel as the fallback;
// "sm90" runs our kernel alone, "cudnn" cuDNN's fused call alone, each with the reference where it does not take the
// call (benchmarks and tests of one path). Read per call, as the other families' kernel choices.
enum class Engine { kAuto, kOurs, kCudnn };
Engine engine_choice() {
  const char* choice = std::getenv("FUSEDKERNELS_CONV_KERNEL");
  if (choice && std::string_view(choice) == "sm90") return Engine::kOurs;
  if (choice && std::string_view(choice) == "cudnn") return Engine::kCudnn;
  return Engine::kAuto;
}

// The layer class where our kernel beat cuDNN's fused call on the H200 (suite `conv`, 12-01 10:24 and 10:37): a 1x1
// stride-1 expansion from at most 64 channels (64 -> 256 at 56^2: 1.31-1.35x; with the residual 1.65x at batch 256,
// 0.98x at 64). There K is one 64-channel step, so the call is all epilogue, which ours overlaps with the next tile's
// loads. From 128 input channels up (128 -> 512, 256 -> 1024, 512 -> 2048) cuDNN was 1.1x faster; on the 3x3 layers
// as fast or faster, but for 512 -> 512 at batch 256 (ours 1.08-1.20x there, 0.97x at batch 64: not yet a class).
bool ours_is_faster(const Conv2dParams& p) {
  return p.kernel_h == 1 && p.kernel_w == 1 && p.stride_h == 1 && p.stride_w == 1 && p.in_channels <= 64 &&
         p.out_channels >= 4 * p.in_channels;
}

Conv2dParams params_of(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, const OptTensor& residual) {
  Conv2dParams p;
  p.dtype = to_dtype(x.scalar_type());
  p.batch = x.size(0);
  p.in_channels = x.size(1);
  p.in_h = x.size(2);
  p.in_w = x.size(3);
  p.out_channels = weight.size(0);
  p.kernel_h = static_cast<int>(weight.size(2));
  p.kernel_w = static_cast<int>(weight.size(3));
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  p.dilation_h = static_cast<int>(dilation[0]);
  p.dilation_w = static_cast<int>(dilation[1]);
  p.out_h = (p.in_h + 2 * p.pad_h - p.dilation_h * (p.kernel_h - 1) - 1) / p.stride_h + 1;
  p.out_w = (p.in_w + 2 * p.pad_w - p.dilation_w * (p.kernel_w - 1) - 1) / p.stride_w + 1;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.relu = true;
  return p;
}

Tensor conv2d_bias_relu_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, const OptTensor& residual) {
  const char* op = "conv2d_bias_relu_fwd";
  check_inputs(op, x, weight, bias, stride, padding, dilation, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto reference = [&](const char* why) {
    warn_fallback("conv2d_bias_relu", why, "the PyTorch reference (F.conv2d, + residual, relu)");
    return conv2d_bias_relu_reference(x, weight, bias, stride, padding, dilation, residual).contiguous(kChannelsLast);
  };
  // (the public op routes empty convolutions and converts layouts before they get here; a direct call gets the same
  // answers)
  if (x.numel() == 0 || weight.numel() == 0) return reference("");
  if (!x.is_contiguous(kChannelsLast) || !weight.is_contiguous(kChannelsLast) ||
      (residual && !residual->is_contiguous(kChannelsLast))) {
    return reference("x, weight or residual not channels_last (NHWC) has no fused kernel");
  }
  // bias: copied when strided (cheap next to the convolution)
  const OptTensor b = !bias || bias->stride(0) == 1 ? bias : OptTensor(bias->contiguous());
  Conv2dParams p = params_of(x, weight, b, stride, padding, dilation, residual);
  // asked before out is allocated (a fresh allocation is 16-byte aligned, so out's pointer cannot change the answer)
  const bool ours_supported = conv2d_supported(p);
  const Engine engine = engine_choice();
  const bool ours_first = ours_supported && (engine == Engine::kOurs || (engine == Engine::kAuto && ours_is_faster(p)));
  if (!ours_first && engine != Engine::kOurs && at::globalContext().userEnabledCuDNN()) {
    try {
      Tensor out = residual ? at::cudnn_convolution_add_relu(x, weight, *residual, 1, bias, stride, padding, dilation, 1)
                            : at::cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, 1);
      return out.contiguous(kChannelsLast);
    } catch (const c10::Error&) {
      // no cuDNN engine for this configuration: our kernel or the reference below
    }
  }
  if (engine == Engine::kCudnn) {
    return reference("FUSEDKERNELS_CONV_KERNEL=cudnn, and cuDNN is disabled or has no engine for this call");
  }
  if (!ours_supported) {
    return reference(engine == Engine::kOurs
                         ? "FUSEDKERNELS_CONV_KERNEL=sm90, and our kernel does not take this call on this GPU with "
                           "this build (conv::conv2d_supported)"
                         : "neither cuDNN (disabled, or no engine) nor our kernel takes this call on this GPU with "
                           "this build (conv::conv2d_supported)");
  }
  Tensor out = at::empty({p.batch, p.out_channels, p.out_h, p.out_w}, x.options().memory_format(kChannelsLast));
  p.out = out.data_ptr();
  check_launch(conv2d(p, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

// batch_norm_relu's per-channel vector as the kernels read it: float32 and dense (a copy of a vector of another
// dtype or strided).
Tensor float_vector(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
const float* float_ptr(const OptTensor& t) { return t ? t->data_ptr<float>() : nullptr; }

// The internal op's contract (the public op checks what a user passes, in torch's words): CUDA 4-D input of a
// kernel dtype, the residual like it, per-channel vectors [C] on its device, running statistics in eval. Input or a
// residual that is not channels_last (inductor may pick other strides than the eager trace's) runs the reference.
std::tuple<Tensor, Tensor, Tensor> batch_norm_relu_fwd_cuda(const Tensor& input, const OptTensor& running_mean,
                                                            const OptTensor& running_var, const OptTensor& weight,
                                                            const OptTensor& bias, bool training, double momentum,
                                                            double eps, const OptTensor& residual) {
  const char* op = "batch_norm_relu_fwd";
  TORCH_CHECK_VALUE(input.is_cuda() && input.dim() == 4, op, ": input must be a 4-D CUDA tensor, got ", shape(input));
  check_float_dtype(input, op, "input");
  if (!input.is_contiguous(kChannelsLast) || (residual && !residual->is_contiguous(kChannelsLast))) {
    warn_fallback("batch_norm_relu", "input or residual not channels_last (NHWC) has no fused kernel",
                  "the PyTorch reference (F.batch_norm, + residual, relu)");
    return batch_norm_relu_fwd_reference(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                         residual);
  }
  const int64_t channels = input.size(1), rows = input.numel() / std::max<int64_t>(channels, 1);
  TORCH_CHECK_VALUE(rows > (training ? 1 : 0), op, ": input ", shape(input), " has too few values per channel");
  TORCH_CHECK_VALUE(training || (running_mean && running_var), op, ": eval mode needs running_mean and running_var");
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias},
                                std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    if (!*t) continue;
    TORCH_CHECK_VALUE((*t)->numel() == channels && (*t)->device() == input.device(), op, ": ", name,
                      " must have ", num(channels), " elements on input's device, got ", shape(**t));
  }
  if (residual) {
    TORCH_CHECK_VALUE(residual->sizes() == input.sizes() && residual->device() == input.device(), op,
                      ": residual must be input's shape and on its device, got ", shape(*residual));
    TORCH_CHECK_TYPE(residual->scalar_type() == input.scalar_type(), op, ": residual must have input's dtype");
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const auto floats = input.options().dtype(at::kFloat);
  const OptTensor w = weight ? OptTensor(float_vector(*weight)) : std::nullopt;
  const OptTensor b = bias ? OptTensor(float_vector(*bias)) : std::nullopt;
  // running statistics the kernel updates in place where they are float32 and dense; else it updates float32
  // copies, written back below
  OptTensor mean_acc = running_mean ? OptTensor(float_vector(*running_mean)) : std::nullopt;
  OptTensor var_acc = running_var ? OptTensor(float_vector(*running_var)) : std::nullopt;

  Tensor out = at::empty(input.sizes(), input.options().memory_format(kChannelsLast));
  Tensor save_mean = at::empty({channels}, floats), save_invstd = at::empty({channels}, floats);
  BatchNormReluParams p;
  p.dtype = to_dtype(input.scalar_type());
  p.rows = rows;
  p.channels = channels;
  p.x = input.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.y = out.data_ptr();
  p.weight = float_ptr(w);
  p.bias = float_ptr(b);
  p.running_mean = mean_acc ? mean_acc->data_ptr<float>() : nullptr;
  p.running_var = var_acc ? var_acc->data_ptr<float>() : nullptr;
  p.save_mean = save_mean.data_ptr<float>();
  p.save_invstd = save_invstd.data_ptr<float>();
  p.training = training;
  p.momentum = static_cast<float>(momentum);
  p.eps = static_cast<float>(eps);
  Tensor workspace;
  if (training) {
    workspace = at::empty({batch_norm_relu_workspace(p.dtype, rows, channels)}, floats);
    p.workspace = workspace.data_ptr<float>();
  }
  check_launch(batch_norm_relu_fwd(p, c10::cuda::getCurrentCUDAStream()), op);
  if (training) {
    if (running_mean && !mean_acc->is_same(*running_mean)) running_mean->copy_(*mean_acc);
    if (running_var && !var_acc->is_same(*running_var)) running_var->copy_(*var_acc);
  }
  return {out, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_relu_bwd_cuda(const Tensor& grad_out, const Tensor& input,
                                                                    const Tensor& out, const OptTensor& weight,
                                                                    const Tensor& save_mean, const Tensor& save_invstd,
                                                                    bool training, std::array<bool, 4> mask) {
  const char* op = "batch_norm_relu_bwd";
  TORCH_CHECK_VALUE(input.is_cuda() && input.dim() == 4 && out.sizes() == input.sizes() &&
                        grad_out.sizes() == input.sizes(),
                    op, ": input, out and grad_out must be 4-D CUDA tensors of one shape");
  check_float_dtype(input, op, "input");
  if (!input.is_contiguous(kChannelsLast) || !out.is_contiguous(kChannelsLast)) {
    warn_fallback("batch_norm_relu", "input not channels_last (NHWC) has no fused kernel",
                  "the PyTorch reference (F.batch_norm, + residual, relu)");
    return batch_norm_relu_bwd_reference(grad_out, input, out, weight, save_mean, save_invstd, training, mask);
  }
  TORCH_CHECK_TYPE(out.scalar_type() == input.scalar_type() && grad_out.scalar_type() == input.scalar_type(), op,
                   ": grad_out and out must have input's dtype");
  const int64_t channels = input.size(1), rows = input.numel() / std::max<int64_t>(channels, 1);
  TORCH_CHECK_TYPE(save_mean.scalar_type() == at::kFloat && save_invstd.scalar_type() == at::kFloat, op,
                   ": save_mean and save_invstd must be float32");
  TORCH_CHECK_VALUE(save_mean.numel() == channels && save_invstd.numel() == channels &&
                        (!weight || weight->numel() == channels),
                    op, ": save_mean, save_invstd and weight must have ", num(channels), " elements");
  const c10::cuda::CUDAGuard guard(input.device());
  // the upstream gradient in the kernels' layout: a copy when autograd hands another (an expanded sum's gradient)
  const Tensor dy = grad_out.contiguous(kChannelsLast);
  const auto floats = input.options().dtype(at::kFloat);
  const auto like_input = input.options().memory_format(kChannelsLast);
  const OptTensor w = weight ? OptTensor(float_vector(*weight)) : std::nullopt;
  const Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const bool sums = mask[1] || mask[2] || (training && mask[0]);
  Tensor dx = mask[0] ? at::empty(input.sizes(), like_input) : Tensor();
  Tensor dresidual = mask[3] ? at::empty(input.sizes(), like_input) : Tensor();
  Tensor dweight = sums ? at::empty({channels}, floats) : Tensor(), dbias = sums ? at::empty({channels}, floats) : Tensor();
  if (rows == 0 || channels == 0) {  // nothing to read: zero sums, empty gradients
    if (sums) dweight.zero_(), dbias.zero_();
  } else {
    BatchNormReluBackwardParams p;
    p.dtype = to_dtype(input.scalar_type());
    p.rows = rows;
    p.channels = channels;
    p.dy = dy.data_ptr();
    p.x = input.data_ptr();
    p.y = out.data_ptr();
    p.weight = float_ptr(w);
    p.save_mean = mean.data_ptr<float>();
    p.save_invstd = invstd.data_ptr<float>();
    p.training = training;
    p.dx = mask[0] ? dx.data_ptr() : nullptr;
    p.dresidual = mask[3] ? dresidual.data_ptr() : nullptr;
    p.dweight = sums ? dweight.data_ptr<float>() : nullptr;
    p.dbias = sums ? dbias.data_ptr<float>() : nullptr;
    Tensor workspace;
    if (sums) {
      workspace = at::empty({batch_norm_relu_workspace(p.dtype, rows, channels)}, floats);
      p.workspace = workspace.data_ptr<float>();
    }
    check_launch(batch_norm_relu_bwd(p, c10::cuda::getCurrentCUDAStream()), op);
  }
  return {dx, mask[1] ? dweight : Tensor(), mask[2] ? dbias : Tensor(), dresidual};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CUDA, m) {
  m.impl("conv2d_bias_relu_fwd", &conv2d_bias_relu_fwd_cuda);
  m.impl("batch_norm_relu_fwd", &batch_norm_relu_fwd_cuda);
  m.impl("batch_norm_relu_bwd", &batch_norm_relu_bwd_cuda);
}

}  // namespace fusedkernels::conv
