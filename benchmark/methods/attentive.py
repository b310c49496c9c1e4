"""attentive (AttentiveNAS, Wang et al., CVPR 2021): BigNAS's sandwich with the random widths
replaced by attentive ones, chosen on the current batch.

Each step trains n widths, largest first, one forward + backward each, one optimizer step:
w_max on CE with label smoothing (`smoothing`), then n - 2 attentive widths, then w_min; every
width but the largest distills from the largest's logits of the same step, detached. The loss
is `bignas`'s (z_i (N, C) the logits of the i-th width, smallest first):

    L = CE_eps(z_n, y) + sum_{i<n} [(1 - a) CE(z_i, y) + a D(z_i, sg[z_n]; T)]

Attentive width (reference facebookresearch/AttentiveNAS `train_attentive_nas.py` L257-312,
`sampler/attentive_nas_sampler.py`): draw a target cost from the prior, draw `candidates`
widths at that cost, evaluate each on the step's batch without gradient (the model in train
mode, as the reference's loop; BN statistics left as they were), keep the one of lowest
CE_eps (`rule=bestup`, the reference's default) or highest (`worstup`), CE_eps being the
reference's `criterion` (the largest's smoothed CE). All draws come from the step's generator
(`step_generator`): identical after a resume, like the sandwich's.

The prior, ours on a width axis. The reference bins cost (FLOPs) in steps of 25 MFLOPs and takes
as prior the histogram of the costs of uniformly drawn architectures
(`build_trasition_prob_matrix` over `flops_archs_off_table.map`); candidates are architectures
drawn per bin, kept when their cost rounds to the target (`sample_archs_according_to_flops`).
On a width axis a sub-model is one number: here cost c(w) is the model's MMACs
(`benchmark.costs.flops.width_costs`) counted at 101 evenly spaced widths of [w_min, w_max] and
linearly interpolated, the cost range [c(w_min), c(w_max)] cut into `bins` equal bins, the
target bin is the bin of c(u) for u uniform in [w_min, w_max] (the histogram of uniformly drawn
sub-models, as the reference's), and the candidates are uniform in the width interval whose cost
falls in that bin (the reference's conditional draw given the bin; c is non-decreasing, so that
set is an interval). `bins` = 70 follows the reference's resolution: 25 MFLOPs steps over its
search space's 212-1944 MFLOPs (mmrazor `configs/nas/mmcls/bignas/README.md`). Note: one width
axis has one sub-model per cost, so candidates at one cost differ by at most a bin's width
(about 0.01-0.03 in width at 70 bins on us_mobilenet_v1) and the rule chooses among close
widths; fewer bins widen the choice (`--set method.bins=4`). The reference chooses among
architectures of one cost that differ in depth, kernel and width.

Defaults (`configs/train_attentive_nas_models.yml`): n = 4 (`num_arch_training`), candidates 3
(`num_trials`), rule bestup, eps = 0.1 (`label_smoothing`), KD at T = 1 with soft targets only
(`inplace_distill`, `KLLossSoft`). Not taken: the reference's dropout / drop-connect on the
largest (our width models have neither), its gradient clipping (1.0) and its predictor-based
variant; its accuracy predictor lost to the batch loss (AttentiveNAS issue #8).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmark.costs.flops import width_costs
from benchmark.methods import register_method
from benchmark.methods.base import StepBatch, choice, integer
from benchmark.methods.bignas import BigNAS
from benchmark.models import FlexibleModel

GRID = 101  # widths at which the cost curve is counted


@register_method("attentive")
class Attentive(BigNAS):
    description = "AttentiveNAS: sandwich with attentive widths (best/worst of k at a drawn cost)"
    plot_slot = 16
    PARAMS = {
        **BigNAS.PARAMS,
        "candidates": integer(3, "candidates"),
        "rule": choice("bestup", "rule", ("bestup", "worstup")),
        "bins": integer(70, "bins"),
    }

    def __init__(self, params: dict | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(params, label_smoothing)
        self._costs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # image size -> (w, c)

    def cost_curve(self, model: FlexibleModel, image_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(widths (GRID,), MMACs (GRID,)) of the model at that image size, counted once (the
        cost of a width does not change in training). ValueError if the cost decreases."""
        if image_size not in self._costs:
            rng = model.caps.widths
            w = np.linspace(rng.low, rng.high, GRID)
            costs = width_costs(model, w.tolist(), [f"w{v:.4f}" for v in w], image_size)
            c = np.array([s.mmacs for s in costs])
            if np.any(np.diff(c) < -1e-9):
                raise ValueError(f"method attentive needs a cost non-decreasing in width: {c}")
            self._costs[image_size] = (w, np.maximum.accumulate(c))
        return self._costs[image_size]

    def bin_interval(self, w: np.ndarray, c: np.ndarray, u: float) -> tuple[float, float]:
        """The widths [a, b] whose cost falls in the cost bin of width u (of `bins` equal bins
        of [c_0, c_max])."""
        bins = int(self.params["bins"])
        span = c[-1] - c[0]
        if span <= 0:
            return float(w[0]), float(w[-1])
        j = min(int((np.interp(u, w, c) - c[0]) / span * bins), bins - 1)
        lo, hi = c[0] + span * j / bins, c[0] + span * (j + 1) / bins
        return _width_at_cost(w, c, lo), _width_at_cost(w, c, hi)

    def draw_submodels(
        self, g: torch.Generator, model: FlexibleModel, batch: StepBatch | None = None
    ) -> list[float]:
        """[w_min, n-2 attentive widths (ascending), w_max]; needs the step's batch."""
        if batch is None:
            raise ValueError("method attentive scores candidate widths on the step's batch")
        rng, n, k = model.caps.widths, int(self.params["n"]), int(self.params["candidates"])
        w, c = self.cost_curve(model, batch.x.shape[-1])
        picked = []
        for _ in range(n - 2):
            u = rng.low + (rng.high - rng.low) * torch.rand((), generator=g, dtype=torch.float64)
            a, b = self.bin_interval(w, c, float(u))
            cand = (a + (b - a) * torch.rand(k, generator=g, dtype=torch.float64)).tolist()
            picked.append(cand[self.choose(batch, cand)] if k > 1 else cand[0])
        return [rng.low, *sorted(picked), rng.high]

    def choose(self, batch: StepBatch, candidates: list[float]) -> int:
        """Index of the candidate of lowest (bestup) or highest (worstup) CE_eps on the batch;
        the first of equal losses."""
        losses = batch.losses(candidates, self.largest_ce)
        pick = losses.argmin() if self.params["rule"] == "bestup" else losses.argmax()
        return int(pick)


def _width_at_cost(w: np.ndarray, c: np.ndarray, e: float) -> float:
    """The smallest width whose interpolated cost reaches e (c non-decreasing over w)."""
    i = int(np.searchsorted(c, e, side="left"))
    if i == 0:
        return float(w[0])
    if i >= len(c):
        return float(w[-1])
    return float(w[i - 1] + (w[i] - w[i - 1]) * (e - c[i - 1]) / (c[i] - c[i - 1]))
