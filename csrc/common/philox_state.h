// The Philox seed and offset of one random call, as torch's CUDA generator hands them out (PhiloxCudaState):
// the values, or, under CUDA graph capture, pointers that the graph's replays update plus an offset within
// the graph. Shared by kernels and bindings (no torch): kernels resolve it on the device with
// philox_seed_offset (common/device/philox.cuh), bindings fill it with philox_state (common/torch/philox.h).
#pragma once

#include <cstdint>

namespace fusedkernels {

struct PhiloxState {
  uint64_t seed = 0, offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  bool captured = false;
};

}  // namespace fusedkernels
