"""FusedConv2dReLU: nn.Conv2d followed by nn.ReLU (and optionally a residual add before it), as one op; FusedConvBNReLU:
Conv2d + BatchNorm2d + ReLU, folded into one such convolution in eval mode, BatchNorm + ReLU as one op in training.

FusedConv2dReLU subclasses nn.Conv2d: nn.Conv2d's constructor arguments, parameters, initialisation and state_dict
(it loads an nn.Conv2d's and an nn.Conv2d loads its), and `isinstance(m, nn.Conv2d)` holds. FusedConvBNReLU holds an
nn.Conv2d `conv` and an nn.BatchNorm2d `bn`, so their state (running statistics included) is exactly theirs.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _native
from ..ops import conv as ops

_REFERENCE = "the PyTorch reference (F.conv2d, + residual, relu)"


def _conv_relu(conv: nn.Conv2d, input: Tensor, weight: Tensor, bias: Optional[Tensor],
               residual: Optional[Tensor]) -> Tensor:
    """relu(conv's convolution of input with weight and bias (+ residual)), with conv's stride, padding, padding mode,
    dilation and groups: fusedkernels.ops.conv2d_bias_relu (which resolves "same" / "valid" as F.conv2d does), after
    an explicit pad for the non-zero padding modes, as nn.Conv2d pads; grouped convolutions run the reference."""
    if conv.groups != 1:
        if input.is_cuda:
            _native.warn_fallback("conv2d_bias_relu", "groups != 1 (grouped, depthwise) has no fused kernel", _REFERENCE)
        z = conv._conv_forward(input, weight, bias)
        out = F.relu(z if residual is None else z + residual)
        return out.contiguous(memory_format=ops._output_format(input, weight))  # the op's layout
    padding = conv.padding
    if conv.padding_mode != "zeros":
        input = F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return ops.conv2d_bias_relu(input, weight, bias, conv.stride, padding, conv.dilation, residual)


def _scripted_conv_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                        stride: List[int], pad: List[int], dilation: List[int], groups: int,
                        padding_mode: str) -> Tensor:
    """_conv_relu as TorchScript compiles it (the modules' forward under torch.jit.script), for a conv of these
    settings; pad: its _reversed_padding_repeated_twice (left, right, top, bottom), where nn.Conv2d holds every padding
    resolved ("same": the odd one at the right / bottom). The C++ op directly; grouped convolutions the reference."""
    padding = [pad[2], pad[0]]
    if padding_mode != "zeros":
        input = F.pad(input, pad, mode=padding_mode)
        padding = [0, 0]
    elif pad[1] != pad[0] or pad[3] != pad[2]:  # "same" with an odd total: the extra column / row, as F.conv2d pads
        input = F.pad(input, [0, pad[1] - pad[0], 0, pad[3] - pad[2]])
    if groups != 1:
        z = F.conv2d(input, weight, bias, stride, padding, dilation, groups)  # in the layout F.conv2d picks
        channels_last = z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()
        out = F.relu(z if residual is None else z + residual)
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.ops.fusedkernels.conv2d_bias_relu(input, weight, bias, stride, padding, dilation, residual)


class FusedConv2dReLU(nn.Conv2d):
    """`nn.ReLU()(nn.Conv2d(x) (+ residual))` computed by fusedkernels.ops.conv2d_bias_relu.

    Every nn.Conv2d configuration works: padding "same" / "valid" as F.conv2d resolves them (an even dilated kernel
    pads the input explicitly first, as F.conv2d does), the reflect, replicate and circular padding modes pad
    explicitly first (an extra copy of the input, as nn.Conv2d's own non-zero modes make); groups != 1 (grouped,
    depthwise) runs the reference, with one warning on CUDA. For the fused kernel, keep the model channels_last
    (model.to(memory_format=torch.channels_last)): other layouts are converted on every call, with one warning.
    torch.jit.script compiles a forward computing the same with torch.ops.fusedkernels.conv2d_bias_relu (a build
    without the conv family cannot script it).
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """relu(conv2d(input) + bias (+ residual)).

        input: [N, C_in, H, W] or [C_in, H, W], the parameters' dtype and device (under autocast, any dtype autocast
        casts); residual: None or exactly the output's shape (no broadcasting), added before the ReLU. Returns the
        output in the layout F.conv2d picks (channels_last when input or weight has channels_last strides, else
        contiguous) and input's dtype (the autocast dtype under autocast). Raises what fusedkernels.ops.conv2d_bias_relu raises.
        """
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return _scripted_conv_relu(input, self.weight, self.bias, residual, self.stride,
                                       self._reversed_padding_repeated_twice, self.dilation, self.groups,
                                       self.padding_mode)
        return _conv_relu(self, input, self.weight, self.bias, residual)


def _load_sequential_keys(module, state_dict, prefix, *args) -> None:
    """Loads nn.Sequential(Conv2d, BatchNorm2d, ReLU)'s keys ("0.weight", "1.running_mean", ...) as conv.* and bn.*."""
    for key in [k for k in state_dict if k.startswith(prefix + "0.") or k.startswith(prefix + "1.")]:
        rest = key[len(prefix):]
        state_dict[prefix + ("conv." if rest[0] == "0" else "bn.") + rest[2:]] = state_dict.pop(key)


def _batch_norm_args(bn: nn.BatchNorm2d) -> tuple:
    """(running_mean, running_var, weight, bias, training, momentum, eps) as nn.BatchNorm2d's forward passes them to
    F.batch_norm, after the same state update: in training with running statistics, num_batches_tracked += 1 and
    momentum None becomes the cumulative average's factor 1 / num_batches_tracked (a host read of the counter, as
    nn.BatchNorm2d makes); without running statistics in eval, batch statistics."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    return (bn.running_mean if use_running else None, bn.running_var if use_running else None, bn.weight, bn.bias,
            training, factor, bn.eps)


def _watched(module: nn.Module) -> bool:
    """Whether hooks watch or change this module's calls (its own or every module's; spectral_norm's weight update
    is a forward pre-hook): then the block calls it, so they run and see what they would see."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    every = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks,
             nn.modules.module._global_backward_hooks, nn.modules.module._global_backward_pre_hooks)
    return any(bool(hooks) for hooks in own + every)


class FusedConvBNReLU(nn.Module):
    """relu(BatchNorm2d(Conv2d(x)) (+ residual)): the convolution block of ResNets and most CNNs.

    Submodules `conv` (nn.Conv2d) and `bn` (nn.BatchNorm2d): the state_dict keys are conv.weight (conv.bias),
    bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked. It also loads the keys of
    nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU) (0.*, 1.*: torchvision's Conv2dNormActivation); an
    nn.Sequential loads this module's state after renaming conv. -> 0. and bn. -> 1. Built around existing modules
    (sharing their parameters and buffers): FusedConvBNReLU.from_modules(conv, bn).

    Eval mode (BatchNorm with running statistics): BatchNorm is folded into the convolution's weight and bias
    (fusedkernels.ops.fold_batch_norm, recomputed on every call, so parameter and buffer updates are always seen) and
    one fusedkernels.ops.conv2d_bias_relu runs. Training mode (or no running statistics): conv's F.conv2d, then
    fusedkernels.ops.batch_norm_relu (batch statistics, + residual, ReLU in one op: two passes over the conv output on
    CUDA for channels_last input), with bn's state updated exactly as nn.BatchNorm2d updates it (running statistics,
    num_batches_tracked, momentum=None's cumulative average, track_running_stats=False, affine=False). In both modes,
    a subclass of nn.BatchNorm2d with its own forward, or hooks on conv or bn (or on every module), make the block
    call the modules themselves, conv then bn, then + residual and relu in PyTorch ops: the subclass's forward runs
    and the hooks see the calls they would see (nn.utils.spectral_norm's weight, a pre-hook, is current).

    The eval fold rounds the folded weight and bias to the parameters' dtype: in float16 a weight * bn.weight /
    sqrt(running_var + eps) or folded bias past 65504 (a channel with a tiny running_var) becomes inf, and the
    output with it, where Conv2d -> BatchNorm2d -> ReLU computes finite values (torch.ao.quantization's
    fuse_conv_bn_eval folds the same way). Nothing checks it on each call, as that would read the values on the host:
    check torch.isfinite(ops.fold_batch_norm(...)[0]) once where float16 parameters may be near that range, or keep
    such a block in bfloat16 or float32.

    torch.jit.script compiles a forward computing the same: in eval the fold and
    torch.ops.fusedkernels.conv2d_bias_relu, in training (or without running statistics) conv, bn and relu as modules
    (nn.BatchNorm2d's own update of the state); hooks run as TorchScript runs them, and a BatchNorm2d subclass's
    forward in training only. A build without the conv family cannot script it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None) -> None:
        """nn.Conv2d's arguments in their order (bias defaults to False: BatchNorm's shift makes a conv bias
        redundant), then nn.BatchNorm2d's (eps, momentum, affine, track_running_stats); device and dtype for both."""
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              padding_mode, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.register_load_state_dict_pre_hook(_load_sequential_keys)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "FusedConvBNReLU":
        """The block around these modules (not copies: their parameters, buffers and training flags are the
        module's), in bn's mode (training or eval). Raises TypeError for a conv that is not an nn.Conv2d computing nn.Conv2d's forward or a bn that is
        not an nn.BatchNorm2d, ValueError when bn's features are not conv's output channels."""
        if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
            raise TypeError(f"FusedConvBNReLU.from_modules: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"FusedConvBNReLU.from_modules: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"FusedConvBNReLU.from_modules: bn has {bn.num_features} features but conv "
                             f"{conv.out_channels} output channels")
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.conv, block.bn = conv, bn
        block.training = bn.training  # the flag only: train() / eval() would also set the given conv's
        block.register_load_state_dict_pre_hook(_load_sequential_keys)
        return block

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """relu(bn(conv(input)) (+ residual)). input [N, C_in, H, W] (4-D, as nn.BatchNorm2d takes it); residual
        None or exactly the output's shape. Returns the output in F.conv2d's layout and input's dtype. The same checks
        in both modes: ValueError for input that is not 4-D (nn.BatchNorm2d's), RuntimeError for a residual not the
        output's shape (conv2d_bias_relu's)."""
        if torch.jit.is_scripting():  # TorchScript compiles this branch only (the class docstring says what it runs)
            self.bn._check_input_dim(input)
            if self.bn.training or self.bn.running_mean is None:
                z = self.conv(input)
                if residual is not None and residual.shape != z.shape:  # before bn updates its state, as eagerly
                    raise RuntimeError("conv2d_bias_relu: residual must have the output's shape (no broadcasting)")
                channels_last = z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()
                z = self.bn(z)
                out = F.relu(z if residual is None else z + residual)
                return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            ops._check_eps(self.bn.eps, training=False)
            weight, bias = ops.fold_batch_norm(self.conv.weight, self.conv.bias, self.bn.running_mean,
                                               self.bn.running_var, self.bn.eps, self.bn.weight, self.bn.bias)
            return _scripted_conv_relu(input, weight, bias, residual, self.conv.stride,
                                       self.conv._reversed_padding_repeated_twice, self.conv.dilation,
                                       self.conv.groups, self.conv.padding_mode)
        conv, bn = self.conv, self.bn
        bn._check_input_dim(input)  # before the conv: eval's op would take unbatched input
        as_modules = type(bn).forward is not _BatchNorm.forward or _watched(conv) or _watched(bn)
        if as_modules or bn.training or bn.running_mean is None:
            z = conv(input)
            ops._check_residual(residual, z.shape)  # as the eval path's op: no broadcasting
            if as_modules:
                z = bn(z)
                out = F.relu(z if residual is None else z + residual)
            else:
                out = ops.batch_norm_relu(z, *_batch_norm_args(bn), residual=residual)
            return out.contiguous(memory_format=ops._output_format(input, conv.weight))  # as eval's conv op
        ops._check_eps(bn.eps, training=False)  # F.batch_norm's, which the fold would otherwise turn into NaN
        weight, bias = ops.fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                           bn.weight, bn.bias)
        return _conv_relu(conv, input, weight, bias, residual)
