"""One optimisation step of a stage: `Step(model, method, stage, speed)(x, y, g)`.

A step runs in one of three shapes, picked when it is built:
- single pass (`model.caps.single_pass`, early exits such as MSDNet): one forward yields every
  trained sub-model; the losses are summed and back-propagated once;
- per sub-model (widths, depths, bit-widths, separate networks): one forward per sub-model,
  largest first, each back-propagated at once so memory holds one sub-model's graph;
- drawn widths (`method.draws_submodels`, e.g. the sandwich rule): the method draws this step's
  widths from the step's generator (`step_generator`, seeded by seed, epoch and step only), then
  their input resolutions (`Method.draw_resolutions`; MutualNet's: the batch resized on the
  device), and each runs through `model.forward_width`, largest first, like the per-sub-model
  shape; a draw may read the step's batch (`StepBatch`: attentive scores candidate widths on it
  without gradient, ieb runs its EMA teacher on it); or (`method.draws_subnets`, ofa_ps)
  sub-networks of an elastic model, each through `model.forward_subnet`, in the order drawn;
- the method's own (`method.owns_step`, l2w): `Method.train_step` runs the whole step (its
  look-ahead needs the step's learning rate), with the model's own forwards (no DDP, no
  compile).

Every shape builds the same `SubOut`s and calls `Method.loss` the same way: teachers are this
step's outputs of larger sub-models (or of a stage's frozen teachers), detached, never
recomputed (DESIGN.md §3, "one step, teachers from the same forward"), plus a method's own
frozen teacher (`Method.teacher_logits`, at `OWN_TEACHER`). Gradients are left in `.grad`; the
caller steps the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from benchmark.costs.speed import Speed
from benchmark.methods import Method, Stage
from benchmark.methods.base import OWN_TEACHER, StepBatch
from benchmark.models import FlexibleModel
from benchmark.models.base import SubNet, buffers_kept, resize


class SubOut(NamedTuple):
    """A sub-model's output in one step: logits (N, C) float32 and, for feature-based methods,
    its stage feature maps [(N, C_s, H_s, W_s), ...] float32 (None otherwise)."""

    logits: Tensor
    feats: list[Tensor] | None

    def detach(self) -> SubOut:
        feats = None if self.feats is None else [f.detach() for f in self.feats]
        return SubOut(self.logits.detach(), feats)

    @classmethod
    def of(cls, raw: Tensor | tuple[Tensor, list[Tensor]]) -> SubOut:
        """From a forward's result: logits, or (logits, stage features) with features."""
        if isinstance(raw, tuple):
            z, f = raw
            return cls(z.float(), [v.float() for v in f])
        return cls(raw.float(), None)


@dataclass
class StepResult:
    """Detached results of one step: total loss (), named loss terms `<term>/<sub-model>` -> (),
    and the logits (N, C) of every trained sub-model by index (for training accuracy)."""

    loss: Tensor
    terms: dict[str, Tensor]
    logits: dict[int, Tensor]


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of a step's random choices (e.g. the sandwich rule's widths): a CPU
    generator seeded by (seed, global epoch, step) only, so every method draws the same at a
    seed and a resumed run redraws exactly what the interrupted one would have, without state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)


def drawn_names(n: int) -> list[str]:
    """Names of the n drawn widths in loss terms, smallest first: min, rand1.., max."""
    return ["min", *(f"rand{i}" for i in range(1, n - 1)), "max"]


def subnet_names(n: int) -> list[str]:
    """Names of the n drawn sub-networks in loss terms, in the order drawn: net1.., netn."""
    return [f"net{i}" for i in range(1, n + 1)]


class Step:
    """The step of one stage: `step(x, y, g) -> StepResult` with x (N, 3, H, W) normalised,
    y (N,) int64 and g the step's generator (`step_generator`; required by methods that draw
    widths, ignored by the others). `speed` gives the autocast and whether the model's forwards
    are compiled (`torch.compile`); `ddp` (a distributed cell) is the DDP-wrapped
    `forward(mode, *args)` the trained forwards go through (`distributed.ddp_forwards`).
    Raises ValueError when a drawing method gets no generator.
    """

    def __init__(
        self,
        model: FlexibleModel,
        method: Method,
        stage: Stage,
        speed: Speed | None = None,
        ddp: Callable[..., Any] | None = None,
    ) -> None:
        self.model, self.method, self.stage = model, method, stage
        self.speed = speed or Speed()
        self.distributed = ddp is not None
        feats = method.uses_features
        sub, every = (
            ("forward_sub_features", "forward_all_features")
            if feats
            else ("forward_sub", "forward_all")
        )
        # trained forwards: the model's own, or (a distributed cell) through DDP's
        # `forward(mode, *args)` (`benchmark.training.distributed.Forwards`)
        drawn = "forward_subnet" if method.draws_subnets else "forward_width"
        if ddp is None:
            fwd_sub, fwd_all, fwd_drawn = (
                getattr(model, sub),
                getattr(model, every),
                getattr(model, drawn),
            )
        else:
            fwd_sub, fwd_all = partial(ddp, sub), partial(ddp, every)
            fwd_drawn = partial(ddp, drawn)
        if self.speed.compile:
            fwd_sub, fwd_all = torch.compile(fwd_sub), torch.compile(fwd_all)
            fwd_drawn = torch.compile(fwd_drawn)
        self._sub: Callable = fwd_sub
        self._all: Callable = fwd_all
        self._drawn_forward: Callable = fwd_drawn
        # frozen teachers run without gradient, outside DDP
        self._teacher: Callable = fwd_sub if ddp is None else getattr(model, sub)
        if method.draws_submodels and feats:
            raise ValueError(f"method {method.name} draws sub-models: no stage features")
        if method.draws_submodels and not method.draws_subnets and model.caps.widths is None:
            raise ValueError(f"method {method.name} draws widths: it needs caps.widths")
        if method.draws_subnets and model.caps.elastic is None:
            raise ValueError(f"method {method.name} draws sub-networks: it needs caps.elastic")
        if method.reads_earlier_exits and not model.caps.single_pass:
            raise ValueError(f"method {method.name} reads earlier exits: it needs one pass")
        if method.owns_step and (ddp is not None or self.speed.compile):
            raise ValueError(f"method {method.name} runs its own step: no DDP, no compile")
        # trained sub-models, largest first: a teacher's output exists before its student's
        self.order = sorted(stage.train, reverse=True)

    def __call__(
        self, x: Tensor, y: Tensor, g: torch.Generator | None = None, lr: float | None = None
    ) -> StepResult:
        """`lr`: the step's learning rate, required by methods that run their own step."""
        if self.method.owns_step:
            if lr is None:
                raise ValueError(f"method {self.method.name} runs its own step: pass lr")
            return self._owned(x, y, lr)
        if self.method.draws_submodels:
            if g is None:
                raise ValueError(f"method {self.method.name} draws widths: pass the generator")
            batch = StepBatch(x, y, self.speed.autocast, partial(self._width_losses, x, y))
            widths = self.method.draw_submodels(g, self.model, batch)
            resolutions = self.method.draw_resolutions(g, self.model, len(widths))
            return self._drawn(x, y, widths, resolutions)
        if self.model.caps.single_pass:
            return self._single_pass(x, y)
        return self._per_submodel(x, y)

    def _single_pass(self, x: Tensor, y: Tensor) -> StepResult:
        """All trained sub-models from one forward; one backward of the summed losses."""
        teachers = self._frozen_teachers(x)
        with self.speed.autocast():
            outs = dict(zip(self.order, map(SubOut.of, self._all(x, self.order))))
        teachers.update({k: out.detach() for k, out in outs.items()})
        total = torch.zeros((), device=x.device)
        terms: dict[str, Tensor] = {}
        for k in self.order:
            loss_k, tk = self._loss(k, outs[k], teachers, y)
            total = total + loss_k
            self._record(terms, tk, self.model.submodels[k].name)
        total.backward()
        return StepResult(total.detach(), terms, {k: teachers[k].logits for k in self.order})

    def _per_submodel(self, x: Tensor, y: Tensor) -> StepResult:
        """One forward and one backward per trained sub-model, largest first."""
        teachers = self._frozen_teachers(x)
        total = torch.zeros((), device=x.device)
        terms: dict[str, Tensor] = {}
        for k in self.order:
            with self.speed.autocast():
                out = SubOut.of(self._sub(x, k))
            loss_k, tk = self._loss(k, out, teachers, y)
            loss_k.backward()
            teachers[k] = out.detach()
            total = total + loss_k.detach()
            self._record(terms, tk, self.model.submodels[k].name)
        return StepResult(total, terms, {k: teachers[k].logits for k in self.order})

    def _drawn(
        self,
        x: Tensor,
        y: Tensor,
        draws: list[float] | list[SubNet],
        resolutions: list[int | None],
    ) -> StepResult:
        """One forward and backward per drawn width (smallest first in `draws`), largest first,
        or per drawn sub-network, in the order drawn; draw i on x resized to `resolutions[i]`
        (None: x as it is). The method's loss sees them as sub-models 0..n-1. Logits are
        returned for the draws that are one of the model's listed sub-models (its training
        accuracy, at the resolution the step drew)."""
        n, subnets = len(draws), self.method.draws_subnets
        names = subnet_names(n) if subnets else drawn_names(n)
        space = self.model.caps.elastic if subnets else self.model.caps.widths
        teachers = self._frozen_teachers(x)
        total = torch.zeros((), device=x.device)
        terms: dict[str, Tensor] = {}
        logits: dict[int, Tensor] = {}
        for i in range(n) if subnets else range(n - 1, -1, -1):
            xi = resize(x, resolutions[i])  # float32, before autocast
            with self.speed.autocast():
                out = SubOut.of(self._drawn_forward(xi, draws[i]))
            loss_i, ti = self._loss(i, out, teachers, y, n)
            loss_i.backward()
            teachers[i] = out.detach()
            total = total + loss_i.detach()
            self._record(terms, ti, names[i])
            if (k := space.submodel_of(draws[i])) is not None:
                logits[k] = teachers[i].logits
        return StepResult(total, terms, logits)

    def _width_losses(
        self,
        x: Tensor,
        y: Tensor,
        widths: list[float],
        criterion: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        """`StepBatch.losses`: criterion(z_w, y) of each width, no gradient, train mode, the
        model's buffers restored; the mean over the ranks of a distributed cell (its own
        forward, outside DDP: no gradient to synchronise)."""
        with torch.no_grad(), buffers_kept(self.model), self.speed.autocast():
            out = torch.stack(
                [criterion(self.model.forward_width(x, w).float(), y) for w in widths]
            )
        if self.distributed and dist.is_initialized():
            dist.all_reduce(out)
            out /= dist.get_world_size()
        return out

    def _owned(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """The method's own step (`Method.train_step`), its terms named like the others'."""
        with self.speed.autocast():
            total, per_sub, logits = self.method.train_step(self.model, x, y, lr)
        terms: dict[str, Tensor] = {}
        for k, tk in per_sub.items():
            self._record(terms, tk, self.model.submodels[k].name)
        return StepResult(total.detach(), terms, {k: z.detach() for k, z in logits.items()})

    def _loss(
        self, k: int, out: SubOut, teachers: dict[int, SubOut], y: Tensor, num: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`Method.loss` of sub-model k of `num` (default: the model's sub-models)."""
        feats = None
        if self.method.uses_features:
            feats = {j: t.feats for j, t in teachers.items()}
            feats[k] = out.feats
        logits = {j: t.logits for j, t in teachers.items()}
        num = self.model.num_submodels if num is None else num
        return self.method.loss(k, out.logits, logits, y, num, feats)

    def _frozen_teachers(self, x: Tensor) -> dict[int, SubOut]:
        """Outputs of an offline stage's frozen teachers (TAKD) and of the method's own teacher
        (ofa_ps, at OWN_TEACHER), without gradient."""
        with torch.no_grad(), self.speed.autocast():
            out = {t: SubOut.of(self._teacher(x, t)) for t in self.stage.frozen_teachers}
            if self.method.own_teacher and (z := self.method.teacher_logits(x)) is not None:
                out[OWN_TEACHER] = SubOut.of(z)
        return out

    @staticmethod
    def _record(terms: dict[str, Tensor], tk: dict[str, Tensor], name: str) -> None:
        for term, v in tk.items():
            terms[f"{term}/{name}"] = v.detach()
