// The Hopper forward's launchers; each (dtype, head dim) pair is instantiated in its own file beside this.
#pragma once

#include "attention/attention_launch.cuh"
#include "attention/sm90/attention_fwd_sm90.cuh"
#include "attention/sm90/attention_fwd_sm90_ws.cuh"

namespace fusedkernels::attention {

// The most tiles one launch takes along z: a grid's limit, or fewer where FUSEDKERNELS_ATTENTION_TILES_PER_LAUNCH
// says (tests take the several-launch path on small shapes); read per call, as portable_kernel_forced.
inline int64_t tiles_per_launch() {
  constexpr int64_t kMaxGridZ = 65535;
  const char* value = std::getenv("FUSEDKERNELS_ATTENTION_TILES_PER_LAUNCH");
  const int64_t n = value != nullptr ? std::atoll(value) : 0;
  return n > 0 && n < kMaxGridZ ? n : kMaxGridZ;
}

// The forward's launch, one CTA per (query tile, head, sequence) in the order fwd_tile (attention_fwd_sm90.cuh)
// describes: under a causal mask a grid (heads, batch, tiles), the last tile first, in several launches past a
// grid's z limit; else (tiles, heads, batch). Measured on the H200 (docs/perf-notes.md, attention, tile order):
// causal forwards +3-12%; the same order cost non-causal forwards 1-4% and every backward 1-9%.
// (The portable forward keeps its grid (tiles, heads, batch): fwd_tile's selects cost it 40-50 bytes more spill.)
// (Params: FwdParams, or FwdWsParams holding them)
inline FwdParams& fwd_params_of(FwdParams& p) { return p; }
inline FwdParams& fwd_params_of(FwdWsParams& w) { return w.p; }

template <auto Kernel, int kThreads, int kSmemBytes, typename Params>
cudaError_t launch_fwd_tiles(Params params, int64_t tiles, cudaStream_t stream) {
  FwdParams& p = fwd_params_of(params);
  p.tiles_slowest = p.causal;
  if (!p.tiles_slowest) {
    p.tile_offset = static_cast<int>(tiles - 1);
    return launch<Kernel, kThreads, kSmemBytes>(dim3(tiles, p.heads_q, p.batch), params, stream);
  }
  const int64_t per_launch = tiles_per_launch();
  for (int64_t first = 0; first < tiles; first += per_launch) {
    p.tile_offset = static_cast<int>(tiles - 1 - first);
    const dim3 grid(p.heads_q, p.batch, static_cast<unsigned>(std::min(per_launch, tiles - first)));
    if (const cudaError_t err = launch<Kernel, kThreads, kSmemBytes>(grid, params, stream); err != cudaSuccess) {
      return err;
    }
  }
  return cudaSuccess;
}

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
  // The warp-specialised forward where it takes the call (on the H200 1.1-1.5x the plain one), but at head dim 64
  // over at most 512 keys: there the plain kernel's 64-key tiles, two CTAs an SM, measured 1.08x faster, where the
  // warp-specialised one's 128-key tiles give a CTA 4 steps or fewer (docs/perf-notes.md, attention, sm90 fwd v3).
  const Sm90Kernel asked = sm90_kernel_asked();
  if (asked == Sm90Kernel::kWarpSpecialised || (asked == Sm90Kernel::kChosen && !(kD == 64 && p.seqlen_k <= 512))) {
    using WsCfg = FwdSm90WsConfig<T, kD>;
    static_assert(WsCfg::kBlockM == Cfg::kBlockM && WsCfg::smem_bytes(true) <= 227 * 1024);
    constexpr auto kWs = attention_fwd_sm90_ws_kernel<WsCfg, false>;
    constexpr auto kWsBias = attention_fwd_sm90_ws_kernel<WsCfg, true>;
    const bool registers = kernel_registers<kWs>() == WsCfg::kLaunchRegisters &&
                           kernel_registers<kWsBias>() == WsCfg::kLaunchRegisters;
    FwdWsParams w;
    if (registers && make_fwd_ws_params<WsCfg>(p, w)) {
      if (p.bias != nullptr) return launch_fwd_tiles<kWsBias, WsCfg::kThreads, WsCfg::smem_bytes(true)>(w, tiles, stream);
      return launch_fwd_tiles<kWs, WsCfg::kThreads, WsCfg::smem_bytes(false)>(w, tiles, stream);
    }
  }
  // The bias has its own instance: its loads and shared memory are not the plain kernel's to pay for.
  if (p.bias != nullptr) {
    return launch_fwd_tiles<attention_fwd_sm90_kernel<Cfg, true>, Cfg::kThreads, Cfg::smem_bytes(true)>(p, tiles,
                                                                                                      stream);
  }
  return launch_fwd_tiles<attention_fwd_sm90_kernel<Cfg, false>, Cfg::kThreads, Cfg::smem_bytes(false)>(p, tiles,
                                                                                                        stream);
}

}  // namespace fusedkernels::attention

#define FUSEDKERNELS_ATTENTION_FWD_SM90_INSTANCE(T, D)                   \
  template bool fusedkernels::attention::fwd_sm90_available<T, D>(); \
  template cudaError_t fusedkernels::attention::launch_fwd_sm90<T, D>(const fusedkernels::attention::FwdParams&, cudaStream_t);
