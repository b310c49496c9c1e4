"""The end of a cell, in three steps: final evaluation -> rows -> record.

1. `evaluate_final`: every sub-model once on the final split (test; val when a study seals
   test) with the last weights, the early-exit evaluation of early-exit models (budgeted-batch
   curve with thresholds fitted on val and applied to test, its area, real early exiting at
   batch 1: `benchmark.training.early_exit`), the width spectrum, latency, and the best-val
   weights' accuracy (selected on val, reported on test), as one `Measurement` per sub-model
   and spectrum width.
2. `schema.submodel_row`: one row per measurement, every field of the schema table.
3. `record`: the parent run's final metrics and summaries, the child runs and the artifacts
   (resolved config, `submodels.csv`, budgeted points, the checkpoint on request, and whatever
   the installed artifact hooks add, e.g. reports' per-cell figure).

Artifact hooks are entry points of the group `flexbench_cell_artifacts` (pyproject.toml): a
callable `hook(folder, summary: CellSummary) -> [(path, artifact folder or None), ...]`, so that
the training package never imports the report package.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from benchmark.costs.axis import auc_top1, cost_axis
from benchmark.costs.flops import LatencyProfile, latency_profile
from benchmark.data.pipeline import ImageSet
from benchmark.files import disk_errors
from benchmark.record import schema
from benchmark.record.schema import Measurement
from benchmark.training.early_exit import EarlyExitResult, evaluate_early_exit
from benchmark.training.evaluate import evaluate
from benchmark.training.spectrum import lower_resolutions, measure_resolutions, measure_spectrum

if TYPE_CHECKING:
    from benchmark.training.train import PreparedCell

ARTIFACT_HOOKS = "flexbench_cell_artifacts"


@dataclass
class CellResult:
    """A finished cell: its key, MLflow run, rows (`schema.submodel_row`) and final metrics."""

    key: str
    run_id: str
    rows: list[dict[str, Any]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class CellSummary:
    """What an artifact hook sees of a finished cell: a title, the rows (fixed sub-models and
    spectrum points, `schema.submodel_row`), the cost axis (`mflops` or `gbitops`), the split
    the accuracies are on, and the budgeted-batch points (early exits; else empty)."""

    title: str
    rows: list[dict[str, Any]]
    axis: str
    split: str
    budgeted: list[dict[str, float]]


ArtifactHook = Callable[[Path, CellSummary], list[tuple[Path, str | None]]]


@cache
def artifact_hooks() -> tuple[ArtifactHook, ...]:
    """The installed artifact hooks, in name order (loaded once per process)."""
    found = sorted(entry_points(group=ARTIFACT_HOOKS), key=lambda ep: ep.name)
    return tuple(ep.load() for ep in found)


@dataclass
class FinalEvaluation:
    """What `evaluate_final` measured: the split, one measurement per sub-model (`fixed`), per
    spectrum point, the early-exit evaluation (None: not an early-exit model, or test sealed),
    the latency tags and, with a resolution axis, one per sub-model at each lower resolution
    (`at_resolutions`, `benchmark.training.spectrum.measure_resolutions`)."""

    split: str
    fixed: list[Measurement]
    spectrum: list[Measurement]
    early_exit: EarlyExitResult | None
    latency_tags: dict[str, str]
    at_resolutions: list[Measurement] = field(default_factory=list)

    @property
    def measurements(self) -> list[Measurement]:
        return self.fixed + self.at_resolutions + self.spectrum

    @property
    def budgeted(self) -> list[dict[str, float]]:
        """The budgeted-batch points (early-exit models on test; else empty)."""
        return self.early_exit.points if self.early_exit else []


def _final_data(cell: PreparedCell) -> tuple[str, ImageSet]:
    """The split the final numbers are on: test, or val when the study sealed test."""
    if cell.opts.evaluate_test:
        return "test", cell.splits.test()
    return "val", cell.splits.val


def evaluate_final(cell: PreparedCell) -> FinalEvaluation:
    """Step 1: measure every sub-model of the trained cell (see the module docstring). The
    best-val weights are loaded last, when every measurement of the last weights is done."""
    split, data = _final_data(cell)
    plan, spec = cell.plan, cell.eval
    acc = evaluate(cell.model, data, spec, True, cell.method.exit_probabilities)
    early = None
    if cell.model.caps.early_exit and split == "test":
        early = evaluate_early_exit(cell, data, acc)
    lat = _latency(cell, plan.image_size)
    res = plan.image_size if lower_resolutions(cell.model) else None  # a resolution axis
    fixed = [
        Measurement(i, c.name, False, a1, a5, c, None, med, iqr, res)
        for i, (c, a1, a5, med, iqr) in enumerate(
            zip(plan.costs, acc.top1, acc.top5, lat.median_ms, lat.iqr_ms)
        )
    ]
    lower = measure_resolutions(
        cell.model, data, spec, len(fixed), lambda size: _latency(cell, size)
    )
    start = len(fixed) + len(lower)
    spectrum = measure_spectrum(cell.model, data, spec, plan.image_size, start)
    if split == "test" and cell.best.model is not None:  # selected on val, reported on test
        cell.model.load_state_dict(cell.best.model)
        best = evaluate(cell.model, data, spec)
        for m, a1 in zip(fixed, best.top1):
            m.top1_bestval = a1
    return FinalEvaluation(split, fixed, spectrum, early, lat.tags(), lower)


def _latency(cell: PreparedCell, image_size: int) -> LatencyProfile:
    """Every sub-model's latency at input size `image_size`, measured by rank 0 alone (the
    other ranks wait for its numbers)."""
    r = cell.cfg["runtime"]
    lat = None
    if cell.dist.main:
        lat = latency_profile(
            cell.model, image_size, cell.device,
            r["latency_batch"], r["latency_warmup"], r["latency_repeats"],
        )  # fmt: skip
    return cell.dist.from_main(lat)


def finish(cell: PreparedCell) -> CellResult:
    """Final evaluation -> rows -> record; returns the cell's result (on every rank of a
    distributed cell: the measurements are reduced over the ranks)."""
    final = evaluate_final(cell)
    rows = [schema.submodel_row(m) for m in final.measurements]
    metrics = record(cell, final, rows)
    fixed = rows[: len(final.fixed)]
    if not cell.dist.main:
        return CellResult(cell.key, cell.run.run_id, rows, metrics)
    print(
        f"[{cell.key}] finished: "
        + ", ".join(f"{r['name']} {r['top1']:.1f}% @ {r['mflops']:.2f} MFLOPs" for r in fixed)
        + f" ({final.split})",
        file=sys.stderr,
        flush=True,
    )
    return CellResult(cell.key, cell.run.run_id, rows, metrics)


def record(cell: PreparedCell, final: FinalEvaluation, rows: list[dict[str, Any]]) -> dict:
    """Step 3: the MLflow record of the finished cell (final metrics, summaries, child runs,
    artifacts, then status `finished`); returns the parent run's final metrics."""
    split, fixed = final.split, rows[: len(final.fixed)]
    axis = cost_axis([r["mflops"] for r in fixed], [r["gbitops"] for r in fixed])
    metrics = schema.parent_metrics(rows, split)
    if split == "test":
        metrics[schema.BESTVAL_EPOCH] = cell.best.epoch
    top1 = [r["top1"] for r in fixed]
    metrics[schema.TOP1_MEAN.format(split=split)] = sum(top1) / len(top1)
    metrics[schema.TOP1_AUC.format(split=split)] = auc_top1([r[axis] for r in fixed], top1)
    tags = {schema.COST_AXIS: axis, **final.latency_tags}
    if final.early_exit is not None:
        metrics.update(final.early_exit.metrics())
        tags[schema.EARLY_EXIT_TIMING] = final.early_exit.timing_note
    if not cell.dist.main:  # rank 0 alone writes the record
        return metrics
    cell.run.set_tags(tags)
    cfg = cell.cfg
    title = f"{cfg['arch']['name']} / {cfg['method']['name']} / seed {cfg['seed']}"
    summary = CellSummary(title, rows, axis, split, final.budgeted)
    # the artifact files are made in a temporary folder, then copied to MLflow's store: a full
    # disk there is one line, and the trained cell is kept for --resume
    with (
        disk_errors(Path(tempfile.gettempdir()), FINISH_FIX),
        tempfile.TemporaryDirectory(prefix="flexbench-") as tmp,
    ):
        files = artifacts(Path(tmp), cell, summary)
        total = cell.plan.total_epochs
        cell.run.finish(metrics, rows, files, cfg, cell.key, total, final.budgeted)
    return metrics


FINISH_FIX = "make room there, then rerun with --resume to finish the cell (its training is kept)"


def artifacts(
    folder: Path, cell: PreparedCell, summary: CellSummary
) -> list[tuple[Path, str | None]]:
    """Files attached to the cell's run: resolved config, per-sub-model CSV, budgeted-batch
    points, (runtime.log_checkpoint) the weights, and every artifact hook's files."""
    cfg = cell.cfg
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    schema.write_submodels_csv(folder / "submodels.csv", summary.rows)
    out: list[tuple[Path, str | None]] = [
        (folder / "config.yaml", None),
        (folder / "submodels.csv", None),
    ]
    if summary.budgeted:
        with open(folder / "budgeted.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(summary.budgeted[0]))
            writer.writeheader()
            writer.writerows(summary.budgeted)
        out.append((folder / "budgeted.csv", None))
    if cfg["runtime"]["log_checkpoint"] and cell.ckpt.exists():
        out.append((cell.ckpt, "checkpoint"))
    for hook in artifact_hooks():
        out += hook(folder, summary)
    return out
