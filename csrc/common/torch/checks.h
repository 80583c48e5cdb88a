// Input checks and dtype mapping for the *_api.cpp / *_ops.cpp bindings: each check names the argument and
// what is supported. Only binding files include this (it pulls in ATen).
#pragma once

#include <optional>
#include <utility>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/dtype.h"

namespace fusedkernels {

// Numbers and shapes in error messages go through std::to_string rather than an ostream: on the GPU
// machine's torch 2.11 build, streaming an integer into a TORCH_CHECK message from this extension
// crashed the process instead of raising.
inline std::string num(int64_t v) { return std::to_string(v); }

// A double as Python's repr prints it (the shortest digits that read back the same: -0.001, 1e-05, 0.0), for messages
// that repeat a Python-side library's word for word.
inline std::string py_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  int digits = 1;
  for (; digits < 17; ++digits) {  // the fewest significant digits that read back as v
    std::snprintf(buf, sizeof(buf), "%.*e", digits - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::snprintf(buf, sizeof(buf), "%.*e", digits - 1, v);
  const int exponent = std::atoi(std::strchr(buf, 'e') + 1);
  if (exponent < -4 || exponent >= 16) return buf;  // Python's switch to scientific notation
  std::snprintf(buf, sizeof(buf), "%.*f", std::max(digits - 1 - exponent, 0), v);
  std::string s = buf;
  return s.find('.') == std::string::npos ? s + ".0" : s;
}

inline std::string shape(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t d = 0; d < sizes.size(); ++d) s += (d ? ", " : "") + std::to_string(sizes[d]);
  return s + "]";
}
inline std::string shape(c10::SymIntArrayRef sizes) {  // symbolic sizes (torch.compile) print as their expression
  std::string s = "[";
  for (size_t d = 0; d < sizes.size(); ++d) {
    const auto v = sizes[d].maybe_as_int();
    s += (d ? ", " : "") + (v ? std::to_string(*v) : sizes[d].toSymNode()->str());
  }
  return s + "]";
}
inline std::string shape(const at::Tensor& t) { return shape(t.sym_sizes()); }

// Whether two sizes are equal, symbolic ones (torch.compile with dynamic shapes) included.
inline bool sym_same(const c10::SymInt& a, const c10::SymInt& b) { return a.sym_eq(b).guard_bool(__FILE__, __LINE__); }

// torch's names for the common types ("bfloat16", as in torch.bfloat16), c10's for the rest.
inline std::string name_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

inline bool has_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "no kernel for dtype ", name_of(t));
  }
}

inline bool is_aligned_16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The type arithmetic happens in: float64 for float64, float32 for everything narrower (as at::opmath_type).
inline at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(has_kernel_dtype(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                   name_of(t.scalar_type()));
}

inline void check_cuda_contiguous(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device().str());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device().str(), " but the input is on ",
                    like.device().str());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// weight, bias and residual (the optional ones may be absent) on x's device and of x's dtype (the residual of any
// dtype when residual_any_dtype: the public ops add one of another dtype after the fused op). The public ops raise
// RuntimeError, as F.linear and F.conv2d do; the internal ops' contract (internal) ValueError and TypeError.
// The names the messages give the operands (an op with two weights names them apart).
struct OperandNames {
  const char* weight = "weight";
  const char* bias = "bias";
};

inline void check_operands_like_x(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                  bool residual_any_dtype, bool internal, OperandNames names = {}) {
  for (const auto& [name, t] : {std::pair{names.weight, &weight}, std::pair{names.bias, bias ? &*bias : nullptr},
                                std::pair{"residual", residual ? &*residual : nullptr}}) {
    if (t == nullptr) continue;
    const bool same_device = t->device() == x.device();
    const bool dtype_ok = t->scalar_type() == x.scalar_type() || (residual_any_dtype && t == &*residual);
    const auto device_message = c10::str(op, ": ", name, " is on ", t->device().str(), " but x is on ", x.device().str());
    const auto dtype_message =
        c10::str(op, ": ", name, " must have x's dtype (", name_of(x.scalar_type()), "), got ", name_of(t->scalar_type()));
    if (internal) {
      TORCH_CHECK_VALUE(same_device, device_message);
      TORCH_CHECK_TYPE(dtype_ok, dtype_message);
    } else {
      TORCH_CHECK(dtype_ok, dtype_message);
      TORCH_CHECK(same_device, device_message);
    }
  }
}

// Raises for a failed launch; says how to rebuild when the build has no code for this GPU.
inline void check_launch(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return;
  TORCH_CHECK(err != cudaErrorNoKernelImageForDevice, op, ": this build of fusedkernels has no code for this GPU ",
              "(`python -m fusedkernels.info` lists the archs it was built for); rebuild with FUSEDKERNELS_CUDA_ARCHS ",
              "set to its arch, e.g. FUSEDKERNELS_CUDA_ARCHS=80 for an A100");
  TORCH_CHECK(false, op, ": CUDA error: ", cudaGetErrorString(err));
}

}  // namespace fusedkernels
