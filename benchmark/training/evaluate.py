"""Accuracy of every sub-model in one pass over a split (one host sync at the end).

Networks whose BN statistics must be re-estimated per sub-model (`benchmark.training.bn_calib`) are
evaluated one sub-model (or width) at a time, each right after its recalibration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmark.costs.speed import Speed
from benchmark.data.pipeline import ImageSet, Normalizer
from benchmark.methods.base import max_softmax
from benchmark.models import FlexibleModel
from benchmark.models.base import resize
from benchmark.training.distributed import SINGLE, Dist

# forward(x) -> logits of the evaluated sub-models [(N, C), ...]
Forward = Callable[[Tensor], list[Tensor]]
# rule(logits of exits 0..k) -> the class probabilities (N, C) exit k decides on
# (`Method.exit_probabilities`)
ExitRule = Callable[[list[Tensor]], Tensor]


Calibrate = Callable[[Callable[[Tensor], object]], None]


@dataclass(frozen=True)
class EvalSpec:
    """How every evaluation of a cell runs (validation, test, spectrum alike): batch size,
    normaliser (its device is the evaluation device), the cell's `Speed` (its autocast), its BN
    recalibration `calibrate(run)` (None: none, see `benchmark.training.bn_calib`) and, in a
    distributed cell, the rank's `Dist`: each rank evaluates its contiguous part of the split,
    and the counts (and confidences) are reduced over the ranks, so every rank returns the
    accuracy of the whole split. `outputs`: the method's `exit_outputs`, which turns the logits
    of all exits of one pass into the predictions evaluated (None: the logits; applied where
    every sub-model comes from one pass, i.e. without BN recalibration)."""

    batch: int
    norm: Normalizer
    speed: Speed = Speed()
    calibrate: Calibrate | None = None
    dist: Dist = SINGLE
    outputs: Callable[[list[Tensor]], list[Tensor]] | None = None


@dataclass
class Accuracy:
    """Top-1/top-5 in % per sub-model (smallest first). With confidences: the per-sample
    confidence (the maximum of the exit rule's probabilities; max softmax by default) and the
    rule's top-1 correctness of every sub-model, (K, N) each, on CPU, for budgeted-batch
    evaluation (MSDNet, Huang et al. 2018, §5.2)."""

    top1: list[float]
    top5: list[float]
    confidence: Tensor | None = None
    correct: Tensor | None = None


@torch.no_grad()
def _accuracy(
    forward: Forward, k: int, data: ImageSet, spec: EvalSpec, confidences: bool, rule: ExitRule
) -> Accuracy:
    """Accuracy of the `k` outputs of `forward` over `data` (the model already in eval mode);
    output i's confidences come from `rule(outputs[: i + 1])`."""
    device = spec.norm.scale.device
    c1 = torch.zeros(k, device=device)
    c5 = torch.zeros(k, device=device)
    conf, hit1 = [], []
    for xb, yb in data.eval_batches(spec.batch, spec.norm, device, spec.dist.shard):
        with spec.speed.autocast():
            outs = forward(xb)
        for i, z in enumerate(outs):
            top = z.topk(min(5, z.shape[1]), dim=1).indices
            hit = top == yb[:, None]
            c1[i] += hit[:, 0].sum()
            c5[i] += hit.any(1).sum()
        if confidences:
            probs = [rule(outs[: i + 1]) for i in range(len(outs))]
            conf.append(torch.stack([p.amax(1) for p in probs]))
            hit1.append(torch.stack([p.argmax(1) == yb for p in probs]))
    spec.dist.sum_(c1), spec.dist.sum_(c5)
    n = max(1, len(data))
    acc = Accuracy((c1 * 100 / n).tolist(), (c5 * 100 / n).tolist())
    if confidences:  # every rank's part, in rank order: the split's order
        parts = spec.dist.gather((torch.cat(conf, 1).cpu(), torch.cat(hit1, 1).cpu()))
        acc.confidence = torch.cat([c for c, _ in parts], 1)
        acc.correct = torch.cat([h for _, h in parts], 1)
    return acc


def _concat(parts: list[Accuracy]) -> Accuracy:
    acc = Accuracy([a for p in parts for a in p.top1], [a for p in parts for a in p.top5])
    if parts and parts[0].confidence is not None:
        acc.confidence = torch.cat([p.confidence for p in parts], 0)
        acc.correct = torch.cat([p.correct for p in parts], 0)
    return acc


def evaluate(
    model: FlexibleModel,
    data: ImageSet,
    spec: EvalSpec,
    confidences: bool = False,
    rule: ExitRule = max_softmax,
    resolution: int | None = None,
) -> Accuracy:
    """Evaluate every sub-model on the split `data` (`Splits.val`, `Splits.test()`; in memory
    or streamed) in eval mode, on the normaliser's device; the model's train/eval mode is
    restored afterwards. With `confidences`, also each sample's confidence and correctness
    under the exit `rule` (`Method.exit_probabilities`). With `resolution`, every image (and
    every BN calibration image) is resized to it first (`resize`; None: as it is).

    With `spec.calibrate`, sub-models are evaluated one at a time, each right after its BN
    recalibration (the rule then sees each sub-model's logits alone); else all of them in one
    pass over the data.
    """
    k = model.num_submodels
    if spec.calibrate is None:
        post = spec.outputs or (lambda outs: outs)
        fwd = [lambda x: post(model.forward_all(resize(x, resolution)))]
        return run_eval(model, fwd, [k], data, spec, confidences, rule)
    forwards = [lambda x, j=j: [model.forward_sub(resize(x, resolution), j)] for j in range(k)]
    return run_eval(model, forwards, [1] * k, data, spec, confidences, rule)


def run_eval(
    model: FlexibleModel,
    forwards: list[Forward],
    outputs: list[int],
    data: ImageSet,
    spec: EvalSpec,
    confidences: bool = False,
    rule: ExitRule = max_softmax,
) -> Accuracy:
    """Accuracy of each forward's outputs (`outputs[i]` logits from `forwards[i]`), in order;
    with `spec.calibrate`, forward i's BN statistics are recalibrated right before its pass."""
    was_training = model.training
    parts = []
    try:
        for fwd, n in zip(forwards, outputs):
            if spec.calibrate is not None:
                spec.calibrate(fwd)
            model.eval()
            parts.append(_accuracy(fwd, n, data, spec, confidences, rule))
    finally:
        model.train(was_training)
    return _concat(parts)


@torch.no_grad()
def exit_logits(model: FlexibleModel, data: ImageSet, spec: EvalSpec) -> tuple[Tensor, Tensor]:
    """The raw logits (K, N, C) float32 of every exit (one pass per batch, eval mode, no
    `spec.outputs`) and the labels (N,) of the split `data`, on the normaliser's device, in the
    split's order (a distributed cell gathers every rank's part). Raises ValueError for a model
    evaluated after BN recalibration (its sub-models do not come from one pass)."""
    if spec.calibrate is not None:
        raise ValueError("exit logits come from one pass: the model needs no BN recalibration")
    device = spec.norm.scale.device
    was_training = model.training
    model.eval()
    zs, ys = [], []
    try:
        for xb, yb in data.eval_batches(spec.batch, spec.norm, device, spec.dist.shard):
            with spec.speed.autocast():
                zs.append(torch.stack([z.float() for z in model.forward_all(xb)]))
            ys.append(yb)
    finally:
        model.train(was_training)
    parts = spec.dist.gather((torch.cat(zs, 1).cpu(), torch.cat(ys).cpu()))
    logits = torch.cat([z for z, _ in parts], 1).to(device)
    return logits, torch.cat([y for _, y in parts]).to(device)
