// The conv family's op layer: schemas; the public op conv2d_bias_relu (argument checks in F.conv2d's words, the
// channels_last conversion, the choice between the fused op and the reference, autocast); autograd of the internal
// conv2d_bias_relu_fwd in C++; its CPU kernel (the reference) and meta kernel. Its CUDA kernel is in conv_api.cpp.
//
//   fusedkernels::conv2d_bias_relu        CompositeImplicitAutograd: check, route, call conv2d_bias_relu_fwd
//     -> fusedkernels::conv2d_bias_relu_fwd   Autograd: attaches Conv2dBiasReluBackward; CUDA: the fused kernel;
//                                             CPU: the reference; Meta: shapes
//        backward: dz = dy * (out > 0) from the saved output, then at::convolution_backward for dx, dw and
//        dbias (the sum of dz), and dresidual = dz; with a bias, dz and dbias in one pass where they can
//        (the gemm family's act_backward over the channels_last rows)
//
//   z = conv2d(x, weight, stride, padding, dilation) + bias + residual,  out = relu(z); groups = 1; in the inputs'
//   dtype; out in x's memory format (channels_last for a channels_last x, else contiguous), as F.conv2d's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "common/torch/autocast.h"
#include "common/torch/autograd.h"
#include "common/torch/checks.h"
#include "common/torch/ops.h"

TORCH_LIBRARY_FRAGMENT(fusedkernels, m) {
  // Public op: x [N, C_in, H, W] (or unbatched [C_in, H, W]), weight [C_out, C_in, kh, kw] (nn.Conv2d's), bias
  // [C_out], residual like the output; all one dtype. stride, padding, dilation: an int or a pair, as F.conv2d's.
  m.def("conv2d_bias_relu(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0,"
        " int[2] dilation=1, Tensor? residual=None) -> Tensor");
  // Internal: x 4-D, stride / padding / dilation pairs; the output channels_last, whatever x's layout (inductor's
  // layout optimisation passes x in strides other than the trace's, so the output's must not depend on them).
  m.def("conv2d_bias_relu_fwd(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding,"
        " int[2] dilation, Tensor? residual) -> Tensor");
}

namespace fusedkernels::conv {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

// The public op's output memory format, x's as F.conv2d follows it: channels_last for an x that is channels_last
// (and not also contiguous, as when C == 1), contiguous otherwise. fusedkernels/ops/conv.py's _output_format
// mirrors it.
at::MemoryFormat output_format(const Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

}  // namespace

// The reference, also conv_api.cpp's where no kernel takes a call: relu(F.conv2d(x, weight, bias, ...) +
// residual) in the inputs' dtype (autocast excluded: the callers cast first), differentiable, in the layout
// PyTorch's convolution picks.
Tensor conv2d_bias_relu_reference(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, const OptTensor& residual) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  Tensor z = at::conv2d(x, weight, bias, stride, padding, dilation, 1);
  if (residual) z = z + *residual;
  return at::relu(z);
}

namespace {

using torch::autograd::variable_list;

constexpr const char* kReference = "the PyTorch reference (F.conv2d, + residual, relu)";
constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

using Conv2dBiasReluFwd = Tensor(const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, const OptTensor&);

const c10::TypedOperatorHandle<Conv2dBiasReluFwd>& conv2d_bias_relu_fwd_op() {
  static const auto op = find_op<Conv2dBiasReluFwd>("fusedkernels::conv2d_bias_relu_fwd");
  return op;
}

std::string sym_str(const c10::SymInt& v) {
  const auto value = v.maybe_as_int();
  return value ? num(*value) : v.toSymNode()->str();
}

std::string pair_str(const std::array<int64_t, 2>& v) { return "(" + num(v[0]) + " x " + num(v[1]) + ")"; }

// An int[2] argument as F.conv2d takes it: one value for both spatial dimensions, or one per dimension.
std::array<int64_t, 2> pair_of(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, op, ": expected ", name,
              " to be a single integer value or a list of 2 values to match the convolution dimensions, but got ",
              name, "=", shape(v));
  return {v[0], v.back()};
}

struct Geometry {
  std::array<int64_t, 2> stride, padding, dilation;
};

// Output [N, C_out, H_out, W_out], symbolic under torch.compile: (in + 2 pad - dilation (k - 1) - 1) / stride + 1.
std::vector<c10::SymInt> out_shape(const Tensor& x, const Tensor& weight, const Geometry& g) {
  std::vector<c10::SymInt> sizes{x.sym_size(0), weight.sym_size(0)};
  for (int d = 0; d < 2; ++d) {
    sizes.push_back((x.sym_size(2 + d) + 2 * g.padding[d] - g.dilation[d] * (weight.sym_size(2 + d) - 1) - 1) /
                        g.stride[d] + 1);
  }
  return sizes;
}

// Validates the arguments as F.conv2d would (RuntimeError, in its words where it has them), x 4-D. Sizes compare
// symbolically (torch.compile with dynamic shapes). Unlike F.conv2d, groups is 1, residual must have the output's
// shape exactly (no broadcasting), and weight and bias share x's dtype; so does the residual unless
// residual_any_dtype (the public op adds one of another dtype after the convolution, with type promotion).
void check_args(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias, const Geometry& g,
                const OptTensor& residual, bool residual_any_dtype = false) {
  for (const auto& [name, t] : {std::pair{"x", &x}, std::pair{"weight", &weight}, std::pair{"bias", bias ? &*bias : nullptr},
                                std::pair{"residual", residual ? &*residual : nullptr}}) {
    TORCH_CHECK_NOT_IMPLEMENTED(t == nullptr || (t->layout() == at::kStrided && !t->is_nested()), op,
                                " takes strided (dense) tensors; ", name, " is ",
                                t != nullptr && t->is_nested() ? std::string("nested") : c10::str(t ? t->layout() : at::kStrided));
  }
  TORCH_CHECK(x.dim() == 4, op, ": Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: ",
              shape(x));
  TORCH_CHECK(weight.dim() == 4, op, ": Expected 4-dimensional weight [out_channels, in_channels, kernel_h, kernel_w]",
              " for 4-dimensional input ", shape(x), ", but got ", num(weight.dim()), "-dimensional weight of size ",
              shape(weight), " instead");
  TORCH_CHECK(weight.sym_size(0).sym_gt(0).guard_bool(__FILE__, __LINE__), op,
              ": Given groups=1, expected weight to be at least 1 at dimension 0, but got weight of size ",
              shape(weight), " instead");
  TORCH_CHECK(sym_same(x.sym_size(1), weight.sym_size(1)), op, ": Given groups=1, weight of size ", shape(weight),
              ", expected input", shape(x), " to have ", sym_str(weight.sym_size(1)), " channels, but got ",
              sym_str(x.sym_size(1)), " channels instead");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating-point tensor (float16 or bfloat16 for the fused kernel), got ",
              name_of(x.scalar_type()));
  check_operands_like_x(op, x, weight, bias, residual, residual_any_dtype, /*internal=*/false);
  TORCH_CHECK(!bias || (bias->dim() == 1 && sym_same(bias->sym_size(0), weight.sym_size(0))), op,
              ": Given weight of size ", shape(weight), ", expected bias to be 1-dimensional with ",
              sym_str(weight.sym_size(0)), " elements, but got bias of size ", shape(*bias), " instead");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(g.stride[d] > 0, op, ": non-positive stride is not supported, got stride=", pair_str(g.stride));
    TORCH_CHECK(g.padding[d] >= 0, op, ": negative padding is not supported, got padding=", pair_str(g.padding));
    TORCH_CHECK(g.dilation[d] > 0, op, ": dilation should be greater than zero, got dilation=", pair_str(g.dilation));
  }
  // the padded input must hold the dilated kernel
  bool fits = true;
  for (int d = 0; d < 2; ++d) {
    fits = fits && (x.sym_size(2 + d) + 2 * g.padding[d])
                       .sym_ge(g.dilation[d] * (weight.sym_size(2 + d) - 1) + 1)
                       .guard_bool(__FILE__, __LINE__);
  }
  TORCH_CHECK(fits, op, ": Calculated padded input size per channel: ", shape(x.sym_sizes().slice(2)),
              " with padding ", pair_str(g.padding), ". Kernel size: ", shape(weight.sym_sizes().slice(2)),
              " with dilation ", pair_str(g.dilation), ". Kernel size can't be greater than actual input size");
  if (residual) {
    const auto sizes = out_shape(x, weight, g);
    bool same = residual->dim() == 4;
    for (int64_t d = 0; same && d < 4; ++d) same = sym_same(residual->sym_size(d), sizes[d]);
    TORCH_CHECK(same, op, ": residual must have the output's shape ", shape(sizes), " (no broadcasting), got ",
                shape(*residual));
  }
}

Geometry geometry(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return {pair_of(op, "stride", stride), pair_of(op, "padding", padding), pair_of(op, "dilation", dilation)};
}

bool needs_grad(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& residual) {
  return at::GradMode::is_enabled() &&
         (requires_grad(x) || requires_grad(weight) || requires_grad(bias) || requires_grad(residual));
}

// Why a call runs the reference instead of the fused op, or nullptr; "" for a silent reason. CPU tensors take the op
// (whose CPU kernel is the reference); other devices (meta, ...) and empty convolutions take the reference silently.
// Sizes, strides and alignment are conv2d_supported's to judge (conv_api.cpp).
const char* fallback_reason(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& residual) {
  const bool tangents =
      has_forward_grad(x) || has_forward_grad(weight) || has_forward_grad(bias) || has_forward_grad(residual);
  if (!x.is_cuda()) return x.is_cpu() && !tangents ? nullptr : "";
  if (tangents) return "forward-mode AD (an input with a tangent) has no fused kernel";
  switch (x.scalar_type()) {
    case at::kHalf:
    case at::kBFloat16: break;
    case at::kFloat: return "float32 inputs have no fused kernel (float16, bfloat16)";
    case at::kDouble: return "float64 inputs have no fused kernel (float16, bfloat16)";
    default: return "this dtype has no fused kernel (float16, bfloat16)";
  }
  if (x.sym_numel().sym_eq(0).guard_bool(__FILE__, __LINE__) ||
      weight.sym_numel().sym_eq(0).guard_bool(__FILE__, __LINE__)) {
    return "";
  }
  return nullptr;
}

// t in channels_last (NHWC) memory, as the kernel reads it: a copy, said once per argument, when it is not.
Tensor to_channels_last(const Tensor& t, const char* name) {
  if (t.is_contiguous(kChannelsLast)) return t;
  static std::once_flag warned[3];
  const int which = name[0] == 'x' ? 0 : name[0] == 'w' ? 1 : 2;
  std::call_once(warned[which], [&] {
    TORCH_WARN("fusedkernels.conv2d_bias_relu: ", name, " is not channels_last (NHWC); converting it costs a copy of ",
               name, " (", shape(t), ") on every call", name[0] == 'x' ? ", and the output's back to NCHW" : "",
               ". Convert once instead: "
               "model.to(memory_format=torch.channels_last) and x.contiguous(memory_format=torch.channels_last)");
  });
  return t.contiguous(kChannelsLast);
}

// The public op after expanding the pairs, x 4-D: check, then the reference (with one warning per reason) or
// conv2d_bias_relu_fwd on channels_last tensors.
Tensor route(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Geometry& g,
             const OptTensor& residual) {
  const char* op = "conv2d_bias_relu";
  check_args(op, x, weight, bias, g, residual, /*residual_any_dtype=*/true);
  const auto format = output_format(x);
  if (residual && residual->scalar_type() != x.scalar_type()) {
    // as `relu(F.conv2d(...) + residual)`: the add promotes (a float32 residual stream), so nothing is fused
    if (x.is_cuda()) warn_fallback(op, "a residual of another dtype than x's has no fused kernel", kReference);
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return at::relu(at::conv2d(x, weight, bias, g.stride, g.padding, g.dilation, 1) + *residual).contiguous(format);
  }
  if (const char* why = fallback_reason(x, weight, bias, residual)) {
    warn_fallback(op, why, kReference);
    return conv2d_bias_relu_reference(x, weight, bias, g.stride, g.padding, g.dilation, residual).contiguous(format);
  }
  if (!x.is_cuda()) {  // the CPU kernel writes NHWC too: an NCHW x's output is converted back
    return conv2d_bias_relu_fwd_op().call(x, weight, bias, g.stride, g.padding, g.dilation, residual).contiguous(format);
  }
  // The kernel reads and writes NHWC: converting here keeps the copies visible to autograd (their backward converts
  // back); an NCHW x gets its output back contiguous, as F.conv2d would return it (a second copy, named in the
  // warning).
  return conv2d_bias_relu_fwd_op()
      .call(to_channels_last(x, "x"), to_channels_last(weight, "weight"), bias, g.stride, g.padding, g.dilation,
            residual ? OptTensor(to_channels_last(*residual, "residual")) : std::nullopt)
      .contiguous(format);
}

Tensor conv2d_bias_relu_composite(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, const OptTensor& residual) {
  const char* op = "conv2d_bias_relu";
  const Geometry g = geometry(op, stride, padding, dilation);
  if (x.dim() == 3) {  // unbatched [C_in, H, W], as F.conv2d takes it: a batch of one
    const OptTensor r = residual && residual->dim() == 3 ? OptTensor(residual->unsqueeze(0)) : residual;
    return route(x.unsqueeze(0), weight, bias, g, r).squeeze(0);
  }
  return route(x, weight, bias, g, residual);
}

// Autocast: what autocast does to aten::conv2d, on its lower-precision list for CUDA and for CPU: cast x, weight and
// bias to the device's autocast dtype. The residual is left as it is, as the unfused form's add leaves it.
template <c10::DeviceType kDevice>
Tensor autocast(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, const OptTensor& residual) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>);
  const auto cast = [](const auto& t) { return autocast_lower<kDevice>(t); };
  return conv2d_bias_relu_composite(cast(x), cast(weight), cast(bias), stride, padding, dilation, residual);
}

// ------------------------------------------------------------------------------------------------
// Autograd
// ------------------------------------------------------------------------------------------------

// fusedkernels::act_backward (the gemm family's, reached through the dispatcher only: a build may leave that family
// out): dz = dy * act'(z) and the column sums of dz over [rows, C] tensors; its activation argument is a
// gemm::Activation value, 1 for relu (gemm.h, which no other family includes).
using ActBackward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t);
constexpr int64_t kActivationRelu = 1;

const c10::TypedOperatorHandle<ActBackward>& act_backward_op() {
  static const auto op = find_op<ActBackward>("fusedkernels::act_backward");
  return op;
}

// Whether the backward may form dz and dbias in one act_backward call: that op in this build, a first-order
// backward on plain tensors (a batched or traced backward, or create_graph, takes ATen's ops), dy and y
// channels_last of one dtype.
bool mask_and_bias_in_one_pass(const Tensor& dy, const Tensor& y) {
  static const bool available =
      c10::Dispatcher::singleton().findSchema({"fusedkernels::act_backward", ""}).has_value();
  return available && !at::GradMode::is_enabled() && plain_tensor(dy) && plain_tensor(y) && dy.dim() == 4 &&
         dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type() && dy.is_contiguous(kChannelsLast) &&
         y.is_contiguous(kChannelsLast);
}

// The backward of conv2d_bias_relu_fwd; next edges x, weight, bias, residual (absent ones have empty edges). The
// ReLU's mask comes from the saved output (out > 0 exactly where z > 0), as torch's relu backward reads it. The mask
// is locally constant, so under create_graph the result is still exact to any order: dz = dy * mask is linear in dy,
// and at::convolution_backward records its own derivatives in dz, x and weight.
struct Conv2dBiasReluBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x, weight, out;
  Geometry geometry;
  int64_t out_channels = 0;
  bool has_bias = false;

  std::string name() const override { return "fusedkernels::Conv2dBiasReluBackward"; }

  void release_variables() override {
    for (auto* v : {&x, &weight, &out}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list result(num_outputs());
    const Tensor& dy = grads[0];
    if (!dy.defined()) return result;
    const Tensor y = out.unpack(getptr()).detach();
    const bool want_x = task_should_compute_output(0), want_w = task_should_compute_output(1),
               want_b = has_bias && task_should_compute_output(2);
    Tensor dz, db;
    if (want_b && mask_and_bias_in_one_pass(dy, y)) {
      // [N, C, H, W] channels_last is [N·H·W, C] rows in memory: dz = dy * (y > 0) and its column sums at once
      // (one read of dy and y; convolution_backward would read dz again for the sum)
      const auto rows = [](const Tensor& t) {
        return t.permute({0, 2, 3, 1}).reshape({t.size(0) * t.size(2) * t.size(3), t.size(1)});
      };
      auto [dz_rows, db_rows] = act_backward_op().call(rows(dy), rows(y), kActivationRelu);
      dz = dz_rows.view({dy.size(0), dy.size(2), dy.size(3), dy.size(1)}).permute({0, 3, 1, 2});
      db = std::move(db_rows);
    } else {
      dz = at::threshold_backward(dy, y, 0);
    }
    const bool conv_b = want_b && !db.defined();
    if (want_x || want_w || conv_b) {
      const auto bias_sizes = conv_b ? at::OptionalIntArrayRef(at::IntArrayRef(&out_channels, 1)) : std::nullopt;
      auto [dx, dw, conv_db] = at::convolution_backward(
          dz, x.unpack(), weight.unpack(), bias_sizes, geometry.stride, geometry.padding, geometry.dilation,
          /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1, {want_x, want_w, conv_b});
      result[0] = std::move(dx);
      result[1] = std::move(dw);
      if (conv_b) db = std::move(conv_db);
    }
    result[2] = std::move(db);
    if (task_should_compute_output(3)) result[3] = dz;
    return result;
  }
};

Tensor conv2d_bias_relu_fwd_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     const OptTensor& residual) {
  const Geometry g = geometry("conv2d_bias_relu_fwd", stride, padding, dilation);
  const bool tangents =
      has_forward_grad(x) || has_forward_grad(weight) || has_forward_grad(bias) || has_forward_grad(residual);
  Tensor out = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv2d_bias_relu_fwd_op().call(x, weight, bias, stride, padding, dilation, residual);
  }();
  if (tangents) {
    // Tangents reach here where the public op could not see them (torch.func transforms nest forward-mode AD
    // inside other levels): the output from the differentiable reference.
    return conv2d_bias_relu_reference(x, weight, bias, g.stride, g.padding, g.dilation, residual)
        .contiguous(kChannelsLast);
  }
  if (needs_grad(x, weight, bias, residual)) {
    auto node = make_node<Conv2dBiasReluBackward>();
    auto& n = static_cast<Conv2dBiasReluBackward&>(*node);
    n.set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, residual));
    torch::autograd::set_history(out, node);
    n.x = torch::autograd::SavedVariable(x, false);
    n.weight = torch::autograd::SavedVariable(weight, false);
    n.out = torch::autograd::SavedVariable(out, /*is_output=*/true);
    n.geometry = g;
    n.out_channels = weight.size(0);
    n.has_bias = bias.has_value();
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// CPU and Meta kernels
// ------------------------------------------------------------------------------------------------

Tensor conv2d_bias_relu_fwd_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, const OptTensor& residual) {
  const Geometry g = geometry("conv2d_bias_relu_fwd", stride, padding, dilation);
  check_args("conv2d_bias_relu_fwd", x, weight, bias, g, residual);
  return conv2d_bias_relu_reference(x, weight, bias, g.stride, g.padding, g.dilation, residual)
      .contiguous(kChannelsLast);
}

// The output channels_last, as the CPU and CUDA kernels' (whatever x's layout).
Tensor conv2d_bias_relu_fwd_meta(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, const OptTensor& residual) {
  const Geometry g = geometry("conv2d_bias_relu_fwd", stride, padding, dilation);
  check_args("conv2d_bias_relu_fwd", x, weight, bias, g, residual);
  return at::empty_symint(out_shape(x, weight, g), x.options().memory_format(kChannelsLast));
}

const RegisterOpInfo conv2d_bias_relu_info{
    {"conv", "conv2d_bias_relu", "float16, bfloat16 (channels_last)",
     "cuDNN's fused convolution + bias (+ residual) + ReLU by default (faster today); FUSEDKERNELS_CONV_KERNEL=sm90: our "
     "implicit-GEMM kernel on sm_90 (channels multiples of 8, groups 1); else the reference (one warning)"}};

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CompositeImplicitAutograd, m) {
  m.impl("conv2d_bias_relu", &conv2d_bias_relu_composite);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCUDA, m) {
  m.impl("conv2d_bias_relu", &autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCPU, m) { m.impl("conv2d_bias_relu", &autocast<c10::DeviceType::CPU>); }

TORCH_LIBRARY_IMPL(fusedkernels, Autograd, m) { m.impl("conv2d_bias_relu_fwd", &conv2d_bias_relu_fwd_autograd); }

TORCH_LIBRARY_IMPL(fusedkernels, CPU, m) { m.impl("conv2d_bias_relu_fwd", &conv2d_bias_relu_fwd_cpu); }

TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) { m.impl("conv2d_bias_relu_fwd", &conv2d_bias_relu_fwd_meta); }

}  // namespace fusedkernels::conv
