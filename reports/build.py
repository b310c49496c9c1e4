"""Build a report: load -> statistics -> tables and figures -> index.html / report.md -> MLflow.

`build_report` is what `flexbench report` runs; it returns a `Report` with every table as a
DataFrame, so the numbers can also be checked or reused without parsing the rendered files.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.costs.axis import UNITS
from benchmark.errors import ConfigError
from benchmark.record import schema
from benchmark.record.store import redact_uri
from reports import figures as figs
from reports import ranks as rk
from reports import spread_figures as sf
from reports import tables as tb
from reports.cd_diagram import cd_diagram
from reports.load import CELL, PANEL, Experiment, histories, load_experiment
from reports.output import MARKER, check_out, relocate, staging
from reports.references import Reference, compare, load_references, sources_frame
from reports.stats import AUC, EE_AUC, MEAN, SUMMARIES, paired, scores, summarize
from reports.style import method_order, method_styles

FORMATS = ("md", "html", "tex", "csv")


@dataclass
class Report:
    experiment: Experiment
    out: Path
    baseline: str | None
    order: list[str]
    scores: pd.DataFrame
    summary: pd.DataFrame
    pairs: pd.DataFrame
    tables: list[tb.ResultTable]
    figures: dict[tuple, list[figs.Figure]]
    methods: pd.DataFrame  # one-number summaries per panel x method, rendered strings
    # the same from the weights of each cell's best-val epoch (selected on val, test numbers)
    methods_bestval: pd.DataFrame
    coverage: pd.DataFrame  # finished seeds per panel x method
    problems: pd.DataFrame  # cells that are not finished
    ref_table: pd.DataFrame
    ref_sources: pd.DataFrame
    ref_unrelated: list[Reference]
    ranks: rk.RankTest | None = None  # Friedman/Nemenyi over all cases (None: < 3 methods)
    rank_figures: list[figs.Figure] = field(default_factory=list)
    # per panel (arch, dataset, profile) with its own method set: (panel, test, CD diagram)
    panel_ranks: list[tuple[tuple, rk.RankTest, figs.Figure]] = field(default_factory=list)
    win_tie_loss: pd.DataFrame = field(default_factory=pd.DataFrame)
    separation: pd.DataFrame = field(default_factory=pd.DataFrame)  # seeds needed per cell
    study_figures: list[figs.Figure] = field(default_factory=list)
    # accuracy vs MFLOPs across architectures, per (dataset, profile) shared by >= 2 of them
    family_figures: list[figs.Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None
    seconds: float = 0.0

    @property
    def uri_display(self) -> str:
        return redact_uri(self.experiment.uri)


def pick_baseline(methods: list[str], requested: str | None) -> str | None:
    if requested:
        if methods and requested not in methods:
            raise ConfigError(
                f"baseline method {requested!r} has no finished cell in this experiment; "
                f"methods with finished cells: {', '.join(sorted(methods)) or '(none)'}"
            )
        return requested
    return "joint" if "joint" in methods else None


def parse_formats(spec: str) -> set[str]:
    wanted = {f.strip().lower() for f in spec.split(",") if f.strip()}
    bad = sorted(wanted - set(FORMATS))
    if bad or not wanted:
        raise ConfigError(
            f"unknown format(s) {', '.join(bad) or '(none given)'}; choose from {','.join(FORMATS)}"
        )
    return wanted


def _pm(mean: float, std: float, n: int) -> str:
    if n == 0 or math.isnan(mean):
        return "—"
    return tb.fmt_num(mean) if n < 2 or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def method_summaries(summary: pd.DataFrame, pairs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per panel x method: n, top-1 mean and AUC (mean ± std), and their paired gain; `AUC over`
    names the panel's cost unit (MFLOPs or GBitOps)."""
    rows = []
    if summary.empty:
        return pd.DataFrame()
    s = summary[summary["key"].isin(SUMMARIES)].set_index([*PANEL, "method", "key"])
    p = pairs.set_index([*PANEL, "method", "key"]) if not pairs.empty else None
    for panel, g in summary.groupby(PANEL, sort=True):
        unit = UNITS[g["cost_axis"].iloc[0]]
        for m in [m for m in order if m in set(g["method"])]:
            row = {**dict(zip(PANEL, panel)), "method": m, "AUC over": unit}
            for key, label in ((MEAN, "top-1 mean"), (AUC, "AUC"), (EE_AUC, EE_AUC)):
                idx = (*panel, m, key)
                if idx in s.index:
                    r = s.loc[idx]
                    row["n"] = int(r["n"])
                    row[label] = _pm(r["mean"], r["std"], int(r["n"]))
                else:
                    row[label] = "—"
                if p is not None and idx in p.index:
                    q = p.loc[idx]
                    row[f"Δ {label}"] = (
                        f"{q['diff_mean']:+.2f}{q['mark']} (n={int(q['n'])}, p={tb.fmt_p(q['p'])})"
                        if int(q["n"]) > 0
                        else "—"
                    )
                else:
                    row[f"Δ {label}"] = ""
            rows.append(row)
    cols = [*PANEL, "method", "n", "top-1 mean", "Δ top-1 mean", "AUC over", "AUC", "Δ AUC"]
    if EE_AUC in set(summary["key"]):  # only panels with early exiting have the column
        cols += [EE_AUC, f"Δ {EE_AUC}"]
    return pd.DataFrame(rows).reindex(columns=cols)


def bestval_summaries(tidy: pd.DataFrame, base: str | None, order: list[str]) -> pd.DataFrame:
    """`method_summaries` of `test/top1_bestval` (the network of the epoch with the best mean
    val top-1); empty when no cell logged it (runs before the selection existed, studies)."""
    if tidy.empty or "top1_bestval" not in tidy or tidy["top1_bestval"].isna().all():
        return pd.DataFrame()
    bv = tidy.dropna(subset=["top1_bestval"])
    sc = scores(bv.assign(top1=bv["top1_bestval"]))
    return method_summaries(summarize(sc), paired(sc, base), order)


def coverage(cells: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per panel x method: finished / expected cells, and which seeds are not finished."""
    if cells.empty:
        return pd.DataFrame(columns=[*PANEL, "method", "finished", "not finished"])
    rows = []
    for key, g in cells.groupby([*PANEL, "method"], sort=True):
        done = g[g["status"] == "finished"]
        other = g[g["status"] != "finished"].sort_values("seed")
        rows.append(
            {
                **dict(zip([*PANEL, "method"], key)),
                "finished": f"{len(done)}/{len(g)}",
                "not finished": ", ".join(f"seed {r.seed}: {r.status}" for r in other.itertuples())
                or "",
            }
        )
    out = pd.DataFrame(rows)
    rank = {m: i for i, m in enumerate(order)}
    out["_r"] = out["method"].map(lambda m: rank.get(m, len(rank)))
    return out.sort_values([*PANEL, "_r", "method"]).drop(columns="_r").reset_index(drop=True)


def problems(cells: pd.DataFrame) -> pd.DataFrame:
    cols = [*CELL, "status", "error", "run_id"]
    if cells.empty:
        return pd.DataFrame(columns=cols)
    bad = cells[cells["status"] != "finished"].copy()
    bad["error"] = bad["error"].map(lambda e: "" if not isinstance(e, str) else e[:300])
    bad["run_id"] = bad["run_id"].fillna("")
    return bad[cols].reset_index(drop=True)


def panel_figures(r: Report, styles: dict) -> dict[tuple, list[figs.Figure]]:
    """Per panel: accuracy vs cost, gain, curves per epoch, validation top-1 per sub-model and
    budgeted-batch curves (the last two with bands over seeds)."""
    exp, base, order, out = r.experiment, r.baseline, r.order, r.out
    summary, pairs = r.summary, r.pairs
    finished = exp.cells[exp.cells["status"] == "finished"]
    hist = (
        histories(exp.uri, finished["run_id"].tolist())
        if not finished.empty
        else pd.DataFrame(columns=["run_id", "key", "step", "value"])
    )
    figures: dict[tuple, list[figs.Figure]] = {}
    for t in r.tables:

        def sel(df: pd.DataFrame, panel=t.panel) -> pd.DataFrame:
            return df[(df[PANEL] == pd.Series(panel, index=PANEL)).all(axis=1)]

        s_panel, c_panel = sel(summary), sel(finished)
        spectrum = sel(exp.spectrum) if not exp.spectrum.empty else None
        h_panel = hist[hist["run_id"].isin(c_panel["run_id"])]
        subs = sel(exp.tidy).sort_values("submodel_index")["submodel"].unique().tolist()
        spread = histories(
            exp.uri,
            c_panel["run_id"].tolist(),
            (*(sf.VAL_PREFIX + s for s in subs), *sf.BUDGETED),
        )
        ctx = figs.PanelPlot(t.panel, order, styles, base, out)
        made = [
            figs.acc_vs_cost(s_panel, ctx, spectrum),
            figs.gain(sel(pairs), s_panel, ctx),
            figs.curves(h_panel, c_panel, ctx),
            sf.submodel_curves(spread, c_panel, subs, ctx),
            sf.budgeted_curves(spread, c_panel, ctx),
        ]
        figures[t.panel] = [f for f in made if f is not None]
    return figures


def add_rankings(r: Report, styles: dict) -> None:
    """Friedman/Nemenyi over all cases with its CD diagram, win/tie/loss against the baseline,
    and the seeds needed to separate the two best methods of each cell (`reports.ranks`)."""
    r.ranks = rk.rank_test(r.scores)
    if r.ranks is not None:
        r.rank_figures.append(cd_diagram(r.ranks, styles, r.out))
    panels = list(r.scores.groupby(PANEL, sort=False)) if not r.scores.empty else []
    for panel, sc in panels if len(panels) > 1 else []:
        # each architecture alone as well: the cases of all panels rank only the methods they
        # share (e.g. joint, ipkd, ipkd_ta), one panel's own ones (imta, tuned cells) here
        t = rk.rank_test(sc)
        if t is not None:
            stem = f"figures/cd_diagram_{tb.panel_slug(panel)}"
            fig = cd_diagram(t, styles, r.out, stem, tb.panel_title(panel))
            r.panel_ranks.append((panel, t, fig))
    r.win_tie_loss = rk.win_tie_loss(r.pairs, r.baseline, r.order)
    r.separation = rk.separation(r.scores, r.summary)


@dataclass
class ReportOptions:
    """`flexbench report`'s choices besides the experiment and the store; the defaults are
    the CLI's."""

    out: Path | str | None = None  # None: ./report-<experiment>
    baseline: str | None = None  # None: joint when it has finished cells
    formats: set[str] | str = "md,html,tex,csv"
    references_dir: Path | None = None  # None: the reference files shipped with flexbench
    studies: list | None = None  # Optuna studies whose figures the report adds
    log_to_mlflow: bool = True


def build_report(
    experiment: str, tracking_uri: str | None = None, opts: ReportOptions | None = None
) -> Report:
    """Everything `flexbench report` writes; see the module docstring. Every check runs before
    anything is written, and the files are rendered aside and swapped in at the end
    (`reports.output`): a failure or Ctrl-C leaves the previous report whole."""
    t0 = time.perf_counter()
    opts = opts or ReportOptions()
    formats = opts.formats
    if isinstance(formats, str):
        formats = parse_formats(formats)
    refs = load_references(opts.references_dir)  # a broken reference file fails before any work
    out = Path(opts.out) if opts.out else Path(f"report-{tb.panel_slug((experiment,))}")
    check_out(out)
    exp = load_experiment(experiment, tracking_uri)
    finished_methods = sorted(exp.tidy["method"].unique()) if not exp.tidy.empty else []
    base = pick_baseline(finished_methods, opts.baseline)
    with staging(out) as tmp:
        report = _analyse(exp, refs, base, tmp)
        report.notes += _notes(report, opts.baseline)
        if opts.studies:
            _add_study_figures(report, opts.studies)

        from reports import page  # rendering last: it only reads the Report

        report.files = page.write(report, formats)
    report.out = out
    report.files = relocate(report.files, tmp, out)
    for f in _all_figures(report):
        f.files = relocate(f.files, tmp, out)
    report.seconds = time.perf_counter() - t0
    if opts.log_to_mlflow:
        report.run_id = log_report(report)
    return report


def _analyse(exp: Experiment, refs: list[Reference], base: str | None, out: Path) -> Report:
    """Statistics, tables, figures (written under `out`) and rankings of `exp`."""
    all_methods = sorted(exp.cells["method"].unique()) if not exp.cells.empty else []
    order = method_order(all_methods, base)
    styles = method_styles(all_methods)
    sc = scores(exp.tidy)
    summary = summarize(sc)
    pairs = paired(sc, base)
    ref_table, unrelated = compare(refs, exp.tidy)
    report = Report(
        experiment=exp,
        out=out,
        baseline=base,
        order=order,
        scores=sc,
        summary=summary,
        pairs=pairs,
        tables=tb.build_tables(summary, pairs, base, order),
        figures={},
        methods=method_summaries(summary, pairs, order),
        methods_bestval=bestval_summaries(exp.tidy, base, order),
        coverage=coverage(exp.cells, order),
        problems=problems(exp.cells),
        ref_table=ref_table,
        ref_sources=sources_frame([r for r in refs if r not in unrelated]),
        ref_unrelated=unrelated,
    )
    report.figures = panel_figures(report, styles)
    report.family_figures = figs.families(report.summary, report.order, styles, report.out)
    add_rankings(report, styles)
    return report


def _all_figures(r: Report) -> list[figs.Figure]:
    panel = [f for fs in r.figures.values() for f in fs]
    ranks = [*r.rank_figures, *(f for _, _, f in r.panel_ranks)]
    return [*panel, *r.family_figures, *ranks, *r.study_figures]


def _add_study_figures(report: Report, studies: list) -> None:
    """Optuna's history / importance / contour figures of each study; a figure Optuna cannot
    draw (too few trials) becomes a note instead."""
    from reports.optuna_plots import study_figures

    for study in studies:
        made, skipped = study_figures(study, report.out)
        report.study_figures += made
        report.notes += skipped


def _notes(r: Report, requested: str | None) -> list[str]:
    notes = []
    exp = r.experiment
    if exp.cells.empty:
        notes.append(f"Experiment {exp.name!r} holds no flexbench cell yet.")
    elif exp.tidy.empty:
        notes.append("No cell has finished yet: no table or figure can be drawn.")
    if r.baseline is None and not exp.tidy.empty:
        notes.append(
            "No baseline: `joint` has no finished cell and --baseline was not given, so there "
            "are no paired tests, gain figures or significance marks."
        )
    for reason, count in exp.ignored.items():
        if count and not reason.startswith("report"):  # earlier reports: expected, no news
            notes.append(f"Ignored {count} run(s): {reason}.")
    notes += _plan_notes(exp)
    rt = r.ranks
    if rt is not None and (rt.left_out or rt.cases_left_out):
        said = []
        if rt.cases_left_out:
            said.append(f"{rt.cases_left_out} case(s) without every ranked method are left out")
        if rt.left_out:
            said.append(f"not ranked: {', '.join(rt.left_out)} (missing from many cases)")
        notes.append("Rank statistics across architectures: " + "; ".join(said) + ".")
    dup = int(exp.cells.get("superseded", pd.Series(dtype=int)).fillna(0).sum())
    if dup:
        notes.append(
            f"{dup} older run(s) of cells that were run again are superseded by the latest "
            f"finished run of the same cell."
        )
    if not r.summary.empty and (r.summary["n"] == 1).any():
        notes.append(
            "Some methods have a single seed: their std and CIs are undefined (shown as —) "
            "and they are never marked significant."
        )
    return notes


def _plan_notes(exp: Experiment) -> list[str]:
    """Where the expected cells come from: the grid's recorded plan, or the cross product."""
    plan = exp.plan
    if plan is not None:
        excluded = int(plan.get("excluded", 0))
        extra = ""
        if "planned" in exp.cells.columns and (~exp.cells["planned"]).any():
            extra = f" {int((~exp.cells['planned']).sum())} cell(s) with runs are not in that plan."
        return [
            f"Expected cells: the {len(plan['cells'])} cells of the plan recorded by `flexbench "
            f"grid run` for grid {plan.get('grid', '?')!r} ({plan.get('path', '?')})"
            + (f"; the {excluded} cell(s) its grid file excludes are not expected" * bool(excluded))
            + "."
            + extra
        ]
    if (exp.cells.get("status", pd.Series(dtype=str)) == "missing").any():
        return [
            "No grid plan is recorded in this experiment (cells not run by `flexbench grid run`, "
            "or by a version that did not record it): a cell counts as missing when the "
            "experiment holds its arch/dataset, its method and its seed elsewhere."
        ]
    return []


def log_report(r: Report) -> str:
    """Log the report folder as the artifacts of a `report` run in the same experiment."""
    from benchmark.record import tracking

    n_done = (
        int((r.experiment.cells["status"] == "finished").sum()) if len(r.experiment.cells) else 0
    )
    return tracking.log_artifact_run(
        r.experiment.uri,
        r.experiment.experiment_id,
        f"report-{time.strftime('%Y%m%d-%H%M%S')}",
        {
            schema.KIND: "report",
            schema.REPORT_OF: r.experiment.name,
            "mlflow.note.content": "flexbench report: open index.html",
        },
        {
            "baseline": str(r.baseline),
            "finished_cells": str(n_done),
            "cells": str(len(r.experiment.cells)),
        },
        sorted(p for p in r.out.iterdir() if p.name != MARKER),
    )
