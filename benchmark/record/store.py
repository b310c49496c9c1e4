"""Store URIs (MLflow tracking/backend stores, Optuna storages): the one home of their plumbing.

Credentials are masked before a URI is printed, tagged or exported; relative SQLite paths are
made absolute before another process (a grid worker, the MLflow server) sees them; and the
`./mlruns` file store, which MLflow 3 refuses, is rejected with a message saying what to use.
Imports neither mlflow nor SQLAlchemy: the `flexbench` CLI and `mlflow_server` import it on
every invocation. `schema_lock` serializes schema creation across processes (MLflow and Optuna
databases). `benchmark.record.tracking` re-exports these functions.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from benchmark.errors import ConfigError

SQLITE = "sqlite:///"


def redact_uri(uri: str) -> str:
    """The URI with its password replaced by `***` (user, host, port, path and query kept),
    e.g. `postgresql://u:***@db:5432/x`; a URI without a password is returned unchanged and one
    that cannot be parsed as `<unparsable URI>` (it might hold a secret in any place)."""
    try:
        parts = urlsplit(uri)
        password, port = parts.password, parts.port
    except ValueError:
        return "<unparsable URI>"
    if password is None:
        return uri
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the cwd when it has three slashes
    only); None for other URIs, in-memory databases and an empty path."""
    if not uri.startswith(SQLITE):
        return None
    path = uri[len(SQLITE) :].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def missing_database(db: Path) -> str:
    """`the database x.db does not exist (...)`, with the SQLite files beside it: a command that
    reads must not create one (a typo would leave an empty database behind)."""
    folder = db.absolute().parent
    found = sorted(p.name for p in folder.glob("*.db")) if folder.is_dir() else []
    return (
        f"the database {db} does not exist (removed, moved or mistyped; SQLite files in "
        f"{folder}: {', '.join(found) or 'none'})"
    )


def absolute_sqlite(uri: str) -> str:
    """`sqlite:///relative.db` -> `sqlite:////cwd/relative.db`: a relative path means the
    caller's cwd, not that of the worker or server that opens it later. Other URIs unchanged."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    _, query, rest = uri[len(SQLITE) :].partition("?")
    return SQLITE + str(path.absolute()) + query + rest


def is_file_store(uri: str) -> bool:
    """A plain path or `file:` URI: MLflow's `./mlruns` file store."""
    return "://" not in uri or uri.split(":", 1)[0].lower() == "file"


def refuse_file_store(
    uri: str, what: str, alternatives: str, error: type[ConfigError] = ConfigError
) -> None:
    """Raise `error` when `uri` names a file store, which MLflow 3 refuses.

    what: the option named in the message (e.g. "tracking URI"); alternatives: the stores to
    use instead (e.g. "sqlite:///path/mlflow.db or an http(s):// server")."""
    if is_file_store(uri):
        raise error(f"{what} {uri!r} is a file store, which MLflow 3 refuses; use {alternatives}")


def lock_path(uri: str) -> Path | None:
    """`<database>.lock` beside a SQLite database (the file `schema_lock` holds); None for other
    URIs."""
    path = sqlite_path(uri)
    return None if path is None else path.with_name(path.name + ".lock")


@contextmanager
def schema_lock(uri: str) -> Iterator[None]:
    """Hold an inter-process lock on the database of `uri` while a schema is created or checked.

    Two processes that open one new database at once both see no tables and both create them:
    one dies with `table ... already exists`. SQLite: `fcntl.flock` on `<database>.lock` beside
    the file (released by the kernel when the holder dies); PostgreSQL: a session advisory lock
    (`pg_advisory_lock`) on the server. http(s):// servers own their schema and other databases
    (MySQL, MSSQL) are not locked: create their schema once, e.g. with `mlflow db upgrade`."""
    lock = lock_path(uri)
    if lock is not None:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock
    elif uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
        with _pg_advisory_lock(uri):
            yield
    else:
        yield


# Any fixed 64-bit key: the advisory lock of flexbench's schema creation on a PostgreSQL server.
_PG_LOCK_KEY = 0x666C657862656E63  # "flexbenc"


@contextmanager
def _pg_advisory_lock(uri: str) -> Iterator[None]:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    except ImportError as exc:
        raise ConfigError(
            f"{redact_uri(uri)}: the database driver is missing ({exc}); install "
            f"psycopg[binary] and write postgresql+psycopg://"
        ) from exc
    try:
        try:
            conn = engine.connect()
        except sqlalchemy.exc.OperationalError as exc:
            raise ConfigError(
                f"cannot connect to {redact_uri(uri)} ({str(exc.orig).strip()}); check the "
                f"host, port and credentials"
            ) from None
        with conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
    finally:
        engine.dispose()
