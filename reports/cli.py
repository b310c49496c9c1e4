"""`flexbench report`: figures and tables of an experiment, from MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from reports.build import ReportOptions, build_report, parse_formats

    formats = parse_formats(args.formats)
    studies = None
    if args.optuna_storage:
        from reports.optuna_plots import load_studies

        studies = load_studies(args.optuna_storage, args.study or None)
    elif args.study:
        from benchmark.errors import ConfigError

        raise ConfigError("--study needs --optuna-storage")
    opts = ReportOptions(
        out=Path(args.out) if args.out else None,
        baseline=args.baseline,
        formats=formats,
        references_dir=Path(args.references) if args.references else None,
        studies=studies,
        log_to_mlflow=not args.no_log,
    )
    r = build_report(args.experiment, tracking_uri=args.tracking_uri, opts=opts)
    n_fig = sum(len(f) for f in r.figures.values()) + len(r.study_figures)
    main = r.out / ("index.html" if "html" in formats else "report.md" if "md" in formats else "")
    print(
        f"report of {r.experiment.name!r}: {len(r.tables)} table(s), {n_fig} figure(s) "
        f"(PNG + PDF) in {r.seconds:.1f}s -> {main}"
    )
    for note in r.notes:
        print(f"  note: {note}", file=sys.stderr)
    if r.run_id:
        print(f"logged as MLflow run {r.run_id} (tag flexbench.kind=report)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="paper-style figures and tables of an experiment (from MLflow)",
        description="Read the finished cells of an MLflow experiment and write figures (PNG, "
        "PDF), tables (Markdown, LaTeX, CSV), index.html and report.md; the folder is also "
        "logged to MLflow as the artifacts of a run tagged flexbench.kind=report.",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment (the grid's name)")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default)",
    )
    p.add_argument("--out", help="output folder (default: ./report-<experiment>)")
    p.add_argument(
        "--baseline",
        help="method the others are compared with (default: joint when it has finished cells)",
    )
    p.add_argument(
        "--formats",
        default="md,html,tex,csv",
        help="comma list of md, html, tex, csv (figures are always written; default: all)",
    )
    p.add_argument(
        "--references",
        help="folder of published-number YAML files (default: the ones shipped with flexbench)",
    )
    p.add_argument(
        "--optuna-storage",
        help="Optuna storage URL whose studies get history/importance/contour figures",
    )
    p.add_argument("--study", action="append", default=[], help="only this study (repeatable)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    p.set_defaults(
        func=cmd_report,
        on_interrupt="the previous report (if any) is left as it was; rerun to write the new one",
    )
