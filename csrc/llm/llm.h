// The llm family (rotary embeddings, the cross-entropy step of the fused linear + cross-entropy): the parameter
// structs and launchers shared by the kernels and the bindings. No torch headers here: llm_api.cpp fills these
// structs from tensors.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fusedkernels::llm {

// Rotary position embedding of q and k in one launch (Su et al. 2021, "RoFormer"), in Hugging Face's elementwise
// form: over the first rotary_dim elements of each head,
//
//   out = x * cos + rotate(x) * sin                  (conjugate: out = x * cos - rotate(x * sin))
//
// rotate pairs element a with its partner b and maps (x_a, x_b) -> (-x_b, x_a): b = a + rotary_dim / 2 (the
// half split, HF's rotate_half) or b = a + 1 for even a (interleaved, GPT-J). cos / sin hold one value per rotated
// element (rotary_dim of them per token), so any table HF's formula takes is computed exactly; conjugate is the
// transpose (the backward: rotation by -theta when the pair shares its angle). Elements past rotary_dim are copied
// (out of place) or left (in place). Arithmetic in fp32.
//
// Strides in elements; the head dimension is contiguous everywhere. x / out index (batch b, token n, head h).
struct RotaryTensor {
  const void* in = nullptr;
  void* out = nullptr;   // == in when in place
  int heads = 0;         // 0: nothing to do for this tensor
  int64_t in_sb = 0, in_sn = 0, in_sh = 0;
  int64_t out_sb = 0, out_sn = 0, out_sh = 0;
};

struct RotaryParams {
  RotaryTensor q, k;
  const void* cos = nullptr;  // row of (b, position): cos + b * table_sb + position * table_sn
  const void* sin = nullptr;  // with cos's strides
  int64_t table_sb = 0, table_sn = 0;
  int64_t table_len = 0;  // rows of the table: positions outside [0, table_len) give NaN outputs
  const int64_t* position_ids = nullptr;  // position of (b, n): position_ids[b * pos_sb + n * pos_sn]; nullptr: n
  int64_t pos_sb = 0, pos_sn = 0;
  int64_t batch = 0, seqlen = 0;
  int head_dim = 0, rotary_dim = 0;
  DType dtype = DType::kFloat32;        // of q, k and the outputs
  DType table_dtype = DType::kFloat32;  // of cos / sin: dtype or float32
  bool interleaved = false, conjugate = false;
};

cudaError_t rotary(const RotaryParams& p, cudaStream_t stream);

// The rotary table of Hugging Face's rotary embedding (LlamaRotaryEmbedding.forward) at each token's position:
// angle_j = float(position) * inv_freq[j] in fp32 (j < half) and
//
//   cos row = (cos angle_0 .. cos angle_{half-1}, cos angle_0 .. cos angle_{half-1}) * scaling   (sin likewise)
//
// rounded to dtype: torch.cat((freqs, freqs), -1).cos() * attention_scaling, as HF computes it in fp32.
struct RotaryTableParams {
  const int64_t* positions = nullptr;  // [tokens]
  const float* inv_freq = nullptr;     // [half]
  void* cos = nullptr;                 // [tokens, 2 * half], contiguous
  void* sin = nullptr;
  int64_t tokens = 0;
  int half = 0;
  float scaling = 1.f;
  DType dtype = DType::kFloat32;  // of cos / sin
};

cudaError_t rotary_table(const RotaryTableParams& p, cudaStream_t stream);

// One chunk of the cross entropy over logits that a GEMM just wrote: per row r with target y (softcap s > 0:
// c = s * tanh(z / s), else c = z; smoothing e over V classes; z-loss weight zl),
//
//   lse  = log sum_v exp(c_v)
//   loss = lse - (1 - e) c_y - (e / V) sum_v c_v + zl * lse^2              (0 for ignore_index rows)
//   dz_v = [p_v (1 + 2 zl lse) - (1 - e) [v == y] - e / V] * (1 - (c_v / s)^2 if s > 0) * scale_r,  p = exp(c - lse)
//
// with dz written over the logits (0 for ignored rows). A target outside [0, V) that is not ignore_index gives a
// NaN loss and NaN gradients for its row (the CUDA kernel cannot raise without a host sync).
enum class CrossEntropyMode : int {
  kLoss = 0,         // loss and lse only
  kLossAndGrad = 1,  // loss, lse, and dz over the logits
  kGrad = 2,         // dz over the logits from the lse given (a recomputed chunk)
};

struct CrossEntropyParams {
  void* logits = nullptr;           // [rows, vocab], rows ld elements apart (ld a multiple of 8), dtype
  const int64_t* target = nullptr;  // [rows]
  const float* scale = nullptr;     // scale_r = scale[r * scale_stride] (kLossAndGrad, kGrad); nullptr: 1
  int64_t scale_stride = 0;
  float* loss = nullptr;  // [rows] (kLoss, kLossAndGrad)
  float* lse = nullptr;   // [rows]: written (kLoss, kLossAndGrad) or read (kGrad)
  int64_t rows = 0, vocab = 0, ld = 0;
  int64_t ignore_index = -100;
  float label_smoothing = 0.f, z_loss = 0.f, softcap = 0.f;
  DType dtype = DType::kFloat32;
  CrossEntropyMode mode = CrossEntropyMode::kLoss;
};

cudaError_t cross_entropy(const CrossEntropyParams& p, cudaStream_t stream);

// The reductions over every token of the call, one block in a fixed order (deterministic, no atomics), into
// out[0]: before the chunks the mean's gradient scale 1 / (tokens not ignored), 0 where none is (torch's gradients
// are zero then); after them the loss, the sum of the rows' losses, divided by the tokens not ignored for the mean
// (none: 0 / 0 = NaN, as torch).
enum class LossReduction : int { kGradScale = 0, kSum = 1, kMean = 2 };

struct LossReduceParams {
  const float* loss = nullptr;      // [rows] (kSum, kMean)
  const int64_t* target = nullptr;  // [rows] (kGradScale, kMean)
  float* out = nullptr;             // [1]
  int64_t rows = 0;
  int64_t ignore_index = -100;
  LossReduction mode = LossReduction::kSum;
};

cudaError_t loss_reduce(const LossReduceParams& p, cudaStream_t stream);

// data[i] *= *scale over a contiguous tensor, in place, the scale rounded to the data's type first (torch's mul_ by a
// 0-d tensor, bit for bit): the loss's grad applied to the gradients the forward
// computed for a grad of 1. When *scale is 1 (loss.backward() on the loss itself) nothing is read or written: the
// kernel reads the scale on the device, where the host would have to wait for it.
struct ScaleParams {
  void* data = nullptr;
  const float* scale = nullptr;  // [1]
  int64_t n = 0;
  DType dtype = DType::kFloat32;
};

cudaError_t scale_inplace(const ScaleParams& p, cudaStream_t stream);

}  // namespace fusedkernels::llm
