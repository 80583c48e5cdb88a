// CUDA implementations of fusedkernels::{layer,rms}_norm_{fwd,bwd}: check tensors, fill the params,
// launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/torch_checks.h"
#include "norm/norm.h"

namespace fusedkernels::norm {
namespace {

// x is [..., hidden]; weight / bias are [hidden] in x's dtype or float32.
int check_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device().str());
  check_float_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (the normalized one)");
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK_VALUE(hidden >= 1 && hidden <= kMaxHidden, op, ": the normalized size must be in [1, ",
                    num(kMaxHidden), "], got ", num(hidden));
  std::optional<at::ScalarType> param_dtype;
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const at::Tensor& w = t->value();
    check_cuda_contiguous(w, x, op, name);
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == hidden, op, ": ", name, " must have shape [", num(hidden),
                      "], got ", shape(w));
    TORCH_CHECK_VALUE(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat, op, ": ", name,
                      " must be ", name_of(x.scalar_type()), " (like x) or float32, got ", name_of(w.scalar_type()));
    TORCH_CHECK_VALUE(!param_dtype || *param_dtype == w.scalar_type(), op,
                      ": weight and bias must have the same dtype");
    param_dtype = w.scalar_type();
  }
  return static_cast<int>(hidden);
}

DType param_dtype(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias) {
  if (weight) return to_dtype(weight->scalar_type());
  if (bias) return to_dtype(bias->scalar_type());
  return to_dtype(x.scalar_type());
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

std::vector<at::Tensor> run_fwd(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps, bool rms) {
  const int hidden = check_inputs(op, x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.numel() / hidden;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor mean = rms ? at::Tensor() : at::empty({rows}, x.options().dtype(at::kFloat));

  FwdParams p{};
  p.x = x.data_ptr();
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.y = y.data_ptr();
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.hidden = hidden;
  p.eps = static_cast<float>(eps);
  p.x_dtype = to_dtype(x.scalar_type());
  p.w_dtype = param_dtype(x, weight, bias);
  p.rms = rms;
  C10_CUDA_CHECK(norm_fwd(p, c10::cuda::getCurrentCUDAStream()));
  if (rms) return {y, rstd};
  return {y, mean, rstd};
}

std::vector<at::Tensor> run_bwd(const char* op, const at::Tensor& dy, const at::Tensor& x,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mean, const at::Tensor& rstd, bool rms) {
  const int hidden = check_inputs(op, x, weight, bias);
  check_cuda_contiguous(dy, x, op, "dy");
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op,
                    ": dy must match x in shape and dtype, got ", shape(dy), " ", name_of(dy.scalar_type()));
  const int64_t rows = x.numel() / hidden;
  for (const auto& [name, t] : {std::pair{"rstd", &rstd}, std::pair{"mean", mean ? &mean.value() : nullptr}}) {
    if (t == nullptr) continue;
    check_cuda_contiguous(*t, x, op, name);
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->numel() == rows, op, ": ", name,
                      " must be float32 with one value per row (", num(rows), "), got ", name_of(t->scalar_type()),
                      " ", shape(*t));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = weight ? at::empty_like(*weight) : at::empty({0}, x.options());
  at::Tensor dbias = bias ? at::empty_like(*bias) : at::empty({0}, x.options());

  BwdParams p{};
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.weight = ptr_or_null(weight);
  p.mean = rms ? nullptr : mean->data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dweight = weight ? dweight.data_ptr() : nullptr;
  p.dbias = bias ? dbias.data_ptr() : nullptr;
  p.rows = rows;
  p.hidden = hidden;
  p.x_dtype = to_dtype(x.scalar_type());
  p.w_dtype = param_dtype(x, weight, bias);
  p.rms = rms;
  // Workspace from the caching allocator: graph-capture safe, no cudaMalloc.
  at::Tensor workspace = at::empty({bwd_workspace_floats(p)}, x.options().dtype(at::kFloat));
  p.partials = workspace.data_ptr<float>();
  C10_CUDA_CHECK(norm_bwd(p, c10::cuda::getCurrentCUDAStream()));
  if (rms) return {dx, dweight};
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  auto out = run_fwd("layer_norm_fwd", x, weight, bias, eps, /*rms=*/false);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              const at::Tensor& mean, const at::Tensor& rstd) {
  auto out = run_bwd("layer_norm_bwd", dy, x, weight, bias, mean, rstd, /*rms=*/false);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                double eps) {
  auto out = run_fwd("rms_norm_fwd", x, weight, std::nullopt, eps, /*rms=*/true);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  auto out = run_bwd("rms_norm_bwd", dy, x, weight, std::nullopt, std::nullopt, rstd, /*rms=*/true);
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
