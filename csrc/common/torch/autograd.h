// Backward nodes written the way torch's generated autograd code writes them, for the fused ops' autograd
// kernels: the forward runs below autograd, then a node (a torch::autograd::Node subclass holding
// SavedVariables) is attached to the outputs. torch::autograd::Function does the same generically at a
// few microseconds more a call (argument extraction, per-input metadata, a string-keyed saved-data map),
// which an eager model pays on every layer.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <type_traits>

namespace fusedkernels {

// How autograd holds nodes: std::shared_ptr up to torch 2.12, c10::intrusive_ptr since.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename NodeT>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeT>();
  } else {
    return c10::make_intrusive<NodeT>();
  }
}

// Forward-mode AD (torch.func.jvp, forward_ad) needs formulas the fused ops do not have: an input that
// carries a tangent makes the public op run PyTorch's own, which has them.
inline bool has_forward_grad(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
inline bool has_forward_grad(const std::optional<at::Tensor>& t) { return t && has_forward_grad(*t); }

// A tensor that is only itself: not a Python subclass or mode's (AOTAutograd's and compiled autograd's fake and
// functional tensors) nor a batched (functorch's vmap, autograd's is_grads_batched) or wrapped one. A backward may
// write such a saved buffer in place, and call out= ops with it.
inline bool plain_tensor(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                            c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::Batched,
                                            c10::DispatchKey::FuncTorchGradWrapper});
  return !t.key_set().has_any(wrapped);
}

// An unpacked SavedVariable (undefined when nothing was saved) as the optional argument an op takes.
inline std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The ADInplaceOrView kernel of an op that writes its arguments (the optimizer steps): bumps the version
// counter of every tensor the schema marks written (Tensor(a!), Tensor(a!)[]), then runs the op. torch's
// in-place ops do the same, so autograd refuses a backward through a tensor changed since it was saved.
// (torch's generic fallback bumps only written outputs, and these ops return nothing.)
inline void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t count = schema.arguments().size(), start = stack->size() - count;
  for (size_t i = 0; i < count; ++i) {
    if (!schema.is_mutable({c10::SchemaArgType::input, i})) continue;
    const c10::IValue& value = (*stack)[start + i];
    if (value.isTensor()) {
      torch::autograd::impl::bump_version(value.toTensor());
    } else if (value.isTensorList()) {
      for (const c10::IValue& t : value.toListRef()) torch::autograd::impl::bump_version(t.toTensor());
    }
  }
  const at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

// The Autograd kernel of an internal in-place op with no derivative of its own (its public op records the
// gradient): refuses a tensor that requires grad while grad mode is on, as autogradNotImplementedFallback does, but
// dispatches on to ADInplaceOrView (bump_written_versions), which that fallback skips: the written tensors'
// versions move, so a backward through a value saved before the write raises instead of reading the new one.
inline void inplace_without_derivative(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                       torch::jit::Stack* stack) {
  const size_t count = op.schema().arguments().size(), start = stack->size() - count;
  if (at::GradMode::is_enabled()) {
    for (size_t i = 0; i < count; ++i) {
      const c10::IValue& value = (*stack)[start + i];
      TORCH_CHECK(!value.isTensor() || !value.toTensor().requires_grad(), op.schema().name(),
                  ": not differentiable (an input requires grad); the public op records the gradient");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace fusedkernels
