// The attention family's op layer: schemas; the public ops attention / attention_varlen (argument checks, the
// choice between the fused kernel and the reference, autocast); autograd of the internal attention_fwd in C++;
// the CPU kernels (the reference math, fp32) and meta kernels of the internal ops. Their CUDA kernels are in
// attention_api.cpp.
//
//   fusedkernels::attention / attention_varlen   CompositeImplicitAutograd: check, route, call attention_fwd
//     (scaled_dot_product_attention: the same on [B, H, N, D] tensors, heads_first)
//     -> fusedkernels::attention_fwd              Autograd: attaches AttentionBackward; CUDA: the fused kernel;
//                                                 CPU: the reference math; Meta: shapes
//        backward -> fusedkernels::attention_bwd  (or, under create_graph, differentiable ATen ops)
//
// Masking is top-left aligned (query i sees key j <= i under causal, as torch's is_causal), per sequence for
// varlen; a row that sees no key gets output 0, lse -inf and zero gradients.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "attention/attention.h"
#include "common/host/launch.h"
#include "common/torch/autocast.h"
#include "common/torch/autograd.h"
#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "common/torch/philox.h"

TORCH_LIBRARY_FRAGMENT(fusedkernels, m) {
  // Public ops. q [B, Nq, Hq, D], k / v [B, Nk, Hkv, D] (varlen: packed [total, H, D] with cu_seqlens int32
  // [B + 1]); attn_bias broadcastable to [B, Hq, Nq, Nk], bool (True = takes part) or float (added to
  // scale * q.k); window -1 = unbounded; scale None = 1 / sqrt(D). Results: out like q (contiguous), and lse
  // (float32 [B, Hq, Nq], varlen [Hq, total_q]) when return_lse, else an empty tensor.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_bias=None, float dropout_p=0., bool causal=False,"
        " int window_left=-1, int window_right=-1, float? scale=None, bool return_lse=False,"
        " bool deterministic=False) -> (Tensor, Tensor)");
  m.def("attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p=0., bool causal=False, int window_left=-1,"
        " int window_right=-1, float? scale=None, bool return_lse=False, bool deterministic=False)"
        " -> (Tensor, Tensor)");
  // torch's F.scaled_dot_product_attention, same arguments and results ([B, H, N, D]): on attention's kernel
  // where it takes the call, else torch's own op.
  m.def("scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None,"
        " float dropout_p=0., bool is_causal=False, float? scale=None, bool enable_gqa=False) -> Tensor");
  // Internal. attn_bias: float in q's dtype, last dim of stride 1 and size Nk (the public ops convert).
  // rng_state: int64 [2] (the Philox seed and offset the dropout mask came from) when dropout_p > 0, else [0].
  // deterministic: the backward's dq without atomics (also under torch.use_deterministic_algorithms).
  // heads_first: q, k, v (and the backward's dout, out) are [B, H, N, D], SDPA's layout, taken as they are (the
  // kernels read any strides); out is then [B, H, N, D] over [B, N, H, D] memory, as torch's flash backend
  // returns it. Not with varlen.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_bias, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,"
        " SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, float scale, bool causal, int window_left,"
        " int window_right, bool deterministic=False, Generator? generator=None, bool heads_first=False)"
        " -> (Tensor out, Tensor lse, Tensor rng_state)",
        {at::Tag::nondeterministic_seeded});
  // output_mask: dq, dk, dv, dbias. dq / dk / dv are always computed; dbias (like attn_bias: shape, dtype) is
  // an empty tensor unless asked for and attn_bias is given. dlse: the gradient of lse (like lse), or None.
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_bias,"
        " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p,"
        " float scale, bool causal, int window_left, int window_right, Tensor rng_state, bool deterministic,"
        " bool[4] output_mask, bool heads_first=False, Tensor? dlse=None)"
        " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
}

namespace fusedkernels::attention {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::variable_list;
constexpr double kInf = std::numeric_limits<double>::infinity();

using AttentionFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                        const OptTensor&, const OptTensor&, c10::SymInt, c10::SymInt,
                                                        double, double, bool, int64_t, int64_t, bool,
                                                        std::optional<at::Generator>, bool);
using AttentionBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, c10::SymInt, c10::SymInt, double, double, bool, int64_t, int64_t,
    const Tensor&, bool, std::array<bool, 4>, bool, const OptTensor&);

const c10::TypedOperatorHandle<AttentionFwd>& attention_fwd_op() {
  static const auto op = find_op<AttentionFwd>("fusedkernels::attention_fwd");
  return op;
}
const c10::TypedOperatorHandle<AttentionBwd>& attention_bwd_op() {
  static const auto op = find_op<AttentionBwd>("fusedkernels::attention_bwd");
  return op;
}

// A heads_first [B, H, N, D] tensor as the [B, N, H, D] view the reference reads (and back: the same swap).
Tensor rows_first(const Tensor& t, bool heads_first) { return heads_first ? t.transpose(1, 2) : t; }

// ------------------------------------------------------------------------------------------------
// The reference (differentiable ATen ops, fp32 arithmetic; fp64 for fp64): the CPU kernels, the path of
// inputs without a kernel, and the backward under create_graph
// ------------------------------------------------------------------------------------------------

// What decides which keys a query sees, and how scores scale. cu_q / cu_k set: varlen (the tensors packed,
// [total, H, D]).
struct Spec {
  double scale = 1.0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  double dropout_p = 0.0;
  OptTensor cu_q, cu_k;
  bool varlen() const { return cu_q.has_value(); }
};

// i [Nq, 1] and j [1, Nk] positions: where query i sees key j (undefined: everywhere).
Tensor position_keep(const Tensor& i, const Tensor& j, const Spec& s) {
  Tensor keep;
  const auto both = [&](const Tensor& c) { keep = keep.defined() ? keep.logical_and(c) : c; };
  if (s.causal) both(j.le(i));
  if (s.window_left >= 0) both(j.ge(i - s.window_left));
  if (s.window_right >= 0) both(j.le(i + s.window_right));
  return keep;
}

// Per row of a packed tensor: its sequence (`none` for rows past cu[-1]) and its position in the sequence.
std::pair<Tensor, Tensor> segments(const Tensor& cu, const c10::SymInt& total, int64_t none) {
  const Tensor cu64 = cu.to(at::kLong);
  const Tensor t = at::arange(c10::Scalar(total), cu64.options());
  Tensor seq = at::searchsorted(cu64.slice(0, 1), t, /*out_int32=*/false, /*right=*/true);
  const Tensor pos = t - cu64.index_select(0, seq);
  const c10::SymInt batch = cu.sym_size(0) - 1;
  seq = at::where(seq.lt(c10::Scalar(batch)), seq, c10::Scalar(none));
  return {seq, pos};
}

// [Nq, Nk] (varlen [total_q, total_k]) bool mask of what each query sees; undefined when it sees everything.
Tensor keep_mask(const Tensor& q4, const Tensor& k4, const Spec& s) {
  if (!s.varlen()) {
    if (!s.causal && s.window_left < 0 && s.window_right < 0) return Tensor();
    const auto opts = q4.options().dtype(at::kLong);
    const Tensor i = at::arange(c10::Scalar(q4.sym_size(1)), opts).unsqueeze(1);
    const Tensor j = at::arange(c10::Scalar(k4.sym_size(1)), opts).unsqueeze(0);
    return position_keep(i, j, s);
  }
  auto [seq_q, pos_q] = segments(*s.cu_q, q4.sym_size(1), -1);
  auto [seq_k, pos_k] = segments(*s.cu_k, k4.sym_size(1), -2);
  Tensor keep = seq_q.unsqueeze(1).eq(seq_k.unsqueeze(0));
  const Tensor pos = position_keep(pos_q.unsqueeze(1), pos_k.unsqueeze(0), s);
  return pos.defined() ? keep.logical_and(pos) : keep;
}

// [B, Hkv, N, D] -> [B, Hq, N, D]: each kv head serves Hq / Hkv consecutive q heads.
Tensor expand_heads(const Tensor& t, const c10::SymInt& hq) {
  const c10::SymInt hkv = t.sym_size(1);
  if (sym_same(hkv, hq)) return t;
  const c10::SymInt group = hq / hkv;
  return t.unsqueeze(2).expand_symint({t.sym_size(0), hkv, group, t.sym_size(2), t.sym_size(3)}).flatten(1, 2);
}

// [B, Hq, N, D] -> [B, Hkv, N, D]: the sum over each kv head's q heads.
Tensor reduce_heads(const Tensor& t, const c10::SymInt& hkv) {
  const c10::SymInt hq = t.sym_size(1);
  if (sym_same(hkv, hq)) return t;
  return t.unflatten_symint(1, {hkv, hq / hkv}).sum(2);
}

// The tensors in [B, H, N, D] arithmetic form (varlen: batch 1), in the accumulation dtype.
struct Heads {
  Tensor q, k, v;  // [B, Hq, Nq, D], [B, Hq, Nk, D] (kv heads expanded), [B, Hq, Nk, D]
};

Tensor as4(const Tensor& t, const Spec& s) { return s.varlen() ? t.unsqueeze(0) : t; }

// scale * q.k + bias, masked with -inf, and the probabilities (0 where a row sees no key).
std::pair<Tensor, Tensor> scores_and_probs(const Heads& h, const OptTensor& bias, const Tensor& keep, const Spec& s,
                                           Tensor* row_max, Tensor* row_sum) {
  const auto acc = h.q.scalar_type();
  Tensor scores = at::matmul(h.q, h.k.transpose(-1, -2)) * s.scale;
  if (bias) scores = scores + bias->to(acc);
  if (keep.defined()) scores = scores.masked_fill(keep.logical_not(), -kInf);
  Tensor m = scores.detach().amax(-1, /*keepdim=*/true);
  m = at::where(m.isfinite(), m, c10::Scalar(0.0));  // a row that sees nothing: exp(-inf - 0) = 0
  const Tensor e = (scores - m).exp();
  const Tensor l = e.sum(-1, /*keepdim=*/true);
  if (row_max) *row_max = m;
  if (row_sum) *row_sum = l;
  return {scores, e / at::where(l.eq(0), c10::Scalar(1.0), l)};
}

Heads heads_of(const Tensor& q4, const Tensor& k4, const Tensor& v4) {
  const auto acc = opmath_dtype(q4.scalar_type());
  const c10::SymInt hq = q4.sym_size(2);
  return {q4.transpose(1, 2).to(acc), expand_heads(k4.transpose(1, 2).to(acc), hq),
          expand_heads(v4.transpose(1, 2).to(acc), hq)};
}

bool no_keys(const Tensor& k4) { return k4.sym_size(1).sym_eq(0).guard_bool(__FILE__, __LINE__); }

// keep_dropout: bool [B, Hq, Nq, Nk] (varlen: [1, Hq, total_q, total_k]), True = kept; needed when
// dropout_p > 0. Returns out (q's layout and dtype, contiguous) and lse (float32 [B, Hq, Nq], varlen [Hq, total_q]).
std::pair<Tensor, Tensor> reference_forward(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& bias,
                                            const Spec& s, const Tensor& keep_dropout) {
  const Tensor q4 = as4(q, s), k4 = as4(k, s), v4 = as4(v, s);
  const c10::SymIntArrayRef qs = q4.sym_sizes();
  Tensor out, lse;
  if (no_keys(k4)) {
    out = at::zeros_symint(qs, q.options());
    lse = at::full_symint({qs[0], qs[2], qs[1]}, -kInf, q.options().dtype(at::kFloat));
  } else {
    const Heads h = heads_of(q4, k4, v4);
    Tensor m, l;
    Tensor p = scores_and_probs(h, bias, keep_mask(q4, k4, s), s, &m, &l).second;
    if (s.dropout_p > 0) p = p.masked_fill(keep_dropout.logical_not(), 0.0) * (1.0 / (1.0 - s.dropout_p));
    out = at::matmul(p, h.v).transpose(1, 2).to(q.scalar_type()).contiguous();
    // differentiable (its gradient in the scores is p), and -inf with a zero gradient where a row sees no key
    const Tensor empty_row = l.eq(0);
    lse = at::where(empty_row, -kInf, at::where(empty_row, c10::Scalar(1.0), l).log() + m).squeeze(-1).to(at::kFloat);
  }
  if (s.varlen()) return {out.squeeze(0), lse.squeeze(0)};
  return {out, lse};
}

// dq, dk, dv (the inputs' shapes and dtypes) and dbias (attn_bias's shape and dtype, when want[3]) from the
// probabilities recomputed: differentiable in every input, so a recorded backward (create_graph) has exact
// higher derivatives. With dropout, keep_dropout is the forward's mask. dlse (lse's shape; undefined: none) is the
// gradient of lse, whose derivative in the scores is the (undropped) probabilities.
std::array<Tensor, 4> reference_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const OptTensor& bias, const Spec& s, const Tensor& keep_dropout,
                                         std::array<bool, 4> want, const Tensor& dlse) {
  const Tensor q4 = as4(q, s), k4 = as4(k, s), v4 = as4(v, s);
  std::array<Tensor, 4> g;
  if (no_keys(k4) || q4.sym_numel().sym_eq(0).guard_bool(__FILE__, __LINE__)) {
    g = {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v), Tensor()};
    if (want[3] && bias) g[3] = at::zeros_like(*bias);
    return g;
  }
  const Heads h = heads_of(q4, k4, v4);
  const auto acc = h.q.scalar_type();
  const Tensor p = scores_and_probs(h, bias, keep_mask(q4, k4, s), s, nullptr, nullptr).second;
  const Tensor dout4 = as4(dout, s).transpose(1, 2).to(acc);  // [B, Hq, Nq, D]
  Tensor p_dropped = p, dp = at::matmul(dout4, h.v.transpose(-1, -2));
  if (s.dropout_p > 0) {
    const Tensor z = keep_dropout.to(acc) * (1.0 / (1.0 - s.dropout_p));
    p_dropped = p * z;
    dp = dp * z;
  }
  Tensor dsum = (p * dp).sum(-1, /*keepdim=*/true);
  if (dlse.defined()) dsum = dsum - (s.varlen() ? dlse.unsqueeze(0) : dlse).unsqueeze(-1).to(acc);
  const Tensor ds = p * (dp - dsum);  // d(scale * q.k + bias)
  const c10::SymInt hkv = k4.sym_size(2);
  const auto back = [&](const Tensor& t, const Tensor& like) {  // [B, H, N, D] -> like's layout and dtype
    Tensor r = t.transpose(1, 2).to(like.scalar_type());
    return s.varlen() ? r.squeeze(0) : r;
  };
  g[0] = back(at::matmul(ds, h.k) * s.scale, q);
  g[1] = back(reduce_heads(at::matmul(ds.transpose(-1, -2), h.q) * s.scale, hkv), k);
  g[2] = back(reduce_heads(at::matmul(p_dropped.transpose(-1, -2), dout4), hkv), v);
  if (want[3] && bias) g[3] = at::sum_to(ds, bias->sym_sizes()).to(bias->scalar_type());
  return g;
}

std::vector<c10::SymInt> dropout_shape(const Tensor& q, const Tensor& k, const Spec& s) {
  const Tensor q4 = as4(q, s), k4 = as4(k, s);
  return {q4.sym_size(0), q4.sym_size(2), q4.sym_size(1), k4.sym_size(1)};
}

// ------------------------------------------------------------------------------------------------
// Public ops: checks and routing
// ------------------------------------------------------------------------------------------------

// Where q, k and v hold their rows and heads: attention's [B, N, H, D], SDPA's [B, H, N, D] (heads_first),
// varlen's [total, H, D].
struct Layout {
  int64_t dims, row, head;
  bool heads_first() const { return head < row; }
};
constexpr Layout kRowsFirst{4, 1, 2}, kHeadsFirst{4, 2, 1}, kVarlen{3, 0, 1};

// Validates q, k, v as torch's attention would, with messages that name them. Sizes compare symbolically
// (torch.compile with dynamic shapes).
void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Layout& layout) {
  const int64_t dims = layout.dims;
  const char* names = layout.heads_first() ? "[batch, heads, seqlen, head_dim]"
                      : dims == 4          ? "[batch, seqlen, heads, head_dim]"
                                           : "[total, heads, head_dim]";
  for (const auto& [name, t] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}}) {
    TORCH_CHECK(t->dim() == dims, op, ": ", name, " must be ", names, " (", num(dims), "-D), got ", shape(*t));
  }
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op,
              ": q must be a floating-point tensor (float16 or bfloat16 for the fused kernel), got ",
              name_of(q.scalar_type()));
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have the same dtype, got ", name_of(q.scalar_type()), ", ", name_of(k.scalar_type()),
              " and ", name_of(v.scalar_type()));
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k and v must be on one device, got ",
              q.device().str(), ", ", k.device().str(), " and ", v.device().str());
  const int64_t row = layout.row, head = layout.head;
  bool ok = sym_same(k.sym_size(row), v.sym_size(row)) && sym_same(k.sym_size(head), v.sym_size(head));
  if (dims == 4) ok = ok && sym_same(k.sym_size(0), q.sym_size(0)) && sym_same(v.sym_size(0), q.sym_size(0));
  TORCH_CHECK(ok, op, ": k and v must have the same batch, length and heads", dims == 4 ? " (and q's batch)" : "",
              ", got q ", shape(q), ", k ", shape(k), ", v ", shape(v));
  TORCH_CHECK(sym_same(q.sym_size(-1), k.sym_size(-1)) && sym_same(q.sym_size(-1), v.sym_size(-1)), op,
              ": q, k and v must have the same head_dim, got ", shape(q), ", ", shape(k), ", ", shape(v));
  const c10::SymInt hq = q.sym_size(head), hkv = k.sym_size(head);
  const bool no_heads = hq.sym_eq(0).guard_bool(__FILE__, __LINE__) && hkv.sym_eq(0).guard_bool(__FILE__, __LINE__);
  TORCH_CHECK(no_heads || (hkv.sym_gt(0).guard_bool(__FILE__, __LINE__) && (hq % hkv).sym_eq(0).guard_bool(__FILE__, __LINE__)), op,
              ": the heads of q (", shape(c10::SymIntArrayRef(&hq, 1)),
              ") must be a multiple of the heads of k and v (", shape(c10::SymIntArrayRef(&hkv, 1)), ")");
}

void check_options(const char* op, double dropout_p, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ",
              py_repr(dropout_p));
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window sizes must be >= 0, or -1 for unbounded, got (",
              num(window_left), ", ", num(window_right), ")");
}

// attn_bias broadcastable to [B, Hq, Nq, Nk], bool or floating, on q's device.
void check_bias(const char* op, const Tensor& bias, const Tensor& q, const Tensor& k, const Layout& layout) {
  TORCH_CHECK(bias.device() == q.device(), op, ": attn_bias is on ", bias.device().str(), " but q is on ",
              q.device().str());
  TORCH_CHECK(bias.scalar_type() == at::kBool || at::isFloatingType(bias.scalar_type()), op,
              ": attn_bias must be bool or floating-point, got ", name_of(bias.scalar_type()));
  const std::array<c10::SymInt, 4> full = {q.sym_size(0), q.sym_size(layout.head), q.sym_size(layout.row),
                                           k.sym_size(layout.row)};
  bool ok = bias.dim() <= 4;
  for (int64_t d = 1; ok && d <= bias.dim(); ++d) {
    const c10::SymInt& size = bias.sym_size(-d);
    ok = sym_same(size, 1) || sym_same(size, full[4 - d]);
  }
  TORCH_CHECK(ok, op, ": attn_bias must be broadcastable to [batch, heads_q, seqlen_q, seqlen_k] = ",
              shape(c10::SymIntArrayRef(full.data(), 4)), ", got ", shape(bias));
}

// Bool masks become additive biases in q's dtype (0 / -inf, as torch's SDPA converts them), other dtypes are
// cast to q's; a last dimension that is broadcast or strided is materialized (the kernel reads it contiguous).
OptTensor prepare_bias(const OptTensor& bias, const Tensor& q, const Tensor& k, const Layout& layout) {
  if (!bias) return std::nullopt;
  Tensor b = *bias;
  if (b.scalar_type() == at::kBool) {
    b = at::where(b.logical_not(), c10::Scalar(-kInf), at::scalar_tensor(0.0, q.options().device(at::kCPU)));
  } else if (b.scalar_type() != q.scalar_type()) {
    b = b.to(q.scalar_type());
  }
  if (b.dim() == 0) b = b.unsqueeze(0);
  const c10::SymInt nk = k.sym_size(layout.row);
  const bool full_last = sym_same(b.sym_size(-1), nk);
  if (!full_last || !(b.sym_stride(-1) == 1 || sym_same(nk, 1))) {
    std::vector<c10::SymInt> sizes(b.sym_sizes().begin(), b.sym_sizes().end());
    sizes.back() = nk;
    b = b.expand_symint(sizes).contiguous();
  }
  return b;
}

// q / k / v as the kernel reads them: head_dim contiguous, every other stride (of a dimension longer than 1)
// and the storage offset a multiple of 16 bytes; else a contiguous copy. (The CUDA kernel also checks the
// pointer.)
// Symbolic sizes (torch.compile) compare symbolically: a stride like 64 * s0 is a multiple of 8 with no guard.
Tensor kernel_layout(const Tensor& t) {
  const int64_t align = 16 / static_cast<int64_t>(t.element_size());
  const auto multiple = [&](const c10::SymInt& v) { return (v % align).sym_eq(0).guard_bool(__FILE__, __LINE__); };
  bool ok = t.sym_stride(-1) == 1 && multiple(t.sym_storage_offset());
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) {
    ok = t.sym_size(d).sym_le(1).guard_bool(__FILE__, __LINE__) || multiple(t.sym_stride(d));
  }
  return ok ? t : t.contiguous();
}

// Why a call runs the reference instead of the kernel, or nullptr; "" for a silent reason. CPU tensors take
// the op (whose CPU kernel is the reference); other devices (meta, ...) take the reference silently.
const char* fallback_reason(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& bias) {
  const bool tangents = has_forward_grad(q) || has_forward_grad(k) || has_forward_grad(v) || has_forward_grad(bias);
  if (!q.is_cuda()) return q.is_cpu() && !tangents ? nullptr : "";
  if (tangents) return "forward-mode AD (an input with a tangent) has no fused kernel";
  switch (q.scalar_type()) {
    case at::kHalf:
    case at::kBFloat16: break;
    case at::kFloat: return "float32 inputs have no fused kernel (float16, bfloat16)";
    case at::kDouble: return "float64 inputs have no fused kernel (float16, bfloat16)";
    default: return "this dtype has no fused kernel (float16, bfloat16)";
  }
  // (a symbolic head_dim, under torch.compile, is specialized: each has its own kernel)
  const int64_t d = q.sym_size(-1).guard_int(__FILE__, __LINE__);
  if (d > 256 || !has_head_dim(static_cast<int>(d))) return "this head_dim has no fused kernel (32, 64, 96, 128, 256)";
  if (compute_capability(q.get_device()) < 80) return "GPUs before compute capability 8.0 have no fused kernel";
  return nullptr;
}

// One warning per (op, reason): the reference runs instead.
void warn_fallback(const char* op, const char* reason) {
  fusedkernels::warn_fallback(op, reason, "the PyTorch reference (fp32 math)");
}

double default_scale(const Tensor& q, std::optional<double> scale) {
  if (scale) return *scale;
  return 1.0 / std::sqrt(static_cast<double>(q.sym_size(-1).guard_int(__FILE__, __LINE__)));
}

// The reference with autograd (differentiable ATen ops), dropout drawn from the device's default generator.
std::tuple<Tensor, Tensor> reference_op(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& bias,
                                        const Spec& s, bool return_lse) {
  Tensor keep;
  if (s.dropout_p > 0) {
    keep = at::rand_symint(dropout_shape(q, k, s), std::optional<at::Generator>(), q.options().dtype(at::kFloat))
               .ge(s.dropout_p);
  }
  auto [out, lse] = reference_forward(q, k, v, bias, s, keep);
  return {out, return_lse ? lse : at::empty({0}, lse.options())};
}

// attention's checks and routing, for q, k, v in attention's layout or SDPA's (heads first): out in q's shape,
// and lse.
std::tuple<Tensor, Tensor> attention_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const OptTensor& attn_bias, double dropout_p, bool causal,
                                          int64_t window_left, int64_t window_right, std::optional<double> scale,
                                          bool deterministic, const Layout& layout) {
  // (fusedkernels.ops.attention hands nested tensors to torch's SDPA before they get here)
  TORCH_CHECK(!q.is_nested() && !k.is_nested() && !v.is_nested(), "attention: nested tensors are not supported here; ",
              "use fusedkernels.ops.attention (which runs torch.nn.functional.scaled_dot_product_attention on them) ",
              "or attention_varlen");
  check_qkv("attention", q, k, v, layout);
  check_options("attention", dropout_p, window_left, window_right);
  if (attn_bias) check_bias("attention", *attn_bias, q, k, layout);
  if (dropout_p == 1.0) {  // every probability dropped: zeros (and zero grads), as torch's dropout(p=1)
    auto [out, lse] =
        attention_impl(q, k, v, attn_bias, 0.0, causal, window_left, window_right, scale, deterministic, layout);
    return {out * 0, lse};
  }
  const c10::SymInt nq = q.sym_size(layout.row);
  if (q.sym_size(layout.head).sym_eq(0).guard_bool(__FILE__, __LINE__)) {  // no heads: empty results, as torch's SDPA
    // (k and v joined to the graph too, so their gradients are empty tensors, as torch's, rather than None)
    return {q.contiguous() * 0 + (k.sum() + v.sum()) * 0,
            at::empty_symint({q.sym_size(0), 0, nq}, q.options().dtype(at::kFloat))};
  }
  const OptTensor bias = prepare_bias(attn_bias, q, k, layout);
  Spec s{default_scale(q, scale), causal, window_left, window_right, dropout_p};
  const bool heads_first = layout.heads_first();
  if (const char* why = fallback_reason(q, k, v, bias)) {
    warn_fallback("attention", why);
    auto [out, lse] = reference_op(rows_first(q, heads_first), rows_first(k, heads_first), rows_first(v, heads_first),
                                   bias, s, true);
    return {rows_first(out, heads_first), lse};
  }
  auto [out, lse, rng_state] = attention_fwd_op().call(
      kernel_layout(q), kernel_layout(k), kernel_layout(v), bias, std::nullopt, std::nullopt, nq,
      k.sym_size(layout.row), dropout_p, s.scale, causal, window_left, window_right, deterministic, std::nullopt,
      heads_first);
  return {out, lse};
}

std::tuple<Tensor, Tensor> attention_composite(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const OptTensor& attn_bias, double dropout_p, bool causal,
                                               int64_t window_left, int64_t window_right, std::optional<double> scale,
                                               bool return_lse, bool deterministic) {
  auto [out, lse] = attention_impl(q, k, v, attn_bias, dropout_p, causal, window_left, window_right, scale,
                                   deterministic, kRowsFirst);
  return {out, return_lse ? lse : at::empty({0}, lse.options())};
}

void check_cu_seqlens(const char* op, const Tensor& cu_q, const Tensor& cu_k, const Tensor& q,
                      const c10::SymInt& max_q, const c10::SymInt& max_k) {
  for (const auto& [name, t] : {std::pair{"cu_seqlens_q", &cu_q}, std::pair{"cu_seqlens_k", &cu_k}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1, op, ": ", name, " must be int32 [batch + 1], got ",
                name_of(t->scalar_type()), " ", shape(*t));
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device().str(), " but q is on ",
                q.device().str());
  }
  TORCH_CHECK(sym_same(cu_q.sym_size(0), cu_k.sym_size(0)) && cu_q.sym_size(0).sym_ge(1).guard_bool(__FILE__, __LINE__),
              op, ": cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 1 elements, got ", shape(cu_q), " and ",
              shape(cu_k));
  TORCH_CHECK(max_q.sym_ge(0).guard_bool(__FILE__, __LINE__) && max_k.sym_ge(0).guard_bool(__FILE__, __LINE__), op,
              ": max_seqlen_q and max_seqlen_k must be >= 0");
}

std::tuple<Tensor, Tensor> attention_varlen_composite(const Tensor& q, const Tensor& k, const Tensor& v,
                                                      const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                      c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k,
                                                      double dropout_p, bool causal, int64_t window_left,
                                                      int64_t window_right, std::optional<double> scale,
                                                      bool return_lse, bool deterministic) {
  check_qkv("attention_varlen", q, k, v, kVarlen);
  check_options("attention_varlen", dropout_p, window_left, window_right);
  check_cu_seqlens("attention_varlen", cu_seqlens_q, cu_seqlens_k, q, max_seqlen_q, max_seqlen_k);
  if (dropout_p == 1.0) {  // every probability dropped: zeros (and zero grads), as torch's dropout(p=1)
    auto [out, lse] = attention_varlen_composite(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
                                                 causal, window_left, window_right, scale, return_lse, deterministic);
    return {out * 0, lse};
  }
  TORCH_CHECK(q.sym_size(1).sym_gt(0).guard_bool(__FILE__, __LINE__), "attention_varlen: q, k and v need heads");
  const Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  Spec s{default_scale(q, scale), causal, window_left, window_right, dropout_p, cu_q, cu_k};
  TORCH_CHECK(!q.is_nested() && !k.is_nested() && !v.is_nested(),
              "attention_varlen: takes packed tensors and cu_seqlens, not nested tensors");
  if (const char* why = fallback_reason(q, k, v, std::nullopt)) {
    warn_fallback("attention_varlen", why);
    return reference_op(q, k, v, std::nullopt, s, return_lse);
  }
  auto [out, lse, rng_state] = attention_fwd_op().call(
      kernel_layout(q), kernel_layout(k), kernel_layout(v), std::nullopt, cu_q, cu_k, std::move(max_seqlen_q),
      std::move(max_seqlen_k), dropout_p, s.scale, causal, window_left, window_right, deterministic, std::nullopt,
      false);
  return {out, return_lse ? lse : at::empty({0}, lse.options())};
}

// torch's SDPA on [B, H, N, D]: `attention` on the tensors as they are (heads_first: no views, so autograd records
// one node, as for torch's op), the result [B, H, N, D] over [B, N, H, D] memory (as torch's flash backend returns
// it). What attention does not take goes to torch's op, which computes it or raises torch's error: other ranks, a
// batch or head dim that differs, heads that differ without enable_gqa, a mask with is_causal or of fewer than 2
// dimensions, dropout_p outside [0, 1], mask dtypes torch may refuse.
Tensor sdpa_composite(const Tensor& query, const Tensor& key, const Tensor& value, const OptTensor& attn_mask,
                      double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa) {
  const auto same = [](const c10::SymInt& a, const c10::SymInt& b) { return sym_same(a, b); };
  const bool takes =
      query.dim() == 4 && key.dim() == 4 && value.dim() == 4 && !query.is_nested() && !key.is_nested() &&
      !value.is_nested() && same(query.sym_size(0), key.sym_size(0)) && same(query.sym_size(3), key.sym_size(3)) &&
      same(query.sym_size(3), value.sym_size(3)) && (enable_gqa || same(query.sym_size(1), key.sym_size(1))) &&
      dropout_p >= 0.0 && dropout_p <= 1.0 &&
      (!attn_mask || (!is_causal && attn_mask->dim() >= 2 &&
                      (attn_mask->scalar_type() == at::kBool || attn_mask->scalar_type() == at::kFloat ||
                       attn_mask->scalar_type() == query.scalar_type())));
  if (!takes) {
    return at::scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa);
  }
  return std::get<0>(attention_impl(query, key, value, attn_mask, dropout_p, is_causal, -1, -1, scale, false,
                                    kHeadsFirst));
}

// Autocast: what autocast does to aten::scaled_dot_product_attention, on its lower-precision list for CUDA and
// for CPU: cast floating q, k, v and a floating bias to the device's autocast dtype (float64 stays).
template <c10::DeviceType kDevice>
struct Autocast {
  template <typename T>
  static auto cast(const T& t) {
    return autocast_lower<kDevice>(t);
  }

  static std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const OptTensor& attn_bias, double dropout_p, bool causal,
                                              int64_t window_left, int64_t window_right, std::optional<double> scale,
                                              bool return_lse, bool deterministic) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>);
    return attention_composite(cast(q), cast(k), cast(v), cast(attn_bias), dropout_p, causal, window_left,
                               window_right, scale, return_lse, deterministic);
  }

  static Tensor sdpa(const Tensor& query, const Tensor& key, const Tensor& value, const OptTensor& attn_mask,
                     double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>);
    return sdpa_composite(cast(query), cast(key), cast(value), cast(attn_mask), dropout_p, is_causal, scale,
                          enable_gqa);
  }

  static std::tuple<Tensor, Tensor> attention_varlen(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                     c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k,
                                                     double dropout_p, bool causal, int64_t window_left,
                                                     int64_t window_right, std::optional<double> scale,
                                                     bool return_lse, bool deterministic) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>);
    return attention_varlen_composite(cast(q), cast(k), cast(v), cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
                                      std::move(max_seqlen_k), dropout_p, causal, window_left, window_right, scale,
                                      return_lse, deterministic);
  }
};

// ------------------------------------------------------------------------------------------------
// Autograd
// ------------------------------------------------------------------------------------------------

// The backward of attention_fwd; next edges q, k, v, attn_bias (an absent bias has an empty edge).
struct AttentionBackward : torch::autograd::Node {
  torch::autograd::SavedVariable q, k, v, bias, cu_q, cu_k, out, lse, rng_state;
  c10::SymInt max_q, max_k;
  double dropout_p = 0, scale = 1;
  bool causal = false, deterministic = false, heads_first = false;
  int64_t window_left = -1, window_right = -1;

  std::string name() const override { return "fusedkernels::AttentionBackward"; }

  void release_variables() override {
    for (auto* s : {&q, &k, &v, &bias, &cu_q, &cu_k, &out, &lse, &rng_state}) s->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list result(num_outputs());
    if (!grads[0].defined() && !grads[1].defined()) return result;
    // a loss of lse alone hands no dout: a zero one
    const Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out.unpack(getptr()));
    // dlse like lse (a loss's sum hands an expanded one); 0 on rows that see no key (lse -inf), whose gradients are
    // 0 whatever reaches them (a merge's logaddexp hands them NaN, which P's zeros would spread to every key)
    Tensor dlse;
    if (grads[1].defined()) {
      const Tensor saved_lse = lse.unpack(getptr());
      dlse = at::where(saved_lse.isneginf(), c10::Scalar(0.0), grads[1].to(at::kFloat)).contiguous();
    }
    const Tensor q_ = q.unpack(), k_ = k.unpack(), v_ = v.unpack(), b = bias.unpack();
    const OptTensor cq = optional_of(cu_q.unpack()), ck = optional_of(cu_k.unpack());
    const std::array<bool, 4> want = {task_should_compute_output(0), task_should_compute_output(1),
                                      task_should_compute_output(2), b.defined() && task_should_compute_output(3)};
    std::array<Tensor, 4> g;
    if (at::GradMode::is_enabled()) {  // create_graph: the backward is itself being differentiated
      TORCH_CHECK(dropout_p == 0.0, "fusedkernels.attention: the backward with dropout_p > 0 cannot be differentiated ",
                  "(create_graph=True); use dropout_p=0 for double backward");
      Spec s{scale, causal, window_left, window_right, 0.0, cq, ck};
      g = reference_backward(rows_first(dout, heads_first), rows_first(q_, heads_first), rows_first(k_, heads_first),
                             rows_first(v_, heads_first), optional_of(b), s, Tensor(), want, dlse);
      for (int i = 0; i < 3; ++i) g[i] = rows_first(g[i], heads_first);
    } else {
      // Below autograd, as the forward: nothing is recorded without grad mode, and the raw op's autograd kernel
      // (the boxed not-implemented fallback) would only box and unbox its 20 arguments.
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = std::apply([](auto&&... t) { return std::array<Tensor, 4>{t...}; },
                     attention_bwd_op().call(kernel_layout(dout), q_, k_, v_, out.unpack(getptr()),
                                             lse.unpack(getptr()), optional_of(b), cq, ck, max_q, max_k,
                                             dropout_p, scale, causal, window_left, window_right,
                                             rng_state.unpack(getptr()), deterministic, want, heads_first,
                                             optional_of(dlse)));
    }
    for (size_t i = 0; i < result.size(); ++i) {
      if (want[i]) result[i] = g[i];
    }
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          const OptTensor& bias, const OptTensor& cu_q,
                                                          const OptTensor& cu_k, c10::SymInt max_q, c10::SymInt max_k,
                                                          double dropout_p, double scale, bool causal,
                                                          int64_t window_left, int64_t window_right,
                                                          bool deterministic, std::optional<at::Generator> generator,
                                                          bool heads_first) {
  const bool tangents = has_forward_grad(q) || has_forward_grad(k) || has_forward_grad(v) || has_forward_grad(bias);
  const bool grad = at::GradMode::is_enabled() &&
                    (requires_grad(q) || requires_grad(k) || requires_grad(v) || requires_grad(bias));
  auto results = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return attention_fwd_op().call(q, k, v, bias, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, window_left,
                                   window_right, deterministic, generator, heads_first);
  }();
  if (tangents) {
    // Tangents reach here where the public op could not see them (torch.func transforms nest forward-mode AD
    // inside other levels): the output from the differentiable reference, lse and rng_state from the op.
    TORCH_CHECK(dropout_p == 0.0, "fusedkernels.attention: forward-mode AD with dropout_p > 0 is not supported");
    Spec s{scale, causal, window_left, window_right, 0.0, cu_q, cu_k};
    const Tensor out = reference_forward(rows_first(q, heads_first), rows_first(k, heads_first),
                                         rows_first(v, heads_first), bias, s, Tensor())
                           .first;
    return {rows_first(out, heads_first), std::get<1>(results), std::get<2>(results)};
  }
  if (grad) {
    auto node = make_node<AttentionBackward>();
    auto& n = static_cast<AttentionBackward&>(*node);
    n.set_next_edges(torch::autograd::collect_next_edges(q, k, v, bias));
    torch::autograd::set_history(std::get<0>(results), node);  // output 0
    torch::autograd::set_history(std::get<1>(results), node);  // output 1: lse
    n.q = torch::autograd::SavedVariable(q, false);
    n.k = torch::autograd::SavedVariable(k, false);
    n.v = torch::autograd::SavedVariable(v, false);
    if (bias) n.bias = torch::autograd::SavedVariable(*bias, false);
    if (cu_q) n.cu_q = torch::autograd::SavedVariable(*cu_q, false);
    if (cu_k) n.cu_k = torch::autograd::SavedVariable(*cu_k, false);
    n.out = torch::autograd::SavedVariable(std::get<0>(results), true);
    n.lse = torch::autograd::SavedVariable(std::get<1>(results), true);
    n.rng_state = torch::autograd::SavedVariable(std::get<2>(results), true);
    n.max_q = std::move(max_q);
    n.max_k = std::move(max_k);
    n.dropout_p = dropout_p;
    n.scale = scale;
    n.causal = causal;
    n.window_left = window_left;
    n.window_right = window_right;
    n.deterministic = deterministic;
    n.heads_first = heads_first;
  }
  return results;
}

// ------------------------------------------------------------------------------------------------
// CPU kernels: the reference
// ------------------------------------------------------------------------------------------------

void check_internal_args(const char* op, const OptTensor& bias, const Tensor& q, bool heads_first) {
  TORCH_CHECK_VALUE(!bias || at::isFloatingType(bias->scalar_type()), op,
                    ": attn_bias must be floating-point (the public ops turn bool masks into additive biases)");
  TORCH_CHECK_VALUE(!bias || q.dim() == 4, op, ": attn_bias is not supported with varlen");
  TORCH_CHECK_VALUE(!heads_first || q.dim() == 4, op, ": heads_first is not supported with varlen");
}

// Varlen's contract, checked where reading cu_seqlens costs nothing (the CUDA kernel relies on it and could
// only check it with a device-to-host copy): starts at 0, non-decreasing, within the packed rows, no sequence
// longer than max_seqlen.
void check_cu_seqlens_values(const char* name, const Tensor& cu, int64_t rows, int64_t max_seqlen) {
  const auto c = cu.accessor<int, 1>();
  TORCH_CHECK_VALUE(c[0] == 0, "attention_varlen: ", name, " must start at 0, got ", num(c[0]));
  for (int64_t b = 0; b + 1 < c.size(0); ++b) {
    const int64_t length = int64_t(c[b + 1]) - c[b];
    TORCH_CHECK_VALUE(length >= 0, "attention_varlen: ", name, " must be non-decreasing, got ", num(c[b]), " then ",
                      num(c[b + 1]));
    TORCH_CHECK_VALUE(length <= max_seqlen, "attention_varlen: sequence ", num(b), " has ", num(length),
                      " rows, more than max_seqlen (", num(max_seqlen), ") for ", name);
  }
  TORCH_CHECK_VALUE(c[c.size(0) - 1] <= rows, "attention_varlen: ", name, " ends at ", num(c[c.size(0) - 1]),
                    " but the packed tensor has ", num(rows), " rows");
}

std::tuple<Tensor, Tensor, Tensor> attention_fwd_cpu(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                     const OptTensor& bias, const OptTensor& cu_q,
                                                     const OptTensor& cu_k, c10::SymInt max_q, c10::SymInt max_k,
                                                     double dropout_p, double scale, bool causal, int64_t window_left,
                                                     int64_t window_right, bool,
                                                     std::optional<at::Generator> generator, bool heads_first) {
  check_internal_args("attention_fwd", bias, q_, heads_first);
  const Tensor q = rows_first(q_, heads_first), k = rows_first(k_, heads_first), v = rows_first(v_, heads_first);
  if (cu_q && cu_k) {
    check_cu_seqlens_values("cu_seqlens_q", cu_q->contiguous(), q.size(0), max_q.expect_int());
    check_cu_seqlens_values("cu_seqlens_k", cu_k->contiguous(), k.size(0), max_k.expect_int());
  }
  Spec s{scale, causal, window_left, window_right, dropout_p, cu_q, cu_k};
  Tensor rng_state = at::empty({dropout_p > 0 ? 2 : 0}, q.options().dtype(at::kLong));
  Tensor keep;
  if (dropout_p > 0) {
    const int64_t seed = cpu_dropout_seed(generator);  // the mask is regenerated from it by the backward
    rng_state.data_ptr<int64_t>()[0] = seed;
    rng_state.data_ptr<int64_t>()[1] = 0;
    keep = cpu_dropout_keep(seed, dropout_shape(q, k, s), dropout_p);
  }
  auto [out, lse] = reference_forward(q, k, v, bias, s, keep);
  return {rows_first(out.contiguous(), heads_first), lse.contiguous(), rng_state};
}

// Grads in the layout empty_like gives (the meta kernel's): the inputs' strides where dense.
Tensor like(const Tensor& input, const Tensor& value) { return at::empty_like(input).copy_(value); }

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd_cpu(
    const Tensor& dout, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor&, const Tensor&,
    const OptTensor& bias, const OptTensor& cu_q, const OptTensor& cu_k, c10::SymInt, c10::SymInt, double dropout_p,
    double scale, bool causal, int64_t window_left, int64_t window_right, const Tensor& rng_state, bool,
    std::array<bool, 4> output_mask, bool heads_first, const OptTensor& dlse) {
  check_internal_args("attention_bwd", bias, q_, heads_first);
  const Tensor q = rows_first(q_, heads_first), k = rows_first(k_, heads_first), v = rows_first(v_, heads_first);
  Spec s{scale, causal, window_left, window_right, dropout_p, cu_q, cu_k};
  Tensor keep;
  if (dropout_p > 0) {
    TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong,
                      "attention_bwd: rng_state must be the forward's int64 [2] when dropout_p > 0");
    keep = cpu_dropout_keep(rng_state.data_ptr<int64_t>()[0], dropout_shape(q, k, s), dropout_p);
  }
  const bool want_bias = output_mask[3] && bias.has_value();
  auto g = reference_backward(rows_first(dout, heads_first), q, k, v, bias, s, keep, {true, true, true, want_bias},
                              dlse ? *dlse : Tensor());
  return {like(q_, rows_first(g[0], heads_first)), like(k_, rows_first(g[1], heads_first)),
          like(v_, rows_first(g[2], heads_first)),
          want_bias ? g[3].contiguous() : at::empty({0}, q.options())};
}

// ------------------------------------------------------------------------------------------------
// Meta kernels: shapes and dtypes only (fake tensors, torch.compile, torch.export)
// ------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> attention_fwd_meta(const Tensor& q, const Tensor&, const Tensor&,
                                                      const OptTensor& bias, const OptTensor& cu_q, const OptTensor&,
                                                      c10::SymInt, c10::SymInt, double dropout_p, double, bool,
                                                      int64_t, int64_t, bool, std::optional<at::Generator>,
                                                      bool heads_first) {
  check_internal_args("attention_fwd", bias, q, heads_first);
  const auto f32 = q.options().dtype(at::kFloat);
  const Tensor q_rows = rows_first(q, heads_first);  // [B, N, H, D]: the layout of out's memory
  Tensor lse = cu_q ? at::empty_symint({q.sym_size(1), q.sym_size(0)}, f32)
                    : at::empty_symint({q_rows.sym_size(0), q_rows.sym_size(2), q_rows.sym_size(1)}, f32);
  return {rows_first(at::empty_symint(q_rows.sym_sizes(), q.options()), heads_first), lse,
          at::empty({dropout_p > 0 ? 2 : 0}, q.options().dtype(at::kLong))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd_meta(
    const Tensor&, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor&, const Tensor&,
    const OptTensor& bias, const OptTensor&, const OptTensor&, c10::SymInt, c10::SymInt, double, double, bool, int64_t,
    int64_t, const Tensor&, bool, std::array<bool, 4> output_mask, bool heads_first, const OptTensor&) {
  check_internal_args("attention_bwd", bias, q, heads_first);
  const bool want_bias = output_mask[3] && bias.has_value();
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v),
          want_bias ? at::empty_symint(bias->sym_sizes(), bias->options()) : at::empty({0}, q.options())};
}

const RegisterOpInfo attention_info{
    {"attention", "attention", "float16, bfloat16 (q, k, v and a float attn_bias alike)",
     "head_dim 32, 64, 96, 128, 256; any lengths; GQA / MQA, causal, sliding window, bias, dropout; sm_80+ "
     "(sm_90: wgmma kernels for head_dim 64 and 128 without dropout)"}};
const RegisterOpInfo attention_varlen_info{
    {"attention", "attention_varlen", "float16, bfloat16",
     "head_dim 32, 64, 96, 128, 256; packed sequences (cu_seqlens int32); no attn_bias; sm_80+ (sm_90: wgmma "
     "kernels for head_dim 64 and 128 without dropout)"}};

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CompositeImplicitAutograd, m) {
  m.impl("scaled_dot_product_attention", &sdpa_composite);
  m.impl("attention", &attention_composite);
  m.impl("attention_varlen", &attention_varlen_composite);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCUDA, m) {
  m.impl("scaled_dot_product_attention", &Autocast<c10::DeviceType::CUDA>::sdpa);
  m.impl("attention", &Autocast<c10::DeviceType::CUDA>::attention);
  m.impl("attention_varlen", &Autocast<c10::DeviceType::CUDA>::attention_varlen);
}

TORCH_LIBRARY_IMPL(fusedkernels, AutocastCPU, m) {
  m.impl("scaled_dot_product_attention", &Autocast<c10::DeviceType::CPU>::sdpa);
  m.impl("attention", &Autocast<c10::DeviceType::CPU>::attention);
  m.impl("attention_varlen", &Autocast<c10::DeviceType::CPU>::attention_varlen);
}

TORCH_LIBRARY_IMPL(fusedkernels, Autograd, m) {
  m.impl("attention_fwd", &attention_fwd_autograd);
  // Differentiating the backward op itself is an error (the forward's backward handles create_graph).
  m.impl("attention_bwd", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(fusedkernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) {
  m.impl("attention_fwd", &attention_fwd_meta);
  m.impl("attention_bwd", &attention_bwd_meta);
}

}  // namespace fusedkernels::attention
