"""The only module that writes to MLflow (schema: benchmark/record/schema.py,
docs/mlflow-schema.md).

One parent run per cell (tags, flattened params, per-epoch metrics, final per-sub-model metrics,
summaries, artifacts) and one child run per sub-model; study runs (`StudyRun`) and report runs
(`log_artifact_run`). Store URI helpers (`benchmark/record/store.py`) are re-exported here. Metrics
are always sent in batches: one `log_batch` per epoch, never one request per value.
`flexbench.status` becomes `finished` only after everything else is written.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmark.errors import CellPruned, ConfigError
from benchmark.record import schema, signals
from benchmark.record.store import (  # noqa: F401 - re-exported: the one home of URI plumbing
    absolute_sqlite,
    missing_database,
    redact_uri,
    refuse_file_store,
    schema_lock,
    sqlite_path,
)

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

DEFAULT_EXPERIMENT = "flexbench"


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow's own default."""
    if uri:
        return uri
    return mlflow.get_tracking_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before training when the tracking store cannot be written."""
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ConfigError(f"MLflow server {shown} answered {resp.status} on /health")
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):  # 401/403: an auth-protected server is up
                raise ConfigError(f"MLflow server {shown} answered {exc.code} on /health") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(
                f"cannot reach the MLflow tracking server {shown} ({exc}); start it "
                f"(`flexbench server start`) or set --tracking-uri / MLFLOW_TRACKING_URI"
            ) from exc
        _check_login(uri, timeout)
    elif (path := sqlite_path(uri)) is not None:
        folder = path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(
                f"tracking URI {uri}: directory {folder} does not exist or is not writable"
            )
    else:
        refuse_file_store(uri, "tracking URI", "sqlite:///path/mlflow.db or an http(s):// server")


def _check_login(uri: str, timeout: float) -> None:
    """A server with basic-auth answers /health to anyone: try a read with the credentials
    MLflow's client will use (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN) before training."""
    shown = redact_uri(uri)
    req = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    )
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        req.add_header(
            "Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode()
        )
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"])
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            given = "were refused" if user and password else "are not set"
            raise ConfigError(
                f"MLflow server {shown} requires a login (HTTP {exc.code}) and the credentials "
                f"{given}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from exc
        # anything else is left to MLflow's client, which reports it on the first request
    except (urllib.error.URLError, OSError):
        pass


def open_store(uri: str, create: bool = True) -> MlflowClient:
    """Check that `uri` can be written, then create (or check) MLflow's schema while holding
    the database's inter-process lock (`store.schema_lock`), so that any number of flexbench
    processes can start together on a new or existing store. Every command calls this before
    its first read or write; one that only reads passes `create=False`, so that a mistyped
    SQLite path fails without leaving an empty database behind. Raises ConfigError."""
    db = sqlite_path(uri)
    if not create and db is not None and not db.exists():
        raise ConfigError(f"tracking URI {redact_uri(uri)}: {missing_database(db)}")
    check_reachable(uri)
    if uri.startswith(("http://", "https://")):  # a server owns its schema
        return MlflowClient(tracking_uri=uri)
    with schema_lock(uri):  # constructing the client builds the store, which creates the schema
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    return client


def prepare_store(uri: str, experiment: str) -> None:
    """Open the store (`open_store`) and create the experiment, or stop when it was deleted."""
    open_store(uri)
    CellRun(uri, experiment)


def experiment_id(client: MlflowClient, name: str, create: bool = True) -> str | None:
    """The id of the active experiment `name`; created when missing (None with create=False).
    A deleted experiment (e.g. in the MLflow UI) still holds its name: ConfigError saying how to
    restore it, since MLflow cannot create another experiment with that name."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        shown = redact_uri(client.tracking_uri)
        raise ConfigError(
            f"MLflow experiment {name!r} (id {exp.experiment_id}) at {shown} is deleted; "
            f"restore it with `MLFLOW_TRACKING_URI={shown} mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}`, or use another experiment name"
        )
    if exp is not None or not create:
        return exp.experiment_id if exp is not None else None
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def missing_run(uri: str, experiment: str, run_id: str | None) -> str | None:
    """Why the run `run_id` of a checkpoint cannot be continued in `experiment` at `uri` (its
    database file is gone, the run was deleted or is not in this store), or None when it can.
    Reads only: a removed SQLite database is not created again here."""
    shown = redact_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return missing_database(db)
    if not run_id:
        return "the checkpoint names no MLflow run"
    client = open_store(uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return f"run {run_id} is not in {shown} (another database, or the run was purged)"
    if run.info.lifecycle_stage != "active":
        return (
            f"run {run_id} is deleted (to continue it, restore it first: "
            f"`MLFLOW_TRACKING_URI={shown} mlflow runs restore --run-id {run_id}`)"
        )
    if run.info.experiment_id != experiment_id(client, experiment, create=False):
        return f"run {run_id} belongs to another experiment than {experiment!r}"
    return None


def run_record(uri: str, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """The params and tags run `run_id` records: a resumed cell checks them against what it
    runs now (`benchmark.training.train._resume_record`)."""
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    return dict(run.data.params), dict(run.data.tags)


def cell_tags(cfg: dict[str, Any], key: str) -> dict[str, str]:
    """The tags naming a cell (`schema.CELL_TAGS`), on its parent run and on every child run."""
    return {
        schema.CELL: key,
        schema.ARCH: cfg["arch"]["name"],
        schema.DATASET: cfg["data"]["name"],
        schema.METHOD: cfg["method"]["name"],
        schema.SEED: str(cfg["seed"]),
        schema.PROFILE: cfg["profile"],
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class CellRun:
    """The MLflow record of one cell: a parent run and, at the end, one child per sub-model."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id: str = experiment_id(self.client, experiment)
        self.run_id: str | None = None

    def start(
        self,
        cfg: dict[str, Any],
        key: str,
        params: dict[str, str],
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> str:
        """Create the parent run, or reopen `run_id` when resuming (its error from the end that
        failed, e.g. a killed grid worker or a full disk, no longer holds: removed)."""
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, schema.STATUS, "running")
            if schema.ERROR in self.client.get_run(run_id).data.tags:
                self.client.delete_tag(run_id, schema.ERROR)
            return run_id
        # a caller may name the run (study trials: `mlflow.runName` in extra_tags)
        name = tags.get("mlflow.runName") or (
            f"{cfg['arch']['name']}-{cfg['method']['name']}-s{cfg['seed']}"
        )
        all_tags = {
            **cell_tags(cfg, key),
            schema.STATUS: "running",
            schema.GIT_COMMIT: git_commit(),
            **tags,
        }
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        with signals.deferred():  # a signal mid-write would leave SQLite locked
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()]
            )

    def set_tags(self, tags: dict[str, str]) -> None:
        with signals.deferred():
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(
        self,
        final: dict[str, float],
        rows: list[dict[str, Any]],
        artifacts: list[tuple[Path, str | None]],
        cfg: dict[str, Any],
        key: str,
        step: int,
        budgeted: list[dict[str, float]] | None = None,
    ) -> None:
        """Children, final metrics, artifacts; then status `finished` and FINISHED, last.

        `budgeted`: budgeted-batch points, logged as the histories of `budgeted/top1` and
        `budgeted/mflops` (step = index of the exit distribution)."""
        for stale in self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'"
        ):  # a crash inside a previous finish() left these behind
            self.client.delete_run(stale.info.run_id)
        ts = int(time.time() * 1000)
        for row in rows:
            child = self.client.create_run(
                self.experiment_id,
                run_name=f"{cfg['arch']['name']}-{cfg['method']['name']}-s{cfg['seed']}-{row['name']}",
                tags={
                    "mlflow.parentRunId": self.run_id,
                    **schema.child_tags(row),
                    **cell_tags(cfg, key),
                },
            )
            cid = child.info.run_id
            self.client.log_batch(
                cid,
                metrics=[Metric(k, v, ts, 0) for k, v in schema.child_metrics(row).items()],
                params=[Param("submodel", row["name"]), Param("method", cfg["method"]["name"])],
            )
            self.client.set_terminated(cid, "FINISHED")
        if not self.has_metric_at(next(iter(final)), step):  # a resumed finish()
            self.log_metrics(final, step)
        if budgeted and not self.has_metric_at("budgeted/top1", 0):
            ts = int(time.time() * 1000)
            self.client.log_batch(
                self.run_id,
                metrics=[
                    Metric(f"budgeted/{k}", float(p[k]), ts, i)
                    for i, p in enumerate(budgeted)
                    for k in ("top1", "mflops", "q")
                ],
            )
        for path, folder in artifacts:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)
        self.set_tags({schema.STATUS: "finished"})
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, reason: str) -> None:
        if self.run_id is None:
            return
        self.set_tags({schema.STATUS: "failed", schema.ERROR: reason[:4000]})
        self.client.set_terminated(self.run_id, "FAILED")

    def interrupted(self) -> None:
        """Ctrl-C: the checkpoint stays, the run is marked KILLED and can be resumed."""
        if self.run_id is None:
            return
        self.set_tags({schema.STATUS: "interrupted"})
        self.client.set_terminated(self.run_id, "KILLED")

    def pruned(self) -> None:
        """A study trial stopped by Optuna's pruner: status `pruned`, MLflow status KILLED."""
        if self.run_id is None:
            return
        self.set_tags({schema.STATUS: "pruned"})
        self.client.set_terminated(self.run_id, "KILLED")

    def has_metric_at(self, key: str, step: int) -> bool:
        """Whether `key` already has a point at `step` (a resumed cell must not log it twice)."""
        return any(m.step == step for m in self.client.get_metric_history(self.run_id, key))

    @contextmanager
    def status_on_exit(self) -> Iterator[None]:
        """Close the run with the status its end deserves: Ctrl-C (or a terminating signal,
        see benchmark.record.signals) -> `interrupted`, CellPruned -> `pruned`, any other
        exception -> `failed` with the error; a normal exit leaves it to `finish`. The exception
        propagates."""
        try:
            yield
        except KeyboardInterrupt:
            self.record_end(self.interrupted)
            raise
        except CellPruned:
            self.record_end(self.pruned)
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.record_end(lambda: self.fail(reason))
            raise

    def record_end(self, end: Callable[[], None]) -> bool:
        """Record how the run ended (True: recorded); a store that cannot take it (the full
        disk that ended the cell often holds the SQLite database too) costs a warning, never
        the error that ended the run (the grid and `--resume` treat the run left `running` as
        interrupted). MLflow's own traceback of the failed write is silenced: the warning says
        it in one line.

        The end is tried up to END_ATTEMPTS times (its writes are idempotent): a signal sent to
        the whole process group (Ctrl-C, `timeout`, a job scheduler) also kills the DataLoader
        workers, and torch's SIGCHLD handler raises their death into whatever the main process
        runs then, i.e. into this write."""
        db_log = logging.getLogger("mlflow.store.db.utils")
        was, db_log.disabled = db_log.disabled, True
        try:
            for attempt in range(END_ATTEMPTS):
                try:
                    end()
                    return True
                except Exception as exc:  # noqa: BLE001 - whatever the store raises
                    if attempt == END_ATTEMPTS - 1:
                        text = str(exc).strip()
                        first = text.splitlines()[0] if text else type(exc).__name__
                        print(
                            f"warning: MLflow run {self.run_id} could not be marked as ended "
                            f"({first})",
                            file=sys.stderr,
                        )
        finally:
            db_log.disabled = was
        return False


# tries to record a run's end (`CellRun.record_end`): each dead DataLoader worker may raise once
END_ATTEMPTS = 4


class SilentRun:
    """The run object of the ranks other than 0 of a distributed cell: `CellRun`'s interface
    for what the training loop calls, writing nothing (rank 0 alone writes the record)."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def start(
        self,
        cfg: dict[str, Any],
        key: str,
        params: dict[str, str],
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> str | None:
        self.run_id = run_id
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Nothing: rank 0 logs the (rank-reduced) metrics."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Nothing: rank 0 sets the tags."""

    def has_metric_at(self, key: str, step: int) -> bool:
        """True: this rank has nothing pending to log."""
        return True

    @contextmanager
    def status_on_exit(self) -> Iterator[None]:
        """Rank 0 records how the run ended."""
        yield


def environment_tags(device: Any, threads: int) -> dict[str, str]:
    """Where a cell ran: device (GPU name or CPU thread count) and torch version."""
    import torch

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} threads"
    return {schema.DEVICE: f"{device} ({where})", schema.TORCH: torch.__version__}


def log_artifact_run(
    uri: str,
    experiment_id: str,
    name: str,
    tags: dict[str, str],
    params: dict[str, str],
    paths: list[Path],
) -> str:
    """A finished run holding `paths` as artifacts (a folder keeps its name), e.g. a report
    (`flexbench.kind=report`); returns its id."""
    client = MlflowClient(tracking_uri=uri)
    rid = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    for path in paths:
        if path.is_dir():
            client.log_artifacts(rid, str(path), artifact_path=path.name)
        else:
            client.log_artifact(rid, str(path))
    client.set_terminated(rid, "FINISHED")
    return rid


# --- Optuna studies (studies/): one parent run per study, one child run per trial ------------


class StudyRun:
    """The MLflow record of an Optuna study: a parent run tagged `flexbench.kind=study`.

    Each trial is a cell run (created by `train_cell`) whose `mlflow.parentRunId` points here;
    `end_trial` adds the trial's state and objective curve to it once Optuna has decided.
    """

    def __init__(self, uri: str, experiment: str, run_id: str | None = None) -> None:
        cell = CellRun(uri, experiment)  # same experiment handling (created once, race-safe)
        self.uri, self.client, self.experiment_id = uri, cell.client, cell.experiment_id
        self.run_id = run_id

    def open(
        self, study: str, tags: dict[str, str], params: dict[str, str], run_id: str | None
    ) -> str:
        """Reopen the study's run (by id, else by its tags) or create it; returns its id."""
        run = None
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                run = None
            if run is not None and (
                run.info.lifecycle_stage != "active" or run.info.experiment_id != self.experiment_id
            ):
                run = None
        if run is None:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{schema.KIND}` = 'study' "
                f"and tags.`{schema.STUDY}` = '{study}'",
                max_results=1,
            )
            run = found[0] if found else None
        if run is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"study-{study}",
                tags={schema.KIND: "study", schema.STUDY: study, **tags},
            )
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        else:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        self.set_tags({**tags, schema.STATUS: "running"})
        return self.run_id

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_points(self, points: list[tuple[str, float, int, int]]) -> None:
        """(key, value, step, timestamp ms) points; identical points are not stored twice."""
        metrics = [Metric(k, float(v), ts, step) for k, v, step, ts in points]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_artifacts(self, paths: list[Path], folder: str) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def end(self, status: str) -> None:
        """status: finished | interrupted | failed."""
        self.set_tags({schema.STATUS: status})
        mlflow_status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, mlflow_status)

    def trial_runs(self, status: str | None = None) -> list:
        """The trial runs of this study (children carrying `flexbench.trial`)."""
        flt = f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`{schema.TRIAL}` != ''"
        if status:
            flt += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], filter_string=flt, max_results=5000)

    def trial_run_id(self, number: int) -> str | None:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and "
            f"tags.`{schema.TRIAL}` = '{number}'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def end_trial(
        self,
        number: int,
        state: str,
        value: float | None,
        curve: dict[int, float],
        params: dict[str, float],
        error: str | None = None,
    ) -> str:
        """Record a trial's Optuna state (`complete`, `pruned`, `failed`), its objective per
        epoch (`study/objective`) and final value (`study/value`) on its run. A trial that
        failed before its cell run existed gets a run of its own, so every trial has one."""
        run_id = self.trial_run_id(number)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{number}",
                tags={"mlflow.parentRunId": self.run_id, schema.TRIAL: str(number)},
            )
            run_id = run.info.run_id
            self.client.log_batch(
                run_id, params=[Param(f"method.{k}", str(v)) for k, v in params.items()]
            )
            self.client.set_terminated(run_id, "FAILED")
        ts = int(time.time() * 1000)
        metrics = [Metric("study/objective", float(v), ts, s) for s, v in sorted(curve.items())]
        if value is not None:
            metrics.append(Metric("study/value", float(value), ts, 0))
        tags = [RunTag(schema.TRIAL_STATE, state)]
        if error:
            tags.append(RunTag(schema.ERROR, error[:4000]))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        return run_id

    def fail_trial_run(self, run_id: str, reason: str) -> None:
        """A trial whose worker died: its cell run would otherwise stay RUNNING forever."""
        self.client.log_batch(
            run_id,
            tags=[
                RunTag(schema.STATUS, "failed"),
                RunTag(schema.TRIAL_STATE, "failed"),
                RunTag(schema.ERROR, reason[:4000]),
            ],
        )
        self.client.set_terminated(run_id, "FAILED")


# --- Grid plans: which cells a grid means to run (read by `flexbench report`) ----------------

PLAN_ARTIFACT = "grid_plan.json"


def record_grid_plan(uri: str, experiment: str, plan: dict[str, Any]) -> str:
    """Write the grid's plan as the artifact `grid_plan.json` of the experiment's run tagged
    `flexbench.kind=grid` for this grid file (by file name: created on the file's first `grid
    run`, overwritten by later ones, so it is always the file's latest plan; several grid files
    may share one experiment, e.g. a tuned grid beside the defaults). `plan`: {"grid", "path",
    "profile", "excluded", "cells": [{"key", "arch", "dataset", "method", "label", "seed",
    "profile"}, ...]}, with `dataset` as the cells' `flexbench.dataset` tag and `label` the
    method's name in reports (`benchmark.methods.method_label`). Returns the run id."""
    exp_id = CellRun(uri, experiment).experiment_id
    client = MlflowClient(tracking_uri=uri)
    found = [
        r
        for r in client.search_runs([exp_id], filter_string=f"tags.`{schema.KIND}` = 'grid'")
        if Path(r.data.tags.get(schema.GRID_FILE, "")).name == Path(plan.get("path", "")).name
    ]
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(
            exp_id, run_name=f"grid-{experiment}", tags={schema.KIND: "grid"}
        ).info.run_id
    client.log_dict(run_id, plan, PLAN_ARTIFACT)
    client.log_batch(
        run_id,
        tags=[
            RunTag(schema.GRID_CELLS, str(len(plan["cells"]))),
            RunTag(schema.GRID_EXCLUDED, str(plan.get("excluded", 0))),
            RunTag(schema.GRID_FILE, str(plan.get("path", ""))),
            RunTag(schema.GRID_RECORDED, time.strftime("%Y-%m-%d %H:%M:%S")),
        ],
    )
    client.set_terminated(run_id, "FINISHED")
    return run_id
