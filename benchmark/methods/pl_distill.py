"""pl_distill (Phuong & Lampert, "Distillation-based training for multi-exit architectures",
ICCV 2019): every early exit distills from the last exit of the same step, at a temperature
that grows while the last exit is confident.

Loss (reference mary-phuong/multiexit-distillation, `main.py`: `DistillationBasedLoss`), with
exits 1..K, a the paper's C and z_K detached:

    L = (1 - a) CE(z_K, y) + sum_{k<K} [(1 - a) CE(z_k, y) + a KD(z_k, z_K; T)]

KD being the shared T^2-scaled batch-mean KL(softmax(z_K / T) || softmax(z_k / T)) (`kd_loss`).
The reference writes the soft cross-entropy -sum_c softmax(z_K / T) log softmax(z_k / T)
instead of the KL: the two differ by T^2 times the teacher's entropy, which has no gradient, so
training is the same and only the logged value differs.

Temperature (same class): T starts at 1.0; after each step's loss, if the batch mean of the
teacher's max probability at the current T, mean_b max_c p_K, exceeds `maxprob` (0.5), T is
multiplied by `t_mult` (1.05). The step's loss uses T before the update. T is method state (a
buffer): it is saved in the checkpoint and restored on resume, and logged after every epoch as
`method/temperature`.

Defaults: a = 0.5, maxprob = 0.5 (`train_cifar.py`: cf_loss), t_mult = 1.05 and the initial T =
1.0 (`DistillationBasedLoss.__init__`). Not taken: the reference's `global_scale` = 2 * 5 / K
multiplying the whole loss (an lr scale; the cell's lr stands in for it). The reference trains
an 11-exit MSDNet on CIFAR-100 (SGD 0.1, Nesterov, wd 1e-4, batch 64). In a distributed cell
each rank adapts T from its own part of the batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from benchmark.methods import register_method
from benchmark.methods.base import EpochContext, Method, ParamSpec, kd_loss, weight


@register_method("pl_distill")
class PLDistill(Method):
    description = "Phuong & Lampert: the last exit teaches every exit at a confidence-adapted T"
    plot_slot = 12
    PARAMS = {
        # the initial temperature; the schedule settings below are kept at the reference's
        "T": ParamSpec(1.0, lambda v: v > 0, "T must be > 0", searched=False),
        "a": weight(0.5, "a (the paper's C)"),
        "maxprob": ParamSpec(0.5, lambda v: 0 < v < 1, "maxprob must be in (0, 1)", searched=False),
        "t_mult": ParamSpec(1.05, lambda v: v >= 1, "t_mult must be >= 1", searched=False),
    }

    def __init__(self, params: dict | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(params, label_smoothing)
        self.register_buffer("temperature", torch.tensor(float(self.params["T"])))
        self.step_T = float(self.params["T"])  # T of the current step (before its update)

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        cls.require(model, arch, "early_exit", "exits of one trunk (an early-exit model)")

    def adapt(self, teacher: torch.Tensor) -> float:
        """Fix this step's T, then update the stored T from the teacher's (N, C) logits:
        x t_mult when mean_b max_c softmax(z_K / T) > maxprob. Returns that mean."""
        self.step_T = float(self.temperature)
        conf = F.softmax(teacher.detach().float() / self.step_T, dim=1).amax(1).mean()
        if conf > self.params["maxprob"]:
            self.temperature.mul_(self.params["t_mult"])
        return float(conf)

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        a, ce = self.params["a"], self.ce(logits, y)
        if k == num_submodels - 1:  # the step's first loss: the teacher exists before students
            conf = self.adapt(logits)
            t, m = ce.new_tensor(self.step_T), ce.new_tensor(conf)
            return (1 - a) * ce, {"ce": ce, "T": t, "teacher_maxprob": m}
        kd = kd_loss(logits, teachers[num_submodels - 1], self.step_T)
        return (1 - a) * ce + a * kd, {"ce": ce, "kd": kd}

    def epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        return {"method/temperature": float(self.temperature)}
