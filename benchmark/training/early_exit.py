"""Early-exit evaluation of a multi-exit network: the budgeted-batch curve, its area, and real
early exiting timed at batch 1.

Applies to every model whose sub-models are exits of one pass (`caps.early_exit`: msdnet,
byot_resnet, any architecture declaring it), with every method; decided by the model's
capabilities, never by its name.

1. Curve (`benchmark.training.budgeted`, MSDNet's protocol, Huang et al., ICLR 2018, §5.2;
   kalviny/MSDNet-PyTorch `adaptive_inference.py`): per exit distribution q, thresholds fitted
   on the VALIDATION split's confidences and applied unchanged to the test split. Confidences
   come from the method's exit rule (`Method.exit_probabilities`: max softmax by default, a
   method's own rule where it has one, e.g. ZTW's ensemble).
2. Area (`budgeted_auc`): trapezoid area under test top-1 (%) vs expected cost, over the curve
   plus its two end points (every sample at the first exit: cost c_1, that exit's top-1; every
   sample at the last: c_K, its top-1), divided by c_K - c_1. Every early-exit policy's expected
   cost lies in [c_1, c_K], so the interval is the architecture's, not the cell's: the number is
   the mean top-1 over that interval, in %, comparable across the methods and seeds of one
   architecture, free of the cost unit, and directly comparable with `test/top1_auc` (the same
   interval, exit by exit): their difference is what adaptive exiting gains.
3. Real early exiting (`time_early_exit`): the network runs image by image (batch 1) through
   `forward_exits` (`caps.stops_at_exit`) and stops at the first exit whose confidence passes
   its threshold, at one exit distribution `runtime.early_exit_q` (thresholds fitted on val);
   the wall time of each image (forward, rule and decision) is measured beside the same loop
   running every exit, and beside the FLOPs estimate of the exits taken. A model without
   `stops_at_exit` skips it, and the record says so (`flexbench.early_exit_timing`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from benchmark.costs.axis import auc_top1
from benchmark.costs.flops import timing_threads
from benchmark.costs.speed import Speed
from benchmark.data.pipeline import ImageSet, Normalizer
from benchmark.models import FlexibleModel
from benchmark.record import schema
from benchmark.training.budgeted import budgeted_curve, exit_proportions, fit_thresholds
from benchmark.training.evaluate import Accuracy, ExitRule, evaluate

if TYPE_CHECKING:
    from benchmark.training.train import PreparedCell

# The exit distribution real early exiting is timed at when `runtime.early_exit_q` is `auto`:
# q = 1, every exit receives the same share of the validation samples.
DEFAULT_Q = 1.0


def budgeted_auc(points: list[dict[str, float]], correct: Tensor, costs: list[float]) -> float:
    """Normalised area (%) under the budgeted-batch curve `points` (dicts with `mflops` and
    `top1`), closed by the first and the last exit alone (the top-1 of the exit rule's
    predictions at exit 1 and at exit K, from `correct` (K, N), at `costs[0]` and `costs[-1]`):
    the mean test top-1 over the cost interval [costs[0], costs[-1]] (module docstring)."""
    alone = correct.float().mean(1).mul(100).tolist()
    xs = [costs[0], *(p["mflops"] for p in points), costs[-1]]
    ys = [alone[0], *(p["top1"] for p in points), alone[-1]]
    return auc_top1(xs, ys)


@dataclass
class ExitTiming:
    """Real early exiting of `images` test images at batch 1, exit distribution `q`.

    `ms_median` / `ms_iqr`: wall time per image (ms) when stopping at the exit taken;
    `full_ms_median`: the same loop running every exit (no stopping), for the same images;
    `mflops`: mean cumulative MFLOPs of the exits taken (the FLOPs estimate of the same
    images); `top1`: their top-1 (%); `exits`: images per exit, smallest first."""

    q: float
    images: int
    ms_median: float
    ms_iqr: float
    full_ms_median: float
    mflops: float
    top1: float
    exits: list[int]
    device: str
    threads: int

    def metrics(self) -> dict[str, float]:
        """The parent run's `early_exit/...` final metrics (docs/mlflow-schema.md)."""
        values = {
            "ms_per_image": self.ms_median,
            "ms_per_image_iqr": self.ms_iqr,
            "full_ms_per_image": self.full_ms_median,
            "mflops": self.mflops,
            "top1": self.top1,
            "q": self.q,
            "images": float(self.images),
        }
        return {schema.EARLY_EXIT.format(name=k): v for k, v in values.items()}

    def note(self) -> str:
        """How it was measured, in words (the `flexbench.early_exit_timing` tag)."""
        return (
            f"batch 1, stopping at the first exit over its threshold (fitted on val, exit "
            f"distribution q={self.q:g}), median and IQR over {self.images} test images, each "
            f"timed beside the same image through every exit; images per exit {self.exits}; "
            f"{self.device}, {self.threads} thread" + ("" if self.threads == 1 else "s")
        )


def _images(data: ImageSet, norm: Normalizer, n: int, batch: int) -> Iterator[tuple[Tensor, int]]:
    """The first `n` images of `data`, one at a time ((1, 3, H, W) normalised, label)."""
    seen = 0
    for xb, yb in data.eval_batches(batch, norm, norm.scale.device):
        for i in range(xb.shape[0]):
            if seen == n:
                return
            seen += 1
            yield xb[i : i + 1], int(yb[i])


@torch.no_grad()
def _exit_once(
    model: FlexibleModel, x: Tensor, rule: ExitRule, thresholds: list[float] | None
) -> tuple[int, int]:
    """(exit taken, predicted class) of one image: the exits run in turn and the walk stops at
    the first whose confidence passes its threshold (`thresholds` None: every exit runs and
    the last one decides)."""
    last = model.num_submodels - 1
    seen: list[Tensor] = []
    for k, z in enumerate(model.forward_exits(x)):
        seen.append(z)
        p = rule(seen)
        if k == last or (thresholds is not None and float(p.amax()) >= thresholds[k]):
            break
    return k, int(p.argmax())


def time_early_exit(
    model: FlexibleModel,
    data: ImageSet,
    norm: Normalizer,
    speed: Speed,
    rule: ExitRule,
    thresholds: Tensor,
    costs: list[float],
    q: float,
    images: int,
    warmup: int,
) -> ExitTiming:
    """Real early exiting of the first `images` images of `data` (see `ExitTiming`) with the
    fitted `thresholds` (K,) and cumulative exit costs `costs` (MFLOPs, K). The stopping and
    the every-exit pass of each image run back to back, their order alternating image by image,
    so that load from other processes falls on both alike; `warmup` passes of the first image
    run first, unrecorded. CPU timing runs on one intra-op thread (`timing_threads`). Raises
    ValueError when `data` holds no image."""
    was_training, limits = model.training, thresholds.tolist()
    model.eval()
    stop_ms, full_ms, taken, hits = [], [], [], 0
    try:
        with timing_threads(norm.scale.device) as threads, speed.autocast():
            for i, (x, y) in enumerate(_images(data, norm, images, 256)):
                if i == 0:
                    for _ in range(warmup):
                        _exit_once(model, x, rule, limits), _exit_once(model, x, rule, None)
                for stops in (True, False) if i % 2 == 0 else (False, True):
                    t0 = time.perf_counter()
                    k, pred = _exit_once(model, x, rule, limits if stops else None)
                    (stop_ms if stops else full_ms).append((time.perf_counter() - t0) * 1e3)
                    if stops:
                        taken.append(k)
                        hits += pred == y
    finally:
        model.train(was_training)
    if not taken:
        raise ValueError("real early exiting needs at least one test image")
    q1, med, q3 = np.percentile(stop_ms, [25, 50, 75]).tolist()
    counts = np.bincount(taken, minlength=model.num_submodels).tolist()
    return ExitTiming(
        q, len(taken), med, q3 - q1, float(np.median(full_ms)),
        float(np.mean([costs[k] for k in taken])), 100.0 * hits / len(taken), counts,
        str(norm.scale.device), threads,
    )  # fmt: skip


@dataclass
class EarlyExitResult:
    """A cell's early-exit evaluation: the budgeted-batch points (`budgeted/...` histories,
    `budgeted.csv`), their area (`test/budgeted_auc`), the timing of real early exiting (None
    when skipped) and the `flexbench.early_exit_timing` note (how it was measured, or why not).
    """

    points: list[dict[str, float]]
    auc: float
    timing: ExitTiming | None
    timing_note: str

    def metrics(self) -> dict[str, float]:
        out = {schema.BUDGETED_AUC: self.auc}
        return {**out, **(self.timing.metrics() if self.timing else {})}


def _on_outputs(rule: ExitRule, outputs: Callable[[list[Tensor]], list[Tensor]] | None) -> ExitRule:
    """The exit rule over the raw logits of the exits run so far, when evaluation reads the
    method's `exit_outputs` of them (boosted's sums, ZTW's ensembles: each exit's output
    depends only on the exits up to it, so the outputs of a prefix are the prefix's)."""
    if outputs is None:
        return rule
    return lambda seen: rule(outputs(seen))


def evaluate_early_exit(cell: PreparedCell, test_data: ImageSet, test: Accuracy) -> EarlyExitResult:
    """The early-exit evaluation of a trained cell (see the module docstring): `test` holds the
    test split's confidences under the method's exit rule (`evaluate(..., confidences=True,
    rule=...)`); the validation split is evaluated here, and thresholds are fitted on it alone.
    Real early exiting runs on rank 0 of a distributed cell (the other ranks wait for it) over
    the first `runtime.early_exit_images` images of `test_data`."""
    model, rule, r = cell.model, cell.method.exit_probabilities, cell.cfg["runtime"]
    val = evaluate(model, cell.splits.val, cell.eval, True, rule)
    costs = [c.mflops for c in cell.plan.costs]
    points = budgeted_curve(val.confidence, test.confidence, test.correct, costs)
    auc = budgeted_auc(points, test.correct, costs)
    if not model.caps.stops_at_exit:
        note = (
            f"not measured: architecture {cell.cfg['arch']['name']} as trained by "
            f"{cell.cfg['method']['name']} ({type(model).__name__}) cannot stop at an exit "
            f"(declares no stops_at_exit / forward_exits)"
        )
        return EarlyExitResult(points, auc, None, note)
    if r["early_exit_images"] == 0:
        return EarlyExitResult(points, auc, None, "not measured: runtime.early_exit_images is 0")
    q = DEFAULT_Q if r["early_exit_q"] == "auto" else float(r["early_exit_q"])
    timing = None
    if cell.dist.main:
        thresholds = fit_thresholds(val.confidence, exit_proportions(q, len(costs)))
        timing = time_early_exit(
            model, test_data, cell.eval.norm, cell.speed, _on_outputs(rule, cell.eval.outputs),
            thresholds, costs, q,
            r["early_exit_images"], r["latency_warmup"],
        )  # fmt: skip
    timing = cell.dist.from_main(timing)
    return EarlyExitResult(points, auc, timing, timing.note())
