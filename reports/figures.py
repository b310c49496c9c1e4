"""Figures, each saved as PNG and PDF: accuracy vs cost, gain over the baseline, curves per epoch.

Every figure takes the already computed statistics (never raw runs), uses the colour and marker
of `reports.style.method_styles` for each method, and fits one column (3.4 in) of a two-column
paper, except the per-epoch curves which span both columns. Each builder returns a `Figure`
record (files + caption) or None when there is nothing to draw. Costs are the panel's `cost`
column, in MFLOPs or GBitOps (its `cost_axis`, see `reports.load`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter  # noqa: E402

from benchmark.costs.axis import UNITS  # noqa: E402
from reports.stats import AUC, MEAN, SUMMARIES  # noqa: E402
from reports.style import COLUMN_WIDTH, PAGE_WIDTH, RC  # noqa: E402
from reports.tables import COST_DEFINITION, fmt_cost, panel_slug, panel_title  # noqa: E402

X_LABEL = {"mflops": "MFLOPs per image (forward)", "gbitops": "GBitOps per image"}


@dataclass
class Figure:
    stem: str  # path of the files without suffix, relative to the report folder
    title: str
    caption: str
    files: list[Path] = field(default_factory=list)


@dataclass
class PanelPlot:
    """What every figure of one panel shares: the panel, the methods in legend order with
    their colours and markers, the baseline (named in legends and gains) and the report
    folder the files go to."""

    panel: tuple[str, str, str]
    order: list[str]
    styles: dict
    baseline: str | None
    out: Path


def save(fig, out: Path, stem: str) -> list[Path]:
    """Write `stem`.png and `stem`.pdf under `out`; close the figure."""
    files = []
    for ext in ("png", "pdf"):
        path = out / f"{stem}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
        files.append(path)
    plt.close(fig)
    return files


def _legend_label(method: str, n: int, baseline: str | None) -> str:
    base = " (baseline)" if method == baseline else ""
    return f"{method}{base}, n={n}"


# line styles of the resolutions of a panel's curves: the image size solid, then lower ones
RESOLUTION_STYLES = ("-", "--", ":", "-.")


def _resolution_style(spectrum: pd.DataFrame) -> dict:
    """Line style per resolution of the curve points (NaN, the image size, first: solid)."""
    found = sorted(spectrum["resolution"].dropna().unique(), reverse=True)
    style = {r: RESOLUTION_STYLES[(i + 1) % len(RESOLUTION_STYLES)] for i, r in enumerate(found)}
    return {math.nan: "-", **style}


def _curve(h: pd.DataFrame) -> pd.DataFrame:
    """Mean cost and top-1 (±1 std over seeds) per width of one method at one resolution: its
    spectrum points, else its fixed sub-models at that resolution."""
    pts = h[~h["listed"]] if (~h["listed"]).any() else h
    g = pts.groupby("width").agg(cost=("cost", "mean"), mean=("top1", "mean"), std=("top1", "std"))
    return g.sort_values("cost")


def _spectrum_lines(ax, spectrum: pd.DataFrame, methods: list[str], styles: dict) -> set[str]:
    """Each method's width spectrum (mean top-1 over seeds per width vs mean cost) as a line,
    with a ±1 std band over seeds, one line per input resolution (`_resolution_style`; its fixed
    sub-models at a lower resolution as open markers); returns the methods drawn."""
    drawn = set()
    ls = _resolution_style(spectrum)
    res = spectrum["resolution"].astype(float)
    for m in methods:
        for r in ls:
            at = res.isna() if math.isnan(r) else res == r
            h = spectrum[(spectrum["method"] == m) & at]
            if h.empty:
                continue
            g, color = _curve(h), styles[m]["color"]
            ax.plot(g["cost"], g["mean"], color=color, lw=1.2, ls=ls[r], zorder=1)
            if h["seed"].nunique() > 1:
                ax.fill_between(g["cost"], g["mean"] - g["std"], g["mean"] + g["std"],
                                color=color, alpha=0.15, lw=0, zorder=0)  # fmt: skip
            if not math.isnan(r) and h["listed"].any():
                fx = h[h["listed"]].groupby("width")[["cost", "top1"]].mean()
                ax.plot(fx["cost"], fx["top1"], ls="none", marker=styles[m]["marker"],
                        mfc="none", color=color, ms=4, zorder=2)  # fmt: skip
            drawn.add(m)
    for r in list(ls)[1:]:  # a legend entry per lower resolution's line style
        ax.plot([], [], color="0.35", ls=ls[r], label=f"at {int(r)} px (resized input)")
    return drawn


def acc_vs_cost(
    summary: pd.DataFrame, ctx: PanelPlot, spectrum: pd.DataFrame | None = None
) -> Figure | None:
    """Mean test top-1 vs the panel's cost per sub-model, one line per method, ±1 std bars.
    With `spectrum` (width-spectrum points of the panel, `reports.load`), a method's spectrum
    is its line and its fixed sub-models are markers on it.
    The file stem names the cost: `acc_vs_mflops_<panel>` or `acc_vs_gbitops_<panel>`."""
    panel, order, styles, baseline, out = ctx.panel, ctx.order, ctx.styles, ctx.baseline, ctx.out
    g = summary[summary["cost"].notna()]
    if g.empty:
        return None
    axis = g["cost_axis"].iloc[0]
    unit = UNITS[axis]
    methods = [m for m in order if m in set(g["method"])]
    subs = g.sort_values("key_index").drop_duplicates("key")
    xs_all = subs["cost"].to_numpy()
    # Bit-operations grow with the square of the bit-width: always a log axis for them.
    log = xs_all.min() > 0 and (axis == "gbitops" or xs_all.max() / xs_all.min() > 8)
    span = (xs_all.max() - xs_all.min()) or max(xs_all.max(), 1e-9)
    with plt.rc_context(RC):
        rows = -(-len(methods) // 2)  # the legend below the axes, off the curves: 2 a row
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6 + 0.16 * rows), layout="constrained")
        lines = set()
        if spectrum is not None and not spectrum.empty:
            lines = _spectrum_lines(ax, spectrum, methods, styles)
        for i, m in enumerate(methods):
            h = g[g["method"] == m].sort_values("key_index")
            dodge = (i - (len(methods) - 1) / 2) * 0.008
            x = h["cost"].to_numpy()
            x = x * (1 + dodge * 4) if log else x + dodge * span
            yerr = h["std"].to_numpy() if (h["n"] > 1).any() else None
            st = styles[m]
            ax.errorbar(
                x,
                h["mean"],
                yerr=yerr,
                color=st["color"],
                marker=st["marker"],
                capsize=2,
                elinewidth=0.8,
                ls="none" if m in lines else "-",
                label=_legend_label(m, int(h["n"].max()), baseline),
            )
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(X_LABEL[axis])
        ax.set_ylabel("test top-1 (%)")
        _sub_model_axis(ax, xs_all, subs["key"].tolist(), log)
        fig.legend(frameon=False, loc="outside lower center", ncol=2)
        ax.set_title(panel_title(panel), pad=14)
        stem = f"figures/acc_vs_{axis}_{panel_slug(panel)}"
        files = save(fig, out, stem)
    has_spectrum = spectrum is not None and not spectrum.empty
    lower = has_spectrum and spectrum["resolution"].notna().any()
    cap = _acc_caption(summary, panel, axis, has_spectrum, lower)
    return Figure(stem, f"Accuracy vs {unit} — {panel_title(panel)}", cap, files)


def _sub_model_axis(ax, xs, names: list[str], log: bool) -> None:
    """The sub-model names on a top axis at their costs."""
    top = ax.secondary_xaxis("top")
    tilt = {"rotation": 30, "ha": "left"} if len(names) > 4 else {}
    top.set_xticks(xs, labels=names, fontsize=6, **tilt)
    top.tick_params(length=2, pad=1)
    if log:
        top.minorticks_off()


def _acc_caption(
    summary: pd.DataFrame, panel, axis: str, spectrum: bool, lower_resolutions: bool = False
) -> str:
    """The caption of `acc_vs_cost`: what is averaged over how many seeds, what the bars are."""
    ns = sorted(set(int(n) for n in summary["n"]))
    n_text = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"
    cap = (
        f"Test top-1 at the last epoch vs {COST_DEFINITION[axis]} of each sub-model, "
        f"{panel_title(panel)}: "
        f"mean over seeds ({n_text} seeds per method, see legend), error bars ±1 std "
        f"(none with n = 1); sub-model names on the top axis. Points are dodged sideways "
        f"slightly so that error bars do not hide each other."
    )
    if spectrum:
        cap += (
            " Lines without markers: width spectra of universally slimmable networks (mean "
            "over seeds per width, each width after BN recalibration, band ±1 std); markers "
            "on them: the fixed evaluation widths."
        )
    if spectrum and lower_resolutions:
        cap += (
            " Cells with a resolution axis add one curve per lower input resolution (dashed, "
            "dotted: the images resized to that size, BN recalibrated at it, costs counted at "
            "it); open markers: the fixed evaluation widths at that resolution."
        )
    return cap


def _gain_bars(ax, x, h: pd.DataFrame, m: str, style: dict, width: float) -> None:
    """One method's bars of paired gains (`h`: its rows by sub-model) with 95% CI bars and the
    significance marks above (or below) them."""
    y = h["diff_mean"].to_numpy(dtype=float)
    n = int(h["n"].max()) if h["n"].notna().any() else 0
    # with 2 pairs the interval is +-12.7 sd (t with 1 dof): it would flatten every bar
    err = h["diff_ci95"].to_numpy(dtype=float) if n >= 3 else np.full(len(y), np.nan)
    ax.bar(
        x,
        np.nan_to_num(y),
        width * 0.9,
        color=style["color"],
        alpha=0.85,
        label=f"{m}, n={n} pair{'s' if n != 1 else ''}",
        yerr=None if np.all(np.isnan(err)) else np.nan_to_num(err),
        error_kw={"elinewidth": 0.8, "capsize": 2},
    )
    for xi, yi, ei, mk in zip(x, y, err, h["mark"].fillna("")):
        if mk and not math.isnan(yi):
            off = (0 if math.isnan(ei) else ei) * np.sign(yi or 1)
            va = "bottom" if yi >= 0 else "top"
            ax.annotate(mk, (xi, yi + off), ha="center", va=va, fontsize=8)


def gain(pairs: pd.DataFrame, summary: pd.DataFrame, ctx: PanelPlot) -> Figure | None:
    """Paired gain in top-1 over the baseline per sub-model (and the summaries), 95% CI bars."""
    panel, order, styles, baseline, out = ctx.panel, ctx.order, ctx.styles, ctx.baseline, ctx.out
    if baseline is None or pairs.empty:
        return None
    methods = [m for m in order if m in set(pairs["method"]) and m != baseline]
    if not methods:
        return None
    keys = pairs.sort_values("key_index").drop_duplicates("key")["key"].tolist()
    cost = summary.drop_duplicates("key").set_index("key")["cost"]
    unit = UNITS[summary["cost_axis"].iloc[0]]
    labels = []
    sep = " " if len(keys) > 5 else "\n"  # tilted labels (many keys) on one line each
    for k in keys:
        f = cost.get(k, math.nan)
        labels.append(k if k in SUMMARIES or math.isnan(f) else f"{k}{sep}{fmt_cost(f)}")
    width = 0.8 / len(methods)
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.8), layout="constrained")
        for i, m in enumerate(methods):
            h = pairs[pairs["method"] == m].set_index("key").reindex(keys)
            x = np.arange(len(keys)) + (i - (len(methods) - 1) / 2) * width
            _gain_bars(ax, x, h, m, styles[m], width)
        ax.axhline(0, color="black", linewidth=0.8)
        summaries = [i for i, k in enumerate(keys) if k in SUMMARIES]
        if summaries and summaries[0] > 0:
            ax.axvline(summaries[0] - 0.5, color="grey", linestyle=":", linewidth=0.8)
        tilt = {"rotation": 40, "ha": "right"} if len(keys) > 5 else {}
        ax.set_xticks(np.arange(len(keys)), labels=labels, fontsize=6, **tilt)
        ax.set_xlabel(f"sub-model and its cost ({unit})", fontsize=7)
        ax.set_ylabel(f"top-1 gain over {baseline} (pp)")
        ax.grid(axis="x", visible=False)
        fig.legend(frameon=False, loc="outside lower center", ncol=min(3, len(methods)))
        ax.set_title(panel_title(panel))
        stem = f"figures/gain_{panel_slug(panel)}"
        files = save(fig, out, stem)
    cap = (
        f"Gain in test top-1 (percentage points) over {baseline}, {panel_title(panel)}: mean "
        f"of the paired differences over the seeds both methods finished (n in the legend), "
        f"error bars = 95% t-interval of that mean (n ≥ 3; with 2 pairs it spans ±12.7 sd and "
        f"is left out). * / ** mark paired t-test "
        f"p < 0.05 / 0.01, only with n ≥ 3 pairs. Under each sub-model: its cost in {unit}. "
        f"Right of the dotted line: the per-cell summaries ('{MEAN}', '{AUC}' over {unit})."
    )
    return Figure(stem, f"Gain over {baseline} — {panel_title(panel)}", cap, files)


def curves(hist: pd.DataFrame, cells: pd.DataFrame, ctx: PanelPlot) -> Figure | None:
    """Validation top-1 (mean over sub-models) and training loss per epoch, mean ± std band."""
    panel, order, styles, baseline, out = ctx.panel, ctx.order, ctx.styles, ctx.baseline, ctx.out
    if hist.empty:
        return None
    h = hist.merge(cells[["run_id", "method", "seed"]], on="run_id")
    if h.empty:
        return None
    panels = [
        ("val/top1_mean", "val. top-1, mean of sub-models (%)"),
        ("train/loss", "training loss"),
    ]
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.5), layout="constrained")
        for ax, (key, label) in zip(axes, panels):
            k = h[h["key"] == key]
            for m in [m for m in order if m in set(k["method"])]:
                km = k[k["method"] == m]
                g = band(km, "step")
                label = _legend_label(m, int(km["run_id"].nunique()), baseline)
                draw_band_line(ax, g.index.to_numpy() + 1, g, styles[m], label)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            frameon=False,
            loc="outside lower center",
            ncol=min(4, max(1, len(labels))),
        )
        fig.suptitle(panel_title(panel), fontsize=8)
        stem = f"figures/curves_{panel_slug(panel)}"
        files = save(fig, out, stem)
    cap = (
        f"Per-epoch validation top-1 (mean over sub-models, on the validation split carved "
        f"from the training set) and training loss, {panel_title(panel)}: mean over seeds "
        f"(n per method in the legend), band ±1 std. For chained methods (takd) the epochs of "
        f"all stages follow each other."
    )
    return Figure(stem, f"Curves per epoch — {panel_title(panel)}", cap, files)


def _every(x) -> int:
    return max(1, len(x) // 12)


def band(values: pd.DataFrame, by: str) -> pd.DataFrame:
    """mean, sample std (ddof = 1) and count of `value` per `by` (e.g. epoch), over seeds."""
    return values.groupby(by)["value"].agg(["mean", "std", "count"])


def draw_band_line(ax, x, g: pd.DataFrame, style: dict, label: str | None) -> None:
    """A method's mean line over `x` with a ±1 std band where more than one seed counts."""
    ax.plot(
        x, g["mean"], color=style["color"], marker=style["marker"], markevery=_every(x), label=label
    )
    ok = (g["count"] > 1).to_numpy()
    if ok.any():
        lo, hi = (g["mean"] - g["std"]).to_numpy(), (g["mean"] + g["std"]).to_numpy()
        ax.fill_between(x[ok], lo[ok], hi[ok], color=style["color"], alpha=0.15, linewidth=0)


def families(summary: pd.DataFrame, order: list[str], styles: dict, out: Path) -> list[Figure]:
    """Accuracy vs MFLOPs across architectures: per (dataset, profile) that two or more
    architectures with an MFLOPs axis share, one line per (architecture, method) through its
    sub-models' mean test top-1 (±1 std bars): colour = architecture, marker = the method's;
    log MFLOPs axis. So flexible families of different kinds (e.g. a nested ViT and a slimmable
    CNN) are read off one plot; panels on GBitOps stay out (another unit)."""
    from matplotlib.lines import Line2D

    from reports.style import slot_style

    made: list[Figure] = []
    g = summary[summary["cost"].notna() & (summary["cost_axis"] == "mflops")]
    for (dataset, profile), d in g.groupby(["dataset", "profile"], sort=True):
        archs = sorted(set(d["arch"]))
        if len(archs) < 2:
            continue
        methods = [m for m in order if m in set(d["method"])]
        colour = {a: slot_style(i)["color"] for i, a in enumerate(archs)}
        with plt.rc_context(RC):
            fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.0), layout="constrained")
            for arch in archs:
                for m in methods:
                    h = d[(d["arch"] == arch) & (d["method"] == m)].sort_values("key_index")
                    if h.empty:
                        continue
                    ax.errorbar(
                        h["cost"],
                        h["mean"],
                        yerr=h["std"].to_numpy() if (h["n"] > 1).any() else None,
                        color=colour[arch],
                        marker=styles[m]["marker"],
                        markersize=4,
                        capsize=2,
                        elinewidth=0.8,
                        linewidth=1.0,
                    )
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(X_LABEL["mflops"])
            ax.set_ylabel("test top-1 (%)")
            ax.set_title(f"{dataset} ({profile}): families side by side")
            n = d.groupby(["arch", "method"])["n"].max()
            handles = [Line2D([], [], color=colour[a], label=a) for a in archs] + [
                Line2D([], [], color="grey", marker=styles[m]["marker"], ls="none",
                       label=f"{m} (n={int(n.xs(m, level='method').max())})")
                for m in methods
            ]  # fmt: skip
            fig.legend(handles=handles, frameon=False, loc="outside lower center", ncol=2)
            stem = f"figures/families_{panel_slug((dataset, profile))}"
            files = save(fig, out, stem)
        cap = (
            f"Test top-1 at the last epoch vs {COST_DEFINITION['mflops']} of each sub-model, "
            f"on {dataset} ({profile}), for every architecture with an MFLOPs axis: one line per "
            f"architecture (colour) and method (marker), mean over seeds (n in the legend: the "
            f"most seeds of any architecture), error bars ±1 std (none with n = 1); log MFLOPs "
            f"axis."
        )
        made.append(Figure(stem, f"Families side by side — {dataset} ({profile})", cap, files))
    return made
