// Fused optimizer steps over many tensors: the tensor table, the step parameters and the launchers.
// No torch headers here: optim_api.cpp fills these structs from tensor lists.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fusedkernels::optim {

// Elements per chunk: the unit of work a block takes at a time.
constexpr int64_t kChunk = 16384;
// Tensors one launch takes. The table travels as a kernel parameter (__grid_constant__, up to 32 KB on
// sm_70+ with CUDA 12.1+), so a 290-tensor model steps in one launch with no host-to-device copy.
constexpr int kTableTensors = 384;
constexpr int kSlots = 6;

// Slots of the table: which list a pointer belongs to.
enum Slot : int {
  kParam = 0,   // updated in place (its own dtype)
  kGrad = 1,    // read (written back unscaled when grad_scale is given)
  kState0 = 2,  // Adam, LAMB: exp_avg;  SGD: momentum_buffer
  kState1 = 3,  // Adam, LAMB: exp_avg_sq
  kState2 = 4,  // Adam: max_exp_avg_sq (amsgrad)
  kMaster = 5,  // fp32 master copy of a 16-bit param (read and written), or unused
};

struct TensorTable {
  void* ptr[kSlots][kTableTensors];
  float* step[kTableTensors];               // the tensor's step count before this step (Adam, LAMB, SGD with
                                            // momentum); the op adds 1 unless the step is skipped
  int64_t numel[kTableTensors];
  int32_t chunk_start[kTableTensors + 1];   // prefix sums of chunks per tensor
  uint8_t aligned[kTableTensors];           // every pointer of the tensor is 16-byte aligned
  int32_t num_tensors;
};

// Scalars shared by every optimizer; a *_ptr, when set, overrides the scalar and lives on the device
// (capturable steps, GradScaler, deferred clipping).
struct StepScalars {
  float lr;
  const float* lr_ptr;
  const float* grad_scale;  // grads are divided by it (AMP), or nullptr
  const float* found_inf;   // the step is skipped when it is nonzero, or nullptr
  const float* clip_coef;   // grads are multiplied by it (clip_grad_norm_ folded in), or nullptr
  bool maximize;
  bool write_back_grad;     // store the unscaled grad (what torch does when grad_scale is given)
};

struct AdamParams {
  StepScalars s;
  float beta1, beta2, eps, weight_decay;
  bool decoupled;  // AdamW: decay the param; Adam: add weight_decay * param to the grad
  bool amsgrad;
  DType param_dtype, state_dtype;
  bool master;     // kMaster holds fp32 masters
};

// With momentum, a tensor whose step count is 0 starts its buffer from the grad (torch's first step).
struct SgdParams {
  StepScalars s;
  float momentum, dampening, weight_decay;
  bool nesterov;
  DType param_dtype;
  bool master;
};

// LAMB (apex's FusedLAMB formulas): update u = m^ / (sqrt(v^) + eps) (+ wd * w when decoupled), then
// w -= lr * trust * u with trust = |w| / |u| per tensor. Three kernels: moments + per-chunk partial norms,
// per-tensor trust ratios (fixed order: deterministic), the update (u recomputed from the stored moments).
// Sharded params (FSDP2) need |w| and |u| over every shard: the step then runs in two phases. sums_out: the
// first two kernels write each tensor's sum w^2 and sum u^2 there and the step stops; sums_in: the step
// starts from those sums (added up across the shards by the caller) and runs the trust and update kernels.
struct LambParams {
  StepScalars s;
  float beta1, beta2, eps, weight_decay;
  float grad_weight;       // m = beta1 m + grad_weight g: 1 - beta1 (grad averaging) or 1
  bool decoupled;          // decay inside the update (AdamW-style), else added to the grad (L2)
  bool bias_correction;
  bool always_adapt;       // apply the trust ratio also when weight_decay is 0 (NVLAMB)
  const float* grad_norm;  // total 2-norm of the raw grads: they are clipped to max_grad_norm; or nullptr
  float max_grad_norm;
  float* partials;         // lamb_partials(t) floats: sum w^2 and sum u^2 per chunk, then trust per tensor
  float* sums_out;         // 2 floats per tensor of the table (sum w^2, sum u^2), or nullptr
  const float* sums_in;    // the same, summed over the shards, or nullptr
  DType param_dtype, state_dtype;
  bool master;
};

// Grad norms: partial results per block of a fixed grid, summed in a fixed order (deterministic).
struct NormParams {
  DType grad_dtype;
  bool inf_norm;
  float* partials;  // norm_partials() floats per launch, this launch's slice
};

int norm_partials();  // floats of partials each launch writes (a fixed grid on this device)

// Each step launcher also adds 1 to the table's step counts, unless *found_inf says the step is skipped.
cudaError_t adam_step(const TensorTable& t, const AdamParams& p, cudaStream_t stream);
cudaError_t sgd_step(const TensorTable& t, const SgdParams& p, cudaStream_t stream);
// Floats of workspace LambParams::partials needs for a table.
inline int64_t lamb_partials(const TensorTable& t) { return 2 * int64_t(t.chunk_start[t.num_tensors]) + t.num_tensors; }
cudaError_t lamb_step(const TensorTable& t, const LambParams& p, cudaStream_t stream);
cudaError_t grad_norm_partials(const TensorTable& t, const NormParams& p, cudaStream_t stream);
// Adds 1 to the table's step counts unless *found_inf (when given) is nonzero; the step launchers call it
// after their kernels, so every block of those reads the count from before the step.
void increment_steps(const TensorTable& t, const float* found_inf, cudaStream_t stream);
// total = (sum or max of all partials)^(1/p); coef = min(max_norm / (total + 1e-6), 1) when coef != nullptr.
cudaError_t grad_norm_finish(const float* partials, int count, bool inf_norm, float max_norm, float* total,
                             float* coef, cudaStream_t stream);
// grads *= *coef over the table's kGrad slot.
cudaError_t scale_grads(const TensorTable& t, DType grad_dtype, const float* coef, cudaStream_t stream);

}  // namespace fusedkernels::optim
