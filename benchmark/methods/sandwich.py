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
"""

from __future__ import annotations

import torch
from torch import nn

from benchmark.dim import Dim
from benchmark.methods import register_method
from benchmark.methods.base import StepBatch, integer
from benchmark.methods.ipkd import IPKD
from benchmark.models import FlexibleModel


@register_method("sandwich")
class Sandwich(IPKD):
    description = "US-Nets sandwich rule: max + min + n-2 random widths, inplace distillation"
    plot_slot = 11
    draws_submodels = True
    PARAMS = {**IPKD.PARAMS, "n": integer(4, "n", low=2, search=Dim(2, 6))}

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        need = "a network that runs any width of a range (forward_width)"
        cls.require(model, arch, "widths", need)

    def draw_submodels(
        self, g: torch.Generator, model: FlexibleModel, batch: StepBatch | None = None
    ) -> list[float]:
        """[w_min, n-2 uniform draws in [w_min, w_max] (ascending), w_max]: the largest last."""
        lo, hi = model.caps.widths.low, model.caps.widths.high
        n = int(self.params["n"])
        drawn = (lo + (hi - lo) * torch.rand(n - 2, generator=g, dtype=torch.float64)).tolist()
        return [lo, *sorted(drawn), hi]
