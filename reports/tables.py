"""Result tables: per (arch, dataset, profile), methods as rows, sub-models as columns.

A `ResultTable` holds the numbers once; `markdown`, `latex` (booktabs), `html` and `csv_frame`
render it. Cells are mean ± std over seeds, the best mean of each column is bold, and the marks
are those of the paired test against the baseline (see `reports.stats.mark`). Column costs are in
the panel's unit (`cost_axis`, see `reports.load`); `COST_DEFINITION` says what each unit counts,
for every caption. `frame_*` render any small DataFrame (status, summaries, references) in the
same three formats.
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from benchmark.costs.axis import UNITS
from reports.load import PANEL
from reports.stats import ALPHA, AUC, EE_AUC, MEAN, MIN_N_SIGNIFICANCE


def fmt_num(x: float, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


COST_DEFINITION = {
    "mflops": "MFLOPs (forward pass, FlopCounterMode, 2 × multiply-adds)",
    "gbitops": (
        "GBitOps (billions of bit-operations of the forward pass: multiply-adds × weight bits × "
        "activation bits, 32 × 32 at full precision; all sub-models have the same MFLOPs, so "
        "bit-operations are what separates them)"
    ),
}


def fmt_cost(x: float) -> str:
    if x is None or math.isnan(x):
        return ""
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def panel_title(panel: tuple[str, str, str]) -> str:
    arch, dataset, profile = panel
    return f"{arch} on {dataset} (profile {profile})"


def panel_slug(panel: tuple[str, str, str]) -> str:
    raw = "_".join(panel)
    return "".join(c if c.isalnum() or c in "-." else "_" for c in raw)


def n_phrase(ns: list[int]) -> str:
    ns = sorted(set(int(n) for n in ns))
    if not ns:
        return "n = 0 seeds"
    if len(ns) == 1:
        return f"n = {ns[0]} seed{'s' if ns[0] != 1 else ''} per method"
    return f"n = {ns[0]}–{ns[-1]} seeds per method (see column n)"


@dataclass
class TableEntry:
    mean: float
    std: float
    n: int
    bold: bool = False
    mark: str = ""
    diff: float = math.nan
    p: float = math.nan


@dataclass
class ResultTable:
    panel: tuple[str, str, str]
    keys: list[str]  # column keys: sub-models (smallest first), then the SUMMARIES present
    cost_axis: str  # "mflops" or "gbitops": the unit of `cost` and of the AUC
    cost: dict[str, float]
    methods: list[str]  # row order, baseline first
    n: dict[str, int]  # seeds per method (cells with all sub-models finished)
    cells: dict[tuple[str, str], TableEntry]
    baseline: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return UNITS[self.cost_axis]

    @property
    def caption(self) -> str:
        parts = [
            f"Top-1 accuracy (%) of {panel_title(self.panel)} on the test split at the last "
            f"epoch (never best-on-test): mean ± std over seeds, {n_phrase(self.n.values())}.",
            f"Columns: sub-models, smallest first, with their {COST_DEFINITION[self.cost_axis]}; "
            f"'{MEAN}' is the mean over sub-models and '{AUC}' the area under top-1 vs "
            f"{self.unit} divided by the {self.unit} range.",
            "Bold: best mean in the column.",
        ]
        if EE_AUC in self.keys:
            parts.insert(
                2,
                f"'{EE_AUC}' is the cell's test/budgeted_auc: the area under its early-exit curve "
                "(test top-1 vs average MFLOPs per image, thresholds fitted on the validation "
                "split) divided by the MFLOPs from the first exit to the last.",
            )
        if self.baseline in self.methods:
            parts.append(
                f"* / **: paired t-test against {self.baseline} over the seeds both finished, "
                f"two-sided p < {ALPHA} / 0.01, uncorrected for multiple comparisons; only "
                f"marked with n ≥ {MIN_N_SIGNIFICANCE} pairs."
            )
        else:
            parts.append("No baseline in this panel: no significance marks.")
        return " ".join(parts + self.notes)


def build_tables(
    summary: pd.DataFrame, pairs: pd.DataFrame, baseline: str | None, order: list[str]
) -> list[ResultTable]:
    """One ResultTable per panel present in `summary`."""
    tables = []
    if summary.empty:
        return tables
    for panel, g in summary.groupby(PANEL, sort=True):
        keys = (
            g.sort_values("key_index").drop_duplicates("key")[["key", "key_index"]]["key"].tolist()
        )
        cost = {k: float(g[g["key"] == k]["cost"].median()) for k in keys}
        methods = [m for m in order if m in set(g["method"])]
        cells = {}
        for r in g.itertuples(index=False):
            cells[(r.method, r.key)] = TableEntry(r.mean, r.std, int(r.n))
        n = {m: int(g[g["method"] == m]["n"].max()) for m in methods}
        pp = pairs
        if not pp.empty:
            pp = pp[(pp[PANEL] == pd.Series(panel, index=PANEL)).all(axis=1)]
        for r in pp.itertuples(index=False):
            c = cells.get((r.method, r.key))
            if c is not None:
                c.mark, c.diff, c.p = r.mark, r.diff_mean, r.p
        for k in keys:
            col = [c for (m, kk), c in cells.items() if kk == k and not math.isnan(c.mean)]
            if col:
                best = max(c.mean for c in col)
                for c in col:
                    c.bold = c.mean >= best - 1e-9
        notes = []
        if baseline is not None and baseline not in methods:
            notes.append(f"(Baseline {baseline} has no finished cell here.)")
        axis = g["cost_axis"].iloc[0]
        tables.append(
            ResultTable(tuple(panel), keys, axis, cost, methods, n, cells, baseline, notes)
        )
    return tables


def _value(c: TableEntry | None) -> str:
    if c is None or c.n == 0:
        return "—"
    if c.n == 1 or math.isnan(c.std):
        return fmt_num(c.mean)
    return f"{fmt_num(c.mean)} ± {fmt_num(c.std)}"


def _header_label(t: ResultTable, k: str) -> tuple[str, str]:
    f = t.cost.get(k, math.nan)
    return k, (f"{fmt_cost(f)} {t.unit}" if not math.isnan(f) else "")


def markdown(t: ResultTable) -> str:
    head = ["method", "n"] + [
        f"{a} ({b})" if b else a for a, b in (_header_label(t, k) for k in t.keys)
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for m in t.methods:
        row = [m + (" (baseline)" if m == t.baseline else ""), str(t.n[m])]
        for k in t.keys:
            row.append(_marked(t.cells.get((m, k)), "md"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
    "±": r"$\pm$",
    "≥": r"$\geq$",
    "×": r"$\times$",
    "—": "---",
    "–": "--",
    "<": r"$<$",
    ">": r"$>$",
    "Δ": r"$\Delta$",
    "−": r"$-$",
    "√": r"$\surd$",
    "·": r"$\cdot$",
}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def latex(t: ResultTable) -> str:
    ncol = len(t.keys)
    env = "table*" if ncol > 5 else "table"  # many sub-models: span both columns
    out = [
        f"% flexbench report: {panel_title(t.panel)}. Needs \\usepackage{{booktabs}}.",
        f"\\begin{{{env}}}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{tex_escape(t.caption)}}}",
        f"\\label{{tab:flexbench-{panel_slug(t.panel)}}}",
        "\\begin{tabular}{l" + "r" * (ncol + 1) + "}",
        "\\toprule",
        "Method & $n$ & " + " & ".join(tex_escape(k) for k in t.keys) + " \\\\",
        " & & " + " & ".join(tex_escape(_header_label(t, k)[1]) for k in t.keys) + " \\\\",
        "\\midrule",
    ]
    for i, m in enumerate(t.methods):
        cells = []
        for k in t.keys:
            cells.append(_marked(t.cells.get((m, k)), "tex"))
        out.append(f"{tex_escape(m)} & {t.n[m]} & " + " & ".join(cells) + " \\\\")
        if i == 0 and m == t.baseline and len(t.methods) > 1:
            out.append("\\midrule")
    out += ["\\bottomrule", "\\end{tabular}", f"\\end{{{env}}}", ""]
    return "\n".join(out)


# per format: escape, bold (the best mean of a column), significance mark (* / **)
_MARKUP: dict[str, tuple[Callable[[str], str], str, str]] = {
    "md": (lambda s: s.replace("*", "\\*"), "**{}**", "{}"),
    "tex": (tex_escape, "\\textbf{{{}}}", "$^{{{}}}$"),
    "html": (_html.escape, "<b>{}</b>", "<sup>{}</sup>"),
}


def _marked(c: TableEntry | None, fmt: str) -> str:
    """A result cell's text in one markup, so that every format bolds and marks the same
    cells the same way."""
    esc, bold, sup = _MARKUP[fmt]
    v = esc(_value(c))
    if c is not None and c.bold:
        v = bold.format(v)
    if c is not None and c.mark:
        v += sup.format(esc(c.mark))
    return v


def html(t: ResultTable) -> str:
    e = _html.escape
    head = "".join(
        f"<th>{e(a)}<br><span class='flops'>{e(b)}</span></th>"
        for a, b in (_header_label(t, k) for k in t.keys)
    )
    rows = []
    for m in t.methods:
        tds = []
        for k in t.keys:
            c = t.cells.get((m, k))
            v = _marked(c, "html")
            title = ""
            if c is not None and not math.isnan(c.diff):
                title = f" title='vs {e(str(t.baseline))}: {c.diff:+.2f}, p = {fmt_p(c.p)}'"
            tds.append(f"<td{title}>{v}</td>")
        cls = " class='baseline'" if m == t.baseline else ""
        label = e(m) + (" <small>(baseline)</small>" if m == t.baseline else "")
        rows.append(f"<tr{cls}><th>{label}</th><td>{t.n[m]}</td>{''.join(tds)}</tr>")
    return (
        "<table class='results'>"
        f"<caption>{e(t.caption)}</caption>"
        f"<thead><tr><th>method</th><th>n</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def csv_frame(t: ResultTable) -> pd.DataFrame:
    rows = []
    for m in t.methods:
        for k in t.keys:
            c = t.cells.get((m, k))
            if c is None:
                continue
            rows.append(
                {
                    **dict(zip(PANEL, t.panel)),
                    "method": m,
                    "key": k,
                    t.cost_axis: t.cost.get(k),
                    "n": c.n,
                    "mean": c.mean,
                    "std": c.std,
                    "best": c.bold,
                    "diff_vs_baseline": c.diff,
                    "p_vs_baseline": c.p,
                    "mark": c.mark,
                }
            )
    return pd.DataFrame(rows)


# ---- any small frame -----------------------------------------------------------------------


def _cell_text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:.2f}"
    return str(v)


def frame_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [_cell_text(v).replace("|", "\\|").replace("\n", " ") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def frame_html(df: pd.DataFrame, caption: str = "", cls: str = "plain") -> str:
    e = _html.escape
    cap = f"<caption>{e(caption)}</caption>" if caption else ""
    if df.empty:
        return f"<table class='{cls}'>{cap}<tbody><tr><td><i>(none)</i></td></tr></tbody></table>"
    head = "".join(f"<th>{e(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(_cell_text(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table class='{cls}'>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def frame_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    cols = list(df.columns)
    out = [
        "% flexbench report. Needs \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{tex_escape(caption)}}}",
        f"\\label{{tab:{label}}}",
        "\\begin{tabular}{" + "l" * len(cols) + "}",
        "\\toprule",
        " & ".join(tex_escape(c) for c in cols) + " \\\\",
        "\\midrule",
    ]
    for row in df.itertuples(index=False):
        out.append(" & ".join(tex_escape(_cell_text(v)) for v in row) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)
