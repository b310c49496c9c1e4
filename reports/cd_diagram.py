"""Critical-difference diagram (Demšar 2006, §3.2.2 and Fig. 1) of a `reports.ranks.RankTest`.

Drawn by `scikit_posthocs.critical_difference_diagram`: methods at their average rank (1 = best,
on the left), a bar over each group of methods that the Nemenyi test cannot tell apart at the
test's alpha, and the critical difference CD as a bar above the axis.
"""

from __future__ import annotations

from pathlib import Path

import scikit_posthocs as sp

from reports.figures import Figure, plt, save
from reports.ranks import RankTest
from reports.style import COLUMN_WIDTH, RC


def cd_diagram(
    test: RankTest, styles: dict, out: Path, stem: str = "figures/cd_diagram", of: str = ""
) -> Figure:
    """Write `stem`.png/.pdf under `out`; one method colour as in every other figure. `of`
    names the cases' panel when they are one architecture's (title and caption)."""
    k = len(test.methods)
    with plt.rc_context({**RC, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.9 + 0.22 * k))
        sp.critical_difference_diagram(
            test.avg_rank,
            test.pvalues,
            alpha=test.alpha,
            ax=ax,
            label_fmt_left="{label} ({rank:.2f})",
            label_fmt_right="({rank:.2f}) {label}",
            label_props={"fontsize": 7},
            color_palette={m: styles[m]["color"] for m in test.methods},
            crossbar_props={"linewidth": 2.5, "color": "#444444"},
        )
        ax.set_xlim(0.8, k + 0.2)
        ax.set_xticks(range(1, k + 1))
        # CD from rank 1, above the tick labels (the library's own CD bar sits on them)
        bottom = ax.get_ylim()[0]
        ax.plot([1, 1 + test.cd], [1.6, 1.6], color="#444444", linewidth=1.2)
        for x in (1, 1 + test.cd):
            ax.plot([x, x], [1.45, 1.75], color="#444444", linewidth=1.2)
        ax.text(1 + test.cd / 2, 1.85, f"CD = {test.cd:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(bottom, 2.8)
        ax.set_xlabel(f"average rank over {test.n_cases} cases (1 = best)", fontsize=7, labelpad=8)
        files = save(fig, out, stem)
    cap = (
        f"Critical-difference diagram (Demšar 2006): average rank of each method over "
        f"{test.n_cases} cases (arch, dataset, sub-model, seed{'; ' + of if of else ''}; "
        f"rank 1 = highest test top-1). "
        f"Methods joined by a bar are not significantly different by the Nemenyi test at "
        f"alpha = {test.alpha:g}; the bar marked CD above the axis is the critical difference "
        f"{test.cd:.2f} (q = {test.q_alpha:.3f}, k = {k}, N = {test.n_cases}). Friedman "
        f"chi2 = {test.chi2:.2f} (p = {test.p_chi2:.2g}), Iman-Davenport F = {test.ff:.2f} "
        f"(p = {test.p_ff:.2g}). Cases are not independent (sub-models of one cell share "
        f"weights): p values are optimistic."
    )
    title = "Critical-difference diagram of the methods" + (f" — {of}" if of else "")
    return Figure(stem, title, cap, files)
