// The gemm family's op layer: schemas; the public ops linear_act and linear_gated (argument checks, the choice
// between the fused kernel and the reference, autocast); autograd of the internal linear_act_fwd in C++; the CPU
// kernel (the reference) and the meta kernel of linear_act_fwd. Its CUDA kernel is in gemm_api.cpp.
//
//   fusedkernels::gated_mlp / mlp             CompositeImplicitAutograd: both GEMMs' checks; with a gradient to
//     -> fusedkernels::gated_mlp_fwd / mlp_fwd compute, *_fwd (Autograd: MlpBackward, whose dz comes from gated_dgrad
//                                              / act_dgrad: the act' in the dgrad GEMM's epilogue); else
//                                              linear_gated / linear_act then linear_act
//
//   fusedkernels::linear_act / linear_gated   CompositeImplicitAutograd: check, route, call linear_act_fwd
//     -> fusedkernels::linear_act_fwd     Autograd: attaches LinearActBackward; CUDA: the fused kernel;
//                                         CPU: the reference; Meta: shapes
//        backward: dz = dy * act'(z) on the saved pre-activation z (gated: dz = (dy * up * act'(gate),
//        dy * act(gate))), then the gradient GEMMs, all in PyTorch ops (differentiable, so create_graph only has
//        to recompute z from x, W and b)
//
//   z = x W^T + bias,  out = act(z) + residual, or gated (z = gate | up) act(gate) * up + residual; in the inputs'
//   dtype.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <array>
#include <string_view>

#include "common/torch/autocast.h"
#include "common/torch/autograd.h"
#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "gemm/gemm.h"

TORCH_LIBRARY_FRAGMENT(fusedkernels, m) {
  // Public op: x [..., K], weight [N, K] (nn.Linear's), bias [N], residual like the output [..., N]; all one
  // dtype. activation: none, relu, gelu (erf), gelu_tanh, silu, squared_relu.
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias=None, str activation=\"gelu\", Tensor? residual=None)"
        " -> Tensor");
  // Public op: x [..., K], weight [2N, K] (the gate's N rows, then the up projection's), bias [2N] likewise,
  // residual like the output [..., N]; all one dtype. activation: swiglu (silu gate), geglu (erf gelu),
  // geglu_tanh, reglu (relu).
  m.def("linear_gated(Tensor x, Tensor weight, Tensor? bias=None, str activation=\"swiglu\", Tensor? residual=None)"
        " -> Tensor");
  // Internal. activation: the gemm::Activation value (0 none .. 5 squared_relu), the gate's when gated (weight
  // [2N, K] as linear_gated's). pre_activation: z [..., weight rows] when save_pre_activation (what the backward
  // reads), else an empty tensor. Both outputs contiguous.
  m.def("linear_act_fwd(Tensor x, Tensor weight, Tensor? bias, int activation, Tensor? residual,"
        " bool save_pre_activation, bool gated=False) -> (Tensor out, Tensor pre_activation)");
  // Internal, the gated form's first-order backward: dy [..., N], pre_activation [..., 2N] (gate | up) ->
  // dz = (dy * up * act'(gate)) | (dy * act(gate)), contiguous, pre_activation's shape. activation: the gate's.
  m.def("gated_backward(Tensor dy, Tensor pre_activation, int activation) -> Tensor");
  // The same, dz written over pre_activation (contiguous): the backward's when nothing else can see that buffer.
  m.def("gated_backward_(Tensor dy, Tensor(a!) pre_activation, int activation) -> ()");
  // Internal, the plain form's first-order backward with the bias gradient: dy and pre_activation [..., N] ->
  // dz = dy * act'(pre_activation) (contiguous, pre_activation's shape) and dbias = the sum of dz over every
  // dimension but the last ([N], dz's dtype), in one pass. activation: the gemm::Activation value.
  m.def("act_backward(Tensor dy, Tensor pre_activation, int activation) -> (Tensor dz, Tensor dbias)");
  // The gated MLP (FusedMLP's gated form): down(act(gate) * up) + residual with [gate | up] = x Wgu^T + bgu, i.e.
  // linear_gated(x, gate_up_weight, gate_up_bias, activation) then linear_act(., down_weight, down_bias, "none",
  // residual), with those ops' checks, autocast and kernels; where a gradient is needed and both GEMMs take the
  // kernel, one autograd node whose backward forms dz in the epilogue of the GEMM that produces the gated output's
  // gradient (gated_dgrad) instead of a separate pass.
  m.def("gated_mlp(Tensor x, Tensor gate_up_weight, Tensor? gate_up_bias, Tensor down_weight, Tensor? down_bias=None,"
        " str activation=\"swiglu\", Tensor? residual=None) -> Tensor");
  // Internal: gated_mlp's forward, keeping the gated output h [..., N] and the pre-activation z [..., 2N] for the
  // backward (all three outputs contiguous). activation: the gate's gemm::Activation value.
  m.def("gated_mlp_fwd(Tensor x, Tensor gate_up_weight, Tensor? gate_up_bias, Tensor down_weight,"
        " Tensor? down_bias, int activation, Tensor? residual) -> (Tensor out, Tensor hidden, Tensor pre_activation)");
  // Internal, the gated form's backward through the GEMM before it: dy [..., out_features] of the next projection
  // (weight [out_features, N]), pre_activation z [..., 2N] -> dz = (dh * up * act'(gate)) | (dh * act(gate)) with
  // dh = dy @ weight rounded to the dtype; the in-place form writes dz over z (contiguous).
  m.def("gated_dgrad(Tensor dy, Tensor weight, Tensor pre_activation, int activation) -> Tensor");
  m.def("gated_dgrad_(Tensor dy, Tensor weight, Tensor(a!) pre_activation, int activation) -> ()");
  // The plain MLP (FusedMLP's plain form): fc2(act(fc1(x))) + residual, i.e. linear_act(x, fc1_weight, fc1_bias,
  // activation) then F.linear (linear_act "none" with a residual), with those ops' checks, autocast and kernels; where
  // a gradient is needed and the first GEMM takes the kernel, one autograd node whose backward forms dz = dh *
  // act'(z) and its bias gradient in the epilogue of the GEMM that produces dh (act_dgrad) instead of a separate pass.
  m.def("mlp(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias=None,"
        " str activation=\"gelu\", Tensor? residual=None) -> Tensor");
  // Internal: mlp's forward, keeping the hidden output h [..., H] and the pre-activation z [..., H] (contiguous).
  m.def("mlp_fwd(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias,"
        " int activation, Tensor? residual) -> (Tensor out, Tensor hidden, Tensor pre_activation)");
  // Internal, the plain form's backward through the GEMM before it: dy [..., out_features] of the next projection
  // (weight [out_features, H]), pre_activation z [..., H] -> dz = dh * act'(z) with dh = dy @ weight rounded to the
  // dtype (contiguous, z's shape), and dbias = the sum of dz over its rows ([H], dz's dtype). activation: the
  // gemm::Activation value, not none.
  m.def("act_dgrad(Tensor dy, Tensor weight, Tensor pre_activation, int activation) -> (Tensor dz, Tensor dbias)");
}

namespace fusedkernels::gemm {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// act(z) in PyTorch ops, differentiable: F.relu, F.gelu (approximate "none" / "tanh"), F.silu, and relu(z)^2
// (squared ReLU, So et al. 2021, "Primer").
Tensor activation_ref(const Tensor& z, Activation activation) {
  switch (activation) {
    case Activation::kNone: return z;
    case Activation::kRelu: return at::relu(z);
    case Activation::kGelu: return at::gelu(z, "none");
    case Activation::kGeluTanh: return at::gelu(z, "tanh");
    case Activation::kSilu: return at::silu(z);
    case Activation::kSquaredRelu: return at::relu(z).square();
  }
  TORCH_CHECK(false, "linear_act: unknown activation");
}

// The reference, also gemm_api.cpp's where no kernel takes a call: out = act(F.linear(x, weight, bias)) +
// residual, or gated act(gate) * up + residual with [gate | up] = F.linear(x, weight, bias) (one GEMM over the
// stacked weight), in the inputs' dtype (autocast excluded: the callers cast first), differentiable; z
// (contiguous) when save_pre_activation, else an empty tensor. The outputs never alias each other.
std::tuple<Tensor, Tensor> linear_act_reference(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                Activation activation, const OptTensor& residual,
                                                bool save_pre_activation, bool gated) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  Tensor z = at::linear(x, weight, bias);
  if (save_pre_activation) z = z.contiguous();
  Tensor out;
  if (gated) {
    const auto gate_up = z.chunk(2, -1);
    out = activation_ref(gate_up[0], activation) * gate_up[1];
  } else {
    out = activation_ref(z, activation);
  }
  if (residual) out = out + *residual;
  if (!save_pre_activation) return {out, at::empty({0}, x.options())};
  return {out.is_same(z) ? z.clone() : out, z};
}

namespace {

using torch::autograd::variable_list;

constexpr const char* kReference = "the PyTorch reference (F.linear, the activation, + residual)";
constexpr const char* kGatedReference = "the PyTorch reference (F.linear, act(gate) * up, + residual)";
constexpr std::array<std::pair<std::string_view, Activation>, 6> kActivations = {{
    {"none", Activation::kNone},
    {"relu", Activation::kRelu},
    {"gelu", Activation::kGelu},
    {"gelu_tanh", Activation::kGeluTanh},
    {"silu", Activation::kSilu},
    {"squared_relu", Activation::kSquaredRelu},
}};
// The gated linear units of Shazeer 2020 ("GLU Variants Improve Transformer"), by the gate's activation.
constexpr std::array<std::pair<std::string_view, Activation>, 4> kGatedActivations = {{
    {"swiglu", Activation::kSilu},
    {"geglu", Activation::kGelu},
    {"geglu_tanh", Activation::kGeluTanh},
    {"reglu", Activation::kRelu},
}};

using LinearActFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                                const OptTensor&, bool, bool);

const c10::TypedOperatorHandle<LinearActFwd>& linear_act_fwd_op() {
  static const auto op = find_op<LinearActFwd>("fusedkernels::linear_act_fwd");
  return op;
}

template <size_t kCount>
Activation parse_activation(const char* op, const std::array<std::pair<std::string_view, Activation>, kCount>& known,
                            c10::string_view name) {
  for (const auto& [known_name, activation] : known) {
    if (known_name == name) return activation;
  }
  std::string names;
  for (const auto& entry : known) names += (names.empty() ? "" : ", ") + std::string(entry.first);
  TORCH_CHECK_VALUE(false, op, ": activation must be one of ", names, ", got '", std::string(name), "'");
}

Activation activation_of(int64_t value, const char* op) {
  TORCH_CHECK_VALUE(value >= 0 && value < static_cast<int64_t>(kActivations.size()), op,
                    ": activation must be a gemm::Activation value, 0 (none) .. 5 (squared_relu), got ", num(value));
  return static_cast<Activation>(value);
}

bool multiple_of_8(const c10::SymInt& v) { return (v % 8).sym_eq(0).guard_bool(__FILE__, __LINE__); }

// N: the output's columns, the weight's rows (half of them gated).
c10::SymInt out_features(const Tensor& weight, bool gated) {
  return gated ? weight.sym_size(0) / 2 : weight.sym_size(0);
}

// x.shape[:-1] + [N]
std::vector<c10::SymInt> out_shape(const Tensor& x, const Tensor& weight, bool gated) {
  std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
  sizes.back() = out_features(weight, gated);
  return sizes;
}

// Validates the arguments as F.linear would (RuntimeError), with messages that name them (weight and bias as
// `names` says). Sizes compare symbolically (torch.compile with dynamic shapes). Unlike F.linear, bias must be [N]
// ([2N] gated) and residual the output's shape exactly (no broadcasting), and weight and bias share x's dtype; so
// does the residual unless residual_any_dtype (the public ops add one of another dtype after the fused op, with
// type promotion). A gated weight stacks two halves: an odd number of rows is an error.
// width: what the messages call the (gated) output's width; gated_mlp's gated stage feeds the down projection, so
// there it is the hidden width N, not the MLP's out_features.
void check_args(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                const OptTensor& residual, bool gated, bool residual_any_dtype = false, OperandNames names = {},
                const char* width = "out_features") {
  for (const auto& [name, t] : {std::pair{"x", &x}, std::pair{names.weight, &weight},
                                std::pair{names.bias, bias ? &*bias : nullptr},
                                std::pair{"residual", residual ? &*residual : nullptr}}) {
    TORCH_CHECK_NOT_IMPLEMENTED(t == nullptr || (t->layout() == at::kStrided && !t->is_nested()), op,
                                " takes strided (dense) tensors; ", name, " is ",
                                t != nullptr && t->is_nested() ? std::string("nested") : c10::str(t ? t->layout() : at::kStrided),
                                " (F.linear takes nested and sparse ones)");
  }
  const auto rows = [&] { return gated ? std::string("2 * ") + width : std::string(width); };  // messages only
  const char* w = names.weight;
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., in_features] (at least 1-D), got a 0-D tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": ", w, " must be [", rows(), ", in_features] (2-D), got ", shape(weight));
  TORCH_CHECK(!gated || (weight.sym_size(0) % 2).sym_eq(0).guard_bool(__FILE__, __LINE__), op, ": ", w,
              " must stack the gate's rows and the up projection's, [", rows(), ", in_features]; got ",
              shape(weight), ", an odd number of rows");
  TORCH_CHECK(sym_same(x.sym_size(-1), weight.sym_size(1)), op, ": x and ", w, " shapes cannot be multiplied (x ",
              shape(x), ", ", w, " ", shape(weight), "): x's last dimension must be ", w, "'s in_features");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating-point tensor (float16 or bfloat16 for the fused kernel), got ",
              name_of(x.scalar_type()));
  check_operands_like_x(op, x, weight, bias, residual, residual_any_dtype, /*internal=*/false, names);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && sym_same(bias->sym_size(0), weight.sym_size(0)), op, ": ", names.bias,
                " must be [", rows(), "] = ", shape(c10::SymIntArrayRef(weight.sym_sizes().data(), 1)), ", got ",
                shape(*bias));
  }
  if (residual) {
    const auto sizes = out_shape(x, weight, gated);
    bool same = residual->dim() == x.dim();
    for (int64_t d = 0; same && d < x.dim(); ++d) same = sym_same(residual->sym_size(d), sizes[d]);
    TORCH_CHECK(same, op, ": residual must have the output's shape ", shape(sizes), " (no broadcasting), got ",
                shape(*residual));
  }
}

// A weight as the kernel reads it: in_features contiguous, rows a positive multiple of 8 elements (16 bytes)
// apart, no overlap, and a 16-byte aligned start (the allocator aligns storage, so the offset decides).
bool weight_ready(const Tensor& w) {
  return w.sym_stride(1) == 1 && multiple_of_8(w.sym_stride(0)) &&
         w.sym_stride(0).sym_ge(w.sym_size(1)).guard_bool(__FILE__, __LINE__) && multiple_of_8(w.sym_storage_offset());
}

// Why a call runs the reference instead of the kernel, or nullptr; "" for a silent reason. CPU tensors take the
// op (whose CPU kernel is the reference); other devices (meta, ...) and empty products take the reference
// silently. x, bias and residual of any layout take the kernel (gemm_api.cpp copies what it cannot read).
const char* fallback_reason(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& residual,
                            bool gated) {
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
  const c10::SymInt n = out_features(weight, gated);
  if (x.sym_numel().sym_eq(0).guard_bool(__FILE__, __LINE__) || n.sym_eq(0).guard_bool(__FILE__, __LINE__)) return "";
  if (!multiple_of_8(weight.sym_size(1))) return "in_features (K) not a multiple of 8 has no fused kernel";
  if (!multiple_of_8(n)) return "out_features (N) not a multiple of 8 has no fused kernel";
  if (!weight_ready(weight)) {
    return "a weight whose rows are not contiguous and 16-byte aligned (stride(1) == 1, stride(0) and the "
           "storage offset multiples of 8) has no fused kernel";
  }
  return nullptr;
}

bool needs_grad(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  return at::GradMode::is_enabled() && (requires_grad(x) || requires_grad(weight) || requires_grad(bias));
}

// The public ops after parsing the activation: check, then the reference (with one warning per reason) or
// linear_act_fwd.
Tensor route(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias, Activation act,
             const OptTensor& residual, bool gated) {
  // No activation and no residual leave no epilogue to fuse: F.linear itself, its checks, errors and autograd
  // included (cuBLAS on CUDA, the bias in its epilogue; docs/gemm.md, Routing), with no warning
  if (act == Activation::kNone && !residual && !gated) return at::linear(x, weight, bias);
  check_args(op, x, weight, bias, residual, gated, /*residual_any_dtype=*/true);
  if (residual && residual->scalar_type() != x.scalar_type()) {
    // as `act(F.linear(x, weight, bias)) + residual`: the add promotes (a float32 residual stream, an integer
    // residual), so it runs after the fused op
    return route(op, x, weight, bias, act, std::nullopt, gated) + *residual;
  }
  if (const char* why = fallback_reason(x, weight, bias, residual, gated)) {
    warn_fallback(op, why, gated ? kGatedReference : kReference);
    return std::get<0>(linear_act_reference(x, weight, bias, act, residual, false, gated));
  }
  // z only where a backward will read it: act' of the identity needs nothing, the gated form always needs it
  const bool save = (gated || act != Activation::kNone) && needs_grad(x, weight, bias);
  return std::get<0>(linear_act_fwd_op().call(x, weight, bias, static_cast<int64_t>(act), residual, save, gated));
}

Tensor linear_act_composite(const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::string_view activation,
                            const OptTensor& residual) {
  return route("linear_act", x, weight, bias, parse_activation("linear_act", kActivations, activation), residual,
               false);
}

Tensor linear_gated_composite(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                              c10::string_view activation, const OptTensor& residual) {
  return route("linear_gated", x, weight, bias, parse_activation("linear_gated", kGatedActivations, activation),
               residual, true);
}

using PublicOp = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, const OptTensor&);

// Autocast: what autocast does to aten::linear, on its lower-precision list for CUDA and for CPU: cast x,
// weight and bias to the device's autocast dtype. The residual is left as it is, as the unfused form's add
// leaves it: one in the autocast dtype joins the fused epilogue, another is added after it with promotion.
template <c10::DeviceType kDevice, PublicOp* kOp>
Tensor autocast(const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::string_view activation,
                const OptTensor& residual) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>);
  const auto cast = [](const auto& t) { return autocast_lower<kDevice>(t); };
  return kOp(cast(x), cast(weight), cast(bias), activation, residual);
}

// ------------------------------------------------------------------------------------------------
// Autograd
// ------------------------------------------------------------------------------------------------

// dz = dy * act'(z), as torch's own backward formulas (derivatives.yaml): threshold_backward for relu,
// gelu_backward in the erf and tanh forms, silu_backward (under create_graph its differentiable form, as torch's
// infinitely_differentiable_silu_backward: silu_backward has no derivative) and d relu(z)^2 = 2 relu(z) dz. All
// differentiable in dy and z when grad mode is on.
Tensor activation_backward(const Tensor& dy, const Tensor& z, Activation activation) {
  switch (activation) {
    case Activation::kNone: return dy;
    case Activation::kRelu: return at::threshold_backward(dy, z, 0);
    case Activation::kGelu: return at::gelu_backward(dy, z, "none");
    case Activation::kGeluTanh: return at::gelu_backward(dy, z, "tanh");
    case Activation::kSilu: {
      if (!at::GradMode::is_enabled()) return at::silu_backward(dy, z);
      const Tensor sigmoid = z.sigmoid();
      return dy * sigmoid * (1.0 + z * (1.0 - sigmoid));
    }
    case Activation::kSquaredRelu: return dy * (at::relu(z) * 2);
  }
  TORCH_CHECK(false, "linear_act: unknown activation");
}

}  // namespace

// The gated form, z = gate | up and out = act(gate) * up: dz = (dy * up * act'(gate)) | (dy * act(gate)), in
// PyTorch ops (differentiable under create_graph). The CPU kernel of gated_backward, and the CUDA one's fallback.
Tensor gated_backward_reference(const Tensor& dy, const Tensor& z, Activation activation) {
  const auto gate_up = z.chunk(2, -1);
  return at::cat({activation_backward(dy * gate_up[1], gate_up[0], activation),
                  dy * activation_ref(gate_up[0], activation)},
                 -1);
}

// [..., C] -> [rows, C] (a 1-D tensor is one row); reshape, which autograd's batched gradients
// (is_grads_batched) have a rule for, where flatten has none. Symbolic sizes, so that a backward traced by
// torch.compile with dynamic shapes does not fix the row count.
Tensor as_rows(const Tensor& t) {
  c10::SymInt rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows = rows * t.sym_size(d);
  return t.reshape_symint({rows, t.sym_size(-1)});
}

// The plain form's dz = dy * act'(z) and dbias = the sum of dz over its rows, in PyTorch ops: act_backward's CPU
// kernel and the CUDA one's fallback.
std::tuple<Tensor, Tensor> act_backward_reference(const Tensor& dy, const Tensor& z, Activation activation) {
  // new tensors in z's dtype, as the schema and the kernel give (act none would hand dy itself back)
  Tensor dz = activation_backward(dy, z, activation).to(z.scalar_type());
  dz = dz.is_same(dy) ? dz.clone(at::MemoryFormat::Contiguous) : dz.contiguous();
  return {dz, as_rows(dz).sum(0)};  // (out_features 0 too: the rows are counted, not inferred)
}

namespace {

using GatedBackward = Tensor(const Tensor&, const Tensor&, int64_t);

const c10::TypedOperatorHandle<GatedBackward>& gated_backward_op() {
  static const auto op = find_op<GatedBackward>("fusedkernels::gated_backward");
  return op;
}

// dz of the gated form: one fused pass below autograd (gated_backward's CUDA kernel) for a first-order
// backward; under create_graph the differentiable reference.
Tensor gated_backward(const Tensor& dy, const Tensor& z, Activation activation) {
  if (at::GradMode::is_enabled()) return gated_backward_reference(dy, z, activation);
  return gated_backward_op().call(dy, z, static_cast<int64_t>(activation));
}

Tensor gated_backward_cpu(const Tensor& dy, const Tensor& z, int64_t activation) {
  return gated_backward_reference(dy, z, activation_of(activation, "gated_backward")).contiguous();
}

void gated_backward_inplace_cpu(const Tensor& dy, const Tensor& z, int64_t activation) {
  z.copy_(gated_backward_reference(dy, z, activation_of(activation, "gated_backward_")));
}

void gated_backward_inplace_meta(const Tensor&, const Tensor&, int64_t activation) {
  activation_of(activation, "gated_backward_");
}

using GatedBackwardInplace = void(const Tensor&, const Tensor&, int64_t);

const c10::TypedOperatorHandle<GatedBackwardInplace>& gated_backward_inplace_op() {
  static const auto op = find_op<GatedBackwardInplace>("fusedkernels::gated_backward_");
  return op;
}

// Whether the backward may write dz over the saved pre-activation z: its graph is released after this call
// (no retain_graph), z and dy are plain tensors (not ones a trace runs the backward on, nor batched), z went
// through no saved_tensors_hooks and nothing else holds it or its memory (the saved variable and this call's
// handle only; the test torch's AccumulateGrad makes before it steals a gradient). The step's peak then holds one
// [rows, 2N] buffer for z and dz, not two (docs/gemm.md).
bool reusable_pre_activation(const torch::autograd::SavedVariable& saved, const Tensor& z, const Tensor& dy) {
  return !torch::autograd::get_current_graph_task_keep_graph() && plain_tensor(z) && plain_tensor(dy) &&
         !saved.has_hooks() && z.is_contiguous() && z.use_count() <= 2 && z.storage().use_count() == 1;
}

Tensor gated_backward_meta(const Tensor& dy, const Tensor& z, int64_t activation) {
  activation_of(activation, "gated_backward");
  return at::empty_symint(z.sym_sizes(), z.options());
}

std::tuple<Tensor, Tensor> act_backward_cpu(const Tensor& dy, const Tensor& z, int64_t activation) {
  return act_backward_reference(dy, z, activation_of(activation, "act_backward"));
}

std::tuple<Tensor, Tensor> act_backward_meta(const Tensor& dy, const Tensor& z, int64_t activation) {
  activation_of(activation, "act_backward");
  return {at::empty_symint(z.sym_sizes(), z.options()), at::empty_symint({z.sym_size(-1)}, z.options())};
}

using ActBackward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t);

const c10::TypedOperatorHandle<ActBackward>& act_backward_op() {
  static const auto op = find_op<ActBackward>("fusedkernels::act_backward");
  return op;
}

// The backward of linear_act_fwd; next edges x, weight, bias, residual (absent ones have empty edges):
// dx = dz W, dW = dz^T x and dbias = sum of dz over rows (leading dimensions flattened), dresidual = dy.
struct LinearActBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x, weight, bias, pre_activation;
  Activation activation = Activation::kNone;
  bool has_bias = false, gated = false;

  std::string name() const override { return "fusedkernels::LinearActBackward"; }

  void release_variables() override {
    for (auto* v : {&x, &weight, &bias, &pre_activation}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const Tensor x_ = x.unpack(), w = weight.unpack();
    const bool want_x = task_should_compute_output(0), want_w = task_should_compute_output(1),
               want_b = has_bias && task_should_compute_output(2);
    if (want_x || want_w || want_b) {
      Tensor z;
      if (gated || activation != Activation::kNone) {
        // create_graph: z recomputed from x, W, b so that second derivatives see it depend on them; else the
        // forward's (recomputed if a direct call of linear_act_fwd did not keep it). The bias is unpacked only
        // then: like F.linear's backward, the first-order one does not read it (an in-place update of it
        // between forward and backward is no error).
        z = at::GradMode::is_enabled() ? Tensor() : pre_activation.unpack();
        if (!z.defined()) z = at::linear(x_, w, has_bias ? OptTensor(bias.unpack()) : std::nullopt);
      }
      Tensor dz, dbias;
      if (gated && !at::GradMode::is_enabled() && reusable_pre_activation(pre_activation, z, dy)) {
        gated_backward_inplace_op().call(dy, z, static_cast<int64_t>(activation));
        dz = z;
      } else if (!gated && want_b && activation != Activation::kNone && !at::GradMode::is_enabled() &&
                 plain_tensor(dy) && plain_tensor(z)) {
        // the bias gradient in the activation's backward pass (a batched or traced backward takes ATen's ops)
        std::tie(dz, dbias) = act_backward_op().call(dy, z, static_cast<int64_t>(activation));
      } else {
        dz = gated ? gated_backward(dy, z, activation) : activation_backward(dy, z, activation);
      }
      if (want_x) out[0] = at::matmul(dz, w);
      const Tensor dz_rows = as_rows(dz);
      if (want_w) out[1] = dz_rows.t().mm(as_rows(x_));
      if (want_b) out[2] = dbias.defined() ? dbias : dz_rows.sum(0);
    }
    if (task_should_compute_output(3)) out[3] = dy;
    return out;
  }
};

std::tuple<Tensor, Tensor> linear_act_fwd_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                   int64_t activation, const OptTensor& residual,
                                                   bool save_pre_activation, bool gated) {
  const Activation act = activation_of(activation, "linear_act_fwd");
  const bool tangents =
      has_forward_grad(x) || has_forward_grad(weight) || has_forward_grad(bias) || has_forward_grad(residual);
  const bool grad = needs_grad(x, weight, bias) || (at::GradMode::is_enabled() && requires_grad(residual));
  auto results = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_act_fwd_op().call(x, weight, bias, activation, residual, save_pre_activation, gated);
  }();
  if (tangents) {
    // Tangents reach here where the public op could not see them (torch.func transforms nest forward-mode AD
    // inside other levels): the output from the differentiable reference, z from the op.
    return {std::get<0>(linear_act_reference(x, weight, bias, act, residual, false, gated)), std::get<1>(results)};
  }
  if (grad) {
    auto node = make_node<LinearActBackward>();
    auto& n = static_cast<LinearActBackward&>(*node);
    n.set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, residual));
    torch::autograd::set_history(std::get<0>(results), node);
    n.x = torch::autograd::SavedVariable(x, false);
    n.weight = torch::autograd::SavedVariable(weight, false);
    if (bias) n.bias = torch::autograd::SavedVariable(*bias, false);
    n.has_bias = bias.has_value();
    if (save_pre_activation) n.pre_activation = torch::autograd::SavedVariable(std::get<1>(results), false);
    n.activation = act;
    n.gated = gated;
  }
  return results;
}

// ------------------------------------------------------------------------------------------------
// The MLPs: gated (gated_mlp) and plain (mlp)
// ------------------------------------------------------------------------------------------------

using MlpFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                  const OptTensor&, int64_t, const OptTensor&);
using GatedDgrad = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);
using GatedDgradInplace = void(const Tensor&, const Tensor&, const Tensor&, int64_t);
using ActDgrad = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t);

// gated_mlp_fwd (kGated) or mlp_fwd
template <bool kGated>
const c10::TypedOperatorHandle<MlpFwd>& mlp_fwd_op() {
  static const auto op = find_op<MlpFwd>(kGated ? "fusedkernels::gated_mlp_fwd" : "fusedkernels::mlp_fwd");
  return op;
}
const c10::TypedOperatorHandle<ActDgrad>& act_dgrad_op() {
  static const auto op = find_op<ActDgrad>("fusedkernels::act_dgrad");
  return op;
}
const c10::TypedOperatorHandle<GatedDgrad>& gated_dgrad_op() {
  static const auto op = find_op<GatedDgrad>("fusedkernels::gated_dgrad");
  return op;
}
const c10::TypedOperatorHandle<GatedDgradInplace>& gated_dgrad_inplace_op() {
  static const auto op = find_op<GatedDgradInplace>("fusedkernels::gated_dgrad_");
  return op;
}

// One node for both GEMMs (next edges x, the first projection's weight and bias, the second's, residual): dW_down =
// dy^T h, dbias_down = sum of dy, dz from gated_dgrad (over the saved z when nothing else sees it) or, plain, dz and
// its bias gradient from act_dgrad, then dx = dz W1, dW1 = dz^T x, dbias_1 = sum of dz, dresidual = dy. Under
// create_graph the same formulas in differentiable PyTorch ops on z and h recomputed from x and the weights.
// (gate_up_*: the first projection's, W1 and b1 for the plain form.)
struct MlpBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x, gate_up_weight, gate_up_bias, down_weight, hidden, pre_activation;
  Activation activation = Activation::kSilu;
  bool gated = true, has_gate_up_bias = false, has_down_bias = false;

  std::string name() const override {
    return gated ? "fusedkernels::GatedMlpBackward" : "fusedkernels::MlpBackward";
  }

  void release_variables() override {
    for (auto* v : {&x, &gate_up_weight, &gate_up_bias, &down_weight, &hidden, &pre_activation}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const bool want_x = task_should_compute_output(0), want_wgu = task_should_compute_output(1),
               want_bgu = has_gate_up_bias && task_should_compute_output(2),
               want_wd = task_should_compute_output(3), want_bd = has_down_bias && task_should_compute_output(4);
    const Tensor x_ = x.unpack(), wgu = gate_up_weight.unpack(), wd = down_weight.unpack();
    const bool create_graph = at::GradMode::is_enabled();
    Tensor z, h;
    if (create_graph) {  // recomputed, so that second derivatives see them depend on x and the weights
      z = at::linear(x_, wgu, has_gate_up_bias ? OptTensor(gate_up_bias.unpack()) : std::nullopt);
      if (gated) {
        const auto gate_up = z.chunk(2, -1);
        h = activation_ref(gate_up[0], activation) * gate_up[1];
      } else {
        h = activation_ref(z, activation);
      }
    } else {
      z = pre_activation.unpack();
      h = hidden.unpack();
    }
    const Tensor dy_rows = as_rows(dy);
    if (want_wd) out[3] = dy_rows.t().mm(as_rows(h));
    if (want_bd) out[4] = dy_rows.sum(0);
    if (want_x || want_wgu || want_bgu) {
      Tensor dz, dbias;
      if (create_graph || (!gated && !(plain_tensor(dy) && plain_tensor(z)))) {
        // (a batched or traced plain backward takes ATen's ops, as linear_act's)
        const Tensor dh = at::matmul(dy, wd);
        dz = gated ? gated_backward_reference(dh, z, activation) : activation_backward(dh, z, activation);
      } else if (!gated) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        std::tie(dz, dbias) = act_dgrad_op().call(dy, wd, z, static_cast<int64_t>(activation));
      } else {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;  // no derivative; z is released after this
        if (reusable_pre_activation(pre_activation, z, dy)) {
          gated_dgrad_inplace_op().call(dy, wd, z, static_cast<int64_t>(activation));
          dz = z;
        } else {
          dz = gated_dgrad_op().call(dy, wd, z, static_cast<int64_t>(activation));
        }
      }
      if (want_x) out[0] = at::matmul(dz, wgu);
      const Tensor dz_rows = as_rows(dz);
      if (want_wgu) out[1] = dz_rows.t().mm(as_rows(x_));
      if (want_bgu) out[2] = dbias.defined() ? dbias : dz_rows.sum(0);
    }
    if (task_should_compute_output(5)) out[5] = dy;
    return out;
  }
};

constexpr const char* mlp_name(bool gated) { return gated ? "gated_mlp" : "mlp"; }
constexpr const char* mlp_fwd_name(bool gated) { return gated ? "gated_mlp_fwd" : "mlp_fwd"; }

// gated_mlp_fwd / mlp_fwd below autograd (every backend: linear_act_fwd's kernels do the work). The plain form's
// second GEMM without a residual is F.linear (cuBLAS), as linear_act "none" runs it.
template <bool kGated>
std::tuple<Tensor, Tensor, Tensor> mlp_fwd_impl(const Tensor& x, const Tensor& gate_up_weight,
                                                const OptTensor& gate_up_bias, const Tensor& down_weight,
                                                const OptTensor& down_bias, int64_t activation,
                                                const OptTensor& residual) {
  activation_of(activation, mlp_fwd_name(kGated));
  auto [h, z] = linear_act_fwd_op().call(x, gate_up_weight, gate_up_bias, activation, std::nullopt, true, kGated);
  Tensor out = !kGated && !residual ? at::linear(h, down_weight, down_bias)
                                    : std::get<0>(linear_act_fwd_op().call(h, down_weight, down_bias,
                                                                           static_cast<int64_t>(Activation::kNone),
                                                                           residual, false, false));
  return {out, h, z};
}

template <bool kGated>
std::tuple<Tensor, Tensor, Tensor> mlp_fwd_autograd(const Tensor& x, const Tensor& gate_up_weight,
                                                    const OptTensor& gate_up_bias, const Tensor& down_weight,
                                                    const OptTensor& down_bias, int64_t activation,
                                                    const OptTensor& residual) {
  const Activation act = activation_of(activation, mlp_fwd_name(kGated));
  auto results = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mlp_fwd_op<kGated>().call(x, gate_up_weight, gate_up_bias, down_weight, down_bias, activation, residual);
  }();
  const bool grad = needs_grad(x, gate_up_weight, gate_up_bias) ||
                    (at::GradMode::is_enabled() &&
                     (requires_grad(down_weight) || requires_grad(down_bias) || requires_grad(residual)));
  if (grad) {
    auto node = make_node<MlpBackward>();
    auto& n = static_cast<MlpBackward&>(*node);
    n.set_next_edges(
        torch::autograd::collect_next_edges(x, gate_up_weight, gate_up_bias, down_weight, down_bias, residual));
    torch::autograd::set_history(std::get<0>(results), node);
    n.x = torch::autograd::SavedVariable(x, false);
    n.gate_up_weight = torch::autograd::SavedVariable(gate_up_weight, false);
    if (gate_up_bias) n.gate_up_bias = torch::autograd::SavedVariable(*gate_up_bias, false);
    n.down_weight = torch::autograd::SavedVariable(down_weight, false);
    n.hidden = torch::autograd::SavedVariable(std::get<1>(results), false);
    n.pre_activation = torch::autograd::SavedVariable(std::get<2>(results), false);
    n.activation = act;
    n.gated = kGated;
    n.has_gate_up_bias = gate_up_bias.has_value();
    n.has_down_bias = down_bias.has_value();
  }
  return results;
}

// The MLPs' arguments, in their own words: the first projection's as linear_gated (gated) or linear_act checks them,
// then the second's, whose x is the hidden output [..., N] (N = the first weight's rows, / 2 gated).
void check_mlp_args(bool gated, const Tensor& x, const Tensor& gate_up_weight, const OptTensor& gate_up_bias,
                    const Tensor& down_weight, const OptTensor& down_bias, const OptTensor& residual) {
  const char* op = mlp_name(gated);
  const OperandNames first = gated ? OperandNames{"gate_up_weight", "gate_up_bias"}
                                   : OperandNames{"fc1_weight", "fc1_bias"};
  const OperandNames second = gated ? OperandNames{"down_weight", "down_bias"} : OperandNames{"fc2_weight", "fc2_bias"};
  check_args(op, x, gate_up_weight, gate_up_bias, std::nullopt, gated, false, first, "N");
  for (const auto& [name, t] : {std::pair{second.weight, &down_weight},
                                std::pair{second.bias, down_bias ? &*down_bias : nullptr},
                                std::pair{"residual", residual ? &*residual : nullptr}}) {
    TORCH_CHECK_NOT_IMPLEMENTED(t == nullptr || (t->layout() == at::kStrided && !t->is_nested()), op,
                                " takes strided (dense) tensors; ", name, " is ",
                                t != nullptr && t->is_nested() ? std::string("nested") : c10::str(t ? t->layout() : at::kStrided),
                                " (F.linear takes nested and sparse ones)");
  }
  TORCH_CHECK(down_weight.dim() == 2 && sym_same(down_weight.sym_size(1), out_features(gate_up_weight, gated)), op,
              ": ", second.weight, " must be [out_features, N], N the hidden width (", first.weight, " is [",
              gated ? "2 * " : "", "N, in_features] = ", shape(gate_up_weight), "), got ", shape(down_weight));
  check_operands_like_x(op, x, down_weight, down_bias, residual, /*residual_any_dtype=*/true, /*internal=*/false,
                        second);
  if (down_bias) {
    TORCH_CHECK(down_bias->dim() == 1 && sym_same(down_bias->sym_size(0), down_weight.sym_size(0)), op, ": ",
                second.bias, " must be [out_features] = ",
                shape(c10::SymIntArrayRef(down_weight.sym_sizes().data(), 1)), ", got ", shape(*down_bias));
  }
  if (residual) {
    std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
    sizes.back() = down_weight.sym_size(0);
    bool same = residual->dim() == x.dim();
    for (int64_t d = 0; same && d < x.dim(); ++d) same = sym_same(residual->sym_size(d), sizes[d]);
    TORCH_CHECK(same, op, ": residual must have the output's shape ", shape(sizes), " (no broadcasting), got ",
                shape(*residual));
  }
}

// The public ops: checked as above; where a gradient is needed, both GEMMs take the kernel and the residual (if any)
// has x's dtype, the one-node path; otherwise the two ops, as an unfused MLP calls them (their fallback warnings
// name them). The plain form's activation is not none (whose MLP is two GEMMs with nothing between them to fuse).
template <bool kGated>
Tensor mlp_composite(const Tensor& x, const Tensor& gate_up_weight, const OptTensor& gate_up_bias,
                     const Tensor& down_weight, const OptTensor& down_bias, c10::string_view activation,
                     const OptTensor& residual) {
  const Activation act = kGated ? parse_activation(mlp_name(kGated), kGatedActivations, activation)
                                : parse_activation(mlp_name(kGated), kActivations, activation);
  check_mlp_args(kGated, x, gate_up_weight, gate_up_bias, down_weight, down_bias, residual);
  const bool grad = needs_grad(x, gate_up_weight, gate_up_bias) ||
                    (at::GradMode::is_enabled() && (requires_grad(down_weight) || requires_grad(down_bias)));
  if (grad && (kGated || act != Activation::kNone) && (!residual || residual->scalar_type() == x.scalar_type()) &&
      fallback_reason(x, gate_up_weight, gate_up_bias, std::nullopt, kGated) == nullptr &&
      fallback_reason(x, down_weight, down_bias, residual, false) == nullptr) {
    return std::get<0>(mlp_fwd_op<kGated>().call(x, gate_up_weight, gate_up_bias, down_weight, down_bias,
                                                 static_cast<int64_t>(act), residual));
  }
  const Tensor h = route(kGated ? "linear_gated" : "linear_act", x, gate_up_weight, gate_up_bias, act, std::nullopt,
                         kGated);
  return route("linear_act", h, down_weight, down_bias, Activation::kNone, residual, false);
}

template <c10::DeviceType kDevice, bool kGated>
Tensor mlp_autocast(const Tensor& x, const Tensor& gate_up_weight, const OptTensor& gate_up_bias,
                    const Tensor& down_weight, const OptTensor& down_bias, c10::string_view activation,
                    const OptTensor& residual) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>);
  const auto cast = [](const auto& t) { return autocast_lower<kDevice>(t); };
  return mlp_composite<kGated>(cast(x), cast(gate_up_weight), cast(gate_up_bias), cast(down_weight),
                               cast(down_bias), activation, residual);
}

// ------------------------------------------------------------------------------------------------
// CPU and Meta kernels
// ------------------------------------------------------------------------------------------------

Tensor gated_dgrad_cpu(const Tensor& dy, const Tensor& weight, const Tensor& z, int64_t activation) {
  return gated_backward_reference(at::matmul(dy, weight), z, activation_of(activation, "gated_dgrad")).contiguous();
}

void gated_dgrad_inplace_cpu(const Tensor& dy, const Tensor& weight, const Tensor& z, int64_t activation) {
  z.copy_(gated_backward_reference(at::matmul(dy, weight), z, activation_of(activation, "gated_dgrad_")));
}

std::tuple<Tensor, Tensor> act_dgrad_cpu(const Tensor& dy, const Tensor& weight, const Tensor& z, int64_t activation) {
  const Activation act = activation_of(activation, "act_dgrad");
  TORCH_CHECK_VALUE(act != Activation::kNone, "act_dgrad: activation none has no derivative to apply");
  return act_backward_reference(at::matmul(dy, weight), z, act);
}

std::tuple<Tensor, Tensor> act_dgrad_meta(const Tensor&, const Tensor&, const Tensor& z, int64_t activation) {
  activation_of(activation, "act_dgrad");
  return {at::empty_symint(z.sym_sizes(), z.options()), at::empty_symint({z.sym_size(-1)}, z.options())};
}

Tensor gated_dgrad_meta(const Tensor&, const Tensor&, const Tensor& z, int64_t activation) {
  activation_of(activation, "gated_dgrad");
  return at::empty_symint(z.sym_sizes(), z.options());
}

void gated_dgrad_inplace_meta(const Tensor&, const Tensor&, const Tensor&, int64_t activation) {
  activation_of(activation, "gated_dgrad_");
}

std::tuple<Tensor, Tensor> linear_act_fwd_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                              int64_t activation, const OptTensor& residual,
                                              bool save_pre_activation, bool gated) {
  check_args("linear_act_fwd", x, weight, bias, residual, gated);
  auto [out, z] = linear_act_reference(x, weight, bias, activation_of(activation, "linear_act_fwd"), residual,
                                       save_pre_activation, gated);
  return {out.contiguous(), z};
}

// Outputs contiguous, as the CPU and CUDA kernels' (whatever x's layout).
std::tuple<Tensor, Tensor> linear_act_fwd_meta(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                               int64_t activation, const OptTensor& residual,
                                               bool save_pre_activation, bool gated) {
  check_args("linear_act_fwd", x, weight, bias, residual, gated);
  activation_of(activation, "linear_act_fwd");
  // z has the weight's rows as columns: [..., 2N] gated
  const Tensor z = save_pre_activation ? at::empty_symint(out_shape(x, weight, false), x.options())
                                       : at::empty({0}, x.options());
  return {at::empty_symint(out_shape(x, weight, gated), x.options()), z};
}

const RegisterOpInfo linear_act_info{
    {"gemm", "linear_act", "float16, bfloat16 (x, weight, bias, residual alike)",
     "in_features and out_features multiples of 8, any rows; activations none, relu, gelu, gelu_tanh, silu, "
     "squared_relu; bias and residual optional; sm_80+ (sm_90: the TMA / wgmma kernel); none without a residual is "
     "F.linear (cuBLAS)"}};
const RegisterOpInfo gated_mlp_info{
    {"gemm", "gated_mlp", "float16, bfloat16 (x, weights, biases, residual alike)",
     "FusedMLP's gated form: linear_gated's sizes for the first GEMM, linear_act's for the second; with a gradient, "
     "dz formed in the epilogue of the GEMM producing the hidden layer's gradient (sm_90; elsewhere PyTorch's GEMM "
     "and one pass)"}};
const RegisterOpInfo mlp_info{
    {"gemm", "mlp", "float16, bfloat16 (x, weights, biases, residual alike)",
     "FusedMLP's plain form: linear_act's sizes for both GEMMs; with a gradient, dz = dh * act'(z) and the first "
     "bias's gradient formed in the epilogue of the GEMM producing dh (sm_90; elsewhere PyTorch's GEMM and one "
     "pass)"}};
const RegisterOpInfo linear_gated_info{
    {"gemm", "linear_gated", "float16, bfloat16 (x, weight, bias, residual alike)",
     "in_features and out_features multiples of 8 (weight [2 * out_features, in_features]), any rows; swiglu, "
     "geglu, geglu_tanh, reglu; bias and residual optional; sm_80+ (sm_90: the TMA / wgmma kernel)"}};

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CompositeImplicitAutograd, m) {
  m.impl("linear_act", &linear_act_composite);
  m.impl("linear_gated", &linear_gated_composite);
  m.impl("gated_mlp", &mlp_composite<true>);
  m.impl("mlp", &mlp_composite<false>);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCUDA, m) {
  m.impl("linear_act", &autocast<c10::DeviceType::CUDA, linear_act_composite>);
  m.impl("linear_gated", &autocast<c10::DeviceType::CUDA, linear_gated_composite>);
  m.impl("gated_mlp", &mlp_autocast<c10::DeviceType::CUDA, true>);
  m.impl("mlp", &mlp_autocast<c10::DeviceType::CUDA, false>);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCPU, m) {
  m.impl("linear_act", &autocast<c10::DeviceType::CPU, linear_act_composite>);
  m.impl("linear_gated", &autocast<c10::DeviceType::CPU, linear_gated_composite>);
  m.impl("gated_mlp", &mlp_autocast<c10::DeviceType::CPU, true>);
  m.impl("mlp", &mlp_autocast<c10::DeviceType::CPU, false>);
}

TORCH_LIBRARY_IMPL(fusedkernels, Autograd, m) {
  m.impl("linear_act_fwd", &linear_act_fwd_autograd);
  m.impl("gated_mlp_fwd", &mlp_fwd_autograd<true>);
  m.impl("mlp_fwd", &mlp_fwd_autograd<false>);
  // Differentiating these directly is an error (linear_act_fwd's and the MLPs' backward cover them).
  m.impl("gated_backward_", torch::CppFunction::makeFromBoxedFunction<&inplace_without_derivative>());
  m.impl("gated_dgrad_", torch::CppFunction::makeFromBoxedFunction<&inplace_without_derivative>());
  m.impl("gated_dgrad", torch::autograd::autogradNotImplementedFallback());
  m.impl("act_dgrad", torch::autograd::autogradNotImplementedFallback());
}

// gated_backward_ and gated_dgrad_ write pre_activation: its version counter moves, as for torch's in-place ops.
TORCH_LIBRARY_IMPL(fusedkernels, ADInplaceOrView, m) {
  m.impl("gated_backward_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("gated_dgrad_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

TORCH_LIBRARY_IMPL(fusedkernels, CPU, m) {
  m.impl("linear_act_fwd", &linear_act_fwd_cpu);
  m.impl("gated_backward", &gated_backward_cpu);
  m.impl("gated_backward_", &gated_backward_inplace_cpu);
  m.impl("gated_dgrad", &gated_dgrad_cpu);
  m.impl("gated_dgrad_", &gated_dgrad_inplace_cpu);
  m.impl("act_backward", &act_backward_cpu);
  m.impl("act_dgrad", &act_dgrad_cpu);
}

// gated_mlp_fwd and mlp_fwd are their GEMM calls on every backend (they dispatch on to the CPU, CUDA or Meta kernels)
TORCH_LIBRARY_IMPL(fusedkernels, CompositeExplicitAutograd, m) {
  m.impl("gated_mlp_fwd", &mlp_fwd_impl<true>);
  m.impl("mlp_fwd", &mlp_fwd_impl<false>);
}

TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) {
  m.impl("linear_act_fwd", &linear_act_fwd_meta);
  m.impl("gated_backward", &gated_backward_meta);
  m.impl("gated_backward_", &gated_backward_inplace_meta);
  m.impl("gated_dgrad", &gated_dgrad_meta);
  m.impl("gated_dgrad_", &gated_dgrad_inplace_meta);
  m.impl("act_backward", &act_backward_meta);
  m.impl("act_dgrad", &act_dgrad_meta);
}

}  // namespace fusedkernels::gemm
