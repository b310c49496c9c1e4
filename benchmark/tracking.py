"""The only module that writes to MLflow (schema: see docs/mlflow-schema.md).

One parent run per cell (tags, flattened params, per-epoch metrics, final per-sub-model metrics,
summaries, artifacts) and one child run per sub-model. Metrics are always sent in batches: one
`log_batch` per epoch, never one request per value. `flexbench.status` becomes `finished` only
after everything else is written.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmark.errors import ConfigError

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

DEFAULT_EXPERIMENT = "flexbench"
TAG = "flexbench."


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow's own default."""
    if uri:
        return uri
    return mlflow.get_tracking_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before training when the tracking store cannot be written."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ConfigError(f"MLflow server {uri} answered {resp.status} on /health")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return  # an auth-protected server is up; credentials are checked on first write
            raise ConfigError(f"MLflow server {uri} answered {exc.code} on /health") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(
                f"cannot reach the MLflow tracking server {uri} ({exc}); start it "
                f"(`flexbench server start`) or set --tracking-uri / MLFLOW_TRACKING_URI"
            ) from exc
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(
                f"tracking URI {uri}: directory {folder} does not exist or is not writable"
            )
    elif uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use "
            f"sqlite:///path/mlflow.db or an http(s):// server"
        )


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
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self._create_experiment(experiment)
        self.run_id: str | None = None

    def _create_experiment(self, name: str) -> str:
        try:
            return self.client.create_experiment(name)
        except mlflow.exceptions.MlflowException:  # created concurrently by another worker
            return self.client.get_experiment_by_name(name).experiment_id

    def start(
        self,
        cfg: dict[str, Any],
        key: str,
        params: dict[str, str],
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> str:
        """Create the parent run, or reopen `run_id` when resuming."""
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, TAG + "status", "running")
            return run_id
        name = f"{cfg['arch']['name']}-{cfg['method']['name']}-s{cfg['seed']}"
        all_tags = {
            TAG + "cell": key,
            TAG + "arch": cfg["arch"]["name"],
            TAG + "dataset": cfg["data"]["name"],
            TAG + "method": cfg["method"]["name"],
            TAG + "seed": str(cfg["seed"]),
            TAG + "profile": cfg["profile"],
            TAG + "status": "running",
            TAG + "git_commit": git_commit(),
            **tags,
        }
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()]
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(
        self,
        final: dict[str, float],
        rows: list[dict[str, Any]],
        artifacts: list[tuple[Path, str | None]],
        cfg: dict[str, Any],
        key: str,
        step: int,
    ) -> None:
        """Children, final metrics, artifacts; then status `finished` and FINISHED, last."""
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
                    TAG + "submodel": row["name"],
                    TAG + "submodel_index": str(row["index"]),
                    TAG + "cell": key,
                    TAG + "arch": cfg["arch"]["name"],
                    TAG + "dataset": cfg["data"]["name"],
                    TAG + "method": cfg["method"]["name"],
                    TAG + "seed": str(cfg["seed"]),
                    TAG + "profile": cfg["profile"],
                },
            )
            cid = child.info.run_id
            keys = ("top1", "top5", "mmacs", "mflops", "params_m", "latency_ms")
            self.client.log_batch(
                cid,
                metrics=[Metric(k, float(row[k]), ts, 0) for k in keys if row.get(k) is not None],
                params=[Param("submodel", row["name"]), Param("method", cfg["method"]["name"])],
            )
            self.client.set_terminated(cid, "FINISHED")
        self.log_metrics(final, step)
        for path, folder in artifacts:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)
        self.set_tags({TAG + "status": "finished"})
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, reason: str) -> None:
        if self.run_id is None:
            return
        self.set_tags({TAG + "status": "failed", TAG + "error": reason[:4000]})
        self.client.set_terminated(self.run_id, "FAILED")

    def interrupted(self) -> None:
        """Ctrl-C: the checkpoint stays, the run is marked KILLED and can be resumed."""
        if self.run_id is None:
            return
        self.set_tags({TAG + "status": "interrupted"})
        self.client.set_terminated(self.run_id, "KILLED")
