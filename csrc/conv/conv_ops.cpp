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
//
//   fusedkernels::batch_norm_relu         CompositeImplicitAutograd: F.batch_norm's checks, route, call
//     -> fusedkernels::batch_norm_relu_fwd    Autograd: attaches BatchNormReluBackward; CUDA: the fused kernels
//                                             (conv_api.cpp); CPU: PyTorch's batch norm; Meta: shapes
//        backward: fusedkernels::batch_norm_relu_bwd (the mask y > 0 from the saved output), or under create_graph
//        PyTorch's differentiable batch-norm backward
//
//   out = relu(batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual)
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

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
  // Public op: F.batch_norm's arguments (input [N, C, ...], the rest [C]; running statistics updated in place in
  // training) and residual, input's shape, added before the ReLU.
  m.def("batch_norm_relu(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight=None,"
        " Tensor? bias=None, bool training=False, float momentum=0.1, float eps=1e-05, Tensor? residual=None)"
        " -> Tensor");
  // Internal: input 4-D, residual of its dtype. Returns (out channels_last, save_mean, save_invstd): the mean and
  // 1 / sqrt(var + eps) used (batch or running statistics), [C] in float32 (float64 for float64 input).
  m.def("batch_norm_relu_fwd(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight,"
        " Tensor? bias, bool training, float momentum, float eps, Tensor? residual) -> (Tensor, Tensor, Tensor)");
  // Internal: (d input, d weight, d bias, d residual) where output_mask says, the parameter gradients as sums in
  // save_mean's dtype (the caller casts them to the parameters').
  m.def("batch_norm_relu_bwd(Tensor grad_out, Tensor input, Tensor out, Tensor? weight, Tensor save_mean,"
        " Tensor save_invstd, bool training, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace fusedkernels::conv {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

// The output layout PyTorch picks (F.conv2d from x and weight, F.batch_norm from x alone): channels_last when either
// has channels_last strides (suggest_memory_format), contiguous otherwise. fusedkernels/ops/conv.py's _output_format
// mirrors it.
at::MemoryFormat output_format(const Tensor& x, const Tensor* weight = nullptr) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const bool channels_last = x.suggest_memory_format() == cl || (weight && weight->suggest_memory_format() == cl);
  return channels_last ? cl : at::MemoryFormat::Contiguous;
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
// residual_any_dtype (the public op adds one of another dtype after the convolution, with type promotion). unbatched:
// x is an unbatched input with the batch of one added, and the residual has the unbatched output's shape.
void check_args(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias, const Geometry& g,
                const OptTensor& residual, bool residual_any_dtype = false, bool unbatched = false) {
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
    auto sizes = out_shape(x, weight, g);
    if (unbatched) sizes.erase(sizes.begin());
    bool same = residual->dim() == static_cast<int64_t>(sizes.size());
    for (size_t d = 0; same && d < sizes.size(); ++d) same = sym_same(residual->sym_size(d), sizes[d]);
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
             const OptTensor& unbatched_residual, bool unbatched) {
  const char* op = "conv2d_bias_relu";
  check_args(op, x, weight, bias, g, unbatched_residual, /*residual_any_dtype=*/true, unbatched);
  const OptTensor residual =
      unbatched && unbatched_residual ? OptTensor(unbatched_residual->unsqueeze(0)) : unbatched_residual;
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    // torch.func transforms (vmap, grad, hessian ...) transform F.conv2d's ops; the layout conversions below they
    // cannot batch (a channels_last clone inside vmap)
    return conv2d_bias_relu_reference(x, weight, bias, g.stride, g.padding, g.dilation, residual);
  }
  const auto format = output_format(x, &weight);
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
    return route(x.unsqueeze(0), weight, bias, g, residual, /*unbatched=*/true).squeeze(0);
  }
  return route(x, weight, bias, g, residual, /*unbatched=*/false);
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

// ------------------------------------------------------------------------------------------------
// batch_norm_relu
// ------------------------------------------------------------------------------------------------

constexpr const char* kBnReference = "the PyTorch reference (F.batch_norm, + residual, relu)";

using BatchNormReluFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                            const OptTensor&, const OptTensor&, bool, double, double,
                                                            const OptTensor&);
using BatchNormReluBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                    const OptTensor&, const Tensor&, const Tensor&,
                                                                    bool, std::array<bool, 4>);

const c10::TypedOperatorHandle<BatchNormReluFwd>& batch_norm_relu_fwd_op() {
  static const auto op = find_op<BatchNormReluFwd>("fusedkernels::batch_norm_relu_fwd");
  return op;
}

const c10::TypedOperatorHandle<BatchNormReluBwd>& batch_norm_relu_bwd_op() {
  static const auto op = find_op<BatchNormReluBwd>("fusedkernels::batch_norm_relu_bwd");
  return op;
}

// The per-channel vector v [C] as [1, C, 1, ...] against input.
Tensor per_channel(const Tensor& v, const Tensor& input) {
  std::vector<int64_t> sizes(input.dim(), 1);
  sizes[1] = v.size(0);
  return v.view(sizes);
}

// The reference: relu(F.batch_norm(...) + residual), differentiable, in PyTorch ops (autocast as F.batch_norm's).
Tensor batch_norm_relu_reference(const Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& weight, const OptTensor& bias, bool training, double momentum,
                                 double eps, const OptTensor& residual) {
  Tensor z = at::batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                            at::globalContext().userEnabledCuDNN());
  if (residual) z = z + *residual;
  return at::relu(z);
}

// F.batch_norm's checks that PyTorch's C++ batch_norm does not make (the batch size in training, in F.batch_norm's
// words: ValueError), the sizes it does make (in its words, for the fused path), and the residual's.
void check_batch_norm_args(const char* op, const Tensor& input, const OptTensor& running_mean,
                           const OptTensor& running_var, const OptTensor& weight, const OptTensor& bias, bool training,
                           double eps, const OptTensor& residual) {
  TORCH_CHECK(input.dim() >= 2, op, ": input must have at least 2 dimensions [N, C, ...], got ", shape(input));
  if (training) {
    c10::SymInt values = input.sym_size(0);
    for (int64_t d = 2; d < input.dim(); ++d) values = values * input.sym_size(d);
    std::string size = "torch.Size(" + shape(input) + ")";
    TORCH_CHECK_VALUE(values.sym_ne(1).guard_bool(__FILE__, __LINE__),
                      "Expected more than 1 value per channel when training, got input size ", size);
  }
  // F.batch_norm's of the torch built against, after its batch-size check: a zero eps divides by a zero batch
  // variance, a negative one takes its root (NaN passes, as there); before 2.12 a zero eps was refused in eval too
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 12
  TORCH_CHECK_VALUE(!(eps <= 0), "batch_norm eps must be positive, but got ", py_repr(eps));
#else
  TORCH_CHECK_VALUE(!(training && eps <= 0), "batch_norm eps must be positive during training, but got ", py_repr(eps));
  TORCH_CHECK_VALUE(!(eps < 0), "batch_norm eps must be non-negative, but got ", py_repr(eps));
#endif
  const c10::SymInt channels = input.sym_size(1);
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias},
                                std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    if (!*t) continue;
    TORCH_CHECK(sym_same((*t)->sym_numel(), channels), name, " should contain ", sym_str(channels), " elements not ",
                sym_str((*t)->sym_numel()));
    TORCH_CHECK((*t)->device() == input.device(), op, ": ", name, " is on ", (*t)->device().str(), " but input is on ",
                input.device().str());
  }
  if (residual) {
    bool same = residual->dim() == input.dim();
    for (int64_t d = 0; same && d < input.dim(); ++d) same = sym_same(residual->sym_size(d), input.sym_size(d));
    TORCH_CHECK(same, op, ": residual must have input's shape ", shape(input), " (no broadcasting), got ",
                shape(*residual));
    TORCH_CHECK(residual->device() == input.device(), op, ": residual is on ", residual->device().str(),
                " but input is on ", input.device().str());
  }
}

// Why a call runs the reference instead of batch_norm_relu_fwd, or nullptr; "" for a silent reason. CPU 4-D input
// takes the op (whose CPU kernel is PyTorch's batch norm), so the C++ autograd runs there too.
const char* batch_norm_fallback_reason(const Tensor& input, const OptTensor& running_mean,
                                       const OptTensor& running_var, const OptTensor& weight, const OptTensor& bias,
                                       bool training, const OptTensor& residual) {
  const bool tangents = has_forward_grad(input) || has_forward_grad(weight) || has_forward_grad(bias) ||
                        has_forward_grad(residual);
  const bool cuda = input.is_cuda();
  if (!cuda && !input.is_cpu()) return "";
  if (tangents) return cuda ? "forward-mode AD (an input with a tangent) has no fused kernel" : "";
  // what PyTorch raises on, or computes otherwise, is its own to do (no running statistics in eval, one of the two)
  if (running_mean.has_value() != running_var.has_value() || (!training && !running_mean)) return "";
  if (input.sym_numel().sym_eq(0).guard_bool(__FILE__, __LINE__)) return "";
  if (!at::isFloatingType(input.scalar_type())) return "";
  if (input.dim() != 4) return cuda ? "input that is not 4-D [N, C, H, W] has no fused kernel" : "";
  if (!cuda) return nullptr;
  if (!has_kernel_dtype(input.scalar_type())) return "float64 input has no fused kernel (float32, float16, bfloat16)";
  for (const OptTensor* t : {&weight, &bias, &running_mean, &running_var}) {
    if (*t && (*t)->scalar_type() != at::kFloat && (*t)->scalar_type() != input.scalar_type()) {
      return "weight, bias and running statistics other than float32 or input's dtype have no fused kernel";
    }
  }
  if (!input.is_contiguous(kChannelsLast)) {
    return "input not channels_last (NHWC) has no fused kernel (model.to(memory_format=torch.channels_last))";
  }
  return nullptr;
}

Tensor batch_norm_relu_composite(const Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& weight, const OptTensor& bias, bool training, double momentum,
                                 double eps, const OptTensor& residual) {
  const char* op = "batch_norm_relu";
  check_batch_norm_args(op, input, running_mean, running_var, weight, bias, training, eps, residual);
  if (residual && residual->scalar_type() != input.scalar_type()) {
    // as `relu(F.batch_norm(...) + residual)`: the add promotes, so nothing is fused
    if (input.is_cuda()) warn_fallback(op, "a residual of another dtype than input's has no fused kernel", kBnReference);
    return batch_norm_relu_reference(input, running_mean, running_var, weight, bias, training, momentum, eps, residual);
  }
  if (const char* why = batch_norm_fallback_reason(input, running_mean, running_var, weight, bias, training, residual)) {
    warn_fallback(op, why, kBnReference);
    return batch_norm_relu_reference(input, running_mean, running_var, weight, bias, training, momentum, eps, residual);
  }
  // the kernels read the residual in input's layout: a copy otherwise (autograd converts its gradient back)
  const OptTensor r = residual && input.is_cuda() && !residual->is_contiguous(kChannelsLast)
                          ? OptTensor(residual->contiguous(kChannelsLast))
                          : residual;
  const Tensor out =
      std::get<0>(batch_norm_relu_fwd_op().call(input, running_mean, running_var, weight, bias, training, momentum, eps, r));
  return out.contiguous(output_format(input));
}

// The gradients in PyTorch ops, from the masked output gradient g: the CPU kernel of batch_norm_relu_bwd, and the
// create_graph path in eval (mean and invstd are then constants, so the result is exact to any order). Returns
// (dx, Σ g·xhat, Σ g) as the mask asks; the sums in save_mean's dtype.
std::tuple<Tensor, Tensor, Tensor> batch_norm_grads_reference(const Tensor& g, const Tensor& input,
                                                              const OptTensor& weight, const Tensor& save_mean,
                                                              const Tensor& save_invstd, bool training,
                                                              std::array<bool, 3> mask) {
  const auto acc = save_mean.scalar_type();
  const std::vector<int64_t> dims = [&] {
    std::vector<int64_t> d{0};
    for (int64_t i = 2; i < input.dim(); ++i) d.push_back(i);
    return d;
  }();
  const Tensor gf = g.to(acc);
  const Tensor xhat = (input.to(acc) - per_channel(save_mean, input)) * per_channel(save_invstd, input);
  const bool sums = mask[1] || mask[2] || (training && mask[0]);
  const Tensor sum_g = sums ? gf.sum(dims) : Tensor();
  const Tensor sum_gx = sums ? (gf * xhat).sum(dims) : Tensor();
  Tensor dx;
  if (mask[0]) {
    const Tensor a = weight ? save_invstd * weight->to(acc) : save_invstd;
    Tensor inner = gf;
    if (training) {
      const double n = static_cast<double>(input.numel() / input.size(1));
      inner = gf - per_channel(sum_g / n, input) - xhat * per_channel(sum_gx / n, input);
    }
    dx = (per_channel(a, input) * inner).to(input.scalar_type());
  }
  return {dx, mask[1] ? sum_gx : Tensor(), mask[2] ? sum_g : Tensor()};
}

// The backward of batch_norm_relu_fwd; next edges input, weight, bias, residual (absent ones have empty edges). The
// ReLU's mask comes from the saved output (out > 0 exactly where the pre-activation is), as torch's relu backward
// reads it; it is locally constant, so under create_graph the gradient is PyTorch's batch-norm backward of the
// masked gradient (native_batch_norm_backward in training, whose own derivative holds the statistics' dependence on
// input), exact to any order.
struct BatchNormReluBackward : torch::autograd::Node {
  torch::autograd::SavedVariable input, weight, out, save_mean, save_invstd;
  bool training = true, has_weight = false, has_bias = false, has_residual = false;
  double eps = 1e-5;
  at::ScalarType weight_dtype = at::kFloat, bias_dtype = at::kFloat;

  std::string name() const override { return "fusedkernels::BatchNormReluBackward"; }

  void release_variables() override {
    for (auto* v : {&input, &weight, &out, &save_mean, &save_invstd}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list result(num_outputs());
    const Tensor& dy = grads[0];
    if (!dy.defined()) return result;
    const std::array<bool, 4> mask{task_should_compute_output(0), has_weight && task_should_compute_output(1),
                                   has_bias && task_should_compute_output(2),
                                   has_residual && task_should_compute_output(3)};
    const Tensor x = input.unpack(), w = weight.unpack(), y = out.unpack(getptr()).detach();
    const Tensor mean = save_mean.unpack(), invstd = save_invstd.unpack();
    Tensor dx, dw, db, dr;
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable ATen ops
      const Tensor g = at::threshold_backward(dy, y, 0);
      if (training) {
        std::tie(dx, dw, db) = at::native_batch_norm_backward(g, x, optional_of(w), std::nullopt, std::nullopt, mean,
                                                              invstd, true, eps, {mask[0], mask[1], mask[2]});
      } else {
        std::tie(dx, dw, db) =
            batch_norm_grads_reference(g, x, optional_of(w), mean, invstd, false, {mask[0], mask[1], mask[2]});
      }
      if (mask[3]) dr = g;
    } else {
      std::tie(dx, dw, db, dr) = batch_norm_relu_bwd_op().call(dy, x, y, optional_of(w), mean, invstd, training, mask);
    }
    result[0] = std::move(dx);
    if (mask[1]) result[1] = dw.to(weight_dtype);
    if (mask[2]) result[2] = db.to(bias_dtype);
    result[3] = std::move(dr);
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_relu_fwd_autograd(const Tensor& input, const OptTensor& running_mean,
                                                                const OptTensor& running_var, const OptTensor& weight,
                                                                const OptTensor& bias, bool training, double momentum,
                                                                double eps, const OptTensor& residual) {
  // As F.batch_norm: with grad mode on, the running statistics take no gradient (their in-place update leaves their
  // version alone, as PyTorch's does: a graph that saved them still backpropagates)
  for (const auto& [name, t] : {std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    TORCH_CHECK(!*t || !(*t)->requires_grad() || !at::GradMode::is_enabled(), "The function 'batch_norm_relu' is not "
                "differentiable with respect to argument '", name, "'. This input cannot have requires_grad True.");
  }
  auto outputs = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_norm_relu_fwd_op().call(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                         residual);
  }();
  if (has_forward_grad(input) || has_forward_grad(weight) || has_forward_grad(bias) || has_forward_grad(residual)) {
    // tangents the public op could not see (torch.func nests forward-mode AD inside other levels): the output from
    // the differentiable reference (training's running statistics were updated above)
    std::get<0>(outputs) = batch_norm_relu_reference(input, training ? OptTensor() : running_mean,
                                                     training ? OptTensor() : running_var, weight, bias, training,
                                                     momentum, eps, residual)
                               .contiguous(kChannelsLast);
    return outputs;
  }
  if (at::GradMode::is_enabled() &&
      (requires_grad(input) || requires_grad(weight) || requires_grad(bias) || requires_grad(residual))) {
    auto node = make_node<BatchNormReluBackward>();
    auto& n = static_cast<BatchNormReluBackward&>(*node);
    n.set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, residual));
    Tensor& out = std::get<0>(outputs);
    torch::autograd::set_history(out, node);
    n.input = torch::autograd::SavedVariable(input, false);
    if (weight) n.weight = torch::autograd::SavedVariable(*weight, false);
    n.out = torch::autograd::SavedVariable(out, /*is_output=*/true);
    n.save_mean = torch::autograd::SavedVariable(std::get<1>(outputs), false);
    n.save_invstd = torch::autograd::SavedVariable(std::get<2>(outputs), false);
    n.training = training;
    n.eps = eps;
    n.has_weight = weight.has_value();
    n.has_bias = bias.has_value();
    n.has_residual = residual.has_value();
    if (weight) n.weight_dtype = weight->scalar_type();
    if (bias) n.bias_dtype = bias->scalar_type();
  }
  return outputs;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_relu_fwd_meta(const Tensor& input, const OptTensor& running_mean,
                                                            const OptTensor& running_var, const OptTensor& weight,
                                                            const OptTensor& bias, bool training, double momentum,
                                                            double eps, const OptTensor& residual) {
  check_batch_norm_args("batch_norm_relu_fwd", input, running_mean, running_var, weight, bias, training, eps,
                        residual);
  const auto stats = input.options().dtype(opmath_dtype(input.scalar_type()));
  return {at::empty_symint(input.sym_sizes(), input.options().memory_format(kChannelsLast)),
          at::empty_symint({input.sym_size(1)}, stats), at::empty_symint({input.sym_size(1)}, stats)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_relu_bwd_meta(const Tensor& grad_out, const Tensor& input,
                                                                    const Tensor& out, const OptTensor& weight,
                                                                    const Tensor& save_mean, const Tensor& save_invstd,
                                                                    bool training, std::array<bool, 4> mask) {
  const auto like_input = input.options().memory_format(kChannelsLast);
  const auto stats = save_mean.options();
  return {mask[0] ? at::empty_symint(input.sym_sizes(), like_input) : Tensor(),
          mask[1] ? at::empty_symint({input.sym_size(1)}, stats) : Tensor(),
          mask[2] ? at::empty_symint({input.sym_size(1)}, stats) : Tensor(),
          mask[3] ? at::empty_symint(input.sym_sizes(), like_input) : Tensor()};
}

const RegisterOpInfo batch_norm_relu_info{
    {"conv", "batch_norm_relu", "float32, float16, bfloat16 (channels_last); weight, bias, running stats float32 or input's",
     "4-D input, any N, H, W and channel count (16-byte accesses where channels and pointers allow); training and "
     "eval; else the reference (one warning)"}};

const RegisterOpInfo conv2d_bias_relu_info{
    {"conv", "conv2d_bias_relu", "float16, bfloat16 (channels_last)",
     "our implicit-GEMM kernel on sm_90 (channels multiples of 8, groups 1) for 1x1 stride-1 expansions (C_in <= 64, "
     "C_out >= 4 C_in), cuDNN's fused convolution + bias (+ residual) + ReLU for the rest, each the other's fallback "
     "(FUSEDKERNELS_CONV_KERNEL=sm90 / cudnn: one alone); else the reference (one warning)"}};

}  // namespace

// The internal op in PyTorch ops, its CPU kernel and conv_api.cpp's where the kernels do not take a call: PyTorch's
// batch norm (which updates the running statistics), then + residual and relu; eval's saved statistics from the
// running ones.
std::tuple<Tensor, Tensor, Tensor> batch_norm_relu_fwd_reference(const Tensor& input, const OptTensor& running_mean,
                                                           const OptTensor& running_var, const OptTensor& weight,
                                                           const OptTensor& bias, bool training, double momentum,
                                                           double eps, const OptTensor& residual) {
  const char* op = "batch_norm_relu_fwd";
  check_batch_norm_args(op, input, running_mean, running_var, weight, bias, training, eps, residual);
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D [N, C, H, W], got ", shape(input));
  TORCH_CHECK(training || (running_mean && running_var), op, ": eval mode needs running_mean and running_var");
  const auto acc = opmath_dtype(input.scalar_type());
  auto [z, mean, invstd] = at::native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps);
  if (!training) {
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true);
    invstd = (running_var->to(acc) + eps).rsqrt();
  }
  if (residual) z = z + *residual;
  return {at::relu(z).contiguous(kChannelsLast), mean.to(acc), invstd.to(acc)};
}

// The internal backward in PyTorch ops: its CPU kernel, and conv_api.cpp's where the kernels do not take a call.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_relu_bwd_reference(const Tensor& grad_out, const Tensor& input,
                                                                   const Tensor& out, const OptTensor& weight,
                                                                   const Tensor& save_mean, const Tensor& save_invstd,
                                                                   bool training, std::array<bool, 4> mask) {
  const Tensor g = at::threshold_backward(grad_out, out, 0);
  auto [dx, dw, db] =
      batch_norm_grads_reference(g, input, weight, save_mean, save_invstd, training, {mask[0], mask[1], mask[2]});
  return {mask[0] ? dx.contiguous(kChannelsLast) : Tensor(), dw, db, mask[3] ? g.contiguous(kChannelsLast) : Tensor()};
}

TORCH_LIBRARY_IMPL(fusedkernels, CompositeImplicitAutograd, m) {
  m.impl("conv2d_bias_relu", &conv2d_bias_relu_composite);
  m.impl("batch_norm_relu", &batch_norm_relu_composite);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCUDA, m) {
  m.impl("conv2d_bias_relu", &autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCPU, m) { m.impl("conv2d_bias_relu", &autocast<c10::DeviceType::CPU>); }

TORCH_LIBRARY_IMPL(fusedkernels, Autograd, m) {
  m.impl("conv2d_bias_relu_fwd", &conv2d_bias_relu_fwd_autograd);
  m.impl("batch_norm_relu_fwd", &batch_norm_relu_fwd_autograd);
}

TORCH_LIBRARY_IMPL(fusedkernels, CPU, m) {
  m.impl("conv2d_bias_relu_fwd", &conv2d_bias_relu_fwd_cpu);
  m.impl("batch_norm_relu_fwd", &batch_norm_relu_fwd_reference);
  m.impl("batch_norm_relu_bwd", &batch_norm_relu_bwd_reference);
}

TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) {
  m.impl("conv2d_bias_relu_fwd", &conv2d_bias_relu_fwd_meta);
  m.impl("batch_norm_relu_fwd", &batch_norm_relu_fwd_meta);
  m.impl("batch_norm_relu_bwd", &batch_norm_relu_bwd_meta);
}

}  // namespace fusedkernels::conv
