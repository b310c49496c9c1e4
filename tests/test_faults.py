"""Faults users hit, each turned into the behaviour they rely on: terminating signals close a
cell like Ctrl-C, kills and resumes never duplicate a metric point, several processes can start
on one new store, YAML numbers parse like --set numbers, and a store that changed under the tool
is reported before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST, all_runs, smoke_cfg

from benchmark import checkpoint, tracking
from benchmark.config import cell_key
from benchmark.train import CellOptions, train_cell


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark.cli", *args]


def _train_argv(uri: str, workdir, epochs: int, seed: int = 0) -> list[str]:
    argv = ["train", "--arch", "msdnet", "--dataset", "synthetic", "--method", "joint",
            "--seed", str(seed), "--tracking-uri", uri]  # fmt: skip
    for k, v in {**FAST, "train.epochs": epochs, "runtime.workdir": str(workdir)}.items():
        argv += ["--set", f"{k}={v}"]
    return argv


# --- 1. SIGTERM / SIGHUP end a cell like Ctrl-C ---------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminating_signal_closes_the_run_as_interrupted_and_resume_finishes(
    sig, tracking_uri, client, tmp_path
):
    wd = tmp_path / "runs"
    argv = _train_argv(tracking_uri, wd, epochs=12)
    cfg = smoke_cfg("msdnet", "joint", wd, train__epochs=12)
    ckpt = checkpoint.cell_dir(cfg, "flexbench", cell_key(cfg)) / "checkpoint.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(*argv), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err  # 143 for SIGTERM, 129 for SIGHUP
    assert f"terminated by {signal.Signals(sig).name}" in err and "--resume" in err
    (run,) = all_runs(client)
    assert run.info.status == "KILLED"
    assert run.data.tags["flexbench.status"] == "interrupted"
    done = checkpoint.load(ckpt)["epoch"]
    assert 1 <= done < 12
    # the checkpoint is intact: the cell resumes where it stopped, into the same run
    resumed = subprocess.run(
        _cli(*argv, "--resume"), env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"epoch {done + 1}" in resumed.stderr
    assert client.get_run(run.info.run_id).data.tags["flexbench.status"] == "finished"


# --- 2. each (metric, step) has exactly one point after any kill and resume -----------------
class _Kill(BaseException):
    """Stands for SIGKILL: nothing in the trainer catches it, so no cleanup runs."""


def _kill_on_call(monkeypatch, owner, name: str, n: int, after: bool) -> None:
    """Make the n-th call of owner.name die, before or after doing its work."""
    real, calls = getattr(owner, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and not after:
            raise _Kill
        out = real(*args, **kwargs)
        if len(calls) == n:
            raise _Kill
        return out

    monkeypatch.setattr(owner, name, dying)


@pytest.mark.parametrize(
    "where",
    [
        ("checkpoint", "save", 2, False),  # killed while writing epoch 2's checkpoint
        ("checkpoint", "save", 2, True),  # checkpoint written, metrics not yet sent
        ("run", "log_metrics", 2, True),  # metrics sent, before the next epoch
        ("run", "log_metrics", 4, True),  # final test metrics sent, run not yet finished
    ],
)
def test_kills_at_any_point_of_an_epoch_end_leave_one_point_per_metric_and_step(
    where, tracking_uri, client, tmp_path, monkeypatch
):
    cfg = smoke_cfg("msdnet", "joint", tmp_path / "runs", train__epochs=3)
    owner = checkpoint if where[0] == "checkpoint" else tracking.CellRun
    with monkeypatch.context() as m:
        _kill_on_call(m, owner, *where[1:])
        with pytest.raises(_Kill):
            train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, resume=True, progress=False))
    for key in ("train/loss", "val/top1_mean", "lr", "val/top1/exit1", "time/epoch_s"):
        steps = [p.step for p in client.get_metric_history(result.run_id, key)]
        assert sorted(steps) == [0, 1, 2], (key, steps)
    final = client.get_metric_history(result.run_id, "test/top1/exit1")
    assert [p.step for p in final] == [3]
