"""The MLflow schema of flexbench results, in one place (documented in docs/mlflow-schema.md).

`SUBMODEL_FIELDS` is the table of per-sub-model result fields: the trainer's row dicts, the
parent run's final metrics, the child runs, `submodels.csv` and `reports.load`'s tidy table all
iterate it, so a new per-sub-model metric is one row here (plus its line in the doc; a test
fails without it). The `flexbench.*` tag names are the constants below.
Imports nothing heavy: the `flexbench` CLI and the readers import it freely.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "flexbench."

# --- tags of a cell's parent run ---------------------------------------------------------------
CELL = PREFIX + "cell"  # the cell key (hash of the resolved config minus runtime settings)
ARCH = PREFIX + "arch"
DATASET = PREFIX + "dataset"
METHOD = PREFIX + "method"
SEED = PREFIX + "seed"
PROFILE = PREFIX + "profile"
STATUS = PREFIX + "status"  # running | finished | failed | interrupted | pruned
ERROR = PREFIX + "error"
GIT_COMMIT = PREFIX + "git_commit"
DEVICE = PREFIX + "device"
TORCH = PREFIX + "torch"
WORLD_SIZE = PREFIX + "world_size"  # ranks the cell trained on (`runtime.world_size`)
GRID = PREFIX + "grid"
EXECUTOR = PREFIX + "executor"
GRID_CELLS = PREFIX + "grid_cells"  # on a grid's plan run (kind=grid): cells planned
GRID_EXCLUDED = PREFIX + "grid_excluded"
GRID_FILE = PREFIX + "grid_file"
GRID_RECORDED = PREFIX + "grid_recorded"
SPLIT_SEED = PREFIX + "split_seed"
VAL_HASH = PREFIX + "val_hash"
DATA_IN_MEMORY = PREFIX + "data_in_memory"  # "true": decoded in memory, "false": streamed
DATA_MEMORY_NOTE = PREFIX + "data_memory"  # why: the decoded size against the free memory
DATA_HASH = PREFIX + "data_hash"  # hash of the decoded images, labels and classes of the data
RESUME_CHANGES = PREFIX + "resume_changes"  # settings a resume changed: `epoch N: k a -> b; ...`
LATENCY_METHOD = PREFIX + "latency_method"  # how latency was measured, in words
LATENCY_THREADS = PREFIX + "latency_threads"
# early-exit architectures: how real early exiting was timed, or why it was not
EARLY_EXIT_TIMING = PREFIX + "early_exit_timing"
TEST_EVALUATED = PREFIX + "test_evaluated"
COST_AXIS = PREFIX + "cost_axis"
AMP = PREFIX + "amp"  # bf16 | fp32: the autocast a cell trained and evaluated with
COMPILE = PREFIX + "compile"  # true | false: torch.compile of the step's forwards
MEMORY_FORMAT = PREFIX + "memory_format"  # channels_last | contiguous
CPU_CAPABILITY = PREFIX + "cpu_capability"  # e.g. AVX2, AVX512+bf16+amx (benchmark.costs.speed)
# --- tags of a sub-model's child run ----------------------------------------------------------
SUBMODEL = PREFIX + "submodel"
SUBMODEL_INDEX = PREFIX + "submodel_index"
SPECTRUM = PREFIX + "spectrum"  # "true" on a width-spectrum point, "false" on a fixed sub-model
RESOLUTION = PREFIX + "resolution"  # input size (px) of a row of a cell with a resolution axis
# --- study and report runs ---------------------------------------------------------------------
KIND = PREFIX + "kind"  # study | report: not a cell
STUDY = PREFIX + "study"
TRIAL = PREFIX + "trial"
RETRY_OF = PREFIX + "retry_of"
TRIAL_STATE = PREFIX + "trial_state"
STORAGE = PREFIX + "storage"
SAMPLER = PREFIX + "sampler"
PRUNER = PREFIX + "pruner"
OBJECTIVE = PREFIX + "objective"
BEST_TRIAL = PREFIX + "best_trial"
BEST_VALUE = PREFIX + "best_value"
BEST_PARAM = PREFIX + "best.{param}"  # one per hyperparameter of the best trial
TRIALS_IN_STATE = PREFIX + "trials_{state}"  # trial counts per Optuna state
REPORT_OF = PREFIX + "report_of"

# The tags that say which cell a run belongs to: on the parent run and on every child run.
CELL_TAGS = (CELL, ARCH, DATASET, METHOD, SEED, PROFILE)

# Name prefix of a width-spectrum point (`spectrum/w0.30`), a sub-model row beside the fixed ones.
SPECTRUM_NAME_PREFIX = "spectrum/"
# Name suffix of a row below the data's image size (`w0.25-r16`, `spectrum/w0.30-r16`): the
# axes of a name are joined by dashes (flex_vit's `h3-f0.25`); MLflow refuses `@` in metric keys.
RESOLUTION_NAME_SEP = "-r"

TAGS: tuple[str, ...] = tuple(
    v
    for k, v in dict(globals()).items()
    if k.isupper()
    and isinstance(v, str)
    and k not in ("PREFIX", "SPECTRUM_NAME_PREFIX", "RESOLUTION_NAME_SEP")
)
"""Every tag name above (patterns keep their `{placeholder}`), for the documentation test."""


@dataclass
class Measurement:
    """What the trainer measured of one sub-model (or width-spectrum point) at the end of a
    cell; each `SubmodelField.source` is a dotted path into it. `cost` is the sub-model's
    `benchmark.costs.flops.SubCost` (mmacs, mflops, params_m, gbitops)."""

    index: int
    name: str
    spectrum: bool
    top1: float
    top5: float
    cost: Any
    top1_bestval: float | None = None
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    resolution: int | None = None  # input size (px), in cells with a resolution axis only


def at_resolution(name: str, resolution: int | None) -> str:
    """The name of sub-model (or spectrum point) `name` run at `resolution` px below the data's
    image size, e.g. `w0.25-r16`; `name` itself for None (the image size)."""
    return name if resolution is None else f"{name}{RESOLUTION_NAME_SEP}{resolution}"


@dataclass(frozen=True)
class SubmodelField:
    """One per-sub-model result.

    name: key in the trainer's row dicts and column of `reports.load`'s tidy table;
    parent: final metric on the cell's parent run, a pattern over `{split}` (`test`, or `val`
    when a study seals the test split) and `{sub}` (sub-model name); None for identity fields;
    child: metric of the sub-model's child run, or the tag that carries it there;
    csv: column of `submodels.csv`; unit: unit of the value; source: where its value is read
    from a `Measurement` (a dotted attribute path; default: the field's name)."""

    name: str
    parent: str | None
    child: str
    csv: str
    unit: str
    description: str
    source: str = ""

    @property
    def is_metric(self) -> bool:
        return self.parent is not None

    def parent_key(self, sub: str, split: str = "test") -> str:
        if self.parent is None:
            raise ValueError(f"sub-model field {self.name!r} has no parent-run metric")
        return self.parent.format(split=split, sub=sub)

    def read(self, measured: Measurement) -> Any:
        """The field's value in `measured` (booleans as "true" / "false", as tags hold them)."""
        value: Any = measured
        for part in (self.source or self.name).split("."):
            value = getattr(value, part)
        return str(value).lower() if isinstance(value, bool) else value


SUBMODEL_FIELDS: tuple[SubmodelField, ...] = (
    SubmodelField("index", None, SUBMODEL_INDEX, "index", "", "position, smallest sub-model 0"),
    SubmodelField("name", None, SUBMODEL, "name", "", "sub-model name, e.g. exit3 or w0.5"),
    SubmodelField(
        "spectrum",
        None,
        SPECTRUM,
        "spectrum",
        "",
        "true for a width-spectrum point (spectrum/w0.30) of a universally slimmable network",
    ),
    SubmodelField(
        "resolution",
        None,
        RESOLUTION,
        "resolution",
        "px",
        "input size of the row in a cell with a resolution axis (arch.resolutions); else empty",
    ),
    SubmodelField("top1", "{split}/top1/{sub}", "top1", "top1", "%", "top-1 accuracy"),
    SubmodelField("top5", "{split}/top5/{sub}", "top5", "top5", "%", "top-5 accuracy"),
    SubmodelField(
        "top1_bestval",
        "{split}/top1_bestval/{sub}",
        "top1_bestval",
        "top1_bestval",
        "%",
        "top-1 of the epoch with the best mean validation top-1 (selected on val)",
    ),
    SubmodelField(
        "mmacs", "mmacs/{sub}", "mmacs", "mmacs", "millions", "multiply-accumulates", "cost.mmacs"
    ),
    SubmodelField(
        "mflops", "mflops/{sub}", "mflops", "mflops", "millions", "FLOPs, forward", "cost.mflops"
    ),
    SubmodelField(
        "params_m",
        "params_m/{sub}",
        "params_m",
        "params_m",
        "millions",
        "parameters",
        "cost.params_m",
    ),
    SubmodelField(
        "gbitops",
        "gbitops/{sub}",
        "gbitops",
        "gbitops",
        "billions",
        "bit-operations: MACs x weight bits x activation bits",
        "cost.gbitops",
    ),
    SubmodelField(
        "latency_ms", "latency_ms/{sub}", "latency_ms", "latency_ms", "ms", "latency (median)"
    ),
    SubmodelField(
        "latency_iqr_ms",
        "latency_iqr_ms/{sub}",
        "latency_iqr_ms",
        "latency_iqr_ms",
        "ms",
        "latency interquartile range",
    ),
)
FIELDS = {f.name: f for f in SUBMODEL_FIELDS}


def metric_fields() -> tuple[SubmodelField, ...]:
    """The fields of `SUBMODEL_FIELDS` that are metrics (read at call time, so that a field
    added to the table reaches every writer)."""
    return tuple(f for f in SUBMODEL_FIELDS if f.is_metric)


# Per-cell summaries over the sub-models, final metrics of the parent run.
TOP1_MEAN = "{split}/top1_mean"
TOP1_AUC = "{split}/top1_auc"
# The epoch (0-based, the step of the per-epoch metrics) whose weights give top1_bestval.
BESTVAL_EPOCH = "bestval_epoch"
# Early-exit architectures (benchmark.training.early_exit): the budgeted-batch curve's
# normalised area, and real early exiting at batch 1 (`early_exit/ms_per_image`, ...).
BUDGETED_AUC = "test/budgeted_auc"
EARLY_EXIT = "early_exit/{name}"


def is_wall_time(key: str) -> bool:
    """Whether a parent-run metric is a measured wall time (per-sub-model latency, real early
    exiting's ms per image), which no rerun reproduces exactly, unlike every other metric."""
    return key.startswith("latency_ms/") or (
        key.startswith("early_exit/") and "ms_per_image" in key
    )


def short_dataset(name: str) -> str:
    """A dataset's short name, as grid labels and reports show it: a file-backed dataset by
    its file name (`imagefolder:/any/dir/cifar10-jpeg.zip` -> `imagefolder:cifar10-jpeg.zip`),
    so that runs elsewhere read the same; any other name as written."""
    kind, sep, path = name.partition(":")
    return f"{kind}:{Path(path.rstrip('/')).name}" if sep and path else name


def submodel_row(measured: Measurement) -> dict[str, Any]:
    """The trainer's row of one sub-model: every field of `SUBMODEL_FIELDS`, read from what was
    measured (the one place rows are built, for fixed sub-models and spectrum points alike)."""
    return {f.name: f.read(measured) for f in SUBMODEL_FIELDS}


def parent_metrics(rows: Iterable[Mapping[str, Any]], split: str) -> dict[str, float]:
    """The parent run's final per-sub-model metrics, e.g. `test/top1/exit1`, from the trainer's
    rows (one dict per sub-model with the keys of `SUBMODEL_FIELDS`); a missing or None value
    is left out (never logged as 0)."""
    out: dict[str, float] = {}
    for row in rows:
        for f in metric_fields():
            if row.get(f.name) is not None:
                out[f.parent_key(row["name"], split)] = float(row[f.name])
    return out


def child_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one sub-model's child run (`top1`, `mflops`, ...), Nones left out."""
    return {f.child: float(row[f.name]) for f in metric_fields() if row.get(f.name) is not None}


def child_tags(row: Mapping[str, Any]) -> dict[str, str]:
    """The tags that identify one sub-model's child run: its name, index, spectrum flag (rows
    without a flag are fixed sub-models: "false") and, with a resolution axis, its resolution
    (a None identity value is left out)."""
    row = {"spectrum": "false", **row}
    return {
        f.child: str(row[f.name])
        for f in SUBMODEL_FIELDS
        if not f.is_metric and row.get(f.name) is not None
    }


def csv_columns() -> list[str]:
    """The header of `submodels.csv`, in table order."""
    return [f.csv for f in SUBMODEL_FIELDS]


def write_submodels_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """`submodels.csv`: one line per sub-model, the columns of `csv_columns()` (empty where a
    row lacks a value)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(csv_columns())
        for row in rows:
            writer.writerow(
                ["" if row.get(f.name) is None else row[f.name] for f in SUBMODEL_FIELDS]
            )
