// The launchers: tile configuration per head dim, grids, shared-memory opt-in. Each (dtype, head dim)
// pair is instantiated in its own file under instances/ so the build parallelises; attention_dispatch.cu
// picks one.
#pragma once

#include <cstdlib>
#include <cstring>

#include "attention/attention_bwd.cuh"
#include "attention/attention_fwd.cuh"
#include "common/host/launch.h"

namespace fusedkernels::attention {

// Tiles per head dim, measured on the H200 (docs/perf-notes.md): 4 warps of 2 x 16 query rows; the smallest
// key tile that keeps the warps busy, since registers (2 query m-tiles of output accumulators plus the score
// tile) are what runs out. Backward: 8 warps x 16 keys against 64 query rows; head dim 256 keeps dK and dV for
// half the columns per CTA (two CTAs per key tile) and single-buffers, to fit registers and an A100's
// shared memory.
template <typename T, int kD>
using FwdConfigFor = FwdConfig<T, kD, (kD == 256 ? 64 : 128), (kD <= 64 ? 64 : 32), 4>;
template <typename T, int kD>
using BwdConfigFor = BwdConfig<T, kD, 64, (kD == 256 ? 4 : 8), (kD == 256 ? 128 : kD), (kD == 256 ? 1 : 2)>;
template <typename T, int kD>
using DqConfigFor = DqConfig<T, kD, (kD == 256 ? 1 : 2)>;

// FUSEDKERNELS_ATTENTION_KERNEL=portable keeps the mma.sync kernels on Hopper too (tests and benchmarks of
// that path); read per call, so a test can set it in-process.
inline bool portable_kernel_forced() {
  const char* choice = std::getenv("FUSEDKERNELS_ATTENTION_KERNEL");
  return choice != nullptr && std::strcmp(choice, "portable") == 0;
}

inline bool empty_grid(const dim3& grid) { return grid.x == 0 || grid.y == 0 || grid.z == 0; }

template <auto Kernel, int kThreads, int kSmemBytes, typename Params>
cudaError_t launch(const dim3& grid, const Params& p, cudaStream_t stream) {
  if (empty_grid(grid)) return cudaSuccess;
  resident_blocks<Kernel, kThreads, kSmemBytes>();  // raises the shared-memory limit on this device
  Kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

inline FwdParams& fwd_params(FwdParams& p) { return p; }
inline FwdParams& fwd_params(BwdParams& p) { return p.fwd; }

// The most tiles one launch takes: a grid's z limit, or fewer where FUSEDKERNELS_ATTENTION_TILES_PER_LAUNCH says
// (tests take the several-launch path on small shapes); read per call, as portable_kernel_forced.
inline int64_t tiles_per_launch() {
  constexpr int64_t kMaxGridZ = 65535;
  const char* value = std::getenv("FUSEDKERNELS_ATTENTION_TILES_PER_LAUNCH");
  const int64_t n = value != nullptr ? std::atoll(value) : 0;
  return n > 0 && n < kMaxGridZ ? n : kMaxGridZ;
}

// The tiled kernels' launch: one CTA per (tile, head, sequence) on a grid (heads, batch, tiles), so that CTAs,
// dispatched x fastest, start a tile for every head and sequence before the next tile starts anywhere, heaviest
// first (attention_common.cuh, tile_of): from the last tile down when kFromLast (query tiles under a causal
// mask), else from the first. More tiles than a grid's z holds go in several launches.
template <auto Kernel, int kThreads, int kSmemBytes, bool kFromLast, typename Params>
cudaError_t launch_tiles(int64_t tiles, int heads, int batch, Params p, cudaStream_t stream) {
  const int64_t per_launch = tiles_per_launch();
  for (int64_t first = 0; first < tiles; first += per_launch) {
    fwd_params(p).tile_offset = static_cast<int>(kFromLast ? tiles - 1 - first : first);
    const dim3 grid(heads, batch, static_cast<unsigned>(std::min(per_launch, tiles - first)));
    if (const cudaError_t err = launch<Kernel, kThreads, kSmemBytes>(grid, p, stream); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The Hopper forward (sm90/attention_fwd_sm90.cuh), instantiated for head dims 64 and 128 under sm90/.
template <typename T, int kD>
bool fwd_sm90_available();
template <typename T, int kD>
cudaError_t launch_fwd_sm90(const FwdParams& p, cudaStream_t stream);

// Whether the Hopper forward takes these params: its head dims, no dropout (which keeps the portable
// kernel), and FUSEDKERNELS_ATTENTION_KERNEL not set to "portable".
template <typename T, int kD>
bool use_fwd_sm90(const FwdParams& p) {
  if constexpr (kD == 64 || kD == 128) {
    return p.dropout_p == 0.0f && !portable_kernel_forced() && fwd_sm90_available<T, kD>();
  }
  return false;
}

// The Hopper backward's dK dV kernel (sm90/attention_bwd_sm90.cuh), head dims 64 and 128: it takes the atomic
// dq path without dropout; preprocess and dq convert stay the portable kernels.
template <typename T, int kD>
bool bwd_sm90_available();
template <typename T, int kD>
cudaError_t launch_bwd_dkdv_sm90(const BwdParams& p, cudaStream_t stream);

template <typename T, int kD>
bool use_bwd_sm90(const BwdParams& p) {
  if constexpr (kD == 64 || kD == 128) {
    return p.fwd.dropout_p == 0.0f && !p.deterministic && !portable_kernel_forced() &&
           bwd_sm90_available<T, kD>();
  }
  return false;
}

template <typename T, int kD>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  if (use_fwd_sm90<T, kD>(p)) return launch_fwd_sm90<T, kD>(p, stream);
  using Cfg = FwdConfigFor<T, kD>;
  const int64_t tiles = ceil_div(p.seqlen_q, Cfg::kBlockM);
  // Dropout has its own instance: its Philox draws cost registers the plain kernel needs.
  if (p.dropout_p > 0.0f) {
    return launch_tiles<attention_fwd_kernel<Cfg, true>, Cfg::kThreads, Cfg::kSmemBytes, true>(tiles, p.heads_q, p.batch, p,
                                                                                          stream);
  }
  return launch_tiles<attention_fwd_kernel<Cfg, false>, Cfg::kThreads, Cfg::kSmemBytes, true>(tiles, p.heads_q, p.batch, p,
                                                                                         stream);
}

template <typename T, int kD>
int64_t bwd_workspace(const BwdParams& p) {
  const int64_t dsum = p.total_q * p.fwd.heads_q;
  return p.deterministic ? dsum : dq_accum_offset(p.total_q, p.fwd.heads_q) + dsum * kD;
}

template <typename T, int kD>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Cfg = BwdConfigFor<T, kD>;
  using DqCfg = DqConfigFor<T, kD>;
  const FwdParams& f = p.fwd;
  const dim3 rows_grid(ceil_div(f.seqlen_q, 8), f.heads_q, f.batch);
  if (!empty_grid(rows_grid)) attention_bwd_preprocess_kernel<T, kD><<<rows_grid, 256, 0, stream>>>(p, p.workspace);
  const int64_t kv_tiles = ceil_div(f.seqlen_k, Cfg::kBlockN) * Cfg::kSlices;
  if (p.deterministic) {
    cudaError_t err = launch_tiles<attention_bwd_dkdv_kernel<Cfg, false>, Cfg::kThreads, Cfg::kSmemBytes, false>(
        kv_tiles, f.heads_kv, f.batch, p, stream);
    if (err != cudaSuccess) return err;
    return launch_tiles<attention_bwd_dq_kernel<DqCfg>, DqCfg::kThreads, DqCfg::kSmemBytes, true>(
        ceil_div(f.seqlen_q, DqCfg::kBlockM), f.heads_q, f.batch, p, stream);
  }
  float* dq_accum = p.workspace + dq_accum_offset(p.total_q, f.heads_q);
  cudaError_t err = cudaMemsetAsync(dq_accum, 0, sizeof(float) * p.total_q * f.heads_q * kD, stream);
  if (err != cudaSuccess) return err;
  err = use_bwd_sm90<T, kD>(p) ? launch_bwd_dkdv_sm90<T, kD>(p, stream)
                               : launch_tiles<attention_bwd_dkdv_kernel<Cfg, true>, Cfg::kThreads, Cfg::kSmemBytes, false>(
                                     kv_tiles, f.heads_kv, f.batch, p, stream);
  if (err != cudaSuccess) return err;
  const dim3 convert_grid(ceil_div(int64_t(f.seqlen_q) * (kD / 8), 256), f.heads_q, f.batch);
  if (!empty_grid(convert_grid)) attention_bwd_dq_convert_kernel<T, kD><<<convert_grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fusedkernels::attention

// The instances of one (T, head dim) pair; use at global scope.
#define FUSEDKERNELS_ATTENTION_FWD_INSTANCE(T, D) \
  template cudaError_t fusedkernels::attention::launch_fwd<T, D>(const fusedkernels::attention::FwdParams&, cudaStream_t);
#define FUSEDKERNELS_ATTENTION_BWD_INSTANCE(T, D)                                                                    \
  template cudaError_t fusedkernels::attention::launch_bwd<T, D>(const fusedkernels::attention::BwdParams&, cudaStream_t); \
  template int64_t fusedkernels::attention::bwd_workspace<T, D>(const fusedkernels::attention::BwdParams&);
