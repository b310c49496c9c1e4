"""Local executor: N long-lived worker processes (spawn), one per device or per share of cores.

Workers are reused across cells (importing torch and MLflow costs seconds per process). The
grid process hands one task at a time to each idle worker and watches every worker's pipe and
process sentinel: a worker that dies mid-cell (SIGKILL, segfault, out of memory) is reported as
a failed cell and replaced, and the grid goes on.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from benchmark.errors import ConfigError, TrainingError
from benchmark.grid.worker import worker_main

Event = Callable[[tuple], None]


@dataclass
class Slot:
    """A worker's place: its devices (one, or a cell's devices_per_cell GPUs) and CPU threads."""

    index: int
    devices: tuple[str, ...]
    threads: int

    @property
    def device(self) -> str:
        """The devices as `--devices` writes them: `cuda:0`, `cuda:0,cuda:1`, `cpu`."""
        return ",".join(self.devices)

    @property
    def label(self) -> str:
        return f"w{self.index} {self.device}"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_devices(devices: str | None) -> list[str]:
    """`cuda:0,cuda:1` / `cpu` / `auto` (every GPU, else cpu) -> device names, validated."""
    if devices in (None, "", "auto"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    out = []
    for d in (x.strip() for x in devices.split(",")):
        if not d:
            continue
        if d == "cpu":
            out.append(d)
            continue
        if d == "cuda":
            d = "cuda:0"
        idx = d.partition(":")[2]
        if not d.startswith("cuda:") or not idx.isdigit():
            raise ConfigError(f"--devices: {d!r} is not a device; valid: cpu, cuda:N (or auto)")
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(idx) >= n:
            raise ConfigError(
                f"--devices: {d} requested but this machine has {n} CUDA device(s)"
                + (f" (cuda:0..cuda:{n - 1})" if n else "; use --devices cpu")
            )
        out.append(d)
    if not out:
        raise ConfigError("--devices is empty; give e.g. cpu or cuda:0,cuda:1")
    return out


def device_groups(devs: list[str], per_cell: int) -> list[tuple[str, ...]]:
    """The parsed `--devices` cut into groups of `per_cell` GPUs (in the order given; devices
    left over are not used), or the CPU once: a CPU slot runs a cell's ranks on its threads.
    ConfigError when fewer GPUs are given than one cell needs."""
    if devs == ["cpu"]:
        return [("cpu",)]
    if per_cell > len(devs):
        raise ConfigError(
            f"--devices-per-cell {per_cell} exceeds the {len(devs)} device(s) given with "
            f"--devices ({','.join(devs)}); valid: 1..{len(devs)}"
        )
    usable = len(devs) - len(devs) % per_cell
    return [tuple(devs[i : i + per_cell]) for i in range(0, usable, per_cell)]


def make_slots(
    workers: int | None, devices: str | None, n_tasks: int, devices_per_cell: int = 1
) -> list[Slot]:
    """One worker per device (per group of `devices_per_cell` GPUs) by default, one in total on
    CPU; more workers than groups share them round-robin. The cores are split between the
    workers (runtime.threads = cores // workers), and a worker's cell of N ranks splits its
    share again (`worker.run_cell`)."""
    groups = device_groups(parse_devices(devices), devices_per_cell)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    n = workers or len(groups)
    n = max(1, min(n, n_tasks))
    threads = max(1, cpu_count() // n)
    return [Slot(i, groups[i % len(groups)], threads) for i in range(n)]


@dataclass
class _Worker:
    slot: Slot
    proc: Any
    conn: Any
    task: dict | None = None
    ready: bool = False
    closing: bool = False


class LocalExecutor:
    name = "local"

    def __init__(self, slots: list[Slot], log_dir: Path) -> None:
        self.slots = slots
        self.log_dir = log_dir
        self.ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []

    def log_path(self, slot: Slot) -> Path:
        return self.log_dir / f"worker-{slot.index}.log"

    def describe(self) -> str:
        devs = sorted({s.device for s in self.slots})
        return (
            f"local executor: {len(self.slots)} worker process(es) on {', '.join(devs)}, "
            f"{self.slots[0].threads} thread(s) each; logs in {self.log_dir}"
        )

    def _spawn(self, slot: Slot) -> _Worker:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=worker_main,
            args=(
                child,
                slot.index,
                slot.device,
                slot.threads,
                str(self.log_path(slot)),
                os.getpid(),
            ),
            name=f"flexbench-grid-{slot.label}",
            # not a daemon: a cell may start processes of its own (the image-folder decoder's
            # pool, DataLoader workers, torch.distributed ranks), which daemons cannot. An orphan
            # is still impossible: the worker dies with this process (`_die_with_parent`) and
            # `_stop` ends every worker.
            daemon=False,
        )
        proc.start()
        child.close()
        w = _Worker(slot, proc, parent)
        self.workers.append(w)
        return w

    def run(self, tasks: list[dict], emit: Event) -> None:
        """Run every task; report ("start"|"epoch"|"done"|"failed", where, key, ...) events
        and ("tick",) about twice a second."""
        pending = deque(tasks)
        early_deaths = 0
        for slot in self.slots:
            self._spawn(slot)
        try:
            while self.workers:
                conns = [w.conn for w in self.workers] + [w.proc.sentinel for w in self.workers]
                wait(conns, timeout=0.5)
                for w in list(self.workers):
                    self._drain(w, pending, emit)
                    if not w.proc.is_alive():
                        self._drain(w, pending, emit)
                        self.workers.remove(w)
                        if not w.ready and not w.closing:
                            early_deaths += 1
                        if w.task is not None:
                            code = w.proc.exitcode
                            why = (
                                f"killed by {signal.Signals(-code).name}"
                                if code is not None and code < 0
                                else f"exit code {code}"
                            )
                            emit(
                                (
                                    "failed",
                                    w.slot.label,
                                    w.task["key"],
                                    f"worker process died ({why}); log: {self.log_path(w.slot)}",
                                )
                            )
                            w.task = None
                        if pending and not w.closing:
                            if early_deaths > 2 * len(self.slots):
                                raise TrainingError(
                                    f"worker processes keep dying before their first cell; "
                                    f"see {self.log_path(w.slot)}"
                                )
                            self._spawn(w.slot)
                emit(("tick",))
        except BaseException:
            self._stop()
            raise

    def _drain(self, w: _Worker, pending: deque, emit: Event) -> None:
        while True:
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                return
            kind = msg[0]
            where = w.slot.label
            if kind == "ready":
                w.ready = True
            elif kind == "start":
                emit(("start", where, msg[1]))
            elif kind == "epoch":
                emit(("epoch", where, *msg[1:]))
            elif kind == "done":
                emit(("done", where, msg[1], msg[2]))
                w.task = None
            elif kind == "error":
                emit(("failed", where, msg[1], f"{msg[2]}; log: {self.log_path(w.slot)}"))
                w.task = None
            elif kind == "interrupted":
                w.task = None
            if w.ready and w.task is None and not w.closing:
                if pending:
                    w.task = pending.popleft()
                    w.conn.send(w.task)
                else:
                    w.closing = True
                    w.conn.send(None)

    def _stop(self, grace: float = 30.0) -> None:
        """Ctrl-C / SIGTERM: ask busy workers to stop (their runs become `interrupted`, the
        checkpoint stays for the next run), then make sure every worker is gone."""
        for w in self.workers:
            if w.proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + grace
        for w in self.workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
        self.workers = []
