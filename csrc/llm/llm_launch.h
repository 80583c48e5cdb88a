// Declarations of the launcher instances that llm_<dtype>.cu define, for llm_dispatch.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llm/llm.h"

namespace fusedkernels::llm {

template <typename T, typename CT>
cudaError_t launch_rotary(const RotaryParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_cross_entropy(const CrossEntropyParams& p, cudaStream_t stream);

}  // namespace fusedkernels::llm

// The rotary launcher for element type T with a table of type CT (T or float). Use at global scope.
#define FUSEDKERNELS_ROTARY_INSTANCE(T, CT) \
  template cudaError_t fusedkernels::llm::launch_rotary<T, CT>(const fusedkernels::llm::RotaryParams&, cudaStream_t);
#define FUSEDKERNELS_CROSS_ENTROPY_INSTANCE(T)                                                              \
  template cudaError_t fusedkernels::llm::launch_cross_entropy<T>(const fusedkernels::llm::CrossEntropyParams&, \
                                                                  cudaStream_t);
