// What every family's op layer shares: typed handles to ops, the autograd helpers, the op descriptions
// that `python -m fusedkernels.info` prints. Only binding files include this.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace fusedkernels {

// A typed handle to fusedkernels::<name>, for calling one op from another through the dispatcher (so
// autograd, autocast, fake tensors and torch.compile see the call). Keep it in a function-local static.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && requires_grad(*t); }

// One line per op for `python -m fusedkernels.info`: what has a native kernel, with which dtypes and sizes.
struct OpInfo {
  std::string family, op, dtypes, sizes;
};

inline std::vector<OpInfo>& op_infos() {
  static std::vector<OpInfo> infos;
  return infos;
}

// At namespace scope in a family's ops file: `static const RegisterOpInfo info{{"norm", "layer_norm", ...}};`
struct RegisterOpInfo {
  explicit RegisterOpInfo(OpInfo info) { op_infos().push_back(std::move(info)); }
};

}  // namespace fusedkernels
