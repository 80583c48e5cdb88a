"""Runs every native kernel path once on small shapes, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/sanitize_kernels.py --fp32-optim

--fp32-optim: the optimizers with fp32 params only, and attention in bf16 only (their shared-memory code
does not depend on the dtype; racecheck is slow).
"""

import os
import sys

import torch

import fusedkernels.ops as ops
from fusedkernels import _native

assert _native.loaded, _native.error
torch.manual_seed(0)
# SANITIZE_FAMILIES=gemm,attention: run those families only (default: all).
FAMILIES = os.environ.get("SANITIZE_FAMILIES", "norm,optim,attention,gemm,conv,llm").split(",")

if "norm" in FAMILIES:
    # hidden sizes: general path (odd), each register-path thread-group size (and full-row instances: 256, 384,
    # 768, 1024, 2048, 4096 in 16-bit types), the backward's general path.
    HIDDEN = [1, 7, 64, 256, 384, 768, 1024, 2048, 4096, 8192, 12288, 16384, 32768, 65536]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for hidden in HIDDEN:
            rows = 3 if hidden > 4096 else 37
            for param_dtype in {dtype, torch.float32}:
                x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
                w = torch.rand(hidden, device="cuda", dtype=param_dtype, requires_grad=True)
                b = torch.randn(hidden, device="cuda", dtype=param_dtype, requires_grad=True)
                for y in (ops.layer_norm(x, (hidden,), w, b), ops.rms_norm(x, (hidden,), w)):
                    torch.autograd.grad(y, [x, w], torch.randn_like(y))
                # add + norm: both residual dtypes, dropout, the dropout bias's grad, a missing grad of out
                for residual_dtype in {dtype, torch.float32}:
                    r = torch.randn(rows, hidden, device="cuda", dtype=residual_dtype, requires_grad=True)
                    xb = torch.randn(hidden, device="cuda", dtype=dtype, requires_grad=True)
                    out, h = ops.bias_dropout_add_layer_norm(x, xb, r, w, b, 0.1, residual_dtype=residual_dtype)
                    torch.autograd.grad([out, h], [x, r, xb, w, b], [torch.randn_like(out), torch.randn_like(h)])
                    out, h = ops.add_rms_norm(x, r, w, residual_dtype=residual_dtype)
                    torch.autograd.grad(h, [x, r], torch.randn_like(h))
                    out, h = ops.add_layer_norm(x, r, w, b, residual_dtype=residual_dtype)
                    torch.autograd.grad(out, [x, r, w, b], torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitize_kernels: ran all norm paths")

if "optim" in FAMILIES:
    # optim: odd sizes, one past a chunk, master weights, bf16 states, amsgrad, AMP, clipping, > 384 tensors.
    from fusedkernels.optim import FusedAdamW, FusedLAMB, FusedSGD, clip_grad_norm_  # noqa: E402

    shapes = [(1,), (7,), (16385,), (33, 65)] + [(i % 5 + 1,) for i in range(400)]
    dtypes = (torch.float32,) if "--fp32-optim" in sys.argv else (torch.float32, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        for make in (
            lambda ps: FusedAdamW(ps, lr=1e-3, amsgrad=True, master_weights=True),
            lambda ps: FusedAdamW(ps, lr=1e-3, state_dtype=torch.bfloat16),
            lambda ps: FusedSGD(ps, lr=1e-2, momentum=0.9, nesterov=True, master_weights=True),
            lambda ps: FusedLAMB(ps, lr=1e-3, master_weights=True),
        ):
            params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = make(params)
            clip_grad_norm_(params, 1.0, float("inf"))
            clip_grad_norm_(params, 1.0, 2.0, defer_to=opt)
            opt.grad_scale = torch.tensor(2.0, device="cuda")
            opt.found_inf = torch.tensor(0.0, device="cuda")
            opt.step()
    torch.cuda.synchronize()
    print("sanitize_kernels: ran all optim paths")

    # The sm_90a-only kernel (TMA bulk copies, mbarrier): a tail tile and several tiles per block.
    if torch.cuda.get_device_capability() == (9, 0):
        x = torch.randn(4096 * 3 + 52, device="cuda")
        assert torch.equal(torch.ops.fusedkernels.sm90_double(x), 2 * x)
        torch.cuda.synchronize()
        print("sanitize_kernels: ran the sm90 kernel")

if "attention" in FAMILIES:
    # attention: every head dim and dtype, odd lengths, GQA, causal + window, bias with a grad, dropout, varlen,
    # both dq paths (atomic and deterministic).
    for dtype in (torch.bfloat16,) if "--fp32-optim" in sys.argv else (torch.bfloat16, torch.float16):
        for d in (32, 64, 96, 128, 256):
            q = torch.randn(2, 77, 4, d, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(2, 45, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(2, 45, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            bias = torch.randn(2, 1, 77, 45, device="cuda", dtype=dtype, requires_grad=True)
            for kwargs in (
                dict(causal=True, window=(20, -1)),
                dict(attn_bias=bias, dropout_p=0.3),
                dict(deterministic=True, causal=True),
            ):
                out = ops.attention(q, k, v, **kwargs)
                torch.autograd.grad(out, [q, k, v], torch.randn_like(out))
            cu = torch.tensor([0, 30, 31, 77], device="cuda", dtype=torch.int32)
            qp = torch.randn(77, 4, d, device="cuda", dtype=dtype, requires_grad=True)
            kp = torch.randn(77, 1, d, device="cuda", dtype=dtype, requires_grad=True)
            out = ops.attention_varlen(qp, kp, kp, cu, cu, 46, 46, causal=True)
            torch.autograd.grad(out, [qp, kp], torch.randn_like(out))
        # the Hopper kernels (head dims 64, 128): several key tiles, both warpgroups, a partial last tile, the
        # backward with the group's q heads split over CTAs (its default at this size) and not, each Hopper forward
        # at both head dims; then the same call on the portable kernels
        for d in (64, 128):
            q = torch.randn(1, 200, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(1, 300, 1, d, device="cuda", dtype=dtype, requires_grad=True)
            for setting in ({}, {"FUSEDKERNELS_ATTENTION_KV_SPLIT": "1"}, {"FUSEDKERNELS_ATTENTION_KERNEL": "sm90"},
                            {"FUSEDKERNELS_ATTENTION_KERNEL": "sm90ws"}, {"FUSEDKERNELS_ATTENTION_KERNEL": "portable"}):
                os.environ.update(setting)
                out = ops.attention(q, k, k, window=(150, 40))
                torch.autograd.grad(out, [q, k], torch.randn_like(out))
                for name in setting:
                    os.environ.pop(name)
    torch.cuda.synchronize()
    print("sanitize_kernels: ran all attention paths")

if "gemm" in FAMILIES:
    # gemm: both kernels; linear_act with every epilogue input, tails of M, N and K, and the pre-activation the
    # backward reads; linear_gated likewise; and enough tiles that each CTA of the Hopper kernel runs several,
    # so its two consumers take turns. The backward is PyTorch's GEMMs and the act_backward / gated_backward passes:
    # memcheck only (racecheck reports cuBLAS's split-K kernels; the passes share no memory but act_backward's sums).
    backward = "--fp32-optim" not in sys.argv
    for dtype in (torch.bfloat16,) if "--fp32-optim" in sys.argv else (torch.bfloat16, torch.float16):
        for kernels in ("default", "portable", "sm90-cooperative"):
            if kernels == "default":
                os.environ.pop("FUSEDKERNELS_GEMM_KERNEL", None)
            else:
                os.environ["FUSEDKERNELS_GEMM_KERNEL"] = kernels
            for rows in (77, 64 * 141 + 13):
                x = torch.randn(rows, 136, device="cuda", dtype=dtype, requires_grad=True)
                w = torch.randn(272, 136, device="cuda", dtype=dtype, requires_grad=True)
                b = torch.randn(272, device="cuda", dtype=dtype, requires_grad=True)
                r = torch.randn(rows, 272, device="cuda", dtype=dtype)
                for out in (ops.linear_act(x, w, b, "gelu", r), ops.linear_gated(x, w, b, "swiglu", r[:, :136])):
                    if backward:
                        torch.autograd.grad(out, [x, w, b], torch.randn_like(out))
                with torch.no_grad():  # the one-pass epilogues: without and with the residual they load by TMA
                    ops.linear_act(x, w, b, "gelu")
                    ops.linear_act(x, w, b, "relu", r)
                    ops.linear_gated(x, w, b, "geglu")
                    ops.linear_gated(x, w, b, "swiglu", r[:, :136])
                # the gated MLP's backward GEMM with dz in its epilogue (the weight read MN-major), out of
                # place and over z, hidden width 136 (a partial 256-column tile), K 264 (a partial k-slice)
                z = torch.randn(rows, 272, device="cuda", dtype=dtype)
                dy, wd = torch.randn(rows, 264, device="cuda", dtype=dtype), torch.randn(264, 136, device="cuda", dtype=dtype)
                torch.ops.fusedkernels.gated_dgrad(dy, wd, z, 4)
                torch.ops.fusedkernels.gated_dgrad_(dy, wd, z, 2)
                # the plain MLP's: act' and the bias gradient's column sums in the same epilogue (gelu, squared relu)
                for act in (2, 5):
                    torch.ops.fusedkernels.act_dgrad(dy, wd, z[:, :136].contiguous(), act)
        os.environ.pop("FUSEDKERNELS_GEMM_KERNEL", None)
    torch.cuda.synchronize()
    print("sanitize_kernels: ran the gemm kernels")

if "conv" in FAMILIES:
    # conv: the implicit GEMM through the im2col map with padding at every edge, a stride, an asymmetric kernel,
    # dilation, a residual, and rows and channels that end mid-tile; the backward is PyTorch's (memcheck only)
    cl = torch.channels_last
    os.environ["FUSEDKERNELS_CONV_KERNEL"] = "sm90"  # (by default cuDNN's fused convolution takes these layers)
    backward = "--fp32-optim" not in sys.argv
    for dtype in (torch.bfloat16,) if "--fp32-optim" in sys.argv else (torch.bfloat16, torch.float16):
        for (c_in, c_out, hw, k, stride, padding, dilation) in ((72, 40, (13, 11), 3, 1, 1, 1),
                                                                (16, 24, (15, 17), (1, 5), 2, (0, 2), 1),
                                                                (24, 8, (9, 10), 3, 1, 2, 2)):
            kh, kw = (k, k) if isinstance(k, int) else k
            x = torch.randn(3, c_in, *hw, device="cuda", dtype=dtype).to(memory_format=cl).requires_grad_()
            w = torch.randn(c_out, c_in, kh, kw, device="cuda", dtype=dtype).to(memory_format=cl).requires_grad_()
            b = torch.randn(c_out, device="cuda", dtype=dtype, requires_grad=True)
            shape = torch.nn.functional.conv2d(x.detach(), w.detach(), None, stride, padding, dilation).shape
            r = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=cl)
            out = ops.conv2d_bias_relu(x, w, b, stride, padding, dilation, r)
            if backward:
                torch.autograd.grad(out, [x, w, b], torch.randn_like(out))
    os.environ.pop("FUSEDKERNELS_CONV_KERNEL")
    # batch_norm_relu: vector (C a multiple of 8) and element (odd C) paths, several row blocks, training with a
    # residual and its backward, eval
    for dtype in (torch.bfloat16,) if "--fp32-optim" in sys.argv else (torch.bfloat16, torch.float32):
        for c in (64, 17):
            x = torch.randn(5, c, 23, 19, device="cuda", dtype=dtype).to(memory_format=cl).requires_grad_()
            r = torch.randn(5, c, 23, 19, device="cuda", dtype=dtype).to(memory_format=cl).requires_grad_()
            w, b = (torch.randn(c, device="cuda", requires_grad=True) for _ in range(2))
            rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
            for training in (True, False):
                out = ops.batch_norm_relu(x, rm, rv, w, b, training, 0.1, 1e-5, r)
                if backward:
                    torch.autograd.grad(out, [x, w, b, r], torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitize_kernels: ran the conv kernels (implicit GEMM, batch_norm_relu)")

if "llm" in FAMILIES:
    # llm: rotary on both paths (16-byte, element) and both pairings, in and out of place, partial rotary, GQA,
    # position_ids (one outside the table); the rotary table; the cross-entropy kernel on odd vocabularies, every mode, an ignored
    # row and a bad target.
    for dtype in (torch.bfloat16,) if "--fp32-optim" in sys.argv else (torch.bfloat16, torch.float16, torch.float32):
        for d, r in ((128, 128), (64, 32), (10, 6)):
            q = torch.randn(2, 5, 4, d, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(2, 5, 1, d, device="cuda", dtype=dtype, requires_grad=True)
            cos, sin = torch.randn(9, r, device="cuda"), torch.randn(9, r, device="cuda")
            ids = torch.tensor([[0, 3, 8, 9, 1]], device="cuda")
            for interleaved in (False, True):
                qo, ko = ops.apply_rotary(q, k, cos, sin, position_ids=ids, interleaved=interleaved, layout="bnhd")
                torch.autograd.grad([qo, ko], [q, k], [torch.randn_like(qo), torch.randn_like(ko)])
                ops.apply_rotary(q.detach().clone(), k.detach().clone(), cos[:5].to(dtype), sin[:5].to(dtype),
                                 interleaved=interleaved, layout="bnhd", inplace=True)
        for rotary_dim in (2, 6, 128):  # the rotary table: odd sizes, int32 and strided position ids
            inv = torch.rand(rotary_dim // 2, device="cuda")
            ops.rotary_cos_sin(torch.randint(0, 5000, (3, 37), device="cuda").int(), inv, dtype=dtype)
            ops.rotary_cos_sin(torch.randint(0, 5000, (37, 3), device="cuda").t(), inv, attention_scaling=0.5)
        for vocab in (1, 7, 1001, 32003):
            h = torch.randn(37, 64, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(vocab, 64, device="cuda", dtype=dtype, requires_grad=True)
            t = torch.randint(0, vocab, (37,), device="cuda")
            t[3], t[5] = -100, vocab  # an ignored row, a bad target (its row is NaN)
            for reduction in ("mean", "none"):
                loss = ops.linear_cross_entropy(h, w, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-4,
                                                softcap=30.0, chunk_size=16)
                torch.autograd.grad(loss.nansum() * 0.5, [h, w])  # (a loss grad other than 1: the scaling runs)
    torch.cuda.synchronize()
    print("sanitize_kernels: ran the llm kernels")
