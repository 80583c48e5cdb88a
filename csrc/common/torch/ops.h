// What every family's op layer shares: typed handles to ops, the autograd helpers, the op descriptions
// that `python -m fusedkernels.info` prints. Only binding files include this.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <c10/util/Exception.h>

#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace fusedkernels {

// A typed handle to fusedkernels::<name>, for calling one op from another through the dispatcher (so
// autograd, autocast, fake tensors and torch.compile see the call). Keep it in a function-local static.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A call about to run another implementation than the fused kernel says so once per (op, reason), as a
// UserWarning: "fusedkernels.<op>: <reason>; running <instead> instead". An empty reason is a silent one.
inline void warn_fallback(const std::string& op, const char* reason, const std::string& instead) {
  if (reason[0] == '\0') return;
  static std::mutex mutex;
  static std::set<std::string> warned;
  const std::lock_guard<std::mutex> lock(mutex);
  if (warned.insert(op + reason).second) {
    TORCH_WARN("fusedkernels.", op, ": ", reason, "; running ", instead, " instead");
  }
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
