// sm90_double: see smoke.h.
#include "common/device/sm90.cuh"
#include "common/host/launch.h"
#include "smoke/smoke.h"

namespace fusedkernels::smoke {
namespace {

constexpr int kThreads = 128;  // one warpgroup

__global__ void __launch_bounds__(kThreads) double_kernel(const float* x, float* y, int64_t n) {
#if FUSEDKERNELS_SM90A
  __shared__ alignas(128) float tile[kTileFloats];
  __shared__ alignas(8) uint64_t full;
  if (threadIdx.x == 0) {
    sm90::mbarrier_init(&full, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  uint32_t parity = 0;
  for (int64_t begin = int64_t(blockIdx.x) * kTileFloats; begin < n; begin += int64_t(gridDim.x) * kTileFloats) {
    const int count = n - begin < kTileFloats ? int(n - begin) : kTileFloats;
    if (threadIdx.x == 0) {
      sm90::mbarrier_arrive_expect_tx(&full, count * sizeof(float));
      sm90::bulk_copy_g2s(tile, x + begin, count * sizeof(float), &full);
    }
    sm90::mbarrier_wait(&full, parity);
    parity ^= 1;
    sm90::wgmma_fence();  // sm_90a only: the reason this file exists
    for (int i = threadIdx.x; i < count; i += kThreads) tile[i] *= 2.f;
    sm90::fence_proxy_async_shared();
    __syncthreads();
    if (threadIdx.x == 0) {
      sm90::bulk_copy_s2g(y + begin, tile, count * sizeof(float));
      sm90::bulk_commit();
      sm90::bulk_wait_all();  // the tile is rewritten next iteration
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    __syncthreads();
  }
#else
  __trap();  // never launched: sm90_double_available() is false without sm_90a code
#endif
}

}  // namespace

bool sm90_double_available() {
#ifdef FUSEDKERNELS_SM90A_BUILT  // else the kernel's only body is the trap (a build for "90" or "80+PTX")
  return compute_capability() == 90 && has_image_for_current_device<double_kernel>();
#else
  return false;
#endif
}

cudaError_t sm90_double(const float* x, float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kTileFloats), int64_t(sm_count()) * 4);
  double_kernel<<<blocks, kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

}  // namespace fusedkernels::smoke
