"""Figures of an Optuna study: optimisation history, parameter importances, T-vs-a contour.

`study_figures(study, out)` is the hook: it takes any `optuna.Study` (in memory or loaded from a
storage) and writes what the study supports, skipping (with a reason) what it does not: the
importances need at least two finished trials and a parameter that varied; the contour needs the
two parameters (by default the method's temperature `T` and KD weight `a`, matched by the last
dotted component of the parameter name, e.g. `method.T`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.visualization import matplotlib as ov

from reports.figures import Figure, save
from reports.style import COLUMN_WIDTH, RC
from reports.tables import panel_slug


def _param(names: list[str], short: str) -> str | None:
    hits = [n for n in names if n.split(".")[-1] == short]
    return hits[0] if len(hits) == 1 else None


def contour_params(study: optuna.Study) -> tuple[str, str] | None:
    names = sorted({p for t in study.trials for p in t.params})
    t, a = _param(names, "T"), _param(names, "a")
    return (t, a) if t and a else None


def study_figures(
    study: optuna.Study, out: Path, params: tuple[str, str] | None = None
) -> tuple[list[Figure], list[str]]:
    """Write the study's figures under out/figures; returns (figures, reasons for skipped ones)."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return [], [f"study {study.study_name}: no finished trial, no figure"]
    direction = study.direction.name.lower() if len(study.directions) == 1 else "multi-objective"
    if direction == "multi-objective":
        return [], [f"study {study.study_name}: multi-objective studies are not plotted"]
    figs: list[Figure] = []
    skipped: list[str] = []
    for drawn in _drawings(study, out, len(done), direction, params):
        (figs if isinstance(drawn, Figure) else skipped).append(drawn)
    return figs, skipped


def _drawings(
    study: optuna.Study, out: Path, n: int, direction: str, params: tuple[str, str] | None
) -> Iterator[Figure | str]:
    """History, importances and contour in turn: each figure, or the reason it is skipped (the
    last two need 2 finished trials, the contour its two parameters)."""
    name = study.study_name
    yield _draw(
        study,
        out,
        "history",
        lambda: ov.plot_optimization_history(study),
        f"Optuna history — {name}",
        f"Objective of each finished trial and the best so far (direction: {direction}), "
        f"study {name}, n = {n} finished trials.",
    )
    if n >= 2:
        yield _draw(
            study,
            out,
            "importance",
            lambda: ov.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=32, seed=0)
            ),
            f"Parameter importances — {name}",
            f"fANOVA importance (32 trees, seed 0) of each searched parameter for the "
            f"objective, study "
            f"{name}, n = {n} finished trials (few trials: indicative only).",
        )
    else:
        yield f"study {name}: importances need ≥ 2 finished trials"
    pair = params or contour_params(study)
    if pair is None:
        yield f"study {name}: no T and a parameters for the contour"
    elif n >= 2:
        yield _draw(
            study,
            out,
            "contour",
            lambda: ov.plot_contour(study, params=list(pair)),
            f"{pair[0]} vs {pair[1]} — {name}",
            f"Objective interpolated over {pair[0]} and {pair[1]} (dots: the {n} finished "
            f"trials), study {name}.",
            height=2.8,
        )


def _draw(
    study: optuna.Study,
    out: Path,
    kind: str,
    plot: Callable[[], Any],
    title: str,
    caption: str,
    height: float = 2.6,
) -> Figure | str:
    """One of Optuna's matplotlib plots, resized to a column and saved (figures/study_<slug>_
    <kind>); Optuna's ValueError/RuntimeError (e.g. too few distinct values) skips it instead."""
    import matplotlib.pyplot as plt

    with plt.rc_context(RC), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ax = plot()
        except (ValueError, RuntimeError) as exc:
            plt.close("all")
            return f"study {study.study_name}: no {kind} figure ({exc})"
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(COLUMN_WIDTH * (1.4 if kind == "contour" else 1), height)
        _restyle(fig, title)
        stem = f"figures/study_{panel_slug((study.study_name,))}_{kind}"
        return Figure(stem, title, caption, save(fig, out, stem))


def _restyle(fig, title: str) -> None:
    """Optuna's figures use large ggplot fonts and an outside legend: fit them to a column."""
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            ax.yaxis.label.set_size(8)
            ax.tick_params(labelsize=7)
            continue
        for loc in ("center", "left", "right"):
            ax.set_title("", loc=loc)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
        ax.tick_params(labelsize=7)
        if ax.get_legend() is not None:
            ax.legend(loc="best", fontsize=7, frameon=False)
        for text in ax.texts:
            text.set_fontsize(7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()


def load_studies(storage: str, names: list[str] | None = None) -> list[optuna.Study]:
    """The studies named (default: all) in an Optuna storage URL."""
    from benchmark.errors import ConfigError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        summaries = optuna.study.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as exc:  # noqa: BLE001 - any storage failure is a user-facing config error
        raise ConfigError(f"cannot read Optuna storage {storage!r}: {exc}") from exc
    available = [s.study_name for s in summaries]
    wanted = names or available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise ConfigError(
            f"no Optuna study {', '.join(unknown)} in {storage}; studies there: "
            f"{', '.join(available) or '(none)'}"
        )
    return [optuna.load_study(study_name=n, storage=storage) for n in wanted]
