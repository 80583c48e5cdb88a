// Element types the kernels know, shared by kernels, launchers and bindings (no torch), and the C++ type
// of each.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedkernels {

enum class DType { kFloat32, kFloat16, kBFloat16 };

template <DType kD>
struct CTypeOf;
template <>
struct CTypeOf<DType::kFloat32> { using type = float; };
template <>
struct CTypeOf<DType::kFloat16> { using type = __half; };
template <>
struct CTypeOf<DType::kBFloat16> { using type = __nv_bfloat16; };

template <DType kD>
using CType = typename CTypeOf<kD>::type;

}  // namespace fusedkernels
