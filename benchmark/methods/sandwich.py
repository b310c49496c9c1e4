"""sandwich (US-Nets, Yu & Huang, ICCV 2019): the sandwich rule with inplace distillation.

Each step trains n widths of a universally slimmable network with one optimizer step: the
largest width w_max on the labels, CE(z_max, y); the smallest w_min and n-2 widths drawn
uniformly from [w_min, w_max] on the largest width's prediction of the same step (detached):
(1-a) CE(z_w, y) + a D(z_w, z_max; T) with a = 1, T = 1 by default (soft targets only, as in
the paper and its code). D is the KD methods' shared distillation term (`method.divergence`: kl,
or AlphaNet's alpha-divergence). Widths are drawn from a generator seeded by (seed, epoch, step)
(`benchmark.training.step.step_generator`): identical for every method at a seed and reproduced on
resume. The loss is ipkd's over the drawn widths, so sandwich vs ipkd isolates "which widths".

From the paper: the rule (max, min, n-2 random), n = 4, inplace distillation with soft targets
only. From its code (`train.py`): uniform draws in [w_min, w_max], one backward per width,
gradients summed, one optimizer step. Our choice: KL (batch mean) instead of the code's soft
cross-entropy (same gradient; the logged value differs by the teacher's entropy).

`method.resolution` (`RESOLUTION`, default full: every width at the data's image size, as
US-Nets): random gives every drawn width but the largest an input resolution drawn uniformly
from the network's `arch.resolutions` (MutualNet's rule, `mutualnet.py`), drawn from the same
step generator after the widths, so the widths stay those of the full-resolution rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmark.dim import Dim
from benchmark.errors import ConfigError
from benchmark.methods import register_method
from benchmark.methods.base import RESOLUTION, StepBatch, integer
from benchmark.methods.ipkd import IPKD
from benchmark.models import FlexibleModel


@register_method("sandwich")
class Sandwich(IPKD):
    description = "US-Nets sandwich rule: max + min + n-2 random widths, inplace distillation"
    plot_slot = 11
    draws_submodels = True
    PARAMS = {**IPKD.PARAMS, "n": integer(4, "n", low=2, search=Dim(2, 6)), **RESOLUTION}

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        need = "a network that runs any width of a range (forward_width)"
        cls.require(model, arch, "widths", need)

    @classmethod
    def random_resolution(cls, params: dict[str, Any]) -> bool:
        """Whether the non-max widths run at drawn resolutions (`method.resolution`)."""
        return params.get("resolution") == "random"

    @classmethod
    def check_params(cls, model: nn.Module, arch: str, params: dict[str, Any]) -> None:
        """Drawn resolutions need the network's resolution axis on (`arch.resolutions`)."""
        if not cls.random_resolution(params):
            return
        cls.require(model, arch, "resolutions", "a network that runs several input resolutions")
        if not model.caps.resolutions.on:
            raise ConfigError(
                f"method {cls.name} draws input resolutions from arch.resolutions, which is off "
                f"for {arch}; valid: --set arch.resolutions=auto or a list (the image size "
                f"first, then multiples of the stride {model.caps.resolutions.stride}), got []"
            )

    def draw_submodels(
        self, g: torch.Generator, model: FlexibleModel, batch: StepBatch | None = None
    ) -> list[float]:
        """[w_min, n-2 uniform draws in [w_min, w_max] (ascending), w_max]: the largest last."""
        lo, hi = model.caps.widths.low, model.caps.widths.high
        n = int(self.params["n"])
        drawn = (lo + (hi - lo) * torch.rand(n - 2, generator=g, dtype=torch.float64)).tolist()
        return [lo, *sorted(drawn), hi]

    def draw_resolutions(
        self, g: torch.Generator, model: FlexibleModel, n: int
    ) -> list[int | None]:
        """With random resolutions: n-1 uniform draws from `arch.resolutions` (the image size
        among them, as in MutualNet's `input_list[random.randint(0, 3)]`), then None for the
        largest width (full resolution: the teacher); else None for every width."""
        if not self.random_resolution(self.params):
            return [None] * n
        listed = model.caps.resolutions.listed
        picks = torch.randint(len(listed), (n - 1,), generator=g).tolist()
        return [*(listed[i] for i in picks), None]
