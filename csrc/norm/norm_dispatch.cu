// norm_fwd / norm_bwd: pick the launcher instance for the dtypes in the params.
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

}  // namespace

cudaError_t norm_fwd(const FwdParams& p, cudaStream_t stream) {
  return with_types(p.x_dtype, p.w_dtype, [&]<typename T, typename WT>() {
    return p.rms ? launch_fwd<T, WT, true>(p, stream) : launch_fwd<T, WT, false>(p, stream);
  });
}

cudaError_t norm_bwd(const BwdParams& p, cudaStream_t stream) {
  return with_types(p.x_dtype, p.w_dtype, [&]<typename T, typename WT>() {
    return p.rms ? launch_bwd<T, WT, true>(p, stream) : launch_bwd<T, WT, false>(p, stream);
  });
}

int64_t bwd_workspace_floats(const BwdParams& p) {
  return with_types(p.x_dtype, p.w_dtype, [&]<typename T, typename WT>() {
    return p.rms ? bwd_workspace<T, WT, true>(p) : bwd_workspace<T, WT, false>(p);
  });
}

}  // namespace fusedkernels::norm
