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
from pathlib import Path

import pytest
from conftest import FAST, all_runs, free_port, smoke_cfg

from benchmark import cli
from benchmark.config import cell_key, parse_sets, resolve
from benchmark.errors import ConfigError
from benchmark.grid.spec import load_grid
from benchmark.record import tracking
from benchmark.training import checkpoint
from benchmark.training.train import CellOptions, train_cell
from studies.space import resolve_space


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
    epochs = 4  # the signal comes within epoch 2; resuming trains the rest
    argv = _train_argv(tracking_uri, wd, epochs=epochs)
    cfg = smoke_cfg("msdnet", "joint", wd, train__epochs=epochs)
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
    assert 1 <= done < epochs
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


# --- 3. processes started together on one new store all succeed ------------------------------
def test_three_train_processes_started_together_on_a_new_sqlite_store_all_finish(tmp_path):
    db = tmp_path / "new.db"  # does not exist yet: every process finds no schema
    uri = f"sqlite:///{db}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            _cli(*_train_argv(uri, tmp_path / "runs", epochs=1, seed=seed)),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for seed in range(3)
    ]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-2000:] for e in errors)
    runs = all_runs(tracking.MlflowClient(tracking_uri=uri))
    parents = [r for r in runs if r.data.tags.get("flexbench.status") == "finished"]
    assert sorted(r.data.tags["flexbench.seed"] for r in parents) == ["0", "1", "2"]


def test_processes_opening_one_new_optuna_storage_together_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    code = (
        "import sys, optuna; from studies.storage import open_storage; "
        "s = open_storage(sys.argv[1]); "
        "optuna.create_study(storage=s, study_name=sys.argv[2]).optimize(lambda t: 1.0, 1)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url, f"s{i}"], stderr=subprocess.PIPE)
        for i in range(4)
    ]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    import optuna

    names = sorted(s.study_name for s in optuna.get_all_study_summaries(url))
    assert names == ["s0", "s1", "s2", "s3"]


# --- 6. one parser for every value a user writes ----------------------------------------------
GRID_WITH_YAML_NUMBERS = """\
name: yamlnum
profile: smoke
archs: [msdnet]
datasets: [synthetic]
methods: [ipkd]
seeds: [0]
method_params: {from_study: best.yaml}
set: {train.weight_decay: 5e-4, train.lr: 1e-2, train.milestones: [5e-1, 7.5e-1]}
"""


def test_yaml_numbers_in_grid_and_params_files_mean_what_set_means(tracking_uri, tmp_path):
    # PyYAML reads `5e-4` (no dot) as a string; a hand-edited best-params file is YAML too
    (tmp_path / "best.yaml").write_text("msdnet/synthetic/ipkd:\n  T: 4e0\n  a: 5e-1\n")
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID_WITH_YAML_NUMBERS)
    assert cli.main(["grid", "plan", str(grid), "--tracking-uri", tracking_uri]) == 0
    (cell,) = load_grid(grid).cells
    assert cell.cfg["train"]["weight_decay"] == 5e-4 and cell.cfg["train"]["lr"] == 1e-2
    assert cell.cfg["method"] == {"name": "ipkd", "T": 4.0, "a": 0.5, "divergence": "kl"}
    sets = ["train.weight_decay=5e-4", "train.lr=1e-2", "train.milestones=[5e-1, 7.5e-1]",
            "method.T=4e0", "method.a=5e-1"]  # fmt: skip
    assert cell.key == cell_key(
        resolve("msdnet", "synthetic", "ipkd", 0, "smoke", parse_sets(sets))
    )
    space = tmp_path / "space.yaml"
    space.write_text("T: {low: 1e0, high: 1e1, log: true}\na: [0, 5e-1]\n")
    dims = resolve_space("ipkd", space_file=str(space))
    assert (dims["T"].low, dims["T"].high, dims["T"].log) == (1.0, 10.0, True)
    assert (dims["a"].low, dims["a"].high) == (0.0, 0.5)


@pytest.mark.parametrize(
    "sets, shown",
    [
        ({"train.weight_decay": "-5e-4"}, "train.weight_decay must be >= 0, got -0.0005 (float)"),
        ({"train.lr": "fast"}, "train.lr must be > 0, got 'fast' (str)"),
        ({"train.gamma": "2"}, "train.gamma must be in (0, 1], got '2' (str)"),
        ({"train.label_smoothing": True}, "train.label_smoothing must be in [0, 1), got True"),
        ({"runtime.threads": 1.5}, "runtime.threads must be an integer >= 0, got 1.5 (float)"),
        ({"runtime.amp": "yes"}, "runtime.amp must be auto, true or false, got 'yes' (str)"),
        ({"method.T": "-1e0"}, "method ipkd: T must be > 0, got -1.0 (float)"),
        ({"arch.reduction": 1.5}, "msdnet reduction must be in [0, 1), got 1.5 (float)"),
    ],
)
def test_every_range_error_shows_the_value_it_got_and_its_type(sets, shown):
    with pytest.raises(ConfigError) as exc:
        resolve("msdnet", "synthetic", "ipkd", 0, "smoke", sets)
    assert shown in str(exc.value)


# --- the store changed under the tool: detected before any work, one line, no traceback -----
def _interrupted_cell(uri: str, workdir: Path, monkeypatch) -> tuple[Path, str]:
    """A cell killed after its first epoch: its checkpoint and its RUNNING MLflow run."""
    cfg = smoke_cfg("msdnet", "joint", workdir, train__epochs=2)
    with monkeypatch.context() as m:
        _kill_on_call(m, tracking.CellRun, "log_metrics", 1, True)
        with pytest.raises(_Kill):
            train_cell(cfg, CellOptions(tracking_uri=uri, progress=False))
    ckpt = checkpoint.cell_dir(cfg, "flexbench", cell_key(cfg)) / "checkpoint.pt"
    return ckpt, checkpoint.load(ckpt)["run_id"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("flexbench: error:")]
    return line


def _command(command: str, uri: str, tmp_path: Path) -> list[str]:
    workdir = tmp_path / "runs"
    if command == "train":
        return [*_train_argv(uri, workdir, epochs=1), "--experiment", "gone"]
    if command == "grid":
        grid = tmp_path / "gone.yaml"
        grid.write_text(
            "name: gone\nprofile: smoke\narchs: [msdnet]\ndatasets: [synthetic]\n"
            f"methods: [joint]\nseeds: [0]\nset: {{runtime.workdir: {workdir}}}\n"
        )
        return ["grid", "run", str(grid), "--tracking-uri", uri, "--workers", "1"]
    if command == "study":
        sets = [
            a
            for k, v in {**FAST, "runtime.workdir": workdir}.items()
            for a in ("--set", f"{k}={v}")
        ]
        return ["study", "run", "--arch", "msdnet", "--dataset", "synthetic", "--method",
                "ipkd", "--trials", "1", "--experiment", "gone", "--tracking-uri", uri,
                "--storage", f"sqlite:///{tmp_path / 'studies.db'}", *sets]  # fmt: skip
    return ["report", "--experiment", "gone", "--tracking-uri", uri, "--out", str(workdir)]


@pytest.mark.parametrize("command", ["train", "grid", "study", "report"])
def test_a_deleted_experiment_stops_every_command_before_any_work(
    command, tracking_uri, client, tmp_path, capsys
):
    exp_id = client.create_experiment("gone")
    client.delete_experiment(exp_id)
    assert cli.main(_command(command, tracking_uri, tmp_path)) == 2
    line = _one_error_line(capsys)
    assert "'gone'" in line and "is deleted" in line
    assert f"mlflow experiments restore --experiment-id {exp_id}" in line
    assert not (tmp_path / "runs").exists()  # no checkpoint, no report: nothing was done
    assert client.search_runs([exp_id], run_view_type=3) == []
    if command == "study":
        import optuna

        assert optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'studies.db'}") == []


def test_resume_after_the_cells_run_was_deleted_names_it_and_keeps_the_checkpoint(
    tracking_uri, client, tmp_path, capsys, monkeypatch
):
    ckpt, run_id = _interrupted_cell(tracking_uri, tmp_path / "runs", monkeypatch)
    client.delete_run(run_id)  # e.g. in the MLflow UI
    before = ckpt.read_bytes()
    argv = [*_train_argv(tracking_uri, tmp_path / "runs", epochs=2), "--resume"]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert f"run {run_id} is deleted" in line and f"mlflow runs restore --run-id {run_id}" in line
    assert "--restart" in line
    assert ckpt.read_bytes() == before and all_runs(client) == []  # no new run either
    client.restore_run(run_id)  # the fix the message names: the cell then resumes into its run
    assert cli.main(argv) == 0
    assert client.get_run(run_id).data.tags["flexbench.status"] == "finished"


def test_resume_after_the_database_was_removed_names_it_and_creates_nothing(
    tracking_uri, tmp_path, capsys, monkeypatch
):
    ckpt, _ = _interrupted_cell(tracking_uri, tmp_path / "runs", monkeypatch)
    db = tracking.sqlite_path(tracking_uri)
    db.unlink()
    argv = [*_train_argv(tracking_uri, tmp_path / "runs", epochs=2), "--resume"]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert f"the database {db} does not exist" in line and "--restart" in line
    assert ckpt.exists() and not db.exists()


@pytest.mark.parametrize("store", ["missing folder", "server down", "deleted experiment"])
def test_restart_on_a_broken_store_fails_and_keeps_the_checkpoint(
    store, tracking_uri, client, tmp_path, capsys, monkeypatch
):
    ckpt, _ = _interrupted_cell(tracking_uri, tmp_path / "runs", monkeypatch)
    before = ckpt.read_bytes()
    uri = tracking_uri
    if store == "missing folder":
        uri = f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"
    elif store == "server down":
        uri = f"http://127.0.0.1:{free_port()}"
    else:
        client.delete_experiment(client.get_experiment_by_name("flexbench").experiment_id)
    assert cli.main([*_train_argv(uri, tmp_path / "runs", epochs=2), "--restart"]) == 2
    _one_error_line(capsys)
    assert ckpt.read_bytes() == before


def _pg_bindir():
    from mlflow_server.postgres import find_bindir

    return find_bindir()


@pytest.mark.skipif(
    _pg_bindir() is None,
    reason="PostgreSQL binaries (initdb) not found; scripts/install_system_deps.sh installs them",
)
def test_processes_opening_one_new_postgresql_store_together_all_succeed():
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg[binary] is missing")
    from mlflow_server.postgres import LocalPostgres

    code = "import sys; from benchmark.record.tracking import open_store; open_store(sys.argv[1])"
    with LocalPostgres() as pg:
        url = pg.create_database("mlflow", user="bench", password="bench-pw-123")
        procs = [
            subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE)
            for _ in range(3)
        ]
        errors = [p.communicate(timeout=300)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * 3, "\n".join(e[-1500:] for e in errors)
        tables = pg.psql("SELECT count(*) FROM alembic_version", database="mlflow")
        assert tables.split()[2] == "1"  # one schema version row: migrated once


# --- resume checks what it resumes (issue 26, items 1, 2 and 9) -------------------------------
def test_resume_refuses_another_cells_checkpoint_and_leaves_both_cells_alone(
    tracking_uri, client, tmp_path, capsys
):
    wd = tmp_path / "runs"
    assert cli.main(_train_argv(tracking_uri, wd, epochs=1, seed=0)) == 0
    before = {r.info.run_id: (r.info.status, r.data.tags) for r in all_runs(client)}
    key0, key1 = (cell_key(smoke_cfg("msdnet", "joint", wd, s, train__epochs=1)) for s in (0, 1))
    theirs = checkpoint.cell_dir({"runtime": {"workdir": wd}}, "flexbench", key0) / "checkpoint.pt"
    mine = theirs.parent.parent / key1 / "checkpoint.pt"
    mine.parent.mkdir()
    mine.write_bytes(theirs.read_bytes())  # seed 0's checkpoint, copied into seed 1's folder
    assert cli.main([*_train_argv(tracking_uri, wd, epochs=1, seed=1), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert f"cannot resume {mine}" in line and f"checkpoint of cell {key0}" in line
    assert f"this cell {key1}" in line and "--restart" in line
    after = {r.info.run_id: (r.info.status, r.data.tags) for r in all_runs(client)}
    assert after == before  # seed 0's run and its child runs untouched, no run for seed 1
    assert mine.read_bytes() == theirs.read_bytes()


def _image_cell_argv(uri: str, data: Path, workdir: Path, threads: int) -> list[str]:
    argv = _train_argv(uri, workdir, epochs=2)
    argv[argv.index("synthetic")] = f"imagefolder:{data}"
    sets = {"data.train_subset": "null", "data.test_subset": "null", "data.val_size": 6,
            "data.image_size": 32, "train.batch_size": 10, "runtime.threads": threads}  # fmt: skip
    return argv + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_resume_refuses_changed_data_and_records_a_changed_runtime_setting(
    tracking_uri, client, tmp_path, capsys, monkeypatch
):
    """Refused: the epochs already trained saw the old images, so no record could say what the
    network learned from. Recorded: `runtime.threads` does not change what a cell computes (not
    in the cell key), but the run's params, which MLflow cannot change, no longer say what ran."""
    import shutil

    from test_data import write_tree

    data, wd = write_tree(tmp_path / "imgs"), tmp_path / "runs"
    shutil.copytree(data, tmp_path / "original")
    with monkeypatch.context() as m:
        _kill_on_call(m, tracking.CellRun, "log_metrics", 1, True)
        with pytest.raises(_Kill):
            cli.main(_image_cell_argv(tracking_uri, data, wd, threads=1))
    (run,) = all_runs(client)
    (ckpt,) = wd.glob("flexbench/*/checkpoint.pt")
    kept = ckpt.read_bytes()
    for png in sorted(data.glob("train/*/*.png"))[::3]:  # a third of the images replaced
        png.write_bytes((data / "test" / png.parent.name / "000.png").read_bytes())
    assert cli.main([*_image_cell_argv(tracking_uri, data, wd, threads=2), "--resume"]) == 2
    line = _one_error_line(capsys)
    old = run.data.tags["flexbench.data_hash"]
    assert f"cannot resume {ckpt}" in line and f"trained on data with hash {old}" in line
    assert "now hashes" in line and "--restart" in line
    assert ckpt.read_bytes() == kept and client.get_run(run.info.run_id).info.status == "RUNNING"
    shutil.rmtree(data)
    shutil.copytree(tmp_path / "original", data)  # the original files back: it resumes
    assert cli.main([*_image_cell_argv(tracking_uri, data, wd, threads=2), "--resume"]) == 0
    err = capsys.readouterr().err
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["flexbench.status"] == "finished" and tags["flexbench.data_hash"] == old
    assert tags["flexbench.resume_changes"] == "epoch 2: runtime.threads 1 -> 2"
    assert "flexbench.resume_changes: epoch 2: runtime.threads 1 -> 2" in err


def _damage(ckpt: Path, how: str) -> str:
    """Damage the checkpoint as users find it; returns what the error must say is wrong."""
    if how == "truncated":  # a kill while copying it
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        return "the file is truncated or damaged"
    if how == "empty":
        ckpt.write_bytes(b"")
        return "the file is empty (0 bytes)"
    import torch

    state = checkpoint.load(ckpt)  # another code version: a layer renamed
    name = next(iter(state["model"]))
    state["model"][name + "_renamed"] = state["model"].pop(name)
    torch.save(state, ckpt)
    return "its model state does not fit this cell's"


@pytest.mark.parametrize("how", ["truncated", "empty", "another code version"])
def test_an_unreadable_checkpoint_is_one_line_naming_it_and_nothing_is_touched(
    how, tracking_uri, client, tmp_path, capsys, monkeypatch
):
    ckpt, run_id = _interrupted_cell(tracking_uri, tmp_path / "runs", monkeypatch)
    wrong = _damage(ckpt, how)
    kept = ckpt.read_bytes()
    argv = [*_train_argv(tracking_uri, tmp_path / "runs", epochs=2), "--resume"]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert f"cannot resume {ckpt}: {wrong}" in line and "--restart" in line
    assert ckpt.read_bytes() == kept
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["flexbench.status"] == "running"
    assert [p.step for p in client.get_metric_history(run_id, "train/loss")] == [0]


def test_rerun_failed_resumes_a_cell_whose_worker_was_killed_from_its_checkpoint(
    tracking_uri, client, tmp_path, monkeypatch
):
    from benchmark.grid.state import ensure_failed

    wd = tmp_path / "runs"
    sets = {**FAST, "runtime.workdir": str(wd), "train.epochs": 3}
    grid = tmp_path / "killed.yaml"
    grid.write_text(
        "name: killed\nprofile: smoke\narchs: [msdnet]\ndatasets: [synthetic]\n"
        f"methods: [joint]\nseeds: [0]\nset: {sets}\n"
    )
    (cell,) = load_grid(grid).cells
    with monkeypatch.context() as m:  # the worker trained one epoch, then the OOM killer
        _kill_on_call(m, tracking.CellRun, "log_metrics", 1, True)
        with pytest.raises(_Kill):
            train_cell(cell.cfg, CellOptions(tracking_uri, "killed", progress=False))
    ensure_failed(cell, tracking_uri, "killed", "worker process died (killed by SIGKILL)", 0)
    (run,) = all_runs(client)
    assert client.get_run(run.info.run_id).data.tags["flexbench.status"] == "failed"
    argv = ["grid", "run", str(grid), "--tracking-uri", tracking_uri, "--workers", "1"]
    assert cli.main([*argv, "--rerun-failed"]) == 0
    parents = [
        r
        for r in all_runs(client)
        if "flexbench.cell" in r.data.tags and "mlflow.parentRunId" not in r.data.tags
    ]
    assert [r.info.run_id for r in parents] == [run.info.run_id]  # the same run, continued
    tags = parents[0].data.tags
    assert tags["flexbench.status"] == "finished" and "flexbench.error" not in tags
    log = (wd / "killed" / "logs" / "worker-0.log").read_text()
    assert f"resuming cell {cell.key} at stage 1, epoch 2" in log
    steps = [p.step for p in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [0, 1, 2]


def test_a_grid_worker_trains_a_cell_from_scratch_when_its_checkpoint_no_longer_fits(
    tracking_uri, client, tmp_path, capsys, monkeypatch
):
    """A grid has no one to pass --restart: it discards a checkpoint that resume refuses, as it
    does for one whose run is gone, and says so in the worker's log (here: stdout)."""
    from benchmark.grid.worker import run_cell

    ckpt, run_id = _interrupted_cell(tracking_uri, tmp_path / "runs", monkeypatch)
    _damage(ckpt, "another code version")
    cfg = smoke_cfg("msdnet", "joint", tmp_path / "runs", train__epochs=2)
    task = {"cfg": cfg, "key": cell_key(cfg), "label": "c", "uri": tracking_uri,
            "experiment": "flexbench", "mode": "resume", "executor": "local"}  # fmt: skip
    result = run_cell(task, "cpu", 1)
    assert result["run_id"] != run_id and result["resumed"] is False
    out = capsys.readouterr().out
    assert f"cannot resume {ckpt}: its model state does not fit" in out
    assert "training the cell from scratch" in out
    assert client.get_run(result["run_id"]).data.tags["flexbench.status"] == "finished"
