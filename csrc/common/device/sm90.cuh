// Hopper (sm_90) building blocks: mbarriers, TMA bulk copies between global and shared memory, and the
// wgmma fences. Include only from sources under an sm90/ folder (compiled for sm_90a only) and call only
// from code guarded by FUSEDKERNELS_SM90A.
#pragma once

#include <cstdint>

// True in the device pass for sm_90a, where wgmma, setmaxnreg and the TMA instructions exist.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FUSEDKERNELS_SM90A 1
#else
#define FUSEDKERNELS_SM90A 0
#endif

namespace fusedkernels::sm90 {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// An mbarrier that completes a phase when `arrivals` threads have arrived and the bytes they announced
// have landed.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(arrivals) : "memory");
}

// Makes mbarrier initialisations visible to the async proxy (the TMA unit) before it signals them.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Arrives on the barrier and announces `bytes` more bytes that copies will complete on it.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
}

// Waits until the barrier's phase `parity` (0, 1, 0, ...) has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n"
      "}\n" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
}

// TMA bulk copy of `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared
// memory; completes on `bar`.
__device__ __forceinline__ void bulk_copy_g2s(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_address(smem_dst)),
               "l"(gmem_src), "r"(bytes), "r"(smem_address(bar))
               : "memory");
}

// TMA tile copy of a 2D tensor map's box at (col, row) (elements; out-of-range parts read as zeros) into
// shared memory, in the map's swizzle; completes on `bar`. The map lives in kernel parameter space
// (`const __grid_constant__ CUtensorMap`).
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const void* tensor_map, int col, int row, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_address(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(col), "r"(row), "r"(smem_address(bar))
      : "memory");
}

// Asks L2 for a 2D tensor map's box at (col, row) (elements), with no shared-memory destination: a later tma_load_2d
// of it then waits for L2, not for HBM.
__device__ __forceinline__ void tma_prefetch_2d(const void* tensor_map, int col, int row) {
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];" ::"l"(
                   reinterpret_cast<uint64_t>(tensor_map)),
               "r"(col), "r"(row)
               : "memory");
}

// TMA tile copy of a 4D tensor map's box at (c0, c1, c2, c3) (elements, innermost first; out-of-range parts
// read as zeros) into shared memory, in the map's swizzle; completes on `bar`.
__device__ __forceinline__ void tma_load_4d(void* smem_dst, const void* tensor_map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(
          smem_address(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_address(bar))
      : "memory");
}

// TMA im2col copy of a 4D NHWC tensor map: channels c.. of the map's pixelsPerColumn pixels starting at input
// position (w, h) of image n (the filter window's corner for the first output pixel, stepping by the map's
// traversal strides through its bounding box), each read at (w + off_w, h + off_h) (the filter tap); pixels
// outside the image read as zeros. Completes on `bar`.
__device__ __forceinline__ void tma_load_im2col_4d(void* smem_dst, const void* tensor_map, int c, int w, int h, int n,
                                                   uint16_t off_w, uint16_t off_h, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.im2col.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}],"
      " [%6], {%7, %8};" ::"r"(smem_address(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c), "r"(w), "r"(h), "r"(n), "r"(smem_address(bar)), "h"(off_w),
      "h"(off_h)
      : "memory");
}

// A plain arrival on the barrier (no bytes announced).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(bar)) : "memory");
}

// Register reallocation between warpgroups (sm_90a): a producer warpgroup gives registers back, the consumer
// warpgroups take them; kRegisters a multiple of 8 in [24, 256]. The kernel needs a register cap at entry
// (__launch_bounds__(threads, 1)).
template <int kRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}

// Named barriers (ids 1..15; 0 is __syncthreads'): `threads` threads in all, a multiple of 32, arrive or wait.
// arrive does not wait, so one group can signal another that waits with sync.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// TMA bulk copy from shared to global memory, in the issuing thread's bulk group.
__device__ __forceinline__ void bulk_copy_s2g(void* gmem_dst, const void* smem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem_dst),
               "r"(smem_address(smem_src)), "r"(bytes)
               : "memory");
}

// TMA tile copies of a shared-memory box (in the map's swizzle) to a 2D / 3D tensor map's box at the given
// coordinates (elements, innermost first; the parts outside the tensor are not written), in the issuing
// thread's bulk group.
__device__ __forceinline__ void tma_store_2d(const void* tensor_map, const void* smem_src, int col, int row) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(tensor_map)),
               "r"(smem_address(smem_src)), "r"(col), "r"(row)
               : "memory");
}
__device__ __forceinline__ void tma_store_3d(const void* tensor_map, const void* smem_src, int x, int y, int z) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(tensor_map)),
               "r"(smem_address(smem_src)), "r"(x), "r"(y), "r"(z)
               : "memory");
}

// TMA reduction of a shared-memory box (in the map's swizzle) into a 4D tensor map's box at (c0, c1, c2, c3): the
// copy engine adds each element to the one in global memory (the map's type: float32 adds in fp32); the parts
// outside the tensor are skipped. In the issuing thread's bulk group.
__device__ __forceinline__ void tma_reduce_add_4d(const void* tensor_map, const void* smem_src, int c0, int c1, int c2,
                                                  int c3) {
  asm volatile("cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];" ::
                   "l"(reinterpret_cast<uint64_t>(tensor_map)),
               "r"(smem_address(smem_src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until at most kPending of this thread's bulk groups are still reading their shared-memory sources
// (their global writes may still be in flight): the sources can then be overwritten.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

// Waits until this thread's bulk groups have finished (their writes are done).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Orders this thread's generic-proxy writes to shared memory before later async-proxy (TMA) reads.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// wgmma ordering (sm_90a): registers written before the fence are visible to the next wgmma; commit
// closes a group of issued wgmmas; wait<N> leaves at most N groups in flight.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

}  // namespace fusedkernels::sm90
