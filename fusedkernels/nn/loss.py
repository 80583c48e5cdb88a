"""FusedLinearCrossEntropyLoss: an LM head (nn.Linear) followed by nn.CrossEntropyLoss, without the logits."""

from typing import Optional, Union

from torch import Tensor, nn

from ..ops import llm as ops


def _global_forward_hooks() -> bool:
    """Whether nn.modules.module.register_module_forward_(pre_)hook hooks are registered."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class FusedLinearCrossEntropyLoss(nn.Module):
    """`nn.CrossEntropyLoss()(head(hidden), target)` for a linear head, computed by
    fusedkernels.ops.linear_cross_entropy: the [tokens, vocab] logits are never materialised.

    The module holds no parameters: the head stays where the model has it (its state_dict keys, weight tying with
    the embedding, optimizer groups unchanged), and forward takes it, as Liger-Kernel's
    LigerFusedLinearCrossEntropyLoss does (in our argument order):

        loss_fn = FusedLinearCrossEntropyLoss(ignore_index=-100, label_smoothing=0.0)
        loss = loss_fn(hidden, model.lm_head, labels)          # or (hidden, lm_head.weight, labels, lm_head.bias)

    Constructor arguments: nn.CrossEntropyLoss's ignore_index, reduction and label_smoothing (no class weights), and
    z_loss, softcap, chunk_size as in linear_cross_entropy. forward(hidden [..., H], head, target [...] int64,
    bias=None): head is an nn.Linear (its weight [V, H] and bias are used; not a subclass, whose forward may compute
    something else, nor with a bias given besides) or a weight tensor. Returns the loss in float32 (float64 for
    float64 inputs). Raises TypeError for a head of another type, ValueError for a head with forward hooks (module
    or global ones: the loss never calls the head, so a hook could not change what it computes).
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: Optional[float] = None, chunk_size: int = 0) -> None:
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_size = z_loss, softcap, chunk_size

    def forward(self, hidden: Tensor, head: Union[nn.Linear, Tensor], target: Tensor,
                bias: Optional[Tensor] = None) -> Tensor:
        if isinstance(head, nn.Module):
            if type(head) is not nn.Linear:
                raise TypeError(f"FusedLinearCrossEntropyLoss: head must be an nn.Linear or a weight tensor, got "
                                f"{type(head).__name__} (a subclass's forward may differ from x W^T + b: pass its "
                                "weight and bias if it computes that)")
            if bias is not None:
                raise TypeError("FusedLinearCrossEntropyLoss: bias is given by the nn.Linear head; pass its weight "
                                "tensor to give another bias")
            if head._forward_hooks or head._forward_pre_hooks or _global_forward_hooks():
                raise ValueError("FusedLinearCrossEntropyLoss: the head has forward hooks, which the fused loss does "
                                 "not run (it never calls the head, so it cannot apply what they change): remove "
                                 "them, or pass head.weight and head.bias")
            head, bias = head.weight, head.bias
        return ops.linear_cross_entropy(hidden, head, target, bias, self.ignore_index, self.reduction,
                                        self.label_smoothing, self.z_loss, self.softcap, self.chunk_size)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}")
