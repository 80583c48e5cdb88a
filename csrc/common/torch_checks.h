// Input checks for the *_api.cpp bindings: each names the argument and what is supported.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/dtype.h"

namespace fusedkernels {

// Numbers and shapes in error messages go through std::to_string rather than an ostream: on the GPU
// machine's torch 2.11 build, streaming an integer into a TORCH_CHECK message from this extension
// crashed the process instead of raising.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string shape(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

inline std::string name_of(at::ScalarType t) { return c10::toString(t); }

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", name_of(t));
  }
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                    " must be float32, float16 or bfloat16, got ", name_of(s));
}

inline void check_cuda_contiguous(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device().str());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device().str(),
                    " but the input is on ", like.device().str());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace fusedkernels
