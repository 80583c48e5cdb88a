// The Hopper forward's launchers; each (dtype, head dim) pair is instantiated in its own file beside this.
#pragma once

#include "attention/attention_launch.cuh"
#include "attention/sm90/attention_fwd_sm90.cuh"

namespace fusedkernels::attention {

template <typename T, int kD>
bool fwd_sm90_available() {
#ifdef FUSEDKERNELS_SM90A_BUILT  // else the kernel's only body is the trap
  return compute_capability() == 90 &&
         has_image_for_current_device<attention_fwd_sm90_kernel<FwdSm90ConfigFor<T, kD>, false>>();
#else
  return false;
#endif
}

template <typename T, int kD>
cudaError_t launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Cfg = FwdSm90ConfigFor<T, kD>;
  static_assert(Cfg::smem_bytes(true) <= 227 * 1024, "over the shared memory a Hopper block may opt into");
  const int64_t tiles = ceil_div(p.seqlen_q, Cfg::kBlockM);
  // The bias has its own instance: its loads and shared memory are not the plain kernel's to pay for.
  if (p.bias != nullptr) {
    return launch_tiles<attention_fwd_sm90_kernel<Cfg, true>, Cfg::kThreads, Cfg::smem_bytes(true), true>(
        tiles, p.heads_q, p.batch, p, stream);
  }
  return launch_tiles<attention_fwd_sm90_kernel<Cfg, false>, Cfg::kThreads, Cfg::smem_bytes(false), true>(
      tiles, p.heads_q, p.batch, p, stream);
}

}  // namespace fusedkernels::attention

#define FUSEDKERNELS_ATTENTION_FWD_SM90_INSTANCE(T, D)                   \
  template bool fusedkernels::attention::fwd_sm90_available<T, D>(); \
  template cudaError_t fusedkernels::attention::launch_fwd_sm90<T, D>(const fusedkernels::attention::FwdParams&, cudaStream_t);
