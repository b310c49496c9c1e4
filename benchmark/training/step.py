"""One optimisation step of a stage, in one of two shapes.

- `single_pass_step`: one forward yields every trained sub-model (early exits, e.g. MSDNet); the
  losses are summed and back-propagated once.
- `per_submodel_step`: one forward per sub-model (widths, depths, bit-widths, separate
  networks), largest first, each back-propagated at once so memory holds one sub-model's graph.

Both build the same `SubOut`s and call `Method.loss` the same way: teachers are this step's
outputs of larger sub-models (or of a stage's frozen teachers), detached, never recomputed
(DESIGN.md §3). Gradients are left in `.grad`; the caller steps the optimizer.

A method may instead draw the widths of this step (`Method.draw_submodels`, e.g. the sandwich
rule) from the step's generator (`step_generator`, seeded by seed, epoch and step only): then
`drawn_width_step` runs them with `model.forward_width`, largest first, in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from benchmark.methods import Method, Stage
from benchmark.models import FlexibleModel


class SubOut(NamedTuple):
    """A sub-model's output in one step: logits (N, C) float32 and, for feature-based methods,
    its stage feature maps [(N, C_s, H_s, W_s), ...] float32 (None otherwise)."""

    logits: Tensor
    feats: list[Tensor] | None

    def detach(self) -> SubOut:
        feats = None if self.feats is None else [f.detach() for f in self.feats]
        return SubOut(self.logits.detach(), feats)


@dataclass
class StepResult:
    """Detached results of one step: total loss (), named loss terms `<term>/<sub-model>` -> (),
    and the logits (N, C) of every trained sub-model by index (for training accuracy)."""

    loss: Tensor
    terms: dict[str, Tensor]
    logits: dict[int, Tensor]


@dataclass
class StepContext:
    """What both step shapes need; `forward_sub(x, k)` / `forward_all(x, which)` return SubOuts."""

    model: FlexibleModel
    method: Method
    stage: Stage
    autocast: Callable[[], AbstractContextManager]
    forward_sub: Callable[[Tensor, int], SubOut]
    forward_all: Callable[[Tensor, list[int]], list[SubOut]]
    forward_width: Callable[[Tensor, float], SubOut] | None = None

    @property
    def order(self) -> list[int]:
        """Trained sub-models, largest first: a teacher's output exists before its student's."""
        return sorted(self.stage.train, reverse=True)

    def loss(
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

    def frozen_teachers(self, x: Tensor) -> dict[int, SubOut]:
        """Outputs of an offline stage's frozen teachers (TAKD), without gradient."""
        with torch.no_grad(), self.autocast():
            return {t: self.forward_sub(x, t) for t in self.stage.frozen_teachers}

    def record(
        self, terms: dict[str, Tensor], k: int, tk: dict[str, Tensor], name: str | None = None
    ) -> None:
        name = self.model.submodels[k].name if name is None else name
        for term, v in tk.items():
            terms[f"{term}/{name}"] = v.detach()


def single_pass_step(ctx: StepContext, x: Tensor, y: Tensor) -> StepResult:
    """All trained sub-models from one forward; one backward of the summed losses."""
    teachers = ctx.frozen_teachers(x)
    order = ctx.order
    with ctx.autocast():
        outs = dict(zip(order, ctx.forward_all(x, order)))
    teachers.update({k: out.detach() for k, out in outs.items()})
    total = torch.zeros((), device=x.device)
    terms: dict[str, Tensor] = {}
    for k in order:
        loss_k, tk = ctx.loss(k, outs[k], teachers, y)
        total = total + loss_k
        ctx.record(terms, k, tk)
    total.backward()
    return StepResult(total.detach(), terms, {k: teachers[k].logits for k in order})


def per_submodel_step(ctx: StepContext, x: Tensor, y: Tensor) -> StepResult:
    """One forward and one backward per trained sub-model, largest first."""
    teachers = ctx.frozen_teachers(x)
    total = torch.zeros((), device=x.device)
    terms: dict[str, Tensor] = {}
    for k in ctx.order:
        with ctx.autocast():
            out = ctx.forward_sub(x, k)
        loss_k, tk = ctx.loss(k, out, teachers, y)
        loss_k.backward()
        teachers[k] = out.detach()
        total = total + loss_k.detach()
        ctx.record(terms, k, tk)
    return StepResult(total, terms, {k: teachers[k].logits for k in ctx.order})


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of a step's random choices (e.g. the sandwich rule's widths): a CPU
    generator seeded by (seed, global epoch, step) only, so every method draws the same at a
    seed and a resumed run redraws exactly what the interrupted one would have, without state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)


def drawn_names(n: int) -> list[str]:
    """Names of the n drawn widths in loss terms, smallest first: min, rand1.., max."""
    return ["min", *(f"rand{i}" for i in range(1, n - 1)), "max"]


def drawn_width_step(ctx: StepContext, x: Tensor, y: Tensor, widths: list[float]) -> StepResult:
    """One forward and backward per drawn width (smallest first in `widths`), largest first;
    the method's loss sees them as sub-models 0..n-1. Logits are returned for the drawn widths
    that equal one of the model's sub-models (for its training accuracy)."""
    if ctx.forward_width is None or ctx.method.uses_features:
        raise RuntimeError(f"method {ctx.method.name} draws widths: it needs forward_width")
    n, names = len(widths), drawn_names(len(widths))
    fixed = {round(w, 6): k for k, w in enumerate(getattr(ctx.model, "widths", []))}
    teachers: dict[int, SubOut] = {}
    total = torch.zeros((), device=x.device)
    terms: dict[str, Tensor] = {}
    logits: dict[int, Tensor] = {}
    for i in range(n - 1, -1, -1):
        with ctx.autocast():
            out = ctx.forward_width(x, widths[i])
        loss_i, ti = ctx.loss(i, out, teachers, y, n)
        loss_i.backward()
        teachers[i] = out.detach()
        total = total + loss_i.detach()
        ctx.record(terms, i, ti, names[i])
        if round(widths[i], 6) in fixed:
            logits[fixed[round(widths[i], 6)]] = teachers[i].logits
    return StepResult(total, terms, logits)


def _as_out(raw: Tensor | tuple[Tensor, list[Tensor]]) -> SubOut:
    if isinstance(raw, tuple):
        z, f = raw
        return SubOut(z.float(), [v.float() for v in f])
    return SubOut(raw.float(), None)


def make_step(
    model: FlexibleModel,
    method: Method,
    stage: Stage,
    device: torch.device,
    amp: bool,
    compile_model: bool = False,
) -> Callable[[Tensor, Tensor], StepResult]:
    """The step function of one stage: `step(x (N,3,H,W) normalised, y (N,) int64, g)`, with
    `g` the step's generator (`step_generator`; None: the method draws nothing this step).

    `amp`: bf16 autocast on `device`; `compile_model`: `torch.compile` the model's forwards.
    """
    fwd_sub, fwd_all = model.forward_sub, model.forward_all
    fwd_width = getattr(model, "forward_width", None)
    if method.uses_features:
        fwd_sub, fwd_all = model.forward_sub_features, model.forward_all_features
    if compile_model:
        fwd_sub, fwd_all = torch.compile(fwd_sub), torch.compile(fwd_all)
        fwd_width = torch.compile(fwd_width) if fwd_width is not None else None
    ctx = StepContext(
        model,
        method,
        stage,
        lambda: torch.autocast(device.type, torch.bfloat16, enabled=amp),
        lambda x, k: _as_out(fwd_sub(x, k)),
        lambda x, which: [_as_out(r) for r in fwd_all(x, which)],
        None if fwd_width is None else lambda x, w: _as_out(fwd_width(x, w)),
    )
    shape = single_pass_step if model.single_pass else per_submodel_step

    draws = type(method).draw_submodels is not Method.draw_submodels

    def step(x: Tensor, y: Tensor, g: torch.Generator | None = None) -> StepResult:
        if draws and g is None:
            raise ValueError(f"method {method.name} draws widths: pass the step's generator")
        widths = None if g is None else method.draw_submodels(g, model)
        if widths is not None:
            return drawn_width_step(ctx, x, y, widths)
        return shape(ctx, x, y)

    return step
