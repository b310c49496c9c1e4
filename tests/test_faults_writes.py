"""Faults of the files flexbench writes (issue 26, items 3-6 and two of 11): a full disk while
checkpointing, writing a report, exported parameters or the data cache; a read-only cache; names
the file system cannot hold; a report interrupted half-way; a failed report or a mistyped SQLite
path leaving an empty folder or database behind.

A full disk is simulated without root: `full_disk` patches `open` so that a file opened for
writing under a folder raises OSError(ENOSPC) on its first write (after the file exists, as on
a real full disk), and `torch.save` to a path under it fails as torch does on a full disk
(`RuntimeError: unexpected pos ...` with the OSError as its context; checked on a tmpfs). A
read-only folder is simulated by `Path.mkdir` raising OSError(EROFS), since root ignores chmod.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import all_runs
from test_data import data_cfg, write_tree
from test_faults import _command, _interrupted_cell, _train_argv
from test_reports import _finished_cell

from benchmark import cli
from benchmark import data as datasets


def _full(path: object, folder: Path) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).absolute().is_relative_to(folder)


class _FullFile:
    """A file on a full disk: it exists, and every write fails with ENOSPC."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self.fh, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def full_disk(monkeypatch, folder: Path) -> None:
    """Make `folder` (created if needed) a full disk for open() and torch.save."""
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    real_open, real_save = builtins.open, torch.save

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return _FullFile(fh) if _full(file, folder) and set(mode) & set("wax+") else fh

    def fake_save(obj, f, *args, **kwargs):
        if not _full(f, folder):
            return real_save(obj, f, *args, **kwargs)
        with fake_open(f, "wb") as fh:
            try:
                fh.write(b"PK")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904 - torch chains it as context

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(torch, "save", fake_save)


def _one_line(capsys, start: str = "flexbench: error:") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith(start)]
    return line


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# --- 3. a full disk: one line naming the device and the space needed, no temp file left ------
def test_a_full_disk_while_checkpointing_is_one_line_and_resume_clears_the_error(
    tracking_uri, client, tmp_path, capsys, monkeypatch
):
    ckpt, run_id = _interrupted_cell(tracking_uri, tmp_path / "runs", monkeypatch)
    before = ckpt.read_bytes()  # epoch 1's checkpoint; epoch 2's meets a full disk
    argv = [*_train_argv(tracking_uri, tmp_path / "runs", epochs=2), "--resume"]
    with monkeypatch.context() as m:
        full_disk(m, ckpt.parent)
        assert cli.main(argv) == 1
    line = _one_line(capsys)
    assert line.startswith("flexbench: error: no space left on ")
    assert f"to write {ckpt} (it needs " in line and " free)" in line and "--resume" in line
    assert ckpt.read_bytes() == before and _temp_files(ckpt.parent) == []
    run = client.get_run(run_id)
    assert run.data.tags["flexbench.status"] == "failed"
    assert "no space left" in run.data.tags["flexbench.error"]
    assert cli.main(argv) == 0  # space freed: the cell resumes and finishes, its error gone
    tags = client.get_run(run_id).data.tags
    assert tags["flexbench.status"] == "finished" and "flexbench.error" not in tags


def test_a_full_disk_that_also_holds_the_store_still_gives_the_disk_line(
    tracking_uri, tmp_path, capsys, monkeypatch
):
    """The default layout (./mlflow.db beside ./flexbench_runs): the store cannot record the
    failure either; that costs a warning, not the error or a traceback."""
    from benchmark.record import tracking

    ckpt, run_id = _interrupted_cell(tracking_uri, tmp_path / "runs", monkeypatch)
    argv = [*_train_argv(tracking_uri, tmp_path / "runs", epochs=2), "--resume"]

    def store_full(self, *args) -> None:
        raise RuntimeError("(sqlite3.OperationalError) database or disk is full")

    with monkeypatch.context() as m:
        full_disk(m, ckpt.parent)
        m.setattr(tracking.CellRun, "set_tags", store_full)
        assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warning, line = [ln for ln in err.splitlines() if ln.startswith(("warning:", "flexbench:"))]
    assert warning == (
        f"warning: MLflow run {run_id} could not be marked as ended "
        "((sqlite3.OperationalError) database or disk is full)"
    )
    assert line.startswith("flexbench: error: no space left on ")


def test_a_dataloader_workers_death_during_the_end_record_does_not_leave_the_run_running(
    capsys,
):
    """A signal to the whole process group kills the DataLoader workers too; torch's SIGCHLD
    handler raises their deaths into the write that records the run's end. That write is
    tried again, so the run is closed, not left `running` with a warning."""
    from types import SimpleNamespace

    from benchmark.record import tracking

    calls = []

    def end() -> None:
        calls.append(1)
        if len(calls) <= 2:  # two workers, two deaths
            raise RuntimeError("DataLoader worker (pid 14060) is killed by signal: Terminated.")

    tracking.CellRun.record_end(SimpleNamespace(run_id="r"), end)
    assert len(calls) == 3 and "could not be marked" not in capsys.readouterr().err


def test_a_full_disk_while_writing_the_cells_artifacts_is_one_line_and_resume_finishes(
    tracking_uri, client, tmp_path, capsys, monkeypatch
):
    import tempfile

    argv = _train_argv(tracking_uri, tmp_path / "runs", epochs=1)
    with monkeypatch.context() as m:
        m.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the artifacts are made
        full_disk(m, tmp_path / "tmp")
        assert cli.main(argv) == 1
    line = _one_line(capsys)
    assert line.startswith("flexbench: error: no space left on ") and "--resume" in line
    assert f"to write {tmp_path / 'tmp'}" in line
    assert cli.main([*argv, "--resume"]) == 0
    (run,) = [r for r in all_runs(client) if "flexbench.status" in r.data.tags]
    tags = run.data.tags
    assert tags["flexbench.status"] == "finished" and "flexbench.error" not in tags


def _report_argv(uri: str, out: Path, *extra: str) -> list[str]:
    return ["report", "--experiment", "rep", "--tracking-uri", uri, "--out", str(out), *extra]


@pytest.fixture
def report_store(tracking_uri, client) -> str:
    exp = client.create_experiment("rep")
    for seed in range(2):
        _finished_cell(client, exp, "joint", seed, [50.0 + seed, 60.0, 70.0])
        _finished_cell(client, exp, "ipkd", seed, [52.0 + seed, 61.0, 72.0])
    return tracking_uri


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_full_disk_writing_a_report_or_exported_params_keeps_the_old_files(
    report_store, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "report"
    assert cli.main(_report_argv(report_store, out, "--no-log")) == 0
    before = _snapshot(out)
    assert "index.html" in before and len(before) > 20
    with monkeypatch.context() as m:
        full_disk(m, out)
        assert cli.main(_report_argv(report_store, out, "--no-log")) == 1
    line = _one_line(capsys)
    assert "no space left on " in line and f"to write {out}" in line and "--out" in line
    assert _snapshot(out) == before and _temp_files(out) == []

    from studies import export

    best = tmp_path / "best.yaml"
    best.write_text("old: {T: 1.0}\n")
    monkeypatch.setattr(export, "best_params", lambda study: ("a/b/c", {"T": 2.0}, {}))
    with monkeypatch.context() as m:
        full_disk(m, tmp_path)
        with pytest.raises(RuntimeError, match=f"no space left on .* to write {best} ") as exc:
            export.export(None, best, "sqlite:///x.db")
    assert exc.typename == "WriteError"
    assert best.read_text() == "old: {T: 1.0}\n" and _temp_files(tmp_path) == []


# --- 4. the decoded-data cache is best-effort --------------------------------------------------
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_cache_warns_once_and_the_data_still_loads(
    fault, tmp_path, capsys, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXBENCH_CACHE", str(cache))
    if fault == "full":
        full_disk(monkeypatch, cache)
    else:
        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if self.absolute().is_relative_to(cache):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    trees = [write_tree(tmp_path / name) for name in ("a", "b")]
    for tree in trees:  # two datasets, one warning
        splits = datasets.load_splits(f"imagefolder:{tree}", data_cfg(val_size=6))
        assert len(splits.train) == 30
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "decoded-data cache" in ln]
    assert line.startswith("warning: training without the decoded-data cache: ")
    assert "FLEXBENCH_CACHE" in line
    assert not cache.exists() or [p for p in cache.rglob("*") if p.is_file()] == []


# --- 5. names the file system cannot hold ------------------------------------------------------
LONG = "x" * 300  # MLflow accepts it; no file system holds it as one folder name


@pytest.mark.parametrize("command", ["train", "grid", "study", "report"])
def test_a_name_too_long_for_a_folder_is_refused_before_any_work(
    command, tracking_uri, client, tmp_path, capsys
):
    argv = _command(command, tracking_uri, tmp_path)
    if command == "train":
        argv[argv.index("--experiment") + 1] = LONG
    elif command == "grid":
        grid = tmp_path / "gone.yaml"
        grid.write_text(grid.read_text().replace("name: gone", f"name: {LONG}"))
    elif command == "study":
        argv += ["--study-name", LONG]
    else:  # the experiment exists (made elsewhere); its default report folder cannot
        client.create_experiment(LONG)
        argv = ["report", "--experiment", LONG, "--tracking-uri", tracking_uri, "--no-log"]
    assert cli.main(argv) == 2
    line = _one_line(capsys)
    assert "bytes) cannot be a folder name" in line and "choose a shorter name" in line
    assert not (tmp_path / "runs").exists() and all_runs(client) == []
    if command == "study":
        import optuna

        assert optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'studies.db'}") == []


# --- 6. a report interrupted half-way leaves the last good one -------------------------------
@pytest.mark.parametrize("swallowed", [False, True])
def test_an_interrupted_report_leaves_the_previous_one_and_says_so(
    swallowed, report_store, tmp_path, capsys, monkeypatch
):
    from reports import figures

    out = tmp_path / "report"
    assert cli.main(_report_argv(report_store, out, "--no-log")) == 0
    before = _snapshot(out)
    real_save, calls = figures.save, []

    def ctrl_c_on_the_third_figure(fig, where, stem):
        calls.append(stem)
        if len(calls) == 3:  # Ctrl-C: the handler flexbench.cli installed raises it
            try:
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            except KeyboardInterrupt:
                if not swallowed:  # else: dropped on the way, as in a finalizer
                    raise
        return real_save(fig, where, stem)

    with monkeypatch.context() as m:
        m.setattr(figures, "save", ctrl_c_on_the_third_figure)
        assert cli.main(_report_argv(report_store, out, "--no-log")) == 130
    line = _one_line(capsys, "flexbench: ")
    assert line.startswith("flexbench: interrupted; the previous report")
    assert "--resume" not in line
    assert _snapshot(out) == before and _temp_files(out) == []


# --- 11. a failed report or a mistyped SQLite path leaves nothing behind ----------------------
def test_a_report_that_fails_or_a_mistyped_store_creates_nothing(report_store, tmp_path, capsys):
    out = tmp_path / "new" / "report"
    assert cli.main(_report_argv(report_store, out, "--baseline", "nosuch", "--no-log")) == 2
    assert "baseline method 'nosuch'" in _one_line(capsys)
    assert not (tmp_path / "new").exists()
    typo = tmp_path / "mlfow.db"
    assert cli.main(_report_argv(f"sqlite:///{typo}", out, "--no-log")) == 2
    line = _one_line(capsys)
    assert f"the database {typo} does not exist" in line and "mlflow.db" in line
    assert not typo.exists() and not Path(f"{typo}.lock").exists()
    assert not (tmp_path / "new").exists()
