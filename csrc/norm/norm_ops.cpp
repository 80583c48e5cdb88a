// The norm family's op layer: schemas; the public ops layer_norm / rms_norm (argument checks, the choice
// between the fused kernel and PyTorch's own op, autocast); autograd of the internal fwd ops in C++; the
// CPU and meta kernels of the internal ops. Their CUDA kernels are in norm_api.cpp.
//
//   fusedkernels::layer_norm        CompositeImplicitAutograd: check, route, call layer_norm_fwd
//     -> fusedkernels::layer_norm_fwd   Autograd: attaches NormBackward; CUDA: the fused kernel;
//                                       CPU: at::native_layer_norm; Meta: shapes
//        backward -> fusedkernels::layer_norm_bwd  (or, under create_graph, differentiable ATen ops)
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cfloat>

#include "common/torch/autograd.h"
#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "norm/norm.h"

TORCH_LIBRARY_FRAGMENT(fusedkernels, m) {
  // Public ops: F.layer_norm / F.rms_norm's arguments and results.
  m.def("layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, Tensor? bias=None, float eps=1e-05)"
        " -> Tensor");
  m.def("rms_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, float? eps=None) -> Tensor");
  // Internal: x is [..., normalized_shape]; mean / rstd hold one value per row, shaped like x's leading
  // dimensions, in float32 (float64 for float64 x). output_mask: which of dx, dweight, dbias to compute;
  // a parameter grad not computed is an empty tensor.
  m.def("layer_norm_fwd(Tensor x, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd, bool[3] output_mask) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("rms_norm_fwd(Tensor x, SymInt[] normalized_shape, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, SymInt[] normalized_shape, Tensor? weight, Tensor rstd, bool[2] output_mask)"
        " -> (Tensor dx, Tensor dweight)");
}

namespace fusedkernels::norm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::variable_list;

using LayerNormFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, c10::SymIntArrayRef, const OptTensor&,
                                                        const OptTensor&, double);
using LayerNormBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymIntArrayRef,
                                                        const OptTensor&, const OptTensor&, const Tensor&,
                                                        const Tensor&, std::array<bool, 3>);
using RmsNormFwd = std::tuple<Tensor, Tensor>(const Tensor&, c10::SymIntArrayRef, const OptTensor&, double);
using RmsNormBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymIntArrayRef, const OptTensor&,
                                              const Tensor&, std::array<bool, 2>);

const c10::TypedOperatorHandle<LayerNormFwd>& layer_norm_fwd_op() {
  static const auto op = find_op<LayerNormFwd>("fusedkernels::layer_norm_fwd");
  return op;
}
const c10::TypedOperatorHandle<LayerNormBwd>& layer_norm_bwd_op() {
  static const auto op = find_op<LayerNormBwd>("fusedkernels::layer_norm_bwd");
  return op;
}
const c10::TypedOperatorHandle<RmsNormFwd>& rms_norm_fwd_op() {
  static const auto op = find_op<RmsNormFwd>("fusedkernels::rms_norm_fwd");
  return op;
}
const c10::TypedOperatorHandle<RmsNormBwd>& rms_norm_bwd_op() {
  static const auto op = find_op<RmsNormBwd>("fusedkernels::rms_norm_bwd");
  return op;
}

// ------------------------------------------------------------------------------------------------
// Public ops: checks and routing
// ------------------------------------------------------------------------------------------------

// Validates the arguments as F.layer_norm would, with messages that name them; returns the normalized size.
// Sizes are compared symbolically, so this also runs under torch.compile with dynamic shapes. dtypes the
// kernels lack are not errors here: fallback_reason sends them to PyTorch's op, which decides.
c10::SymInt check_args(const char* op, const Tensor& input, c10::SymIntArrayRef normalized_shape,
                       const OptTensor& weight, const OptTensor& bias) {
  // RuntimeError for what F.layer_norm refuses with one (except handlers written for torch keep working)
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating-point tensor (float32, float16 or bfloat16 for the fused kernel), got ",
              name_of(input.scalar_type()));
  const int64_t k = static_cast<int64_t>(normalized_shape.size()), axis = input.dim() - k;
  bool trailing = k >= 1 && axis >= 0;
  for (int64_t i = 0; trailing && i < k; ++i) {
    trailing = input.sym_size(axis + i).sym_eq(normalized_shape[i]).guard_bool(__FILE__, __LINE__);
  }
  TORCH_CHECK(trailing, op, ": normalized_shape ", shape(normalized_shape), " must be the trailing dimensions of input ",
              shape(input.sym_sizes()));
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const Tensor& p = t->value();
    bool same_shape = p.dim() == k;
    for (int64_t i = 0; same_shape && i < k; ++i) {
      same_shape = p.sym_size(i).sym_eq(normalized_shape[i]).guard_bool(__FILE__, __LINE__);
    }
    TORCH_CHECK(same_shape, op, ": ", name, " must have shape ", shape(normalized_shape), ", got ",
                shape(p.sym_sizes()));
    TORCH_CHECK(p.device() == input.device(), op, ": ", name, " is on ", p.device().str(), " but input is on ",
                input.device().str());
  }
  c10::SymInt hidden = 1;
  for (const c10::SymInt& size : normalized_shape) hidden *= size;
  return hidden;
}

bool kernel_param_dtypes(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  std::optional<at::ScalarType> dtype;
  for (const OptTensor* t : {&weight, &bias}) {
    if (!t->has_value()) continue;
    const auto d = (*t)->scalar_type();
    if ((d != input.scalar_type() && d != at::kFloat) || (dtype && *dtype != d)) return false;
    dtype = d;
  }
  return true;
}

// Why a call runs PyTorch's own op instead of ours, or nullptr. CPU tensors take our op, whose CPU kernel
// is PyTorch's; devices other than CUDA and CPU (meta, ...), forward-mode AD and empty rows take PyTorch's
// op silently (PyTorch's CPU kernel takes any dtype mix PyTorch does).
const char* fallback_reason(const Tensor& input, const c10::SymInt& hidden, const OptTensor& weight,
                            const OptTensor& bias) {
  if (input.is_nested() || has_forward_grad(input) || has_forward_grad(weight) || has_forward_grad(bias)) return "";
  if (hidden.sym_eq(0).guard_bool(__FILE__, __LINE__)) return "";
  if (!kernel_param_dtypes(input, weight, bias)) {
    return input.is_cuda() ? "this mix of input and parameter dtypes has no fused kernel" : "";
  }
  if (input.device().is_cpu()) return nullptr;
  if (!input.is_cuda()) return "";
  if (!has_kernel_dtype(input.scalar_type())) return "float64 input has no fused kernel";
  if (hidden.sym_gt(kMaxHidden).guard_bool(__FILE__, __LINE__)) {
    return "the normalized size is past the fused kernel's limit of 65536";
  }
  return nullptr;
}

// One warning per (op, reason): PyTorch's op of the same name runs instead.
void warn_fallback(const char* op, const char* reason) {
  fusedkernels::warn_fallback(op, reason, std::string("torch.nn.functional.") + op);
}

OptTensor contiguous(const OptTensor& t) { return t ? OptTensor(t->contiguous()) : std::nullopt; }

Tensor layer_norm_composite(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                            const OptTensor& bias, double eps) {
  const c10::SymInt hidden = check_args("layer_norm", input, normalized_shape, weight, bias);
  if (const char* why = fallback_reason(input, hidden, weight, bias)) {
    warn_fallback("layer_norm", why);
    return at::layer_norm_symint(input, normalized_shape, weight, bias, eps);
  }
  return std::get<0>(
      layer_norm_fwd_op().call(input.contiguous(), normalized_shape, contiguous(weight), contiguous(bias), eps));
}

// eps=None means the machine epsilon of the type the arithmetic happens in (float32 for 16-bit inputs), as
// torch.nn.functional.rms_norm.
double rms_eps(const Tensor& input, std::optional<double> eps) {
  if (eps) return *eps;
  return input.scalar_type() == at::kDouble ? DBL_EPSILON : FLT_EPSILON;
}

Tensor rms_norm_composite(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                          std::optional<double> eps) {
  const c10::SymInt hidden = check_args("rms_norm", input, normalized_shape, weight, std::nullopt);
  if (const char* why = fallback_reason(input, hidden, weight, std::nullopt)) {
    warn_fallback("rms_norm", why);
    return at::rms_norm_symint(input, normalized_shape, weight, eps);
  }
  return std::get<0>(rms_norm_fwd_op().call(input.contiguous(), normalized_shape, contiguous(weight),
                                            rms_eps(input, eps)));
}

// Autocast: do what CUDA autocast does to the torch op this one replaces. layer_norm is on its float32 list
// (runs, and returns, float32); rms_norm joined that list after torch 2.11, whose autocast leaves it alone.
// So ask the installed torch. (CPU autocast leaves both alone, as here.)
bool torch_autocasts(const char* torch_op) {
  const auto handle = c10::Dispatcher::singleton().findSchema({torch_op, ""});
  return handle && handle->hasKernelForDispatchKey(c10::DispatchKey::AutocastCUDA);
}

OptTensor to_fp32(const OptTensor& t) { return at::autocast::cached_cast(at::kFloat, t, c10::DeviceType::CUDA); }

Tensor layer_norm_autocast(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                           const OptTensor& bias, double eps) {
  static const bool cast = torch_autocasts("aten::layer_norm");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  if (!cast) return layer_norm_composite(input, normalized_shape, weight, bias, eps);
  return layer_norm_composite(*to_fp32(input), normalized_shape, to_fp32(weight), to_fp32(bias), eps);
}

Tensor rms_norm_autocast(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                         std::optional<double> eps) {
  static const bool cast = torch_autocasts("aten::rms_norm");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  if (!cast) return rms_norm_composite(input, normalized_shape, weight, eps);
  return rms_norm_composite(*to_fp32(input), normalized_shape, to_fp32(weight), eps);
}

// ------------------------------------------------------------------------------------------------
// Autograd
// ------------------------------------------------------------------------------------------------

// dx, dweight, dbias of LayerNorm (rms = false) or RMSNorm computed with differentiable ATen ops from x
// itself (statistics recomputed, fp32 or fp64 arithmetic): what the backward runs when it is itself being
// recorded (create_graph=True), so second and higher derivatives are exact rather than missing.
std::array<Tensor, 3> norm_backward_differentiable(const Tensor& dy, const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                   const Tensor& weight, const Tensor& bias, double eps, bool rms,
                                                   std::array<bool, 3> want) {
  const auto acc = opmath_dtype(x.scalar_type());
  const int64_t axis = x.dim() - static_cast<int64_t>(normalized_shape.size());
  std::vector<int64_t> norm_dims, row_dims;
  for (int64_t d = 0; d < x.dim(); ++d) (d < axis ? row_dims : norm_dims).push_back(d);
  // A sum over no dimensions sums over all of them in ATen: with no row dimensions there is nothing to add.
  const auto sum_rows = [&](const Tensor& t) { return row_dims.empty() ? t : t.sum(row_dims); };

  const Tensor xf = x.to(acc), dyf = dy.to(acc);
  const Tensor xc = rms ? xf : xf - xf.mean(norm_dims, /*keepdim=*/true);
  const Tensor rstd = (xc.square().mean(norm_dims, /*keepdim=*/true) + eps).rsqrt();
  const Tensor xhat = xc * rstd;
  std::array<Tensor, 3> grads;
  if (want[0]) {
    const Tensor g = weight.defined() ? dyf * weight.to(acc) : dyf;
    Tensor inner = g - xhat * (g * xhat).mean(norm_dims, /*keepdim=*/true);
    if (!rms) inner = inner - g.mean(norm_dims, /*keepdim=*/true);
    grads[0] = (inner * rstd).to(x.scalar_type());
  }
  if (want[1] && weight.defined()) grads[1] = sum_rows(dyf * xhat).to(weight.scalar_type());
  if (want[2] && bias.defined()) grads[2] = sum_rows(dyf).to(bias.scalar_type());
  return grads;
}

// The backward of layer_norm_fwd (rms = false; next edges x, weight, bias) or rms_norm_fwd (x, weight); an
// absent weight or bias has an empty edge and gets no grad.
struct NormBackward : torch::autograd::Node {
  bool rms = false;
  torch::autograd::SavedVariable x, weight, bias, mean, rstd;
  std::vector<c10::SymInt> normalized_shape;
  double eps = 0;

  std::string name() const override { return rms ? "fusedkernels::RmsNormBackward" : "fusedkernels::LayerNormBackward"; }

  void release_variables() override {
    for (auto* v : {&x, &weight, &bias, &mean, &rstd}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const Tensor x_ = x.unpack(), w = weight.unpack(), b = bias.unpack();
    const std::array<bool, 3> want = {task_should_compute_output(0), w.defined() && task_should_compute_output(1),
                                      !rms && b.defined() && task_should_compute_output(2)};
    std::array<Tensor, 3> g;
    if (at::GradMode::is_enabled()) {  // create_graph: the backward is itself being differentiated
      g = norm_backward_differentiable(dy, x_, normalized_shape, w, b, eps, rms, want);
    } else if (rms) {
      auto [dx, dw] = rms_norm_bwd_op().call(dy.contiguous(), x_, normalized_shape, optional_of(w), rstd.unpack(),
                                             {want[0], want[1]});
      g = {dx, dw, Tensor()};
    } else {
      g = std::apply([](auto&&... t) { return std::array<Tensor, 3>{t...}; },
                     layer_norm_bwd_op().call(dy.contiguous(), x_, normalized_shape, optional_of(w), optional_of(b),
                                              mean.unpack(), rstd.unpack(), want));
    }
    for (size_t i = 0; i < out.size(); ++i) {
      if (want[i]) out[i] = g[i];
    }
    return out;
  }
};

bool needs_grad(const Tensor& x, const OptTensor& weight, const OptTensor& bias) {
  return at::GradMode::is_enabled() && (requires_grad(x) || requires_grad(weight) || requires_grad(bias));
}

// The outputs' grad_fn, when an input needs grad: the forward ran below autograd, the node saves what the
// backward reads.
void attach_backward(const Tensor& y, const Tensor& x, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                     const OptTensor& bias, const Tensor& mean, const Tensor& rstd, double eps, bool rms) {
  auto node = make_node<NormBackward>();
  auto& n = static_cast<NormBackward&>(*node);
  n.rms = rms;
  n.set_next_edges(rms ? torch::autograd::collect_next_edges(x, weight)
                       : torch::autograd::collect_next_edges(x, weight, bias));
  n.x = torch::autograd::SavedVariable(x, false);
  n.weight = torch::autograd::SavedVariable(weight, false);
  n.bias = torch::autograd::SavedVariable(bias, false);
  if (mean.defined()) n.mean = torch::autograd::SavedVariable(mean, false);
  n.rstd = torch::autograd::SavedVariable(rstd, false);
  n.normalized_shape = normalized_shape.vec();
  n.eps = eps;
  torch::autograd::set_history(y, node);
}

// Tangents reach the autograd kernel where the public op could not see them (torch.func transforms nest
// forward-mode AD inside other levels: hessian, jvp of grad). PyTorch's op has the forward-mode formulas,
// so y comes from it; the statistics (no tangent) from the fused op.
std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_ad(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                         const OptTensor& weight, const OptTensor& bias, double eps) {
  auto stats = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return layer_norm_fwd_op().call(x.detach(), normalized_shape, weight, bias, eps);
  }();
  return {at::layer_norm_symint(x, normalized_shape, weight, bias, eps), std::get<1>(stats), std::get<2>(stats)};
}

std::tuple<Tensor, Tensor> rms_norm_forward_ad(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                               const OptTensor& weight, double eps) {
  auto stats = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rms_norm_fwd_op().call(x.detach(), normalized_shape, weight, eps);
  }();
  return {at::rms_norm_symint(x, normalized_shape, weight, eps), std::get<1>(stats)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_autograd(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                           const OptTensor& weight, const OptTensor& bias, double eps) {
  if (has_forward_grad(x) || has_forward_grad(weight) || has_forward_grad(bias)) {
    return layer_norm_forward_ad(x, normalized_shape, weight, bias, eps);
  }
  const bool grad = needs_grad(x, weight, bias);
  auto out = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return layer_norm_fwd_op().call(x, normalized_shape, weight, bias, eps);
  }();
  if (grad) {
    attach_backward(std::get<0>(out), x, normalized_shape, weight, bias, std::get<1>(out), std::get<2>(out), eps,
                    /*rms=*/false);
  }
  return out;
}

std::tuple<Tensor, Tensor> rms_norm_fwd_autograd(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                 const OptTensor& weight, double eps) {
  if (has_forward_grad(x) || has_forward_grad(weight)) return rms_norm_forward_ad(x, normalized_shape, weight, eps);
  const bool grad = needs_grad(x, weight, std::nullopt);
  auto out = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rms_norm_fwd_op().call(x, normalized_shape, weight, eps);
  }();
  if (grad) {
    attach_backward(std::get<0>(out), x, normalized_shape, weight, std::nullopt, Tensor(), std::get<1>(out), eps,
                    /*rms=*/true);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// CPU kernels: PyTorch's own CPU LayerNorm, and RMSNorm in fp32 (fp64) ATen ops
// ------------------------------------------------------------------------------------------------

std::vector<int64_t> stats_shape(const Tensor& x, c10::SymIntArrayRef normalized_shape, bool keepdim) {  // CPU: concrete
  auto sizes = x.sizes().slice(0, x.dim() - normalized_shape.size()).vec();
  if (keepdim) sizes.resize(x.dim(), 1);
  return sizes;
}

Tensor empty_unless(bool want, const OptTensor& like, const Tensor& x) {
  return want && like ? at::empty_like(*like) : at::empty({0}, x.options());
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                      const OptTensor& weight, const OptTensor& bias, double eps) {
  auto [y, mean, rstd] = at::native_layer_norm_symint(x, normalized_shape, weight, bias, eps);
  const auto sizes = stats_shape(x, normalized_shape, false);
  const auto acc = opmath_dtype(x.scalar_type());
  return {y, mean.reshape(sizes).to(acc), rstd.reshape(sizes).to(acc)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy, const Tensor& x,
                                                      c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                                                      const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                                                      std::array<bool, 3> output_mask) {
  // at::native_layer_norm keeps the statistics in the parameters' type on the CPU: float32 when 16-bit input
  // comes with float32 parameters, else the input's type.
  const OptTensor& param = weight ? weight : bias;
  const auto stats_dtype = param && param->scalar_type() == at::kFloat ? at::kFloat : x.scalar_type();
  const auto sizes = stats_shape(x, normalized_shape, true);
  auto [dx, dw, db] = at::native_layer_norm_backward_symint(
      dy, x, normalized_shape, mean.reshape(sizes).to(stats_dtype), rstd.reshape(sizes).to(stats_dtype), weight, bias,
      {true, output_mask[1] && weight.has_value(), output_mask[2] && bias.has_value()});
  return {dx, dw.defined() ? dw : at::empty({0}, x.options()), db.defined() ? db : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor> rms_norm_fwd_cpu(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                            const OptTensor& weight, double eps) {
  std::vector<int64_t> norm_dims;
  for (int64_t d = x.dim() - normalized_shape.size(); d < x.dim(); ++d) norm_dims.push_back(d);
  const Tensor xf = x.to(opmath_dtype(x.scalar_type()));
  const Tensor rstd = (xf.square().mean(norm_dims, /*keepdim=*/true) + eps).rsqrt();
  Tensor y = xf * rstd;
  if (weight) y = y * *weight;
  return {y.to(x.scalar_type()), rstd.reshape(stats_shape(x, normalized_shape, false))};
}

std::tuple<Tensor, Tensor> rms_norm_bwd_cpu(const Tensor& dy, const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                            const OptTensor& weight, const Tensor& rstd,
                                            std::array<bool, 2> output_mask) {
  const auto acc = opmath_dtype(x.scalar_type());
  const int64_t axis = x.dim() - static_cast<int64_t>(normalized_shape.size());
  std::vector<int64_t> norm_dims, row_dims;
  for (int64_t d = 0; d < x.dim(); ++d) (d < axis ? row_dims : norm_dims).push_back(d);
  const Tensor dyf = dy.to(acc);
  const Tensor xhat = x.to(acc) * rstd.reshape(stats_shape(x, normalized_shape, true));
  const Tensor g = weight ? dyf * *weight : dyf;
  const Tensor dx = ((g - xhat * (g * xhat).mean(norm_dims, /*keepdim=*/true)) * rstd.reshape(
      stats_shape(x, normalized_shape, true))).to(x.scalar_type());
  Tensor dw = at::empty({0}, x.options());
  if (output_mask[1] && weight) {
    const Tensor prod = dyf * xhat;
    dw = (row_dims.empty() ? prod : prod.sum(row_dims)).to(weight->scalar_type());
  }
  return {dx, dw};
}

// ------------------------------------------------------------------------------------------------
// Meta kernels: shapes and dtypes only (fake tensors, torch.compile, torch.export)
// ------------------------------------------------------------------------------------------------

Tensor stats_meta(const Tensor& x, c10::SymIntArrayRef normalized_shape) {
  return at::empty_symint(x.sym_sizes().slice(0, x.dim() - normalized_shape.size()),
                          x.options().dtype(opmath_dtype(x.scalar_type())));
}

// Outputs are contiguous, as the CPU and CUDA kernels' (whatever x's layout).
Tensor like_meta(const Tensor& x) { return at::empty_symint(x.sym_sizes(), x.options()); }

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_meta(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                       const OptTensor&, const OptTensor&, double) {
  return {like_meta(x), stats_meta(x, normalized_shape), stats_meta(x, normalized_shape)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_meta(const Tensor&, const Tensor& x, c10::SymIntArrayRef,
                                                       const OptTensor& weight, const OptTensor& bias, const Tensor&,
                                                       const Tensor&, std::array<bool, 3> output_mask) {
  return {like_meta(x), empty_unless(output_mask[1], weight, x), empty_unless(output_mask[2], bias, x)};
}

std::tuple<Tensor, Tensor> rms_norm_fwd_meta(const Tensor& x, c10::SymIntArrayRef normalized_shape, const OptTensor&,
                                             double) {
  return {like_meta(x), stats_meta(x, normalized_shape)};
}

std::tuple<Tensor, Tensor> rms_norm_bwd_meta(const Tensor&, const Tensor& x, c10::SymIntArrayRef, const OptTensor& weight,
                                             const Tensor&, std::array<bool, 2> output_mask) {
  return {like_meta(x), empty_unless(output_mask[1], weight, x)};
}

const RegisterOpInfo layer_norm_info{
    {"norm", "layer_norm", "float32, float16, bfloat16 input; weight and bias in the input's dtype or float32",
     "normalized size 1.." + std::to_string(kMaxHidden) + "; fastest when its rows are a multiple of 16 bytes"}};
const RegisterOpInfo rms_norm_info{
    {"norm", "rms_norm", "float32, float16, bfloat16 input; weight in the input's dtype or float32",
     "normalized size 1.." + std::to_string(kMaxHidden) + "; fastest when its rows are a multiple of 16 bytes"}};

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CompositeImplicitAutograd, m) {
  m.impl("layer_norm", &layer_norm_composite);
  m.impl("rms_norm", &rms_norm_composite);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCUDA, m) {
  m.impl("layer_norm", &layer_norm_autocast);
  m.impl("rms_norm", &rms_norm_autocast);
}

TORCH_LIBRARY_IMPL(fusedkernels, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &rms_norm_fwd_autograd);
  // Differentiating the backward ops themselves is an error (the public ops' backward handles create_graph).
  m.impl("layer_norm_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("rms_norm_bwd", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(fusedkernels, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_meta);
  m.impl("layer_norm_bwd", &layer_norm_bwd_meta);
  m.impl("rms_norm_fwd", &rms_norm_fwd_meta);
  m.impl("rms_norm_bwd", &rms_norm_bwd_meta);
}

}  // namespace fusedkernels::norm
