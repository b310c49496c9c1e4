"""Grid runner: grid-file validation, real worker processes, real MLflow (SQLite), SIGKILL and
resume, a worker that dies, and the Ray executor on a real local Ray cluster.

The training scenarios use tests/grid_tiny.yaml (2 archs x 2 methods x 1 seed, seconds per
cell). MLflow's schema is created once per session (conftest) and copied for each
scenario.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import image_folder

from benchmark.cli import main
from benchmark.config import resolve
from benchmark.errors import ConfigError, IncompatibleError
from benchmark.grid.spec import load_grid
from benchmark.methods import METHODS
from benchmark.models import ARCHS

HERE = Path(__file__).parent
TINY = HERE / "grid_tiny.yaml"
REPO = HERE.parent


# --- helpers -------------------------------------------------------------------------------
def write_grid(folder: Path, filename: str = "g.yaml", **changes) -> Path:
    grid = yaml.safe_load(TINY.read_text())
    for key, value in changes.items():
        if value is None:
            grid.pop(key, None)
        else:
            grid[key] = value
    path = folder / filename
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def parent_runs(db: Path, experiment: str) -> list[dict]:
    """Parent runs of an experiment, read straight from the SQLite file."""
    sql = """
        SELECT r.run_uuid, r.status, c.value, s.value,
               (SELECT value FROM tags e WHERE e.run_uuid = r.run_uuid
                AND e.key = 'flexbench.error')
        FROM runs r JOIN experiments x ON x.experiment_id = r.experiment_id
        JOIN tags c ON c.run_uuid = r.run_uuid AND c.key = 'flexbench.cell'
        JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'flexbench.status'
        WHERE x.name = ? AND r.lifecycle_stage = 'active'"""
    for _ in range(50):
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=20)) as con:
                rows = con.execute(sql, (experiment,)).fetchall()
            break
        except sqlite3.OperationalError:  # the schema is being written by the grid
            time.sleep(0.2)
    return [dict(zip(("run_id", "run_status", "key", "status", "error"), r)) for r in rows]


def child_count(db: Path, run_id: str) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=20)) as con:
        return con.execute(
            "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?", (run_id,)
        ).fetchone()[0]


def finished_metrics(db: Path, experiment: str) -> dict[str, dict[str, float]]:
    """{cell key: {metric: value}} of the finished parent runs."""
    out = {}
    with contextlib.closing(sqlite3.connect(db, timeout=20)) as con:
        for r in parent_runs(db, experiment):
            if r["status"] == "finished":
                rows = con.execute(
                    "SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (r["run_id"],)
                ).fetchall()
                out[r["key"]] = dict(rows)
    return out


@pytest.fixture(scope="module")
def schema_db(mlflow_template) -> Path:
    """conftest's MLflow SQLite file with the schema (created once per session)."""
    return mlflow_template


def fresh_db(schema_db: Path, folder: Path) -> tuple[Path, str]:
    path = folder / "mlflow.db"
    shutil.copy(schema_db, path)
    return path, f"sqlite:///{path}"


# --- grid files --------------------------------------------------------------------------
BAD = [
    (
        {"archs": ["msdnet", "resnet"]},
        ["unknown architecture 'resnet'", "msdnet, ofa_mobilenet_v3, saliency_vgg, sdn, slimmable"],
    ),
    ({"methods": ["joint", "kd"]}, ["unknown method 'kd'", "independent, ipkd"]),
    ({"datasets": ["cifar11"]}, ["unknown dataset 'cifar11'", "cifar10, cifar100"]),
    ({"archs": []}, ["archs is empty"]),
    ({"methods": None}, ["methods is missing"]),
    ({"archs": "msdnet"}, ["archs must be a list"]),
    ({"seeds": ["a"]}, ["seeds[0] must be an integer >= 0, got 'a'"]),
    ({"seeds": [0, 1, 0]}, ["duplicate seeds: 0"]),
    ({"archs": ["msdnet", "msdnet"]}, ["duplicate archs: msdnet"]),
    ({"profile": "huge"}, ["profile 'huge'", "paper, mini, smoke"]),
    ({"name": "my grid"}, ["name must be"]),
    ({"epochs": 3}, ["unknown key(s) epochs", "name, description, profile"]),
    (
        {"archs": ["msdnet"], "per_arch": {"slimmable_mobilenet_v1": {"arch.width_mult": 0.5}}},
        ["per_arch: 'slimmable_mobilenet_v1' is not in this grid's archs (msdnet)"],
    ),
    ({"per_method": {"joint": {"method.T": 2}}}, ["per_method.joint: method.T applies to none"]),
    ({"set": {"method.T": 2}, "methods": ["joint"]}, ["set: method.T applies to none"]),
    ({"set": {"trian.epochs": 2}}, ["unknown settings section 'trian'", "arch, method, train"]),
    ({"set": {"train.epochs": 0}}, ["train.epochs must be an integer >= 1"]),
    ({"set": {"train.epocs": 2}}, ["unknown train setting(s) epocs", "batch_size"]),
    ({"set": {"train": 3}}, ["train must be a mapping"]),
    ({"per_method": {"ipkd": {"method.a": 2}}}, ["a must be in [0, 1], got 2"]),
    ({"exclude": [{"arch": "resnet"}]}, ["exclude[0]: arch 'resnet' is not in this grid's archs"]),
    ({"exclude": [{"method": ["joint", "ipkd"]}]}, ["exclude removes every cell"]),
    ({"per_cell": [{"method": "ipkd"}]}, ["per_cell[0]: missing `set:`"]),
    ({"per_cell": [{"set": {"method.T": 2}}]}, ["per_cell[0]: give at least one of arch"]),
    ({"method_params": {"from_study": "nope.yaml"}}, ["from_study file", "does not exist"]),
    ({"method_params": "from_study"}, ["from_study needs the study's best-params file"]),
    ({"datasets": ["imagefolder:missing.zip"]}, ["imagefolder path", "does not exist"]),
    (
        {"methods": ["joint", "hsd"]},
        [
            "cell msdnet/synthetic/hsd/seed 0: method hsd needs saliency-ranked channels",
            "use saliency_vgg",
            "exclude: [{arch: msdnet, method: hsd}]",
        ],
    ),
]


@pytest.mark.parametrize("changes,needles", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_grid_files_fail_before_training(tmp_path, changes, needles):
    path = write_grid(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        load_grid(path)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_bad_grid_file_cli_exit_code(tmp_path):
    path = write_grid(tmp_path, archs=["resnet"])
    db = tmp_path / "never.db"
    rc, out, err = run_cli("grid", "run", str(path), "--tracking-uri", f"sqlite:///{db}")
    assert rc == 2
    assert "unknown architecture 'resnet'" in err and "msdnet" in err
    assert not db.exists()  # nothing was created: validation comes first


def test_scopes_precedence_and_from_study(tmp_path):
    best = tmp_path / "study" / "best.yaml"
    best.parent.mkdir()
    best.write_text(
        yaml.safe_dump(
            {
                "study": {"msdnet/synthetic/ipkd": {"name": "s1", "best_value": 50.0}},
                "msdnet/synthetic/ipkd": {"T": 4.0, "a": 0.25},
                "slimmable_mobilenet_v1/synthetic/ipkd": {"T": 2.0, "a": 0.75},
            }
        )
    )
    path = write_grid(
        tmp_path,
        set={"method.a": 0.5, "train.epochs": 2},
        per_arch={"msdnet": {"arch": {"n_blocks": 2}}},
        per_method={"ipkd": {"method.T": 3}},
        method_params={"from_study": "study/best.yaml"},  # relative to the grid file
        per_cell=[{"arch": "msdnet", "method": "ipkd", "set": {"method.T": 5}}],
        exclude=[{"arch": "slimmable_mobilenet_v1", "method": "joint"}],
    )
    spec = load_grid(path, {"train.lr": 0.01})
    cells = {(c.arch, c.method): c for c in spec.cells}
    assert set(cells) == {
        ("msdnet", "joint"),
        ("msdnet", "ipkd"),
        ("slimmable_mobilenet_v1", "ipkd"),
    }
    assert spec.excluded == 1
    assert cells[("msdnet", "joint")].cfg["method"] == {"name": "joint"}  # T/a skipped: no params
    assert cells[("msdnet", "ipkd")].cfg["method"] == {
        "name": "ipkd",
        "T": 5.0,
        "a": 0.25,
        "divergence": "kl",
    }
    assert cells[("slimmable_mobilenet_v1", "ipkd")].cfg["method"]["T"] == 2.0
    assert cells[("msdnet", "joint")].cfg["arch"]["n_blocks"] == 2
    assert cells[("slimmable_mobilenet_v1", "ipkd")].cfg["train"]["epochs"] == 2
    assert all(c.cfg["train"]["lr"] == 0.01 for c in spec.cells)
    # keys are stable across loads and follow the settings
    again = {c.key for c in load_grid(path, {"train.lr": 0.01}).cells}
    assert again == {c.key for c in spec.cells}
    assert {c.key for c in load_grid(path, {"train.lr": 0.02}).cells}.isdisjoint(again)
    # a study file without the cell asked for fails, naming the missing cells
    best.write_text(yaml.safe_dump({"msdnet/synthetic/ipkd": {"T": 4.0}}))
    with pytest.raises(
        ConfigError, match="no best params for slimmable_mobilenet_v1/synthetic/ipkd"
    ):
        load_grid(path)


def test_relative_dataset_path_resolves_against_grid_file(tmp_path, monkeypatch):
    image_folder(tmp_path / "data" / "tiny")
    grids = tmp_path / "grids"
    grids.mkdir()
    path = write_grid(grids, datasets=["imagefolder:../data/tiny"], set={"data.val_size": 2})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_grid(path)
    want = f"imagefolder:{(tmp_path / 'data' / 'tiny').resolve()}"
    assert {c.cfg["data"]["name"] for c in spec.cells} == {want}
    assert spec.cells[0].label.startswith("msdnet/imagefolder:tiny/")
    # paths from the command line are the shell's: relative to the current directory
    rc, out, _ = run_cli(
        "grid",
        "plan",
        str(path),
        "--set",
        "runtime.workdir=runs",
        "--tracking-uri",
        "sqlite:///x.db",
    )
    assert rc == 0 and str(elsewhere / "runs") in out
    # a study run from another folder wrote another relative path to the same data file: its
    # entry still applies (matched by file name when the grid's own spelling is absent)
    best = grids / "best.yaml"
    best.write_text(yaml.safe_dump({"msdnet/imagefolder:data/tiny/ipkd": {"T": 7.0, "a": 0.1}}))
    tuned = write_grid(
        grids,
        "tuned.yaml",
        archs=["msdnet"],
        methods=["ipkd"],
        datasets=["imagefolder:../data/tiny"],
        set={"data.val_size": 2},
        method_params={"from_study": "best.yaml"},
    )
    (cell,) = load_grid(tuned).cells
    assert (cell.cfg["method"]["T"], cell.cfg["method"]["a"]) == (7.0, 0.1)


def incompatible_pairs() -> set[tuple[str, str]]:
    """(arch, method) pairs whose method's check_model refuses the architecture."""
    pairs = set()
    for arch in ARCHS.names():
        for method in METHODS.names():
            try:
                resolve(arch, "synthetic", method, 0, "smoke")
            except IncompatibleError:
                pairs.add((arch, method))
    return pairs


@pytest.mark.parametrize(
    ("name", "cells", "pairs"),
    [
        ("flex_vit_mini.yaml", 8, {("flex_vit", m) for m in ("joint", "ipkd_ta", "sandwich")}
         | {("slimmable_mobilenet_v1", "joint")}),
        ("supernet_mini.yaml", 12, {("us_mobilenet_v1", m) for m in (
            "attentive", "bignas", "ieb", "mutualnet", "sandwich", "joint")}),
        ("ofa_mini.yaml", 2, {("ofa_mobilenet_v3", "ofa_ps")}),
    ],
)  # fmt: skip
def test_the_docs_measurement_grids_plan_their_cells(name, cells, pairs, tmp_path):
    """The grids behind architectures.md's flex_vit numbers and methods.md's supernet numbers
    (issues 24, 25): mini, 2 seeds, real data; planned here on synthetic data (no file needed)."""
    raw = yaml.safe_load((REPO / "benchmark" / "configs" / name).read_text())
    assert raw["profile"] == "mini" and raw["seeds"] == [0, 1]
    assert raw["datasets"] == ["imagefolder:../../../shared/data/cifar10-jpeg.zip"]
    raw["datasets"] = ["synthetic"]
    (tmp_path / name).write_text(yaml.safe_dump(raw))
    spec = load_grid(tmp_path / name)
    assert len(spec.cells) == cells and {(c.arch, c.method) for c in spec.cells} == pairs


def test_shipped_configs_are_valid():
    from benchmark.grid.spec import estimate

    smoke = load_grid(REPO / "benchmark" / "configs" / "smoke.yaml")
    # every arch x every method, minus the pairs a method cannot train (hsd needs re-rankable
    # channels), which are listed
    bad = incompatible_pairs()
    assert ("msdnet", "hsd") in bad and ("saliency_vgg", "hsd") not in bad
    assert len(smoke.cells) == len(ARCHS.names()) * len(METHODS.names()) - len(bad)
    assert smoke.excluded == len(bad) and smoke.profile == "smoke"
    assert {(a, m) for a, m, _ in smoke.incompatible} == bad
    assert {(c.arch, c.method) for c in smoke.cells} == {
        (a, m) for a in ARCHS.names() for m in METHODS.names()
    } - bad
    (imta,) = [c for c in smoke.cells if c.method == "imta"]  # GE + ISC turned on by imta
    assert imta.arch == "msdnet" and imta.cfg["arch"]["ge"] and imta.cfg["arch"]["isc"]
    # boosted turns on GE alone (BoostNet trains MSDNet with IMTA's gradient equilibrium)
    (boosted,) = [c for c in smoke.cells if c.method == "boosted" and c.arch == "msdnet"]
    assert boosted.cfg["arch"]["ge"] and not boosted.cfg["arch"]["isc"]
    ge = {c.method for c in smoke.cells if c.cfg["arch"].get("ge")}
    assert ge == {"imta", "boosted"}, ge
    estimate(smoke)
    assert all(c.total_epochs >= 2 and c.gflops > 0 for c in smoke.cells)
    mini = REPO / "benchmark" / "configs" / "mini.yaml"
    zip_path = REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"
    if zip_path.exists():
        assert load_grid(mini).cells[0].cfg["data"]["name"] == f"imagefolder:{zip_path.resolve()}"
    paper = yaml.safe_load((REPO / "benchmark" / "configs" / "paper.yaml").read_text())
    assert paper["archs"] == "all" and paper["methods"] == "all"
    assert (len(paper["datasets"]), len(paper["seeds"])) == (2, 3)
    with pytest.raises(ConfigError, match="cifar10 not found"):  # no CIFAR files here
        load_grid(REPO / "benchmark" / "configs" / "paper.yaml", {"data.root": "/nonexistent"})


def test_results_grids_default_and_tuned(tmp_path):
    """docs/results' two grids: one experiment; the default one holds the paper's methods and
    the standard ones where they apply (36 cells), the tuned one takes ipkd/ipkd_ta's study
    parameters, and reports name those cells apart from the defaults."""
    from benchmark.methods import method_label

    configs = REPO / "benchmark" / "configs"
    raw = yaml.safe_load((configs / "results.yaml").read_text())
    tuned = yaml.safe_load((configs / "results_tuned.yaml").read_text())
    assert raw["name"] == tuned["name"] == "results" and raw["datasets"] == tuned["datasets"]
    assert raw["profile"] == tuned["profile"] == "mini" and raw["seeds"] == [0, 1, 2]
    raw["datasets"] = tuned["datasets"] = ["synthetic"]  # no data file needed to plan
    (tmp_path / "results.yaml").write_text(yaml.safe_dump(raw))
    spec = load_grid(tmp_path / "results.yaml")
    pairs = {(c.arch, c.method) for c in spec.cells}
    assert len(spec.cells) == 36 and len(pairs) == 12
    assert {m for a, m in pairs if a == "msdnet"} == {"joint", "ipkd", "ipkd_ta", "imta", "byot"}
    assert {m for a, m in pairs if a == "us_mobilenet_v1"} == {
        "joint",
        "ipkd",
        "ipkd_ta",
        "sandwich",
    }
    assert {m for a, m in pairs if a == "slimmable_mobilenet_v1"} == {"joint", "ipkd", "ipkd_ta"}
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"msdnet/synthetic/ipkd": {"T": 2.5, "a": 0.3},
                                    "msdnet/synthetic/ipkd_ta": {"T": 6.0, "a": 0.5}}))  # fmt: skip
    tuned["method_params"] = {"from_study": str(best)}
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(tuned))
    cells = load_grid(tmp_path / "tuned.yaml").cells
    assert len(cells) == 6
    labels = {method_label(c.method, c.cfg["method"]) for c in cells}
    assert labels == {"ipkd (T=2.5, a=0.3)", "ipkd_ta (T=6, a=0.5)"}
    # the report's label from MLflow params (strings, any order) is the plan's
    assert (
        method_label("ipkd", {"a": "0.3", "divergence": "kl", "T": "2.5"}) == "ipkd (T=2.5, a=0.3)"
    )
    assert not {c.key for c in cells} & {c.key for c in spec.cells}


# The axes the shipped grids listed by hand before `all` (plus us_mobilenet_v1 and sandwich,
# added since): the same cells must come out.
EXPLICIT = {
    "archs": ["msdnet", "slimmable_mobilenet_v1", "ddnn_resnet", "switchable_precision_resnet"]
    + ["saliency_vgg", "us_mobilenet_v1"],
    "methods": ["independent", "joint", "ipkd", "ipkd_ta", "takd", "ekd", "multi_teacher", "hsd"]
    + ["sandwich"],
    "exclude": [
        {
            "method": "hsd",
            "arch": ["msdnet", "slimmable_mobilenet_v1", "ddnn_resnet"]
            + ["switchable_precision_resnet", "us_mobilenet_v1"],
        },
        {
            "method": "sandwich",
            "arch": ["msdnet", "slimmable_mobilenet_v1", "ddnn_resnet"]
            + ["switchable_precision_resnet", "saliency_vgg"],
        },
    ],
}


@pytest.mark.parametrize("name", ["smoke", "mini", "paper"])
def test_shipped_all_grids_keep_the_cells_of_the_hand_written_lists(name, tmp_path):
    """Every cell the grid files listed by hand before `all` comes out of `all` with the same
    key and label (results already in a store stay found); on top, `all` holds exactly the
    registered arch x method pairs that can train. On synthetic data, so that mini and paper
    load without their data files; the keys still cover each grid's profile and settings."""
    raw = yaml.safe_load((REPO / "benchmark" / "configs" / f"{name}.yaml").read_text())
    assert raw["archs"] == "all" and raw["methods"] == "all" and "exclude" not in raw
    raw["datasets"], raw["seeds"] = ["synthetic"], raw["seeds"][:1]  # seeds only multiply
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "explicit.yaml").write_text(yaml.safe_dump({**raw, **EXPLICIT}))
    spec = load_grid(tmp_path / "all.yaml")
    got = {c.key: c.label for c in spec.cells}
    want = {c.key: c.label for c in load_grid(tmp_path / "explicit.yaml").cells}
    assert {k: got.get(k) for k in want} == want
    bad = incompatible_pairs()
    assert {(c.arch, c.method) for c in spec.cells} == {
        (a, m) for a in ARCHS.names() for m in METHODS.names()
    } - bad
    assert spec.excluded == len(bad)


def test_all_leaves_out_incompatible_pairs_and_plan_lists_them(tmp_path):
    path = write_grid(tmp_path, archs=["msdnet", "saliency_vgg"], methods="all")
    spec = load_grid(path)
    bad = {(a, m) for a, m in incompatible_pairs() if a in ("msdnet", "saliency_vgg")}
    assert ("msdnet", "hsd") in bad and ("saliency_vgg", "hsd") not in bad
    assert {(c.arch, c.method) for c in spec.cells} == {
        (a, m) for a in ("msdnet", "saliency_vgg") for m in METHODS.names()
    } - bad
    assert {(a, m) for a, m, _ in spec.incompatible} == bad
    rc, out, err = run_cli(
        "grid", "plan", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/x.db"
    )
    assert rc == 0, out + err
    assert "left out (the method cannot train the architecture):" in out
    assert "hsd x msdnet: method hsd needs saliency-ranked channels" in out
    # explicit lists keep failing on the pair, naming the exclude entry that skips it
    with pytest.raises(ConfigError, match=r"exclude: \[\{arch: msdnet, method: hsd\}\]"):
        load_grid(write_grid(tmp_path, archs=["msdnet"], methods=["joint", "hsd"]))
    with pytest.raises(ConfigError, match="methods must be a list or all"):
        load_grid(write_grid(tmp_path, methods="every"))


# --- real runs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_run(schema_db, tmp_path_factory):
    """The tiny grid with 4 local workers at once: 4 concurrent MLflow writers on SQLite."""
    folder = tmp_path_factory.mktemp("local")
    db, uri = fresh_db(schema_db, folder)
    args = ["--tracking-uri", uri, "--set", f"runtime.workdir={folder / 'runs'}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # MLflow puts artifacts under ./mlruns of the process creating the run
        first = run_cli("grid", "run", str(TINY), "--workers", "4", *args)
        second = run_cli("grid", "run", str(TINY), "--workers", "4", *args)
        status = run_cli("grid", "status", str(TINY), *args)
    return {
        "db": db,
        "workdir": folder / "runs",
        "first": first,
        "second": second,
        "status": status,
    }


def test_local_run_then_rerun_skips_everything(local_run):
    db = local_run["db"]
    rc, out, err = local_run["first"]
    assert rc == 0, out + err
    assert "4 worker process(es)" in out and "4/4 cells finished" in out
    runs = parent_runs(db, "tiny")
    assert len(runs) == 4 and len({r["key"] for r in runs}) == 4  # one parent run per cell
    assert all(r["status"] == "finished" and r["run_status"] == "FINISHED" for r in runs)
    for r in runs:  # nothing lost by the concurrent writers: every sub-model's child run
        assert child_count(db, r["run_id"]) in (3, 4)  # msdnet: 3 exits, slimmable: 4 widths
    metrics = finished_metrics(db, "tiny")
    assert all("test/top1_mean" in m and "val/top1_mean" in m for m in metrics.values())
    rc, out, err = local_run["second"]
    assert rc == 0, out + err
    assert "nothing to train: all 4 cells already finished" in out
    assert parent_runs(db, "tiny") == runs
    rc, out, _ = local_run["status"]
    assert rc == 0 and out.count(" finished ") == 4 and "4 finished" in out


def test_grid_run_records_its_plan_for_the_report(local_run):
    """`grid run` writes the plan; the report expects exactly those cells (none missing)."""
    from mlflow.tracking import MlflowClient

    from reports.load import load_experiment, load_plan

    db = local_run["db"]
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    plan = load_plan(client, client.get_experiment_by_name("tiny").experiment_id)
    assert plan["grid"] == "tiny" and plan["excluded"] == 0 and len(plan["cells"]) == 4
    assert {c["key"] for c in plan["cells"]} == {r["key"] for r in parent_runs(db, "tiny")}
    assert {(c["arch"], c["method"]) for c in plan["cells"]} == {
        (a, m) for a in ("msdnet", "slimmable_mobilenet_v1") for m in ("joint", "ipkd")
    }
    cells = load_experiment("tiny", uri).cells
    assert len(cells) == 4 and cells["planned"].all() and (cells["status"] == "finished").all()


def test_only_runs_a_slice_and_the_plan_stays_whole(schema_db, tmp_path, monkeypatch):
    """`--only` trains the matching cells alone; the recorded plan keeps every cell, so the
    report counts the others as missing; a bad `--only` fails before the store is touched."""
    from reports.load import load_experiment

    db, uri = fresh_db(schema_db, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["--tracking-uri", uri, "--set", f"runtime.workdir={tmp_path / 'runs'}"]
    bad_uri = f"sqlite:///{tmp_path / 'untouched.db'}"
    for only, needle in [
        ("arch=resnet", "its arch values: msdnet, slimmable_mobilenet_v1"),
        ("width=1", "AXIS one of arch, dataset, method, seed; got 'width=1'"),
        ("seed=3", "no cell of grid tiny has seed '3'"),
        ("arch=msdnet --only arch=slimmable_mobilenet_v1", "matches all of them"),
    ]:
        onlys = [a for part in only.split(" --only ") for a in ("--only", part)]
        rc, out, err = run_cli("grid", "run", str(TINY), *onlys, "--tracking-uri", bad_uri)
        assert rc == 2 and needle in err, out + err
    assert not (tmp_path / "untouched.db").exists()

    rc, out, err = run_cli(
        "grid", "run", str(TINY), "--only", "arch=msdnet", "--only", "method=ipkd,joint", *args
    )
    assert rc == 0, out + err
    assert "--only arch=msdnet method=ipkd,joint: 2 of the cells" in out
    assert "2/2 cells finished" in out
    runs = parent_runs(db, "tiny")
    assert len(runs) == 2 and all(r["status"] == "finished" for r in runs)
    cells = load_experiment("tiny", uri).cells
    assert len(cells) == 4 and cells["planned"].all()
    by_arch = cells.groupby("arch")["status"].agg(set).to_dict()
    assert by_arch == {"msdnet": {"finished"}, "slimmable_mobilenet_v1": {"missing"}}
    rc, out, _ = run_cli("grid", "plan", str(TINY), "--only", "arch=slimmable_mobilenet_v1", *args)
    assert rc == 0 and out.count(" new ") == 2 and "msdnet/" not in out


def test_finished_grid_is_skipped_without_torch_and_the_store_decides(
    schema_db, tmp_path, monkeypatch
):
    """A second `grid run` of a finished grid reads the cell keys from the cache and their
    status from the SQLite store: it imports neither torch nor MLflow. A cell whose run was
    deleted in the store is not taken as finished: the full path runs and retrains it."""
    from mlflow.tracking import MlflowClient

    db, uri = fresh_db(schema_db, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["grid", "run", str(TINY), "--only", "method=joint", "--tracking-uri", uri]
    args += ["--set", f"runtime.workdir={tmp_path / 'runs'}"]
    rc, out, err = run_cli(*args)
    assert rc == 0 and "2/2 cells finished" in out, out + err
    probe = (
        "import sys\nfrom benchmark.cli import main\n"
        f"rc = main({args!r})\n"
        "assert rc == 0, rc\n"
        "print('heavy:', sorted(m for m in ('torch', 'mlflow') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing to train: all 2 cells already finished in experiment tiny" in done.stdout
    assert "heavy: []" in done.stdout
    (gone, kept) = parent_runs(db, "tiny")
    MlflowClient(uri).delete_run(gone["run_id"])
    rc, out, err = run_cli(*args)
    assert rc == 0 and "this run trained 1" in out, out + err
    assert {r["key"] for r in parent_runs(db, "tiny")} == {gone["key"], kept["key"]}


def test_a_grid_whose_data_moved_skips_its_finished_cells(schema_db, tmp_path, monkeypatch):
    """A grid worker decodes a cold image folder with a process pool of its own (it is no daemon).
    Cell keys know an image folder by its images' names and sizes, not its path: after the
    folder (and the grid file beside it) moved, the grid finds its cell finished. An image
    rewritten in place changes the key; the fast skip, whose cache holds the old key, sees it
    (its data stamp) and leaves the decision to the full run, which plans the cell anew."""
    from benchmark.grid import fastskip

    db, uri = fresh_db(schema_db, tmp_path)
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "old" / "data" / "tiny")  # decoded by the grid worker's own pool
    sets = {**yaml.safe_load(TINY.read_text())["set"], "train.batch_size": 2}
    sets["data"] = {"train_subset": None, "val_size": 2, "test_subset": None}
    grid = {"archs": ["msdnet"], "methods": ["joint"], "datasets": ["imagefolder:data/tiny"]}
    write_grid(tmp_path / "old", **grid, set=sets)
    args = ["--tracking-uri", uri, "--set", f"runtime.workdir={tmp_path / 'runs'}"]
    rc, out, err = run_cli("grid", "run", str(tmp_path / "old" / "g.yaml"), *args)
    assert rc == 0 and "1/1 cells finished" in out, out + err
    (tmp_path / "old").rename(tmp_path / "new")
    path = tmp_path / "new" / "g.yaml"
    rc, out, err = run_cli("grid", "run", str(path), *args)
    assert rc == 0 and "nothing to train: all 1 cells already finished" in out, out + err
    cache = fastskip.fingerprint(path, {"sets": args[3:], "data_root": None}, [], uri)
    assert fastskip.all_finished(cache, uri) == ("tiny", 1)
    image = tmp_path / "new" / "data" / "tiny" / "train" / "a" / "0.png"
    image.write_bytes(image.read_bytes() + b"\0")  # another size: other data, another key
    assert fastskip.all_finished(cache, uri) is None
    rc, out, err = run_cli("grid", "plan", str(path), *args)
    assert rc == 0 and " new " in out, out + err


def test_a_study_trial_with_a_cells_key_is_not_a_finished_cell(schema_db, tmp_path, monkeypatch):
    """An Optuna trial logged into the grid's experiment has the key of the cell its parameters
    make, but was evaluated on the validation split only: the grid still trains that cell."""
    from mlflow.tracking import MlflowClient

    db, uri = fresh_db(schema_db, tmp_path)
    monkeypatch.chdir(tmp_path)
    cell = load_grid(TINY).cells[0]
    client = MlflowClient(uri)
    exp = client.create_experiment("tiny")
    tags = {"flexbench.cell": cell.key, "flexbench.status": "finished"}
    trial = client.create_run(exp, tags={**tags, "flexbench.test_evaluated": "false"})
    client.set_terminated(trial.info.run_id, "FINISHED")
    rc, out, err = run_cli("grid", "plan", str(TINY), "--tracking-uri", uri)
    assert rc == 0, out + err
    (row,) = [line for line in out.splitlines() if line.startswith(cell.key)]
    assert " pending " in row and " new " in row, row
    done = client.create_run(exp, tags={**tags, "flexbench.test_evaluated": "true"})
    client.set_terminated(done.info.run_id, "FINISHED")
    rc, out, _ = run_cli("grid", "plan", str(TINY), "--tracking-uri", uri)
    (row,) = [line for line in out.splitlines() if line.startswith(cell.key)]
    assert " finished " in row and " skip " in row, row


def _worker_logs(workdir: Path) -> dict[Path, str]:
    logs = workdir / "tiny" / "logs"
    return {p: p.read_text() for p in sorted(logs.glob("worker-*.log"))} if logs.exists() else {}


def _group_gone(pgid: int, timeout: float, leader=None) -> bool:
    """True once no process of the group is left (`leader`: our child, reaped meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()  # a dead, unreaped child would still count as a group member
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _wait(cond, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"grid exited (rc {proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_worker_death_and_sigkill_then_resume(schema_db, tmp_path, monkeypatch):
    """A worker SIGKILLed mid-cell: its cell is recorded failed and the grid goes on. Then the
    grid process itself is SIGKILLed: its workers die with it, and the rerun trains no
    finished cell again, resumes the interrupted one from its checkpoint (same MLflow run) and
    reruns the failed one only with --rerun-failed."""
    import torch

    monkeypatch.chdir(tmp_path)
    db, uri = fresh_db(schema_db, tmp_path)
    workdir = tmp_path / "runs"
    args = ["--tracking-uri", uri, "--set", f"runtime.workdir={workdir}", "--set", "train.epochs=4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmark.cli", "grid", "run", str(TINY), "--workers", "2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        # 1. kill the first worker that starts a cell
        def started():
            for text in _worker_logs(workdir).values():
                pid = re.findall(r"^worker \d+ pid (\d+)", text, re.M)
                cell = re.findall(r"^=== .* \((\w{12})\), new ===$", text, re.M)
                if pid and cell:
                    return int(pid[-1]), cell[-1]
            return None

        pid, killed_key = _wait(started, 240, "a worker to start a cell", proc)
        os.kill(pid, signal.SIGKILL)
        _wait(
            lambda: any(
                r["key"] == killed_key and r["status"] == "failed" for r in parent_runs(db, "tiny")
            ),
            60,
            "the dead worker's cell to be recorded failed",
            proc,
        )

        # 2. kill the grid once a cell finished and another one has a checkpoint
        def mid_way():
            runs = parent_runs(db, "tiny")
            done = {r["key"] for r in runs if r["status"] == "finished"}
            ckpt = [
                p.parent.name
                for p in workdir.glob("tiny/*/checkpoint.pt")
                if p.parent.name not in done and p.parent.name != killed_key
            ]
            return done and ckpt

        _wait(mid_way, 240, "a finished cell and a checkpoint of another", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert _group_gone(proc.pid, 30), "worker processes outlived the grid process"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)

    before = parent_runs(db, "tiny")
    finished = {r["key"]: r["run_id"] for r in before if r["status"] == "finished"}
    interrupted = {
        p.parent.name: torch.load(p, weights_only=True)["run_id"]
        for p in workdir.glob("tiny/*/checkpoint.pt")
        if p.parent.name not in finished and p.parent.name != killed_key
    }
    assert finished and interrupted
    failed = [r for r in before if r["key"] == killed_key]
    assert [r["status"] for r in failed] == ["failed"]
    assert "worker process died (killed by SIGKILL)" in failed[0]["error"]

    # the plan: failed cells are skipped unless --rerun-failed, interrupted ones resume
    rc, out, _ = run_cli("grid", "plan", str(TINY), *args)
    assert rc == 0
    lines = {
        line.split()[0]: line
        for line in out.splitlines()
        if line[:12] in finished.keys() | interrupted.keys() | {killed_key}
    }
    assert "skip-failed" in lines[killed_key]
    assert all(" resume " in lines[k] for k in interrupted)
    assert all(" skip " in lines[k] for k in finished)

    rc, out, err = run_cli("grid", "run", str(TINY), "--workers", "2", "--rerun-failed", *args)
    assert rc == 0, out + err
    after = parent_runs(db, "tiny")
    for key, run_id in finished.items():  # not retrained: still exactly the same single run
        assert [r["run_id"] for r in after if r["key"] == key] == [run_id]
    for key, run_id in interrupted.items():  # resumed: the same MLflow run, now finished
        mine = [r for r in after if r["key"] == key and r["status"] == "finished"]
        assert [r["run_id"] for r in mine] == [run_id]
    assert f"({len(interrupted)} resumed)" in out
    statuses = sorted(r["status"] for r in after if r["key"] == killed_key)
    assert statuses == ["failed", "finished"]  # the failed attempt stays on record
    for key in {r["key"] for r in after}:
        assert sum(r["key"] == key and r["status"] == "finished" for r in after) == 1
    assert len({r["key"] for r in after}) == 4
    logs = "".join(_worker_logs(workdir).values())
    for key in interrupted:
        assert f"resuming cell {key}" in logs


# --- Ray -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A real local Ray cluster on 127.0.0.1 (2 CPUs), stopped at the end: `ray start --block`
    runs in its own process group; SIGTERM makes it stop what it started, and whatever is left
    of that group is killed. (`ray stop` would stop every Ray cluster of the machine.)"""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    ray_bin = Path(sys.executable).parent / "ray"
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="fbray")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(port), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard",
        "false", "--object-store-memory", "100000000", "--temp-dir", temp,
        "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp) / "ray-start.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start failed: " + (Path(temp) / "ray-start.log").read_text())
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()  # `ray start --block` drains (up to 30 s) and stops its processes
        if not _group_gone(proc.pid, 8, proc):  # a throwaway cluster need not drain
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _group_gone(proc.pid, 10, proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_matches_local(ray_cluster, local_run, schema_db, tmp_path, monkeypatch):
    """Same grid on a fresh store, reusing the local run's workdir: its checkpoints belong to
    runs this store does not have, so every cell starts from scratch (not resumed)."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.chdir(tmp_path)
    db, uri = fresh_db(schema_db, tmp_path)
    args = ["--tracking-uri", uri, "--set", f"runtime.workdir={local_run['workdir']}"]
    rc, out, err = run_cli(
        "grid", "run", str(TINY), "--executor", "ray", "--ray-address", ray_cluster, *args
    )
    assert rc == 0, out + err
    assert "ray executor: cluster" in out and "4/4 cells finished" in out
    assert "4 cell(s) have a checkpoint whose MLflow run is not in this store" in out
    assert "trained 4 (0 resumed)" in out
    runs = parent_runs(db, "tiny")
    assert len(runs) == 4 and all(r["status"] == "finished" for r in runs)
    ray_metrics = finished_metrics(db, "tiny")
    local_metrics = finished_metrics(local_run["db"], "tiny")
    assert ray_metrics.keys() == local_metrics.keys()  # the same cells (keys)
    for key, m in ray_metrics.items():  # the same results: one thread per cell in both
        for name, value in m.items():
            if name.startswith(("test/top1", "test/top5", "val/top1", "mflops/", "params_m/")):
                assert value == pytest.approx(local_metrics[key][name], abs=1e-6), (key, name)
