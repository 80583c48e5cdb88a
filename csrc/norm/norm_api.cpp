// CUDA kernels of fusedkernels::{layer,rms}_norm_{fwd,bwd} and add_norm_{fwd,bwd}: check the tensors, fill
// the params, launch on the current stream. The public ops, autograd and the CPU / meta kernels are in
// norm_ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/torch/checks.h"
#include "common/torch/philox.h"
#include "norm/norm.h"

namespace fusedkernels::norm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// weight / bias: `hidden` elements on x's device, contiguous, in x_dtype or float32, both of one dtype.
void check_params(const char* op, const Tensor& x, at::ScalarType x_dtype, int64_t hidden, const OptTensor& weight,
                  const OptTensor& bias) {
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const Tensor& w = t->value();
    check_cuda_contiguous(w, x, op, name);
    TORCH_CHECK_VALUE(w.numel() == hidden, op, ": ", name, " must have ", num(hidden), " elements, got ", shape(w));
    TORCH_CHECK_TYPE(w.scalar_type() == x_dtype || w.scalar_type() == at::kFloat, op, ": ", name, " must be ",
                     name_of(x_dtype), " (like x) or float32, got ", name_of(w.scalar_type()));
  }
  TORCH_CHECK_TYPE(!weight || !bias || weight->scalar_type() == bias->scalar_type(), op,
                   ": weight and bias must have the same dtype");
}

// x is [..., normalized_shape] (contiguous); weight / bias have normalized_shape, in x's dtype or float32.
int check_inputs(const char* op, const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                 const OptTensor& bias) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device().str());
  check_float_dtype(x, op, "x");
  const int64_t axis = x.dim() - static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(!normalized_shape.empty() && axis >= 0 && x.sizes().slice(axis) == normalized_shape, op,
                    ": normalized_shape ", shape(normalized_shape), " must be the trailing dimensions of x ", shape(x));
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t hidden = c10::multiply_integers(normalized_shape);
  TORCH_CHECK_VALUE(hidden >= 1 && hidden <= kMaxHidden, op, ": the normalized size must be in [1, ", num(kMaxHidden),
                    "], got ", num(hidden));
  check_params(op, x, x.scalar_type(), hidden, weight, bias);
  return static_cast<int>(hidden);
}

DType param_dtype(const Tensor& x, const OptTensor& weight, const OptTensor& bias) {
  if (weight) return to_dtype(weight->scalar_type());
  if (bias) return to_dtype(bias->scalar_type());
  return to_dtype(x.scalar_type());
}

const void* ptr_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

// mean / rstd: float32, one per row, shaped like x's leading (not normalized) dimensions.
Tensor stats_like(const Tensor& x, at::IntArrayRef normalized_shape) {
  return at::empty(x.sizes().slice(0, x.dim() - normalized_shape.size()), x.options().dtype(at::kFloat));
}

// The norm's forward params: x (or, add + norm, the x whose h is normalized) into y, with its statistics.
void set_fwd_params(FwdParams& p, const Tensor& x, const Tensor& y, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& mean, const Tensor& rstd, int hidden, double eps, bool rms) {
  p.x = x.data_ptr();
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.y = y.data_ptr();
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = x.numel() / hidden;
  p.hidden = hidden;
  p.eps = static_cast<float>(eps);
  p.x_dtype = to_dtype(x.scalar_type());
  p.w_dtype = param_dtype(x, weight, bias);
  p.rms = rms;
}

std::vector<Tensor> run_fwd(const char* op, const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                            const OptTensor& bias, double eps, bool rms) {
  const int hidden = check_inputs(op, x, normalized_shape, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  Tensor rstd = stats_like(x, normalized_shape);
  Tensor mean = rms ? Tensor() : stats_like(x, normalized_shape);

  FwdParams p{};
  set_fwd_params(p, x, y, weight, bias, mean, rstd, hidden, eps, rms);
  check_launch(norm_fwd(p, c10::cuda::getCurrentCUDAStream()), op);
  if (rms) return {y, rstd};
  return {y, mean, rstd};
}

// output_mask: {dx, dweight, dbias}; dx is always computed, a parameter grad not asked for is empty.
std::vector<Tensor> run_bwd(const char* op, const Tensor& dy, const Tensor& x, at::IntArrayRef normalized_shape,
                            const OptTensor& weight, const OptTensor& bias, const OptTensor& mean, const Tensor& rstd,
                            std::array<bool, 3> output_mask, bool rms) {
  const int hidden = check_inputs(op, x, normalized_shape, weight, bias);
  check_cuda_contiguous(dy, x, op, "dy");
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op,
                    ": dy must match x in shape and dtype, got ", shape(dy), " ", name_of(dy.scalar_type()));
  const int64_t rows = x.numel() / hidden;
  for (const auto& [name, t] : {std::pair{"rstd", &rstd}, std::pair{"mean", mean ? &mean.value() : nullptr}}) {
    if (t == nullptr) continue;
    check_cuda_contiguous(*t, x, op, name);
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->numel() == rows, op, ": ", name,
                      " must be float32 with one value per row (", num(rows), "), got ", name_of(t->scalar_type()), " ",
                      shape(*t));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const bool want_dw = weight && output_mask[1], want_db = bias && output_mask[2];
  Tensor dx = at::empty_like(x);
  Tensor dweight = want_dw ? at::empty_like(*weight) : at::empty({0}, x.options());
  Tensor dbias = want_db ? at::empty_like(*bias) : at::empty({0}, x.options());

  BwdParams p{};
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.weight = ptr_or_null(weight);
  p.mean = rms ? nullptr : mean->data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dweight = want_dw ? dweight.data_ptr() : nullptr;
  p.dbias = want_db ? dbias.data_ptr() : nullptr;
  p.rows = rows;
  p.hidden = hidden;
  p.x_dtype = to_dtype(x.scalar_type());
  p.w_dtype = param_dtype(x, weight, bias);
  p.rms = rms;
  // Workspace from the caching allocator: graph-capture safe, no cudaMalloc.
  const int64_t workspace_floats = bwd_workspace_floats(p);
  Tensor workspace = at::empty({workspace_floats}, x.options().dtype(at::kFloat));
  p.partials = workspace_floats ? workspace.data_ptr<float>() : nullptr;
  check_launch(norm_bwd(p, c10::cuda::getCurrentCUDAStream()), op);
  if (rms) return {dx, dweight};
  return {dx, dweight, dbias};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                                  const OptTensor& weight, const OptTensor& bias, double eps) {
  auto out = run_fwd("layer_norm_fwd", x, C10_AS_INTARRAYREF_SLOW(normalized_shape), weight, bias, eps, /*rms=*/false);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                                                  const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                                                  std::array<bool, 3> output_mask) {
  auto out = run_bwd("layer_norm_bwd", dy, x, C10_AS_INTARRAYREF_SLOW(normalized_shape), weight, bias, mean, rstd,
                     output_mask, /*rms=*/false);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                                        double eps) {
  auto out = run_fwd("rms_norm_fwd", x, C10_AS_INTARRAYREF_SLOW(normalized_shape), weight, std::nullopt, eps,
                     /*rms=*/true);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, c10::SymIntArrayRef normalized_shape,
                                        const OptTensor& weight, const Tensor& rstd, std::array<bool, 2> output_mask) {
  auto out = run_bwd("rms_norm_bwd", dy, x, C10_AS_INTARRAYREF_SLOW(normalized_shape), weight, std::nullopt,
                     std::nullopt, rstd,
                     {output_mask[0], output_mask[1], false}, /*rms=*/true);
  return {out[0], out[1]};
}

// A row tensor of add + norm: on x's device, contiguous, x's shape, of `dtype`.
void check_rows(const char* op, const Tensor& t, const Tensor& x, at::ScalarType dtype, const char* name) {
  check_cuda_contiguous(t, x, op, name);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", shape(x), ", got ", shape(t));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", name_of(dtype), ", got ",
                   name_of(t.scalar_type()));
}

void check_residual_dtype(const char* op, at::ScalarType residual_dtype, at::ScalarType x_dtype) {
  TORCH_CHECK_TYPE(residual_dtype == x_dtype || residual_dtype == at::kFloat, op, ": residual_dtype must be x's (",
                   name_of(x_dtype), ") or float32, got ", name_of(residual_dtype));
}

// x [..., H], residual like x in residual_dtype, bias [H] in x's dtype; weight / norm_bias as check_inputs.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_fwd_cuda(const Tensor& x, const Tensor& residual,
                                                                     const OptTensor& bias, const OptTensor& weight,
                                                                     const OptTensor& norm_bias, double eps, double p,
                                                                     at::ScalarType residual_dtype, bool rms) {
  const char* op = "add_norm_fwd";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t size = x.size(-1);
  const int hidden = check_inputs(op, x, {size}, weight, norm_bias);
  check_residual_dtype(op, residual_dtype, x.scalar_type());
  check_rows(op, residual, x, residual_dtype, "residual");
  if (bias) {
    check_cuda_contiguous(*bias, x, op, "bias");
    TORCH_CHECK_VALUE(bias->numel() == hidden, op, ": bias must have ", num(hidden), " elements, got ", shape(*bias));
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias must be ", name_of(x.scalar_type()),
                     " (like x), got ", name_of(bias->scalar_type()));
  }
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": p must be in [0, 1], got ", py_repr(p));
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  Tensor residual_out = at::empty(x.sizes(), x.options().dtype(residual_dtype));
  Tensor rstd = stats_like(x, {size});
  Tensor mean = rms ? at::empty({0}, rstd.options()) : stats_like(x, {size});
  Tensor rng_state = at::empty({p > 0 ? 2 : 0}, x.options().dtype(at::kLong));

  AddFwdParams a{};
  set_fwd_params(a, x, y, weight, norm_bias, mean, rstd, hidden, eps, rms);
  a.residual = residual.data_ptr();
  a.x_bias = ptr_or_null(bias);
  a.residual_out = residual_out.data_ptr();
  a.residual_dtype = to_dtype(residual_dtype);
  a.dropout_p = static_cast<float>(p);
  if (p > 0) {
    // One offset per call: the kernel's counters hold the element's row and column, the offset the call.
    a.philox = philox_state(std::nullopt, 4);
    a.rng_state = rng_state.data_ptr<int64_t>();
  }
  check_launch(add_norm_fwd(a, c10::cuda::getCurrentCUDAStream()), op);
  return {y, residual_out, mean, rstd, rng_state};
}

// The backward from the forward's residual_out (h), statistics and rng_state; results not computed are empty.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_bwd_cuda(
    const OptTensor& dy, const OptTensor& dresidual_out, const Tensor& residual_out, const OptTensor& weight,
    const OptTensor& norm_bias, const Tensor& mean, const Tensor& rstd, const Tensor& rng_state, double, double p,
    at::ScalarType x_dtype, bool rms, std::array<bool, 5> output_mask) {
  const char* op = "add_norm_bwd";
  const Tensor& h = residual_out;
  TORCH_CHECK_VALUE(h.is_cuda() && h.dim() >= 1, op, ": residual_out must be a CUDA tensor of at least one dimension");
  TORCH_CHECK_TYPE(has_kernel_dtype(x_dtype), op, ": x_dtype must be float32, float16 or bfloat16, got ",
                   name_of(x_dtype));
  check_residual_dtype(op, h.scalar_type(), x_dtype);
  TORCH_CHECK_VALUE(h.is_contiguous(), op, ": residual_out must be contiguous");
  const int64_t size = h.size(-1);
  TORCH_CHECK_VALUE(size >= 1 && size <= kMaxHidden, op, ": the normalized size must be in [1, ", num(kMaxHidden),
                    "], got ", num(size));
  check_params(op, h, x_dtype, size, weight, norm_bias);
  const int hidden = static_cast<int>(size);
  const int64_t rows = h.numel() / hidden;
  if (dy) check_rows(op, *dy, h, x_dtype, "dy");
  if (dresidual_out) check_rows(op, *dresidual_out, h, h.scalar_type(), "dresidual_out");
  for (const auto& [name, t] : {std::pair{"rstd", &rstd}, std::pair{"mean", rms ? nullptr : &mean}}) {
    if (t == nullptr) continue;
    check_cuda_contiguous(*t, h, op, name);
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->numel() == rows, op, ": ", name,
                      " must be float32 with one value per row (", num(rows), "), got ", name_of(t->scalar_type()), " ",
                      shape(*t));
  }
  if (p > 0) {
    check_cuda_contiguous(rng_state, h, op, "rng_state");
    TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong, op,
                      ": rng_state must be the forward's int64 [2] when p > 0");
  }
  const c10::cuda::CUDAGuard guard(h.device());
  const AddBwdOutputs out = add_bwd_outputs(output_mask, dy.has_value(), weight.has_value(), norm_bias.has_value());
  const auto empty = [&] { return at::empty({0}, h.options()); };
  Tensor dx = out.dx ? at::empty(h.sizes(), h.options().dtype(x_dtype)) : empty();
  Tensor dresidual = out.dresidual ? at::empty_like(h) : empty();
  Tensor dx_bias = out.dx_bias ? at::empty({size}, h.options().dtype(x_dtype)) : empty();
  Tensor dweight = out.dweight ? at::empty_like(*weight) : empty();
  Tensor dnorm_bias = out.dnorm_bias ? at::empty_like(*norm_bias) : empty();

  AddBwdParams a{};
  a.dy = dy ? dy->data_ptr() : nullptr;
  a.x = h.data_ptr();
  a.weight = ptr_or_null(weight);
  a.mean = rms ? nullptr : mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dx = out.dx ? dx.data_ptr() : nullptr;
  a.dweight = out.dweight ? dweight.data_ptr() : nullptr;
  a.dbias = out.dnorm_bias ? dnorm_bias.data_ptr() : nullptr;
  a.rows = rows;
  a.hidden = hidden;
  a.x_dtype = to_dtype(x_dtype);
  a.w_dtype = weight ? to_dtype(weight->scalar_type()) : norm_bias ? to_dtype(norm_bias->scalar_type()) : a.x_dtype;
  a.rms = rms;
  a.dresidual_out = dresidual_out ? dresidual_out->data_ptr() : nullptr;
  a.dresidual = out.dresidual ? dresidual.data_ptr() : nullptr;
  a.dx_bias = out.dx_bias ? dx_bias.data_ptr() : nullptr;
  a.residual_dtype = to_dtype(h.scalar_type());
  a.dropout_p = static_cast<float>(p);
  a.rng_state = p > 0 ? rng_state.data_ptr<int64_t>() : nullptr;
  const int64_t workspace_floats = add_bwd_workspace_floats(a);
  Tensor workspace = at::empty({workspace_floats}, h.options().dtype(at::kFloat));
  a.partials = workspace_floats ? workspace.data_ptr<float>() : nullptr;
  check_launch(add_norm_bwd(a, c10::cuda::getCurrentCUDAStream()), op);
  return {dx, dresidual, dx_bias, dweight, dnorm_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CUDA, m) {
  m.impl("add_norm_fwd", &add_norm_fwd_cuda);
  m.impl("add_norm_bwd", &add_norm_bwd_cuda);
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace fusedkernels::norm
