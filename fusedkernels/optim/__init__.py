"""Fused optimizers (drop-in for torch.optim) and fused grad-norm clipping."""

from .adam import FusedAdam, FusedAdamW
from .clip import clip_grad_norm_
from .sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD", "clip_grad_norm_"]
