// CUDA kernel of fusedkernels::linear_act_fwd (plain and gated): check the tensors, fill LinearActParams (x and
// residual as [m, k] / [m, n] rows, views where their layout allows), launch on the current stream. Where no kernel
// takes the call (gemm::linear_act_supported says no: another GPU, a build without its code) or the sizes / weight
// layout have none, the reference runs instead, with one warning per reason. The public ops, autograd and the CPU /
// meta kernels are in gemm_ops.cpp. Nothing here syncs or calls cudaMalloc: CUDA-graph capture safe.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "gemm/gemm.h"

namespace fusedkernels::gemm {

// Defined in gemm_ops.cpp (it is also the CPU kernel): out = act(F.linear(x, weight, bias)) + residual (gated:
// act(gate) * up + residual) in PyTorch ops, and z when save_pre_activation.
std::tuple<at::Tensor, at::Tensor> linear_act_reference(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, Activation activation,
                                                        const std::optional<at::Tensor>& residual,
                                                        bool save_pre_activation, bool gated);

// Defined in gemm_ops.cpp (gated_backward's CPU kernel): dz of the gated form in PyTorch ops.
at::Tensor gated_backward_reference(const at::Tensor& dy, const at::Tensor& z, Activation activation);
// Defined in gemm_ops.cpp (act_backward's CPU kernel): dz and dbias of the plain form in PyTorch ops.
std::tuple<at::Tensor, at::Tensor> act_backward_reference(const at::Tensor& dy, const at::Tensor& z,
                                                          Activation activation);

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr int64_t kAlign = 8;  // elements per 16 bytes in fp16 / bf16

// [rows, cols] as the kernel reads it: cols contiguous, rows a positive multiple of 16 bytes apart without
// overlapping (TMA takes such strides), a 16-byte aligned start.
bool rows_ready(const Tensor& t) {
  if (t.stride(1) != 1) return false;
  if (t.size(0) > 1 && (t.stride(0) % kAlign != 0 || t.stride(0) < t.size(1))) return false;
  return is_aligned_16(t);
}

// t [..., cols] as [rows, cols]: a view where the leading dimensions fold into one (reshape copies otherwise),
// a contiguous copy where that view's layout does not suit the kernel.
Tensor as_rows(const Tensor& t, int64_t cols) {
  Tensor r = t.reshape({-1, cols});
  return rows_ready(r) ? r : r.clone(at::MemoryFormat::Contiguous);
}

// A single row's stride is never read: report the row length, a valid stride.
int64_t row_stride(const Tensor& rows) { return rows.size(0) > 1 ? rows.stride(0) : rows.size(1); }

// The internal op's contract (the public op checks what a user passes, in torch's words; these guard the raw
// op): CUDA fp16 / bf16 tensors of one dtype and device, consistent shapes; a gated weight has an even number of
// rows.
void check_inputs(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                  const OptTensor& residual, int64_t activation, bool gated) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device().str());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
                   ": x must be float16 or bfloat16, got ", name_of(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1), op,
                    ": x must be [..., K] and weight [N, K], got ", shape(x), " and ", shape(weight));
  TORCH_CHECK_VALUE(!gated || weight.size(0) % 2 == 0, op, ": a gated weight must be [2N, K] (gate | up), got ",
                    shape(weight));
  TORCH_CHECK_VALUE(activation >= 0 && activation <= static_cast<int64_t>(Activation::kSquaredRelu), op,
                    ": activation must be a gemm::Activation value, got ", num(activation));
  check_operands_like_x(op, x, weight, bias, residual, /*residual_any_dtype=*/false, /*internal=*/true);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)), op,
                    ": bias must be [weight rows], got ", shape(*bias));
  if (residual) {
    auto sizes = x.sizes().vec();
    sizes.back() = gated ? weight.size(0) / 2 : weight.size(0);
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(sizes), op, ": residual must be ",
                      shape(at::IntArrayRef(sizes)), " like the output, got ", shape(*residual));
  }
}

std::tuple<Tensor, Tensor> linear_act_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                               int64_t activation, const OptTensor& residual,
                                               bool save_pre_activation, bool gated) {
  const char* op = "linear_act_fwd";
  check_inputs(op, x, weight, bias, residual, activation, gated);
  if (const char* setting = std::getenv("FUSEDKERNELS_GEMM_KERNEL"); setting && !known_kernel_setting(setting)) {
    TORCH_WARN("fusedkernels: FUSEDKERNELS_GEMM_KERNEL=", setting, " names no GEMM kernel (portable, sm90-wide, ",
               "sm90-cooperative, sm90-pingpong); ignored");
  }
  const Activation act = static_cast<Activation>(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  // n: the output's columns; rows: the weight's, and z's columns (2n gated)
  const int64_t rows = weight.size(0), n = gated ? rows / 2 : rows, k = weight.size(1);
  const auto reference = [&](const char* why) {
    warn_fallback(gated ? "linear_gated" : "linear_act", why,
                  gated ? "the PyTorch reference (F.linear, act(gate) * up, + residual)"
                        : "the PyTorch reference (F.linear, the activation, + residual)");
    auto [out, z] = linear_act_reference(x, weight, bias, act, residual, save_pre_activation, gated);
    return std::tuple<Tensor, Tensor>{out.contiguous(), z};
  };
  // (the public op routes these before they get here; a direct call gets the same answers)
  if (x.numel() == 0 || n == 0) return reference("");  // nothing to multiply (or k == 0: the bias alone)
  // No activation and no residual leaves no epilogue to fuse: F.linear, whose cuBLAS GEMM (bias in its epilogue)
  // is the faster plain GEMM (docs/perf-notes.md, gemm: "plain GEMMs to cuBLAS")
  if (act == Activation::kNone && !residual && !gated) {
    auto [out, z] = linear_act_reference(x, weight, bias, act, residual, save_pre_activation, gated);
    return {out.contiguous(), z};
  }
  if (k % kAlign != 0 || n % kAlign != 0) {
    return reference("in_features (K) or out_features (N) not a multiple of 8 has no fused kernel");
  }
  if (!rows_ready(weight)) {
    return reference("a weight whose rows are not contiguous and 16-byte aligned has no fused kernel");
  }

  auto sizes = x.sizes().vec();
  sizes.back() = n;
  Tensor out = at::empty(sizes, x.options());
  sizes.back() = rows;
  Tensor z = save_pre_activation ? at::empty(sizes, x.options()) : at::empty({0}, x.options());
  const Tensor x_rows = as_rows(x, k);
  // bias: one element per weight row, copied when strided or misaligned (cheap next to the GEMM)
  const OptTensor b = !bias || (bias->stride(0) == 1 && is_aligned_16(*bias))
                          ? bias
                          : OptTensor(bias->clone(at::MemoryFormat::Contiguous));
  const OptTensor res_rows = residual ? OptTensor(as_rows(*residual, n)) : std::nullopt;

  LinearActParams p;
  p.dtype = to_dtype(x.scalar_type());
  p.m = x_rows.size(0);
  p.n = n;
  p.k = k;
  p.x = x_rows.data_ptr();
  p.x_row_stride = row_stride(x_rows);
  p.weight = weight.data_ptr();
  p.weight_row_stride = weight.stride(0);
  p.bias = b ? b->data_ptr() : nullptr;
  p.residual = res_rows ? res_rows->data_ptr() : nullptr;
  p.residual_row_stride = res_rows ? row_stride(*res_rows) : 0;
  p.out = out.data_ptr();
  p.out_row_stride = n;
  p.pre_activation = save_pre_activation ? z.data_ptr() : nullptr;
  p.pre_activation_row_stride = rows;
  p.activation = act;
  p.gated = gated;
  if (!linear_act_supported(p)) {
    return reference("no fused kernel takes this call on this GPU with this build (gemm::linear_act_supported)");
  }
  Tensor workspace;
  if (const int split_k = linear_act_split_k(p); split_k > 1) {
    workspace = at::empty({split_k, p.m, rows}, x.options().dtype(at::kFloat));
    p.split_k = split_k;
    p.workspace = workspace.data_ptr<float>();
  }
  check_launch(linear_act(p, c10::cuda::getCurrentCUDAStream()), op);
  return {out, z};
}

// dz of the gated form into dz (z itself for gated_backward_) by one pass (gemm::gated_backward); false where
// the layouts do not allow it (a fallback the forward's kernel never causes: its pre-activation is contiguous and
// aligned), for the reference.
// What the backward passes' params share: dy [rows, n] and z [rows, z_cols] as the kernels read them, dz.
template <typename Params>
Params rows_params(const Tensor& dy, const Tensor& z, const Tensor& dz, int64_t n, int64_t z_cols, Activation act) {
  const Tensor dy_rows = as_rows(dy, n), z_rows = as_rows(z, z_cols);
  Params p;
  p.dtype = to_dtype(z.scalar_type());
  p.rows = z_rows.size(0);
  p.n = n;
  p.dy = dy_rows.data_ptr();
  p.dy_row_stride = row_stride(dy_rows);
  p.z = z_rows.data_ptr();
  p.z_row_stride = row_stride(z_rows);
  p.dz = dz.data_ptr();
  p.activation = act;
  return p;
}

bool launch_gated_backward(const Tensor& dy, const Tensor& z, const Tensor& dz, Activation act) {
  const int64_t n = z.size(-1) / 2;
  if (dy.scalar_type() != z.scalar_type() || dy.numel() * 2 != z.numel() || z.numel() == 0) return false;
  const GatedBackwardParams p = rows_params<GatedBackwardParams>(dy, z, dz, n, 2 * n, act);
  if (!gated_backward_supported(p)) return false;
  check_launch(gated_backward(p, c10::cuda::getCurrentCUDAStream()), "gated_backward");
  return true;
}

// gated_backward's CUDA kernel
Tensor gated_backward_cuda(const Tensor& dy, const Tensor& z, int64_t activation) {
  TORCH_CHECK(z.dim() >= 1 && z.size(-1) % 2 == 0, "gated_backward: pre_activation must be [..., 2N]");
  const Activation act = static_cast<Activation>(activation);
  const c10::cuda::CUDAGuard guard(z.device());
  Tensor dz = at::empty(z.sizes(), z.options());
  return launch_gated_backward(dy, z, dz, act) ? dz : gated_backward_reference(dy, z, act).contiguous();
}

// gated_backward_'s: each thread reads its elements of z before it writes them (the kernel's loads precede its
// stores, and no two threads share an element), so dz may overwrite z.
void gated_backward_inplace_cuda(const Tensor& dy, const Tensor& z, int64_t activation) {
  TORCH_CHECK(z.dim() >= 1 && z.size(-1) % 2 == 0 && z.is_contiguous(),
              "gated_backward_: pre_activation must be a contiguous [..., 2N]");
  const Activation act = static_cast<Activation>(activation);
  const c10::cuda::CUDAGuard guard(z.device());
  if (!launch_gated_backward(dy, z, z, act)) z.copy_(gated_backward_reference(dy, z, act));
}

// The backward epilogues' GEMM (gemm.h: gated_grad, act_grad): dh = dy_rows [m, k] @ weight [k, n] (as stored: the
// kernel reads it MN-major), z_rows the forward's pre-activation, dz contiguous with z's columns.
LinearActParams dgrad_params(const Tensor& dy_rows, const Tensor& weight, const Tensor& z_rows, const Tensor& dz,
                             Activation act) {
  LinearActParams p;
  p.dtype = to_dtype(z_rows.scalar_type());
  p.m = dy_rows.size(0);
  p.n = weight.size(1);
  p.k = weight.size(0);
  p.x = dy_rows.data_ptr();
  p.x_row_stride = row_stride(dy_rows);
  p.weight = weight.data_ptr();
  p.weight_row_stride = weight.size(0) > 1 ? weight.stride(0) : p.n;
  p.residual = z_rows.data_ptr();
  p.residual_row_stride = row_stride(z_rows);
  p.out = dz.data_ptr();
  p.out_row_stride = z_rows.size(1);
  p.activation = act;
  return p;
}

// gated_dgrad's and gated_dgrad_'s CUDA kernel: dz = gated backward of dh = dy @ weight against z, written into dz
// (z itself for the in-place op), by the Hopper GEMM with the gated backward in its epilogue (gemm.h: gated_grad),
// which reads weight as stored ([k, n], MN-major); where it does not take the call, PyTorch's GEMM and
// gated_backward's pass.
void gated_dgrad_into(const Tensor& dy, const Tensor& weight, const Tensor& z, const Tensor& dz, int64_t activation) {
  const char* op = "gated_dgrad";
  TORCH_CHECK_VALUE(weight.dim() == 2 && dy.dim() >= 1 && dy.size(-1) == weight.size(0), op,
                    ": dy must be [..., out_features] and weight [out_features, hidden], got ", shape(dy), " and ",
                    shape(weight));
  const int64_t n = weight.size(1), k = weight.size(0);
  TORCH_CHECK_VALUE(z.dim() == dy.dim() && z.size(-1) == 2 * n && z.numel() / (2 * n) == dy.numel() / k, op,
                    ": pre_activation must be [..., 2 * hidden] with dy's rows, got ", shape(z));
  TORCH_CHECK_VALUE(activation >= 0 && activation <= static_cast<int64_t>(Activation::kSquaredRelu), op,
                    ": activation must be a gemm::Activation value, got ", num(activation));
  TORCH_CHECK_VALUE(dy.device() == z.device() && weight.device() == z.device(), op,
                    ": dy, weight and pre_activation must be on one device");
  const Activation act = static_cast<Activation>(activation);
  const c10::cuda::CUDAGuard guard(z.device());
  const bool half = z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16;
  if (half && dy.scalar_type() == z.scalar_type() && weight.scalar_type() == z.scalar_type() && dz.is_contiguous() &&
      z.numel() > 0 && k > 0 && n % kAlign == 0 && k % kAlign == 0 &&
      (act == Activation::kSilu || act == Activation::kGelu || act == Activation::kGeluTanh ||
       act == Activation::kRelu)) {
    const Tensor dy_rows = as_rows(dy, k), z_rows = as_rows(z, 2 * n);
    LinearActParams p = dgrad_params(dy_rows, weight, z_rows, dz, act);
    p.gated_grad = true;
    // (in place, z_rows is z: as_rows copies only what the kernel could not read, and the op's z is contiguous)
    if (weight.stride(1) == 1 && linear_act_supported(p) && (!dz.is_same(z) || z_rows.data_ptr() == z.data_ptr())) {
      check_launch(linear_act(p, c10::cuda::getCurrentCUDAStream()), op);
      return;
    }
  }
  const Tensor dh = at::matmul(dy, weight);
  if (!launch_gated_backward(dh, z, dz, act)) dz.copy_(gated_backward_reference(dh, z, act));
}

Tensor gated_dgrad_cuda(const Tensor& dy, const Tensor& weight, const Tensor& z, int64_t activation) {
  Tensor dz = at::empty(z.sizes(), z.options());
  gated_dgrad_into(dy, weight, z, dz, activation);
  return dz;
}

void gated_dgrad_inplace_cuda(const Tensor& dy, const Tensor& weight, const Tensor& z, int64_t activation) {
  TORCH_CHECK(z.is_contiguous(), "gated_dgrad_: pre_activation must be contiguous");
  gated_dgrad_into(dy, weight, z, z, activation);
}

// act_backward's CUDA kernel: dz and dbias in one pass (gemm::act_backward) where the layouts allow (the
// forward's pre-activation is contiguous and aligned; dy as the next op hands it), else the reference.
std::tuple<Tensor, Tensor> act_backward_cuda(const Tensor& dy, const Tensor& z, int64_t activation) {
  TORCH_CHECK_VALUE(activation >= 0 && activation <= static_cast<int64_t>(Activation::kSquaredRelu),
                    "act_backward: unknown activation ", activation);
  const Activation act = static_cast<Activation>(activation);
  TORCH_CHECK(z.dim() >= 1 && dy.sizes() == z.sizes(), "act_backward: dy and pre_activation must be one shape, got ",
              shape(dy), " and ", shape(z));
  TORCH_CHECK(dy.device() == z.device(), "act_backward: dy is on ", dy.device().str(), " but pre_activation on ",
              z.device().str());
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(-1);
  Tensor dz = at::empty(z.sizes(), z.options()), dbias = at::empty({n}, z.options());
  const bool half = z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16;
  if (half && dy.scalar_type() == z.scalar_type() && z.numel() > 0 && act != Activation::kNone) {
    ActBackwardParams p = rows_params<ActBackwardParams>(dy, z, dz, n, n, act);
    p.dbias = dbias.data_ptr();
    // (a workspace from the caching allocator: graph-capture safe)
    const Tensor partials = at::empty({std::max<int64_t>(act_backward_partials(p), 1)}, z.options().dtype(at::kFloat));
    p.partials = partials.data_ptr<float>();
    if (act_backward_supported(p)) {
      check_launch(act_backward(p, c10::cuda::getCurrentCUDAStream()), "act_backward");
      return {dz, dbias};
    }
  }
  return act_backward_reference(dy, z, act);
}

// act_dgrad's CUDA kernel: dz = dh * act'(z) with dh = dy @ weight and dbias = the column sums of dz, by the Hopper
// GEMM with the plain backward in its epilogue (gemm.h: act_grad; weight read as stored, [k, n] MN-major; the tiles'
// column sums added up here in order); where it does not take the call, PyTorch's GEMM and act_backward's pass.
std::tuple<Tensor, Tensor> act_dgrad_cuda(const Tensor& dy, const Tensor& weight, const Tensor& z, int64_t activation) {
  const char* op = "act_dgrad";
  TORCH_CHECK_VALUE(weight.dim() == 2 && dy.dim() >= 1 && dy.size(-1) == weight.size(0), op,
                    ": dy must be [..., out_features] and weight [out_features, hidden], got ", shape(dy), " and ",
                    shape(weight));
  const int64_t n = weight.size(1), k = weight.size(0);
  TORCH_CHECK_VALUE(z.dim() == dy.dim() && z.size(-1) == n && z.numel() / std::max<int64_t>(n, 1) ==
                        dy.numel() / std::max<int64_t>(k, 1), op,
                    ": pre_activation must be [..., hidden] with dy's rows, got ", shape(z));
  TORCH_CHECK_VALUE(activation > 0 && activation <= static_cast<int64_t>(Activation::kSquaredRelu), op,
                    ": activation must be a gemm::Activation value other than none, got ", num(activation));
  TORCH_CHECK_VALUE(dy.device() == z.device() && weight.device() == z.device(), op,
                    ": dy, weight and pre_activation must be on one device");
  const Activation act = static_cast<Activation>(activation);
  const c10::cuda::CUDAGuard guard(z.device());
  const bool half = z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16;
  if (half && dy.scalar_type() == z.scalar_type() && weight.scalar_type() == z.scalar_type() && z.numel() > 0 &&
      k > 0 && n % kAlign == 0 && k % kAlign == 0 && weight.stride(1) == 1) {
    const Tensor dy_rows = as_rows(dy, k), z_rows = as_rows(z, n);
    const int64_t m = dy_rows.size(0);
    Tensor dz = at::empty(z.sizes(), z.options());
    const Tensor partials = at::empty({(m + 63) / 64, n}, z.options().dtype(at::kFloat));
    LinearActParams p = dgrad_params(dy_rows, weight, z_rows, dz, act);
    p.act_grad = true;
    p.dbias_partials = partials.data_ptr<float>();
    if (linear_act_supported(p)) {
      check_launch(linear_act(p, c10::cuda::getCurrentCUDAStream()), op);
      return {dz, partials.sum(0).to(z.scalar_type())};
    }
  }
  return act_backward_cuda(at::matmul(dy, weight), z, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CUDA, m) {
  m.impl("linear_act_fwd", &linear_act_fwd_cuda);
  m.impl("gated_backward", &gated_backward_cuda);
  m.impl("gated_backward_", &gated_backward_inplace_cuda);
  m.impl("act_backward", &act_backward_cuda);
  m.impl("gated_dgrad", &gated_dgrad_cuda);
  m.impl("gated_dgrad_", &gated_dgrad_inplace_cuda);
  m.impl("act_dgrad", &act_dgrad_cuda);
}

}  // namespace fusedkernels::gemm
