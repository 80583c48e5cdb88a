// The norm family's op layer: schemas; the public ops layer_norm / rms_norm (argument checks, the choice
// between the fused kernel and PyTorch's own op, autocast); autograd of the internal fwd ops in C++; the
// CPU and meta kernels of the internal ops. Their CUDA kernels are in norm_api.cpp.
//
//   fusedkernels::layer_norm        CompositeImplicitAutograd: check, route, call layer_norm_fwd
//     -> fusedkernels::layer_norm_fwd   Autograd: attaches NormBackward; CUDA: the fused kernel;
//                                       CPU: at::native_layer_norm; Meta: shapes
//        backward -> fusedkernels::layer_norm_bwd  (or, under create_graph, differentiable ATen ops)
//
//   fusedkernels::add_layer_norm, add_rms_norm, bias_dropout_add_{layer,rms}_norm   the same, through
//     -> fusedkernels::add_norm_fwd  (AddNormBackward -> fusedkernels::add_norm_bwd)
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cfloat>
#include <numeric>

#include "common/torch/autograd.h"
#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "common/torch/philox.h"
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
  // Add + norm over the last dimension: h = residual + dropout(x + bias) in fp32, rounded to residual_dtype
  // (None: x's), returned with norm(h) as (out, residual_out). p: the dropout probability (used when training).
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? weight=None, Tensor? bias=None, float eps=1e-05,"
        " ScalarType? residual_dtype=None) -> (Tensor, Tensor)");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor? weight=None, float? eps=None,"
        " ScalarType? residual_dtype=None) -> (Tensor, Tensor)");
  m.def("bias_dropout_add_layer_norm(Tensor x, Tensor? bias, Tensor residual, Tensor? weight, Tensor? norm_bias,"
        " float p, float eps=1e-05, bool training=True, ScalarType? residual_dtype=None) -> (Tensor, Tensor)");
  m.def("bias_dropout_add_rms_norm(Tensor x, Tensor? bias, Tensor residual, Tensor? weight, float p, float? eps=None,"
        " bool training=True, ScalarType? residual_dtype=None) -> (Tensor, Tensor)");
  // Internal. residual already in residual_dtype; mean (LayerNorm; RMSNorm: empty) and rstd as layer_norm_fwd's;
  // rng_state: int64 [2], the seed and offset (CPU: the seed) the mask came from, when p > 0, else [0].
  m.def("add_norm_fwd(Tensor x, Tensor residual, Tensor? bias, Tensor? weight, Tensor? norm_bias, float eps, float p,"
        " ScalarType residual_dtype, bool rms) -> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd,"
        " Tensor rng_state)",
        {at::Tag::nondeterministic_seeded});
  // From the forward's residual_out (h) and results, with the grads of out (dy) and residual_out (either may be
  // None). output_mask: dx, dresidual, dbias, dweight, dnorm_bias; a result not computed is an empty tensor
  // (dx is computed for dbias too; the parameter grads need dy).
  m.def("add_norm_bwd(Tensor? dy, Tensor? dresidual_out, Tensor residual_out, Tensor? weight, Tensor? norm_bias,"
        " Tensor mean, Tensor rstd, Tensor rng_state, float eps, float p, ScalarType x_dtype, bool rms,"
        " bool[5] output_mask) -> (Tensor dx, Tensor dresidual, Tensor dbias, Tensor dweight, Tensor dnorm_bias)");
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
  TORCH_CHECK(k >= 1, op, ": normalized_shape must be at least 1-dimensional, got []");
  bool trailing = axis >= 0;
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
// recorded (create_graph=True), so second and higher derivatives are exact rather than missing. dx in
// dx_dtype (x's, or the arithmetic's to add more to it before rounding).
std::array<Tensor, 3> norm_backward_differentiable(const Tensor& dy, const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                   const Tensor& weight, const Tensor& bias, double eps, bool rms,
                                                   std::array<bool, 3> want, at::ScalarType dx_dtype) {
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
    grads[0] = (inner * rstd).to(dx_dtype);
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
      g = norm_backward_differentiable(dy, x_, normalized_shape, w, b, eps, rms, want, x_.scalar_type());
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

// ATen's CPU LayerNorm kernels, on float32 copies of 16-bit tensors: the statistics and dx in float32 and each
// result rounded once, as the CUDA kernels (ATen's 16-bit path keeps the statistics in 16 bits beside 16-bit
// parameters).
OptTensor to_dtype(const OptTensor& t, at::ScalarType dtype) { return t ? OptTensor(t->to(dtype)) : std::nullopt; }

// dweight / dbias of a LayerNorm over the last norm_dims dimensions, from float32 (float64) dy and x and the
// statistics shaped to broadcast: x centred before it is scaled, as the CUDA kernels do. ATen's CPU kernel forms
// x * rstd - mean * rstd, rounded at |x| * rstd rather than |x - mean| * rstd (a one-element row's dweight misses
// 0 by ~2e-5), and its 16-bit path sums in 16 bits (a relative error near 1 for dbias over 262144 rows of bf16).
std::pair<Tensor, Tensor> layer_norm_param_grads(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                 const Tensor& rstd, int64_t norm_dims, bool want_dw, bool want_db) {
  std::vector<int64_t> rows(x.dim() - norm_dims);
  std::iota(rows.begin(), rows.end(), 0);
  const auto sum_rows = [&](const Tensor& t) { return rows.empty() ? t : t.sum(rows); };
  return {want_dw ? sum_rows(dy * ((x - mean) * rstd)) : Tensor(), want_db ? sum_rows(dy) : Tensor()};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                      const OptTensor& weight, const OptTensor& bias, double eps) {
  const auto acc = opmath_dtype(x.scalar_type());
  auto [y, mean, rstd] = at::native_layer_norm_symint(x.to(acc), normalized_shape, to_dtype(weight, acc),
                                                      to_dtype(bias, acc), eps);
  const auto sizes = stats_shape(x, normalized_shape, false);
  return {y.to(x.scalar_type()), mean.reshape(sizes), rstd.reshape(sizes)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy, const Tensor& x,
                                                      c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                                                      const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                                                      std::array<bool, 3> output_mask) {
  const auto acc = opmath_dtype(x.scalar_type());
  const auto sizes = stats_shape(x, normalized_shape, true);
  const Tensor dyf = dy.to(acc), xf = x.to(acc), m = mean.reshape(sizes).to(acc), r = rstd.reshape(sizes).to(acc);
  const Tensor dx = std::get<0>(at::native_layer_norm_backward_symint(dyf, xf, normalized_shape, m, r,
                                                                      to_dtype(weight, acc), to_dtype(bias, acc),
                                                                      {true, false, false}));
  const auto [dw, db] = layer_norm_param_grads(dyf, xf, m, r, int64_t(normalized_shape.size()),
                                               output_mask[1] && weight, output_mask[2] && bias);
  return {dx.to(x.scalar_type()), dw.defined() ? dw.to(weight->scalar_type()) : at::empty({0}, x.options()),
          db.defined() ? db.to(bias->scalar_type()) : at::empty({0}, x.options())};
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

// ------------------------------------------------------------------------------------------------
// Add + norm: h = residual + dropout(x + bias), rounded to residual_dtype; out = norm(h)
// ------------------------------------------------------------------------------------------------

using AddNormFwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                      const OptTensor&, const OptTensor&, double,
                                                                      double, at::ScalarType, bool);
using AddNormBwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
    const Tensor&, const Tensor&, double, double, at::ScalarType, bool, std::array<bool, 5>);

const c10::TypedOperatorHandle<AddNormFwd>& add_norm_fwd_op() {
  static const auto op = find_op<AddNormFwd>("fusedkernels::add_norm_fwd");
  return op;
}
const c10::TypedOperatorHandle<AddNormBwd>& add_norm_bwd_op() {
  static const auto op = find_op<AddNormBwd>("fusedkernels::add_norm_bwd");
  return op;
}

// What to pass instead of a residual that residual_dtype would round: a stream dtype the op takes (x's or float32)
// that holds the residual exactly, else a residual of the stream's dtype.
std::string residual_stream_advice(at::ScalarType x_dtype, at::ScalarType residual_dtype, at::ScalarType stream) {
  for (const at::ScalarType t : {at::kFloat, x_dtype}) {
    if (t != stream && at::promote_types(residual_dtype, t) == t) {
      return std::string("pass residual_dtype=torch.") + name_of(t) + ", or a " + name_of(stream) + " residual";
    }
  }
  return std::string("pass a ") + name_of(stream) + " residual";
}

// Validates the public ops' arguments, with messages that name them (RuntimeError, as torch's own ops raise
// for such inputs); returns the residual dtype. Parameter dtypes the kernels lack are not errors here: they
// run the reference.
at::ScalarType check_add_args(const char* op, const Tensor& x, const OptTensor& bias, const Tensor& residual,
                              const OptTensor& weight, const OptTensor& norm_bias, double p,
                              std::optional<at::ScalarType> residual_dtype) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating-point tensor (float32, float16 or bfloat16 for the fused kernel), got ",
              name_of(x.scalar_type()));
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (the normalized one)");
  TORCH_CHECK(at::isFloatingType(residual.scalar_type()), op, ": residual must be a floating-point tensor, got ",
              name_of(residual.scalar_type()));
  // The stream's dtype: residual_dtype, else that of x + residual as torch promotes it (a float32 stream beside a
  // 16-bit x stays float32).
  const at::ScalarType rdt = residual_dtype.value_or(at::promote_types(x.scalar_type(), residual.scalar_type()));
  TORCH_CHECK(rdt == x.scalar_type() || rdt == at::kFloat, op,
              ": the residual stream's dtype (residual_dtype, else x + residual's) must be x's dtype (",
              name_of(x.scalar_type()), ")", x.scalar_type() == at::kFloat ? "" : " or float32", ", got ", name_of(rdt));
  bool same = residual.dim() == x.dim();
  for (int64_t d = 0; same && d < x.dim(); ++d) same = sym_same(residual.sym_size(d), x.sym_size(d));
  TORCH_CHECK(same, op, ": residual must have x's shape ", shape(x), ", got ", shape(residual));
  TORCH_CHECK(at::promote_types(residual.scalar_type(), rdt) == rdt, op, ": a ", name_of(residual.scalar_type()),
              " residual would be rounded to residual_dtype (", name_of(rdt), "): ",
              residual_stream_advice(x.scalar_type(), residual.scalar_type(), rdt));
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": p must be in [0, 1], got ", py_repr(p));
  const c10::SymInt hidden = x.sym_size(-1);
  for (const auto& [name, t] : {std::pair{"bias", &bias}, std::pair{"weight", &weight},
                                std::pair{"norm_bias", &norm_bias}}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && sym_same((*t)->sym_size(0), hidden), op, ": ", name, " must have shape ",
                shape(c10::SymIntArrayRef(&hidden, 1)), " (x's last dimension), got ", shape(**t));
  }
  TORCH_CHECK(!bias || bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype (",
              name_of(x.scalar_type()), "), got ", name_of(bias->scalar_type()));
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"norm_bias", &norm_bias}}) {
    TORCH_CHECK(!t->has_value() || (*t)->scalar_type() == x.scalar_type() || (*t)->scalar_type() == at::kFloat, op, ": ",
                name, " must have x's dtype (", name_of(x.scalar_type()), ") or float32, got ",
                name_of((*t)->scalar_type()));
  }
  for (const auto& [name, t] : {std::pair{"residual", &residual}, std::pair{"bias", bias ? &*bias : nullptr},
                                std::pair{"weight", weight ? &*weight : nullptr},
                                std::pair{"norm_bias", norm_bias ? &*norm_bias : nullptr}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device().str(), " but x is on ",
                x.device().str());
  }
  return rdt;
}

// Why a call runs the reference instead of the fused op, or nullptr (as fallback_reason; CPU tensors take our
// op, whose CPU kernel computes any dtype mix).
const char* add_fallback_reason(const Tensor& x, const Tensor& residual, const OptTensor& bias,
                                const OptTensor& weight, const OptTensor& norm_bias) {
  if (x.is_nested() || residual.is_nested()) return "";
  for (const OptTensor* t : {&bias, &weight, &norm_bias}) {
    if (has_forward_grad(*t)) return "";
  }
  if (has_forward_grad(x) || has_forward_grad(residual)) return "";
  if (x.sym_size(-1).sym_eq(0).guard_bool(__FILE__, __LINE__)) return "";
  if (x.device().is_cpu()) return nullptr;
  if (!x.is_cuda()) return "";
  if (!has_kernel_dtype(x.scalar_type())) return "float64 input has no fused kernel";
  if (!kernel_param_dtypes(x, weight, norm_bias)) return "this mix of input and parameter dtypes has no fused kernel";
  if (x.sym_size(-1).sym_gt(kMaxHidden).guard_bool(__FILE__, __LINE__)) {
    return "the normalized size is past the fused kernel's limit of 65536";
  }
  return nullptr;
}

// h = residual + dropout(x + bias) in the arithmetic's type (keep_scale: the mask times 1 / (1 - p), or
// undefined for no dropout), rounded to residual_dtype.
Tensor residual_sum_reference(const Tensor& x, const Tensor& residual, const OptTensor& bias, const Tensor& keep_scale,
                              at::ScalarType residual_dtype) {
  const auto acc = opmath_dtype(x.scalar_type());
  Tensor t = bias ? x.to(acc) + bias->to(acc) : x.to(acc);
  if (keep_scale.defined()) t = t * keep_scale;
  return (residual.to(acc) + t).to(residual_dtype);
}

// weight and norm_bias for ATen's CPU LayerNorm kernels over h: float32 beside a 16-bit h (its mixed-type path,
// whose statistics are float32; with 16-bit parameters, or none, it keeps them in h's type), else h's type.
std::pair<OptTensor, OptTensor> aten_norm_params(const Tensor& h, const OptTensor& weight, const OptTensor& norm_bias) {
  const auto acc = opmath_dtype(h.scalar_type());
  Tensor w = weight ? weight->to(acc) : Tensor();
  if (!w.defined() && acc != h.scalar_type()) w = at::ones({h.size(-1)}, h.options().dtype(acc));
  return {w.defined() ? OptTensor(w.contiguous()) : OptTensor(),
          norm_bias ? OptTensor(norm_bias->to(acc).contiguous()) : OptTensor()};
}

// out = norm(h) over the last dimension with its statistics, in the arithmetic's type (float64 for float64 h).
std::tuple<Tensor, Tensor, Tensor> norm_of_rows(const Tensor& h, const OptTensor& weight, const OptTensor& norm_bias,
                                                double eps, bool rms) {
  const auto acc = opmath_dtype(h.scalar_type());
  const Tensor hf = h.to(acc);
  const Tensor mean = rms ? at::empty({0}, hf.options()) : hf.mean(-1);
  const Tensor xc = rms ? hf : hf - mean.unsqueeze(-1);
  const Tensor rstd = (xc.square().mean(-1) + eps).rsqrt();
  Tensor y = xc * rstd.unsqueeze(-1);
  if (weight) y = y * weight->to(acc);
  if (norm_bias) y = y + norm_bias->to(acc);
  return {y, mean, rstd};
}

// The keep mask times 1 / (1 - p) as a tensor (undefined for p = 0), as the forward drew it: regenerated from
// the CPU seed, or on CUDA read off the fused backward of a unit residual grad (dx = mask / (1 - p)).
Tensor dropout_keep_scale(const Tensor& h, const Tensor& mean, const Tensor& rstd, const Tensor& rng_state, double p,
                          at::ScalarType x_dtype, bool rms) {
  if (p <= 0) return Tensor();
  const auto acc = opmath_dtype(h.scalar_type());
  if (p >= 1) return at::zeros_like(h, h.options().dtype(acc));
  const at::NoGradGuard no_grad;
  Tensor keep;
  if (h.is_cuda()) {
    const Tensor dx = std::get<0>(add_norm_bwd_op().call(std::nullopt, at::ones_like(h), h, std::nullopt, std::nullopt,
                                                         mean, rstd, rng_state, 0.0, p, x_dtype, rms,
                                                         {true, false, false, false, false}));
    keep = dx.ne(0);
  } else {
    keep = cpu_dropout_keep(rng_state.data_ptr<int64_t>()[0], h.sym_sizes(), p);
  }
  return keep.to(acc) * (1.0 / (1.0 - p));
}

// The sum over every row of a [..., H] tensor (H itself for a single row).
Tensor sum_over_rows(const Tensor& t) { return t.dim() > 1 ? t.flatten(0, -2).sum(0) : t; }

// dx, dresidual, dbias, dweight, dnorm_bias from the norm's part (norm_grads: the grads of h, weight and norm_bias
// from dy; undefined without dy) and the new residual's grad.
std::array<Tensor, 5> add_norm_grads(const std::array<Tensor, 3>& norm_grads, const Tensor& dresidual_out,
                                     const Tensor& h, const Tensor& keep_scale, at::ScalarType x_dtype,
                                     const AddBwdOutputs& want) {
  std::array<Tensor, 5> grads;
  Tensor dh = norm_grads[0];  // (added in the wider of the two types, rounded once)
  grads[3] = norm_grads[1];
  grads[4] = norm_grads[2];
  if (dresidual_out.defined()) dh = dh.defined() ? dh + dresidual_out : dresidual_out;
  if (!dh.defined()) dh = at::zeros_like(h, h.options().dtype(opmath_dtype(h.scalar_type())));
  if (want.dresidual) grads[1] = dh.to(h.scalar_type());
  const Tensor dx = keep_scale.defined() ? dh * keep_scale : dh;
  if (want.dx) grads[0] = dx.to(x_dtype);
  if (want.dx_bias) grads[2] = sum_over_rows(dx).to(x_dtype);
  return grads;
}

// dx, dresidual, dbias, dweight, dnorm_bias with differentiable ATen ops from h (statistics recomputed): the
// backward when it is itself recorded (create_graph=True), and the CPU kernel's RMSNorm.
std::array<Tensor, 5> add_norm_backward_reference(const Tensor& dy, const Tensor& dresidual_out, const Tensor& h,
                                                  const Tensor& weight, const Tensor& norm_bias, const Tensor& keep_scale,
                                                  double eps, at::ScalarType x_dtype, bool rms,
                                                  const AddBwdOutputs& want) {
  std::array<Tensor, 3> norm_grads;
  if (dy.defined()) {
    const c10::SymInt hidden = h.sym_size(-1);
    norm_grads = norm_backward_differentiable(dy, h, c10::SymIntArrayRef(&hidden, 1), weight, norm_bias, eps, rms,
                                              {true, want.dweight, want.dnorm_bias}, opmath_dtype(h.scalar_type()));
  }
  return add_norm_grads(norm_grads, dresidual_out, h, keep_scale, x_dtype, want);
}

// The backward of add_norm_fwd; next edges x, residual, bias, weight, norm_bias (absent ones empty).
struct AddNormBackward : torch::autograd::Node {
  bool rms = false;
  double eps = 0, p = 0;
  at::ScalarType x_dtype = at::kFloat;
  torch::autograd::SavedVariable residual_out, weight, norm_bias, mean, rstd, rng_state;
  bool has_bias = false;

  std::string name() const override {
    return rms ? "fusedkernels::AddRmsNormBackward" : "fusedkernels::AddLayerNormBackward";
  }

  void release_variables() override {
    for (auto* v : {&residual_out, &weight, &norm_bias, &mean, &rstd, &rng_state}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    const Tensor &dy = grads[0], &dres = grads[1];
    if (!dy.defined() && !dres.defined()) return out;
    const Tensor h = residual_out.unpack(getptr()), w = weight.unpack(), nb = norm_bias.unpack();
    const Tensor m = mean.unpack(), r = rstd.unpack(), rng = rng_state.unpack();
    const std::array<bool, 5> mask = {task_should_compute_output(0), task_should_compute_output(1),
                                      has_bias && task_should_compute_output(2),
                                      w.defined() && task_should_compute_output(3),
                                      nb.defined() && task_should_compute_output(4)};
    // Without dropout, in one dtype, x's grad is the new residual's grad dh: the kernel writes it once and both
    // inputs get that tensor, as autograd's own add hands one grad to both operands (one tensor of traffic less).
    const bool share = p == 0 && x_dtype == h.scalar_type() && mask[0] && mask[1] && !at::GradMode::is_enabled();
    std::array<bool, 5> kernel_mask = mask;
    if (share) kernel_mask[0] = false;
    const AddBwdOutputs want = add_bwd_outputs(kernel_mask, dy.defined(), w.defined(), nb.defined());
    std::array<Tensor, 5> g;
    if (at::GradMode::is_enabled()) {  // create_graph: the backward is itself being differentiated
      g = add_norm_backward_reference(dy, dres, h, w, nb, dropout_keep_scale(h, m, r, rng, p, x_dtype, rms), eps,
                                      x_dtype, rms, want);
    } else {
      g = std::apply([](auto&&... t) { return std::array<Tensor, 5>{t...}; },
                     add_norm_bwd_op().call(optional_of(dy.defined() ? dy.contiguous() : dy),
                                            optional_of(dres.defined() ? dres.contiguous() : dres), h, optional_of(w),
                                            optional_of(nb), m, r, rng, eps, p, x_dtype, rms, kernel_mask));
    }
    const std::array<bool, 5> computed = {want.dx, want.dresidual, want.dx_bias, want.dweight, want.dnorm_bias};
    for (size_t i = 0; i < out.size(); ++i) {
      if (mask[i] && computed[i]) out[i] = g[i];
    }
    if (share) out[0] = g[1];
    return out;
  }
};

// The reference with autograd (differentiable ATen ops; the mask drawn with torch's dropout): inputs without a
// fused kernel, forward-mode AD.
std::tuple<Tensor, Tensor> add_norm_reference(const Tensor& x, const Tensor& residual, const OptTensor& bias,
                                              const OptTensor& weight, const OptTensor& norm_bias, double eps, double p,
                                              at::ScalarType residual_dtype, bool rms) {
  const auto acc = opmath_dtype(x.scalar_type());
  Tensor t = bias ? x.to(acc) + bias->to(acc) : x.to(acc);
  if (p > 0) t = at::dropout(t, p, /*train=*/true);
  const Tensor h = (residual.to(acc) + t).to(residual_dtype);
  const c10::SymInt hidden = x.sym_size(-1);
  const Tensor y = rms ? at::rms_norm_symint(h.to(acc), c10::SymIntArrayRef(&hidden, 1), to_dtype(weight, acc), eps)
                       : at::layer_norm_symint(h.to(acc), c10::SymIntArrayRef(&hidden, 1), to_dtype(weight, acc),
                                               to_dtype(norm_bias, acc), eps);
  return {y.to(x.scalar_type()), h};
}

std::tuple<Tensor, Tensor> add_norm_composite(const char* op, const Tensor& x, const OptTensor& bias,
                                              const Tensor& residual, const OptTensor& weight,
                                              const OptTensor& norm_bias, double p, bool training, double eps,
                                              std::optional<at::ScalarType> residual_dtype, bool rms) {
  const at::ScalarType rdt = check_add_args(op, x, bias, residual, weight, norm_bias, p, residual_dtype);
  const double drop = training ? p : 0.0;
  if (drop >= 1) {  // as F.dropout's p = 1: a product with zero (NaN stays NaN), no random draw
    const Tensor zero = at::zeros({}, x.options());
    return add_norm_composite(op, x * zero, bias ? OptTensor(*bias * zero) : bias, residual, weight, norm_bias, 0.0,
                              false, eps, residual_dtype, rms);
  }
  const Tensor r = residual.scalar_type() == rdt ? residual : residual.to(rdt);
  if (const char* why = add_fallback_reason(x, r, bias, weight, norm_bias)) {
    fusedkernels::warn_fallback(op, why, "the PyTorch reference");
    return add_norm_reference(x, r, bias, weight, norm_bias, eps, drop, rdt, rms);
  }
  // Under a torch.func transform (grad, vjp, jvp) dropout takes the reference, whose at::dropout the transforms
  // know: the fused op's mask is drawn and regenerated from a saved seed they cannot see through (its rng_state
  // has no storage under grad). (vmap reaches here per sample, through functorch's fallback.)
  if (drop > 0 && c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return add_norm_reference(x, r, bias, weight, norm_bias, eps, drop, rdt, rms);
  }
  auto [y, h, mean, rstd, rng_state] = add_norm_fwd_op().call(x.contiguous(), r.contiguous(), contiguous(bias),
                                                               contiguous(weight), contiguous(norm_bias), eps, drop,
                                                               rdt, rms);
  return {y, h};
}

std::tuple<Tensor, Tensor> add_layer_norm_composite(const Tensor& x, const Tensor& residual, const OptTensor& weight,
                                                    const OptTensor& bias, double eps,
                                                    std::optional<at::ScalarType> residual_dtype) {
  return add_norm_composite("add_layer_norm", x, std::nullopt, residual, weight, bias, 0.0, false, eps,
                            residual_dtype, false);
}

std::tuple<Tensor, Tensor> add_rms_norm_composite(const Tensor& x, const Tensor& residual, const OptTensor& weight,
                                                  std::optional<double> eps,
                                                  std::optional<at::ScalarType> residual_dtype) {
  return add_norm_composite("add_rms_norm", x, std::nullopt, residual, weight, std::nullopt, 0.0, false,
                            rms_eps(x, eps), residual_dtype, true);
}

std::tuple<Tensor, Tensor> bias_dropout_add_layer_norm_composite(const Tensor& x, const OptTensor& bias,
                                                                 const Tensor& residual, const OptTensor& weight,
                                                                 const OptTensor& norm_bias, double p, double eps,
                                                                 bool training,
                                                                 std::optional<at::ScalarType> residual_dtype) {
  return add_norm_composite("bias_dropout_add_layer_norm", x, bias, residual, weight, norm_bias, p, training, eps,
                            residual_dtype, false);
}

std::tuple<Tensor, Tensor> bias_dropout_add_rms_norm_composite(const Tensor& x, const OptTensor& bias,
                                                               const Tensor& residual, const OptTensor& weight, double p,
                                                               std::optional<double> eps, bool training,
                                                               std::optional<at::ScalarType> residual_dtype) {
  return add_norm_composite("bias_dropout_add_rms_norm", x, bias, residual, weight, std::nullopt, p, training,
                            rms_eps(x, eps), residual_dtype, true);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_fwd_autograd(const Tensor& x, const Tensor& residual,
                                                                         const OptTensor& bias, const OptTensor& weight,
                                                                         const OptTensor& norm_bias, double eps,
                                                                         double p, at::ScalarType residual_dtype,
                                                                         bool rms) {
  const bool tangents = has_forward_grad(x) || has_forward_grad(residual) || has_forward_grad(bias) ||
                        has_forward_grad(weight) || has_forward_grad(norm_bias);
  if (tangents) {
    // Nested torch.func transforms reach here with tangents: the reference has the forward-mode formulas, the
    // statistics come from the fused op. With dropout the reference draws its own mask (rng_state is not out's).
    auto stats = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return add_norm_fwd_op().call(x.detach(), residual.detach(), bias, weight, norm_bias, eps, p, residual_dtype,
                                    rms);
    }();
    auto [y, h] = add_norm_reference(x, residual, bias, weight, norm_bias, eps, p, residual_dtype, rms);
    return {y, h, std::get<2>(stats), std::get<3>(stats), std::get<4>(stats)};
  }
  auto out = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return add_norm_fwd_op().call(x, residual, bias, weight, norm_bias, eps, p, residual_dtype, rms);
  }();
  const bool grad = at::GradMode::is_enabled() && (requires_grad(x) || requires_grad(residual) ||
                                                   requires_grad(bias) || requires_grad(weight) ||
                                                   requires_grad(norm_bias));
  if (grad) {
    auto node = make_node<AddNormBackward>();
    auto& n = static_cast<AddNormBackward&>(*node);
    n.rms = rms;
    n.eps = eps;
    n.p = p;
    n.x_dtype = x.scalar_type();
    n.has_bias = bias.has_value();
    n.set_next_edges(torch::autograd::collect_next_edges(x, residual, bias, weight, norm_bias));
    torch::autograd::set_history(std::get<0>(out), node);
    torch::autograd::set_history(std::get<1>(out), node);
    n.residual_out = torch::autograd::SavedVariable(std::get<1>(out), true);
    n.weight = torch::autograd::SavedVariable(weight, false);
    n.norm_bias = torch::autograd::SavedVariable(norm_bias, false);
    n.mean = torch::autograd::SavedVariable(std::get<2>(out), false);
    n.rstd = torch::autograd::SavedVariable(std::get<3>(out), false);
    n.rng_state = torch::autograd::SavedVariable(std::get<4>(out), false);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_fwd_cpu(const Tensor& x, const Tensor& residual,
                                                                    const OptTensor& bias, const OptTensor& weight,
                                                                    const OptTensor& norm_bias, double eps, double p,
                                                                    at::ScalarType residual_dtype, bool rms) {
  Tensor rng_state = at::empty({p > 0 ? 2 : 0}, x.options().dtype(at::kLong));
  Tensor keep_scale;
  if (p > 0) {
    const int64_t seed = cpu_dropout_seed(std::nullopt);  // the backward regenerates the mask from it
    rng_state.data_ptr<int64_t>()[0] = seed;
    rng_state.data_ptr<int64_t>()[1] = 0;
    keep_scale = p >= 1 ? at::zeros_like(x, x.options().dtype(opmath_dtype(x.scalar_type())))
                        : cpu_dropout_keep(seed, x.sym_sizes(), p).to(opmath_dtype(x.scalar_type())) * (1.0 / (1.0 - p));
  }
  const Tensor h = residual_sum_reference(x, residual, bias, keep_scale, residual_dtype);
  const auto acc = opmath_dtype(x.scalar_type());  // (a float32 h of float64 x: statistics as the meta kernel's)
  if (!rms && h.numel() > 0) {
    // ATen's CPU kernel: one pass, where norm_of_rows' composite ops take several (7x the unfused chain's time at
    // 2048 x 1024 float32)
    const auto [w, nb] = aten_norm_params(h, weight, norm_bias);
    auto [y, mean, rstd] = at::native_layer_norm(h, {h.size(-1)}, w, nb, eps);
    const auto rows = h.sizes().slice(0, h.dim() - 1);
    return {y.to(x.scalar_type()), h, mean.reshape(rows).to(acc), rstd.reshape(rows).to(acc), rng_state};
  }
  auto [y, mean, rstd] = norm_of_rows(h, weight, norm_bias, eps, rms);
  return {y.to(x.scalar_type()), h, mean.to(acc), rstd.to(acc), rng_state};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_bwd_cpu(
    const OptTensor& dy, const OptTensor& dresidual_out, const Tensor& residual_out, const OptTensor& weight,
    const OptTensor& norm_bias, const Tensor& mean, const Tensor& rstd, const Tensor& rng_state, double eps, double p,
    at::ScalarType x_dtype, bool rms, std::array<bool, 5> output_mask) {
  TORCH_CHECK_VALUE(p <= 0 || (rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong),
                    "add_norm_bwd: rng_state must be the forward's int64 [2] when p > 0");
  const AddBwdOutputs want = add_bwd_outputs(output_mask, dy.has_value(), weight.has_value(), norm_bias.has_value());
  const Tensor keep_scale = dropout_keep_scale(residual_out, mean, rstd, rng_state, p, x_dtype, rms);
  std::array<Tensor, 5> g;
  if (!rms && dy && residual_out.numel() > 0) {
    // LayerNorm's part from ATen's CPU kernel and the forward's statistics: one pass, where the composite ops of
    // the reference take several (10x the time of the unfused chain's backward at 2048 x 1024 float32). A 16-bit
    // h goes in as float32, so dh (and from it dresidual, dx) is float32 until its one rounding, as the CUDA
    // kernels form it (ATen's 16-bit path rounds dh before dresidual_out and the dropout scale are applied);
    // dweight / dnorm_bias as the plain norm's (layer_norm_param_grads).
    const auto acc = opmath_dtype(residual_out.scalar_type());
    const Tensor h = residual_out.to(acc).contiguous(), dyf = dy->to(acc).contiguous();
    const Tensor m = mean.to(acc).contiguous().unsqueeze(-1), r = rstd.to(acc).contiguous().unsqueeze(-1);
    const auto [w, nb] = aten_norm_params(h, weight, norm_bias);
    const Tensor dh = std::get<0>(
        at::native_layer_norm_backward(dyf, h, {h.size(-1)}, m, r, w, nb, {true, false, false}));
    auto [dw, dnb] = layer_norm_param_grads(dyf, h, m, r, 1, want.dweight, want.dnorm_bias);
    if (dw.defined()) dw = dw.to(weight->scalar_type());
    if (dnb.defined()) dnb = dnb.to(norm_bias->scalar_type());
    g = add_norm_grads({dh, dw, dnb}, dresidual_out.value_or(Tensor()), residual_out, keep_scale, x_dtype, want);
  } else {
    g = add_norm_backward_reference(dy.value_or(Tensor()), dresidual_out.value_or(Tensor()), residual_out,
                                    weight.value_or(Tensor()), norm_bias.value_or(Tensor()), keep_scale, eps,
                                    x_dtype, rms, want);
  }
  for (Tensor& t : g) {  // fresh tensors: dx and dresidual can be one value, or a grad given in
    t = t.defined() ? t.clone(at::MemoryFormat::Contiguous) : at::empty({0}, residual_out.options());
  }
  return {g[0], g[1], g[2], g[3], g[4]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_fwd_meta(const Tensor& x, const Tensor&, const OptTensor&,
                                                                     const OptTensor&, const OptTensor&, double,
                                                                     double p, at::ScalarType residual_dtype, bool rms) {
  const Tensor rstd = at::empty_symint(x.sym_sizes().slice(0, x.dim() - 1), x.options().dtype(opmath_dtype(x.scalar_type())));
  return {like_meta(x), at::empty_symint(x.sym_sizes(), x.options().dtype(residual_dtype)),
          rms ? at::empty({0}, rstd.options()) : at::empty_like(rstd), rstd,
          at::empty({p > 0 ? 2 : 0}, x.options().dtype(at::kLong))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_bwd_meta(
    const OptTensor& dy, const OptTensor&, const Tensor& residual_out, const OptTensor& weight,
    const OptTensor& norm_bias, const Tensor&, const Tensor&, const Tensor&, double, double, at::ScalarType x_dtype,
    bool, std::array<bool, 5> output_mask) {
  const Tensor& h = residual_out;
  const AddBwdOutputs want = add_bwd_outputs(output_mask, dy.has_value(), weight.has_value(), norm_bias.has_value());
  const auto empty = [&] { return at::empty({0}, h.options()); };
  return {want.dx ? at::empty_symint(h.sym_sizes(), h.options().dtype(x_dtype)) : empty(),
          want.dresidual ? like_meta(h) : empty(),
          want.dx_bias ? at::empty_symint({h.sym_size(-1)}, h.options().dtype(x_dtype)) : empty(),
          want.dweight ? at::empty_like(*weight) : empty(), want.dnorm_bias ? at::empty_like(*norm_bias) : empty()};
}

const RegisterOpInfo layer_norm_info{
    {"norm", "layer_norm", "float32, float16, bfloat16 input; weight and bias in the input's dtype or float32",
     "normalized size 1.." + std::to_string(kMaxHidden) + "; fastest when its rows are a multiple of 16 bytes"}};
const RegisterOpInfo rms_norm_info{
    {"norm", "rms_norm", "float32, float16, bfloat16 input; weight in the input's dtype or float32",
     "normalized size 1.." + std::to_string(kMaxHidden) + "; fastest when its rows are a multiple of 16 bytes"}};
OpInfo add_norm_info(const char* op, const char* params) {
  return {"norm", op, std::string("float32, float16, bfloat16 input; residual stream in its dtype or float32; ") + params +
                          " in the input's dtype or float32",
          "last dimension 1.." + std::to_string(kMaxHidden) + "; fastest when its rows are a multiple of 16 bytes"};
}
const RegisterOpInfo add_layer_norm_info{add_norm_info("add_layer_norm", "weight and bias")};
const RegisterOpInfo add_rms_norm_info{add_norm_info("add_rms_norm", "weight")};
const RegisterOpInfo bias_dropout_add_layer_norm_info{add_norm_info("bias_dropout_add_layer_norm", "weight and norm_bias")};
const RegisterOpInfo bias_dropout_add_rms_norm_info{add_norm_info("bias_dropout_add_rms_norm", "weight")};

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CompositeImplicitAutograd, m) {
  m.impl("layer_norm", &layer_norm_composite);
  m.impl("rms_norm", &rms_norm_composite);
  m.impl("add_layer_norm", &add_layer_norm_composite);
  m.impl("add_rms_norm", &add_rms_norm_composite);
  m.impl("bias_dropout_add_layer_norm", &bias_dropout_add_layer_norm_composite);
  m.impl("bias_dropout_add_rms_norm", &bias_dropout_add_rms_norm_composite);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCUDA, m) {
  m.impl("layer_norm", &layer_norm_autocast);
  m.impl("rms_norm", &rms_norm_autocast);
}

TORCH_LIBRARY_IMPL(fusedkernels, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &rms_norm_fwd_autograd);
  m.impl("add_norm_fwd", &add_norm_fwd_autograd);
  // Differentiating the backward ops themselves is an error (the public ops' backward handles create_graph).
  m.impl("layer_norm_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("rms_norm_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("add_norm_bwd", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(fusedkernels, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("add_norm_fwd", &add_norm_fwd_cpu);
  m.impl("add_norm_bwd", &add_norm_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_meta);
  m.impl("layer_norm_bwd", &layer_norm_bwd_meta);
  m.impl("rms_norm_fwd", &rms_norm_fwd_meta);
  m.impl("rms_norm_bwd", &rms_norm_bwd_meta);
  m.impl("add_norm_fwd", &add_norm_fwd_meta);
  m.impl("add_norm_bwd", &add_norm_bwd_meta);
}

}  // namespace fusedkernels::norm
