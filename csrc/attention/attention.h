// Fused attention: the parameter structs and launchers shared by the kernels and the bindings. No torch
// headers here: attention_api.cpp fills these structs from tensors.
//
// Layout. q is [batch, seqlen_q, heads_q, head_dim] and k, v are [batch, seqlen_k, heads_kv, head_dim], each
// with any element strides for batch, row and head that are multiples of 8 (the head_dim elements contiguous,
// the data 16-byte aligned: the kernels copy 16 bytes at a time),
// so (batch, heads, seq, dim) tensors as torch's scaled_dot_product_attention takes them need no copy.
// Varlen: cu_seqlens_q / cu_seqlens_k ([batch + 1] int32, non-decreasing) give each sequence's first row in
// the packed [total, heads, head_dim] tensors (batch strides then unused, set them 0); seqlen_q / seqlen_k
// are then the longest sequence.
//
// Masking (top-left aligned, as torch's is_causal): query i sees key j when
//   (!causal || j <= i) && (window_left < 0 || j >= i - window_left) && (window_right < 0 || j <= i + window_right)
// and then the additive bias (if any) is added to scale * q.k. A row that sees no key gets output 0 and
// lse -inf.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/philox_state.h"

namespace fusedkernels::attention {

// Head dims with a kernel: 32, 64, 96, 128, 256 (others run the reference path).
constexpr bool has_head_dim(int d) { return d == 32 || d == 64 || d == 96 || d == 128 || d == 256; }

// Element strides of one [batch, row, head] tensor (head_dim innermost, stride 1).
struct Strides {
  int64_t batch = 0, row = 0, head = 0;
};

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;  // [batch, seqlen_q, heads_q, head_dim] with out_strides
  Strides q_strides, k_strides, v_strides, out_strides;

  // lse[b, h, i] (natural log, fp32) at lse + b * lse_batch_stride + h * lse_head_stride + i (varlen: the
  // packed row index); nullptr to skip.
  float* lse;
  int64_t lse_batch_stride, lse_head_stride;

  // Additive bias in q's dtype, element [b, h, i, j] at bias + b*bias_strides.batch + h*bias_strides.head +
  // i*bias_strides.row + j (stride 0 where broadcast); nullptr for none. Not with varlen.
  const void* bias;
  Strides bias_strides;

  const int* cu_seqlens_q;  // varlen: [batch + 1]; nullptr otherwise
  const int* cu_seqlens_k;

  int batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
  float scale;  // multiplies q.k before the bias
  bool causal;
  int window_left, window_right;  // -1: unbounded

  float dropout_p;      // probability of dropping; 0 for none
  PhiloxState philox;   // the seed and offset of this call
  int64_t* rng_state;   // [2]: the seed and offset used, written by the forward when dropout_p > 0 so the
                        // backward regenerates the same mask

  DType dtype;          // kFloat16 or kBFloat16 (q, k, v, out, bias)

  // set by the Hopper forward's launch_fwd_tiles (sm90/attention_fwd_sm90.cuh, fwd_tile): the grid's order and
  // its first tile
  bool tiles_slowest = false;
  int tile_offset = 0;
};

struct BwdParams {
  // The forward's inputs and results, as in FwdParams (lse required, rng_state read when dropout_p > 0).
  FwdParams fwd;

  const void* dout;  // like out
  Strides dout_strides;
  void* dq;  // like q
  void* dk;  // like k
  void* dv;  // like v
  Strides dq_strides, dk_strides, dv_strides;

  // Gradient of the bias at full size [batch, heads_q, seqlen_q, seqlen_k], fp32, contiguous; nullptr when
  // not wanted (the bindings reduce it over the bias's broadcast dimensions).
  float* dbias;

  // The gradient of the returned lse, laid out as fwd.lse (its strides), or nullptr: it enters dsum (dsum - dlse),
  // since lse's derivative in the scores is the probabilities.
  const float* dlse;

  // Workspace of bwd_workspace_floats() floats (any contents): the per-row sum(dout * out) and, unless
  // deterministic, dq accumulated in fp32.
  float* workspace;
  int64_t total_q;  // rows of q: batch * seqlen_q, or the packed total with varlen
  int64_t total_k;  // rows of k, likewise
  bool deterministic;  // dq without atomics (a separate pass over the keys): bitwise reproducible
  // Set by the launch (attention_launch.cuh, bwd_kv_split): CTAs per (key tile, kv head) of the Hopper dK dV
  // kernel, each taking group / kv_split of the kv head's q heads and adding its dK, dV into an fp32 accumulator.
  int kv_split = 1;
};

// Launch on `stream`; return the launch error (cudaSuccess when all went well). head_dim must satisfy
// has_head_dim and dtype be fp16 or bf16 (checked by the bindings).
cudaError_t attention_fwd(const FwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd(const BwdParams& p, cudaStream_t stream);

// Floats of workspace attention_bwd needs.
int64_t bwd_workspace_floats(const BwdParams& p);

}  // namespace fusedkernels::attention
