// norm_fwd / norm_bwd (and add + norm's): pick the launcher instance for the dtypes in the params.
#include "common/host/static_switch.h"
#include "norm/norm_launch.h"

namespace fusedkernels::norm {
namespace {

// Calls fn.template operator()<T, WT>() for the (input, weight) dtype pair: weight in the input's type or
// in float32 (validated by the bindings).
template <typename Fn>
decltype(auto) with_types(DType x, DType w, Fn&& fn) {
  return float_type_switch(x, [&]<typename T>() -> decltype(auto) {
    if (w == DType::kFloat32) return fn.template operator()<T, float>();
    return fn.template operator()<T, T>();
  });
}

// The same with the residual's type RT (the input's or float32) too.
template <typename Fn>
decltype(auto) with_add_types(DType x, DType w, DType residual, Fn&& fn) {
  return with_types(x, w, [&]<typename T, typename WT>() -> decltype(auto) {
    if (residual == DType::kFloat32) return fn.template operator()<T, WT, float>();
    return fn.template operator()<T, WT, T>();
  });
}

}  // namespace

cudaError_t norm_fwd(const FwdParams& p, cudaStream_t stream) {
  return with_types(p.x_dtype, p.w_dtype, [&]<typename T, typename WT>() {
    return p.rms ? launch_fwd<T, WT, T, true, false>(p, stream) : launch_fwd<T, WT, T, false, false>(p, stream);
  });
}

cudaError_t norm_bwd(const BwdParams& p, cudaStream_t stream) {
  return with_types(p.x_dtype, p.w_dtype, [&]<typename T, typename WT>() {
    return p.rms ? launch_bwd<T, WT, T, true, false>(p, stream) : launch_bwd<T, WT, T, false, false>(p, stream);
  });
}

int64_t bwd_workspace_floats(const BwdParams& p) {
  return with_types(p.x_dtype, p.w_dtype, [&]<typename T, typename WT>() {
    return p.rms ? bwd_workspace<T, WT, T, true, false>(p) : bwd_workspace<T, WT, T, false, false>(p);
  });
}

cudaError_t add_norm_fwd(const AddFwdParams& p, cudaStream_t stream) {
  return with_add_types(p.x_dtype, p.w_dtype, p.residual_dtype, [&]<typename T, typename WT, typename RT>() {
    return p.rms ? launch_fwd<T, WT, RT, true, true>(p, stream) : launch_fwd<T, WT, RT, false, true>(p, stream);
  });
}

cudaError_t add_norm_bwd(const AddBwdParams& p, cudaStream_t stream) {
  return with_add_types(p.x_dtype, p.w_dtype, p.residual_dtype, [&]<typename T, typename WT, typename RT>() {
    return p.rms ? launch_bwd<T, WT, RT, true, true>(p, stream) : launch_bwd<T, WT, RT, false, true>(p, stream);
  });
}

int64_t add_bwd_workspace_floats(const AddBwdParams& p) {
  return with_add_types(p.x_dtype, p.w_dtype, p.residual_dtype, [&]<typename T, typename WT, typename RT>() {
    return p.rms ? bwd_workspace<T, WT, RT, true, true>(p) : bwd_workspace<T, WT, RT, false, true>(p);
  });
}

}  // namespace fusedkernels::norm
