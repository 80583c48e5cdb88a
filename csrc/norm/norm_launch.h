// Declarations of the launcher instances that norm_{fwd,bwd}_<dtype>.cu define, for norm_dispatch.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "norm/norm.h"

namespace fusedkernels::norm {

template <typename T, typename WT, bool kRms>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream);
template <typename T, typename WT, bool kRms>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream);
template <typename T, typename WT, bool kRms>
int64_t bwd_workspace(const BwdParams& p);

}  // namespace fusedkernels::norm

// One set of instances per (input type, weight type): weight in the input's type or in fp32.
// Use at global scope.
#define FUSEDKERNELS_NORM_INSTANCES(T, WT)                                                          \
  template cudaError_t fusedkernels::norm::launch_fwd<T, WT, false>(const fusedkernels::norm::FwdParams&, cudaStream_t); \
  template cudaError_t fusedkernels::norm::launch_fwd<T, WT, true>(const fusedkernels::norm::FwdParams&, cudaStream_t);
#define FUSEDKERNELS_NORM_BWD_INSTANCES(T, WT)                                                      \
  template cudaError_t fusedkernels::norm::launch_bwd<T, WT, false>(const fusedkernels::norm::BwdParams&, cudaStream_t); \
  template cudaError_t fusedkernels::norm::launch_bwd<T, WT, true>(const fusedkernels::norm::BwdParams&, cudaStream_t);  \
  template int64_t fusedkernels::norm::bwd_workspace<T, WT, false>(const fusedkernels::norm::BwdParams&); \
  template int64_t fusedkernels::norm::bwd_workspace<T, WT, true>(const fusedkernels::norm::BwdParams&);
