"""What MLflow and the checkpoints say about each cell of a grid.

MLflow is the source of truth: a cell is `finished` when one of its parent runs (tag
`flexbench.cell` = key) carries `flexbench.status` = finished. Otherwise the latest parent run
decides: `failed`, or `interrupted` (status running/interrupted while no grid holds the lock:
the process that ran it died). A checkpoint at <workdir>/<experiment>/<key>/checkpoint.pt
makes an unfinished cell resumable. Writes go through benchmark.record.tracking.CellRun.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import flatten
from benchmark.errors import ConfigError
from benchmark.grid.spec import GridCell, GridSpec
from benchmark.methods import method_label
from benchmark.record import schema, tracking
from benchmark.training import checkpoint

STATUS = schema.STATUS
CELL = schema.CELL
HEADLINE = (schema.TOP1_MEAN.format(split="test"), schema.TOP1_AUC.format(split="test"))


@dataclass
class CellState:
    state: str  # finished | failed | running | interrupted | pending
    run_id: str | None = None
    checkpoint: bool = False
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    runs: int = 0
    finished_runs: int = 0
    run_ids: list[str] = field(default_factory=list)


def plan_record(spec: GridSpec) -> dict[str, Any]:
    """The grid's plan as `flexbench report` reads it (benchmark.record.tracking.record_grid_plan):
    every cell the grid file asks for, excluded pairs left out, with the tags its run gets."""
    cells = [
        {
            "key": c.key,
            "arch": c.cfg["arch"]["name"],
            "dataset": c.cfg["data"]["name"],
            "method": c.cfg["method"]["name"],
            "label": method_label(c.cfg["method"]["name"], c.cfg["method"]),
            "seed": int(c.cfg["seed"]),
            "profile": c.cfg["profile"],
        }
        for c in spec.cells
    ]
    return {
        "grid": spec.name,
        "path": str(spec.path),
        "profile": spec.profile,
        "excluded": spec.excluded,
        "cells": cells,
    }


def parent_runs(uri: str, experiment: str, key: str | None = None) -> dict[str, list[Any]]:
    """{cell key: [parent runs, oldest first]} of an experiment (child runs carry no status)."""
    db = tracking.sqlite_path(uri)
    if db is not None and not db.exists():
        return {}  # no database yet (and reading must not create one)
    client = tracking.open_store(uri)
    exp_id = tracking.experiment_id(client, experiment, create=False)  # deleted: ConfigError
    if exp_id is None:
        return {}
    filt = f"tags.`{STATUS}` LIKE '%'"
    if key is not None:
        filt += f" AND tags.`{CELL}` = '{key}'"
    out: dict[str, list[Any]] = {}
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=filt, max_results=1000, page_token=token)
        for run in page:
            out.setdefault(run.data.tags.get(CELL, ""), []).append(run)
        token = page.token
        if not token:
            break
    for runs in out.values():
        runs.sort(key=lambda r: r.info.start_time or 0)
    return out


def checkpoint_path(cell: GridCell, experiment: str) -> Path:
    return checkpoint.cell_dir(cell.cfg, experiment, cell.key) / "checkpoint.pt"


def cell_states(
    spec: GridSpec, uri: str, grid_active: bool = False, runs: dict[str, list[Any]] | None = None
) -> dict[str, CellState]:
    """Every cell's state; `runs`: the experiment's `parent_runs` when the caller already has
    them (one search of the store serves the whole plan)."""
    by_key = parent_runs(uri, spec.name) if runs is None else runs
    out: dict[str, CellState] = {}
    for cell in spec.cells:
        runs = [  # a study trial (validation only, tagged so from its start) is not the cell's
            r for r in by_key.get(cell.key, []) if r.data.tags.get(schema.TEST_EVALUATED) != "false"
        ]
        ckpt = checkpoint_path(cell, spec.name).exists()
        finished = [r for r in runs if r.data.tags.get(STATUS) == "finished"]
        if finished:
            r = finished[-1]
            dur = None
            if r.info.end_time and r.info.start_time:
                dur = (r.info.end_time - r.info.start_time) / 1000
            st = CellState("finished", r.info.run_id, ckpt, metrics=dict(r.data.metrics))
            st.duration_s = dur
        elif runs:
            r = runs[-1]
            status = r.data.tags.get(STATUS, "")
            if status in ("running", "interrupted"):
                state = "running" if grid_active and status == "running" else "interrupted"
            else:
                state = "failed"
            st = CellState(state, r.info.run_id, ckpt, error=r.data.tags.get(schema.ERROR, ""))
            st.metrics = dict(r.data.metrics)
        else:
            st = CellState("pending", None, ckpt)
        st.runs, st.finished_runs = len(runs), len(finished)
        st.run_ids = [r.info.run_id for r in runs]
        out[cell.key] = st
    return out


def checkpoint_run_id(cell: GridCell, experiment: str) -> str | None:
    """The MLflow run a cell's checkpoint belongs to (None if unreadable)."""

    try:
        return checkpoint.load(checkpoint_path(cell, experiment)).get("run_id")
    except Exception:  # noqa: BLE001  (a damaged checkpoint is not resumable)
        return None


def mark_stale(spec: GridSpec, uri: str, by_key: dict[str, list[Any]] | None = None) -> int:
    """Runs left `running` by a grid process that died: mark them interrupted (KILLED).
    Called with the grid lock held, so no live process owns them; a resumed cell sets its
    run back to running. `by_key`: the experiment's `parent_runs`, when already searched."""
    by_key = parent_runs(uri, spec.name) if by_key is None else by_key
    keys = {c.key for c in spec.cells}
    n = 0
    for key, runs in by_key.items():
        if key not in keys:
            continue
        for r in runs:  # a study trial runs under the study's workers, not a grid's
            trial = r.data.tags.get(schema.TEST_EVALUATED) == "false"
            if r.data.tags.get(STATUS) == "running" and not trial:
                run = tracking.CellRun(uri, spec.name)
                run.run_id = r.info.run_id
                run.interrupted()
                n += 1
    return n


def ensure_failed(cell: GridCell, uri: str, experiment: str, reason: str, since: float) -> None:
    """Record a cell whose attempt (started at `since`, epoch seconds) died as failed.

    The worker marks its own run failed when training raises; when the worker process itself
    died (SIGKILL, segfault, out of memory) or failed before creating a run, the grid does it.
    """
    runs = parent_runs(uri, experiment, key=cell.key).get(cell.key, [])
    running = [r for r in runs if r.data.tags.get(STATUS) == "running"]
    run = tracking.CellRun(uri, experiment)
    if running:
        for r in running:
            run.run_id = r.info.run_id
            run.fail(reason)
        return
    since_ms = int(since * 1000) - 2000
    if any(
        r.data.tags.get(STATUS) in ("failed", "interrupted") and (r.info.end_time or 0) >= since_ms
        for r in runs
    ):
        # the worker recorded it; or, for a cell of several devices, its rank 0 marked the run
        # interrupted as torchrun stopped the ranks with the dead worker: the next run resumes it
        return
    tags = {schema.GRID: experiment}
    run.start(cell.cfg, cell.key, flatten(cell.cfg), tags)
    run.fail(reason)


class GridLock:
    """One grid process per (workdir, experiment): with the lock held, every `running` run of
    the grid's cells is stale. flock is released by the kernel when the holder dies."""

    def __init__(self, spec: GridSpec) -> None:
        self.paths = [Path(w) / spec.name / ".grid.lock" for w in spec.workdirs]
        self.fds: list[int] = []

    def __enter__(self) -> GridLock:
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                self.__exit__()
                raise ConfigError(
                    f"another grid run of this experiment is active (pid {holder}, lock "
                    f"{path}); wait for it or stop it first"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fds.append(fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def grid_active(spec: GridSpec) -> bool:
    """True when a grid process holds this grid's lock right now."""
    for w in spec.workdirs:
        path = Path(w) / spec.name / ".grid.lock"
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False
