"""`flexbench grid run|plan|status CONFIG`: registered by benchmark.cli (SUBCOMMAND_MODULES)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmark.cli import add_command_group, add_override_args, options_from_args
from benchmark.errors import ConfigError

PATH_KEYS = ("data.root", "runtime.workdir")

# `flexbench grid`: its line in `flexbench --help`, and the description of its own --help
HELP = "run a grid of cells (archs x datasets x methods x seeds) into MLflow"
DESCRIPTION = (
    "Run, plan or inspect a grid of cells. Finished cells (in MLflow) are "
    "skipped, interrupted cells resume from their checkpoints."
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="grid YAML file (see benchmark/configs/)")
    add_override_args(
        p,
        "override a setting in every cell (method.X / arch.X only where the method / arch "
        "has X); part of the cell keys, so give the same --set to run, plan and status",
        download=False,
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="AXIS=V[,V...]",
        help="only the cells with these values (arch, dataset, method, seed; repeatable, all "
        "must match), e.g. --only arch=msdnet --only seed=0,1; the grid's plan stays whole",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
        "current directory)",
    )


def _load(args: argparse.Namespace):
    from benchmark.cli import overrides_from_args
    from benchmark.grid.runner import tracking_uri
    from benchmark.grid.spec import load_grid

    sets = overrides_from_args(args)
    for key in PATH_KEYS:  # relative to the current directory, as the shell user means them
        if isinstance(sets.get(key), str):
            sets[key] = str(Path(sets[key]).expanduser().resolve())
    spec = load_grid(args.config, sets, getattr(args, "devices_per_cell", None))
    return spec, tracking_uri(args.tracking_uri)


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.grid import fastskip  # imports neither torch nor MLflow

    skip_cache = None
    n = args.devices_per_cell
    if n is not None and n < 1:  # before the fast skip, which loads no grid
        raise ConfigError(f"--devices-per-cell must be an integer >= 1 (devices per cell), got {n}")
    if not (args.dry_run or args.rerun_failed):
        given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        inputs = {"sets": args.sets, "data_root": getattr(args, "data_root", None)}
        skip_cache = fastskip.fingerprint(args.config, inputs, args.only, given)
        done = fastskip.all_finished(skip_cache, given)
        if done:
            print(
                f"grid {args.config}: nothing to train: all {done[1]} cells already finished in "
                f"experiment {done[0]} (skipped; states read from the store, the grid unchanged "
                f"since its last full run)"
            )
            return 0
    from benchmark.grid.runner import RunOptions, run_grid
    from benchmark.grid.spec import select_cells

    spec, uri = _load(args)
    if args.dry_run:
        return _plan(select_cells(spec, args.only), uri, args.rerun_failed, args.workers)
    return run_grid(spec, uri, options_from_args(RunOptions, args, skip_cache=skip_cache))


def _plan(spec, uri: str, rerun_failed: bool, workers: int | None) -> int:
    from benchmark.grid.runner import make_plan, print_plan
    from benchmark.grid.spec import estimate
    from benchmark.grid.state import grid_active

    estimate(spec)
    plan = make_plan(spec, uri, rerun_failed, active=grid_active(spec))
    print_plan(spec, uri, plan, workers or 1, sys.stdout)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from benchmark.grid.spec import select_cells

    spec, uri = _load(args)
    return _plan(select_cells(spec, args.only), uri, args.rerun_failed, args.workers)


def cmd_status(args: argparse.Namespace) -> int:
    from benchmark.grid.runner import print_status
    from benchmark.grid.spec import select_cells

    spec, uri = _load(args)
    return print_status(select_cells(spec, args.only), uri)


def add_parser(subparsers) -> None:
    sub = add_command_group(subparsers, "grid", HELP, DESCRIPTION, metavar="{run,plan,status}")

    r = sub.add_parser("run", help="train every cell that is not finished yet")
    _common(r)
    r.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: one per device; 1 on CPU); on CPU the cores are split "
        "between them",
    )
    r.add_argument(
        "--devices",
        default="auto",
        help="cpu, or cuda:0,cuda:1,... (workers round-robin over them); default auto: every "
        "GPU, else cpu",
    )
    r.add_argument(
        "--devices-per-cell",
        type=int,
        metavar="N",
        help="devices (torch.distributed ranks) per cell, overriding the grid file's "
        "devices_per_cell: a local worker holds N of --devices (on CPU its ranks share its "
        "threads); a Ray task asks for N GPUs (or N x --cpus-per-cell)",
    )
    r.add_argument("--executor", choices=("local", "ray"), default="local")
    r.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS)")
    r.add_argument(
        "--cpus-per-cell", type=float, help="ray: CPUs per cell task and device (default 1)"
    )
    r.add_argument(
        "--gpus-per-cell",
        type=float,
        help="ray: GPUs per cell task (default 1 if any GPU; a cell of N devices: N)",
    )
    r.add_argument(
        "--rerun-failed",
        action="store_true",
        help="rerun failed cells (from their checkpoint when they have one)",
    )
    r.add_argument("--dry-run", action="store_true", help="print the plan and exit (= grid plan)")
    r.add_argument(
        "--status-every",
        type=float,
        default=60.0,
        help="seconds between status lines when the output is not a terminal",
    )
    r.set_defaults(func=cmd_run, on_interrupt="rerun the same command to resume the grid")

    q = sub.add_parser("plan", help="print the cells, their state and estimated cost")
    _common(q)
    q.add_argument("--rerun-failed", action="store_true", help="plan failed cells as reruns")
    q.add_argument("--workers", type=int, help="workers assumed for the time estimate")
    q.set_defaults(func=cmd_plan)

    s = sub.add_parser("status", help="table of cells with their state and headline metric")
    _common(s)
    s.set_defaults(func=cmd_status)
