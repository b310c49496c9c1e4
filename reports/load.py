"""Read a flexbench experiment from MLflow into tidy pandas tables.

`load_experiment` returns
- `cells`: one row per cell (arch, dataset, profile, method, seed) with its status: `finished`,
  the parent run's own status (`failed`, `running`, `interrupted`, `pruned`), `incomplete`
  (finished but without test metrics), or `missing` (no run at all although the grid planned
  it: the plan `flexbench grid run` records, see `load_plan`; for an experiment without a
  plan, although the experiment holds that arch/dataset and that method and that seed
  elsewhere);
- `tidy`: one row per finished cell x sub-model with a column per metric of
  `benchmark.record.schema.SUBMODEL_FIELDS` (top-1/top-5 on the test split at the last epoch, MMACs,
  MFLOPs, GBitOps, parameters, latency), read from the parent run's final metrics
  (`test/top1/<sub>`, ...), with the sub-model's position from its child run, and the panel's
  cost: `cost_axis` ("mflops" or "gbitops", `benchmark.costs.axis` on the panel's sub-model
  costs, the trainer's rule) and `cost` (that metric's value). Every figure, table and AUC of a
  panel uses this one column, so bit-width sub-models, which share their MFLOPs, stay apart.
- `spectrum`: the width-spectrum points of universally slimmable cells (sub-models named
  `spectrum/w<width>`, `benchmark.training.spectrum`) and, in cells with a resolution axis,
  every point and fixed sub-model at a lower input resolution (`spectrum/w0.30-r16`,
  `w0.25-r16`), in the columns of `tidy` plus `width`, `resolution` (px; NaN: the data's image
  size) and `listed` (a fixed sub-model's width, not a spectrum point); they are not in `tidy`,
  so tables, ranks and means cover the fixed sub-models at the image size only.

Runs tagged `flexbench.kind` (e.g. `report`), runs without `flexbench.cell`, child runs and cells
whose final metrics are on the validation split (study trials, `flexbench.test_evaluated=false`)
are not cells of the benchmark and are only counted in `ignored`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd

from benchmark.costs.axis import cost_axis
from benchmark.errors import ConfigError
from benchmark.record import schema

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PANEL = ["arch", "dataset", "profile"]
CELL = [*PANEL, "method", "seed"]
SUB_METRICS = tuple(f.name for f in schema.metric_fields())
SPLIT = "test"  # cells whose final metrics are on the validation split are not read


@dataclass
class Experiment:
    name: str
    experiment_id: str
    uri: str
    cells: pd.DataFrame
    tidy: pd.DataFrame
    ignored: dict[str, int] = field(default_factory=dict)
    plan: dict | None = None  # the grid's recorded plan (`load_plan`), None if none
    spectrum: pd.DataFrame = field(default_factory=pd.DataFrame)  # width-spectrum points

    @property
    def finished(self) -> pd.DataFrame:
        return self.cells[self.cells["status"] == "finished"]


def resolve_experiment(client: MlflowClient, name: str):
    from benchmark.record.tracking import experiment_id

    experiment_id(client, name, create=False)  # a deleted experiment: how to restore it
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        listing = ", ".join(names) if names else "(none)"
        raise ConfigError(
            f"no MLflow experiment named {name!r} at {client.tracking_uri}; "
            f"experiments there: {listing}"
        )
    return exp


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index)


def _tag(df: pd.DataFrame, tag: str) -> pd.Series:
    return _col(df, "tags." + tag)


def _parents(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Cell runs only; the others are counted by reason."""
    kind = _tag(runs, schema.KIND)
    cell = _tag(runs, schema.CELL)
    is_child = _col(runs, "tags.mlflow.parentRunId").notna()
    ignored = {
        "report and other non-cell flexbench runs": int((kind.notna()).sum()),
        "runs without flexbench tags": int((cell.isna() & kind.isna()).sum()),
    }
    parents = runs[cell.notna() & kind.isna() & ~is_child].copy()
    val_only = _tag(parents, schema.TEST_EVALUATED).astype(str).str.lower() == "false"
    ignored["cells evaluated on the validation split only (study trials)"] = int(val_only.sum())
    return parents[~val_only], ignored


def _sub_order(runs: pd.DataFrame) -> dict[tuple[str, str], int]:
    """(parent run id, sub-model name) -> sub-model index, from the child runs."""
    sub, idx = _tag(runs, schema.SUBMODEL), _tag(runs, schema.SUBMODEL_INDEX)
    parent = _col(runs, "tags.mlflow.parentRunId")
    ok = sub.notna() & parent.notna()
    out = {}
    for p, s, i in zip(parent[ok], sub[ok], idx[ok]):
        try:
            out[(p, s)] = int(i)
        except (TypeError, ValueError):
            continue
    return out


def _method_labels(parents: pd.DataFrame) -> pd.Series:
    """Each cell's method as `benchmark.methods.method_label` names it, from the logged
    `method.<param>` params: cells of one method with other parameters stay apart."""
    from benchmark.methods import method_label  # here: importing the methods imports torch

    method = _tag(parents, schema.METHOD).fillna("?")
    cols = [c for c in parents.columns if c.startswith("params.method.")]
    labels = []
    for i, name in zip(parents.index, method):
        params = {c[len("params.method.") :]: parents.at[i, c] for c in cols}
        params = {k: v for k, v in params.items() if isinstance(v, str) and k != "name"}
        labels.append(method_label(name, params))
    return pd.Series(labels, index=parents.index)


def _setups(parents: pd.DataFrame) -> list[tuple[dict[str, str], set[str]]]:
    """Each cell's settings that change the network or the protocol, from its logged params:
    `arch.*`, `data.*`, `train.*`, less what is not in the cell key (`data.root`,
    `data.download`, a key at its neutral value, `benchmark.config`) and the dataset (a panel of
    its own); with the architecture settings its method turns on (imta's `arch.ge`), which are
    the method, not a setup, and so never compared."""
    from benchmark.config import KEY_NEUTRAL, NON_SEMANTIC
    from benchmark.methods import METHODS

    cols = [
        c
        for c in parents.columns
        if c.startswith(("params.arch.", "params.data.", "params.train."))
    ]
    out = []
    for i, arch, method in zip(
        parents.index, _tag(parents, schema.ARCH), _tag(parents, schema.METHOD)
    ):
        specs = METHODS.get(method).ARCH_SETTINGS if method in METHODS.names() else {}
        own = {f"arch.{k}" for k in specs.get(arch, {})}
        setup = {}
        for c in cols:
            key, value = c[len("params.") :], parents.at[i, c]
            section, _, name = key.partition(".")
            skip = name == "name" or (section, name) in NON_SEMANTIC or key in own
            neutral = (section, name) in KEY_NEUTRAL and value == str(KEY_NEUTRAL[(section, name)])
            if isinstance(value, str) and not skip and not neutral:
                setup[key] = value
        out.append((setup, own))
    return out


def _variant_labels(parents: pd.DataFrame, labels: pd.Series) -> pd.Series:
    """Method labels with the settings in which a cell differs from its panel's usual setup (the
    one most of its cells share), e.g. `joint [arch.n_blocks=4]`: another network or protocol is
    another row of every table, never pooled into the method's mean."""
    setups, owned = zip(*_setups(parents)) if len(parents) else ((), ())
    panels = list(zip(*(_tag(parents, t) for t in (schema.ARCH, schema.DATASET, schema.PROFILE))))
    usual: dict[tuple, dict[str, str]] = {}
    for panel in set(panels):
        seen = Counter(
            json.dumps(st, sort_keys=True) for st, p in zip(setups, panels) if p == panel
        )
        usual[panel] = json.loads(min(seen, key=lambda k: (-seen[k], k)))
    out = []
    for label, setup, own, panel in zip(labels, setups, owned, panels):
        ref = usual[panel]
        keys = sorted({*setup, *ref} - own)
        diff = [f"{k}={setup.get(k, '-')}" for k in keys if setup.get(k) != ref.get(k)]
        out.append(f"{label} [{', '.join(diff)}]" if diff else label)
    return pd.Series(out, index=labels.index)


def _cell_frame(parents: pd.DataFrame) -> pd.DataFrame:
    seed = pd.to_numeric(_tag(parents, schema.SEED), errors="coerce")
    cells = pd.DataFrame(
        {
            "arch": _tag(parents, schema.ARCH).fillna("?"),
            "dataset": _tag(parents, schema.DATASET).fillna("?"),
            "profile": _tag(parents, schema.PROFILE).fillna("?"),
            "method": _variant_labels(parents, _method_labels(parents)),
            "seed": seed,
            "status": _tag(parents, schema.STATUS).fillna("unknown"),
            "error": _tag(parents, schema.ERROR),
            "run_id": parents["run_id"],
            "cell": _tag(parents, schema.CELL),
            "start_time": parents["start_time"],
        }
    )
    cells = cells[cells["seed"].notna()].copy()
    cells["seed"] = cells["seed"].astype(int)
    return cells


def _tidy_rows(
    parents: pd.DataFrame, cells: pd.DataFrame, order: dict[tuple[str, str], int]
) -> tuple[pd.DataFrame, set[str]]:
    """One row per finished cell x sub-model; returns also the finished runs lacking metrics."""
    prefix = "metrics." + schema.FIELDS["top1"].parent_key("", SPLIT)
    sub_cols = [c for c in parents.columns if c.startswith(prefix)]
    by_id = parents.set_index("run_id")
    rows, incomplete = [], set()
    for cell in cells[cells["status"] == "finished"].itertuples(index=False):
        run = by_id.loc[cell.run_id]
        subs = [c[len(prefix) :] for c in sub_cols if pd.notna(run[c])]
        if not subs:
            incomplete.add(cell.run_id)
            continue
        for sub in subs:
            row = {k: getattr(cell, k) for k in CELL}
            row.update(submodel=sub, run_id=cell.run_id)
            for f in schema.metric_fields():
                col = "metrics." + f.parent_key(sub, SPLIT)
                row[f.name] = float(run[col]) if col in run.index and pd.notna(run[col]) else None
            row["submodel_index"] = order.get((cell.run_id, sub))
            auc = run.get("metrics." + schema.BUDGETED_AUC)
            row["budgeted_auc"] = float(auc) if auc is not None and pd.notna(auc) else None
            rows.append(row)
    cols = [*CELL, "submodel", "submodel_index", "run_id", *SUB_METRICS, "budgeted_auc"]
    tidy = pd.DataFrame(rows, columns=[*cols, "cost_axis", "cost"])
    if tidy.empty:
        return tidy, incomplete
    for name in (*SUB_METRICS, "budgeted_auc"):
        tidy[name] = pd.to_numeric(tidy[name])
    tidy = _with_cost(tidy)
    # Sub-models without a child run: order by cost (sub-models are smallest first).
    missing = tidy["submodel_index"].isna()
    if missing.any():
        rank = tidy.groupby("run_id")["cost"].rank(method="first") - 1
        tidy.loc[missing, "submodel_index"] = rank[missing]
    tidy["submodel_index"] = tidy["submodel_index"].astype(int)
    return tidy.sort_values([*CELL, "submodel_index"]).reset_index(drop=True), incomplete


def _with_cost(tidy: pd.DataFrame) -> pd.DataFrame:
    """Set `cost_axis` per panel from its sub-models' mean costs, and `cost` from that axis.
    A panel with any cell lacking GBitOps (runs older than the bit-ops column) uses MFLOPs."""
    axes = {}
    for panel, g in tidy.groupby(PANEL, sort=False):
        by_sub = g.groupby("submodel")
        bitops = by_sub["gbitops"].mean().tolist()
        if g["gbitops"].isna().any():
            bitops = [None] * len(bitops)
        axes[panel] = cost_axis(by_sub["mflops"].mean().tolist(), bitops)
    tidy["cost_axis"] = [axes[p] for p in tidy[PANEL].itertuples(index=False, name=None)]
    tidy["cost"] = tidy["mflops"].where(tidy["cost_axis"] == "mflops", tidy["gbitops"])
    return tidy


def _dedupe(cells: pd.DataFrame) -> pd.DataFrame:
    """One run per cell: the latest finished one, else the latest one; others `superseded`."""
    if cells.empty:
        return cells.assign(superseded=pd.Series(dtype=int))
    cells = cells.copy()
    cells["_done"] = cells["status"] == "finished"
    cells = cells.sort_values(["_done", "start_time"], ascending=[False, False])
    dup = cells.duplicated(CELL, keep="first")
    counts = cells[dup].groupby(CELL).size().rename("superseded")
    keep = cells[~dup].drop(columns="_done").set_index(CELL)
    keep = keep.join(counts).fillna({"superseded": 0}).reset_index()
    keep["superseded"] = keep["superseded"].astype(int)
    return keep


def _with_missing(cells: pd.DataFrame) -> pd.DataFrame:
    """Add `missing` rows: observed (arch, dataset, profile) x methods x seeds without a run."""
    if cells.empty:
        return cells
    methods = sorted(cells["method"].unique())
    seeds = sorted(cells["seed"].unique())
    have = set(map(tuple, cells[CELL].itertuples(index=False)))
    rows = []
    for panel in cells[PANEL].drop_duplicates().itertuples(index=False):
        for m in methods:
            for s in seeds:
                key = (*panel, m, s)
                if key not in have:
                    rows.append(dict(zip(CELL, key), status="missing", superseded=0))
    if not rows:
        return cells
    return pd.concat([cells, pd.DataFrame(rows)], ignore_index=True)


def load_plan(client: MlflowClient, experiment_id: str) -> dict | None:
    """The plan recorded by `flexbench grid run` (benchmark.record.tracking.record_grid_plan): the
    artifact `grid_plan.json` of the experiment's runs tagged `flexbench.kind=grid`, one per
    grid file run into the experiment, merged (cells of all, `path` naming every file,
    `excluded` summed, `run_id` the latest's); None when the experiment has none (single cells,
    older grids)."""
    import json
    import tempfile

    from benchmark.record.tracking import PLAN_ARTIFACT

    found = client.search_runs([experiment_id], filter_string="tags.`flexbench.kind` = 'grid'")
    plans = []
    for run in found:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, PLAN_ARTIFACT, tmp)
            except Exception:  # noqa: BLE001  (an unreadable plan: leave it out)
                continue
            with open(path) as fh:
                plans.append({**json.load(fh), "run_id": run.info.run_id})
    if not plans:
        return None
    merged = dict(plans[0])
    merged["cells"] = [c for p in plans for c in p["cells"]]
    merged["excluded"] = sum(int(p.get("excluded", 0)) for p in plans)
    merged["path"] = ", ".join(str(p.get("path", "?")) for p in plans)
    return merged


def _planned_cell(c: dict) -> tuple:
    """A planned cell as (arch, dataset, profile, method label, seed), the report's CELL."""
    return c["arch"], c["dataset"], c["profile"], c.get("label", c["method"]), int(c["seed"])


def _with_planned(cells: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """Add `missing` rows for the planned cells without a run; mark each cell `planned`
    (a run of a cell the grid did not plan, e.g. a single `flexbench train`, is kept as is).
    A run matches a planned cell by (arch, dataset, profile, label, seed) or by its key: the
    label of a cell of another setup names that setup (`_variant_labels`), the plan's does not."""
    planned = {_planned_cell(c) for c in plan["cells"]}
    keys = {c["key"] for c in plan["cells"] if c.get("key")}
    runs = [] if cells.empty else list(zip(cells["cell"], cells[CELL].itertuples(index=False)))
    is_planned = [tuple(row) in planned or key in keys for key, row in runs]
    recorded = {key for key, _ in runs}
    have = {tuple(row) for _, row in runs}
    have |= {_planned_cell(c) for c in plan["cells"] if c.get("key") in recorded}
    rows = [dict(zip(CELL, key), status="missing", superseded=0) for key in sorted(planned - have)]
    cells = cells.assign(planned=is_planned) if runs else cells.assign(planned=[])
    if rows:
        cells = pd.concat([cells, pd.DataFrame(rows).assign(planned=True)], ignore_index=True)
    return cells


def load_experiment(name: str, tracking_uri: str | None = None) -> Experiment:
    """Every cell of experiment `name` with its status, and the tidy table of finished ones."""
    from benchmark.record.tracking import open_store

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = open_store(uri, create=False)  # a report reads: a typo creates nothing
    exp = resolve_experiment(client, name)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas")
    plan = load_plan(client, exp.experiment_id) if not runs.empty else None
    if runs.empty:
        empty = _cell_frame(pd.DataFrame(columns=["run_id", "start_time"]))
        empty = _dedupe(empty)
        tidy, _ = _tidy_rows(pd.DataFrame(columns=["run_id"]), empty, {})
        return Experiment(name, exp.experiment_id, uri, empty, tidy, {})
    parents, ignored = _parents(runs)
    cells = _cell_frame(parents)
    names = dataset_names(
        [*cells["dataset"], *(c["dataset"] for c in (plan or {}).get("cells", []))]
    )
    cells["dataset"] = cells["dataset"].map(names)
    if plan is not None:
        plan = {**plan, "cells": [{**c, "dataset": names[c["dataset"]]} for c in plan["cells"]]}
    cells = _dedupe(cells)
    tidy, incomplete = _tidy_rows(parents, cells, _sub_order(runs))
    tidy, spectrum = _split_spectrum(tidy)
    cells.loc[cells["run_id"].isin(incomplete), "status"] = "incomplete"
    cells = _with_missing(cells) if plan is None else _with_planned(cells, plan)
    cells = cells.sort_values(CELL).reset_index(drop=True)
    return Experiment(name, exp.experiment_id, uri, cells, tidy, ignored, plan, spectrum)


def dataset_names(datasets: Iterable[str]) -> dict[str, str]:
    """Full dataset name -> the name reports show: a file-backed dataset by its file name
    (`imagefolder:/any/dir/cifar10-jpeg.zip` -> `imagefolder:cifar10-jpeg.zip`), so that a
    report rerun on another machine has the same panels and file names; the full name where
    two different paths share a file name."""
    short = {name: schema.short_dataset(name) for name in set(datasets)}
    uses = Counter(short.values())
    return {name: name if uses[s] > 1 else s for name, s in short.items()}


_LOWER = re.compile(re.escape(schema.RESOLUTION_NAME_SEP) + r"(\d+)$")  # `w0.25-r16`


def _width_of(name: str) -> float:
    """The width of a curve point's name (`spectrum/w0.30-r16` -> 0.3, `w0.25` -> 0.25)."""
    base = _LOWER.sub("", name.removeprefix(schema.SPECTRUM_NAME_PREFIX))
    try:
        return float(base.removeprefix("w"))
    except ValueError:
        return math.nan


def _split_spectrum(tidy: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fixed sub-models at the image size, curve points: width-spectrum points and rows at a
    lower resolution, with their `width`, `resolution` and `listed`)."""
    names = tidy["submodel"].astype(str)
    is_spec = names.str.startswith(schema.SPECTRUM_NAME_PREFIX)
    lower = names.str.extract(_LOWER, expand=False)
    curve = is_spec | lower.notna()
    points = tidy[curve].copy()
    points["width"] = [_width_of(s) for s in points["submodel"]]
    points["resolution"] = pd.to_numeric(lower[curve])
    points["listed"] = ~is_spec[curve]
    return tidy[~curve].reset_index(drop=True), points.reset_index(drop=True)


def histories(
    uri: str, run_ids: list[str], keys: tuple[str, ...] = ("val/top1_mean", "train/loss")
) -> pd.DataFrame:
    """Per-epoch metrics of the given runs: columns run_id, key, step (epoch), value."""
    client = MlflowClient(tracking_uri=uri)
    rows = []
    for rid in run_ids:
        for key in keys:
            for m in client.get_metric_history(rid, key):
                rows.append((rid, key, m.step, m.value))
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
