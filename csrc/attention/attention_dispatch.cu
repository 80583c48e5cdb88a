// attention_fwd / attention_bwd: pick the instance for the dtype and head dim in the params. The launcher
// templates are declared here and defined, one (dtype, head dim) pair per file, in instances/.
#include "attention/attention.h"
#include "common/host/static_switch.h"

namespace fusedkernels::attention {

template <typename T, int kD>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream);
template <typename T, int kD>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream);
template <typename T, int kD>
int64_t bwd_workspace(const BwdParams& p);

namespace {

// fn.template operator()<T, kD>() for the params' dtype (fp16 or bf16) and head dim (has_head_dim).
template <typename Fn>
decltype(auto) with_instance(DType dtype, int head_dim, Fn&& fn) {
  return type_switch<DType::kFloat16, DType::kBFloat16>(dtype, [&]<typename T>() -> decltype(auto) {
    return static_switch<32, 64, 96, 128, 256>(head_dim, [&]<int kD>() -> decltype(auto) {
      return fn.template operator()<T, kD>();
    });
  });
}

}  // namespace

cudaError_t attention_fwd(const FwdParams& p, cudaStream_t stream) {
  return with_instance(p.dtype, p.head_dim, [&]<typename T, int kD>() { return launch_fwd<T, kD>(p, stream); });
}

cudaError_t attention_bwd(const BwdParams& p, cudaStream_t stream) {
  return with_instance(p.fwd.dtype, p.fwd.head_dim, [&]<typename T, int kD>() { return launch_bwd<T, kD>(p, stream); });
}

int64_t bwd_workspace_floats(const BwdParams& p) {
  return with_instance(p.fwd.dtype, p.fwd.head_dim, [&]<typename T, int kD>() { return bwd_workspace<T, kD>(p); });
}

}  // namespace fusedkernels::attention
