"""Skipping a finished grid in about a second: `flexbench grid run` on a grid whose cells all
finished reads its cell keys from a cache and their status straight from the SQLite store, so
it imports neither torch nor MLflow (together ~10 s of a 2-core machine) and builds no model.

The cache entry is written by a `grid run` that ended with every cell finished. Its name is a
hash of everything the cell keys depend on: the grid file's bytes and path, its best-params
file (`method_params.from_study`), the command line's settings and `--only`, the current
directory (relative paths), `FLEXBENCH_*` variables and flexbench's own source files (size and
mtime). The entry also holds a stamp of the file-backed datasets' files (path, size, mtime of
each): cell keys know such data by its images' names and sizes (`benchmark.data.identity`), so
an image changed in place changes keys that no input above shows. Any change there, a tracking
store other than a SQLite file, or a cell not finished in that store (a run deleted in the UI, a
new database) falls back to the full run, which validates and plans as usual. The cache never
decides that a cell is finished: the store does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import yaml

from benchmark.errors import WriteError
from benchmark.files import write_text
from benchmark.record import schema
from benchmark.record.store import absolute_sqlite, sqlite_path

_SOURCE = Path(__file__).resolve().parents[1]  # the benchmark package


def _cache_dir() -> Path:
    """Beside the decoded-data cache (`benchmark.data.base`, which imports torch): $FLEXBENCH_CACHE
    or ~/.cache/flexbench."""
    root = os.environ.get("FLEXBENCH_CACHE") or Path.home() / ".cache" / "flexbench"
    return Path(root) / "finished-grids"


def _source_stamp() -> list[tuple[str, int, int]]:
    out = []
    for p in sorted(_SOURCE.rglob("*.py")):
        st = p.stat()
        out.append((str(p.relative_to(_SOURCE)), st.st_size, st.st_mtime_ns))
    return out


def _study_file(grid: Path) -> bytes:
    try:
        raw = yaml.safe_load(grid.read_text())
        rel = raw["method_params"]["from_study"]
        return (grid.resolve().parent / str(rel)).read_bytes()
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return b""


def fingerprint(grid: str | Path, sets: dict[str, Any], only: list[str], uri: str) -> str | None:
    """The cache name of this command, or None when it has no fast path (no SQLite store given
    by --tracking-uri or MLFLOW_TRACKING_URI, or an unreadable grid file)."""
    if not uri or sqlite_path(uri) is None:
        return None
    path = Path(grid)
    try:
        body = path.read_bytes()
    except OSError:
        return None
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("FLEXBENCH_"))
    blob = json.dumps(
        [
            str(path.resolve()),
            hashlib.sha1(body).hexdigest(),
            hashlib.sha1(_study_file(path)).hexdigest(),
            sets,
            sorted(only),
            absolute_sqlite(uri),
            os.getcwd(),
            env,
            _source_stamp(),
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()


def _files(root: Path) -> list[Path]:
    """Every file under a folder (hidden ones too), or the file itself."""
    if not root.is_dir():
        return [root]
    return sorted(Path(folder) / f for folder, _, files in os.walk(root) for f in files)


def data_stamp(datasets: list[str]) -> str:
    """SHA-1 of the path, size and mtime of every file of the file-backed datasets among
    `datasets` (`kind:<path>`; `cifar10`, `synthetic` have none). It changes whenever their cell
    keys can (an image's name or size) and more often (a touched file); OSError when a path is
    gone."""
    h = hashlib.sha1()
    for name in sorted(set(datasets)):
        arg = name.partition(":")[2]
        for path in _files(Path(arg).expanduser()) if arg else []:
            st = path.stat()
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def remember(name: str | None, experiment: str, keys: list[str], datasets: list[str]) -> None:
    """Record that the grid of cache name `name` (its `fingerprint`) has these cells, whose
    data are `datasets` (the cells' `data.name`)."""
    if name is None:
        return
    entry = {"experiment": experiment, "keys": sorted(keys), "datasets": sorted(set(datasets))}
    with contextlib.suppress(WriteError, OSError):  # a full or read-only home: no fast path
        entry["data_stamp"] = data_stamp(datasets)
        write_text(_cache_dir() / f"{name}.json", json.dumps(entry), "")


_FINISHED = """
    SELECT DISTINCT c.value FROM runs r
    JOIN experiments x ON x.experiment_id = r.experiment_id
    JOIN tags c ON c.run_uuid = r.run_uuid AND c.key = ?
    JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = ?
    LEFT JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = ?
    WHERE x.name = ? AND x.lifecycle_stage = 'active' AND r.lifecycle_stage = 'active'
      AND s.value = 'finished' AND (t.value IS NULL OR t.value != 'false')"""


def all_finished(name: str | None, uri: str) -> tuple[str, int] | None:
    """(experiment, number of cells) when the cache knows this grid and the store says every one
    of its cells finished; None otherwise (then the full `grid run` decides)."""
    if name is None:
        return None
    try:
        entry = json.loads((_cache_dir() / f"{name}.json").read_text())
        db = sqlite_path(absolute_sqlite(uri))
        if db is None or not db.is_file() or data_stamp(entry["datasets"]) != entry["data_stamp"]:
            return None
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            query = (schema.CELL, schema.STATUS, schema.TEST_EVALUATED, entry["experiment"])
            done = {row[0] for row in con.execute(_FINISHED, query)}
    except (OSError, ValueError, KeyError, sqlite3.Error):
        return None
    keys = entry["keys"]
    if not keys or not set(keys) <= done:
        return None
    return entry["experiment"], len(keys)
