"""Optuna studies: search spaces, a 2-worker study on one SQLite storage and its resumption,
the test split never read, the MLflow parent/child record, best-params export used to train a
cell, plots, a killed worker's trial failed and retried, and two workers on PostgreSQL.

Real Optuna and MLflow throughout; trials are smoke cells on synthetic data (conftest.FAST).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import FAST, all_runs, image_folder
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from benchmark import cli
from benchmark.errors import ConfigError
from benchmark.methods import METHODS
from studies import export
from studies.run import RunOptions, run_study
from studies.space import Dim, declared_space, resolve_space

ARCH, DATASET = "slimmable_mobilenet_v1", "synthetic"
SETS = [f"--set={k}={v}" for k, v in FAST.items()]
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


# --- search spaces --------------------------------------------------------------------------
def test_every_method_with_parameters_has_a_search_space():
    for name in METHODS.names():
        specs = METHODS.get(name).PARAMS
        params = {  # searched, and active at the defaults (alpha_minus only with alpha)
            k
            for k, spec in specs.items()
            if spec.searched
            and (spec.active_if is None or specs[spec.active_if[0]].default == spec.active_if[1])
        }
        if not params:
            with pytest.raises(ConfigError, match="nothing to search"):
                resolve_space(name)
            continue
        space = resolve_space(name)
        assert set(space) == set(params), name
        assert space == declared_space(name)


T_RANGE, A_RANGE = Dim(1.0, 10.0, log=True), Dim(0.0, 1.0)
SHIPPED_SPACES = {  # the ranges studies searched when they lived in studies/space.py
    "joint": {},
    "independent": {},
    "ipkd": {"T": T_RANGE, "a": A_RANGE},
    "ipkd_ta": {"T": T_RANGE, "a": A_RANGE},
    "takd": {"T": T_RANGE, "a": A_RANGE},
    "ekd": {"T": T_RANGE, "b": Dim(0.0, 2.0), "g": Dim(1.0, 1000.0, log=True)},
    "multi_teacher": {"T": T_RANGE, "b": Dim(0.0, 2.0)},
    "hsd": {"T": T_RANGE, "a": A_RANGE},
}


@pytest.mark.parametrize("name", sorted(SHIPPED_SPACES))
def test_methods_declare_the_same_ranges_as_before(name):
    """Moving the ranges beside the parameters changed no study's space."""
    assert declared_space(name) == SHIPPED_SPACES[name]


def test_a_searched_parameter_must_declare_its_range():
    from benchmark.methods.base import ParamSpec

    with pytest.raises(ValueError, match="declare its search range"):
        ParamSpec(1.0, lambda v: v > 0, "T must be > 0")
    with pytest.raises(ValueError, match="leaves the valid values: a must be in"):
        ParamSpec(0.5, lambda v: 0 <= v <= 1, "a must be in [0, 1]", Dim(0.0, 2.0))
    assert not ParamSpec(8, lambda v: v >= 1, "n must be >= 1", searched=False).searched


def test_schedule_settings_are_kept_not_searched():
    """hsd's re-ranking schedule is not a loss weight: a study keeps its value, and asking to
    search it says how to set it instead."""
    assert set(resolve_space("hsd")) == {"T", "a"}
    with pytest.raises(
        ConfigError, match="schedule setting of method hsd.*--set method.rerank_every"
    ):
        resolve_space("hsd", items=["rerank_every=1:3"])


def test_divergence_parameters_are_searched_only_with_the_alpha_divergence():
    """alpha- and alpha+ have an effect only with divergence=alpha: a study of ipkd searches
    them only when it fixes that divergence; sandwich's n is searched as a whole number."""
    import optuna

    from studies.space import suggest

    assert set(resolve_space("ipkd")) == {"T", "a"}
    space = resolve_space("ipkd", fixed={"divergence": "alpha"})
    assert space["alpha_minus"] == Dim(-2.0, 0.0) and space["alpha_plus"] == Dim(0.25, 2.0)
    assert "alpha_clip" not in space
    with pytest.raises(ConfigError, match="alpha_minus has an effect only with divergence=alpha"):
        resolve_space("ipkd", items=["alpha_minus=-1:0"])
    sandwich = resolve_space("sandwich")
    assert sandwich["n"] == Dim(2.0, 6.0, integer=True)
    assert resolve_space("sandwich", items=["n=2:8"])["n"] == Dim(2.0, 8.0, integer=True)
    trial = optuna.trial.FixedTrial({"n": 3, "T": 2.0, "a": 0.5})
    assert suggest(trial, sandwich) == {"n": 3.0, "T": 2.0, "a": 0.5}


def test_space_defaults_and_overrides(tmp_path):
    assert resolve_space("ipkd") == {"T": Dim(1.0, 10.0, log=True), "a": Dim(0.0, 1.0)}
    assert resolve_space("takd", items=["T=2:20:log"])["T"] == Dim(2.0, 20.0, log=True)
    flat = tmp_path / "flat.yaml"
    flat.write_text("T: {low: 1, high: 4, log: true}\na: [0.2, 0.8]\n")
    assert resolve_space("ipkd", str(flat)) == {"T": Dim(1, 4, True), "a": Dim(0.2, 0.8)}
    per_method = tmp_path / "per_method.yaml"
    per_method.write_text("ipkd_ta: {a: '0.5:1'}\nipkd: {a: '0:0.1'}\n")
    space = resolve_space("ipkd_ta", str(per_method), items=["T=1:3"])
    assert space == {"T": Dim(1, 3), "a": Dim(0.5, 1)}
    # a parameter fixed with --set method.a=... leaves the space
    assert set(resolve_space("ipkd", fixed={"a": 0.5})) == {"T"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"items": ["seed=0:10"]}, "seed is a grid axis"),
        ({"items": ["train.lr=0.01:0.1"]}, "only method parameters"),
        ({"items": ["b=0:1"]}, "no parameter 'b'"),
        ({"items": ["a=0:2"]}, "a must be in"),
        ({"items": ["T=0:5:log"]}, "log range needs low > 0"),
        ({"items": ["T=5:1"]}, "low must be < high"),
        ({"items": ["T"]}, "NAME=LOW:HIGH"),
        ({"items": ["a=0:1"], "fixed": {"a": 0.5}}, "both fixed"),
        ({"fixed": {"T": 2.0, "a": 0.5}}, "every parameter is fixed"),
    ],
)
def test_space_rejects_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_space("ipkd", **kwargs)


# --- a real study: 2 workers, one SQLite storage, MLflow parent + children ------------------
@pytest.fixture(scope="module")
def env(mlflow_template, tmp_path_factory):
    """One MLflow store and one Optuna storage for the module; cwd is the module's folder."""
    root = tmp_path_factory.mktemp("studies")
    shutil.copy(mlflow_template, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("FLEXBENCH_STUDY_STORAGE", raising=False)
        yield {
            "root": root,
            "uri": f"sqlite:///{root / 'mlflow.db'}",
            "storage": f"sqlite:///{root / 'studies.db'}",
        }


def _load(env, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=env["storage"])


def _cli(env, *args: str) -> int:
    tracking = ["--tracking-uri", env["uri"]] if args[0] != "best" else []
    return cli.main(["study", *args, "--storage", env["storage"], *tracking])


def _trial_runs(client: MlflowClient, parent: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(
        exps, filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000
    )


@pytest.fixture(scope="module")
def smoke_study(env):
    """The done-criterion study: 8 trials, 2 worker processes, one SQLite storage."""
    rc = _cli(
        env, "run", "--arch", ARCH, "--dataset", DATASET, "--method", "ipkd", "--profile",
        "smoke", "--study-name", "smoke", "--trials", "8", "--workers", "2",
        "--sampler-seed", "0", *SETS,
    )  # fmt: skip
    assert rc == 0
    return _load(env, "smoke")


def test_two_workers_finish_every_trial_and_log_parent_and_children(env, smoke_study):
    trials = smoke_study.trials
    assert sorted(t.number for t in trials) == list(range(8))
    assert all(t.state in DONE for t in trials), [t.state for t in trials]
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
    assert all(set(t.params) == {"T", "a"} for t in trials)

    client = MlflowClient(env["uri"])
    parent_id = smoke_study.user_attrs["mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["flexbench.kind"] == "study"
    assert parent.data.tags["flexbench.status"] == "finished"
    assert parent.data.params["space.T"] == "log-uniform[1, 10]"
    assert parent.data.params["seed"] == "0"
    children = {int(r.data.tags["flexbench.trial"]): r for r in _trial_runs(client, parent_id)}
    assert sorted(children) == list(range(8))
    for t in trials:
        run = children[t.number]
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}[t.state]
        assert run.data.tags["flexbench.trial_state"] == state
        assert run.data.tags["flexbench.study"] == "smoke"
        assert run.data.tags["flexbench.test_evaluated"] == "false"
        assert run.info.run_name == f"trial-{t.number}"
        assert float(run.data.params["method.T"]) == pytest.approx(t.params["T"])
        assert float(run.data.params["method.a"]) == pytest.approx(t.params["a"])
        assert not [k for k in run.data.metrics if k.startswith("test/")]
        curve = client.get_metric_history(run.info.run_id, "study/objective")
        assert [m.step for m in curve] == sorted(t.intermediate_values)
        assert [m.value for m in curve] == pytest.approx(
            [t.intermediate_values[s] for s in sorted(t.intermediate_values)]
        )
        if t.state == TrialState.COMPLETE:
            assert run.data.metrics["study/value"] == pytest.approx(t.value)
            assert run.data.metrics["val/top1_mean"] == pytest.approx(t.value)  # objective mean


def test_rerun_continues_the_study(env, smoke_study, capsys):
    before = len(smoke_study.trials)
    # only the name: everything else is stored in the study
    assert (
        _cli(env, "run", "--study-name", "smoke", "--trials", "1", "--set=runtime.threads=1") == 0
    )
    study = _load(env, "smoke")
    assert len(study.trials) == before + 1
    assert all(t.state in DONE for t in study.trials)
    assert study.user_attrs["mlflow_run_id"] == smoke_study.user_attrs["mlflow_run_id"]
    client = MlflowClient(env["uri"])
    studies = [r for r in all_runs(client) if r.data.tags.get("flexbench.kind") == "study"]
    assert len([r for r in studies if r.data.tags["flexbench.study"] == "smoke"]) == 1
    assert len(_trial_runs(client, study.user_attrs["mlflow_run_id"])) == before + 1
    # the same --sampler-seed again: new proposals, not a repeat of the first run's
    first = [t.params for t in _load(env, "smoke").trials]
    rc = _cli(env, "run", "--study-name", "smoke", "--trials", "1", "--sampler-seed", "0")
    assert rc == 0
    (new,) = [t.params for t in _load(env, "smoke").trials][len(first) :]
    assert new not in first
    before += 1
    # --until N: trials up to N in all, so the same command rerun adds nothing (one trial
    # trained, then none: the rerun and a smaller N)
    for until, total in ((before + 1, before + 1), (before + 1, before + 1), (3, before + 1)):
        assert _cli(env, "run", "--study-name", "smoke", "--until", str(until)) == 0
        assert len(_load(env, "smoke").trials) == total, until
    # the same name with different settings is refused, naming the conflict
    capsys.readouterr()
    rc = _cli(env, "run", "--study-name", "smoke", "--method", "ipkd_ta", "--trials", "1")
    assert rc == 2
    assert "method='ipkd'" in capsys.readouterr().err
    assert len(_load(env, "smoke").trials) == before + 1
    with pytest.raises(SystemExit):  # one of --trials / --until, not both
        _cli(env, "run", "--study-name", "smoke", "--trials", "1", "--until", "9")


def test_a_rerun_with_another_sampler_or_pruner_is_refused(env, smoke_study, capsys):
    """The study's trials were proposed by its sampler and judged by its pruner: a rerun that
    names others is refused before any trial, and the study keeps its record."""
    before = len(_load(env, "smoke").trials)
    for flag, value, stored in (("--sampler", "random", "tpe"), ("--pruner", "none", "median")):
        capsys.readouterr()
        assert _cli(env, "run", "--study-name", "smoke", "--trials", "1", flag, value) == 2
        assert f"{flag} {stored} (given {value})" in capsys.readouterr().err
        study = _load(env, "smoke")
        assert study.user_attrs[flag[2:]] == stored and len(study.trials) == before


def test_a_study_continues_after_its_image_folder_moved(env, capsys):
    """An image folder is known by its images (names and sizes), not its path: moved, the study
    says how to continue, takes the new path and keeps it; other images are refused."""
    old = image_folder(env["root"] / "moving" / "old" / "pets")
    sets = {**FAST, "data.train_subset": "null", "data.test_subset": "null"}
    sets.update({"data.val_size": 2, "train.batch_size": 2})
    run = [
        "run",
        "--study-name",
        "moved",
        "--trials",
        "1",
        *(f"--set={k}={v}" for k, v in sets.items()),
    ]
    make = ["--arch", ARCH, "--method", "ipkd", "--dataset", f"imagefolder:{old}"]
    assert _cli(env, *run, *make) == 0
    new = old.rename(env["root"] / "moving" / "pets")
    capsys.readouterr()
    assert _cli(env, *run) == 2
    assert "no longer exists: pass --dataset imagefolder:<its new place>" in capsys.readouterr().err
    assert _cli(env, *run, "--dataset", f"imagefolder:{new}") == 0
    study = _load(env, "moved")
    assert len(study.trials) == 2
    assert study.user_attrs["flexbench"]["dataset"] == f"imagefolder:{new}"
    (new / "train" / "a" / "3.png").write_bytes((new / "train" / "a" / "0.png").read_bytes())
    capsys.readouterr()
    assert _cli(env, *run) == 2
    assert "other images than the study's trials trained on" in capsys.readouterr().err
    assert len(_load(env, "moved").trials) == 2


def test_bad_input_fails_before_any_trial(env, capsys):
    cases = [
        (["--arch", ARCH, "--method", "joint"], "nothing to search"),
        (["--arch", ARCH, "--method", "ipkd", "--space", "seed=0:9"], "seed is a grid axis"),
        (["--arch", "nope", "--method", "ipkd"], "valid architectures"),
        (["--method", "ipkd"], "--arch"),
        (["--arch", ARCH, "--method", "ipkd", "--set", "train.epochs=0"], "train.epochs"),
    ]
    for args, match in cases:
        capsys.readouterr()
        rc = _cli(env, "run", "--dataset", DATASET, "--trials", "1", "--study-name", "bad", *args)
        assert rc == 2, args
        assert match in capsys.readouterr().err, args
    assert "bad" not in optuna.get_all_study_names(env["storage"])


# --- the test split is never read -----------------------------------------------------------
def test_a_study_never_reads_the_test_split(env, monkeypatch):
    """Every read of the test split goes through Splits.test(); record and refuse all of them,
    and record every train_cell call the study makes."""
    from conftest import smoke_cfg

    from benchmark.data.base import Splits
    from benchmark.training import train
    from benchmark.training.train import CellOptions, train_cell

    reads = []

    def spy_test(self):
        reads.append(self.sealed)
        raise AssertionError("the test split was read")

    calls = []

    def spy_train_cell(cfg, opts):
        calls.append(opts.evaluate_test)
        return train_cell(cfg, opts)

    monkeypatch.setattr(Splits, "test", spy_test)
    monkeypatch.setattr(train, "train_cell", spy_train_cell)
    opts = RunOptions(
        trials=2, study_name="sealed", storage=env["storage"], arch=ARCH, dataset=DATASET,
        method="takd", sets=dict(FAST), tracking_uri=env["uri"], pruner="none",
    )  # fmt: skip
    summary = run_study(opts)
    assert summary.counts["complete"] == 2
    assert calls == [False, False]
    assert reads == []
    # the probe is live: an ordinary cell (final test evaluation) does read it
    cfg = smoke_cfg(ARCH, "joint", env["root"] / "probe")
    with pytest.raises(AssertionError, match="test split was read"):
        train_cell(cfg, CellOptions(tracking_uri=env["uri"], restart=True, progress=False))
    assert len(reads) == 1


def test_a_trial_that_produces_test_metrics_fails(env, monkeypatch):
    """Defence in depth: even a trainer that ignored evaluate_test=False cannot feed a test
    number into a study."""
    from benchmark.training import train
    from benchmark.training.train import CellResult

    def leaky_train_cell(cfg, *args, **kwargs):
        return CellResult("k", "r", [], {"test/top1/w1.0": 50.0, "val/top1_mean": 50.0})

    monkeypatch.setattr(train, "train_cell", leaky_train_cell)
    opts = RunOptions(
        trials=1, study_name="leak", storage=env["storage"], arch=ARCH, dataset=DATASET,
        method="ipkd", sets=dict(FAST), tracking_uri=env["uri"],
    )  # fmt: skip
    with pytest.raises(Exception, match="test metrics"):
        run_study(opts)
    assert [t.state for t in _load(env, "leak").trials] == [TrialState.FAIL]


# --- export -> training with the tuned parameters; plots -----------------------------------
def test_export_best_params_and_a_grid_trains_with_them(env, smoke_study):
    out = env["root"] / "best.yaml"
    out.write_text("study: {other/x/ipkd: {name: x}}\nother/x/ipkd: {T: 2.0, a: 0.1}\n")
    assert _cli(env, "best", "--study-name", "smoke", "--export", str(out)) == 0
    doc = yaml.safe_load(out.read_text())
    key = f"{ARCH}/{DATASET}/ipkd"
    best = _load(env, "smoke").best_trial
    assert {k: doc[key][k] for k in best.params} == pytest.approx(best.params)
    assert set(doc[key]) - set(best.params) == {"divergence"}  # the study's fixed option
    assert doc["other/x/ipkd"] == {"T": 2.0, "a": 0.1}  # merged, not overwritten
    meta = doc["study"][key]
    assert meta["name"] == "smoke" and meta["best_trial"] == best.number
    assert meta["objective"] == "mean" and meta["tuning_seed"] == 0
    assert "password" not in out.read_text()

    params = export.load_best(out, ARCH, DATASET, "ipkd")
    assert params == pytest.approx({**best.params, "divergence": "kl"})
    with pytest.raises(ConfigError, match="holds: other/x/ipkd"):
        export.load_best(out, ARCH, DATASET, "takd")

    # a grid reads the file with `method_params: from_study` and trains the cell with it
    grid = env["root"] / "grid" / "tuned.yaml"
    grid.parent.mkdir()
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "tuned",
                "profile": "smoke",
                "archs": [ARCH],
                "datasets": [DATASET],
                "methods": ["ipkd"],
                "seeds": [1],
                "set": dict(FAST),
                "method_params": {"from_study": "../best.yaml"},  # relative to the grid file
            }
        )
    )
    rc = cli.main(["grid", "run", str(grid), "--tracking-uri", env["uri"], "--workers", "1"])
    assert rc == 0
    client = MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("tuned")
    runs = client.search_runs([exp.experiment_id], "tags.`flexbench.cell` != ''")
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert run.data.tags["flexbench.status"] == "finished"
    assert run.data.tags["flexbench.test_evaluated"] == "true"  # the grid evaluates on test
    assert float(run.data.params["method.T"]) == pytest.approx(params["T"])
    assert float(run.data.params["method.a"]) == pytest.approx(params["a"])


def test_exported_integer_parameters_are_written_as_integers(tmp_path):
    """sandwich's n (a whole number) is `n: 4` in the export, not 4.0; the grid reads it back
    as the number it trained with."""
    study = optuna.create_study(direction="maximize")
    spec = {"arch": ARCH, "dataset": DATASET, "method": "sandwich", "profile": "smoke",
            "seed": 0, "objective": "mean", "sets": {}, "space": {}}  # fmt: skip
    study.set_user_attr("flexbench", spec)
    dist = {"n": optuna.distributions.IntDistribution(2, 6)}
    study.add_trial(optuna.trial.create_trial(params={"n": 4}, distributions=dist, value=50.0))
    out = tmp_path / "best.yaml"
    key, params = export.export(study, out, "memory")
    text = out.read_text()
    assert "\n  n: 4\n" in text and "4.0" not in text and params["n"] == 4
    assert export.load_best(out, ARCH, DATASET, "sandwich")["n"] == 4.0


def test_bn_recalibration_batches_are_tuned_beside_the_method_and_reach_the_grid(env, capsys):
    """`--space train.bn_calib_batches=...` searches the universally slimmable network's BN
    recalibration batches (whole numbers) beside sandwich's parameters; the export keeps the
    setting's full name and a grid's from_study applies it as a training setting. Other
    training settings stay refused, naming the searchable ones."""
    base = ["run", "--arch", "us_mobilenet_v1", "--dataset", DATASET, "--method", "sandwich"]
    base += ["--profile", "smoke", *SETS]
    for space, needle in [
        ("train.lr=0.01:0.1", "training settings: train.bn_calib_batches"),
        ("train.bn_calib_batches=0:3", "train.bn_calib_batches must be an integer >= 1"),
        (
            "train.bn_calib_batches=1:1000",
            "exceeds the 4 training batches of 32 images; valid: 1..4",
        ),
    ]:
        capsys.readouterr()
        rc = _cli(env, *base, "--study-name", "bad-bn", "--trials", "1", "--space", space)
        assert rc == 2 and needle in capsys.readouterr().err, space
    assert "bad-bn" not in optuna.get_all_study_names(env["storage"])  # refused before creation
    rc = _cli(
        env, *base, "--study-name", "bn", "--trials", "2", "--pruner", "none",
        "--space", "train.bn_calib_batches=1:3", "--set", "method.n=2", "--sampler-seed", "0",
    )  # fmt: skip
    assert rc == 0
    study = _load(env, "bn")
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        assert t.params["train.bn_calib_batches"] in (1, 2, 3)
        assert set(t.params) == {"T", "a", "train.bn_calib_batches"}
    out = env["root"] / "bn.yaml"
    assert _cli(env, "best", "--study-name", "bn", "--export", str(out)) == 0
    entry = yaml.safe_load(out.read_text())[f"us_mobilenet_v1/{DATASET}/sandwich"]
    assert entry["train.bn_calib_batches"] == study.best_params["train.bn_calib_batches"]
    assert entry["n"] == 2 and isinstance(entry["train.bn_calib_batches"], int)
    grid = env["root"] / "bn-grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "bn",
                "profile": "smoke",
                "archs": ["us_mobilenet_v1"],
                "datasets": [DATASET],
                "methods": ["sandwich"],
                "seeds": [0],
                "set": dict(FAST),
                "method_params": {"from_study": str(out)},
            }  # fmt: skip
        )
    )
    from benchmark.grid.spec import load_grid

    (cell,) = load_grid(grid).cells
    assert cell.cfg["train"]["bn_calib_batches"] == entry["train.bn_calib_batches"]
    assert cell.cfg["method"]["n"] == 2 and cell.cfg["method"]["T"] == entry["T"]


def test_plots_are_saved_and_logged_to_the_study_run(env, smoke_study):
    out = env["root"] / "plots"
    assert _cli(env, "plots", "--study-name", "smoke", "--out", str(out)) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert {"history.png", "contour.png", "intermediate_values.png"} <= set(files)
    client = MlflowClient(env["uri"])
    logged = client.list_artifacts(smoke_study.user_attrs["mlflow_run_id"], "plots")
    assert sorted(Path(a.path).name for a in logged) == files


# --- a worker killed mid-trial ---------------------------------------------------------------
def test_killed_worker_trial_is_failed_and_retried(env):
    """SIGKILL a worker mid-trial: its heartbeat stops, the next run fails the trial and retries
    the same parameters; the dead trial's MLflow run is closed as failed."""
    args = [
        sys.executable, "-m", "benchmark.cli", "study", "run", "--arch", ARCH, "--dataset",
        DATASET, "--method", "ipkd", "--study-name", "killed", "--trials", "1",
        "--heartbeat", "1", "--storage", env["storage"], "--tracking-uri", env["uri"],
        *SETS, "--set=train.epochs=12",
    ]  # fmt: skip
    optuna.storages.RDBStorage(env["storage"])  # the schema exists before the worker starts
    proc = subprocess.Popen(args, cwd=env["root"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.3)
            if "killed" in optuna.get_all_study_names(env["storage"]):
                trials = _load(env, "killed").trials
                if trials and trials[0].intermediate_values:
                    break
            assert proc.poll() is None, "the worker ended before it could be killed"
        else:
            pytest.fail("no trial reported an epoch within 120 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    (t0,) = _load(env, "killed").trials
    assert t0.state == TrialState.RUNNING  # what a dead worker leaves behind
    time.sleep(2.5)  # > grace period (2 heartbeats)
    summary = run_study(
        RunOptions(trials=1, study_name="killed", storage=env["storage"], heartbeat=1,
                   tracking_uri=env["uri"], sets={"runtime.threads": 1})
    )  # fmt: skip
    first, retry = _load(env, "killed").trials
    assert first.state == TrialState.FAIL
    assert retry.state == TrialState.COMPLETE
    assert retry.params == first.params
    assert retry.system_attrs["failed_trial"] == 0
    assert summary.new_trials == 1
    client = MlflowClient(env["uri"])
    runs = {
        int(r.data.tags["flexbench.trial"]): r for r in _trial_runs(client, summary.mlflow_run_id)
    }
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["flexbench.trial_state"] == "failed"
    assert runs[1].data.tags["flexbench.retry_of"] == "0"
    assert runs[1].data.tags["flexbench.trial_state"] == "complete"


# --- PostgreSQL: two workers share one study ------------------------------------------------
def _pg_bindir():
    try:
        from mlflow_server.postgres import find_bindir
    except ImportError:
        return None
    return find_bindir()


@pytest.mark.skipif(
    _pg_bindir() is None,
    reason="PostgreSQL binaries (initdb) not found; scripts/install_system_deps.sh installs them",
)
def test_two_workers_share_a_study_on_postgresql(env):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg[binary] is missing")
    from mlflow_server.postgres import LocalPostgres

    with LocalPostgres() as pg:
        url = pg.create_database("optuna", user="bench", password="bench-pw-123")
        summary = run_study(
            RunOptions(
                trials=2, workers=2, study_name="pg", storage=url, arch=ARCH, dataset=DATASET,
                method="ipkd_ta", sets=dict(FAST), tracking_uri=env["uri"], pruner="none",
            )
        )  # fmt: skip
        study = optuna.load_study(study_name="pg", storage=url)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        assert len({t.user_attrs["worker"] for t in study.trials}) == 2
        assert "bench-pw-123" not in summary.storage
        parent = MlflowClient(env["uri"]).get_run(summary.mlflow_run_id)
        assert "bench-pw-123" not in str(parent.data.tags) + str(parent.data.params)
