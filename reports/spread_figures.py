"""Figures that show the spread over seeds: validation top-1 per epoch of every sub-model, and
the budgeted-batch curves of every method, each as mean over seeds with a ±1 std band.

Inputs are metric histories (`reports.load.histories`: run_id, key, step, value) of a panel's
finished cells; the band is drawn wherever at least two seeds have a value.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from reports.figures import (
    Figure,
    PanelPlot,
    _legend_label,
    band,
    draw_band_line,
    plt,
    save,
)
from reports.style import COLUMN_WIDTH, PAGE_WIDTH, RC
from reports.tables import panel_slug, panel_title

VAL_PREFIX = "val/top1/"
BUDGETED = ("budgeted/top1", "budgeted/mflops")


def submodel_curves(
    hist: pd.DataFrame, cells: pd.DataFrame, subs: list[str], ctx: PanelPlot
) -> Figure | None:
    """Validation top-1 per epoch, one small plot per sub-model (smallest first), one line per
    method: mean over seeds, band ±1 std. `hist` holds `val/top1/<sub>` histories."""
    panel, order, styles, out = ctx.panel, ctx.order, ctx.styles, ctx.out
    h = hist[hist["key"].str.startswith(VAL_PREFIX)].merge(
        cells[["run_id", "method", "seed"]], on="run_id"
    )
    subs = [s for s in subs if VAL_PREFIX + s in set(h["key"])]
    if not subs:
        return None
    ncol = min(4, len(subs))
    nrow = math.ceil(len(subs) / ncol)
    with plt.rc_context(RC):
        fig, axes = plt.subplots(
            nrow,
            ncol,
            figsize=(PAGE_WIDTH, 1.9 * nrow + 0.5),
            squeeze=False,
            sharey=True,
            layout="constrained",
        )
        for ax, sub in zip(axes.flat, subs):
            k = h[h["key"] == VAL_PREFIX + sub]
            for m in [m for m in order if m in set(k["method"])]:
                km = k[k["method"] == m]
                g = band(km, "step")
                label = _legend_label(m, int(km["run_id"].nunique()), None)
                first = ax is axes.flat[0]
                draw_band_line(ax, g.index.to_numpy() + 1, g, styles[m], label if first else None)
            ax.set_title(sub)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in axes.flat[len(subs) :]:
            ax.set_visible(False)
        for row in axes:
            row[0].set_ylabel("val. top-1 (%)")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        ncol = min(4, len(labels))
        fig.legend(handles, labels, frameon=False, loc="outside lower center", ncol=ncol)
        fig.suptitle(panel_title(panel), fontsize=8)
        stem = f"figures/val_curves_{panel_slug(panel)}"
        files = save(fig, out, stem)
    cap = (
        f"Validation top-1 per epoch of each sub-model (validation split carved from the training "
        f"set), {panel_title(panel)}: mean over seeds (n per method in the legend), band ±1 std "
        f"over seeds (n ≥ 2). A wide band means that the last-epoch number of one seed says "
        f"little; for chained methods (takd) the epochs of all stages follow each other."
    )
    return Figure(stem, f"Validation top-1 per sub-model — {panel_title(panel)}", cap, files)


def budgeted_curves(hist: pd.DataFrame, cells: pd.DataFrame, ctx: PanelPlot) -> Figure | None:
    """Budgeted-batch test top-1 vs expected MFLOPs per image, one line per method: per exit
    distribution (the history's step), mean over seeds of both, band ±1 std of top-1."""
    panel, order, styles, out = ctx.panel, ctx.order, ctx.styles, ctx.out
    h = hist[hist["key"].isin(BUDGETED)].merge(cells[["run_id", "method", "seed"]], on="run_id")
    if h.empty:
        return None
    wide = h.pivot_table(index=["method", "run_id", "step"], columns="key", values="value")
    if not set(BUDGETED) <= set(wide.columns):
        return None
    wide = wide.reset_index()
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6), layout="constrained")
        for m in [m for m in order if m in set(wide["method"])]:
            w = wide[wide["method"] == m]
            g = band(w.rename(columns={"budgeted/top1": "value"}), "step")
            x = w.groupby("step")["budgeted/mflops"].mean().reindex(g.index).to_numpy()
            idx = np.argsort(x, kind="stable")
            g = g.iloc[idx]
            draw_band_line(
                ax, x[idx], g, styles[m], _legend_label(m, int(w["run_id"].nunique()), None)
            )
        ax.set_xlabel("expected MFLOPs per image (budgeted batch)")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(frameon=False, loc="lower right")
        ax.set_title(panel_title(panel))
        stem = f"figures/budgeted_{panel_slug(panel)}"
        files = save(fig, out, stem)
    cap = (
        f"Budgeted-batch classification, {panel_title(panel)}: test top-1 against the expected "
        f"MFLOPs per image when samples leave at the first exit whose confidence passes a "
        f"threshold fitted on the validation split (MSDNet protocol, one point per exit "
        f"distribution). Mean over seeds of both coordinates (n in the legend), band ±1 std of "
        f"top-1 over seeds (n ≥ 2)."
    )
    return Figure(stem, f"Budgeted batch — {panel_title(panel)}", cap, files)
