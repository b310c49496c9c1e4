"""bignas (BigNAS, Yu et al., ECCV 2020, §3.1): the sandwich rule with inplace distillation and
the one detail of its recipe that applies to a width network: regularisation on the largest
sub-model only.

Each step trains n widths w_1 = w_min < w_2 .. w_{n-1} (drawn uniformly in [w_min, w_max], as
`sandwich` draws them, from the step's generator) < w_n = w_max, one forward + backward each,
largest first, gradients summed, one optimizer step. With z_i (N, C) the logits of width w_i:

    L = CE_eps(z_n, y) + sum_{i<n} [(1 - a) CE(z_i, y) + a D(z_i, sg[z_n]; T)]

CE_eps: cross-entropy with label smoothing eps = `smoothing` (the largest only; it replaces the
cell's `train.label_smoothing` for that term); D: the KD methods' shared distillation term
(`method.divergence`, KL by default). Defaults: n = 4, T = 1, a = 1, eps = 0.1, from the
reference open-mmlab/mmrazor `configs/nas/mmcls/bignas/attentive_mobilenet_supernet_32xb64_in1k.py`
(`num_random_samples=2`; `LabelSmoothLoss` 0.1 on the head; `KLDivergence` tau 1, weight 1,
the students' label loss discarded by `BigNAS.train_step` in
`mmrazor/models/algorithms/nas/bignas.py`).

What BigNAS prescribes (its §3.1, as we know the paper: no copy of its text is in
`research/`, so these rules are not checked against one) and what this file does with it:
- sandwich rule + inplace distillation: implemented (above).
- regularisation on the largest only: label smoothing, implemented. Dropout and drop-path on the
  largest only (mmrazor: `set_dropout(..., drop_path_rate=0.2)` for `max`, 0 otherwise, and a
  dropout 0.2 neck): not applicable, no width architecture here (`us_mobilenet_v1`,
  `flex_vit`) has dropout or drop-path. Weight decay "on the largest only": the largest runs
  every weight and our optimizer decays each weight once per step, which is that rule.
- initialisation (the last BN gamma of every residual block at 0): not applicable,
  MobileNet-V1 has no residual blocks and the ViT has no BatchNorm.
- learning rate (the paper's exponential decay with a constant ending): not taken; the schedule
  is the cell's (`train.schedule`, one recipe for every method of a grid), and the reference
  itself trains with warm-up + cosine (`configs/_base_/settings/imagenet_bs2048_bignas.py`).
- not taken either: mmrazor's gradient clipping by value 0.2 (the trainer clips for no method),
  resolution sampling (no resolution axis here), BN calibration (done for every method, see
  `benchmark/training/bn_calib.py`).
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from benchmark.methods import register_method
from benchmark.methods.base import ParamSpec
from benchmark.methods.sandwich import Sandwich


def largest_smoothing(default: float = 0.1) -> ParamSpec:
    """The label smoothing of the largest sub-model's CE (its only regularisation); not
    searched: part of the reference recipe."""
    return ParamSpec(default, lambda v: 0 <= v < 1, "smoothing must be in [0, 1)", searched=False)


@register_method("bignas")
class BigNAS(Sandwich):
    description = "BigNAS: sandwich rule + inplace KD, label smoothing on the largest only"
    plot_slot = 17
    PARAMS = {**Sandwich.PARAMS, "smoothing": largest_smoothing()}

    def largest_ce(self, logits: Tensor, y: Tensor) -> Tensor:
        """CE_eps(z (N, C), y (N,)), eps = `smoothing`, averaged over the batch."""
        return F.cross_entropy(logits, y, label_smoothing=float(self.params["smoothing"]))

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        if k == num_submodels - 1:
            ce = self.largest_ce(logits, y)
            return ce, {"ce": ce}
        return super().loss(k, logits, teachers, y, num_submodels, feats)
