"""ofa_ps (Once-for-All progressive shrinking, Cai et al., ICLR 2020): an elastic network trained
phase by phase, every phase distilled from the full network trained in the first.

Phases (stages of one cell; reference mit-han-lab/once-for-all `train_ofa_net.py` L42-127),
with the choices each draws from (K, D, E: the model's kernel sizes, depths, expand ratios,
ascending; `caps.elastic`) and the sub-networks per step:

    phase     kernels  depths   expands  per step  lr (x train.lr)  share of train.epochs
    teacher   max      max      max      1         1                120
    kernel    K        max      max      1         1                120
    depth1    K        D[-2:]   max      2         2.5e-3 / 3e-2    25
    depth2    K        D        max      2         7.5e-3 / 3e-2    120
    expand1   K        D        E[-2:]   4         2.5e-3 / 3e-2    25
    expand2   K        D        E        4         7.5e-3 / 3e-2    120

Per step (`progressive_shrinking.py` L115-231, `train_one_epoch`): n sub-networks are drawn
(each block's kernel and expand ratio, each stage's depth, uniformly and independently:
`ElasticSpace.sample`), each runs forward and backward at once, gradients add up, one optimizer
step. The loss of a drawn sub-network with logits z (N, C), labels y (N,) and the frozen
teacher's logits t (N, C):

    L = CE_ls(z, y) + b * D(z, t),      D = KL(softmax(t) || softmax(z)) (batch mean, T = 1)

in the teacher phase L = CE_ls(z, y) alone (no teacher yet). CE_ls is the cell's label-smoothed
CE (`train.label_smoothing`; ofa_mobilenet_v3's recipe sets the reference's 0.1); b = 1 is the
reference's `kd_ratio` (`train_ofa_net.py`: kd_ratio 1.0, kd_type ce). The teacher is a copy of
the network taken at the end of the teacher phase (parameters and BN statistics frozen, no
gradient, outside the optimizer, kept in the checkpoint as this method's state); as in the
reference (`args.teacher_model.train()` under no_grad, built with dropout 0), it runs in train
mode (batch statistics) without dropout. Before each expand phase the hidden channels of every
block are sorted by importance (`OFAMobileNetV3.sort_channels`, the reference's
`re_organize_middle_weights`), keeping the channels of the expand ratios already trained.
Draws come from the step's generator (`step_generator`: seed, epoch, step), so a resumed cell
redraws what it would have drawn (the reference seeds Python's `random` per step and draw).

From the reference: the phase order and choices, draws per step, the per-phase learning rates
(relative to the kernel phase's 3e-2), the loss and b, the sorting. Ours: the teacher is trained
as phase 0 of the same cell (the reference downloads a separately trained full network,
`ofa_D4_E6_K7`) and gets the kernel phase's share and learning rate; phases split the cell's
`train.epochs` in the reference's proportion 120 : 120 : 25 : 120 : 25 : 120
(`benchmark.training.plan.split_epochs`; at least one epoch each), where the reference runs
each phase as a run of its own (with 5 warm-up epochs in kernel / depth2 / expand2, which
`train.warmup_epochs` gives every phase); KL instead of the soft-target cross-entropy (the
same gradient; the logged value is lower by the teacher's entropy); no elastic resolution.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.dim import Dim
from benchmark.errors import ConfigError
from benchmark.methods import EpochContext, register_method
from benchmark.methods.base import DIVERGENCE, OWN_TEACHER, Method, Stage, StepBatch, scale
from benchmark.models import FlexibleModel
from benchmark.models.base import ElasticSpace, SubNet

KERNEL_LR = 3e-2  # the kernel phase's base_lr (`train_ofa_net.py`), to which the others relate
# (name, share of train.epochs, lr / train.lr, sub-networks per step) of every phase
PHASES: tuple[tuple[str, float, float, int], ...] = (
    ("teacher", 120, 1.0, 1),
    ("kernel", 120, 1.0, 1),
    ("depth1", 25, 2.5e-3 / KERNEL_LR, 2),
    ("depth2", 120, 7.5e-3 / KERNEL_LR, 2),
    ("expand1", 25, 2.5e-3 / KERNEL_LR, 4),
    ("expand2", 120, 7.5e-3 / KERNEL_LR, 4),
)
PHASE_NAMES = tuple(p[0] for p in PHASES)
# the reference's choices, as the example of a fix for an axis with fewer than two
EXAMPLE = {"kernels": "[3,5,7]", "depths": "[2,3,4]", "expands": "[3,4,6]"}


def phase_choices(space: ElasticSpace, phase: str) -> tuple[tuple, tuple, tuple]:
    """(kernels, depths, expands) the phase draws from (the module docstring's table)."""
    k, d, e = space.kernels, space.depths, space.expands
    return {
        "teacher": (k[-1:], d[-1:], e[-1:]),
        "kernel": (k, d[-1:], e[-1:]),
        "depth1": (k, d[-2:], e[-1:]),
        "depth2": (k, d, e[-1:]),
        "expand1": (k, d, e[-2:]),
        "expand2": (k, d, e),
    }[phase]


def full_network(space: ElasticSpace) -> SubNet:
    """The largest sub-network: the largest kernel, depth and expand ratio everywhere."""
    return space.uniform(space.kernels[-1], space.depths[-1], space.expands[-1])


@register_method("ofa_ps")
class OFAProgressiveShrinking(Method):
    description = "Once-for-All progressive shrinking: full net, then kernel, depth, expand "
    "phases, KD from the frozen full net"
    plot_slot = 20
    draws_submodels = True
    draws_subnets = True
    own_teacher = True
    PARAMS = {"b": scale(1.0, "b", search=Dim(0.0, 2.0)), **DIVERGENCE}

    def __init__(self, params: dict[str, Any] | None = None, label_smoothing: float = 0.0):
        super().__init__(params, label_smoothing)
        self.phase = PHASE_NAMES[0]
        self._space: ElasticSpace | None = None
        self._pending: dict[str, Tensor] | None = None  # a restored teacher, built lazily
        object.__setattr__(self, "teacher", None)  # not a submodule: no optimizer, no .to()

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        need = "an elastic network (kernel sizes, depths and expand ratios; forward_subnet)"
        cls.require(model, arch, "elastic", need)
        space = model.caps.elastic
        few = {
            name: list(v)
            for name, v in (
                ("kernels", space.kernels), ("depths", space.depths), ("expands", space.expands),
            )
            if len(v) < 2
        }  # fmt: skip
        if few:
            got = ", ".join(f"{k} {v}" for k, v in few.items())
            fix = " ".join(f"--set arch.{k}={EXAMPLE[k]}" for k in few)
            raise ConfigError(
                f"method ofa_ps shrinks the kernel size, then the depth, then the expand ratio: "
                f"it needs at least two choices of each; architecture {arch} has {got}; valid: "
                f"two or more of kernels 3/5/7, depths 1-6, expands 1-6, e.g. {fix} (with "
                f"arch.subnets inside the choices)"
            )

    def stages(self, num_submodels: int) -> list[Stage]:
        """One stage per phase (`PHASES`): the teacher phase trains the full network (the
        largest sub-model), the others draw from the named sub-networks' space."""
        every, last = tuple(range(num_submodels)), (num_submodels - 1,)
        return [
            Stage(last if name == "teacher" else every, share=share, lr_scale=lr, name=name)
            for name, share, lr, _ in PHASES
        ]

    def draw_submodels(
        self, g: torch.Generator, model: FlexibleModel, batch: StepBatch | None = None
    ) -> list[SubNet]:
        """This phase's sub-networks for one step, drawn from `g` in turn (`PHASES`)."""
        space = model.caps.elastic
        n = next(p[3] for p in PHASES if p[0] == self.phase)
        return [space.sample(g, *phase_choices(space, self.phase)) for _ in range(n)]

    def epoch_start(self, ctx: EpochContext) -> None:
        """The phase of this stage; a restored teacher is rebuilt; at the start of an expand
        phase the hidden channels are sorted by importance (once: on resume at a later epoch
        of the phase, the checkpoint's weights are already sorted)."""
        if ctx.stage.name not in PHASE_NAMES:
            raise ValueError(f"ofa_ps: stage {ctx.stage.name!r} is none of {PHASE_NAMES}")
        self.phase, self._space = ctx.stage.name, ctx.model.caps.elastic
        if self._pending is not None:
            self._set_teacher(ctx.model, self._pending)
            self._pending = None
        if self.phase.startswith("expand") and ctx.epoch == 0:
            before = PHASE_NAMES[PHASE_NAMES.index(self.phase) - 1]
            ctx.model.sort_channels(phase_choices(self._space, before)[2])

    def epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """At the end of the teacher phase: the frozen copy of the network."""
        if ctx.stage.name == "teacher" and ctx.epoch == ctx.epochs - 1:
            self._set_teacher(ctx.model, ctx.model.state_dict())
        return {}

    def _set_teacher(self, model: FlexibleModel, state: dict[str, Tensor]) -> None:
        """The teacher: a copy of `model` with `state`, no gradient, dropout off, BN momentum 0
        (train-mode BN normalises with the batch's statistics and keeps its own)."""
        teacher = copy.deepcopy(model)
        teacher.load_state_dict(state)
        teacher.requires_grad_(False).train()
        for m in teacher.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0
        object.__setattr__(self, "teacher", teacher)
        self._space = model.caps.elastic

    def teacher_logits(self, x: Tensor) -> Tensor | None:
        """The frozen full network's logits (N, C), without gradient; None before it exists."""
        if self.teacher is None:
            if self.phase != PHASE_NAMES[0]:
                raise RuntimeError(f"ofa_ps: phase {self.phase} without the teacher phase's copy")
            return None
        with torch.no_grad():
            return self.teacher.forward_subnet(x, full_network(self._space))

    def get_extra_state(self) -> dict[str, Tensor]:
        """The teacher's weights and BN statistics ({} before the teacher phase ends)."""
        if self.teacher is not None:
            return dict(self.teacher.state_dict())
        return dict(self._pending or {})

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self._pending = dict(state) or None
        object.__setattr__(self, "teacher", None)

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        if OWN_TEACHER not in teachers:  # the teacher phase
            return ce, {"ce": ce}
        kd = self.distill(logits, teachers[OWN_TEACHER], 1.0)
        return ce + self.params["b"] * kd, {"ce": ce, "kd": kd}
