// Element types the kernels know, shared by kernels and bindings (no torch, no CUDA headers).
#pragma once

namespace fusedkernels {

enum class DType { kFloat32, kFloat16, kBFloat16 };

}  // namespace fusedkernels
