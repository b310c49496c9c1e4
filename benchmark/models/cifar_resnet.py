"""Pieces shared by the CIFAR ResNets of He et al. 2016 (ddnn_resnet, switchable_precision)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

STAGE_CHANNELS = (16, 32, 64)


def option_a_shortcut(x: Tensor, stride: int, pad: int) -> Tensor:
    """He et al.'s CIFAR option A, parameter-free: subsample by the stride and zero-pad the new
    channels, half before and half after (the extra one after when `pad` is odd), as in the
    common CIFAR ResNet code."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))
    return x
