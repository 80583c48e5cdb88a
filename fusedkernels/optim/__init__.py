"""Fused optimizers (drop-in for torch.optim and apex.optimizers) and fused grad-norm clipping."""

from .adam import FusedAdam, FusedAdamW
from .clip import clip_grad_norm_
from .lamb import FusedLAMB
from .sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedLAMB", "FusedSGD", "clip_grad_norm_"]
