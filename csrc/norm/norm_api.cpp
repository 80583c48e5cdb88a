// CUDA kernels of fusedkernels::{layer,rms}_norm_{fwd,bwd}: check the tensors, fill the params, launch on
// the current stream. The public ops, autograd and the CPU / meta kernels are in norm_ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/torch/checks.h"
#include "norm/norm.h"

namespace fusedkernels::norm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

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
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const Tensor& w = t->value();
    check_cuda_contiguous(w, x, op, name);
    TORCH_CHECK_VALUE(w.numel() == hidden, op, ": ", name, " must have ", num(hidden), " elements, got ", shape(w));
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat, op, ": ", name, " must be ",
                     name_of(x.scalar_type()), " (like x) or float32, got ", name_of(w.scalar_type()));
  }
  TORCH_CHECK_TYPE(!weight || !bias || weight->scalar_type() == bias->scalar_type(), op,
                   ": weight and bias must have the same dtype");
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

std::vector<Tensor> run_fwd(const char* op, const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                            const OptTensor& bias, double eps, bool rms) {
  const int hidden = check_inputs(op, x, normalized_shape, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  Tensor rstd = stats_like(x, normalized_shape);
  Tensor mean = rms ? Tensor() : stats_like(x, normalized_shape);

  FwdParams p{};
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

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace fusedkernels::norm
