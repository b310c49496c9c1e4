"""Shared fixtures: a real MLflow SQLite store per test, tmp caches, and tiny smoke configs.

Creating an MLflow schema takes 20-30 s, so one template database is created per session and
copied for every test that needs a store (each test gets its own file and ./mlruns folder).
Torch runs single-threaded: on a shared 2-core machine, OpenMP threads of tiny ops spin against
other processes and run ~50x slower.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` need a GPU: skipped (with the reason) where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Settings that make a smoke cell take seconds on one CPU thread.
FAST = {
    "runtime.device": "cpu",
    "runtime.threads": 1,
    "runtime.latency_warmup": 0,
    "runtime.latency_repeats": 1,
    "data.train_subset": 128,
    "data.val_size": 64,
    "data.test_subset": 64,
    "train.epochs": 2,
    "train.batch_size": 32,
    "train.eval_batch_size": 128,
}


def image_folder(root: Path) -> Path:
    """An image folder: train/ and test/ with classes a and b, 3 noise images of 32x32 each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def _session_dirs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flexbench-session")
    os.environ["FLEXBENCH_CACHE"] = str(root / "cache")
    return root


@pytest.fixture(autouse=True)
def _isolate(_session_dirs, monkeypatch) -> None:
    """No test reads the user's MLflow settings or writes to the user's dataset cache."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLEXBENCH_CACHE", str(_session_dirs / "cache"))


@pytest.fixture(scope="session")
def mlflow_template(_session_dirs) -> Path:
    """An empty MLflow SQLite database with the schema created (once per session)."""
    from mlflow.tracking import MlflowClient

    path = _session_dirs / "template" / "mlflow.db"
    path.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(mlflow_template, tmp_path, monkeypatch) -> str:
    """A fresh, real MLflow store for this test; the cwd is tmp_path so ./mlruns lands there."""
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{db}"


@pytest.fixture
def client(tracking_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def all_runs(client) -> list:
    """Every run in every experiment of the store (parents and children)."""
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=1000) if exps else []


def smoke_cfg(
    arch: str, method: str, workdir: Path, seed: int = 0, **overrides: Any
) -> dict[str, Any]:
    """A resolved smoke-profile cell on synthetic data, with FAST settings and `overrides`
    (keys as in --set, with '__' for '.', e.g. train__epochs=3)."""
    from benchmark.config import resolve

    sets = {**FAST, "runtime.workdir": str(workdir)}
    sets.update({k.replace("__", "."): v for k, v in overrides.items()})
    return resolve(arch, "synthetic", method, seed, "smoke", sets)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def draws_whole_and_resumed(
    seen: list, tracking_uri: str, workdir: Path, arch: str, method: str, epochs: int = 3
) -> tuple[list, list]:
    """The draws `seen` records (a spy the caller installed) over a smoke cell trained whole,
    and over the same cell killed after its first epoch and resumed: (whole, resumed)."""
    from benchmark.errors import CellPruned
    from benchmark.training.train import CellOptions, train_cell

    cfg = smoke_cfg(arch, method, workdir / "full", train__epochs=epochs)
    train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    whole = list(seen)
    seen.clear()

    def stop_after_first(epoch, _metrics):
        if epoch == 0:
            raise CellPruned("killed")

    cfg = smoke_cfg(arch, method, workdir / "killed", train__epochs=epochs)
    with pytest.raises(CellPruned):
        train_cell(cfg, CellOptions(tracking_uri, epoch_callback=stop_after_first, progress=False))
    train_cell(cfg, CellOptions(tracking_uri, resume=True, progress=False))
    return whole, list(seen)
