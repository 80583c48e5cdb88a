// An sm_90a-only kernel whose one job is to prove the arch axis of the build and of the dispatch: sources
// under sm90/ compile for sm_90a alone, and the op runs them only on a compute-capability-9.0 device whose
// build holds their code. The GEMM family's Hopper kernels take the same path.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fusedkernels::smoke {

// Elements of x a block stages through shared memory at a time.
constexpr int kTileFloats = 4096;

// y = 2 * x for n floats (n % 4 == 0, both 16-byte aligned): each tile goes global -> shared by a TMA bulk
// copy, is doubled in shared memory, and goes back by a bulk copy; the warpgroup also runs the wgmma
// fences, so the kernel needs sm_90a.
cudaError_t sm90_double(const float* x, float* y, int64_t n, cudaStream_t stream);

// Whether sm90_double can run on the current device with this build.
bool sm90_double_available();

}  // namespace fusedkernels::smoke
