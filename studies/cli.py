"""`flexbench study run|best|plots` (registered by benchmark/cli.py through `add_parser`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark.cli import add_command_group, add_override_args
from benchmark.errors import ConfigError
from benchmark.record import signals

# `flexbench study`: its line in `flexbench --help`, and the description of its own --help
HELP = "tune a method's parameters with Optuna (validation split only)"
DESCRIPTION = "Optuna studies over a method's parameters; trials never read the test split."


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        help="Optuna storage, a SQLAlchemy URL: sqlite:////abs/studies.db (default: "
        "$FLEXBENCH_STUDY_STORAGE, else ./flexbench_studies.db) or "
        "postgresql://user:pw@host:port/db to share a study between machines",
    )
    p.add_argument("--study-name", help="default: <arch>-<dataset>-<method>-<profile>")


def _cell_args(p: argparse.ArgumentParser, create: bool) -> None:
    p.add_argument("--arch", help="architecture (see `flexbench ls`)")
    p.add_argument("--dataset", help="default cifar10 for a new study")
    p.add_argument("--method", help="training method with parameters (ipkd, ipkd_ta, takd, ...)")
    p.add_argument("--profile", help="smoke | mini | paper (default smoke for a new study)")
    if not create:
        return
    p.add_argument(
        "--seed",
        type=int,
        help="the fixed tuning seed of every trial (default 0); never searched",
    )
    add_override_args(
        p,
        "override a setting for every trial, e.g. --set train.epochs=20; "
        "--set method.a=0.5 fixes a parameter (it leaves the search space)",
    )


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def _resolve_name(args: argparse.Namespace, storage) -> str:
    from studies.run import default_study_name
    from studies.storage import study_names

    names = study_names(storage)
    if args.study_name:
        name = args.study_name
    elif args.arch and args.method:
        name = default_study_name(
            args.arch, args.dataset or "cifar10", args.method, args.profile or "smoke"
        )
    elif len(names) == 1:
        name = names[0]
    else:
        raise ConfigError(
            "pass --study-name (or --arch/--dataset/--method/--profile); studies here: "
            + (", ".join(names) or "(none)")
        )
    if name not in names:
        raise ConfigError(
            f"no study {name!r} in this storage; studies: {', '.join(names) or '(none)'}"
        )
    return name


def _load(args: argparse.Namespace):
    import optuna

    from studies import storage as st

    url = st.resolve_url(args.storage)
    storage = st.open_storage(url)
    name = _resolve_name(args, storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    if "flexbench" not in study.user_attrs:
        raise ConfigError(f"study {name!r} was not created by flexbench")
    return study, url


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.cli import options_from_args, overrides_from_args
    from studies.run import RunOptions, run_study

    opts = options_from_args(
        RunOptions, args, sets=overrides_from_args(args), space_items=args.space
    )
    try:
        s = run_study(opts)
    except KeyboardInterrupt as exc:
        print(
            "flexbench: study interrupted; the running trials are marked failed. Rerun the same "
            "command to continue the study",
            file=sys.stderr,
        )
        return signals.exit_code(exc)
    c = s.counts
    print(
        f"study {s.study_name} ({s.storage}): +{s.new_trials} trials, {sum(c.values())} in all "
        f"({c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"
        + (f", {c['waiting']} queued for retry" if c.get("waiting") else "")
        + (f", {c['running']} running elsewhere" if c.get("running") else "")
        + f"); MLflow run {s.mlflow_run_id}"
    )
    if s.best is not None:
        params = ", ".join(f"{k}={v:.4g}" for k, v in sorted(s.best.params.items()))
        print(f"best: trial {s.best.number}, objective {s.best.value:.4f} with {params}")
    if s.dead_workers:
        print(
            f"flexbench: {len(s.dead_workers)} worker(s) ended abnormally (see above); a trial "
            f"one left running was failed and queued for retry. Rerun to continue the study",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from benchmark.record.store import redact_uri
    from studies import export as ex

    study, url = _load(args)
    k, params, meta = ex.best_params(study)
    n = sum(meta["trials"].values())
    print(
        f"study {study.study_name}: best trial {meta['best_trial']} of {n}, "
        f"objective ({meta['objective']}, validation) {meta['best_value']:.4f}"
    )
    shown = (f"{n}={v:.6g}" if isinstance(v, float) else f"{n}={v}" for n, v in params.items())
    print(f"{k}: " + ", ".join(shown))
    if args.export:
        ex.export(study, args.export, redact_uri(url))
        print(f"wrote {args.export} (key {k}); use it in a grid with `method_params: from_study`")
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    from benchmark.files import disk_errors
    from benchmark.record import tracking
    from studies.plots import save_plots

    study, _ = _load(args)
    out = Path(args.out or Path("study_plots") / study.study_name)
    with disk_errors(out, "make room there or pass --out on another disk"):
        files, skipped = save_plots(study, out)
    for f in files:
        print(f"wrote {f}")
    for reason in skipped:
        print(f"skipped {reason}")
    run_id = study.user_attrs.get("mlflow_run_id")
    if files and run_id:
        uri = tracking.resolve_uri(args.tracking_uri)
        tracking.open_store(uri, create=False)  # the study's run exists already
        experiment = study.user_attrs.get("mlflow_experiment", "flexbench-studies")
        tracking.StudyRun(uri, experiment, run_id).log_artifacts(files, "plots")
        print(f"logged {len(files)} plot(s) to MLflow run {run_id} (artifacts/plots)")
    return 0


def _add_trial_count(p: argparse.ArgumentParser) -> None:
    """How many trials this run adds: a count, or a target that makes reruns idempotent."""
    n = p.add_mutually_exclusive_group(required=True)
    n.add_argument("--trials", type=int, help="trials to add in this run")
    n.add_argument(
        "--until",
        type=int,
        metavar="N",
        help="run trials until the study holds N complete or pruned ones (a rerun of the same "
        "command adds none once it does)",
    )


def _add_search_args(p: argparse.ArgumentParser) -> None:
    """How the study searches: sampler, pruner, objective and the search ranges."""
    from studies.choices import OBJECTIVES, PRUNERS, SAMPLERS

    p.add_argument("--sampler", choices=SAMPLERS, help="default tpe (stored with the study)")
    p.add_argument("--pruner", choices=PRUNERS, help="default median (stored with the study)")
    p.add_argument(
        "--sampler-seed",
        type=int,
        help="seed of the sampler (worker i: seed + i; a rerun of a study that "
        "holds trials draws new seeds from seed, trial count and i, so it does not repeat "
        "the first run's proposals)",
    )
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        help="summary of the sub-models' validation top-1 to maximise (default mean): "
        + "; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()),
    )
    p.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="NAME=LOW:HIGH[:log]",
        help="override the search range of a method parameter, e.g. --space T=1:20:log",
    )
    p.add_argument("--space-file", help="YAML of ranges: {T: {low: 1, high: 10, log: true}, ...}")


def _add_run(ssub: argparse._SubParsersAction) -> None:
    """`study run`: the cell, where the study lives, and how many trials it runs and how."""
    from studies.choices import HEARTBEAT_S

    p = ssub.add_parser("run", help="create or continue a study and run N more trials")
    _cell_args(p, create=True)
    _storage_args(p)
    _tracking_args(p)
    _add_trial_count(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    _add_search_args(p)
    p.add_argument("--experiment", help="MLflow experiment (default flexbench-studies)")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=HEARTBEAT_S,
        help=f"seconds between worker heartbeats (default {HEARTBEAT_S}); a trial whose worker "
        "is silent for 2 heartbeats is failed and retried",
    )
    p.set_defaults(func=cmd_run, on_interrupt="rerun the same command to continue the study")


def add_parser(sub: argparse._SubParsersAction) -> None:
    ssub = add_command_group(sub, "study", HELP, DESCRIPTION)
    _add_run(ssub)

    p = ssub.add_parser("best", help="print the best parameters; --export writes them for a grid")
    _cell_args(p, create=False)
    _storage_args(p)
    p.add_argument("--export", metavar="FILE.yaml", help="write/merge the best-params YAML")
    p.set_defaults(func=cmd_best)

    p = ssub.add_parser("plots", help="save Optuna's plots and log them to the study's MLflow run")
    _cell_args(p, create=False)
    _storage_args(p)
    _tracking_args(p)
    p.add_argument("--out", help="folder for the PNGs (default ./study_plots/<study>)")
    p.set_defaults(func=cmd_plots)
