"""`flexbench` command line: ls, info, train (grid, study, report and server plug in here)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
from typing import Any, TypeVar

from benchmark.errors import ConfigError, TrainingError, WriteError
from benchmark.record import schema, signals

T = TypeVar("T")


def _add_cell_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="architecture (see `flexbench ls`)")
    p.add_argument(
        "--dataset",
        default="cifar10",
        help="dataset (see `flexbench ls`), e.g. cifar10 or imagefolder:<dir or .zip>",
    )
    p.add_argument("--profile", default="smoke", help="smoke | mini | paper | imagenet")
    add_override_args(p, "override a setting, e.g. --set method.T=4 --set train.epochs=10")


def add_override_args(p: argparse.ArgumentParser, set_help: str, download: bool = True) -> None:
    """`--set SECTION.KEY=VALUE`, `--data-root` (and `--download`): read by overrides_from_args."""
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=set_help,
    )
    p.add_argument("--data-root", help="folder holding the standard CIFAR files (data.root)")
    if download:
        p.add_argument("--download", action="store_true", help="let torchvision download CIFAR")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """`--set` items plus `--data-root`/`--download` (where the command has them) as overrides."""
    from benchmark.config import parse_sets

    sets = parse_sets(args.sets)
    if getattr(args, "data_root", None):
        sets["data.root"] = args.data_root
    if getattr(args, "download", False):
        sets["data.download"] = True
    return sets


def options_from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """The options dataclass `cls` of a command: `given` fields as passed, every other field
    the parser has from its same-named argument (the rest keep their defaults), so that an
    option added to both is passed on without one more line to keep in step."""
    fields = (f.name for f in dataclasses.fields(cls) if f.name not in given)
    return cls(**{n: getattr(args, n) for n in fields if hasattr(args, n)}, **given)


def add_command_group(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str, **kw: Any
) -> argparse._SubParsersAction:
    """`flexbench NAME SUB ...`: the NAME parser, and the sub-parsers it requires one of
    (chosen one in `args.NAME_command`); `kw` goes to `add_subparsers` (e.g. metavar)."""
    p = subparsers.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest=f"{name}_command", required=True, **kw)


def cmd_ls(args: argparse.Namespace) -> int:
    from benchmark.config import PROFILES
    from benchmark.data import DATASETS
    from benchmark.methods import METHODS
    from benchmark.models import ARCHS

    print("architectures:")
    for name in ARCHS.names():
        print(f"  {name:26s} {ARCHS.get(name).description}")
    print("methods:")
    for name in METHODS.names():
        cls = METHODS.get(name)
        params = ", ".join(  # parameters with an effect at the defaults (not alpha_minus)
            f"{k}={v.default:g}" if not v.choices else f"{k}={v.default} ({'|'.join(v.choices)})"
            for k, v in cls.PARAMS.items()
            if v.active_if is None or cls.PARAMS[v.active_if[0]].default == v.active_if[1]
        )
        print(f"  {name:26s} {cls.description}" + (f" [{params}]" if params else ""))
    print("datasets:")
    for name in DATASETS.names():
        spec = DATASETS.get(name)
        label = f"{name}:<path>" if spec.needs_arg else name
        print(f"  {label:26s} {spec.description}")
    print("profiles:")
    for name, prof in PROFILES.items():
        print(f"  {name:26s} {prof['description']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from benchmark import data as datasets
    from benchmark.config import resolve
    from benchmark.costs.flops import count_costs, latency_profile
    from benchmark.training.train import make_model

    if args.repeats < 1:
        raise ConfigError(f"--repeats must be a positive integer, got {args.repeats}")
    if args.latency_threads < 0:
        raise ConfigError(f"--latency-threads must be 0 or more, got {args.latency_threads}")
    cfg = resolve(args.arch, args.dataset, "joint", 0, args.profile, overrides_from_args(args))
    num_classes, image_size = datasets.describe(args.dataset, cfg["data"])
    model = make_model(cfg, num_classes, image_size)
    costs = count_costs(model, image_size)
    lat = latency_profile(
        model, image_size, torch.device("cpu"), 1, 2, args.repeats, args.latency_threads or None
    )
    arch = {k: v for k, v in cfg["arch"].items() if k != "name"}
    print(
        f"{args.arch} for {args.dataset} ({num_classes} classes, {image_size}px), "
        f"profile {args.profile}: {arch}"
    )
    print(
        f"{'sub-model':10s} {'MMACs':>10s} {'MFLOPs':>10s} {'GBitOps':>10s} {'params (M)':>11s}"
        f" {'latency ms':>11s} {'IQR ms':>8s}"
    )
    for c, ms, iqr in zip(costs, lat.median_ms, lat.iqr_ms):
        print(
            f"{c.name:10s} {c.mmacs:10.3f} {c.mflops:10.3f} {c.gbitops:10.3f}"
            f" {c.params_m:11.4f} {ms:11.2f} {iqr:8.2f}"
        )
    print(
        "MMACs: conv, linear and attention-matmul multiply-adds; MFLOPs: FlopCounterMode"
        " (2 x MACs); GBitOps: MACs x weight bits x activation bits (32 x 32 unless quantized);"
        f" exits are cumulative incl. earlier heads; latency: {lat.method()}"
    )
    if lat.relative_spread() > 0.25:
        print(
            f"warning: latency varied by up to {lat.relative_spread():.0%} of the median (IQR):"
            " the machine was busy; compare latencies from an idle machine, or raise --repeats"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from benchmark import data as datasets
    from benchmark.config import resolve
    from benchmark.training.train import CellOptions, train_cell

    datasets.needs_path(*datasets.parse_name(args.dataset))  # before what its size implies
    cfg = resolve(
        args.arch, args.dataset, args.method, args.seed, args.profile, overrides_from_args(args)
    )
    opts = CellOptions(args.tracking_uri, args.experiment, args.resume, args.restart)
    if args.nproc_per_node is None:
        _refuse_launch_args_without_ranks(args)
        result = train_cell(cfg, opts)
    else:
        from benchmark.training.distributed import launch_cell

        result = launch_cell(
            cfg, opts, args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr,
            args.master_port,
        )  # fmt: skip
    print(f"cell {result.key}: MLflow run {result.run_id}")
    width = max((len(row["name"]) for row in result.rows), default=10)
    for row in result.rows:  # width-spectrum points have no latency
        latency = "" if row.get("latency_ms") is None else f"  {row['latency_ms']:.2f} ms"
        print(
            f"  {row['name']:{width}s} top1 {row['top1']:6.2f}%  top5 {row['top5']:6.2f}%  "
            f"{row['mflops']:9.3f} MFLOPs  {row['params_m']:.4f} M params{latency}"
        )
    _print_early_exit(result.metrics)
    return 0


def _print_early_exit(m: dict[str, float]) -> None:
    """The early-exit summary of a cell whose sub-models are exits of one pass: the area of
    its budgeted curve and real early exiting at batch 1 (docs/mlflow-schema.md)."""
    if schema.BUDGETED_AUC in m:
        print(f"  early exit: budgeted AUC {m[schema.BUDGETED_AUC]:.2f}% (thresholds from val)")
    ee = {
        k: m.get(schema.EARLY_EXIT.format(name=k))
        for k in ("ms_per_image", "full_ms_per_image", "mflops", "top1", "q")
    }
    if ee["ms_per_image"] is not None:
        print(
            f"  real early exiting (batch 1, q={ee['q']:g}): {ee['ms_per_image']:.2f} ms/image "
            f"vs {ee['full_ms_per_image']:.2f} ms through every exit, {ee['mflops']:.2f} MFLOPs "
            f"on average, top1 {ee['top1']:.2f}%"
        )


RESUME_HINT = "the cell's checkpoint is kept; rerun with --resume to continue"


def _refuse_launch_args_without_ranks(args: argparse.Namespace) -> None:
    """`--nnodes`, `--node-rank`, `--master-addr` and `--master-port` describe the ranks of
    `--nproc-per-node`: without it they would be ignored, so they are an error."""
    given = [
        flag
        for flag, value, default in (
            ("--nnodes", args.nnodes, 1),
            ("--node-rank", args.node_rank, 0),
            ("--master-addr", args.master_addr, None),
            ("--master-port", args.master_port, None),
        )  # fmt: skip
        if value != default
    ]
    if given:
        raise ConfigError(
            f"{', '.join(given)} describe the ranks of a distributed cell and need "
            f"--nproc-per-node N (ranks on this machine); got no --nproc-per-node"
        )


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    """torchrun's flags for one cell on several devices (docs/scaling.md)."""
    g = p.add_argument_group("several devices (torch.distributed.run; docs/scaling.md)")
    g.add_argument(
        "--nproc-per-node", type=int, metavar="N", help="ranks on this machine (one per device)"
    )
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines (default 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's rank")
    g.add_argument("--master-addr", metavar="A", help="address of the machine of node rank 0")
    g.add_argument("--master-port", type=int, metavar="P", help="its free port (default 29500)")


# Other parts of flexbench add their sub-commands through `add_parser(subparsers)`.
SUBCOMMAND_MODULES = ("benchmark.grid.cli", "studies.cli", "reports.cli", "mlflow_server.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexbench", description="Benchmark training methods of flexible neural networks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ls", help="list architectures, methods, datasets and profiles")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("info", help="print the sub-model cost table of an architecture")
    _add_cell_args(p)
    p.add_argument("--repeats", type=int, default=10, help="latency rounds (default 10)")
    p.add_argument(
        "--latency-threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads for the latency forwards (default 1; 0: torch's default)",
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train one cell and log it to MLflow")
    _add_cell_args(p)
    p.add_argument("--method", required=True, help="training method (see `flexbench ls`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
        "else MLflow's default sqlite:///mlflow.db)",
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: flexbench)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the cell's checkpoint")
    group.add_argument("--restart", action="store_true", help="discard the cell's checkpoint")
    _add_launch_args(p)
    p.set_defaults(func=cmd_train, on_interrupt=RESUME_HINT)

    for module in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) and importlib.util.find_spec(module):
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    args = build_parser().parse_args(argv)
    signals.install()
    try:
        code = args.func(args)
        if code == 0:
            signals.check()  # an interruption swallowed on the way is not a success
        return code
    except ConfigError as exc:
        print(f"flexbench: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"flexbench: training failed: {exc}", file=sys.stderr)
        return 1
    except WriteError as exc:
        print(f"flexbench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(interrupt_message(exc, getattr(args, "on_interrupt", None)), file=sys.stderr)
        return signals.exit_code(exc)


def interrupt_message(exc: KeyboardInterrupt, hint: str | None) -> str:
    """`flexbench: interrupted` (or `terminated by SIGTERM`) and what the command left behind:
    each sub-command names its own way on (`on_interrupt`; none: nothing to continue)."""
    what = str(exc) or "interrupted"
    return f"flexbench: {what}; {hint}" if hint else f"flexbench: {what}"


if __name__ == "__main__":
    sys.exit(main())
