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
// Which Hopper kernels: FUSEDKERNELS_ATTENTION_KERNEL=sm90 keeps the ones without warp specialisation
// (sm90/attention_fwd_sm90.cuh, sm90/attention_bwd_sm90.cuh) wherever the others would run, =sm90ws takes the
// warp-specialised ones wherever they can (tests and benchmarks of each); otherwise the launchers choose
// (launch_fwd_sm90, launch_bwd_dkdv_sm90).
enum class Sm90Kernel { kChosen, kPlain, kWarpSpecialised };
inline Sm90Kernel sm90_kernel_asked() {
  const char* choice = std::getenv("FUSEDKERNELS_ATTENTION_KERNEL");
  if (choice != nullptr && std::strcmp(choice, "sm90") == 0) return Sm90Kernel::kPlain;
  if (choice != nullptr && std::strcmp(choice, "sm90ws") == 0) return Sm90Kernel::kWarpSpecialised;
  return Sm90Kernel::kChosen;
}

inline bool empty_grid(const dim3& grid) { return grid.x == 0 || grid.y == 0 || grid.z == 0; }

template <auto Kernel, int kThreads, int kSmemBytes, typename Params>
cudaError_t launch(const dim3& grid, const Params& p, cudaStream_t stream) {
  if (empty_grid(grid)) return cudaSuccess;
  resident_blocks<Kernel, kThreads, kSmemBytes>();  // raises the shared-memory limit on this device
  Kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
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
  const dim3 grid(ceil_div(p.seqlen_q, Cfg::kBlockM), p.heads_q, p.batch);
  // Dropout has its own instance: its Philox draws cost registers the plain kernel needs.
  if (p.dropout_p > 0.0f) return launch<attention_fwd_kernel<Cfg, true>, Cfg::kThreads, Cfg::kSmemBytes>(grid, p, stream);
  return launch<attention_fwd_kernel<Cfg, false>, Cfg::kThreads, Cfg::kSmemBytes>(grid, p, stream);
}

// The Hopper dK dV kernel's CTAs per (128-key tile, kv head): with grouped-query attention, one CTA per key tile
// and kv head loops over every q head of the group, and at small batch those few, long CTAs (at 4·16·2048 causal
// with 4 kv heads, 256 CTAs of 8 to 128 steps on 132 SMs) leave SMs idle at the end. Splitting a group's q heads
// over kv_split CTAs (their dK dV added into an fp32 accumulator, then scaled and cast) gives enough CTAs for 4
// waves where the group allows; FUSEDKERNELS_ATTENTION_KV_SPLIT=n asks for n (the largest divisor of the group up
// to n; tests and benchmarks; read per call). 1 off the Hopper path.
template <typename T, int kD>
int bwd_kv_split(const BwdParams& p) {
  const int group = p.fwd.heads_q / p.fwd.heads_kv;
  if (group == 1 || !use_bwd_sm90<T, kD>(p)) return 1;
  const auto divisor_up_to = [&](int64_t n) {
    int split = 1;
    for (int s = 2; s <= group && s <= n; ++s) split = group % s == 0 ? s : split;
    return split;
  };
  if (const char* value = std::getenv("FUSEDKERNELS_ATTENTION_KV_SPLIT"); value != nullptr && std::atoi(value) > 0) {
    return divisor_up_to(std::atoi(value));
  }
  constexpr int kKeyTile = 128;  // BwdSm90Config::kBlockN
  const int64_t ctas = ceil_div(p.fwd.seqlen_k, kKeyTile) * p.fwd.heads_kv * p.fwd.batch;
  const int64_t wanted = ceil_div(4 * int64_t(sm_count()), std::max<int64_t>(ctas, 1));
  int split = 1;
  for (int s = 2; s <= group && split < wanted; ++s) split = group % s == 0 ? s : split;
  return split;
}

template <typename T, int kD>
int64_t bwd_workspace(const BwdParams& p) {
  const int64_t dsum = p.total_q * p.fwd.heads_q;
  if (p.deterministic) return dsum;
  const int64_t dkv = bwd_kv_split<T, kD>(p) > 1 ? p.total_k * p.fwd.heads_kv * 2 * kD : 0;
  return dkv_accum_offset(p.total_q, p.fwd.heads_q, kD) + dkv;
}

template <typename T, int kD>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Cfg = BwdConfigFor<T, kD>;
  using DqCfg = DqConfigFor<T, kD>;
  const FwdParams& f = p.fwd;
  const dim3 rows_grid(ceil_div(f.seqlen_q, 8), f.heads_q, f.batch);
  if (!empty_grid(rows_grid)) attention_bwd_preprocess_kernel<T, kD><<<rows_grid, 256, 0, stream>>>(p, p.workspace);
  const dim3 kv_grid(ceil_div(f.seqlen_k, Cfg::kBlockN) * Cfg::kSlices, f.heads_kv, f.batch);
  if (p.deterministic) {
    cudaError_t err = launch<attention_bwd_dkdv_kernel<Cfg, false>, Cfg::kThreads, Cfg::kSmemBytes>(kv_grid, p, stream);
    if (err != cudaSuccess) return err;
    const dim3 q_grid(ceil_div(f.seqlen_q, DqCfg::kBlockM), f.heads_q, f.batch);
    return launch<attention_bwd_dq_kernel<DqCfg>, DqCfg::kThreads, DqCfg::kSmemBytes>(q_grid, p, stream);
  }
  float* dq_accum = p.workspace + dq_accum_offset(p.total_q, f.heads_q);
  cudaError_t err = cudaMemsetAsync(dq_accum, 0, sizeof(float) * p.total_q * f.heads_q * kD, stream);
  if (err != cudaSuccess) return err;
  if (!use_bwd_sm90<T, kD>(p)) {
    err = launch<attention_bwd_dkdv_kernel<Cfg, true>, Cfg::kThreads, Cfg::kSmemBytes>(kv_grid, p, stream);
  } else {
    BwdParams split = p;
    split.kv_split = bwd_kv_split<T, kD>(p);
    if (split.kv_split > 1) {
      float* dkv_accum = p.workspace + dkv_accum_offset(p.total_q, f.heads_q, kD);
      err = cudaMemsetAsync(dkv_accum, 0, sizeof(float) * p.total_k * f.heads_kv * 2 * kD, stream);
      if (err != cudaSuccess) return err;
    }
    err = launch_bwd_dkdv_sm90<T, kD>(split, stream);
    if (err == cudaSuccess && split.kv_split > 1) {
      const dim3 dkv_grid(ceil_div(int64_t(f.seqlen_k) * (kD / 8), 256), f.heads_kv, f.batch);
      if (!empty_grid(dkv_grid)) attention_bwd_dkv_convert_kernel<T, kD><<<dkv_grid, 256, 0, stream>>>(split);
      err = cudaGetLastError();
    }
  }
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
