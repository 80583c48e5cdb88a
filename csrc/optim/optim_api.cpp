// The optim family's ops: schemas, and the CUDA kernels of fusedkernels::{adam_step_, sgd_step_, lamb_step_,
// lamb_moments_, lamb_apply_, grad_norm, scale_grads_}: check the tensor lists, pack them into TensorTables
// (kTableTensors a launch) and launch on the current stream. Their CPU kernels are Python (fusedkernels/ops/optim.py: PyTorch's fused
// and foreach CPU ops where they compute the same thing, else the reference).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/torch/autograd.h"
#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "optim/optim.h"

TORCH_LIBRARY_FRAGMENT(fusedkernels, m) {
  // One fused pass over every tensor of the lists. Unused lists are empty. steps: each param's float32 step
  // count before this step; the op adds 1 unless found_inf says the step is skipped. lr_tensor, grad_scale,
  // found_inf, clip_coef: one-element float32 device tensors (capturable lr, GradScaler, deferred
  // clipping). Grads are written back unscaled when grad_scale is given.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs,"
      " Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] masters, Tensor(g!)[] steps, float lr, Tensor? lr_tensor,"
      " float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize,"
      " Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef) -> ()");
  // steps: needed with momentum (a param's first step, counted on the device, starts its buffer).
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor(d!)[] masters,"
      " Tensor(e!)[] steps, float lr, Tensor? lr_tensor, float momentum, float dampening, float weight_decay,"
      " bool nesterov, bool maximize, Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef) -> ()");
  // LAMB (apex FusedLAMB's formulas); grad_norm: total 2-norm of the raw grads, which are then clipped
  // to max_grad_norm inside the step, or None (no clipping).
  m.def(
      "lamb_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs,"
      " Tensor(e!)[] masters, Tensor(f!)[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps,"
      " float weight_decay, bool decoupled, bool bias_correction, bool grad_averaging, bool always_adapt,"
      " Tensor? grad_norm, float max_grad_norm, bool maximize, Tensor? grad_scale, Tensor? found_inf,"
      " Tensor? clip_coef) -> ()");
  // lamb_step_ in two phases, for params sharded across processes: lamb_moments_ updates the moments and
  // returns each param's sum of w^2 and of u^2 over its local elements ([params, 2] float32, in list order); the caller adds them up across the shards; lamb_apply_ takes those totals, applies the trust
  // ratios and counts the step.
  m.def(
      "lamb_moments_(Tensor[] params, Tensor(a!)[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
      " Tensor[] masters, Tensor[] steps, float beta1, float beta2, float eps, float weight_decay, bool decoupled,"
      " bool bias_correction, bool grad_averaging, Tensor? grad_norm, float max_grad_norm, bool maximize,"
      " Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef) -> Tensor");
  m.def(
      "lamb_apply_(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor(b!)[] masters,"
      " Tensor(c!)[] steps, Tensor sums, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps,"
      " float weight_decay, bool decoupled, bool bias_correction, bool always_adapt, Tensor? found_inf) -> ()");
  // Total 2- or inf-norm of the grads (deterministic), and min(max_norm / (total + 1e-6), 1).
  m.def("grad_norm(Tensor[] grads, float norm_type, float max_norm) -> (Tensor total, Tensor clip_coef)");
  m.def("scale_grads_(Tensor(a!)[] grads, Tensor coef) -> ()");
}

namespace fusedkernels::optim {
namespace {

using TensorList = at::TensorList;

// One list per slot; an empty list leaves the slot unused. Every list must match the params.
struct Lists {
  std::vector<std::pair<Slot, TensorList>> slots;
  TensorList steps;  // may be empty
};

// Whether a and b lay out the same elements at the same memory offsets, densely (contiguous, channels_last,
// any permutation): the kernels walk a param's tensors in memory order, element k of each together.
bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  if (a.is_contiguous() && b.is_contiguous()) return true;
  if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// The tables of one call, and the grads that took a dense copy (a grad laid out unlike its param, e.g.
// set by hand from a transpose): the kernels read the copy, and a step that writes the grads back
// (grad_scale) copies it to the grad after the launch.
struct Tables {
  std::vector<TensorTable> tables;
  std::vector<std::pair<at::Tensor, at::Tensor>> grad_copies;  // (grad, its dense copy)

  void write_back_grads() {
    for (auto& [grad, copy] : grad_copies) grad.copy_(copy);
  }
};

// The first list of `lists` is the params (or, for the grad-only ops, the grads themselves).
Tables build_tables(const char* op, const Lists& lists, const at::Tensor& first) {
  const TensorList& params = lists.slots.front().second;
  for (const auto& [slot, list] : lists.slots) {
    TORCH_CHECK_VALUE(list.empty() || list.size() == params.size(), op, ": every tensor list must have ",
                      num(params.size()), " tensors (one per param), got ", num(list.size()));
  }
  Tables out;
  TensorTable t;
  std::memset(&t, 0, sizeof(t));
  int32_t chunks = 0;
  auto flush = [&]() {
    if (t.num_tensors == 0) return;
    t.chunk_start[t.num_tensors] = chunks;
    out.tables.push_back(t);
    std::memset(&t, 0, sizeof(t));
    chunks = 0;
  };
  void* pointers[kSlots] = {};
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor reference = params[i];
    const int64_t numel = reference.numel();
    bool aligned = true;
    for (const auto& [slot, list] : lists.slots) {
      if (list.empty()) continue;
      at::Tensor x = list[i];
      TORCH_CHECK_VALUE(x.device() == first.device(), op, ": all tensors must be on ", first.device().str(),
                        ", tensor ", num(i), " is on ", x.device().str());
      TORCH_CHECK_VALUE(x.layout() == at::kStrided, op, ": tensor ", num(i), " of list ", num(slot),
                        " is sparse; the fused optimizers support dense gradients only");
      TORCH_CHECK_VALUE(x.numel() == numel, op, ": tensor ", num(i), " of list ", num(slot), " has ",
                        num(x.numel()), " elements, its param ", num(numel));
      const bool is_reference = &list == &params;
      if (is_reference ? !x.is_non_overlapping_and_dense() : !same_dense_layout(x, reference)) {
        TORCH_CHECK_VALUE(slot == kGrad, op, ": tensor ", num(i), " of list ", num(slot),
                          is_reference ? " is not dense (a view with gaps or overlaps)"
                                       : " must be laid out as its param (same sizes and strides)");
        at::Tensor dense = is_reference ? x.contiguous() : at::empty_like(reference, x.options());
        if (!is_reference) dense.copy_(x);
        out.grad_copies.emplace_back(x, dense);
        x = dense;
        if (is_reference) reference = dense;
      }
      pointers[slot] = x.data_ptr();
      aligned = aligned && reinterpret_cast<uintptr_t>(pointers[slot]) % 16 == 0;
    }
    // (an empty tensor keeps its place: it has no chunks, and its step still counts)
    const int32_t tensor_chunks = static_cast<int32_t>((numel + kChunk - 1) / kChunk);
    if (t.num_tensors == kTableTensors || int64_t(chunks) + tensor_chunks > INT32_MAX) flush();
    const int k = t.num_tensors++;
    for (const auto& [slot, list] : lists.slots) {
      if (!list.empty()) t.ptr[slot][k] = pointers[slot];
    }
    if (!lists.steps.empty()) {
      const at::Tensor& step = lists.steps[i];
      TORCH_CHECK_VALUE(step.device() == first.device() && step.numel() == 1, op, ": step ", num(i),
                        " must be a one-element tensor on ", first.device().str());
      t.step[k] = step.mutable_data_ptr<float>();
    }
    t.numel[k] = numel;
    t.chunk_start[k] = chunks;
    t.aligned[k] = aligned;
    chunks += tensor_chunks;
  }
  flush();
  return out;
}

void check_dtype(const char* op, TensorList list, at::ScalarType want, const char* what) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK_VALUE(list[i].scalar_type() == want, op, ": ", what, " ", num(i), " must be ", name_of(want),
                      ", got ", name_of(list[i].scalar_type()));
  }
}

const float* scalar_ptr(const char* op, const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t) return nullptr;
  TORCH_CHECK_VALUE(t->device() == like.device() && t->scalar_type() == at::kFloat && t->numel() == 1, op, ": ", name,
                    " must be a one-element float32 tensor on ", like.device().str());
  return t->data_ptr<float>();
}

StepScalars step_scalars(const char* op, double lr, const std::optional<at::Tensor>& lr_tensor, bool maximize,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& clip_coef, const at::Tensor& like) {
  StepScalars s{};
  s.lr = static_cast<float>(lr);
  s.lr_ptr = scalar_ptr(op, lr_tensor, like, "lr");
  s.grad_scale = scalar_ptr(op, grad_scale, like, "grad_scale");
  s.found_inf = scalar_ptr(op, found_inf, like, "found_inf");
  s.clip_coef = scalar_ptr(op, clip_coef, like, "clip_coef");
  s.maximize = maximize;
  s.write_back_grad = grad_scale.has_value();
  return s;
}

void check_params(const char* op, TensorList params, TensorList grads) {
  TORCH_CHECK_VALUE(!params.empty() && params[0].is_cuda(), op, ": params must be CUDA tensors");
  const auto dtype = params[0].scalar_type();
  check_float_dtype(params[0], op, "params");
  check_dtype(op, params, dtype, "param");
  check_dtype(op, grads, dtype, "grad");
}

// exp_avgs and exp_avg_sqs (and the lists given with them) share one dtype, fp32 or bf16; masters are
// fp32 and only for 16-bit params; steps are fp32. Returns the state dtype.
at::ScalarType check_adam_states(const char* op, TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs,
                                 TensorList extra_states, TensorList masters, TensorList steps) {
  TORCH_CHECK_VALUE(!exp_avgs.empty() && !exp_avg_sqs.empty() && steps.size() == params.size(), op,
                    ": exp_avgs, exp_avg_sqs and steps are required");
  const auto state_dtype = exp_avgs[0].scalar_type();
  TORCH_CHECK_VALUE(state_dtype == at::kFloat || state_dtype == at::kBFloat16, op,
                    ": states must be float32 or bfloat16, got ", name_of(state_dtype));
  check_dtype(op, exp_avgs, state_dtype, "exp_avg");
  check_dtype(op, exp_avg_sqs, state_dtype, "exp_avg_sq");
  check_dtype(op, extra_states, state_dtype, "max_exp_avg_sq");
  check_dtype(op, masters, at::kFloat, "master");
  check_dtype(op, steps, at::kFloat, "step");
  TORCH_CHECK_VALUE(masters.empty() || params[0].scalar_type() != at::kFloat, op,
                    ": master weights are for 16-bit params");
  return state_dtype;
}

void adam_step_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList max_exp_avg_sqs, TensorList masters, TensorList steps, double lr,
                const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& clip_coef) {
  const char* op = "adam_step_";
  if (params.empty()) return;
  check_params(op, params, grads);
  const at::Tensor& first = params[0];
  const auto state_dtype = check_adam_states(op, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps);
  TORCH_CHECK_VALUE(!amsgrad || !max_exp_avg_sqs.empty(), op, ": amsgrad needs max_exp_avg_sqs");
  const c10::cuda::CUDAGuard guard(first.device());

  AdamParams p{};
  p.s = step_scalars(op, lr, lr_tensor, maximize, grad_scale, found_inf, clip_coef, first);
  p.beta1 = static_cast<float>(beta1);
  p.beta2 = static_cast<float>(beta2);
  p.eps = static_cast<float>(eps);
  p.weight_decay = static_cast<float>(weight_decay);
  p.decoupled = decoupled;
  p.amsgrad = amsgrad;
  p.param_dtype = to_dtype(first.scalar_type());
  p.state_dtype = to_dtype(state_dtype);
  p.master = !masters.empty();
  Lists lists{{{kParam, params}, {kGrad, grads}, {kState0, exp_avgs}, {kState1, exp_avg_sqs},
               {kState2, amsgrad ? max_exp_avg_sqs : TensorList()}, {kMaster, masters}},
              steps};
  Tables tables = build_tables(op, lists, first);
  for (const TensorTable& t : tables.tables) check_launch(adam_step(t, p, c10::cuda::getCurrentCUDAStream()), op);
  if (p.s.write_back_grad) tables.write_back_grads();
}

void sgd_step_(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList masters,
               TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
               double dampening, double weight_decay, bool nesterov, bool maximize,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& clip_coef) {
  const char* op = "sgd_step_";
  if (params.empty()) return;
  check_params(op, params, grads);
  const at::Tensor& first = params[0];
  TORCH_CHECK_VALUE(momentum == 0 || (!momentum_buffers.empty() && steps.size() == params.size()), op,
                    ": momentum needs momentum_buffers and steps");
  check_dtype(op, steps, at::kFloat, "step");
  check_dtype(op, masters, at::kFloat, "master");
  // fp32 buffers go with fp32 masters; otherwise the buffers have the params' dtype
  check_dtype(op, momentum_buffers, masters.empty() ? first.scalar_type() : at::kFloat, "momentum_buffer");
  const c10::cuda::CUDAGuard guard(first.device());

  SgdParams p{};
  p.s = step_scalars(op, lr, lr_tensor, maximize, grad_scale, found_inf, clip_coef, first);
  p.momentum = static_cast<float>(momentum);
  p.dampening = static_cast<float>(dampening);
  p.weight_decay = static_cast<float>(weight_decay);
  p.nesterov = nesterov;
  p.param_dtype = to_dtype(first.scalar_type());
  p.master = !masters.empty();
  Lists lists{{{kParam, params}, {kGrad, grads}, {kState0, momentum == 0 ? TensorList() : momentum_buffers},
               {kMaster, masters}},
              momentum == 0 ? TensorList() : steps};
  Tables tables = build_tables(op, lists, first);
  for (const TensorTable& t : tables.tables) check_launch(sgd_step(t, p, c10::cuda::getCurrentCUDAStream()), op);
  if (p.s.write_back_grad) tables.write_back_grads();
}

// The LAMB step, or one of its two phases (sums_out: moments and per-tensor sums; sums_in: the update).
void run_lamb(const char* op, TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
              TensorList masters, TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
              double beta2, double eps, double weight_decay, bool decoupled, bool bias_correction, bool grad_averaging,
              bool always_adapt, const std::optional<at::Tensor>& grad_norm, double max_grad_norm, bool maximize,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& clip_coef, const at::Tensor* sums_out, const at::Tensor* sums_in) {
  check_params(op, params, grads);
  const at::Tensor& first = params[0];
  const auto state_dtype = check_adam_states(op, params, exp_avgs, exp_avg_sqs, {}, masters, steps);
  const c10::cuda::CUDAGuard guard(first.device());

  LambParams p{};
  p.s = step_scalars(op, lr, lr_tensor, maximize, grad_scale, found_inf, clip_coef, first);
  p.beta1 = static_cast<float>(beta1);
  p.beta2 = static_cast<float>(beta2);
  p.eps = static_cast<float>(eps);
  p.weight_decay = static_cast<float>(weight_decay);
  p.grad_weight = grad_averaging ? 1.f - p.beta1 : 1.f;
  p.decoupled = decoupled;
  p.bias_correction = bias_correction;
  p.always_adapt = always_adapt;
  p.grad_norm = scalar_ptr(op, grad_norm, first, "grad_norm");
  p.max_grad_norm = static_cast<float>(max_grad_norm);
  p.param_dtype = to_dtype(first.scalar_type());
  p.state_dtype = to_dtype(state_dtype);
  p.master = !masters.empty();
  Lists lists{{{kParam, params}, {kGrad, grads}, {kState0, exp_avgs}, {kState1, exp_avg_sqs}, {kMaster, masters}},
              steps};
  Tables tables = build_tables(op, lists, first);
  int64_t workspace_size = 0;
  for (const TensorTable& t : tables.tables) workspace_size += lamb_partials(t);
  const at::Tensor* sums = sums_out ? sums_out : sums_in;
  if (sums) {
    TORCH_CHECK_VALUE(sums->device() == first.device() && sums->scalar_type() == at::kFloat && sums->is_contiguous() &&
                          sums->numel() == 2 * int64_t(params.size()),
                      op, ": sums must be a contiguous float32 tensor on ", first.device().str(), " of shape [",
                      num(params.size()), ", 2] (one row per param), got ", num(sums->numel()), " elements");
  }
  const at::Tensor workspace = at::empty({std::max<int64_t>(workspace_size, 1)}, first.options().dtype(at::kFloat));
  int64_t offset = 0, row = 0;
  for (const TensorTable& t : tables.tables) {
    p.partials = workspace.data_ptr<float>() + offset;
    if (sums_out) p.sums_out = sums_out->data_ptr<float>() + row;
    if (sums_in) p.sums_in = sums_in->data_ptr<float>() + row;
    offset += lamb_partials(t);
    row += 2 * t.num_tensors;  // (every param has its table entry, in list order)
    check_launch(lamb_step(t, p, c10::cuda::getCurrentCUDAStream()), op);
  }
  if (p.s.write_back_grad) tables.write_back_grads();
}

void lamb_step_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList masters,
                TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                double eps, double weight_decay, bool decoupled, bool bias_correction, bool grad_averaging,
                bool always_adapt, const std::optional<at::Tensor>& grad_norm, double max_grad_norm, bool maximize,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& clip_coef) {
  if (params.empty()) return;
  run_lamb("lamb_step_", params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, lr_tensor, beta1, beta2, eps,
           weight_decay, decoupled, bias_correction, grad_averaging, always_adapt, grad_norm, max_grad_norm, maximize,
           grad_scale, found_inf, clip_coef, nullptr, nullptr);
}

at::Tensor lamb_moments_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                         TensorList masters, TensorList steps, double beta1, double beta2, double eps,
                         double weight_decay, bool decoupled, bool bias_correction, bool grad_averaging,
                         const std::optional<at::Tensor>& grad_norm, double max_grad_norm, bool maximize,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& clip_coef) {
  const char* op = "lamb_moments_";
  TORCH_CHECK_VALUE(!params.empty() && params[0].is_cuda(), op, ": params must be CUDA tensors");
  // zeros: a step skipped by found_inf writes none of them
  const at::Tensor sums = at::zeros({int64_t(params.size()), 2}, params[0].options().dtype(at::kFloat));
  run_lamb(op, params, grads, exp_avgs, exp_avg_sqs, masters, steps, 0.0, std::nullopt, beta1, beta2, eps, weight_decay,
           decoupled, bias_correction, grad_averaging, false, grad_norm, max_grad_norm, maximize, grad_scale, found_inf,
           clip_coef, &sums, nullptr);
  return sums;
}

void lamb_apply_(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList masters, TensorList steps,
                 const at::Tensor& sums, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                 double beta2, double eps, double weight_decay, bool decoupled, bool bias_correction, bool always_adapt,
                 const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  run_lamb("lamb_apply_", params, {}, exp_avgs, exp_avg_sqs, masters, steps, lr, lr_tensor, beta1, beta2, eps,
           weight_decay, decoupled, bias_correction, false, always_adapt, std::nullopt, 0.0, false, std::nullopt,
           found_inf, std::nullopt, nullptr, &sums);
}

std::tuple<at::Tensor, at::Tensor> grad_norm(TensorList grads, double norm_type, double max_norm) {
  const char* op = "grad_norm";
  TORCH_CHECK_VALUE(!grads.empty() && grads[0].is_cuda(), op, ": grads must be a non-empty list of CUDA tensors");
  check_float_dtype(grads[0], op, "grads");
  check_dtype(op, grads, grads[0].scalar_type(), "grad");
  const bool inf_norm = norm_type == std::numeric_limits<double>::infinity();
  TORCH_CHECK_VALUE(inf_norm || norm_type == 2.0, op, ": norm_type must be 2 or inf, got ", py_repr(norm_type));
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const Tables built = build_tables(op, Lists{{{kGrad, grads}}, {}}, grads[0]);
  const auto& tables = built.tables;
  const auto opts = grads[0].options().dtype(at::kFloat);
  const int per_launch = norm_partials();
  at::Tensor partials = at::empty({std::max<int64_t>(1, int64_t(tables.size()) * per_launch)}, opts);
  if (tables.empty()) partials.zero_();
  NormParams p{};
  p.grad_dtype = to_dtype(grads[0].scalar_type());
  p.inf_norm = inf_norm;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < tables.size(); ++i) {
    p.partials = partials.data_ptr<float>() + i * per_launch;
    check_launch(grad_norm_partials(tables[i], p, stream), op);
  }
  at::Tensor total = at::empty({}, opts), coef = at::empty({}, opts);
  check_launch(grad_norm_finish(partials.data_ptr<float>(), static_cast<int>(partials.numel()), inf_norm,
                                static_cast<float>(max_norm), total.data_ptr<float>(), coef.data_ptr<float>(), stream),
               op);
  return {total, coef};
}

void scale_grads_(TensorList grads, const at::Tensor& coef) {
  const char* op = "scale_grads_";
  if (grads.empty()) return;
  TORCH_CHECK_VALUE(grads[0].is_cuda(), op, ": grads must be CUDA tensors");
  check_float_dtype(grads[0], op, "grads");
  check_dtype(op, grads, grads[0].scalar_type(), "grad");
  const float* c = scalar_ptr(op, coef, grads[0], "coef");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  Tables tables = build_tables(op, Lists{{{kGrad, grads}}, {}}, grads[0]);
  for (const TensorTable& t : tables.tables) {
    check_launch(scale_grads(t, to_dtype(grads[0].scalar_type()), c, c10::cuda::getCurrentCUDAStream()), op);
  }
  tables.write_back_grads();
}

// Meta kernels: the steps mutate their inputs only; grad_norm returns two scalars.
void step_meta(const c10::OperatorHandle&, torch::jit::Stack* stack) { stack->clear(); }

at::Tensor lamb_moments_meta(TensorList params, TensorList, TensorList, TensorList, TensorList, TensorList, double,
                             double, double, double, bool, bool, bool, const std::optional<at::Tensor>&, double, bool,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&) {
  TORCH_CHECK_VALUE(!params.empty(), "lamb_moments_: params must be a non-empty list");
  return at::empty({int64_t(params.size()), 2}, params[0].options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> grad_norm_meta(TensorList grads, double, double) {
  TORCH_CHECK_VALUE(!grads.empty(), "grad_norm: grads must be a non-empty list");
  const auto opts = grads[0].options().dtype(at::kFloat);
  return {at::empty({}, opts), at::empty({}, opts)};
}

const std::string kStepDtypes = "float32, float16, bfloat16 params (16-bit: optional float32 masters); float32 or "
                                "bfloat16 moments";
const std::string kListSizes = "any number of tensors (384 a launch), any size (64-bit offsets)";
const RegisterOpInfo adam_info{{"optim", "adam_step_", kStepDtypes, kListSizes}};
const RegisterOpInfo sgd_info{{"optim", "sgd_step_", kStepDtypes, kListSizes}};
const RegisterOpInfo lamb_info{{"optim", "lamb_step_", kStepDtypes, kListSizes}};
const RegisterOpInfo grad_norm_info{{"optim", "grad_norm", "float32, float16, bfloat16 grads", "2-norm and inf-norm"}};
const RegisterOpInfo scale_info{{"optim", "scale_grads_", "float32, float16, bfloat16 grads", kListSizes}};

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) {
  m.impl("adam_step_", torch::CppFunction::makeFromBoxedFunction<&step_meta>());
  m.impl("sgd_step_", torch::CppFunction::makeFromBoxedFunction<&step_meta>());
  m.impl("lamb_step_", torch::CppFunction::makeFromBoxedFunction<&step_meta>());
  m.impl("lamb_moments_", &lamb_moments_meta);
  m.impl("lamb_apply_", torch::CppFunction::makeFromBoxedFunction<&step_meta>());
  m.impl("scale_grads_", torch::CppFunction::makeFromBoxedFunction<&step_meta>());
  m.impl("grad_norm", &grad_norm_meta);
}

// In-place ops bump the version counters of what they write, as torch's own optimizer steps do: autograd
// then refuses a backward through a tensor a step has changed since it was saved.
TORCH_LIBRARY_IMPL(fusedkernels, ADInplaceOrView, m) {
  for (const char* op : {"adam_step_", "sgd_step_", "lamb_step_", "lamb_moments_", "lamb_apply_", "scale_grads_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}

TORCH_LIBRARY_IMPL(fusedkernels, CUDA, m) {
  m.impl("adam_step_", &adam_step_);
  m.impl("sgd_step_", &sgd_step_);
  m.impl("lamb_step_", &lamb_step_);
  m.impl("lamb_moments_", &lamb_moments_);
  m.impl("lamb_apply_", &lamb_apply_);
  m.impl("grad_norm", &grad_norm);
  m.impl("scale_grads_", &scale_grads_);
}

}  // namespace fusedkernels::optim
