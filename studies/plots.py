"""Optuna's matplotlib figures of a study (headless): history, importances, contour, curves."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState


def save_plots(study: optuna.Study, out: Path) -> tuple[list[Path], list[str]]:
    """Write PNGs under `out`; returns (files, reasons for the figures that were skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    out.mkdir(parents=True, exist_ok=True)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({p for t in done for p in t.params})
    files: list[Path] = []
    skipped: list[str] = []

    def draw(kind: str, fn, need: str | None = None) -> None:
        if need:
            skipped.append(f"{kind}: {need}")
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = fn()
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                skipped.append(f"{kind}: {exc}")
                plt.close("all")
                return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        path = out / f"{kind}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)

    draw(
        "history",
        lambda: ov.plot_optimization_history(study),
        None if done else "no complete trial",
    )
    draw(
        "intermediate_values",
        lambda: ov.plot_intermediate_values(study),
        None if any(t.intermediate_values for t in study.trials) else "no trial reported",
    )
    draw(
        "importances",
        lambda: ov.plot_param_importances(study),
        None if len(done) >= 2 else "needs at least 2 complete trials",
    )
    pair = ["T", "a"] if {"T", "a"} <= set(names) else names[:2]
    draw(
        "contour",
        lambda: ov.plot_contour(study, params=pair),
        None
        if len(pair) == 2 and len(done) >= 2
        else "needs 2 searched parameters and 2 complete trials",
    )
    return files, skipped
