// CUDA kernels of fusedkernels::attention_fwd / attention_bwd: check the tensors, fill FwdParams / BwdParams
// (element strides; varlen batch strides 0), take the dropout's Philox state, launch on the current stream.
// The public ops, autograd and the CPU / meta kernels are in attention_ops.cpp. Nothing here syncs, reads a
// device value or calls cudaMalloc (workspaces come from the caching allocator): CUDA-graph capture safe.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/ExpandUtils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "attention/attention.h"
#include "common/torch/checks.h"
#include "common/torch/philox.h"

namespace fusedkernels::attention {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// head_dim contiguous, rows (and every other stride of a dimension longer than 1) and the pointer 16-byte
// aligned: what the kernels read and write.
bool kernel_ready(const Tensor& t) {
  if (t.stride(-1) != 1 && t.size(-1) > 1) return false;
  const int64_t align = 16 / static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % align != 0) return false;
  }
  return t.numel() == 0 || is_aligned_16(t);
}

Tensor ready(const Tensor& t) { return kernel_ready(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

int as_int(int64_t v, const char* op, const char* what) {
  TORCH_CHECK_VALUE(v >= 0 && v <= kIntMax, op, ": ", what, " must be in [0, 2^31), got ", num(v));
  return static_cast<int>(v);
}

int window(int64_t w) { return w < 0 ? -1 : static_cast<int>(std::min(w, kIntMax)); }

struct Sizes {
  bool varlen, heads_first;
  int64_t batch, seqlen_q, seqlen_k, total_q, total_k, heads_q, heads_kv, head_dim;
};

// [batch, row, head] strides of q, k, v, out or a grad; varlen tensors are [total, head, dim] with no batch
// stride, heads_first ones [batch, head, row, dim].
Strides strides_of(const Tensor& t, const Sizes& s) {
  if (s.varlen) return {0, t.stride(0), t.stride(1)};
  if (s.heads_first) return {t.stride(0), t.stride(2), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// out of a heads_first call: [batch, heads, seqlen, head_dim] over [batch, seqlen, heads, head_dim] memory (what
// at::empty of the latter, transposed, gives; as torch's flash backend returns SDPA's output), in one allocation.
Tensor empty_heads_first(const Tensor& q) {
  const auto n = q.sizes();
  const int64_t head_stride = std::max<int64_t>(n[3], 1), row_stride = head_stride * std::max<int64_t>(n[1], 1);
  return at::empty_strided(n, {row_stride * std::max<int64_t>(n[2], 1), head_stride, row_stride, 1}, q.options());
}

// The internal ops' contract (the public ops check what a user passes, in torch's words; these guard the raw
// ops): CUDA fp16 / bf16, a head dim with a kernel, consistent shapes.
Sizes check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& bias,
                   const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_q, int64_t max_k, bool heads_first) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device().str());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                   ": q must be float16 or bfloat16, got ", name_of(q.scalar_type()));
  const bool varlen = cu_q.has_value();
  TORCH_CHECK_VALUE(cu_k.has_value() == varlen, op, ": give both cu_seqlens_q and cu_seqlens_k, or neither");
  TORCH_CHECK_VALUE(!(varlen && heads_first), op, ": heads_first is not supported with varlen");
  const int64_t dims = varlen ? 3 : 4;
  const int64_t row = heads_first ? 2 : 1, head = heads_first ? 1 : dims - 2;  // (varlen: no row dimension)
  for (const auto& [name, t] : {std::pair{"k", &k}, std::pair{"v", &v}}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " is on ", t->device().str(), " but q is on ",
                      q.device().str());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must be ", name_of(q.scalar_type()),
                     " like q, got ", name_of(t->scalar_type()));
  }
  TORCH_CHECK_VALUE(q.dim() == dims && k.dim() == dims && v.dim() == dims && k.sizes() == v.sizes(), op,
                    ": q, k, v must be ",
                    varlen        ? "[total, heads, head_dim]"
                    : heads_first ? "[batch, heads, seqlen, head_dim]"
                                  : "[batch, seqlen, heads, head_dim]",
                    " with k and v alike, got ", shape(q), ", ", shape(k), ", ", shape(v));
  Sizes s{varlen, heads_first};
  s.heads_q = q.size(head);
  s.heads_kv = k.size(head);
  s.head_dim = q.size(-1);
  TORCH_CHECK_VALUE(k.size(-1) == s.head_dim, op, ": q and k must have the same head_dim");
  TORCH_CHECK_VALUE(has_head_dim(static_cast<int>(std::min(s.head_dim, kIntMax))), op,
                    ": head_dim must be 32, 64, 96, 128 or 256, got ", num(s.head_dim));
  TORCH_CHECK_VALUE(s.heads_kv > 0 && s.heads_q % s.heads_kv == 0, op, ": heads of q (", num(s.heads_q),
                    ") must be a multiple of heads of k and v (", num(s.heads_kv), ")");
  if (varlen) {
    for (const auto& [name, t] : {std::pair{"cu_seqlens_q", &*cu_q}, std::pair{"cu_seqlens_k", &*cu_k}}) {
      TORCH_CHECK_VALUE(t->device() == q.device() && t->scalar_type() == at::kInt && t->dim() == 1 &&
                            t->is_contiguous() && t->size(0) == cu_q->size(0) && t->size(0) >= 1,
                        op, ": ", name, " must be a contiguous int32 [batch + 1] tensor on q's device, got ",
                        name_of(t->scalar_type()), " ", shape(*t));
    }
    TORCH_CHECK_VALUE(!bias, op, ": attn_bias is not supported with varlen");
    s.batch = cu_q->size(0) - 1;
    s.seqlen_q = max_q;
    s.seqlen_k = max_k;
    s.total_q = q.size(0);
    s.total_k = k.size(0);
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": q and k must have the same batch");
    s.batch = q.size(0);
    s.seqlen_q = q.size(row);
    s.seqlen_k = k.size(row);
    s.total_q = s.batch * s.seqlen_q;
    s.total_k = s.batch * s.seqlen_k;
  }
  for (const auto& [what, value] : {std::pair{"batch", s.batch}, std::pair{"seqlen_q", s.seqlen_q},
                                    std::pair{"seqlen_k", s.seqlen_k}, std::pair{"heads", s.heads_q}}) {
    as_int(value, op, what);
  }
  if (bias) {
    TORCH_CHECK_VALUE(bias->device() == q.device(), op, ": attn_bias is on ", bias->device().str(),
                      " but q is on ", q.device().str());
    TORCH_CHECK_TYPE(bias->scalar_type() == q.scalar_type(), op, ": attn_bias must be ", name_of(q.scalar_type()),
                     " like q (the public ops convert bool masks and other dtypes), got ",
                     name_of(bias->scalar_type()));
    TORCH_CHECK_VALUE(bias->dim() >= 1 && bias->dim() <= 4 &&
                          at::is_expandable_to(bias->sizes(), {s.batch, s.heads_q, s.seqlen_q, s.seqlen_k}),
                      op, ": attn_bias must be broadcastable to [batch, heads_q, seqlen_q, seqlen_k], got ",
                      shape(*bias));
  }
  return s;
}

// A bias the kernel reads: a last dimension of size seqlen_k and stride 1 (the public ops arrange it).
Tensor bias_ready(const Tensor& bias, int64_t seqlen_k) {
  if (bias.size(-1) == seqlen_k && (bias.stride(-1) == 1 || seqlen_k <= 1)) return bias;
  auto sizes = bias.sizes().vec();
  sizes.back() = seqlen_k;
  return bias.expand(sizes).contiguous();
}

// The forward's params, bar the outputs.
FwdParams fwd_params(const Sizes& s, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& bias,
                     const OptTensor& cu_q, const OptTensor& cu_k, double dropout_p, double scale, bool causal,
                     int64_t window_left, int64_t window_right) {
  FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides_of(q, s);
  p.k_strides = strides_of(k, s);
  p.v_strides = strides_of(v, s);
  if (bias) {
    const Tensor b = bias->expand({s.batch, s.heads_q, s.seqlen_q, s.seqlen_k});  // stride 0 where broadcast
    p.bias = b.data_ptr();
    p.bias_strides = {b.stride(0), b.stride(2), b.stride(1)};
  }
  p.cu_seqlens_q = cu_q ? cu_q->data_ptr<int>() : nullptr;
  p.cu_seqlens_k = cu_k ? cu_k->data_ptr<int>() : nullptr;
  p.batch = static_cast<int>(s.batch);
  p.heads_q = static_cast<int>(s.heads_q);
  p.heads_kv = static_cast<int>(s.heads_kv);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.head_dim = static_cast<int>(s.head_dim);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.window_left = window(window_left);
  p.window_right = window(window_right);
  p.dropout_p = static_cast<float>(dropout_p);
  p.dtype = to_dtype(q.scalar_type());
  return p;
}

// lse [B, Hq, Nq] or, varlen, [Hq, total_q].
void set_lse(FwdParams& p, const Sizes& s, const Tensor& lse) {
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = s.varlen ? 0 : s.heads_q * s.seqlen_q;
  p.lse_head_stride = s.varlen ? s.total_q : s.seqlen_q;
}

// The kernel draws from offset + b * Hq + h (the high half of its counter), so each call reserves B * Hq
// offsets, rounded up to the generator's multiple of 4.
PhiloxState philox_for(const std::optional<at::Generator>& generator, int64_t batch, int64_t heads) {
  return philox_state(generator, static_cast<uint64_t>((batch * heads + 3) / 4 * 4));
}

std::tuple<Tensor, Tensor, Tensor> attention_fwd_cuda(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                      const OptTensor& bias_, const OptTensor& cu_q,
                                                      const OptTensor& cu_k, c10::SymInt max_q, c10::SymInt max_k,
                                                      double dropout_p, double scale, bool causal,
                                                      int64_t window_left, int64_t window_right, bool,
                                                      std::optional<at::Generator> generator, bool heads_first) {
  const char* op = "attention_fwd";
  const Sizes s =
      check_inputs(op, q_, k_, v_, bias_, cu_q, cu_k, max_q.expect_int(), max_k.expect_int(), heads_first);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1)");
  const c10::cuda::CUDAGuard guard(q_.device());
  const Tensor q = ready(q_), k = ready(k_), v = ready(v_);
  const OptTensor bias = bias_ ? OptTensor(bias_ready(*bias_, s.seqlen_k)) : std::nullopt;
  const auto f32 = q.options().dtype(at::kFloat);
  // varlen: rows past cu_seqlens_q[-1] belong to no sequence and the kernel never visits them; they get
  // output 0 and lse -inf like a row that sees no key.
  Tensor out = s.varlen        ? at::zeros(q.sizes(), q.options())
               : s.heads_first ? empty_heads_first(q)
                               : at::empty(q.sizes(), q.options());
  Tensor lse = s.varlen ? at::full({s.heads_q, s.total_q}, -std::numeric_limits<float>::infinity(), f32)
                        : at::empty({s.batch, s.heads_q, s.seqlen_q}, f32);
  Tensor rng_state = at::empty({dropout_p > 0 ? 2 : 0}, q.options().dtype(at::kLong));
  if (out.numel() == 0) {
    if (dropout_p > 0) rng_state.zero_();
    return {out, lse, rng_state};
  }
  if (s.seqlen_k == 0 && !s.varlen) {  // no keys at all: nothing to launch
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    if (dropout_p > 0) rng_state.zero_();
    return {out, lse, rng_state};
  }

  FwdParams p = fwd_params(s, q, k, v, bias, cu_q, cu_k, dropout_p, scale, causal, window_left, window_right);
  p.out = out.data_ptr();
  p.out_strides = strides_of(out, s);
  set_lse(p, s, lse);
  if (dropout_p > 0) {
    p.philox = philox_for(generator, s.batch, s.heads_q);
    p.rng_state = rng_state.data_ptr<int64_t>();
  }
  check_launch(attention_fwd(p, c10::cuda::getCurrentCUDAStream()), op);
  return {out, lse, rng_state};
}

// A grad buffer laid out as empty_like(input) (the meta kernel's layout); `zero` where the kernel may leave
// rows unwritten (varlen rows past cu_seqlens[-1]).
Tensor grad_like(const Tensor& input, bool zero) { return zero ? at::zeros_like(input) : at::empty_like(input); }

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd_cuda(
    const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& out_, const Tensor& lse,
    const OptTensor& bias_, const OptTensor& cu_q, const OptTensor& cu_k, c10::SymInt max_q, c10::SymInt max_k,
    double dropout_p, double scale, bool causal, int64_t window_left, int64_t window_right, const Tensor& rng_state,
    bool deterministic, std::array<bool, 4> output_mask, bool heads_first, const OptTensor& dlse_) {
  const char* op = "attention_bwd";
  const Sizes s =
      check_inputs(op, q_, k_, v_, bias_, cu_q, cu_k, max_q.expect_int(), max_k.expect_int(), heads_first);
  for (const auto& [name, t] : {std::pair{"dout", &dout_}, std::pair{"out", &out_}}) {
    TORCH_CHECK_VALUE(t->device() == q_.device() && t->scalar_type() == q_.scalar_type() && t->sizes() == q_.sizes(),
                      op, ": ", name, " must match q in device, dtype and shape, got ", name_of(t->scalar_type()), " ",
                      shape(*t));
  }
  const std::vector<int64_t> lse_shape =
      s.varlen ? std::vector<int64_t>{s.heads_q, s.total_q} : std::vector<int64_t>{s.batch, s.heads_q, s.seqlen_q};
  TORCH_CHECK_VALUE(lse.device() == q_.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                        lse.sizes() == at::IntArrayRef(lse_shape),
                    op, ": lse must be the forward's contiguous float32 ", shape(at::IntArrayRef(lse_shape)),
                    ", got ", name_of(lse.scalar_type()), " ", shape(lse));
  TORCH_CHECK_VALUE(!dlse_ || (dlse_->device() == q_.device() && dlse_->scalar_type() == at::kFloat &&
                               dlse_->sizes() == lse.sizes()),
                    op, ": dlse must be float32 like lse ", shape(lse), ", got ",
                    dlse_ ? name_of(dlse_->scalar_type()) : "", " ", dlse_ ? shape(*dlse_) : std::string());
  TORCH_CHECK_VALUE(dropout_p == 0.0 || (rng_state.device() == q_.device() && rng_state.scalar_type() == at::kLong &&
                                         rng_state.numel() == 2),
                    op, ": rng_state must be the forward's int64 [2] when dropout_p > 0");
  const c10::cuda::CUDAGuard guard(q_.device());
  const Tensor q = ready(q_), k = ready(k_), v = ready(v_), out = ready(out_), dout = ready(dout_);
  const OptTensor bias = bias_ ? OptTensor(bias_ready(*bias_, s.seqlen_k)) : std::nullopt;
  const bool want_bias = output_mask[3] && bias_.has_value();

  Tensor dq = grad_like(q_, s.varlen), dk = grad_like(k_, s.varlen), dv = grad_like(v_, s.varlen);
  // The kernel writes dbias only where a query sees a key (it skips masked tiles): the rest stays 0.
  Tensor dbias_full = want_bias ? at::zeros({s.batch, s.heads_q, s.seqlen_q, s.seqlen_k}, q.options().dtype(at::kFloat))
                                : Tensor();
  const auto finish = [&] {
    Tensor dbias = at::empty({0}, q.options());
    if (want_bias) dbias = at::sum_to(dbias_full, bias_->sizes()).to(bias_->scalar_type()).contiguous();
    return std::tuple<Tensor, Tensor, Tensor, Tensor>{dq, dk, dv, dbias};
  };
  if (q.numel() == 0 || k.numel() == 0) {  // nothing attends: zero grads
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return finish();
  }
  // The kernel writes head_dim-contiguous, 16-byte aligned rows: a grad laid out otherwise (an input permuted
  // so that head_dim is not innermost) is computed in a contiguous buffer and copied.
  const auto target = [&](const Tensor& g) {
    return kernel_ready(g) ? g : s.varlen ? at::zeros(g.sizes(), g.options()) : at::empty(g.sizes(), g.options());
  };
  Tensor dq_k = target(dq), dk_k = target(dk), dv_k = target(dv);

  BwdParams p{};
  p.fwd = fwd_params(s, q, k, v, bias, cu_q, cu_k, dropout_p, scale, causal, window_left, window_right);
  p.fwd.out = out.data_ptr();
  p.fwd.out_strides = strides_of(out, s);
  set_lse(p.fwd, s, lse);
  const Tensor dlse = dlse_ ? dlse_->contiguous() : Tensor();
  p.dlse = dlse_ ? dlse.data_ptr<float>() : nullptr;
  p.fwd.rng_state = dropout_p > 0 ? rng_state.data_ptr<int64_t>() : nullptr;
  p.dout = dout.data_ptr();
  p.dout_strides = strides_of(dout, s);
  p.dq = dq_k.data_ptr();
  p.dk = dk_k.data_ptr();
  p.dv = dv_k.data_ptr();
  p.dq_strides = strides_of(dq_k, s);
  p.dk_strides = strides_of(dk_k, s);
  p.dv_strides = strides_of(dv_k, s);
  p.dbias = want_bias ? dbias_full.data_ptr<float>() : nullptr;
  p.total_q = s.total_q;
  p.total_k = s.total_k;
  p.deterministic = deterministic || at::globalContext().deterministicAlgorithms();
  // Workspace from the caching allocator: graph-capture safe, no cudaMalloc.
  const int64_t workspace_floats = bwd_workspace_floats(p);
  Tensor workspace = at::empty({std::max<int64_t>(workspace_floats, 1)}, q.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  check_launch(attention_bwd(p, c10::cuda::getCurrentCUDAStream()), op);
  for (auto [result, computed] : {std::pair{&dq, &dq_k}, std::pair{&dk, &dk_k}, std::pair{&dv, &dv_k}}) {
    if (!result->is_same(*computed)) result->copy_(*computed);
  }
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace fusedkernels::attention
