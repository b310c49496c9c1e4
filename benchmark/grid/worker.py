"""The cell function both executors run, and the loop of a local worker process.

A task is a plain dict (picklable for multiprocessing and Ray): the resolved cell config, its
key and label, the tracking URI, the experiment and the mode (`new`, `resume`, `restart`).
Nothing heavy is imported at module level: a worker sets its thread count first.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from benchmark.record import schema, signals  # light: no torch, so limit_threads still comes first

if TYPE_CHECKING:
    from benchmark.training.train import CellOptions, CellResult

    Trainer = Callable[[dict[str, Any], CellOptions], CellResult]  # train_cell or launch_cell

Emit = Callable[[tuple], None]
HEADLINE = (
    schema.TOP1_MEAN.format(split="test"),
    schema.TOP1_AUC.format(split="test"),
    schema.TOP1_MEAN.format(split="val"),
)


def limit_threads(threads: int) -> None:
    """Before torch is imported, so that its pools start at the right size."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def run_cell(task: dict[str, Any], device: str, threads: int, emit: Emit | None = None) -> dict:
    """Train one cell on `device` (`cuda:0`, `cpu`, or for a cell of `task["devices"]` = N > 1
    ranks the slot's GPUs `cuda:0,cuda:1,...`, of which it takes the first N) with `threads`
    CPU threads in all (unless the grid sets runtime.threads, then per rank); returns its key,
    run id, whether it resumed and headline metrics. A cell of N > 1 ranks runs under
    `launch_cell` and reports no epochs (its callback cannot reach the ranks). Raises on
    failure (the MLflow run is then already marked failed by train_cell, when it had
    started)."""
    from benchmark.training.train import CellOptions

    cfg = copy.deepcopy(task["cfg"])
    runtime, key, n = cfg["runtime"], task["key"], task.get("devices", 1)
    runtime["threads"] = runtime["threads"] or max(1, threads // n)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if emit is not None:
            emit(("epoch", key, epoch + 1, metrics.get("val/top1_mean"), metrics.get("train/loss")))

    opts = CellOptions(
        tracking_uri=task["uri"],
        experiment=task["experiment"],
        resume=task["mode"] != "restart",
        restart=task["mode"] == "restart",
        progress=False,
        epoch_callback=on_epoch if n == 1 else None,
        extra_tags={schema.GRID: task["experiment"], schema.EXECUTOR: task["executor"]},
    )
    result = _train_or_restart(cfg, opts, _trainer(runtime, device.split(","), n))
    return {
        "key": result.key,
        "run_id": result.run_id,
        "resumed": task["mode"] == "resume" and not opts.restart,  # not if its checkpoint failed
        "metrics": {k: v for k, v in result.metrics.items() if k in HEADLINE},
    }


def _trainer(runtime: dict[str, Any], devices: list[str], n: int) -> Trainer:
    """`train_cell` on devices[0] in this process, or `launch_cell` on N ranks with
    CUDA_VISIBLE_DEVICES narrowed to the first N GPUs for the launched processes (torchrun
    `--standalone` picks a free port, so two such cells on one machine do not collide)."""
    import torch

    from benchmark.training.distributed import launch_cell
    from benchmark.training.train import train_cell

    if n == 1:
        runtime["device"] = devices[0]
        if devices[0].startswith("cuda:"):
            torch.cuda.set_device(devices[0])
        return train_cell
    cuda = devices[0].startswith("cuda")
    runtime["device"] = "cuda" if cuda else "cpu"
    visible = _visible_ids(devices[:n]) if cuda else None

    def train(cfg: dict[str, Any], opts: CellOptions) -> CellResult:
        with _cuda_visible(visible):
            return launch_cell(cfg, opts, n)

    return train


def _visible_ids(devices: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES for these `cuda:I` of this process (mapped through its own
    CUDA_VISIBLE_DEVICES, e.g. the GPUs Ray gave a task)."""
    own = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    idx = [int(d.partition(":")[2] or 0) for d in devices]
    return ",".join(own[i] if own else str(i) for i in idx)


@contextlib.contextmanager
def _cuda_visible(ids: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES = ids for the processes started inside (None: unchanged)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ids
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _train_or_restart(cfg: dict[str, Any], opts: CellOptions, train: Trainer) -> CellResult:
    """Train the cell; a checkpoint that cannot continue it (`checkpoint.CannotResume`: found
    only once the cell is built, e.g. its state no longer fits or its data changed) is discarded
    and the cell trained from scratch, as the grid's plan does for a checkpoint whose run is
    gone: a grid has no one to ask, and its log says why."""
    from benchmark.training.checkpoint import CannotResume

    try:
        return train(cfg, opts)
    except CannotResume as exc:
        if opts.restart:
            raise
        print(f"cannot resume {exc.path}: {exc.why}; training the cell from scratch", flush=True)
        opts.resume, opts.restart = False, True
        return train(cfg, opts)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel SIGKILLs this worker when the grid process dies (even by SIGKILL),
    so that no orphan keeps training a cell the next grid run will resume."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _redirect(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


def worker_main(conn, index: int, device: str, threads: int, log_path: str, parent_pid: int):
    """Loop of one local worker: receive a task, train it, report; None ends the loop."""
    _die_with_parent(parent_pid)
    # Ctrl-C reaches a worker twice (from the terminal and from the grid process): the first
    # signal (SIGINT, SIGTERM or SIGHUP) interrupts, the run is marked interrupted
    signals.install(include_sigint=True)
    _redirect(log_path)
    limit_threads(threads)
    try:
        import benchmark.training.train  # noqa: F401  (warm imports before the first cell)

        print(f"worker {index} pid {os.getpid()} on {device}, {threads} threads", flush=True)
        conn.send(("ready", os.getpid()))
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            if task is None:
                return
            key = task["key"]
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"=== {stamp} cell {task['label']} ({key}), {task['mode']} ===", flush=True)
            conn.send(("start", key))
            try:
                result = run_cell(task, device, threads, emit=conn.send)
            except KeyboardInterrupt:
                conn.send(("interrupted", key))
                return
            except BaseException as exc:  # noqa: BLE001  (reported; the grid goes on)
                traceback.print_exc()
                conn.send(("error", key, f"{type(exc).__name__}: {exc}"))
            else:
                conn.send(("done", key, result))
    except KeyboardInterrupt:
        return
    except (BrokenPipeError, EOFError, ConnectionResetError):
        return  # the grid process is gone
