// LayerNorm / RMSNorm, alone or after a residual add (h = residual + dropout(x + x_bias), normalized, and h
// returned as the new residual): the parameter structs and launchers shared by the kernels and the bindings.
// No torch headers here: norm_api.cpp fills these structs from tensors.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/philox_state.h"

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
  const void* dy;      // [rows, hidden], contiguous, dtype x_dtype (add + norm: nullptr when y has no grad)
  const void* x;       // [rows, hidden], contiguous, dtype x_dtype (add + norm: h, in residual_dtype)
  const void* weight;  // [hidden] in w_dtype, or nullptr
  const float* mean;   // [rows]; nullptr for RMSNorm
  const float* rstd;   // [rows]
  void* dx;            // [rows, hidden], dtype x_dtype (add + norm: nullptr when not wanted)
  void* dweight;       // [hidden] in w_dtype, or nullptr when not wanted
  void* dbias;         // [hidden] in w_dtype, or nullptr when not wanted
  float* partials;     // workspace of bwd_workspace_floats() floats (per-block column sums)
  int64_t rows;
  int hidden;
  DType x_dtype;
  DType w_dtype;
  bool rms;
};

// Add + norm: the rows normalized are h = residual + dropout(x + x_bias), computed in fp32 and rounded to
// residual_dtype, written to residual_out; the statistics and y are those of the rounded h. (A struct of
// its own: the plain norm kernels' parameters stay as small as they were.)
struct AddFwdParams : FwdParams {
  const void* residual;  // [rows, hidden], contiguous, dtype residual_dtype (x_dtype or float32)
  const void* x_bias;    // [hidden] in x_dtype, or nullptr
  void* residual_out;    // [rows, hidden], dtype residual_dtype
  DType residual_dtype;
  float dropout_p;       // 0: no dropout; element (r, c) is kept when its Philox draw (norm_kernels.cuh:
  PhiloxState philox;    //   RowDropout) is below (1 - p) * 2^32, and then scaled by 1 / (1 - p)
  int64_t* rng_state;    // [2]: the seed and offset drawn from, written when dropout_p > 0 (for the backward)
};

// Add + norm's backward, from the saved h (in `x`): dh = d(norm)/dh + dresidual_out, dresidual = dh,
// dx = mask * dh / (1 - p) (the mask regenerated from rng_state), dx_bias = sum over rows of dx.
struct AddBwdParams : BwdParams {
  const void* dresidual_out;  // [rows, hidden] in residual_dtype, or nullptr
  void* dresidual;            // [rows, hidden] in residual_dtype, or nullptr when not wanted
  void* dx_bias;              // [hidden] in x_dtype, or nullptr when not wanted (then dx may be nullptr too)
  DType residual_dtype;
  float dropout_p;
  const int64_t* rng_state;   // [2], the forward's, when dropout_p > 0
};

// A kernel's params: add + norm's, or the plain norm's.
template <bool kAdd>
using FwdParamsT = std::conditional_t<kAdd, AddFwdParams, FwdParams>;
template <bool kAdd>
using BwdParamsT = std::conditional_t<kAdd, AddBwdParams, BwdParams>;

// Which results add + norm's backward computes, from what the caller wants (dx, dresidual, dx_bias, dweight,
// dnorm_bias): dx also for dx_bias (its sum over rows), the parameter grads only when y has a grad.
struct AddBwdOutputs {
  bool dx, dresidual, dx_bias, dweight, dnorm_bias;
};
inline AddBwdOutputs add_bwd_outputs(const std::array<bool, 5>& want, bool has_dy, bool has_weight, bool has_norm_bias) {
  return {want[0] || want[2], want[1], want[2], want[3] && has_weight && has_dy, want[4] && has_norm_bias && has_dy};
}

// Launch on `stream`; return the launch error (cudaSuccess when all went well).
cudaError_t norm_fwd(const FwdParams& p, cudaStream_t stream);
cudaError_t norm_bwd(const BwdParams& p, cudaStream_t stream);
cudaError_t add_norm_fwd(const AddFwdParams& p, cudaStream_t stream);
cudaError_t add_norm_bwd(const AddBwdParams& p, cudaStream_t stream);

// Floats of workspace the backward needs for these sizes on the current device (0 when no column sum is
// wanted).
int64_t bwd_workspace_floats(const BwdParams& p);
int64_t add_bwd_workspace_floats(const AddBwdParams& p);

}  // namespace fusedkernels::norm
