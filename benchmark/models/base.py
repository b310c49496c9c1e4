"""The FlexibleModel contract every architecture implements.

A flexible model holds K sub-models ordered smallest first (the full model is last). Methods only
use `forward_all`/`forward_sub`, so they never care whether the sub-models are exits of one pass
(MSDNet) or widths that each need their own pass (slimmable networks).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SubModel:
    """A stable, human-readable handle of one sub-model (e.g. `exit3`, `w0.5`)."""

    index: int
    name: str


class FlexibleModel(nn.Module):
    """Base class: subclasses set `submodels` and implement `forward_sub`.

    `single_pass` is True when one forward yields every sub-model's logits (early exits); then
    `forward_all` must be overridden to do exactly one pass.
    """

    submodels: list[SubModel]
    single_pass: bool = False
    # Sub-models are exits of one trunk, so one input can stop at the first confident exit
    # (budgeted-batch evaluation applies).
    early_exit: bool = False
    # Every exit's feature list starts with its pooled exit feature, (B, C, 1, 1) with the same
    # C for all exits (what its classifier reads; feature hints such as byot's compare them).
    exit_features: bool = False

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        """Logits of sub-model k alone."""
        raise NotImplementedError

    def forward_all(self, x: Tensor, which: list[int] | None = None) -> list[Tensor]:
        """Logits of the requested sub-models (default: all), in the order requested."""
        which = list(range(len(self.submodels))) if which is None else which
        return [self.forward_sub(x, k) for k in which]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        """Logits of sub-model k and its stage features (for feature-based methods such as ekd).

        Features are the outputs of the sub-model's resolution stages, in the same order for
        every sub-model, so that position i of two sub-models can be compared when their
        spatial sizes agree (attention transfer compares maps, not channels).
        """
        raise NotImplementedError

    def forward_all_features(
        self, x: Tensor, which: list[int] | None = None
    ) -> list[tuple[Tensor, list[Tensor]]]:
        """`forward_sub_features` of the requested sub-models (one pass for early exits)."""
        which = list(range(len(self.submodels))) if which is None else which
        return [self.forward_sub_features(x, k) for k in which]

    def cost_forward(self, x: Tensor, k: int) -> Tensor:
        """The computation whose cost is reported for sub-model k (see benchmark.costs.flops)."""
        return self.forward_sub(x, k)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_all(x)

    @property
    def num_submodels(self) -> int:
        return len(self.submodels)


class EarlyExitModel(FlexibleModel):
    """A trunk with exits: one forward yields every requested exit (MSDNet, BYOT's ResNet).

    Subclasses implement `_run(x, upto, heads, features)`: the trunk up to exit `upto` and the
    heads in `heads`, returning {exit: logits} (or {exit: (logits, features)}). The reported
    cost of exit k is the anytime cost: the trunk up to k plus every head up to k, as the
    MSDNet reference op counter counts it.
    """

    single_pass = True
    early_exit = True
    exit_features = True

    def _run(
        self, x: Tensor, upto: int, heads: set[int], features: bool = False
    ) -> dict[int, Tensor | tuple[Tensor, list[Tensor]]]:
        raise NotImplementedError

    def forward_all(self, x: Tensor, which: list[int] | None = None) -> list[Tensor]:
        which = list(range(len(self.submodels))) if which is None else which
        out = self._run(x, max(which), set(which))
        return [out[k] for k in which]

    def forward_all_features(
        self, x: Tensor, which: list[int] | None = None
    ) -> list[tuple[Tensor, list[Tensor]]]:
        which = list(range(len(self.submodels))) if which is None else which
        out = self._run(x, max(which), set(which), features=True)
        return [out[k] for k in which]

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._run(x, k, {k})[k]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        return self._run(x, k, {k}, features=True)[k]

    def cost_forward(self, x: Tensor, k: int) -> Tensor:
        return self._run(x, k, set(range(k + 1)))[k]


class IndependentModel(FlexibleModel):
    """K separate copies of a flexible model; copy k only ever runs sub-model k.

    This is how methods without weight sharing (`independent`, `takd`) get their networks:
    sub-model k has the same architecture and the same initial weights as sub-model k of the
    shared model, but no parameter is shared between sub-models.
    """

    single_pass = False

    def __init__(self, shared: FlexibleModel) -> None:
        super().__init__()
        self.submodels = list(shared.submodels)
        self.early_exit = shared.early_exit
        self.members = nn.ModuleList(copy.deepcopy(shared) for _ in shared.submodels)

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self.members[k].forward_sub(x, k)

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        return self.members[k].forward_sub_features(x, k)

    def cost_forward(self, x: Tensor, k: int) -> Tensor:
        return self.members[k].cost_forward(x, k)


def count_active_params(model: nn.Module, run: callable) -> int:
    """Number of parameters used by `run()`: every leaf module that executes, counted once.

    Leaf modules may define `active_num_params()` when they run only a slice of their weights
    (slimmable layers); otherwise all their own parameters count.
    """
    seen: dict[int, int] = {}

    def hook(module: nn.Module, _inp, _out) -> None:
        if id(module) in seen:
            return
        if hasattr(module, "active_num_params"):
            seen[id(module)] = module.active_num_params()
        else:
            seen[id(module)] = sum(p.numel() for p in module.parameters(recurse=False))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())
