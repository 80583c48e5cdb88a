// Declarations of the launcher instances that norm_{fwd,bwd}_<dtype>.cu and add_norm_{fwd,bwd}_<dtype>.cu
// define, for norm_dispatch.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "norm/norm.h"

namespace fusedkernels::norm {

template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
cudaError_t launch_fwd(const FwdParamsT<kAdd>& p, cudaStream_t stream);
template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
cudaError_t launch_bwd(const BwdParamsT<kAdd>& p, cudaStream_t stream);
template <typename T, typename WT, typename RT, bool kRms, bool kAdd>
int64_t bwd_workspace(const BwdParamsT<kAdd>& p);

}  // namespace fusedkernels::norm

// One set of instances per (input type, weight type[, residual type]): weight in the input's type or in fp32;
// the residual (add + norm) in the input's type or in fp32. Use at global scope.
#define FUSEDKERNELS_NORM_FWD_INSTANCE(T, WT, RT, RMS, ADD)                  \
  template cudaError_t fusedkernels::norm::launch_fwd<T, WT, RT, RMS, ADD>( \
      const fusedkernels::norm::FwdParamsT<ADD>&, cudaStream_t);
#define FUSEDKERNELS_NORM_BWD_INSTANCE(T, WT, RT, RMS, ADD)                  \
  template cudaError_t fusedkernels::norm::launch_bwd<T, WT, RT, RMS, ADD>( \
      const fusedkernels::norm::BwdParamsT<ADD>&, cudaStream_t);              \
  template int64_t fusedkernels::norm::bwd_workspace<T, WT, RT, RMS, ADD>(const fusedkernels::norm::BwdParamsT<ADD>&);

#define FUSEDKERNELS_NORM_INSTANCES(T, WT)             \
  FUSEDKERNELS_NORM_FWD_INSTANCE(T, WT, T, false, false) \
  FUSEDKERNELS_NORM_FWD_INSTANCE(T, WT, T, true, false)
#define FUSEDKERNELS_NORM_BWD_INSTANCES(T, WT)         \
  FUSEDKERNELS_NORM_BWD_INSTANCE(T, WT, T, false, false) \
  FUSEDKERNELS_NORM_BWD_INSTANCE(T, WT, T, true, false)
#define FUSEDKERNELS_ADD_NORM_INSTANCES(T, WT, RT)      \
  FUSEDKERNELS_NORM_FWD_INSTANCE(T, WT, RT, false, true) \
  FUSEDKERNELS_NORM_FWD_INSTANCE(T, WT, RT, true, true)
#define FUSEDKERNELS_ADD_NORM_BWD_INSTANCES(T, WT, RT)  \
  FUSEDKERNELS_NORM_BWD_INSTANCE(T, WT, RT, false, true) \
  FUSEDKERNELS_NORM_BWD_INSTANCE(T, WT, RT, true, true)
