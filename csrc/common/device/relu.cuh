// relu as torch's: NaN stays NaN (fmaxf(NaN, 0) is 0, which would hide a diverging model's NaNs). One
// NaN-propagating max on sm_80+, a select before.
#pragma once

namespace fusedkernels {

__device__ __forceinline__ float relu(float z) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(r) : "f"(z));
  return r;
#else
  return z <= 0.0f ? 0.0f : z;
#endif
}

}  // namespace fusedkernels
