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
