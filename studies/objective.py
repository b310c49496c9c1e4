"""One Optuna trial = one cell trained on the validation split, with the test split sealed.

The trial's parameters become `method.*` overrides of a fixed tuning seed; every epoch reports
the chosen summary of the sub-models' validation top-1 so that pruners can stop bad trials;
`train_cell` always runs with `evaluate_test=False` (the test split then raises
`TestSplitSealed` if anything reads it), and a result that carries a test metric fails the trial.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from benchmark.costs.axis import auc_top1, cost_axis
from benchmark.errors import ConfigError
from benchmark.record import schema
from studies.choices import OBJECTIVES
from studies.space import space_from_dict, suggest

# --set keys that do not change what a trial computes: free to differ between reruns/machines
PER_RUN_KEYS = ("runtime.", "data.root", "data.download")


def is_per_run(key: str) -> bool:
    return key.startswith(PER_RUN_KEYS)


@dataclass
class StudySpec:
    """What defines a study; stored in the Optuna study (user attr `flexbench`) and checked
    when a rerun continues it."""

    arch: str
    dataset: str
    method: str
    profile: str
    seed: int
    objective: str
    sets: dict[str, Any]  # semantic --set overrides (fixed method.* parameters included)
    space: dict[str, dict[str, Any]]
    # what the data is (`benchmark.data.identity`), so that a moved image folder continues the
    # study under its new path; None in studies created before it was stored
    data_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def fixed_params(self) -> dict[str, Any]:
        return {k[len("method.") :]: v for k, v in self.sets.items() if k.startswith("method.")}


@dataclass
class TrialContext:
    """Everything a worker process needs (plain values: it crosses a spawn boundary)."""

    spec: StudySpec
    study_name: str
    storage_url: str
    heartbeat: int
    tracking_uri: str
    experiment: str
    parent_run_id: str
    sampler: str
    pruner: str
    sampler_seed: int | None = None
    trials_before: int = 0  # trials the study held when this run started (`worker_seed`)
    run_sets: dict[str, Any] = field(default_factory=dict)  # runtime.*, data.root, ...
    progress: bool = True


def as_settings(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's (or exported) values as `--set` settings: method parameters by name become
    `method.<name>`; searchable training settings keep their full name (`train.bn_calib_batches`,
    `studies.space.SEARCHABLE_SETTINGS`, whole numbers)."""
    return {
        (k if "." in k else f"method.{k}"): (int(v) if "." in k else v) for k, v in params.items()
    }


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    """Callable for `study.optimize`; returns the trial's final validation summary."""

    def __init__(self, ctx: TrialContext) -> None:
        from benchmark.record import tracking

        self.ctx = ctx
        self.space = space_from_dict(ctx.spec.space)
        self.study_run = tracking.StudyRun(ctx.tracking_uri, ctx.experiment, ctx.parent_run_id)
        self._subs: tuple[list[str], list[float]] | None = None

    # -- the trial's configuration ----------------------------------------------------------
    def config(self, params: dict[str, float], workdir: str | None = None) -> dict[str, Any]:
        from benchmark.config import resolve

        spec = self.ctx.spec
        sets = {**spec.sets, **self.ctx.run_sets, **as_settings(params)}
        if workdir is not None:
            sets["runtime.workdir"] = workdir
        return resolve(spec.arch, spec.dataset, spec.method, spec.seed, spec.profile, sets)

    def submodels(self, cfg: dict[str, Any]) -> tuple[list[str], list[float]]:
        """Sub-model names (smallest first) and MFLOPs, counted once per process (and cached
        under the same key `train_cell` uses)."""
        if self._subs is None:
            from benchmark.training.plan import plan_cell

            costs = plan_cell(cfg).costs
            axis = cost_axis([c.mflops for c in costs], [c.gbitops for c in costs])
            self._subs = ([c.name for c in costs], [getattr(c, axis) for c in costs])
        return self._subs

    def summary(self, metrics: dict[str, float], cfg: dict[str, Any]) -> float:
        """The objective from a metrics dict holding `val/top1/<sub>` for every sub-model."""
        names, cost = self.submodels(cfg)
        top1 = [metrics[schema.FIELDS["top1"].parent_key(n, "val")] for n in names]
        kind = self.ctx.spec.objective
        if kind == "mean":
            return sum(top1) / len(top1)
        if kind == "smallest":
            return top1[0]
        if kind == "auc":
            return auc_top1(cost, top1)
        raise ConfigError(f"unknown objective {kind!r}; valid: {', '.join(OBJECTIVES)}")

    # -- one trial --------------------------------------------------------------------------
    def __call__(self, trial: optuna.Trial) -> float:
        from benchmark.errors import CellPruned

        params = suggest(trial, self.space)
        tags = self._claim(trial)
        trial_dir: Path | None = None
        curve: dict[int, float] = {}
        state, value, error = "failed", None, None
        try:
            trial_dir = self._trial_dir(params, trial.number)
            value = self._train(trial, self.config(params, str(trial_dir)), tags, curve)
            state = "complete"
            return value
        except CellPruned as exc:
            state = "pruned"
            raise optuna.TrialPruned(str(exc)) from exc
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._record(trial, state, value, curve, params, error)
            if trial_dir is not None:  # trials never resume: their checkpoints are garbage
                shutil.rmtree(trial_dir, ignore_errors=True)

    def _claim(self, trial: optuna.Trial) -> dict[str, str]:
        """Mark the trial as this worker's and return its MLflow run's tags; a retried trial
        (it inherits the user attrs of the one it retries) names that one."""
        previous = trial.user_attrs.get("flexbench_trial")
        trial.set_user_attr("flexbench_trial", trial.number)
        trial.set_user_attr("worker", worker_id())
        tags = {
            "mlflow.parentRunId": self.ctx.parent_run_id,
            "mlflow.runName": f"trial-{trial.number}",
            schema.STUDY: self.ctx.study_name,
            schema.TRIAL: str(trial.number),
        }
        if previous is not None and previous != trial.number:
            tags[schema.RETRY_OF] = str(previous)
        return tags

    def _trial_dir(self, params: dict[str, float], number: int) -> Path:
        """The trial's own work directory under the configured workdir: concurrent trials never
        share checkpoints, and the trial's can be removed when it ends."""
        base = Path(self.config(params)["runtime"]["workdir"])
        return base / "studies" / self.ctx.study_name / f"trial-{number}"

    def _pruning_callback(
        self, trial: optuna.Trial, cfg: dict[str, Any], curve: dict[int, float]
    ) -> Callable[[int, dict[str, float]], None]:
        """The per-epoch hook: record the objective in `curve`, report it to Optuna and stop
        the cell (CellPruned) when the pruner says so."""
        from benchmark.errors import CellPruned
        from benchmark.training.plan import plan_cell

        total = plan_cell(cfg).total_epochs

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            v = self.summary(metrics, cfg)
            curve[epoch] = v
            trial.report(v, epoch)
            # never prune after the last epoch: the trial is complete by then
            if epoch < total - 1 and trial.should_prune():
                raise CellPruned(f"epoch {epoch + 1}/{total}: objective {v:.3f}")

        return on_epoch

    def _train(
        self,
        trial: optuna.Trial,
        cfg: dict[str, Any],
        tags: dict[str, str],
        curve: dict[int, float],
    ) -> float:
        """Train the cell on the validation split only and return its objective; a result that
        carries a test metric fails the trial (TestSplitSealed)."""
        from benchmark.training.train import CellOptions, train_cell

        opts = CellOptions(
            tracking_uri=self.ctx.tracking_uri,
            experiment=self.ctx.experiment,
            restart=True,
            evaluate_test=False,  # a study never reads the test split
            epoch_callback=self._pruning_callback(trial, cfg, curve),
            progress=self.ctx.progress,
            extra_tags=tags,
        )
        result = train_cell(cfg, opts)
        leaked = sorted(k for k in result.metrics if k.startswith("test/"))
        if leaked:
            from benchmark.data.base import TestSplitSealed

            raise TestSplitSealed(f"a study trial produced test metrics: {', '.join(leaked)}")
        return self.summary({k: v for k, v in result.metrics.items()}, cfg)

    def _record(
        self,
        trial: optuna.Trial,
        state: str,
        value: float | None,
        curve: dict[int, float],
        params: dict[str, float],
        error: str | None,
    ) -> None:
        """The trial's outcome on the study's MLflow run; a failure to record it is logged, never
        raised, so that it cannot hide the trial's own outcome."""
        try:
            self.study_run.end_trial(trial.number, state, value, curve, params, error)
        except Exception as exc:  # noqa: BLE001 - never hide the trial's own outcome
            optuna.logging.get_logger("flexbench").warning(
                f"trial {trial.number}: could not record its state in MLflow: {exc}"
            )
