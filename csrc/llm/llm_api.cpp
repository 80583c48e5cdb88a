// CUDA kernels of fusedkernels::rotary_fwd / rotary_ (tensors -> RotaryParams, one launch for q and k) and of
// linear_cross_entropy_fwd / _bwd (the chunked loop of llm_ops.cpp with the cross-entropy kernel as its chunk
// step). Where no kernel takes a call (float64, a table dtype the kernels lack), the reference runs instead, with one
// warning per reason. Nothing here syncs or calls cudaMalloc: CUDA-graph capture safe. The public ops, autograd and
// the CPU / meta kernels are in llm_ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <vector>

#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "llm/llm.h"

namespace fusedkernels::llm {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Defined in llm_ops.cpp: the chunked linear + cross-entropy loop the CPU kernels run too, with its chunk step and
// its reductions over every token.
using ChunkStep = void (*)(CrossEntropyParams spec, const Tensor& logits, int64_t start, const Tensor& target,
                           const Tensor& scale, const Tensor& loss, const Tensor& lse);
using LossReduce = Tensor (*)(const Tensor& loss, const Tensor& target, int64_t ignore_index, LossReduction mode);
std::array<Tensor, 5> linear_cross_entropy_chunked(const char* op, const Tensor& hidden, const Tensor& weight,
                                                   const Tensor& target, const OptTensor& bias, int64_t ignore_index,
                                                   int64_t reduction, double label_smoothing, double z_loss,
                                                   double softcap, int64_t chunk_size, std::array<bool, 3> grad_mask,
                                                   const Tensor& grad_loss, const Tensor& lse_in, ChunkStep step,
                                                   LossReduce reduce);
// Defined in llm_ops.cpp: an output of the rotary ops, in its input's memory layout.
Tensor rotary_output_like(const Tensor& t);
// Defined in llm_ops.cpp: the chunk step and the reductions of the CPU kernels in PyTorch ops.
void cross_entropy_chunk_reference(CrossEntropyParams spec, const Tensor& logits, int64_t start, const Tensor& target,
                                   const Tensor& scale, const Tensor& loss, const Tensor& lse);
Tensor loss_reduce_reference(const Tensor& loss, const Tensor& target, int64_t ignore_index, LossReduction mode);

namespace {

// ------------------------------------------------------------------------------------------------
// Rotary
// ------------------------------------------------------------------------------------------------

// The internal ops' contract (the public ops check what a user passes): q / k 4-D CUDA tensors of one kernel dtype
// with a contiguous head dim, one batch, seq and head_dim; cos / sin [1 or batch, rows, rotary_dim] with one layout
// and a contiguous last dim, rotary_dim even in [2, head_dim]; position_ids [1 or batch, seq] int64, else rows ==
// seq.
void check_rotary_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                         const OptTensor& position_ids, bool seq_first) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device().str());
  check_float_dtype(q, op, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype");
  const int seq = seq_first ? 1 : 2;
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(seq) == k.size(seq) &&
                        q.size(3) == k.size(3),
                    op, ": q and k must be 4-D with one batch, seq and head_dim, got ", shape(q), " and ", shape(k));
  TORCH_CHECK_VALUE(q.stride(3) == 1 && k.stride(3) == 1, op, ": q and k need a contiguous head dim");
  TORCH_CHECK_VALUE(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.strides() == sin.strides() &&
                        cos.stride(2) == 1 && (cos.size(0) == 1 || cos.size(0) == q.size(0)),
                    op, ": cos and sin must be [1 or batch, rows, rotary_dim] with one layout, got ", shape(cos),
                    " and ", shape(sin));
  TORCH_CHECK_TYPE(sin.scalar_type() == cos.scalar_type() &&
                       (cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat),
                   op, ": cos and sin must be q's dtype or float32, got ", name_of(cos.scalar_type()));
  const int64_t rotary_dim = cos.size(2);
  TORCH_CHECK_VALUE(rotary_dim % 2 == 0 && rotary_dim >= 2 && rotary_dim <= q.size(3), op,
                    ": rotary_dim (cos's last dim) must be even and in [2, head_dim], got ", num(rotary_dim));
  for (const auto& [name, t] : {std::pair{"k", &k}, std::pair{"cos", &cos}, std::pair{"sin", &sin},
                                std::pair{"position_ids", position_ids ? &*position_ids : nullptr}}) {
    if (t != nullptr) {
      TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " is on ", t->device().str(), " but q is on ",
                        q.device().str());
    }
  }
  if (position_ids) {
    TORCH_CHECK_VALUE(cos.size(0) == 1, op, ": with position_ids, cos and sin are one table [1, positions, rotary_dim]");
    TORCH_CHECK_VALUE(position_ids->scalar_type() == at::kLong && position_ids->dim() == 2 &&
                          (position_ids->size(0) == 1 || position_ids->size(0) == q.size(0)) &&
                          position_ids->size(1) == q.size(seq),
                      op, ": position_ids must be int64 [1 or batch, seq], got ", shape(*position_ids));
  } else {
    TORCH_CHECK_VALUE(cos.size(1) == q.size(seq), op, ": without position_ids, cos and sin need one row per token");
  }
}

// The strides of x as (batch, seq, head), in elements.
std::array<int64_t, 3> token_strides(const Tensor& x, bool seq_first) {
  return seq_first ? std::array<int64_t, 3>{x.stride(0), x.stride(1), x.stride(2)}
                   : std::array<int64_t, 3>{x.stride(0), x.stride(2), x.stride(1)};
}

RotaryTensor rotary_tensor(const Tensor& in, const Tensor& out, bool seq_first) {
  RotaryTensor t;
  t.in = in.data_ptr();
  t.out = out.data_ptr();
  t.heads = static_cast<int>(in.size(seq_first ? 2 : 1));
  const auto si = token_strides(in, seq_first), so = token_strides(out, seq_first);
  t.in_sb = si[0], t.in_sn = si[1], t.in_sh = si[2];
  t.out_sb = so[0], t.out_sn = so[1], t.out_sh = so[2];
  return t;
}

// Whether the kernels take these tables (else the reference runs), and the launch on q -> q_out, k -> k_out.
void launch_rotary(const char* op, const Tensor& q, const Tensor& k, const Tensor& q_out, const Tensor& k_out,
                   const Tensor& cos, const Tensor& sin, const OptTensor& position_ids, bool interleaved,
                   bool seq_first, bool conjugate) {
  RotaryParams p;
  p.q = rotary_tensor(q, q_out, seq_first);
  p.k = rotary_tensor(k, k_out, seq_first);
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.table_sb = cos.size(0) == 1 ? 0 : cos.stride(0);  // one table for every batch
  p.table_sn = cos.stride(1);
  p.table_len = cos.size(1);
  if (position_ids) {
    p.position_ids = position_ids->data_ptr<int64_t>();
    p.pos_sb = position_ids->size(0) == 1 ? 0 : position_ids->stride(0);
    p.pos_sn = position_ids->stride(1);
  }
  p.batch = q.size(0);
  p.seqlen = q.size(seq_first ? 1 : 2);
  p.head_dim = static_cast<int>(q.size(3));
  p.rotary_dim = static_cast<int>(cos.size(2));
  p.dtype = to_dtype(q.scalar_type());
  p.table_dtype = to_dtype(cos.scalar_type());
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  check_launch(rotary(p, c10::cuda::getCurrentCUDAStream()), op);
}

std::tuple<Tensor, Tensor> rotary_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                           const OptTensor& position_ids, bool interleaved, bool seq_first,
                                           bool conjugate) {
  const char* op = "rotary_fwd";
  check_rotary_inputs(op, q, k, cos, sin, position_ids, seq_first);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor q_out = rotary_output_like(q), k_out = rotary_output_like(k);
  launch_rotary(op, q, k, q_out, k_out, cos, sin, position_ids, interleaved, seq_first, conjugate);
  return {q_out, k_out};
}

void rotary_inplace_cuda(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                         const OptTensor& position_ids, bool interleaved, bool seq_first, bool conjugate) {
  const char* op = "rotary_";
  check_rotary_inputs(op, q, k, cos, sin, position_ids, seq_first);
  const c10::cuda::CUDAGuard guard(q.device());
  launch_rotary(op, q, k, q, k, cos, sin, position_ids, interleaved, seq_first, conjugate);
}

// ------------------------------------------------------------------------------------------------
// Linear + cross entropy
// ------------------------------------------------------------------------------------------------

// target, loss and lse are contiguous [T]; scale is grad_loss (contiguous [T]), a 0-d tensor or undefined.
void cross_entropy_chunk_cuda(CrossEntropyParams spec, const Tensor& logits, int64_t start, const Tensor& target,
                              const Tensor& scale, const Tensor& loss, const Tensor& lse) {
  spec.logits = logits.data_ptr();
  spec.target = target.data_ptr<int64_t>() + start;
  if (scale.defined()) {
    const bool per_row = scale.dim() == 1;
    spec.scale = scale.data_ptr<float>() + (per_row ? start : 0);
    spec.scale_stride = per_row ? 1 : 0;
  }
  if (loss.defined()) spec.loss = loss.data_ptr<float>() + start;
  spec.lse = lse.data_ptr<float>() + start;
  spec.rows = logits.size(0);
  spec.dtype = to_dtype(logits.scalar_type());
  check_launch(cross_entropy(spec, c10::cuda::getCurrentCUDAStream()), "linear_cross_entropy");
}

Tensor loss_reduce_cuda(const Tensor& loss, const Tensor& target, int64_t ignore_index, LossReduction mode) {
  Tensor out = at::empty({}, loss.options());
  LossReduceParams p;
  p.loss = loss.data_ptr<float>();
  p.target = target.data_ptr<int64_t>();
  p.out = out.data_ptr<float>();
  p.rows = target.size(0);
  p.ignore_index = ignore_index;
  p.mode = mode;
  check_launch(loss_reduce(p, c10::cuda::getCurrentCUDAStream()), "linear_cross_entropy");
  return out;
}

// rotary_table's CUDA kernel: int64 positions and float32 frequencies (converted where they are not), one launch
// for both tables.
std::tuple<Tensor, Tensor> rotary_table_cuda(const Tensor& position_ids, const Tensor& inv_freq,
                                             double attention_scaling, at::ScalarType dtype) {
  const char* op = "rotary_cos_sin";
  TORCH_CHECK(has_kernel_dtype(dtype) && inv_freq.dim() == 1 && inv_freq.device() == position_ids.device() &&
                  inv_freq.size(0) <= std::numeric_limits<int>::max() / 2,
              op, ": rotary_table takes a float32, float16 or bfloat16 dtype and a 1-D inv_freq on position_ids' "
              "device");
  const c10::cuda::CUDAGuard guard(position_ids.device());
  const Tensor positions = position_ids.to(at::kLong).contiguous(), freq = inv_freq.to(at::kFloat).contiguous();
  std::vector<int64_t> sizes = position_ids.sizes().vec();
  sizes.push_back(2 * inv_freq.size(0));
  const auto options = position_ids.options().dtype(dtype);
  Tensor cos = at::empty(sizes, options), sin = at::empty(sizes, options);
  RotaryTableParams p;
  p.positions = positions.data_ptr<int64_t>();
  p.inv_freq = freq.data_ptr<float>();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.tokens = positions.numel();
  p.half = static_cast<int>(inv_freq.size(0));
  p.scaling = static_cast<float>(attention_scaling);  // as PyTorch's float kernels take a Python scalar
  p.dtype = to_dtype(dtype);
  check_launch(rotary_table(p, c10::cuda::getCurrentCUDAStream()), op);
  return {cos, sin};
}

// The backward's scaling of a saved gradient by the loss's grad (a 0-d tensor): our kernel where it applies (it
// skips the pass when the grad is 1), torch's mul_ elsewhere.
void lce_scale_cuda(const Tensor& grad, const Tensor& scale) {
  if (!grad.is_contiguous() || !has_kernel_dtype(grad.scalar_type()) || scale.scalar_type() != at::kFloat ||
      scale.numel() != 1 || scale.device() != grad.device()) {
    grad.mul_(scale);
    return;
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  ScaleParams p;
  p.data = grad.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.n = grad.numel();
  p.dtype = to_dtype(grad.scalar_type());
  check_launch(scale_inplace(p, c10::cuda::getCurrentCUDAStream()), "linear_cross_entropy");
}

struct Steps {
  ChunkStep step;
  LossReduce reduce;
};

// float64 has no kernels: the chunk step and the reductions in PyTorch ops, with one warning.
Steps steps_for(const Tensor& hidden) {
  TORCH_CHECK_VALUE(hidden.is_cuda(), "linear_cross_entropy: hidden must be a CUDA tensor, got ",
                    hidden.device().str());
  if (has_kernel_dtype(hidden.scalar_type())) return {&cross_entropy_chunk_cuda, &loss_reduce_cuda};
  warn_fallback("linear_cross_entropy", "float64 has no fused kernel",
                "the chunked PyTorch reference (the same GEMMs, the softmax step in PyTorch ops)");
  return {&cross_entropy_chunk_reference, &loss_reduce_reference};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lce_fwd_cuda(const Tensor& hidden, const Tensor& weight,
                                                                 const Tensor& target, const OptTensor& bias,
                                                                 int64_t ignore_index, int64_t reduction,
                                                                 double label_smoothing, double z_loss, double softcap,
                                                                 int64_t chunk_size, std::array<bool, 3> grad_mask) {
  const Steps steps = steps_for(hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto r = linear_cross_entropy_chunked("linear_cross_entropy_fwd", hidden, weight, target, bias, ignore_index,
                                        reduction, label_smoothing, z_loss, softcap, chunk_size, grad_mask, Tensor(),
                                        Tensor(), steps.step, steps.reduce);
  return {r[0], r[1], r[2], r[3], r[4]};
}

std::tuple<Tensor, Tensor, Tensor> lce_bwd_cuda(const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
                                                const Tensor& target, const OptTensor& bias, const Tensor& lse,
                                                int64_t ignore_index, double label_smoothing, double z_loss,
                                                double softcap, int64_t chunk_size, std::array<bool, 3> grad_mask) {
  const char* op = "linear_cross_entropy_bwd";
  const Steps steps = steps_for(hidden);
  const auto stats = opmath_dtype(hidden.scalar_type());
  for (const auto& [name, t] : {std::pair{"grad_loss", &grad_loss}, std::pair{"lse", &lse}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == hidden.size(0) && t->is_contiguous() &&
                          t->scalar_type() == stats && t->device() == hidden.device(),
                      op, ": ", name, " must be a contiguous ", name_of(stats), " [T] tensor on hidden's device, got ",
                      shape(*t));
  }
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto r = linear_cross_entropy_chunked(op, hidden, weight, target, bias, ignore_index, /*reduction=*/0,
                                        label_smoothing, z_loss, softcap, chunk_size, grad_mask, grad_loss, lse, steps.step,
                                        steps.reduce);
  return {r[2], r[3], r[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CUDA, m) {
  m.impl("rotary_fwd", &rotary_fwd_cuda);
  m.impl("rotary_", &rotary_inplace_cuda);
  m.impl("linear_cross_entropy_fwd", &lce_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &lce_bwd_cuda);
  m.impl("linear_cross_entropy_scale_", &lce_scale_cuda);
  m.impl("rotary_table", &rotary_table_cuda);
}

}  // namespace fusedkernels::llm
