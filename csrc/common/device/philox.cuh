// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a counter-based
// generator, so any thread can regenerate any element's random number from (key, counter) alone — what lets
// a backward pass rebuild a dropout mask instead of storing it.
#pragma once

#include <cstdint>

#include "common/philox_state.h"

namespace fusedkernels {

__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kMul0, counter.x), lo0 = kMul0 * counter.x;
    const uint32_t hi1 = __umulhi(kMul1, counter.z), lo1 = kMul1 * counter.z;
    counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
    key.x += kWeyl0;
    key.y += kWeyl1;
  }
  return counter;
}

// The seed and offset of this call (torch's PhiloxCudaState, read on the device so graph replays advance).
__device__ __forceinline__ void philox_seed_offset(const PhiloxState& ph, uint64_t& seed, uint64_t& offset) {
  if (ph.captured) {
    seed = static_cast<uint64_t>(*ph.seed_ptr);
    offset = static_cast<uint64_t>(*ph.offset_ptr) + ph.offset_intragraph;
  } else {
    seed = ph.seed;
    offset = ph.offset;
  }
}

// Dropout with probability p keeps an element when its 32-bit draw is below this: (1 - p) * 2^32, clamped.
__device__ __forceinline__ uint32_t keep_threshold(float p) {
  return static_cast<uint32_t>(fminf((1.0f - p) * 4294967296.0f, 4294967295.0f));
}

}  // namespace fusedkernels
