"""Render a built Report: table files, index.html (one page, opens from disk) and report.md."""

from __future__ import annotations

import html as _html
import math
import time
from pathlib import Path

import pandas as pd

from reports import tables as tb
from reports.stats import ALPHA, MIN_N_SIGNIFICANCE, MIN_N_WILCOXON

e = _html.escape

BESTVAL_CAPTION = (
    "Selected on val, reported on test: the same summaries for each cell's network of the epoch "
    "with the best mean validation top-1 (test/top1_bestval); the tables above are the last "
    "epoch. Nothing is ever chosen on test."
)
STATISTICS = [
    "Accuracy is top-1 (%) on the test split after the last epoch; the test split is never "
    "used for tuning or early stopping.",
    "Mean ± std: sample standard deviation (ddof = 1) over seeds; with one seed only the mean "
    "is shown. 95% CI: t-interval of the mean, t(0.975, n−1) · std / √n.",
    "Paired test: methods start from the same initial weights and data order for a given seed, "
    "so for each (arch, dataset, sub-model) the differences method − baseline over the seeds "
    "both finished are tested with a two-sided paired t-test (scipy.stats.ttest_rel); with "
    f"n ≥ {MIN_N_WILCOXON} pairs the exact Wilcoxon signed-rank test is reported as well.",
    f"Significance marks (* p < {ALPHA}, ** p < 0.01) appear only with n ≥ "
    f"{MIN_N_SIGNIFICANCE} pairs, and are not corrected for multiple comparisons.",
    "AUC: area under top-1 vs cost (trapezoids over the sub-models) divided by the cost range: "
    "the mean accuracy over the cost range, comparable between methods on the same "
    "architecture; the same value as a cell's own test/top1_auc.",
    "Cost: MFLOPs, except in panels whose sub-models all have the same MFLOPs and differ in "
    "bit-operations (bit-width-switchable networks), where it is GBitOps: the trainer's rule "
    "(benchmark.costs.axis, tag flexbench.cost_axis). Figures, tables and AUC of a panel all use "
    "its one cost, named in every caption; runs without GBitOps use MFLOPs.",
    "MFLOPs: forward pass of one image counted by torch's FlopCounterMode (2 × multiply-adds); "
    "MSDNet exits are cumulative (the cost of reaching that exit, earlier heads included).",
    "GBitOps: billions of bit-operations of one image's forward pass, multiply-adds × weight "
    "bits × activation bits (32 × 32 for full-precision layers).",
    "Missing cells: a cell of the grid's plan (recorded by `flexbench grid run`; pairs the grid "
    "file excludes are not planned) without any run; for an experiment without a recorded plan, "
    "an arch/dataset × method × seed of the experiment without any run. Failed, interrupted, "
    "pruned and running cells are listed with their status and never averaged.",
    "Rank statistics (Demšar 2006): in each case (arch, dataset, sub-model, seed) the methods "
    "are ranked by test top-1 (1 = best, ties share the mean rank); over the cases where all "
    "ranked methods have a number: average ranks, Friedman test (scipy.stats.friedmanchisquare, "
    "tie-corrected) and Iman-Davenport F, Nemenyi critical difference CD = q_α √(k(k+1)/(6N)) "
    "with q_α from the studentized range (scipy), pairwise Nemenyi p by scikit-posthocs. Cases "
    "are not independent (sub-models of a cell share weights), so these p values are optimistic.",
    "Win/tie/loss: per (arch, dataset, sub-model) a method wins (loses) against the baseline "
    f"when the paired t-test gives p < {ALPHA} with n ≥ {MIN_N_SIGNIFICANCE} pairs and its mean "
    "is higher (lower); anything else is a tie.",
    "Seeds needed: a simple power estimate. For the two best methods of a cell, taking the "
    "observed mean and std of their paired differences as the true ones, the smallest number of "
    f"seeds at which a two-sided paired t-test at α = {ALPHA} detects the difference with 80% "
    "power (noncentral t). Both numbers come from few seeds: read it as an order of magnitude.",
]


PANEL_RANKS = "One architecture alone:"  # heading of a panel's own ranking


def _rank_frame(t) -> pd.DataFrame:
    if t is None:
        return pd.DataFrame()
    return pd.DataFrame(
        {
            "method": t.methods,
            "average rank": [f"{v:.3f}" for v in t.avg_rank],
            "cases": t.n_cases,
            "differs (Nemenyi) from": [
                ", ".join(o for o in t.methods if o != m and t.pvalues.loc[m, o] < t.alpha)
                for m in t.methods
            ],
        }
    )


def _rank_text(t) -> str:
    if t is None:
        return (
            "No rank statistics: they need at least 3 methods with finished cells on at least "
            "2 shared cases."
        )
    return (
        f"{len(t.methods)} methods over N = {t.n_cases} cases. Friedman χ² = {t.chi2:.2f} "
        f"(p = {tb.fmt_p(t.p_chi2)}); Iman-Davenport F = {t.ff:.2f} (p = {tb.fmt_p(t.p_ff)}, "
        f"df {len(t.methods) - 1}, {(len(t.methods) - 1) * (t.n_cases - 1)}). Nemenyi critical "
        f"difference at α = {t.alpha:g}: CD = {t.cd:.3f} (q = {t.q_alpha:.3f})."
    )


def _separation_frame(r) -> pd.DataFrame:
    d = r.separation
    if d.empty:
        return pd.DataFrame()
    out = d.copy()
    out["Δ mean"] = out["diff_mean"].map(tb.fmt_num)
    out["std of Δ"] = out["diff_std"].map(tb.fmt_num)
    out["seeds needed"] = [
        "—"
        if v is None or (isinstance(v, float) and math.isnan(v))
        else (f"> {int(v) - 1}" if int(v) > 1000 else str(int(v)))
        for v in out["seeds needed"]
    ]
    return out.drop(columns=["diff_mean", "diff_std"])


def _pairs_frame(pairs: pd.DataFrame) -> pd.DataFrame:
    if pairs.empty:
        return pd.DataFrame()
    d = pairs.copy()
    out = pd.DataFrame(
        {
            "arch": d["arch"],
            "dataset": d["dataset"],
            "profile": d["profile"],
            "method": d["method"],
            "key": d["key"],
            "n": d["n"],
            "seeds": d["seeds"],
            "Δ mean": d["diff_mean"].map(lambda v: tb.fmt_num(v)),
            "95% CI": d["diff_ci95"].map(lambda v: "—" if math.isnan(v) else f"± {v:.2f}"),
            "t": d["t"].map(lambda v: tb.fmt_num(v, 3)),
            "p (t)": d["p"].map(tb.fmt_p),
            "p (Wilcoxon)": d["wilcoxon_p"].map(tb.fmt_p),
            "mark": d["mark"],
        }
    )
    return out


def _ref_frame(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    d = df.copy()
    d["ours top-1"] = [
        "not run" if n == 0 else (tb.fmt_num(m) if n == 1 else f"{m:.2f} ± {s:.2f}")
        for m, s, n in zip(d["ours top-1"], d["ours std"], d["n"])
    ]
    d["ours − published"] = d["ours − published"].map(
        lambda v: "—" if math.isnan(v) else f"{v:+.2f}"
    )
    d["published top-1"] = d["published top-1"].map(lambda v: f"{v:.2f}")
    return d.drop(columns=["ours std"])


def write_tables(r, formats: set[str]) -> list[Path]:
    folder = r.out / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    def put(name: str, text: str) -> None:
        path = folder / name
        path.write_text(text)
        files.append(path)

    for t in r.tables:
        slug = tb.panel_slug(t.panel)
        if "md" in formats:
            put(f"results_{slug}.md", f"{t.caption}\n\n{tb.markdown(t)}")
        if "tex" in formats:
            put(f"results_{slug}.tex", tb.latex(t))
        if "csv" in formats:
            put(f"results_{slug}.csv", tb.csv_frame(t).to_csv(index=False))
    small = {
        "summary": (r.methods, "One-number summaries per method (mean ± std over seeds)."),
        "summary_bestval": (r.methods_bestval, BESTVAL_CAPTION),
        "paired_tests": (_pairs_frame(r.pairs), f"Paired tests against {r.baseline}."),
        "references": (_ref_frame(r.ref_table), "Published vs ours (top-1, %)."),
        "ranks": (_rank_frame(r.ranks), f"Average ranks over cases. {_rank_text(r.ranks)}"),
        "win_tie_loss": (r.win_tie_loss, f"Win/tie/loss against {r.baseline} (paired t-test)."),
        "seeds_needed": (_separation_frame(r), "Seeds needed to separate the two best methods."),
    }
    for name, (df, caption) in small.items():
        if "md" in formats:
            put(f"{name}.md", f"{caption}\n\n{tb.frame_markdown(df)}")
        if "tex" in formats and not df.empty:
            put(f"{name}.tex", tb.frame_latex(df, caption, f"flexbench-{name}"))
    if "csv" in formats:
        put("summary.csv", r.summary.to_csv(index=False))
        if not r.methods_bestval.empty:
            put("summary_bestval.csv", r.methods_bestval.to_csv(index=False))
        put("paired_tests.csv", r.pairs.to_csv(index=False))
        put("references.csv", r.ref_table.to_csv(index=False))
        put("win_tie_loss.csv", r.win_tie_loss.to_csv(index=False))
        put("seeds_needed.csv", r.separation.to_csv(index=False))
        if r.ranks is not None:
            put("ranks.csv", r.ranks.avg_rank.rename("average_rank").to_csv())
        for panel, t, _ in r.panel_ranks:
            ranks = t.avg_rank.rename("average_rank").to_csv()
            put(f"ranks_{tb.panel_slug(panel)}.csv", ranks)
        put(
            "cells.csv",
            r.experiment.cells.drop(columns=["start_time"], errors="ignore").to_csv(index=False),
        )
        put("tidy.csv", r.experiment.tidy.to_csv(index=False))
    return files


def _counts(r) -> str:
    cells = r.experiment.cells
    if cells.empty:
        return "no cells"
    c = cells["status"].value_counts()
    return ", ".join(f"{c[s]} {s}" for s in sorted(c.index, key=lambda s: (s != "finished", s)))


# ---- HTML ----------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;
 max-width:1180px;padding:12px 24px 60px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd}
h3{margin-top:1.4em}
.meta{color:#555;font-size:.9em} nav a{margin-right:1em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.86em}
th,td{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
thead th{border-bottom:2px solid #444;background:#fafafa}
caption{caption-side:top;text-align:left;font-size:.9em;color:#444;padding-bottom:4px;
 max-width:1100px}
table.plain td,table.plain th{text-align:left}
tr.baseline th,tr.baseline td{background:#f6f6f6}
.flops{font-weight:normal;color:#666;font-size:.9em}
.figs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
figure{margin:0;max-width:560px} figure.wide{max-width:1100px}
figure img{width:100%;border:1px solid #eee}
figcaption{font-size:.82em;color:#444}
.note{background:#fff8e1;border-left:4px solid #f0c000;padding:6px 10px;margin:.4em 0}
.ok{background:#eef7ee;border-left:4px solid #4a4;padding:6px 10px}
ul.stats li{margin-bottom:.3em;font-size:.92em}
"""


def _figure_html(f) -> str:
    wide = " class='wide'" if "curves_" in f.stem or "contour" in f.stem else ""
    return (
        f"<figure{wide}><a href='{e(f.stem)}.pdf'><img src='{e(f.stem)}.png' "
        f"alt='{e(f.title)}'></a><figcaption><b>{e(f.title)}.</b> {e(f.caption)} "
        f"<a href='{e(f.stem)}.pdf'>PDF</a></figcaption></figure>"
    )


def _rankings_html(r) -> list[str]:
    parts = ["<h2 id='ranks'>Rankings across cases</h2>", f"<p>{e(_rank_text(r.ranks))}</p>"]
    if r.ranks is not None:
        parts.append(tb.frame_html(_rank_frame(r.ranks), "Average rank of each method (1 = best)."))
        parts.append("<div class='figs'>")
        parts += [_figure_html(f) for f in r.rank_figures]
        parts.append("</div>")
    for panel, t, fig in r.panel_ranks:
        parts.append(f"<h3>{e(PANEL_RANKS)} {e(tb.panel_title(panel))}</h3>")
        parts.append(f"<p>{e(_rank_text(t))}</p>")
        parts.append(tb.frame_html(_rank_frame(t), "Average rank of each method (1 = best)."))
        parts += ["<div class='figs'>", _figure_html(fig), "</div>"]
    parts.append("<h3>Win / tie / loss against the baseline</h3>")
    parts.append(
        tb.frame_html(
            r.win_tie_loss,
            f"Per (arch, dataset, sub-model) cell shared with {r.baseline}: win or loss when the "
            f"paired t-test gives p < {ALPHA} with n ≥ {MIN_N_SIGNIFICANCE} pairs, else tie.",
        )
        if not r.win_tie_loss.empty
        else "<p>No baseline or no shared seeds: no win/tie/loss count.</p>"
    )
    parts.append("<h3>Seeds needed to separate the two best methods</h3>")
    parts.append(
        tb.frame_html(
            _separation_frame(r),
            "A simple power estimate: seeds at which a paired t-test (α = 0.05, two-sided) "
            "would detect the observed mean difference of the two best methods with 80% power, "
            "if the observed std of the differences were the true one (— : fewer than 2 "
            "shared seeds, or no spread).",
        )
        if not r.separation.empty
        else "<p>No cell has two methods with finished seeds.</p>"
    )
    return parts


def _references_html(r) -> list[str]:
    parts: list[str] = []
    parts.append("<h2 id='references'>Published vs ours</h2>")
    if r.ref_table.empty:
        parts.append(
            "<p>No published reference concerns an architecture and dataset of this experiment.</p>"
        )
    else:
        parts.append(
            tb.frame_html(
                _ref_frame(r.ref_table),
                "Published top-1 (errors converted to 100 − error) and ours (mean ± std over n "
                "seeds, last epoch); cost in the unit the source used.",
            )
        )
        parts.append(tb.frame_html(r.ref_sources, "Sources: what exactly was measured."))
    if r.ref_unrelated:
        names = ", ".join(x.id for x in r.ref_unrelated)
        parts.append(
            f"<p class='meta'>{len(r.ref_unrelated)} further reference(s) concern architectures "
            f"or datasets not in this experiment (or have no flexbench counterpart): "
            f"{e(names)}. They are kept in reports/references/.</p>"
        )
    return parts


def _head_html(r) -> list[str]:
    """The page's head, title, provenance line (store, experiment, cell counts, baseline) and
    the section links (Studies only when there are study figures)."""
    exp = r.experiment
    return [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>flexbench report — {e(exp.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>flexbench report — {e(exp.name)}</h1>",
        f"<p class='meta'>Generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))} from MLflow "
        f"<code>{e(r.uri_display)}</code>, experiment id {e(exp.experiment_id)}. Cells: "
        f"{e(_counts(r))}. Baseline: <b>{e(str(r.baseline))}</b>.</p>",
        "<nav><a href='#results'>Results</a><a href='#summary'>Summaries</a>"
        "<a href='#tests'>Paired tests</a><a href='#ranks'>Rankings</a>"
        "<a href='#references'>Published vs ours</a>"
        + ("<a href='#studies'>Studies</a>" if r.study_figures else "")
        + "<a href='#cells'>Cells</a><a href='#method'>Statistics</a></nav>",
    ]


def _results_html(r) -> list[str]:
    """One section per (arch, dataset) panel: its table, then its figures."""
    parts = ["<h2 id='results'>Results per architecture and dataset</h2>"]
    if not r.tables:
        parts.append("<p class='note'>No finished cell: nothing to tabulate yet.</p>")
    for t in r.tables:
        slug = tb.panel_slug(t.panel)
        parts.append(f"<h3 id='{e(slug)}'>{e(tb.panel_title(t.panel))}</h3>")
        parts.append(tb.html(t))
        parts.append("<div class='figs'>")
        parts += [_figure_html(f) for f in r.figures.get(t.panel, [])]
        parts.append("</div>")
    if r.family_figures:
        parts.append("<h3 id='families'>Families side by side</h3><div class='figs'>")
        parts += [_figure_html(f) for f in r.family_figures]
        parts.append("</div>")
    return parts


def _summaries_html(r) -> list[str]:
    """The one-number summaries per method (and their selected-on-val twins), then every paired
    test against the baseline, folded away."""
    parts = ["<h2 id='summary'>One-number summaries per method</h2>"]
    parts.append(
        tb.frame_html(
            r.methods,
            "Per method: n finished seeds; mean top-1 over the sub-models and normalised AUC "
            "over the panel's cost (column 'AUC over'), mean ± std over seeds; Δ: paired "
            "difference to the baseline with n pairs and t-test p (marks only with n ≥ 3).",
        )
    )
    if not r.methods_bestval.empty:
        parts.append("<h3>Selected on val</h3>")
        parts.append(tb.frame_html(r.methods_bestval, BESTVAL_CAPTION))
    parts.append("<h2 id='tests'>Paired tests against the baseline</h2>")
    parts.append(
        "<details><summary>all tests ("
        + str(len(r.pairs))
        + ")</summary>"
        + tb.frame_html(
            _pairs_frame(r.pairs),
            "Δ mean: mean over shared seeds of method − baseline (percentage points); 95% CI of "
            "that mean; two-sided paired t-test; Wilcoxon signed-rank only with n ≥ 6.",
        )
        + "</details>"
    )
    return parts


def _cells_html(r) -> list[str]:
    """Coverage: finished cells per method, and the ones that are not (never averaged)."""
    parts = ["<h2 id='cells'>Cells</h2>"]
    parts.append(tb.frame_html(r.coverage, "Finished cells per method (of those expected)."))
    if not r.problems.empty:
        parts.append(
            tb.frame_html(r.problems, "Cells that are not finished (never averaged).", "plain")
        )
    else:
        parts.append("<p class='ok'>Every expected cell finished.</p>")
    return parts


def _conventions_html(table_files: list[Path]) -> list[str]:
    """The statistics and conventions behind every number, and links to the table files."""
    parts = ["<h2 id='method'>Statistics and conventions</h2><ul class='stats'>"]
    parts += [f"<li>{e(s)}</li>" for s in STATISTICS]
    parts.append("</ul>")
    if table_files:
        links = " ".join(
            f"<a href='tables/{e(p.name)}'>{e(p.name)}</a>" for p in sorted(table_files)
        )
        parts.append(f"<p class='meta'>Table files: {links}</p>")
    return parts


def render_html(r, table_files: list[Path]) -> str:
    """index.html: one page that opens from disk, its sections in the order of the nav links."""
    parts = _head_html(r)
    parts += [f"<p class='note'>{e(n)}</p>" for n in r.notes]
    parts += _results_html(r)
    parts += _summaries_html(r)
    parts += _rankings_html(r)
    parts += _references_html(r)
    if r.study_figures:
        parts.append("<h2 id='studies'>Optuna studies</h2><div class='figs'>")
        parts += [_figure_html(f) for f in r.study_figures]
        parts.append("</div>")
    parts += _cells_html(r)
    parts += _conventions_html(table_files)
    parts.append("</body></html>")
    return "\n".join(parts)


# ---- Markdown -------------------------------------------------------------------------------


def render_markdown(r) -> str:
    exp = r.experiment
    lines = [
        f"# flexbench report — {exp.name}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow `{r.uri_display}`. "
        f"Cells: {_counts(r)}. Baseline: **{r.baseline}**.",
        "",
    ]
    lines += [f"> {n}\n" for n in r.notes]
    lines += ["## Results per architecture and dataset", ""]
    for t in r.tables:
        lines += [f"### {tb.panel_title(t.panel)}", "", t.caption, "", tb.markdown(t)]
        for f in r.figures.get(t.panel, []):
            lines += [f"![{f.title}]({f.stem}.png)", "", f"*{f.title}.* {f.caption}", ""]
    if r.family_figures:
        lines += ["### Families side by side", ""]
    for f in r.family_figures:
        lines += [f"![{f.title}]({f.stem}.png)", "", f"*{f.title}.* {f.caption}", ""]
    lines += ["## One-number summaries per method", "", tb.frame_markdown(r.methods)]
    if not r.methods_bestval.empty:
        lines += ["### Selected on val", "", BESTVAL_CAPTION, ""]
        lines += [tb.frame_markdown(r.methods_bestval)]
    lines += ["## Paired tests against the baseline", "", tb.frame_markdown(_pairs_frame(r.pairs))]
    lines += ["## Rankings across cases", "", _rank_text(r.ranks), ""]
    if r.ranks is not None:
        lines += [tb.frame_markdown(_rank_frame(r.ranks))]
        for f in r.rank_figures:
            lines += [f"![{f.title}]({f.stem}.png)", "", f"*{f.title}.* {f.caption}", ""]
    for panel, t, f in r.panel_ranks:
        lines += [f"### {PANEL_RANKS} {tb.panel_title(panel)}", "", _rank_text(t), ""]
        lines += [tb.frame_markdown(_rank_frame(t))]
        lines += [f"![{f.title}]({f.stem}.png)", "", f"*{f.title}.* {f.caption}", ""]
    lines += ["### Win / tie / loss against the baseline", "", tb.frame_markdown(r.win_tie_loss)]
    lines += [
        "### Seeds needed to separate the two best methods (a simple power estimate)",
        "",
        tb.frame_markdown(_separation_frame(r)),
    ]
    lines += ["## Published vs ours", ""]
    if r.ref_table.empty:
        lines += ["No published reference concerns an architecture and dataset here.", ""]
    else:
        lines += [tb.frame_markdown(_ref_frame(r.ref_table)), tb.frame_markdown(r.ref_sources)]
    if r.study_figures:
        lines += ["## Optuna studies", ""]
        for f in r.study_figures:
            lines += [f"![{f.title}]({f.stem}.png)", "", f"*{f.title}.* {f.caption}", ""]
    lines += ["## Cells", "", tb.frame_markdown(r.coverage)]
    if not r.problems.empty:
        lines += ["Not finished (never averaged):", "", tb.frame_markdown(r.problems)]
    lines += ["## Statistics and conventions", ""] + [f"- {s}" for s in STATISTICS] + [""]
    return "\n".join(lines)


def write(r, formats: set[str]) -> list[Path]:
    files = write_tables(r, formats)
    if "md" in formats:
        path = r.out / "report.md"
        path.write_text(render_markdown(r))
        files.append(path)
    if "html" in formats:
        path = r.out / "index.html"
        path.write_text(render_html(r, [f for f in files if f.parent.name == "tables"]))
        files.append(path)
    for figs in r.figures.values():
        files += [p for f in figs for p in f.files]
    files += [p for f in r.family_figures for p in f.files]
    files += [p for f in r.rank_figures for p in f.files]
    files += [p for _, _, f in r.panel_ranks for p in f.files]
    files += [p for f in r.study_figures for p in f.files]
    return files
