"""Plan, run and summarise a grid.

Run order: validate the whole grid (every cell resolved, every dataset checked, every model
built) -> create the MLflow schema and experiment from this one process -> take the grid lock
-> record the grid's plan in MLflow (the cells `flexbench report` expects)
-> mark runs left `running` by a dead grid process as interrupted -> plan (skip finished cells,
resume cells with a checkpoint, rerun failed ones only with --rerun-failed) -> run the cells
on an executor with a live progress view -> summary; exit code 1 unless every cell finished.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from benchmark.errors import ConfigError
from benchmark.grid import fastskip
from benchmark.grid.progress import Progress, fmt_s
from benchmark.grid.spec import GridCell, GridSpec, estimate, select_cells
from benchmark.grid.state import (
    CellState,
    GridLock,
    cell_states,
    checkpoint_run_id,
    ensure_failed,
    grid_active,
    mark_stale,
    parent_runs,
    plan_record,
)
from benchmark.record import signals, tracking

RUN_ACTIONS = ("resume", "restart", "new")


@dataclass
class RunOptions:
    executor: str = "local"
    workers: int | None = None
    devices: str | None = None
    ray_address: str | None = None
    cpus_per_cell: float | None = None
    gpus_per_cell: float | None = None
    rerun_failed: bool = False
    status_every: float = 60.0
    only: list[str] = field(default_factory=list)  # `--only AXIS=V,...`: the cells to run
    skip_cache: str | None = None  # `fastskip.fingerprint` of this command, None: no fast path


@dataclass
class Planned:
    cell: GridCell
    state: CellState
    action: str  # skip | skip-failed | new | resume | restart


def tracking_uri(uri: str | None) -> str:
    return tracking.absolute_sqlite(tracking.resolve_uri(uri))


def make_plan(
    spec: GridSpec, uri: str, rerun_failed: bool, active: bool = False, runs=None
) -> list[Planned]:
    """What to do with each cell; `runs`: the experiment's parent runs if already searched."""
    states = cell_states(spec, uri, grid_active=active, runs=runs)
    return [
        Planned(cell, states[cell.key], _action(cell, states[cell.key], spec.name, rerun_failed))
        for cell in spec.cells
    ]


def _action(cell: GridCell, st: CellState, experiment: str, rerun_failed: bool) -> str:
    """A checkpoint of one of the cell's runs resumes it, whether the cell was interrupted or
    failed (rerun with --rerun-failed: a worker killed by the OS at epoch 290 of 300 goes on at
    291, as `train --resume` does after a crash); a checkpoint of a run this store does not
    have (e.g. a new mlflow.db) or an unreadable one is discarded: the cell starts over."""
    if st.state == "finished":
        return "skip"
    if st.state == "failed" and not rerun_failed:
        return "skip-failed"
    if st.state == "running":
        return "skip-running"
    if st.checkpoint and checkpoint_run_id(cell, experiment) in st.run_ids:
        return "resume"
    return "restart" if st.checkpoint or st.state == "failed" else "new"


def _rate(plan: list[Planned]) -> float | None:
    """Seconds per estimated GFLOP of the finished cells of this grid (None if none)."""
    secs = work = 0.0
    for p in plan:
        if p.state.state == "finished" and p.state.duration_s and p.cell.gflops:
            secs += p.state.duration_s
            work += p.cell.gflops
    return secs / work if work else None


def _header(spec: GridSpec, uri: str, out: TextIO) -> None:
    print(
        f"grid {spec.name} ({spec.path}): {len(spec.cells)} cells = {spec.axes_text()}, "
        f"profile {spec.profile}",
        file=out,
    )
    workdirs = ", ".join(str(w) for w in spec.workdirs)
    shown = tracking.redact_uri(uri)
    print(f"tracking {shown}, experiment {spec.name}; checkpoints in {workdirs}", file=out)


def print_plan(spec: GridSpec, uri: str, plan: list[Planned], workers: int, out: TextIO) -> None:
    _header(spec, uri, out)
    if spec.incompatible:
        print("left out (the method cannot train the architecture):", file=out)
        for arch, method, why in spec.incompatible:
            print(f"  {method} x {arch}: {why}", file=out)
    rows = [("key", "cell", "state", "action", "epochs", "est. GFLOPs")]
    for p in plan:
        g = f"{p.cell.gflops:.1f}" if p.cell.gflops is not None else "?"
        state = p.state.state + (" +ckpt" if p.state.checkpoint else "")
        rows.append((p.cell.key, p.cell.label, state, p.action, str(p.cell.total_epochs), g))
    _table(rows, out)
    todo = [p for p in plan if p.action in RUN_ACTIONS]
    counts = {a: sum(p.action == a for p in plan) for a in ("new", "resume", "restart")}
    skip = sum(p.action == "skip" for p in plan)
    failed = sum(p.action == "skip-failed" for p in plan)
    print(
        f"to run: {len(todo)} ({counts['new']} new, {counts['resume']} resumed from a checkpoint, "
        f"{counts['restart']} from scratch); skip: {skip} finished, {failed} failed"
        + (" (rerun them with --rerun-failed)" if failed else ""),
        file=out,
    )
    known = [p.cell.gflops for p in todo if p.cell.gflops is not None]
    total = sum(known)
    rate = _rate(plan)
    eta = (
        f"about {fmt_s(total * rate / max(1, min(workers, len(todo))))} with {workers} "
        f"worker(s), from the {sum(p.action == 'skip' for p in plan)} finished cells' speed"
        if rate is not None and todo
        else "time unknown until a cell of this grid has finished"
    )
    print(f"estimated training compute: {total:.1f} GFLOPs; {eta}", file=out)


def _table(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def _metric(st: CellState, key: str) -> str:
    v = st.metrics.get(key)
    return f"{v:.2f}" if v is not None else "-"


def print_status(spec: GridSpec, uri: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    active = grid_active(spec)
    states = cell_states(spec, uri, grid_active=active)
    _header(spec, uri, out)
    rows = [("key", "cell", "state", "test top1 mean", "top1 AUC", "time", "run")]
    for c in spec.cells:
        st = states[c.key]
        state = st.state + (" +ckpt" if st.checkpoint and st.state != "finished" else "")
        rows.append(
            (
                c.key,
                c.label,
                state,
                _metric(st, "test/top1_mean"),
                _metric(st, "test/top1_auc"),
                fmt_s(st.duration_s) if st.duration_s else "-",
                (st.run_id or "-")[:12],
            )
        )
    _table(rows, out)
    counts: dict[str, int] = {}
    for st in states.values():
        counts[st.state] = counts.get(st.state, 0) + 1
    order = ("finished", "running", "interrupted", "failed", "pending")
    text = ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
    print(f"{text}" + ("; a grid run is active" if active else ""), file=out)
    for c in spec.cells:
        if states[c.key].state == "failed" and states[c.key].error:
            print(f"  failed {c.label}: {states[c.key].error.splitlines()[0][:200]}", file=out)
    return 0


def _executor(opts: RunOptions, spec: GridSpec, n_tasks: int, per_cell: int):
    """The executor and its number of cells at once; `per_cell`: the most devices a cell to
    train asks for (local slots hold that many; Ray sizes each task by its own cell's)."""
    if opts.executor == "local":
        from benchmark.grid.local import LocalExecutor, make_slots

        slots = make_slots(opts.workers, opts.devices, n_tasks, per_cell)
        log_dir = Path(spec.workdirs[0]) / spec.name / "logs"
        return LocalExecutor(slots, log_dir), len(slots)
    if opts.executor == "ray":
        from benchmark.grid.ray_exec import RayExecutor

        ex = RayExecutor(opts.ray_address, opts.cpus_per_cell, opts.gpus_per_cell, per_cell)
        ex.connect()
        import ray

        need = ex.task_resources(per_cell)
        have = ray.cluster_resources().get("GPU" if ex.gpus else "CPU", 1)
        return ex, max(1, int(have // (need["num_gpus"] or need["num_cpus"])))
    raise ConfigError(f"unknown executor {opts.executor!r}; valid: local, ray")


def _precheck(opts: RunOptions, cells: list[GridCell]) -> None:
    """Executor options, and the cells' devices_per_cell against them, are checked before the
    store is touched."""
    per_cell = max(c.devices for c in cells)
    if opts.executor == "local":
        from benchmark.grid.local import device_groups, parse_devices

        devs = parse_devices(opts.devices)
        device_groups(devs, per_cell)
        if opts.workers is not None and opts.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {opts.workers}")
        _check_world_sizes(cells, "cpu" if devs == ["cpu"] else "cuda")
    elif opts.executor == "ray":
        from benchmark.grid.ray_exec import RayExecutor

        ex = RayExecutor(opts.ray_address, opts.cpus_per_cell, opts.gpus_per_cell, per_cell)
        ex.check_reachable()
        with warnings.catch_warnings():  # a task of N ranks gets N x its CPUs (task_resources):
            warnings.simplefilter("ignore")  # this machine's core count says nothing of them
            _check_world_sizes(cells, "cpu")
    else:
        raise ConfigError(f"unknown executor {opts.executor!r}; valid: local, ray")


def _check_world_sizes(cells: list[GridCell], device: str) -> None:
    """`distributed.check_world` for every cell of several devices on `device` (cpu / cuda):
    a batch size the devices do not divide is a ConfigError; on CPU more ranks than cores only
    warn, as `flexbench train --nproc-per-node` does."""
    from benchmark.training.distributed import check_world

    for c in cells:
        if c.devices > 1:
            cfg = {**c.cfg, "runtime": {**c.cfg["runtime"], "device": device}}
            try:
                check_world(cfg, c.devices, flag="devices_per_cell")
            except ConfigError as exc:
                raise ConfigError(
                    f"grid cell {c.label} with devices_per_cell {c.devices}: {exc}"
                ) from None


def _remember_finished(opts: RunOptions, spec: GridSpec) -> None:
    """Every cell finished: the fast skip may answer the next identical command (its keys, and
    the data files they identify)."""
    data = [c.cfg["data"]["name"] for c in spec.cells]
    fastskip.remember(opts.skip_cache, spec.name, [c.key for c in spec.cells], data)


def run_grid(spec: GridSpec, uri: str, opts: RunOptions, out: TextIO | None = None) -> int:
    """Run the cells of the grid that are not finished yet (see the module docstring for the
    order); returns the exit code: 0 when every cell of the grid has finished."""
    out = out or sys.stdout
    t0 = time.monotonic()
    chosen = select_cells(spec, opts.only)
    _precheck(opts, chosen.cells)
    tracking.prepare_store(uri, spec.name)
    with GridLock(spec):
        tracking.record_grid_plan(uri, spec.name, plan_record(spec))  # what the report expects
        runs = parent_runs(uri, spec.name)  # one search of the store for the whole plan
        stale = mark_stale(spec, uri, runs)
        # a run marked stale just now reads `interrupted`, as `running` does with no grid active
        _header(spec, uri, out)
        if opts.only:
            print(f"--only {' '.join(opts.only)}: {len(chosen.cells)} of the cells", file=out)
        spec = chosen
        plan = make_plan(spec, uri, opts.rerun_failed, runs=runs)
        todo = [p for p in plan if p.action in RUN_ACTIONS]
        if stale:
            print(f"{stale} run(s) left running by a grid process that died: interrupted", file=out)
        if not todo:
            code = _nothing_to_train(spec, plan, out)
            if code == 0:
                _remember_finished(opts, spec)
            return code
        # builds the model of every cell to train: arch settings fail here, before any work
        estimate(spec, [p.cell for p in todo])
        _announce(plan, todo, out)
        order = {"resume": 0, "restart": 1, "new": 1}
        todo.sort(key=lambda p: (order[p.action], -(p.cell.gflops or 0)))
        tasks = _tasks(spec, uri, opts, todo)
        progress, code = _execute(spec, uri, opts, tasks, out)
        if code is not None:
            return code
    code = _summary(spec, uri, plan, todo, progress, time.monotonic() - t0, out)
    if code == 0:
        _remember_finished(opts, spec)
    return code


def _nothing_to_train(spec: GridSpec, plan: list[Planned], out: TextIO) -> int:
    """Every cell is finished or failed: say which, and fail while failed cells remain."""
    skipped = sum(p.action == "skip" for p in plan)
    failed_before = sum(p.action == "skip-failed" for p in plan)
    if failed_before:
        print(
            f"nothing to train: {skipped} cells finished, {failed_before} failed "
            f"(rerun them with --rerun-failed)",
            file=out,
        )
        return 1
    print(
        f"nothing to train: all {skipped} cells already finished in experiment "
        f"{spec.name} (skipped)",
        file=out,
    )
    return 0


def _announce(plan: list[Planned], todo: list[Planned], out: TextIO) -> None:
    """What this run trains, resumes and skips, before the first cell starts."""
    skipped = sum(p.action == "skip" for p in plan)
    failed_before = sum(p.action == "skip-failed" for p in plan)
    resumed = sum(p.action == "resume" for p in todo)
    stale_ckpt = sum(p.action == "restart" and p.state.state != "failed" for p in todo)
    if stale_ckpt:
        print(
            f"{stale_ckpt} cell(s) have a checkpoint whose MLflow run is not in this store: "
            f"they start from scratch",
            file=out,
        )
    print(
        f"training {len(todo)} cell(s) ({resumed} resumed from a checkpoint); skipping "
        f"{skipped} finished"
        + (f" and {failed_before} failed (--rerun-failed reruns them)" if failed_before else ""),
        file=out,
    )


def _tasks(spec: GridSpec, uri: str, opts: RunOptions, todo: list[Planned]) -> list[dict]:
    """One plain-data task per cell: what a worker process (local or Ray) needs to train it."""
    return [
        {
            "key": p.cell.key,
            "label": p.cell.label,
            "cfg": p.cell.cfg,
            "uri": uri,
            "experiment": spec.name,
            "mode": p.action,
            "executor": opts.executor,
            "devices": p.cell.devices,  # devices_per_cell: ranks under launch_cell when > 1
        }
        for p in todo
    ]


def _execute(
    spec: GridSpec, uri: str, opts: RunOptions, tasks: list[dict], out: TextIO
) -> tuple[Progress, int | None]:
    """Run the tasks on the executor with the live progress view; a failed cell's run is
    marked failed in MLflow. Returns the progress and, after Ctrl-C, the exit code."""
    per_cell = max(t["devices"] for t in tasks)
    executor, slots = _executor(opts, spec, len(tasks), per_cell)
    print(executor.describe(), file=out)
    out.flush()
    cells = {c.key: c for c in spec.cells}
    progress = Progress(cells, [t["key"] for t in tasks], slots, status_every=opts.status_every)
    since: dict[str, float] = {}

    def emit(ev: tuple) -> None:
        if ev[0] == "start":
            since[ev[2]] = time.time()
        elif ev[0] == "failed":
            try:
                ensure_failed(cells[ev[2]], uri, spec.name, ev[3], since.get(ev[2], time.time()))
            except Exception as exc:  # noqa: BLE001  (report, keep the grid going)
                progress._line(f"warning: could not record the failure in MLflow: {exc}")
        progress.handle(ev)

    try:
        executor.run(tasks, emit)
    except KeyboardInterrupt as exc:
        progress.close()
        print(
            "grid interrupted: running cells keep their checkpoints; rerun the same command "
            "to resume them (finished cells are skipped)",
            file=out,
        )
        return progress, signals.exit_code(exc)
    finally:
        progress.close()
    return progress, None


def _summary(spec, uri, plan, todo, progress: Progress, wall: float, out: TextIO) -> int:
    states = cell_states(spec, uri)
    resumed = {k for k, result in progress.results.items() if result.get("resumed")}
    rows = [("key", "cell", "outcome", "test top1 mean", "top1 AUC", "time")]
    for p in todo:
        k = p.cell.key
        st = states[k]
        outcome = "failed" if k in progress.failed else st.state
        if outcome == "finished" and k in resumed:
            outcome = "finished (resumed)"
        secs = progress.done.get(k)
        rows.append(
            (
                k,
                p.cell.label,
                outcome,
                _metric(st, "test/top1_mean"),
                _metric(st, "test/top1_auc"),
                fmt_s(secs) if secs else "-",
            )
        )
    print(file=out)
    _table(rows, out)
    n_fin = sum(st.state == "finished" for st in states.values())
    n_failed = sum(st.state == "failed" for st in states.values())
    skipped = sum(p.action == "skip" for p in plan)
    trained = len(progress.done)
    print(
        f"summary: grid {spec.name}: {n_fin}/{len(spec.cells)} cells finished; this run trained "
        f"{trained} ({len(resumed)} resumed), skipped {skipped} already finished, "
        f"{len(progress.failed)} failed; wall {fmt_s(wall)}",
        file=out,
    )
    labels = {c.key: c.label for c in spec.cells}
    for k, reason in progress.failed.items():
        print(f"  FAILED {labels[k]}: {reason}", file=out)
    if n_failed > len(progress.failed):
        print(
            f"  {n_failed - len(progress.failed)} cell(s) failed in earlier runs: rerun with "
            f"--rerun-failed",
            file=out,
        )
    left = len(spec.cells) - n_fin - n_failed
    if left:
        print(f"  {left} cell(s) not finished (interrupted): rerun to resume them", file=out)
    return 0 if n_fin == len(spec.cells) else 1
