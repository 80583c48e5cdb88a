// cp.async (sm_80+): 16-byte copies from global to shared memory that run while the thread computes.
#pragma once

namespace fusedkernels {

// Copies 16 bytes, or writes 16 zero bytes and reads nothing when `pred` is false (`src` must still be
// a valid address).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* src, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace fusedkernels
