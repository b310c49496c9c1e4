"""Optuna storage: one SQLAlchemy URL for every study (SQLite by default, PostgreSQL to share).

Always an `RDBStorage` with a heartbeat: a worker that dies mid-trial stops beating, and after
the grace period the next worker (or rerun) marks that trial FAIL and queues a retry of the same
parameters. Optuna's journal files are faster but have no heartbeat, and a plain URL is what
`optuna-dashboard`, `flexbench report --optuna-storage` and PostgreSQL all take.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import optuna

from benchmark.errors import ConfigError
from benchmark.record.store import redact_uri, schema_lock
from studies.choices import HEARTBEAT_S

DEFAULT_FILE = "flexbench_studies.db"
ENV = "FLEXBENCH_STUDY_STORAGE"
MAX_RETRY = 2


def resolve_url(url: str | None) -> str:
    """--storage, else $FLEXBENCH_STUDY_STORAGE, else sqlite:///<cwd>/flexbench_studies.db."""
    if url:
        return url
    return os.environ.get(ENV) or f"sqlite:///{Path.cwd() / DEFAULT_FILE}"


def check_url(url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(
            f"--storage {url!r} is not a SQLAlchemy URL; use sqlite:////abs/path/studies.db or "
            f"postgresql://user:password@host:port/db"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if db in ("", ":memory:"):
            raise ConfigError("--storage: an in-memory SQLite database cannot be shared or resumed")
        folder = Path(db).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(
                f"--storage {url}: directory {folder} does not exist or is not writable"
            )


def _retry_callback():
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if cls is None:  # Optuna < 4.9
        cls = optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=MAX_RETRY)


def open_storage(url: str, heartbeat: int = HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """An RDBStorage with heartbeat (grace = 2 heartbeats) and retry of stale trials; creates
    the schema if needed under the database's inter-process lock (`store.schema_lock`), so any
    number of processes may open one new storage at once."""
    check_url(url)
    kwargs: dict = {"heartbeat_interval": int(heartbeat), "grace_period": 2 * int(heartbeat)}
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    name = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in params
        else "failed_trial_callback"
    )
    kwargs[name] = _retry_callback()
    if url.startswith("sqlite"):
        # several workers and their heartbeat threads write to one file: wait, don't fail
        engine = {"connect_args": {"timeout": 60}}
    else:
        engine = {"pool_pre_ping": True}
    try:
        # processes opening one new database at once race to create its tables: one at a time
        with schema_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
    except ImportError as exc:
        raise ConfigError(
            f"--storage {redact_uri(url)}: the database driver is missing "
            f"({exc.__cause__ or exc}); "
            f"for postgresql:// install psycopg[binary] (or write postgresql+psycopg2://)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - connection/auth errors are user errors here
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot open Optuna storage {redact_uri(url)}: {exc}") from exc


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())
