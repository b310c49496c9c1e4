"""The per-cell accuracy-vs-cost figure the trainer attaches to a cell's MLflow run.

One cell, one seed: each sub-model is a marker on its cost (MFLOPs, or GBitOps for bit-width
networks, see `benchmark.costs.axis`); early-exit cells add the budgeted-batch curve, universally
slimmable cells their width spectrum (rows with `spectrum` = "true") as a line, and cells with a
resolution axis one spectrum (or one line of fixed sub-models) per input resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

if TYPE_CHECKING:
    from benchmark.training.final import CellSummary

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXIS_LABEL = {
    "mflops": "MFLOPs (FlopCounterMode, forward)",
    "gbitops": "GBitOps (MACs x weight bits x activation bits)",
}


def _by_resolution(rows: list[dict[str, Any]]) -> list[tuple[Any, list[dict[str, Any]]]]:
    """(resolution, its rows) per input resolution, largest first; one group (None) for a cell
    without a resolution axis."""
    found = sorted({r.get("resolution") for r in rows}, key=lambda v: -(v or 0))
    return [(res, [r for r in rows if r.get("resolution") == res]) for res in found]


def _draw_resolution(
    ax, res, rows: list[dict[str, Any]], axis: str, several: bool, line_label: str | None
) -> None:
    """One resolution's width spectrum (rows with `spectrum` = "true") as a line and its fixed
    sub-models as markers (a line through them, `line_label`, when there is no spectrum)."""
    spectrum = [r for r in rows if r.get("spectrum") == "true"]
    fixed = [r for r in rows if r.get("spectrum") != "true"]
    at, color = (f" at {res} px" if several else ""), None
    if spectrum:
        label = f"width spectrum{at}" + ("" if several else " (BN recalibrated)")
        xs, ys = [r[axis] for r in spectrum], [r["top1"] for r in spectrum]
        color = ax.plot(xs, ys, lw=1, label=label)[0].get_color()
    xs, ys = [r[axis] for r in fixed], [r["top1"] for r in fixed]
    if spectrum:
        ax.plot(xs, ys, ls="", marker="o", color=color, label=f"evaluation widths{at}")
    else:
        ax.plot(xs, ys, marker="o", label=f"{res} px" if several else line_label)


def draw_cell_figure(
    path: Path,
    title: str,
    rows: list[dict[str, Any]],
    axis: str,
    split: str,
    budgeted: list[dict[str, float]] | None = None,
) -> Path:
    """Write the PNG of `rows` (one dict per sub-model with `name`, `top1` and `axis`) to
    `path`; `budgeted`: points with `mflops` and `top1` (thresholds fitted on val). A cell with
    a resolution axis (rows with a `resolution`) gets one curve per input resolution."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=150)
    groups = _by_resolution(rows)
    several = len(groups) > 1
    for res, group in groups:
        _draw_resolution(ax, res, group, axis, several, "anytime (each exit)" if budgeted else None)
    if budgeted:
        ax.plot(
            [p["mflops"] for p in budgeted],
            [p["top1"] for p in budgeted],
            lw=1,
            label="budgeted batch (thresholds from val)",
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    for r in (r for r in rows if r.get("spectrum") != "true"):
        ax.annotate(
            r["name"], (r[axis], r["top1"]), textcoords="offset points", xytext=(4, -10), fontsize=7
        )
    ax.set_xlabel(AXIS_LABEL[axis])
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cell_figure_artifact(folder: Path, summary: CellSummary) -> list[tuple[Path, str | None]]:
    """The trainer's artifact hook (entry point `flexbench_cell_artifacts`, see
    `benchmark.training.final`): the cell's accuracy-vs-cost figure, under `plots/`."""
    png = draw_cell_figure(
        folder / "acc_vs_flops.png",
        summary.title,
        summary.rows,
        summary.axis,
        summary.split,
        summary.budgeted,
    )
    return [(png, "plots")]
