"""The grid gives a cell several devices (`devices_per_cell`): a real 2-rank gloo cell on CPU
through the local executor (one MLflow run, world size 2, skipped when rerun), its ranks dying
with a killed worker and resuming, bad values refused before any work, the slot plan on 4
listed GPUs and the Ray task's resources (no GPU, no cluster needed for those two)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from test_grid import fresh_db, parent_runs, run_cli

from benchmark.errors import ConfigError
from benchmark.grid import local
from benchmark.grid.ray_exec import RayExecutor
from benchmark.grid.spec import load_grid

GRID = {
    "name": "ddp",
    "profile": "smoke",
    "archs": ["msdnet"],
    "datasets": ["synthetic"],
    "methods": ["joint"],
    "seeds": [0],
    "devices_per_cell": 2,
    "set": {
        "train.epochs": 2,
        "data": {"train_subset": 64, "val_size": 32, "test_subset": 64},
        "runtime": {"latency_warmup": 0, "latency_repeats": 1},
    },
}


def write(folder: Path, **changes) -> Path:
    grid = {k: v for k, v in {**GRID, **changes}.items() if v is not None}  # None: left out
    path = folder / "g.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def world_size_tag(db: Path, run_id: str) -> str:
    import sqlite3

    with sqlite3.connect(db) as con:
        row = con.execute(
            "SELECT value FROM tags WHERE run_uuid = ? AND key = 'flexbench.world_size'", (run_id,)
        ).fetchone()
    return row[0]


def test_two_device_cell_runs_once_then_rerun_skips(mlflow_template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db, uri = fresh_db(mlflow_template, tmp_path)
    grid = write(tmp_path)
    args = ["--tracking-uri", uri, "--set", f"runtime.workdir={tmp_path / 'runs'}"]
    rc, out, err = run_cli("grid", "run", str(grid), "--devices", "cpu", *args)
    assert rc == 0, out + err
    assert "1/1 cells finished" in out
    (run,) = parent_runs(db, "ddp")
    assert run["status"] == "finished"
    assert world_size_tag(db, run["run_id"]) == "2"  # trained by 2 ranks, recorded by rank 0
    rc, out, err = run_cli("grid", "run", str(grid), "--devices", "cpu", *args)
    assert rc == 0 and "nothing to train: all 1 cells already finished" in out, out + err
    assert parent_runs(db, "ddp") == [run]


def _ranks_of(pid: int) -> list[psutil.Process]:
    """torchrun's agent and its ranks under process `pid`."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in kids if "benchmark.training.ddp_worker" in " ".join(_cmd(p))]


def _cmd(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _is_rank(p: psutil.Process) -> bool:
    cmd = " ".join(_cmd(p))  # torchrun's own command line names the entry too
    return "benchmark.training.ddp_worker" in cmd and "torch.distributed.run" not in cmd


def _until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_torchrun_dies_with_the_process_that_launched_it():
    """`launch_cell`'s torchrun gets SIGTERM when its launcher (a grid worker) is SIGKILLed: here
    the launched command is a sleeper standing in for torchrun, under a real launcher process."""
    code = (
        "import os, sys; from benchmark.training.distributed import _run; "
        "_run([sys.executable, '-c', 'import time; time.sleep(120)'], dict(os.environ))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    launcher = subprocess.Popen([sys.executable, "-c", code], env=env)
    children: list[psutil.Process] = []
    try:
        children = _until(psutil.Process(launcher.pid).children, 60, "the launched process")
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, "the launched process outlived its launcher"
    finally:
        launcher.kill()
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


@pytest.mark.slow  # ~60 s; test_torchrun_dies_with_the_process_that_launched_it covers the kill
def test_killed_worker_takes_its_ranks_and_the_cell_resumes(mlflow_template, tmp_path, monkeypatch):
    """SIGKILL the grid worker of a 2-rank cell after its first epoch: torchrun's agent and both
    ranks end too (none is left training), the cell's one run is not left `running` and gets no
    second, failed run; the rerun resumes it into that same run."""
    monkeypatch.chdir(tmp_path)
    db, uri = fresh_db(mlflow_template, tmp_path)
    grid = write(tmp_path, set={**GRID["set"], "train.epochs": 4})
    workdir = tmp_path / "runs"
    args = ["--tracking-uri", uri, "--set", f"runtime.workdir={workdir}", "--devices", "cpu"]
    cmd = [sys.executable, "-m", "benchmark.cli", "grid", "run", str(grid), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = workdir / "ddp" / "logs" / "worker-0.log"
        text = _until(lambda: log.exists() and log.read_text(), 120, "the worker")
        worker = int(re.search(r"^worker 0 pid (\d+)", text, re.M).group(1))
        _until(lambda: list(workdir.glob("ddp/*/checkpoint.pt")), 180, "epoch 1's checkpoint")
        launched = _ranks_of(worker)
        assert sum(_is_rank(p) for p in launched) == 2, [_cmd(p) for p in launched]
        os.kill(worker, signal.SIGKILL)
        _, alive = psutil.wait_procs(launched, timeout=60)
        assert not alive, f"outlived their worker: {[_cmd(p) for p in alive]}"
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "worker process died (killed by SIGKILL)" in out, out
    (run,) = parent_runs(db, "ddp")
    assert run["status"] in ("interrupted", "failed"), run  # rank 0's mark, or the grid's
    rc, out, err = run_cli("grid", "run", str(grid), "--rerun-failed", *args)
    assert rc == 0 and "trained 1 (1 resumed)" in out, out + err
    assert [(r["run_id"], r["status"]) for r in parent_runs(db, "ddp")] == [
        (run["run_id"], "finished")
    ]


@pytest.mark.parametrize(
    "changes,cli,needle",
    [
        ({"devices_per_cell": 0}, [], "devices_per_cell must be an integer >= 1 (devices per"),
        ({"devices_per_cell": "2"}, [], "devices_per_cell must be an integer >= 1"),
        ({}, ["--devices-per-cell", "0"], "--devices-per-cell must be an integer >= 1"),
        (  # smoke's batch 32: 3 ranks cannot split it
            {"devices_per_cell": 3},
            [],
            "msdnet/synthetic/joint/s0 with devices_per_cell 3: train.batch_size 32 is not "
            "divisible by the world size 3",
        ),
        ({}, ["--devices-per-cell", "5"], "valid world sizes: 1, 2, 4, 8, 16, 32"),
        ({"per_cell": [{"method": "joint", "devices_per_cell": -1}]}, [], "per_cell[0]"),
        (
            {"set": {**GRID["set"], "runtime.world_size": 2}},
            [],
            "set: runtime.world_size is set by the launcher; give the grid devices_per_cell",
        ),
    ],
)
def test_bad_devices_per_cell_fails_before_any_work(tmp_path, changes, cli, needle):
    grid = write(tmp_path, **changes)
    db = tmp_path / "mlflow.db"
    workdir = tmp_path / "runs"
    args = ["--tracking-uri", f"sqlite:///{db}", "--set", f"runtime.workdir={workdir}"]
    rc, out, err = run_cli("grid", "run", str(grid), "--devices", "cpu", *cli, *args)
    assert rc == 2 and needle in err and err.count("\n") == 1, out + err
    assert not db.exists() and not workdir.exists()  # no store, no lock, no cell


def test_more_ranks_than_cores_warn_like_train(tmp_path, monkeypatch):
    """On CPU 4 ranks on fewer cores are allowed, with launch_cell's own warning."""
    from benchmark.grid.runner import RunOptions, _precheck

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    spec = load_grid(write(tmp_path), devices_per_cell=4)
    with pytest.warns(UserWarning, match="devices_per_cell 4 on CPU oversubscribes the 2 cores"):
        _precheck(RunOptions(devices="cpu"), spec.cells)


def test_per_cell_devices_and_the_override(tmp_path):
    grid = write(
        tmp_path,
        methods=["joint", "ipkd"],
        per_cell=[{"method": "ipkd", "devices_per_cell": 4}],
    )
    by_method = {c.method: c.devices for c in load_grid(grid).cells}
    assert by_method == {"joint": 2, "ipkd": 4}
    assert {c.devices for c in load_grid(grid, devices_per_cell=1).cells} == {1}
    assert {c.devices for c in load_grid(write(tmp_path, devices_per_cell=None)).cells} == {1}


@pytest.fixture
def four_gpus(monkeypatch):
    """torch reports 4 CUDA devices (the slot logic only asks torch.cuda for the count)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(local, "cpu_count", lambda: 16)


def test_slots_of_two_gpus_each(four_gpus):
    slots = local.make_slots(None, "cuda:0,cuda:1,cuda:2,cuda:3", 10, devices_per_cell=2)
    assert [s.devices for s in slots] == [("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]
    assert [s.label for s in slots] == ["w0 cuda:0,cuda:1", "w1 cuda:2,cuda:3"]
    assert {s.threads for s in slots} == {8}
    three = local.make_slots(None, "cuda:0,cuda:1,cuda:2", 10, devices_per_cell=2)
    assert [s.devices for s in three] == [("cuda:0", "cuda:1")]  # cuda:2 is left over
    assert [s.devices for s in local.make_slots(None, "cpu", 10, 2)] == [("cpu",)]
    with pytest.raises(ConfigError, match=r"--devices-per-cell 3 exceeds the 2 device\(s\) given"):
        local.make_slots(None, "cuda:0,cuda:1", 10, devices_per_cell=3)


def test_worker_limits_the_launched_ranks_to_the_slot_gpus(monkeypatch):
    from benchmark.grid import worker

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker._visible_ids(["cuda:2", "cuda:3"]) == "2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # e.g. the GPUs Ray gave a task
    assert worker._visible_ids(["cuda:0", "cuda:1"]) == "4,5"
    with worker._cuda_visible("5"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_ray_task_resources_scale_with_the_devices(monkeypatch):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    gpu = RayExecutor("127.0.0.1:1", 4.0, 1.0, devices_per_cell=2)
    assert gpu.task_resources(2) == {"num_cpus": 8.0, "num_gpus": 2.0}
    assert gpu.task_resources(1) == {"num_cpus": 4.0, "num_gpus": 1.0}
    shared = RayExecutor("127.0.0.1:1", 2.0, 0.5)
    assert shared.task_resources(1) == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert shared.task_resources(4)["num_gpus"] == 4.0  # one whole GPU per rank
    cpu = RayExecutor("127.0.0.1:1", 1.0, 0.0)
    assert cpu.task_resources(3) == {"num_cpus": 3.0, "num_gpus": 0.0}
