// The llm family's op layer: schemas; the public ops apply_rotary / apply_rotary_ and linear_cross_entropy
// (argument checks, the choice between the fused kernels and the reference, autocast); autograd of the internal
// ops in C++; their CPU and meta kernels; and the chunked linear + cross-entropy loop that both the CPU and the
// CUDA kernel run (the GEMMs are PyTorch's; the cross entropy of each chunk is the CUDA kernel of llm_api.cpp, or
// PyTorch ops on the CPU). The CUDA kernels are in llm_api.cpp.
//
//   fusedkernels::apply_rotary        CompositeImplicitAutograd: check, route, call rotary_fwd
//     -> fusedkernels::rotary_fwd     Autograd: attaches RotaryBackward (the same op, conjugate: rotation by -theta)
//   fusedkernels::apply_rotary_       CompositeImplicitAutograd: rotary_ in place (no grad needed), else rotary_fwd
//                                     and a copy into q, k (so autograd records it)
//   fusedkernels::rotary_cos_sin      CompositeImplicitAutograd: check, route, call rotary_table (no gradient: the
//                                     table of integer positions; a differentiable inv_freq takes the reference)
//   fusedkernels::linear_cross_entropy   CompositeImplicitAutograd: check, flatten, call linear_cross_entropy_fwd
//     -> fusedkernels::linear_cross_entropy_fwd   Autograd: mean / sum compute the gradients in the forward and the
//        backward scales them by the loss's grad; none recomputes each chunk in linear_cross_entropy_bwd
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <array>
#include <string_view>

#include "common/torch/autocast.h"
#include "common/torch/autograd.h"
#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "llm/llm.h"

TORCH_LIBRARY_FRAGMENT(fusedkernels, m) {
  // Public ops. q [batch, heads_q, seq, head_dim] (layout "bhnd", Hugging Face's) or [batch, seq, heads_q,
  // head_dim] ("bnhd", flash-attn's); k likewise with heads_k. cos / sin [seq, rotary_dim] or [batch or 1, seq,
  // rotary_dim]; with position_ids ([seq] or [batch or 1, seq], integer): tables [positions, rotary_dim].
  m.def("apply_rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids=None, bool interleaved=False,"
        " str layout=\"bhnd\") -> (Tensor, Tensor)");
  m.def("apply_rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids=None,"
        " bool interleaved=False, str layout=\"bhnd\") -> ()");
  // position_ids [...] (integer), inv_freq [rotary_dim / 2] (floating): Hugging Face's rotary table (llm.h:
  // RotaryTableParams), cos and sin [..., rotary_dim] in dtype (float32 when None).
  m.def("rotary_cos_sin(Tensor position_ids, Tensor inv_freq, float attention_scaling=1.0, ScalarType? dtype=None)"
        " -> (Tensor cos, Tensor sin)");
  // hidden [..., H], weight [V, H] (nn.Linear's), target hidden.shape[:-1] (int64 class indices), bias [V].
  // chunk_size: tokens per chunk, 0 = chosen from the sizes.
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor target, Tensor? bias=None, int ignore_index=-100,"
        " str reduction=\"mean\", float label_smoothing=0.0, float z_loss=0.0, float? softcap=None, int chunk_size=0)"
        " -> Tensor");
  // Internal. q / k as the public op's with the head dim contiguous (seq_first: the bnhd layout); cos / sin [1 or
  // batch, seq or positions, rotary_dim] with one layout; position_ids [1 or batch, seq] int64. Outputs in q's / k's
  // memory layout (as PyTorch's elementwise ops), the head dim contiguous.
  m.def("rotary_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool interleaved,"
        " bool seq_first, bool conjugate) -> (Tensor q_out, Tensor k_out)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids, bool interleaved,"
        " bool seq_first, bool conjugate) -> ()");
  // Internal: rotary_cos_sin's kernel, checked arguments, dtype float32 / float16 / bfloat16; not differentiable.
  m.def("rotary_table(Tensor position_ids, Tensor inv_freq, float attention_scaling, ScalarType dtype)"
        " -> (Tensor cos, Tensor sin)");
  // Internal. hidden [T, H] contiguous, target [T] int64 contiguous; reduction 0 none, 1 mean, 2 sum; softcap 0:
  // none. loss float32 (float64 for float64 inputs): [] (mean, sum) or [T] (none); lse [T]. grad_mask: dhidden,
  // dweight, dbias computed in the forward for a loss grad of 1 (mean / sum only; empty tensors otherwise), in the
  // loss's type: the backward rounds them to the inputs' type once, after scaling by the loss's grad.
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index,"
        " int reduction, float label_smoothing, float z_loss, float softcap, int chunk_size, bool[3] grad_mask)"
        " -> (Tensor loss, Tensor lse, Tensor dhidden, Tensor dweight, Tensor dbias)");
  // Internal: the gradients of reduction none for the per-token loss grad grad_loss [T], from the forward's lse.
  m.def("linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor target, Tensor? bias,"
        " Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap, int chunk_size,"
        " bool[3] grad_mask) -> (Tensor dhidden, Tensor dweight, Tensor dbias)");
  // Internal: grad *= scale in place (scale a 0-d tensor: the loss's grad), for the gradients of mean / sum.
  m.def("linear_cross_entropy_scale_(Tensor(a!) grad, Tensor scale) -> ()");
}

namespace fusedkernels::llm {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ------------------------------------------------------------------------------------------------
// Rotary: the reference (also llm_api.cpp's where no kernel takes a call)
// ------------------------------------------------------------------------------------------------

namespace {

// (x_a, x_b) -> (-x_b, x_a) for each pair: Hugging Face's rotate_half, or GPT-J's interleaved pairs.
Tensor rotate(const Tensor& x, bool interleaved) {
  if (interleaved) {
    const Tensor pairs = x.unflatten(-1, {-1, 2});
    return at::stack({-pairs.select(-1, 1), pairs.select(-1, 0)}, -1).flatten(-2);
  }
  const auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

// The table rows of each token, broadcastable against q / k: [1 or batch, seq, rotary_dim] with the heads axis
// inserted.
Tensor table_rows(const Tensor& table, const OptTensor& position_ids, bool seq_first) {
  Tensor rows = table;
  if (position_ids) {
    const auto ids = position_ids->sym_sizes();
    rows = table.select(0, 0).index_select(0, position_ids->flatten()).view_symint(
        {ids[0], ids[1], table.sym_size(2)});
  }
  return rows.unsqueeze(seq_first ? 2 : 1);
}

Tensor rotary_one(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, bool conjugate) {
  const auto acc = opmath_dtype(x.scalar_type());
  const c10::SymInt rotary_dim = cos.sym_size(-1), head_dim = x.sym_size(-1);
  const Tensor xr = x.narrow_symint(-1, 0, rotary_dim).to(acc), c = cos.to(acc), s = sin.to(acc);
  // conjugate: the transpose of the rotation, x cos - rotate(x sin) (rotate's transpose is -rotate)
  Tensor out = conjugate ? xr * c - rotate(xr * s, interleaved) : xr * c + rotate(xr, interleaved) * s;
  out = out.to(x.scalar_type());
  if (rotary_dim.sym_lt(head_dim).guard_bool(__FILE__, __LINE__)) {
    out = at::cat({out, x.narrow_symint(-1, rotary_dim, head_dim - rotary_dim)}, -1);
  }
  return out;
}

// Hugging Face's rotary table in PyTorch ops: rotary_table's CPU kernel, and rotary_cos_sin's reference where the
// kernel does not take a call (a gradient for inv_freq, float64 tables).
std::tuple<Tensor, Tensor> rotary_cos_sin_reference(const Tensor& position_ids, const Tensor& inv_freq,
                                                    double attention_scaling, at::ScalarType dtype) {
  const Tensor freqs = position_ids.unsqueeze(-1).to(at::kFloat) * inv_freq.to(at::kFloat);
  const Tensor angles = at::cat({freqs, freqs}, -1);
  return {(angles.cos() * attention_scaling).to(dtype), (angles.sin() * attention_scaling).to(dtype)};
}

}  // namespace

// The rotary ops' outputs take their input's memory layout, as PyTorch's elementwise ops lay theirs out: q of a
// [batch, seq, heads, dim] projection viewed heads-first comes back seq-first in memory, like v, so an attention
// kernel gets q, k and v in one layout and copies none. Contiguous where that would leave the head dim strided.
Tensor rotary_output_like(const Tensor& t) {
  Tensor out = at::empty_like(t, at::MemoryFormat::Preserve);
  return out.sym_stride(3) == 1 ? out : at::empty_symint(t.sym_sizes(), t.options());
}

// Positions outside the table raise here: the CPU kernel's check (the values cost nothing to read there; the CUDA
// kernel writes NaN instead of a host sync), and the differentiable reference's on any device (its gather would
// raise ATen's bare index error, or a device-side assert), for plain tensors (a traced one has no values).
namespace {
void check_positions(const OptTensor& position_ids, const Tensor& table) {
  if (!position_ids || position_ids->numel() == 0 || !plain_tensor(*position_ids)) return;
  const int64_t low = position_ids->min().item<int64_t>(), high = position_ids->max().item<int64_t>();
  TORCH_CHECK_INDEX(low >= 0 && high < table.size(1), "apply_rotary: position_ids must be in [0, ",
                    num(table.size(1)), ") (the rows of cos / sin), got values in [", num(low), ", ", num(high), "]");
}
}  // namespace

// Hugging Face's formula, out = x * cos + rotate(x) * sin over the first rotary_dim elements (the rest passed
// through), in fp32 (fp64 for fp64 inputs), differentiable in every tensor (the copy into the output's layout
// too); arguments as rotary_fwd's, outputs in the inputs' layouts as the kernel's.
std::tuple<Tensor, Tensor> rotary_reference(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                            const OptTensor& position_ids, bool interleaved, bool seq_first,
                                            bool conjugate) {
  const Tensor c = table_rows(cos, position_ids, seq_first), s = table_rows(sin, position_ids, seq_first);
  return {rotary_output_like(q).copy_(rotary_one(q, c, s, interleaved, conjugate)),
          rotary_output_like(k).copy_(rotary_one(k, c, s, interleaved, conjugate))};
}

// ------------------------------------------------------------------------------------------------
// Linear + cross entropy: the chunked loop of the CPU and CUDA kernels
// ------------------------------------------------------------------------------------------------

// The cross entropy of one chunk: fills spec's pointers from the tensors and runs it (llm.h: CrossEntropyParams).
// logits [rows, vocab] (rows spec.ld apart) are tokens [start, start + rows) of target, loss and lse ([T]: offsets,
// not views, which cost a host op each), and of scale when it is [T] (0-d: every row's; undefined: 1). loss is
// undefined in the backward.
using ChunkStep = void (*)(CrossEntropyParams spec, const Tensor& logits, int64_t start, const Tensor& target,
                           const Tensor& scale, const Tensor& loss, const Tensor& lse);
// The reductions over every token (llm.h: LossReduceParams): a 0-d tensor of loss's dtype and device (kGradScale
// reads target only).
using LossReduce = Tensor (*)(const Tensor& loss, const Tensor& target, int64_t ignore_index, LossReduction mode);

namespace {

constexpr int64_t kNone = 0, kMean = 1, kSum = 2;
// Rows of the logits buffer are a multiple of this many elements apart (16-byte rows for every dtype), whatever
// the vocabulary size: the kernel's 16-byte accesses stay aligned for odd vocabularies (32003).
constexpr int64_t kRowAlign = 8;

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Tokens per chunk: a logits chunk about the size of the hidden states (T x H elements, as Liger-Kernel's
// default), but at least 768 rows: every chunk re-reads, re-writes and rounds the dweight sum, and GEMMs of fewer
// rows lose speed (the models suite's Llama step, 8192 x 2048 x 32000: 640-row chunks 0.8 ms slower than 1024).
int64_t auto_chunk(int64_t tokens, int64_t hidden, int64_t vocab) {
  const int64_t rows = round_up((tokens * hidden + vocab - 1) / vocab, 128);
  return std::max<int64_t>(1, std::min(tokens, std::max<int64_t>(rows, 768)));
}

// The internal ops' contract (the public op checks what a user passes): hidden [T, H] contiguous; weight [V, H]
// and bias [V] of hidden's dtype and device; target [T] int64 contiguous.
void check_lce_inputs(const char* op, const Tensor& hidden, const Tensor& weight, const Tensor& target,
                      const OptTensor& bias, int64_t reduction, int64_t chunk_size) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), op,
                    ": hidden must be [T, H] and weight [V, H], got ", shape(hidden), " and ", shape(weight));
  TORCH_CHECK_VALUE(hidden.is_contiguous(), op, ": hidden must be contiguous");
  TORCH_CHECK_TYPE(at::isFloatingType(hidden.scalar_type()), op, ": hidden must be floating-point, got ",
                   name_of(hidden.scalar_type()));
  check_operands_like_x(op, hidden, weight, bias, std::nullopt, false, /*internal=*/true);
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)), op, ": bias must be [V], got ",
                    shape(*bias));
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == hidden.size(0) && target.is_contiguous() &&
                        target.device() == hidden.device(),
                    op, ": target must be a contiguous [T] tensor on hidden's device, got ", shape(target));
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   name_of(target.scalar_type()));
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum)");
  TORCH_CHECK_VALUE(chunk_size >= 0, op, ": chunk_size must be >= 0, got ", num(chunk_size));
}

// The type of the dweight sum and of the forward's dhidden: the inputs' for bfloat16 (float32's exponent range; the
// sum is rounded once per chunk, as Liger-Kernel's, where a float32 one would keep V x H x 4 bytes until the
// backward) and float32, float64; float32 for float16, whose range neither a sum over every token nor a mean's
// gradients before the loss scale (1/T each: GradScaler multiplies them afterwards) fit (docs/llm.md).
at::ScalarType grad_sum_type(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

// dh = dz W in dh's type. 16-bit CUDA GEMMs write float32 directly; elsewhere the operands are converted (the CPU
// and float64 paths are references).
void weight_product(Tensor& dh, const Tensor& dz, const Tensor& weight) {
  if (dz.scalar_type() == dh.scalar_type()) {
    at::mm_out(dh, dz, weight);
  } else if (dz.is_cuda()) {
    at::mm_out(dh, dz, weight, dh.scalar_type());
  } else {
    at::mm_out(dh, dz.to(dh.scalar_type()), weight.to(dh.scalar_type()));
  }
}

// dweight_sum (+)= dz^T h in the sum's type (grad_sum_type): the GEMM adds the chunk's fp32 product to the sum and
// rounds it. beta 0 on the first chunk: the sum's memory is not read, so it needs no zeroing.
void accumulate_weight_grad(Tensor& sum, const Tensor& dz, const Tensor& h, bool first) {
  const double beta = first ? 0.0 : 1.0;
  if (dz.scalar_type() == sum.scalar_type()) {
    at::addmm_out(sum, sum, dz.t(), h, beta);
  } else if (dz.is_cuda()) {
    at::addmm_out(sum, sum, dz.t(), h, sum.scalar_type(), beta);
  } else {
    sum.addmm_(dz.t().to(sum.scalar_type()), h.to(sum.scalar_type()), beta);
  }
}

// dbias_sum (+)= the column sums of dz, in its type; the first chunk writes it (no zeroing).
void accumulate_bias_grad(Tensor& sum, const Tensor& dz, bool first) {
  if (first) {
    at::sum_out(sum, dz, at::IntArrayRef{0}, /*keepdim=*/false, sum.scalar_type());
  } else {
    sum.add_(dz.sum(at::IntArrayRef{0}, /*keepdim=*/false, sum.scalar_type()));
  }
}

}  // namespace

// The chunked loop of linear_cross_entropy_fwd (grad_loss undefined) and linear_cross_entropy_bwd (grad_loss [T]
// float, lse_in the forward's): per chunk of tokens, logits = h W^T + b into one reused buffer (a PyTorch GEMM),
// `step` turns it into the loss and, when gradients are wanted, the gradient over the logits in place, then
// dhidden = dz W (PyTorch GEMM into its rows), dweight_sum += dz^T h (in grad_sum_type), dbias_sum += sum_rows dz
// (float32); `reduce` gives the mean's gradient scale before the chunks and the loss after them. Returns {loss, lse,
// dhidden, dweight, dbias} (empty where not computed; the backward's loss and lse undefined): the forward's dhidden
// and dweight in grad_sum_type, its dbias in the arithmetic's type (the backward scales, then rounds them); the
// backward's in the inputs' type. float16's mean scales the float32 sums after the chunks, not dz (whose 1/T
// entries would fall below its range). On small inputs the host's ops are the whole cost: each view, allocation
// and launch counts.
std::array<Tensor, 5> linear_cross_entropy_chunked(const char* op, const Tensor& hidden, const Tensor& weight,
                                                   const Tensor& target, const OptTensor& bias, int64_t ignore_index,
                                                   int64_t reduction, double label_smoothing, double z_loss,
                                                   double softcap, int64_t chunk_size, std::array<bool, 3> grad_mask,
                                                   const Tensor& grad_loss, const Tensor& lse_in, ChunkStep step,
                                                   LossReduce reduce) {
  check_lce_inputs(op, hidden, weight, target, bias, reduction, chunk_size);
  const bool backward = grad_loss.defined();
  TORCH_CHECK_VALUE(backward || reduction != kNone || !(grad_mask[0] || grad_mask[1] || grad_mask[2]), op,
                    ": reduction none computes its gradients in linear_cross_entropy_bwd (grad_mask must be all false)");
  const int64_t tokens = hidden.size(0), vocab = weight.size(0);
  const auto acc = opmath_dtype(hidden.scalar_type());
  const auto stats = hidden.options().dtype(acc);
  const bool want_dh = grad_mask[0], want_dw = grad_mask[1], want_db = grad_mask[2] && bias.has_value();
  const bool any_grad = want_dh || want_dw || want_db;

  const Tensor loss_rows = backward ? Tensor() : at::empty({tokens}, stats);
  const Tensor lse = backward ? lse_in : at::empty({tokens}, stats);
  // The scale of each row's gradient: the loss's grad per token (bwd), 1 / (tokens not ignored) for mean (computed
  // on the device: no host sync, so the op captures in CUDA graphs), 1 (undefined) for sum.
  Tensor scale;
  if (backward) {
    scale = grad_loss;
  } else if (any_grad && reduction == kMean) {
    scale = reduce(loss_rows, target, ignore_index, LossReduction::kGradScale);
  }
  const auto sum_type = grad_sum_type(hidden.scalar_type());
  const bool scale_after = !backward && scale.defined() && sum_type != hidden.scalar_type();
  Tensor dhidden = at::empty(want_dh ? hidden.sizes() : at::IntArrayRef{0},
                             hidden.options().dtype(backward ? hidden.scalar_type() : sum_type));
  Tensor dweight_sum = want_dw ? at::empty(weight.sizes(), weight.options().dtype(sum_type)) : Tensor();
  Tensor dbias_sum = want_db ? at::empty({vocab}, stats) : Tensor();

  CrossEntropyParams spec;
  spec.vocab = vocab;
  // CUDA: 16-byte rows for the kernel. CPU: contiguous rows, as PyTorch's CPU bf16 matmul reads the gap between a
  // view's rows (uninitialised there: NaN rows in dhidden of reduction none).
  spec.ld = hidden.is_cuda() ? round_up(vocab, kRowAlign) : vocab;
  spec.ignore_index = ignore_index;
  spec.label_smoothing = static_cast<float>(label_smoothing);
  spec.z_loss = static_cast<float>(z_loss);
  spec.softcap = static_cast<float>(softcap);
  spec.mode = backward ? CrossEntropyMode::kGrad : any_grad ? CrossEntropyMode::kLossAndGrad : CrossEntropyMode::kLoss;

  const int64_t chunk = chunk_size > 0 ? std::min(chunk_size, std::max<int64_t>(tokens, 1))
                                       : auto_chunk(tokens, weight.size(1), vocab);
  // rows spec.ld elements apart; a shorter last chunk takes the leading rows
  const Tensor buffer = tokens > 0 ? at::empty_strided({chunk, vocab}, {spec.ld, 1}, hidden.options()) : Tensor();
  const Tensor weight_t = weight.t();
  for (int64_t start = 0; start < tokens; start += chunk) {
    const int64_t rows = std::min(chunk, tokens - start);
    // a chunk of all the tokens uses the tensors themselves (no views)
    const Tensor h = rows == tokens ? hidden : hidden.narrow(0, start, rows);
    Tensor logits = rows == chunk ? buffer : buffer.narrow(0, 0, rows);
    if (bias) {
      at::addmm_out(logits, *bias, h, weight_t);
    } else {
      at::mm_out(logits, h, weight_t);
    }
    step(spec, logits, start, target, scale_after ? Tensor() : scale, loss_rows, lse);
    if (want_dh) {
      Tensor dh_rows = rows == tokens ? dhidden : dhidden.narrow(0, start, rows);
      weight_product(dh_rows, logits, weight);
    }
    if (want_dw) accumulate_weight_grad(dweight_sum, logits, h, start == 0);
    if (want_db) accumulate_bias_grad(dbias_sum, logits, start == 0);
  }
  if (tokens == 0) {
    if (want_dw) dweight_sum.zero_();
    if (want_db) dbias_sum.zero_();
  }
  if (scale_after) {
    for (Tensor* g : {&dhidden, &dweight_sum, &dbias_sum}) {
      if (g->defined() && g->numel() > 0) g->mul_(scale);
    }
  }

  const auto none = [&] { return at::empty({0}, hidden.options()); };  // (distinct tensors: outputs never alias)
  if (backward) {
    return {Tensor(), Tensor(), dhidden, want_dw ? dweight_sum.to(weight.scalar_type()) : none(),
            want_db ? dbias_sum.to(bias->scalar_type()) : none()};
  }
  const Tensor loss = reduction == kNone ? loss_rows
                                         : reduce(loss_rows, target, ignore_index,
                                                  reduction == kMean ? LossReduction::kMean : LossReduction::kSum);
  return {loss, lse, dhidden, want_dw ? dweight_sum : none(), want_db ? dbias_sum : none()};
}

// ------------------------------------------------------------------------------------------------
// The chunk step of the CPU kernels (and of CUDA float64): the kernel's formulas (llm.h) in PyTorch ops; a bad
// target raises on the CPU (as F.cross_entropy), gives a NaN row elsewhere (as the kernel)
// ------------------------------------------------------------------------------------------------

// Each token's loss from its (soft-capped) logits c [T, V] and logsumexp lse [T]: label-smoothed cross entropy
// (torch's: (1 - e) * nll + e * the mean over classes of -log p) plus z_loss * lse^2. target [T, 1], in range.
static Tensor token_losses(const Tensor& c, const Tensor& lse, const Tensor& target, double label_smoothing,
                           double z_loss) {
  const double e = label_smoothing;
  return lse - (1 - e) * c.gather(1, target).squeeze(1) - e / c.size(1) * c.sum(1) + z_loss * lse.square();
}

void cross_entropy_chunk_reference(CrossEntropyParams spec, const Tensor& logits, int64_t start,
                                   const Tensor& all_targets, const Tensor& scale, const Tensor& all_losses,
                                   const Tensor& all_lse) {
  const int64_t vocab = spec.vocab;
  const auto chunk = [&](const Tensor& t) { return t.narrow(0, start, logits.size(0)); };
  const Tensor target = chunk(all_targets), lse = chunk(all_lse);
  const Tensor z = logits.to(opmath_dtype(logits.scalar_type()));
  const Tensor valid = target != spec.ignore_index;
  const Tensor bad = valid & ((target < 0) | (target >= vocab));
  if (logits.is_cpu() && bad.any().item<bool>()) {
    const int64_t row = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_INDEX(false, "linear_cross_entropy: target ", num(target[row].item<int64_t>()), " at position ",
                      num(start + row), " is out of bounds for ", num(vocab), " classes (and is not ignore_index)");
  }
  const Tensor c = spec.softcap > 0 ? spec.softcap * at::tanh(z / spec.softcap) : z;
  const Tensor row_lse = spec.mode == CrossEntropyMode::kGrad ? lse.to(c.scalar_type()) : at::logsumexp(c, {1});
  const Tensor safe_target = at::where(valid & ~bad, target, 0).unsqueeze(1);
  const Tensor nan = at::full({}, NAN, c.options());
  const auto finish = [&](const Tensor& v) { return at::where(bad, nan, at::where(valid, v, 0)); };
  const double e = spec.label_smoothing;
  if (spec.mode != CrossEntropyMode::kGrad) {
    chunk(all_losses).copy_(finish(token_losses(c, row_lse, safe_target, e, spec.z_loss)));
    lse.copy_(finish(row_lse));
    if (spec.mode == CrossEntropyMode::kLoss) return;
  }
  Tensor g = at::exp(c - row_lse.unsqueeze(1)) * (1 + 2 * spec.z_loss * row_lse).unsqueeze(1) - e / vocab;
  g.scatter_add_(1, safe_target, at::full({target.size(0), 1}, -(1 - e), g.options()));
  if (spec.softcap > 0) g = g * (1 - (c / spec.softcap).square());
  if (scale.defined()) g = g * (scale.dim() == 0 ? scale : chunk(scale).unsqueeze(1)).to(g.scalar_type());
  logits.copy_(at::where(bad.unsqueeze(1), nan, at::where(valid.unsqueeze(1), g, 0)));
}

// The reductions of the CPU kernels (and of CUDA float64) in PyTorch ops.
Tensor loss_reduce_reference(const Tensor& loss, const Tensor& target, int64_t ignore_index, LossReduction mode) {
  if (mode == LossReduction::kSum) return loss.sum();
  const Tensor valid = (target != ignore_index).sum().to(loss.scalar_type());
  if (mode == LossReduction::kMean) return loss.sum() / valid;
  return at::where(valid > 0, valid.reciprocal(), at::zeros_like(valid));  // no token counts: zero gradients
}

namespace {

using torch::autograd::variable_list;

// ------------------------------------------------------------------------------------------------
// Public ops: checks and routing
// ------------------------------------------------------------------------------------------------

using RotaryFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const OptTensor&, bool, bool, bool);
using RotaryInplace = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool, bool,
                           bool);
using LceFwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const OptTensor&, int64_t, int64_t, double, double,
                                                                  double, int64_t, std::array<bool, 3>);
using LceScale = void(const Tensor&, const Tensor&);
using LceBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const OptTensor&, const Tensor&, int64_t, double, double, double,
                                                  int64_t, std::array<bool, 3>);

const c10::TypedOperatorHandle<RotaryFwd>& rotary_fwd_op() {
  static const auto op = find_op<RotaryFwd>("fusedkernels::rotary_fwd");
  return op;
}
const c10::TypedOperatorHandle<RotaryInplace>& rotary_inplace_op() {
  static const auto op = find_op<RotaryInplace>("fusedkernels::rotary_");
  return op;
}
using RotaryTable = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, at::ScalarType);
const c10::TypedOperatorHandle<RotaryTable>& rotary_table_op() {
  static const auto op = find_op<RotaryTable>("fusedkernels::rotary_table");
  return op;
}
const c10::TypedOperatorHandle<LceFwd>& lce_fwd_op() {
  static const auto op = find_op<LceFwd>("fusedkernels::linear_cross_entropy_fwd");
  return op;
}
const c10::TypedOperatorHandle<LceScale>& lce_scale_op() {
  static const auto op = find_op<LceScale>("fusedkernels::linear_cross_entropy_scale_");
  return op;
}
const c10::TypedOperatorHandle<LceBwd>& lce_bwd_op() {
  static const auto op = find_op<LceBwd>("fusedkernels::linear_cross_entropy_bwd");
  return op;
}

void check_dense(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_NOT_IMPLEMENTED(t == nullptr || (t->layout() == at::kStrided && !t->is_nested()), op,
                                " takes strided (dense) tensors; ", name, " is ",
                                t != nullptr && t->is_nested() ? std::string("nested") : c10::str(t ? t->layout() : at::kStrided));
  }
}

void check_same_device(const char* op, const char* name, const Tensor& t, const char* other, const Tensor& o) {
  TORCH_CHECK(t.device() == o.device(), op, ": ", name, " is on ", t.device().str(), " but ", other, " is on ",
              o.device().str());
}

// The public rotary ops' arguments, as a user passes them: returns whether the layout is seq-first ("bnhd").
// Sizes compare symbolically (torch.compile with dynamic shapes). RuntimeError for shapes and dtypes (as the
// broadcasting errors of HF's formula), ValueError for an unknown layout.
bool check_rotary_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                       const OptTensor& position_ids, c10::string_view layout) {
  TORCH_CHECK_VALUE(layout == "bhnd" || layout == "bnhd", op, ": layout must be one of bhnd, bnhd, got '",
                    std::string(layout), "'");
  const bool seq_first = layout == "bnhd";
  check_dense(op, {{"q", &q}, {"k", &k}, {"cos", &cos}, {"sin", &sin},
                   {"position_ids", position_ids ? &*position_ids : nullptr}});
  const char* dims = seq_first ? "[batch, seq, heads, head_dim]" : "[batch, heads, seq, head_dim]";
  TORCH_CHECK(q.dim() == 4, op, ": q must be ", dims, " (layout ", std::string(layout), "), got ", shape(q));
  TORCH_CHECK(k.dim() == 4, op, ": k must be ", dims, " (layout ", std::string(layout), "), got ", shape(k));
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be a floating-point tensor, got ",
              name_of(q.scalar_type()));
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype (", name_of(q.scalar_type()),
              "), got ", name_of(k.scalar_type()));
  const int seq_axis = seq_first ? 1 : 2;
  TORCH_CHECK(sym_same(q.sym_size(0), k.sym_size(0)) && sym_same(q.sym_size(seq_axis), k.sym_size(seq_axis)) &&
                  sym_same(q.sym_size(3), k.sym_size(3)),
              op, ": q and k must share batch, seq and head_dim, got ", shape(q), " and ", shape(k));
  TORCH_CHECK(cos.sym_sizes() == sin.sym_sizes(), op, ": cos and sin must have one shape, got ", shape(cos), " and ",
              shape(sin));
  TORCH_CHECK(at::isFloatingType(cos.scalar_type()) && sin.scalar_type() == cos.scalar_type(), op,
              ": cos and sin must be floating-point tensors of one dtype, got ", name_of(cos.scalar_type()), " and ",
              name_of(sin.scalar_type()));
  for (const auto& [name, t] : {std::pair{"k", &k}, std::pair{"cos", &cos}, std::pair{"sin", &sin}}) {
    check_same_device(op, name, *t, "q", q);
  }
  TORCH_CHECK(cos.dim() >= 1, op, ": cos must be [seq, rotary_dim] or [batch, seq, rotary_dim], got a 0-D tensor");
  const c10::SymInt rotary_dim = cos.sym_size(-1);
  TORCH_CHECK((rotary_dim % 2).sym_eq(0).guard_bool(__FILE__, __LINE__) &&
                  rotary_dim.sym_ge(2).guard_bool(__FILE__, __LINE__) &&
                  rotary_dim.sym_le(q.sym_size(3)).guard_bool(__FILE__, __LINE__),
              op, ": cos / sin's last dimension (rotary_dim, one value per rotated element) must be even and in [2, ",
              "head_dim] for q ", shape(q), ", got ", shape(cos));
  if (!position_ids) {
    const bool ok = (cos.dim() == 2 || (cos.dim() == 3 && (sym_same(cos.sym_size(0), 1) ||
                                                           sym_same(cos.sym_size(0), q.sym_size(0))))) &&
                    sym_same(cos.sym_size(-2), q.sym_size(seq_axis));
    TORCH_CHECK(ok, op, ": cos / sin must be [seq, rotary_dim] or [batch or 1, seq, rotary_dim] for q ", shape(q),
                " (layout ", std::string(layout), "), got ", shape(cos));
    return seq_first;
  }
  TORCH_CHECK(cos.dim() == 2, op, ": with position_ids, cos / sin are tables [positions, rotary_dim], got ",
              shape(cos));
  const Tensor& ids = *position_ids;
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": position_ids must be int64 or int32, got ", name_of(ids.scalar_type()));
  check_same_device(op, "position_ids", ids, "q", q);
  const bool ok = (ids.dim() == 1 || (ids.dim() == 2 && (sym_same(ids.sym_size(0), 1) ||
                                                         sym_same(ids.sym_size(0), q.sym_size(0))))) &&
                  sym_same(ids.sym_size(-1), q.sym_size(seq_axis));
  TORCH_CHECK(ok, op, ": position_ids must be [seq] or [batch or 1, seq] for q ", shape(q), ", got ", shape(ids));
  return seq_first;
}

// The rotary ops' arguments in the internal ops' form: cos / sin [1 or batch, rows, rotary_dim] with a contiguous
// last dimension and one layout, position_ids [1 or batch, seq] int64.
struct RotaryTables {
  Tensor cos, sin;
  OptTensor position_ids;
};

RotaryTables rotary_tables(const Tensor& cos, const Tensor& sin, const OptTensor& position_ids) {
  RotaryTables t{cos.dim() == 2 ? cos.unsqueeze(0) : cos, sin.dim() == 2 ? sin.unsqueeze(0) : sin, std::nullopt};
  if (t.cos.sym_stride(-1) != 1 || t.sin.sym_strides() != t.cos.sym_strides()) {
    t.cos = t.cos.contiguous();
    t.sin = t.sin.contiguous();
  }
  if (position_ids) {
    const Tensor ids = position_ids->dim() == 1 ? position_ids->unsqueeze(0) : *position_ids;
    t.position_ids = ids.to(at::kLong);
  }
  return t;
}

// Why a call runs the reference instead of the kernel, or nullptr; "" for a silent reason. CPU tensors take the
// op (whose CPU kernel is the reference); forward-mode AD, other devices and gradients for cos / sin (learned
// tables) take the differentiable reference.
const char* rotary_fallback_reason(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  if (has_forward_grad(q) || has_forward_grad(k) || has_forward_grad(cos) || has_forward_grad(sin)) return "";
  if (at::GradMode::is_enabled() && (requires_grad(cos) || requires_grad(sin))) {
    return q.is_cuda() ? "gradients for cos / sin have no fused kernel" : "";
  }
  if (q.is_cpu()) return nullptr;
  if (!q.is_cuda()) return "";
  if (!has_kernel_dtype(q.scalar_type())) return "float64 q / k have no fused kernel";
  if (cos.scalar_type() != q.scalar_type() && cos.scalar_type() != at::kFloat) {
    return "cos / sin of a dtype other than q's or float32 have no fused kernel";
  }
  return nullptr;
}

constexpr const char* kRotaryReference = "the PyTorch reference (x * cos + rotate(x) * sin)";

Tensor unit_stride_heads(const Tensor& t) { return t.sym_stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<Tensor, Tensor> apply_rotary_composite(const Tensor& q, const Tensor& k, const Tensor& cos,
                                                  const Tensor& sin, const OptTensor& position_ids, bool interleaved,
                                                  c10::string_view layout) {
  const char* op = "apply_rotary";
  const bool seq_first = check_rotary_args(op, q, k, cos, sin, position_ids, layout);
  const RotaryTables t = rotary_tables(cos, sin, position_ids);
  if (const char* why = rotary_fallback_reason(q, k, cos, sin)) {
    warn_fallback(op, why, kRotaryReference);
    check_positions(t.position_ids, t.cos);
    return rotary_reference(q, k, t.cos, t.sin, t.position_ids, interleaved, seq_first, false);
  }
  return rotary_fwd_op().call(unit_stride_heads(q), unit_stride_heads(k), t.cos, t.sin, t.position_ids, interleaved,
                              seq_first, false);
}

// In place: the kernel writes q and k where no gradient is recorded; otherwise the out-of-place op and a copy_
// into q and k, which autograd records (a leaf that requires grad refuses it, as for any in-place op).
void apply_rotary_inplace_composite(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                    const OptTensor& position_ids, bool interleaved, c10::string_view layout) {
  const char* op = "apply_rotary_";
  const bool seq_first = check_rotary_args(op, q, k, cos, sin, position_ids, layout);
  const bool grad = at::GradMode::is_enabled() && (requires_grad(q) || requires_grad(k));
  if (!grad && !rotary_fallback_reason(q, k, cos, sin) && q.sym_stride(-1) == 1 && k.sym_stride(-1) == 1) {
    const RotaryTables t = rotary_tables(cos, sin, position_ids);
    rotary_inplace_op().call(q, k, t.cos, t.sin, t.position_ids, interleaved, seq_first, false);
    return;
  }
  // a learned table's gradient reads q and k, which the copies below overwrite: the reference saves copies of them
  const bool table_grad = at::GradMode::is_enabled() && (requires_grad(cos) || requires_grad(sin));
  auto [q_out, k_out] = apply_rotary_composite(table_grad ? q.clone() : q, table_grad ? k.clone() : k, cos, sin,
                                               position_ids, interleaved, layout);
  q.copy_(q_out);
  k.copy_(k_out);
}

// rotary_cos_sin's arguments as a user passes them; the tables' dtype.
at::ScalarType check_rotary_cos_sin_args(const char* op, const Tensor& position_ids, const Tensor& inv_freq,
                                         std::optional<at::ScalarType> dtype) {
  check_dense(op, {{"position_ids", &position_ids}, {"inv_freq", &inv_freq}});
  TORCH_CHECK(at::isIntegralType(position_ids.scalar_type(), /*includeBool=*/false), op,
              ": position_ids must be an integer tensor, got ", name_of(position_ids.scalar_type()));
  TORCH_CHECK(inv_freq.dim() == 1 && at::isFloatingType(inv_freq.scalar_type()), op,
              ": inv_freq must be a 1-D floating-point tensor [rotary_dim / 2], got ", name_of(inv_freq.scalar_type()),
              " ", shape(inv_freq));
  check_same_device(op, "inv_freq", inv_freq, "position_ids", position_ids);
  const at::ScalarType out = dtype.value_or(at::kFloat);
  TORCH_CHECK(at::isFloatingType(out), op, ": dtype must be a floating-point dtype, got ", name_of(out));
  return out;
}

constexpr const char* kRotaryTableReference = "the PyTorch reference (Hugging Face's formula)";

std::tuple<Tensor, Tensor> rotary_cos_sin_composite(const Tensor& position_ids, const Tensor& inv_freq,
                                                    double attention_scaling, std::optional<at::ScalarType> dtype) {
  const char* op = "rotary_cos_sin";
  const at::ScalarType out = check_rotary_cos_sin_args(op, position_ids, inv_freq, dtype);
  const bool differentiable = has_forward_grad(inv_freq) || (at::GradMode::is_enabled() && requires_grad(inv_freq));
  if (!differentiable && position_ids.is_cpu()) return rotary_table_op().call(position_ids, inv_freq, attention_scaling, out);
  if (!differentiable && position_ids.is_cuda()) {
    if (has_kernel_dtype(out)) return rotary_table_op().call(position_ids, inv_freq, attention_scaling, out);
    // float64 (or float8) tables: HF computes them in float32 and casts, as this does
    const auto [cos, sin] = rotary_table_op().call(position_ids, inv_freq, attention_scaling, at::kFloat);
    return {cos.to(out), sin.to(out)};
  }
  if (position_ids.is_cuda()) warn_fallback(op, "a gradient for inv_freq has no fused kernel", kRotaryTableReference);
  return rotary_cos_sin_reference(position_ids, inv_freq, attention_scaling, out);
}

std::tuple<Tensor, Tensor> rotary_table_meta(const Tensor& position_ids, const Tensor& inv_freq, double,
                                             at::ScalarType dtype) {
  std::vector<c10::SymInt> sizes = position_ids.sym_sizes().vec();
  sizes.push_back(inv_freq.sym_size(0) * 2);
  const auto options = position_ids.options().dtype(dtype);
  return {at::empty_symint(sizes, options), at::empty_symint(sizes, options)};
}

constexpr std::array<std::pair<std::string_view, int64_t>, 3> kReductions = {
    {{"none", kNone}, {"mean", kMean}, {"sum", kSum}}};

int64_t parse_reduction(const char* op, c10::string_view name) {
  for (const auto& [known, value] : kReductions) {
    if (known == name) return value;
  }
  TORCH_CHECK_VALUE(false, op, ": reduction must be one of none, mean, sum, got '", std::string(name), "'");
}

// The public op's arguments, as a user passes them (RuntimeError where F.linear / F.cross_entropy raise one,
// ValueError for option values). Sizes compare symbolically.
void check_lce_args(const char* op, const Tensor& hidden, const Tensor& weight, const Tensor& target,
                    const OptTensor& bias, double label_smoothing, double z_loss, std::optional<double> softcap,
                    int64_t chunk_size) {
  check_dense(op, {{"hidden", &hidden}, {"weight", &weight}, {"target", &target}, {"bias", bias ? &*bias : nullptr}});
  TORCH_CHECK(hidden.dim() >= 1, op, ": hidden must be [..., H] (at least 1-D), got a 0-D tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [V, H] (2-D, nn.Linear's), got ", shape(weight));
  TORCH_CHECK(sym_same(hidden.sym_size(-1), weight.sym_size(1)), op, ": hidden and weight shapes cannot be ",
              "multiplied (hidden ", shape(hidden), ", weight ", shape(weight), "): hidden's last dimension must be ",
              "weight's H");
  TORCH_CHECK(weight.sym_size(0).sym_ge(1).guard_bool(__FILE__, __LINE__), op,
              ": weight must have at least one class (row), got ", shape(weight));
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), op, ": hidden must be a floating-point tensor, got ",
              name_of(hidden.scalar_type()));
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", bias ? &*bias : nullptr}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->scalar_type() == hidden.scalar_type(), op, ": ", name, " must have hidden's dtype (",
                name_of(hidden.scalar_type()), "), got ", name_of(t->scalar_type()));
    check_same_device(op, name, *t, "hidden", hidden);
  }
  TORCH_CHECK(!bias || (bias->dim() == 1 && sym_same(bias->sym_size(0), weight.sym_size(0))), op,
              ": bias must be [V] = ", shape(weight.sym_sizes().slice(0, 1)), ", got ", shape(*bias));
  check_same_device(op, "target", target, "hidden", hidden);
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              name_of(target.scalar_type()));
  bool same = target.dim() == hidden.dim() - 1;
  for (int64_t d = 0; same && d < target.dim(); ++d) same = sym_same(target.sym_size(d), hidden.sym_size(d));
  TORCH_CHECK(same, op, ": target must have hidden's leading shape ", shape(hidden.sym_sizes().slice(0, hidden.dim() - 1)),
              ", got ", shape(target));
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be between 0.0 and 1.0, got ", py_repr(label_smoothing));
  TORCH_CHECK_VALUE(z_loss >= 0.0 && std::isfinite(z_loss), op, ": z_loss must be finite and >= 0, got ",
                    py_repr(z_loss));
  TORCH_CHECK_VALUE(!softcap || (*softcap > 0.0 && std::isfinite(*softcap)), op,
                    ": softcap must be None or finite and > 0, got ", py_repr(softcap.value_or(0.0)));
  TORCH_CHECK_VALUE(chunk_size >= 0, op, ": chunk_size must be >= 0 (0: chosen from the sizes), got ",
                    num(chunk_size));
}

// F.cross_entropy(softcap(F.linear(h, W, b)), target, ...) + z_loss * logsumexp^2 per token not ignored, in
// differentiable ATen ops over the whole [tokens, vocab] logits: what runs under torch.func transforms (grad, vjp,
// vmap), which differentiate through ATen's formulas; the fused op's backward scales gradients saved by its
// forward, which they cannot see through.
Tensor lce_differentiable_reference(const Tensor& h, const Tensor& weight, const Tensor& target, const OptTensor& bias,
                                    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
                                    double softcap) {
  const auto acc = opmath_dtype(h.scalar_type());
  Tensor z = at::linear(h, weight, bias).to(acc);
  if (softcap > 0) z = softcap * at::tanh(z / softcap);
  const Tensor valid = target != ignore_index;
  const Tensor row = at::where(
      valid, token_losses(z, at::logsumexp(z, {1}), at::where(valid, target, 0).unsqueeze(1), label_smoothing, z_loss),
      0);
  return reduction == kNone ? row : reduction == kSum ? row.sum() : row.sum() / valid.sum().to(acc);
}

Tensor linear_cross_entropy_composite(const Tensor& hidden, const Tensor& weight, const Tensor& target,
                                      const OptTensor& bias, int64_t ignore_index, c10::string_view reduction,
                                      double label_smoothing, double z_loss, std::optional<double> softcap,
                                      int64_t chunk_size) {
  const char* op = "linear_cross_entropy";
  const int64_t red = parse_reduction(op, reduction);
  check_lce_args(op, hidden, weight, target, bias, label_smoothing, z_loss, softcap, chunk_size);
  TORCH_CHECK_NOT_IMPLEMENTED(!has_forward_grad(hidden) && !has_forward_grad(weight) && !has_forward_grad(bias), op,
                              ": forward-mode AD (an input with a tangent) is not supported");
  // no reshape where the shapes fit already: each view is a host op, and an autograd node under grad
  const Tensor h = (hidden.dim() == 2 ? hidden : hidden.reshape_symint({-1, hidden.sym_size(-1)})).contiguous();
  const Tensor t = (target.dim() == 1 ? target : target.reshape({-1})).contiguous();
  const Tensor loss =
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)
          ? lce_differentiable_reference(h, weight, t, bias, ignore_index, red, label_smoothing, z_loss,
                                         softcap.value_or(0.0))
          : std::get<0>(lce_fwd_op().call(h, weight, t, bias, ignore_index, red, label_smoothing, z_loss,
                                          softcap.value_or(0.0), chunk_size, {false, false, false}));
  return red == kNone && target.dim() != 1 ? loss.view_symint(target.sym_sizes()) : loss;
}

// Autocast: as F.linear under autocast (on its lower-precision list, CUDA and CPU): hidden, weight and bias cast to
// the autocast dtype. The cross entropy itself runs in float32 either way (F.cross_entropy is on the float32 list).
template <c10::DeviceType kDevice>
Tensor lce_autocast(const Tensor& hidden, const Tensor& weight, const Tensor& target, const OptTensor& bias,
                    int64_t ignore_index, c10::string_view reduction, double label_smoothing, double z_loss,
                    std::optional<double> softcap, int64_t chunk_size) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>);
  const auto cast = [](const auto& t) { return autocast_lower<kDevice>(t); };
  return linear_cross_entropy_composite(cast(hidden), cast(weight), target, cast(bias), ignore_index, reduction,
                                        label_smoothing, z_loss, softcap, chunk_size);
}

// ------------------------------------------------------------------------------------------------
// Autograd
// ------------------------------------------------------------------------------------------------

// The backward of rotary_fwd (next edges q, k): the conjugate rotation of the output grads, by the same op (so a
// backward that is itself differentiated records it again: the rotation is linear, every order is exact).
struct RotaryBackward : torch::autograd::Node {
  torch::autograd::SavedVariable cos, sin, position_ids;
  bool interleaved = false, seq_first = false, conjugate = false;

  std::string name() const override { return "fusedkernels::RotaryBackward"; }

  void release_variables() override {
    for (auto* v : {&cos, &sin, &position_ids}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(2);
    const bool want_q = grads[0].defined() && task_should_compute_output(0);
    const bool want_k = grads[1].defined() && task_should_compute_output(1);
    if (!want_q && !want_k) return out;
    // a grad not wanted (or not flowing) goes in as zero heads of the other
    const int heads_axis = seq_first ? 2 : 1;
    const Tensor dq = want_q ? grads[0] : grads[1].narrow(heads_axis, 0, 0);
    const Tensor dk = want_k ? grads[1] : grads[0].narrow(heads_axis, 0, 0);
    auto [gq, gk] = rotary_fwd_op().call(unit_stride_heads(dq), unit_stride_heads(dk), cos.unpack(), sin.unpack(),
                                         optional_of(position_ids.unpack()), interleaved, seq_first, !conjugate);
    if (want_q) out[0] = gq;
    if (want_k) out[1] = gk;
    return out;
  }
};

std::tuple<Tensor, Tensor> rotary_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                               const OptTensor& position_ids, bool interleaved, bool seq_first,
                                               bool conjugate) {
  const bool tables_need_grad = at::GradMode::is_enabled() && (requires_grad(cos) || requires_grad(sin));
  if (tables_need_grad || has_forward_grad(q) || has_forward_grad(k) || has_forward_grad(cos) ||
      has_forward_grad(sin)) {
    // what the node does not give (grads of cos / sin, tangents): the differentiable reference
    return rotary_reference(q, k, cos, sin, position_ids, interleaved, seq_first, conjugate);
  }
  auto out = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rotary_fwd_op().call(q, k, cos, sin, position_ids, interleaved, seq_first, conjugate);
  }();
  if (at::GradMode::is_enabled() && (requires_grad(q) || requires_grad(k))) {
    auto node = make_node<RotaryBackward>();
    auto& n = static_cast<RotaryBackward&>(*node);
    n.set_next_edges(torch::autograd::collect_next_edges(q, k));
    // outputs 0 and 1; one whose input needs no gradient gets none (as HF's products: a frozen k's stays a plain
    // tensor), its slot left empty
    const bool wanted[2] = {requires_grad(q), requires_grad(k)};
    Tensor* outputs[2] = {&std::get<0>(out), &std::get<1>(out)};
    for (int i = 0; i < 2; ++i) {
      if (wanted[i]) {
        torch::autograd::set_history(*outputs[i], node);
      } else {
        n.add_input_metadata(torch::autograd::Node::undefined_input());
      }
    }
    n.cos = torch::autograd::SavedVariable(cos, false);
    n.sin = torch::autograd::SavedVariable(sin, false);
    if (position_ids) n.position_ids = torch::autograd::SavedVariable(*position_ids, false);
    n.interleaved = interleaved;
    n.seq_first = seq_first;
    n.conjugate = conjugate;
  }
  return out;
}

// The backward of linear_cross_entropy_fwd (next edges hidden, weight, bias). mean / sum: the forward computed the
// gradients for a loss grad of 1 (dhidden and dweight in grad_sum_type, dbias in float32); the backward scales them
// by the loss's grad (exact for 1 and powers of two; else one more rounding of 16-bit ones, as Liger-Kernel's), in
// place where nothing else sees them: the saved gradients then become the returned ones and the step's peak holds
// one copy. none: each token's grad scales its row of d(logits) before the GEMMs sum over tokens, so the chunks are
// recomputed then. A backward that is itself differentiated (create_graph) is refused: the saved gradients are
// not functions of the inputs autograd could differentiate.
struct LinearCrossEntropyBackward : torch::autograd::Node {
  torch::autograd::SavedVariable dhidden, dweight, dbias;                  // mean / sum
  torch::autograd::SavedVariable hidden, weight, target, bias, lse;        // none
  bool none = false, has_bias = false;
  at::ScalarType dtype = at::kFloat;  // the inputs'
  int64_t ignore_index = -100, chunk_size = 0;
  double label_smoothing = 0, z_loss = 0, softcap = 0;

  std::string name() const override { return "fusedkernels::LinearCrossEntropyBackward"; }

  void release_variables() override {
    for (auto* v : {&dhidden, &dweight, &dbias, &hidden, &weight, &target, &bias, &lse}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    const Tensor& dloss = grads[0];
    if (!dloss.defined()) return out;
    TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(),
                                "linear_cross_entropy: double backward (create_graph=True) is not supported");
    const std::array<bool, 3> want = {task_should_compute_output(0), task_should_compute_output(1),
                                      has_bias && task_should_compute_output(2)};
    if (none) {
      const Tensor saved_lse = lse.unpack();  // float32, float64 for float64 inputs: the loss grad's type
      auto [dh, dw, db] = lce_bwd_op().call(dloss.reshape({-1}).to(saved_lse.scalar_type()).contiguous(),
                                            hidden.unpack(), weight.unpack(), target.unpack(),
                                            optional_of(bias.unpack()), saved_lse, ignore_index, label_smoothing,
                                            z_loss, softcap, chunk_size, want);
      const std::array<Tensor, 3> g = {dh, dw, db};
      for (size_t i = 0; i < 3; ++i) {
        if (want[i]) out[i] = g[i];
      }
      return out;
    }
    const std::array<torch::autograd::SavedVariable*, 3> vars = {&dhidden, &dweight, &dbias};
    // In place when the saved tensors are released after this call and nothing else sees them: plain tensors (not
    // those a trace, AOTAutograd or compiled autograd, runs the backward on, nor a batched loss grad) and no
    // saved_tensors_hooks (whose packed tensors would change).
    const bool released = !torch::autograd::get_current_graph_task_keep_graph();
    for (size_t i = 0; i < 3; ++i) {
      if (!want[i]) continue;
      const Tensor saved = vars[i]->unpack();
      if (!plain_tensor(dloss)) {
        out[i] = at::mul(saved, dloss).to(dtype);  // (functorch's batching rules have no mul.out)
      } else if (released && saved.scalar_type() == dtype && plain_tensor(saved) && !vars[i]->has_hooks()) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing else sees saved: no version to bump
        lce_scale_op().call(saved, dloss);
        out[i] = saved;
      } else {
        // one op: the product in the saved gradient's type, rounded to dtype as it is stored
        out[i] = at::empty(saved.sizes(), saved.options().dtype(dtype));
        at::mul_out(out[i], saved, dloss);
      }
    }
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lce_fwd_autograd(
    const Tensor& hidden, const Tensor& weight, const Tensor& target, const OptTensor& bias, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double z_loss, double softcap, int64_t chunk_size,
    std::array<bool, 3> grad_mask) {
  const bool grad = at::GradMode::is_enabled();
  const std::array<bool, 3> need = {grad && requires_grad(hidden), grad && requires_grad(weight),
                                    grad && requires_grad(bias)};
  const bool any = need[0] || need[1] || need[2];
  const bool none = reduction == kNone;
  std::array<bool, 3> mask = grad_mask;
  if (!none) {
    for (size_t i = 0; i < 3; ++i) mask[i] = mask[i] || need[i];
  }
  auto out = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return lce_fwd_op().call(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                             chunk_size, mask);
  }();
  if (any) {
    auto node = make_node<LinearCrossEntropyBackward>();
    auto& n = static_cast<LinearCrossEntropyBackward&>(*node);
    n.set_next_edges(torch::autograd::collect_next_edges(hidden, weight, bias));
    torch::autograd::set_history(std::get<0>(out), node);
    n.none = none;
    n.dtype = hidden.scalar_type();
    n.has_bias = bias.has_value();
    n.ignore_index = ignore_index;
    n.chunk_size = chunk_size;
    n.label_smoothing = label_smoothing;
    n.z_loss = z_loss;
    n.softcap = softcap;
    if (none) {
      n.hidden = torch::autograd::SavedVariable(hidden, false);
      n.weight = torch::autograd::SavedVariable(weight, false);
      n.target = torch::autograd::SavedVariable(target, false);
      if (bias) n.bias = torch::autograd::SavedVariable(*bias, false);
      n.lse = torch::autograd::SavedVariable(std::get<1>(out), false);
    } else {
      n.dhidden = torch::autograd::SavedVariable(std::get<2>(out), false);
      n.dweight = torch::autograd::SavedVariable(std::get<3>(out), false);
      n.dbias = torch::autograd::SavedVariable(std::get<4>(out), false);
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// CPU and Meta kernels
// ------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> rotary_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                          const OptTensor& position_ids, bool interleaved, bool seq_first,
                                          bool conjugate) {
  check_positions(position_ids, cos);
  return rotary_reference(q, k, cos, sin, position_ids, interleaved, seq_first, conjugate);
}

void rotary_inplace_cpu(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                        const OptTensor& position_ids, bool interleaved, bool seq_first, bool conjugate) {
  auto [qo, ko] = rotary_fwd_cpu(q, k, cos, sin, position_ids, interleaved, seq_first, conjugate);
  q.copy_(qo);
  k.copy_(ko);
}

std::tuple<Tensor, Tensor> rotary_fwd_meta(const Tensor& q, const Tensor& k, const Tensor&, const Tensor&,
                                           const OptTensor&, bool, bool, bool) {
  return {rotary_output_like(q), rotary_output_like(k)};
}

void rotary_inplace_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool, bool,
                         bool) {}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lce_fwd_cpu(const Tensor& hidden, const Tensor& weight,
                                                                const Tensor& target, const OptTensor& bias,
                                                                int64_t ignore_index, int64_t reduction,
                                                                double label_smoothing, double z_loss, double softcap,
                                                                int64_t chunk_size, std::array<bool, 3> grad_mask) {
  auto r = linear_cross_entropy_chunked("linear_cross_entropy_fwd", hidden, weight, target, bias, ignore_index,
                                        reduction, label_smoothing, z_loss, softcap, chunk_size, grad_mask, Tensor(),
                                        Tensor(), &cross_entropy_chunk_reference, &loss_reduce_reference);
  return {r[0], r[1], r[2], r[3], r[4]};
}

std::tuple<Tensor, Tensor, Tensor> lce_bwd_cpu(const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
                                               const Tensor& target, const OptTensor& bias, const Tensor& lse,
                                               int64_t ignore_index, double label_smoothing, double z_loss,
                                               double softcap, int64_t chunk_size, std::array<bool, 3> grad_mask) {
  auto r = linear_cross_entropy_chunked("linear_cross_entropy_bwd", hidden, weight, target, bias, ignore_index, kNone,
                                        label_smoothing, z_loss, softcap, chunk_size, grad_mask, grad_loss, lse,
                                        &cross_entropy_chunk_reference, &loss_reduce_reference);
  return {r[2], r[3], r[4]};
}

Tensor grad_or_empty(bool want, const Tensor& like, const Tensor& any) {
  return want ? at::empty_symint(like.sym_sizes(), like.options()) : at::empty({0}, any.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lce_fwd_meta(const Tensor& hidden, const Tensor& weight,
                                                                const Tensor& target, const OptTensor& bias, int64_t,
                                                                int64_t reduction, double, double, double, int64_t,
                                                                std::array<bool, 3> grad_mask) {
  const auto stats = hidden.options().dtype(opmath_dtype(hidden.scalar_type()));
  const Tensor loss = reduction == kNone ? at::empty_symint(target.sym_sizes(), stats) : at::empty({}, stats);
  const auto grad = [&](bool want, const Tensor& like, const at::TensorOptions& options) {
    return want ? at::empty_symint(like.sym_sizes(), options) : at::empty({0}, hidden.options());
  };
  const auto sums = hidden.options().dtype(grad_sum_type(hidden.scalar_type()));
  return {loss, at::empty_symint(target.sym_sizes(), stats), grad(grad_mask[0], hidden, sums),
          grad(grad_mask[1], weight, sums), grad(grad_mask[2] && bias, bias ? *bias : hidden, stats)};
}

std::tuple<Tensor, Tensor, Tensor> lce_bwd_meta(const Tensor&, const Tensor& hidden, const Tensor& weight,
                                                const Tensor&, const OptTensor& bias, const Tensor&, int64_t, double,
                                                double, double, int64_t, std::array<bool, 3> grad_mask) {
  return {grad_or_empty(grad_mask[0], hidden, hidden), grad_or_empty(grad_mask[1], weight, hidden),
          grad_or_empty(grad_mask[2] && bias, bias ? *bias : hidden, hidden)};
}

const RegisterOpInfo apply_rotary_info{
    {"llm", "apply_rotary", "float32, float16, bfloat16 q / k; cos / sin in q's dtype or float32",
     "any head counts (GQA), head_dim and rotary_dim <= head_dim (even); half-split or interleaved pairs; "
     "position_ids; 16-byte accesses where sizes and strides allow"}};
const RegisterOpInfo rotary_cos_sin_info{
    {"llm", "rotary_cos_sin", "integer position_ids; float32, float16, bfloat16 tables",
     "any positions and rotary_dim; one launch for cos and sin"}};
const RegisterOpInfo linear_cross_entropy_info{
    {"llm", "linear_cross_entropy", "float32, float16, bfloat16 (hidden, weight, bias alike); int64 target",
     "any vocabulary; the GEMMs are PyTorch's (cuBLAS), the softmax / loss / gradient step is the fused kernel"}};

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CompositeImplicitAutograd, m) {
  m.impl("apply_rotary", &apply_rotary_composite);
  m.impl("apply_rotary_", &apply_rotary_inplace_composite);
  m.impl("rotary_cos_sin", &rotary_cos_sin_composite);
  m.impl("linear_cross_entropy", &linear_cross_entropy_composite);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCUDA, m) {
  m.impl("linear_cross_entropy", &lce_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCPU, m) { m.impl("linear_cross_entropy", &lce_autocast<c10::DeviceType::CPU>); }

TORCH_LIBRARY_IMPL(fusedkernels, Autograd, m) {
  m.impl("rotary_fwd", &rotary_fwd_autograd);
  m.impl("linear_cross_entropy_fwd", &lce_fwd_autograd);
  // Differentiating these directly is an error (the public ops' backward covers what they compute).
  m.impl("rotary_", torch::CppFunction::makeFromBoxedFunction<&inplace_without_derivative>());
  m.impl("linear_cross_entropy_scale_", torch::CppFunction::makeFromBoxedFunction<&inplace_without_derivative>());
  m.impl("linear_cross_entropy_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("rotary_table", torch::autograd::autogradNotImplementedFallback());
}

// rotary_ writes q and k: their version counters move, as for torch's in-place ops.
TORCH_LIBRARY_IMPL(fusedkernels, ADInplaceOrView, m) {
  m.impl("rotary_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("linear_cross_entropy_scale_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

TORCH_LIBRARY_IMPL(fusedkernels, CPU, m) {
  m.impl("rotary_fwd", &rotary_fwd_cpu);
  m.impl("rotary_", &rotary_inplace_cpu);
  m.impl("rotary_table", &rotary_cos_sin_reference);
  m.impl("linear_cross_entropy_fwd", &lce_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &lce_bwd_cpu);
  m.impl("linear_cross_entropy_scale_", [](const Tensor& grad, const Tensor& scale) { grad.mul_(scale); });
}

TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) {
  m.impl("rotary_fwd", &rotary_fwd_meta);
  m.impl("rotary_", &rotary_inplace_meta);
  m.impl("rotary_table", &rotary_table_meta);
  m.impl("linear_cross_entropy_fwd", &lce_fwd_meta);
  m.impl("linear_cross_entropy_bwd", &lce_bwd_meta);
  m.impl("linear_cross_entropy_scale_", [](const Tensor&, const Tensor&) {});
}

}  // namespace fusedkernels::llm
