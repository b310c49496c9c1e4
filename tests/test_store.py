"""Store URI plumbing (`benchmark/record/store.py`): what every command does with a tracking URI, a
server backend or an Optuna storage before it opens it."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.errors import ConfigError
from benchmark.record import store, tracking


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://u:p%40ss@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgresql+psycopg://bench:s3cret@127.0.0.1/mlflow", "postgresql+psycopg://bench:***@127.0.0.1/mlflow"),
        ("https://alice:pw@mlflow.example.org/", "https://alice:***@mlflow.example.org/"),
        ("postgresql://u:pw@[::1]:5432/db?sslmode=require", "postgresql://u:***@[::1]:5432/db?sslmode=require"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://u:pw@db:notaport/x", "<unparsable URI>"),
    ],
)  # fmt: skip
def test_redact_uri_masks_only_the_password(uri, shown):
    assert store.redact_uri(uri) == shown
    assert tracking.redact_uri is store.redact_uri  # one function, re-exported


def test_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store.absolute_sqlite("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    assert (
        store.absolute_sqlite("sqlite:///m.db?timeout=5") == f"sqlite:///{tmp_path}/m.db?timeout=5"
    )
    for unchanged in ("sqlite:////abs/m.db", "sqlite:///:memory:", "http://h:5000", "sqlite:///"):
        assert store.absolute_sqlite(unchanged) == unchanged
    assert store.sqlite_path("sqlite:////abs/m.db?x=1") == Path("/abs/m.db")


@pytest.mark.parametrize("uri", ["./mlruns", "mlruns", "file:///tmp/mlruns", "FILE:/tmp/x"])
def test_file_store_is_refused_with_what_to_use(uri):
    with pytest.raises(ConfigError, match=r"file store.*sqlite:///"):
        tracking.check_reachable(uri)


def test_refusal_raises_the_callers_error_type():
    class Custom(ConfigError):
        pass

    with pytest.raises(Custom, match="backend store './mlruns' is a file store"):
        store.refuse_file_store("./mlruns", "backend store", "sqlite:///x.db", Custom)
    store.refuse_file_store("sqlite:///x.db", "backend store", "sqlite:///x.db", Custom)
