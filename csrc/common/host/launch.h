// Host-side launch facts, each cached per device (a process may drive several GPUs, and a kernel's
// shared-memory opt-in and occupancy are per device): SM count, compute capability, resident blocks.
// No torch here: launchers in kernel files use it.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

#include <cuda_runtime.h>

namespace fusedkernels {

constexpr int kMaxDevices = 64;

inline int current_device() {
  int device = 0;
  cudaGetDevice(&device);
  return device;
}

// cache[device], computed by compute() the first time (0 = not yet known; compute() never returns 0).
// Concurrent first calls may both compute: the value is the same.
template <typename Compute>
int per_device(std::atomic<int> (&cache)[kMaxDevices], int device, Compute&& compute) {
  if (device < 0 || device >= kMaxDevices) return compute();
  int value = cache[device].load(std::memory_order_relaxed);
  if (value == 0) {
    value = compute();
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

inline int sm_count(int device = current_device()) {
  static std::atomic<int> cache[kMaxDevices];
  return per_device(cache, device, [device] {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    return std::max(n, 1);
  });
}

// 10 * major + minor: 90 on Hopper, 80 on the A100.
inline int compute_capability(int device = current_device()) {
  static std::atomic<int> cache[kMaxDevices];
  return per_device(cache, device, [device] {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return std::max(10 * major + minor, 1);
  });
}

// Blocks of Kernel resident per SM of the current device with kThreads threads and kSmemBytes of dynamic
// shared memory. Raises the kernel's dynamic shared-memory limit on that device first, which launches
// need once static + dynamic shared memory passes 48 KiB: call it before every launch with dynamic shared
// memory (it is a cached lookup after the first).
template <auto Kernel, int kThreads, int kSmemBytes = 0>
int resident_blocks() {
  static std::atomic<int> cache[kMaxDevices];
  return per_device(cache, current_device(), [] {
    // Opt in whenever there is dynamic shared memory, not only past 48 KiB of it: without the opt-in the
    // limit is 48 KiB for static + dynamic together (the attribute's default is 48 KiB minus the kernel's
    // static shared memory), so a kernel with static arrays fails to launch ("invalid argument") with
    // dynamic memory at or just under 48 KiB. (add + norm's backward with the residual in x's 16-bit type:
    // 48 KiB staged + 9 KiB of static column-sum tile at 256 threads.) Raising the limit costs nothing.
    if (kSmemBytes > 0) {
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    }
    int blocks = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kThreads, kSmemBytes);
    return std::max(blocks, 1);
  });
}

// Whether this build holds machine code of Kernel that the current device can run (an sm_90a-only
// kernel on an A100, or a build for other archs, does not).
template <auto Kernel>
bool has_image_for_current_device() {
  static std::atomic<int> cache[kMaxDevices];
  return per_device(cache, current_device(), [] {
    cudaFuncAttributes attributes;
    const bool ok = cudaFuncGetAttributes(&attributes, Kernel) == cudaSuccess;
    if (!ok) cudaGetLastError();  // clear the error this query leaves behind
    return ok ? 1 : 2;
  }) == 1;
}

// Registers per thread of the current device's image of Kernel (-1 without one). A warp-specialised kernel's
// setmaxnreg split needs its launch value: a consumer's setmaxnreg.inc waits for registers the pool never had.
template <auto Kernel>
int kernel_registers() {
  static std::atomic<int> cache[kMaxDevices];
  return per_device(cache, current_device(), [] {
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, Kernel) != cudaSuccess) {
      cudaGetLastError();
      return -1;
    }
    return attributes.numRegs;
  });
}

// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch where the device has it
// (sm_90+): the kernel's blocks may be scheduled while the kernel before it in the stream drains, so the
// launch latency between the two is hidden. The kernel must call grid_dependency_wait()
// (common/device/pdl.cuh) before it reads or writes global memory. Works under CUDA-graph capture.
template <typename... Params, typename... Args>
cudaError_t launch_with_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                            Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = compute_capability() >= 90 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace fusedkernels
