"""Layers that switch between sub-models of one network (one set of weights, K behaviours).

A model collects its `Switch` modules once and sets their `active` sub-model index before each
forward; layers then use the slice, bit-width or private statistics of that sub-model. Used by
the slimmable, depth-dynamic and bit-width-switchable families.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


class Switch:
    """Mixin: the index of the active sub-model."""

    active: int = -1


def set_active(switches: Iterable[Switch], k: int) -> None:
    for m in switches:
        m.active = k


class SwitchableBatchNorm2d(nn.Module, Switch):
    """One private BatchNorm2d (affine + running stats) per sub-model: sub-models that share
    conv weights still see different activation statistics (other widths, depths or bit-widths).
    """

    def __init__(self, channels_list: list[int]):
        super().__init__()
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for c in channels_list)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn[self.active](x)
