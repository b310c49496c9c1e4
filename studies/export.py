"""Best parameters of a study, as the YAML file that a grid's `method_params: from_study` reads.

    study:                              # metadata, one entry per exported study
      msdnet/cifar10/ipkd: {name: ..., storage: ..., objective: mean, best_value: ..., ...}
    msdnet/cifar10/ipkd: {T: 3.7, a: 0.62}   # "<arch>/<dataset>/<method>": method parameters

Exporting into an existing file replaces that key's entry and keeps the others, so one file can
hold the tuned parameters of every (arch, dataset, method) of a grid. The values are the method's
full parameter set as the best trial trained it: searched values, values fixed with `--set
method.X=...` and defaults, so the grid trains exactly that configuration.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import optuna
import yaml

from benchmark.config import parse_value
from benchmark.errors import ConfigError
from benchmark.files import write_text

META = "study"


def key(arch: str, dataset: str, method: str) -> str:
    return f"{arch}/{dataset}/{method}"


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        n = len(study.trials)
        raise ConfigError(
            f"study {study.study_name!r} has no complete trial yet ({n} trials in all); "
            f"run more with `flexbench study run --study-name {study.study_name} --trials N`"
        )
    return study.best_trial


def best_params(study: optuna.Study) -> tuple[str, dict[str, float], dict[str, Any]]:
    """(key, method parameters of the best trial, metadata) of a flexbench study."""
    from benchmark.methods import METHODS
    from studies.objective import StudySpec

    spec = StudySpec(**study.user_attrs["flexbench"])
    best = best_trial(study)
    found = {**spec.fixed_params(), **best.params}
    settings = {k: int(v) for k, v in found.items() if "." in k}  # e.g. train.bn_calib_batches
    method_params = {k: v for k, v in found.items() if "." not in k}
    resolved = METHODS.get(spec.method).resolve(method_params)  # every number a float
    params = {**{k: _as_written(v) for k, v in resolved.items()}, **settings}
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    meta = {
        "name": study.study_name,
        "objective": spec.objective,
        "direction": "maximize",
        "best_trial": best.number,
        "best_value": float(best.value),
        "searched": sorted(spec.space),
        "space": spec.space,
        "tuning_seed": spec.seed,
        "profile": spec.profile,
        "sets": spec.sets,
        "trials": {s: states.count(s) for s in sorted(set(states))},
        "mlflow_run_id": study.user_attrs.get("mlflow_run_id"),
        "split": "validation (the test split is never read by a study)",
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return key(spec.arch, spec.dataset, spec.method), params, meta


def _as_written(value: float | str) -> float | int | str:
    """A whole number as an integer (sandwich's `n: 4`, not `4.0`), so that the file and
    `study best` show integer parameters as integers; `load_best` reads numbers as floats."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def export(study: optuna.Study, path: str | Path, storage: str) -> tuple[str, dict[str, float]]:
    """Write (merge) the study's best parameters into `path`; returns (key, params)."""
    k, params, meta = best_params(study)
    meta["storage"] = storage
    path = Path(path)
    doc: dict[str, Any] = {}
    if path.exists():
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path} exists and is not a best-params mapping; not overwriting")
    studies = doc.get(META) if isinstance(doc.get(META), dict) else {}
    studies[k] = meta
    doc = {META: studies, **{n: v for n, v in doc.items() if n != META}}
    doc[k] = params
    text = (
        "# Best method parameters from Optuna studies (validation split only), written by\n"
        "# `flexbench study best --export`; read by a grid's `method_params: from_study`.\n"
        + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    )
    write_text(path, text, "make room there or pass another --export path; the file is unchanged")
    return k, params


def load_best(path: str | Path, arch: str, dataset: str, method: str) -> dict[str, float]:
    """The exported parameters of one (arch, dataset, method), for the grid (ConfigError when
    the file or the entry is missing, listing what the file holds)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"best-params file {path}: {exc.strerror}") from exc
    k = key(arch, dataset, method)
    if not isinstance(doc, dict) or not isinstance(doc.get(k), dict):
        held = sorted(n for n in doc if n != META) if isinstance(doc, dict) else []
        raise ConfigError(
            f"{path} has no tuned parameters for {k}; it holds: {', '.join(held) or '(nothing)'}"
        )
    # numbers as numbers (a hand-edited `1e-3` too), named options (divergence) as they are
    values = {n: parse_value(v) for n, v in doc[k].items()}
    return {n: v if isinstance(v, str) else float(v) for n, v in values.items()}
