// What autocast does to an op on its lower-precision list, for the CUDA or the CPU autocast key: the key the
// op's autocast kernel excludes while it runs, and the cast of a floating tensor to the device's autocast
// dtype (float64 and non-floating tensors stay as they are; at::autocast::cached_cast's rules).
#pragma once

#include <ATen/autocast_mode.h>

namespace fusedkernels {

template <c10::DeviceType kDevice>
constexpr c10::DispatchKey autocast_key =
    kDevice == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA : c10::DispatchKey::AutocastCPU;

template <c10::DeviceType kDevice, typename T>
auto autocast_lower(const T& t) {
  return at::autocast::cached_cast(at::autocast::get_autocast_dtype(kDevice), t, kDevice);
}

}  // namespace fusedkernels
