// Programmatic dependent launch (sm_90+): a kernel launched with the programmatic stream serialization
// attribute may start while the kernel before it in the stream finishes; it must wait for that kernel's
// results (grid_dependency_wait) before it touches global memory. launch_dependents lets the next such
// kernel start once every block of this one has called it. Both are no-ops before sm_90.
#pragma once

namespace fusedkernels {

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace fusedkernels
