// LayerNorm / RMSNorm: the parameter structs and launchers shared by the kernels and the bindings.
// No torch headers here: norm_api.cpp fills these structs from tensors.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fusedkernels::norm {

// Largest hidden size with a native kernel. Past it the Python layer falls back to the reference.
constexpr int kMaxHidden = 65536;

struct FwdParams {
  const void* x;       // [rows, hidden], contiguous, dtype x_dtype
  const void* weight;  // [hidden] in w_dtype, or nullptr
  const void* bias;    // [hidden] in w_dtype, or nullptr (LayerNorm only)
  void* y;             // [rows, hidden], dtype x_dtype
  float* mean;         // [rows]; nullptr for RMSNorm
  float* rstd;         // [rows]
  int64_t rows;
  int hidden;
  float eps;
  DType x_dtype;
  DType w_dtype;
  bool rms;
};

struct BwdParams {
  const void* dy;      // [rows, hidden], contiguous, dtype x_dtype
  const void* x;       // [rows, hidden], contiguous, dtype x_dtype
  const void* weight;  // [hidden] in w_dtype, or nullptr
  const float* mean;   // [rows]; nullptr for RMSNorm
  const float* rstd;   // [rows]
  void* dx;            // [rows, hidden], dtype x_dtype
  void* dweight;       // [hidden] in w_dtype, or nullptr when not wanted
  void* dbias;         // [hidden] in w_dtype, or nullptr when not wanted
  float* partials;     // workspace of bwd_workspace_floats() floats (per-block dweight / dbias sums)
  int64_t rows;
  int hidden;
  DType x_dtype;
  DType w_dtype;
  bool rms;
};

// Launch on `stream`; return the launch error (cudaSuccess when all went well).
cudaError_t norm_fwd(const FwdParams& p, cudaStream_t stream);
cudaError_t norm_bwd(const BwdParams& p, cudaStream_t stream);

// Floats of workspace norm_bwd needs for these sizes on the current device (0 when no weight or bias grad).
int64_t bwd_workspace_floats(const BwdParams& p);

}  // namespace fusedkernels::norm
