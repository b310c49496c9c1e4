"""`flexbench report` on a real MLflow store (SQLite) holding known metric values.

The store is built once per session with MlflowClient, following the MLflow schema of the
trainer (parent run per cell with `test/top1/<sub>` etc., one child run per sub-model); one cell
is written with the trainer's own `benchmark.record.tracking.CellRun`, so a change of the writer
that the reader does not follow shows up here. Expected numbers are computed by hand in the
comments.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from benchmark.errors import ConfigError
from benchmark.record import tracking

SUBS = ["exit1", "exit2", "exit3"]
MFLOPS = [1.0, 2.0, 4.0]
ARCH, DATASET, PROFILE = "msdnet", "synthetic", "smoke"
# top-1 per (method, seed), sub-models smallest first
TOP1 = {
    ("joint", 0): [50, 60, 70],
    ("joint", 1): [52, 61, 73],
    ("joint", 2): [48, 62, 70],
    ("ipkd", 0): [53, 62, 72],
    ("ipkd", 1): [55, 64, 75],
    ("ipkd", 2): [52, 63, 73],
    ("ipkd_ta", 0): [54, 63, 70],
}
T_975_2 = 4.302652729749462  # Student t quantile, 97.5%, 2 degrees of freedom (from a table)


def _tags(method, seed, arch=ARCH, **extra):
    return {
        "flexbench.cell": f"{method}-{seed}",
        "flexbench.arch": arch,
        "flexbench.dataset": DATASET,
        "flexbench.method": method,
        "flexbench.seed": str(seed),
        "flexbench.profile": PROFILE,
        **extra,
    }


def _finished_cell(
    client, exp_id, method, seed, top1, epochs=3, arch=ARCH, subs=SUBS, mflops=MFLOPS, gbitops=None
):
    """A finished cell as the trainer logs it; without `gbitops`, as runs before the bit-ops
    column were logged (no `gbitops/<sub>`, no cost-axis tag, no `test/top1_auc`)."""
    tags = _tags(method, seed, arch, **{"flexbench.status": "running"})
    run = client.create_run(exp_id, run_name=f"{method}-s{seed}", tags=tags)
    rid = run.info.run_id
    ts = int(time.time() * 1000)
    metrics = []
    for ep in range(epochs):  # per-epoch curves: val rises by 5 per epoch, loss falls
        metrics += [
            Metric("train/loss", 3.0 - ep, ts, ep),
            Metric("val/top1_mean", 40.0 + 5 * ep + seed, ts, ep),
        ]
        # per sub-model: 40 + epoch + 10 x sub-model index + 2 x seed
        metrics += [
            Metric(f"val/top1/{s}", 40.0 + ep + 10 * i + 2 * seed, ts, ep)
            for i, s in enumerate(subs)
        ]
    if arch == ARCH:  # early exits: budgeted-batch points (step = exit distribution)
        for q in range(4):
            metrics += [
                Metric("budgeted/top1", 50.0 + 5 * q + seed, ts, q),
                Metric("budgeted/mflops", 1.0 + q + 0.1 * seed, ts, q),
                Metric("budgeted/q", (q + 1) / 20, ts, q),
            ]
    client.log_batch(rid, metrics=metrics, params=[Param("method.name", method)])
    final = []
    for i, (s, a, f) in enumerate(zip(subs, top1, mflops)):
        child = client.create_run(
            exp_id,
            run_name=f"{method}-s{seed}-{s}",
            tags={
                **_tags(method, seed, arch),
                "mlflow.parentRunId": rid,
                "flexbench.submodel": s,
                "flexbench.submodel_index": str(i),
            },
        )
        vals = {
            "top1": a,
            "top5": 99.0,
            "mmacs": f / 2,
            "mflops": f,
            "params_m": 0.01 * (i + 1),
            "latency_ms": 1.0 + i,
        }
        if gbitops is not None:
            vals["gbitops"] = gbitops[i]
            final.append(Metric(f"gbitops/{s}", gbitops[i], ts, epochs))
        client.log_batch(child.info.run_id, metrics=[Metric(k, v, ts, 0) for k, v in vals.items()])
        client.set_terminated(child.info.run_id, "FINISHED")
        final += [
            Metric(f"test/top1/{s}", a, ts, epochs),
            Metric(f"test/top1_bestval/{s}", a - 1, ts, epochs),  # the best-val epoch's
            Metric(f"test/top5/{s}", 99.0, ts, epochs),
            Metric(f"mmacs/{s}", f / 2, ts, epochs),
            Metric(f"mflops/{s}", f, ts, epochs),
            Metric(f"params_m/{s}", 0.01 * (i + 1), ts, epochs),
            Metric(f"latency_ms/{s}", 1.0 + i, ts, epochs),
        ]
    final.append(Metric("test/top1_mean", sum(top1) / len(top1), ts, epochs))
    if arch == ARCH:  # the area under the early-exit curve: 58 + seed (+1 for ipkd)
        ee_auc = 58.0 + seed + (method == "ipkd")
        final.append(Metric("test/budgeted_auc", ee_auc, ts, epochs))
    tags = [RunTag("flexbench.status", "finished")]
    if gbitops is not None:  # the trainer's own rule and AUC (benchmark/costs/axis.py)
        from benchmark.costs.axis import auc_top1, cost_axis

        axis = cost_axis(mflops, gbitops)
        auc = auc_top1({"mflops": mflops, "gbitops": gbitops}[axis], top1)
        final.append(Metric("test/top1_auc", auc, ts, epochs))
        tags.append(RunTag("flexbench.cost_axis", axis))
    client.log_batch(rid, metrics=final, tags=tags)
    client.set_terminated(rid, "FINISHED")
    return rid


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """One SQLite MLflow store for the whole session (schema creation takes ~20 s)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    # "known": 3 methods x 3 seeds; ipkd_ta seed 1 failed, ipkd_ta seed 2 missing.
    exp = client.create_experiment("known")
    old = client.create_run(exp, tags=_tags("joint", 0, **{"flexbench.status": "failed"}))
    client.set_terminated(old.info.run_id, "FAILED")  # superseded by the finished run below
    for (method, seed), top1 in TOP1.items():
        _finished_cell(client, exp, method, seed, top1)
    failed = client.create_run(
        exp,
        tags=_tags(
            "ipkd_ta",
            1,
            **{"flexbench.status": "failed", "flexbench.error": "TrainingError: non-finite loss"},
        ),
    )
    client.set_terminated(failed.info.run_id, "FAILED")
    # Runs the report must ignore: a study trial (val only), a report run, a foreign run.
    trial = client.create_run(
        exp,
        tags=_tags(
            "ipkd", 7, **{"flexbench.status": "finished", "flexbench.test_evaluated": "false"}
        ),
    )
    client.log_batch(trial.info.run_id, metrics=[Metric("val/top1/exit1", 1.0, 0, 0)])
    client.create_run(exp, tags={"flexbench.kind": "report"})
    foreign = client.create_run(exp, run_name="someone-else")
    client.log_batch(foreign.info.run_id, metrics=[Metric("test/top1/exit1", 99.0, 0, 0)])
    # "single": one cell written by the trainer's own writer.
    cfg = {
        "arch": {"name": ARCH},
        "data": {"name": DATASET},
        "method": {"name": "joint"},
        "seed": 0,
        "profile": PROFILE,
    }
    cell = tracking.CellRun(uri, "single")
    cell.start(cfg, "k0", {"seed": "0"}, {})
    cell.log_metrics({"train/loss": 2.0, "val/top1_mean": 30.0}, 0)
    rows, final = [], {}
    for i, (s, a, f) in enumerate(zip(SUBS, [30.0, 40.0, 50.0], MFLOPS)):
        rows.append(
            {
                "index": i,
                "name": s,
                "top1": a,
                "top5": 90.0,
                "mmacs": f / 2,
                "mflops": f,
                "params_m": 0.1,
                "latency_ms": 1.0,
            }
        )
        final.update(
            {
                f"test/top1/{s}": a,
                f"test/top5/{s}": 90.0,
                f"mmacs/{s}": f / 2,
                f"mflops/{s}": f,
                f"params_m/{s}": 0.1,
                f"latency_ms/{s}": 1.0,
            }
        )
    cell.finish(final, rows, [], cfg, "k0", 1)
    # "empty": no run at all; "allfailed": one failed cell.
    client.create_experiment("empty")
    bad = client.create_experiment("allfailed")
    r = client.create_run(bad, tags=_tags("joint", 0, **{"flexbench.status": "failed"}))
    client.set_terminated(r.info.run_id, "FAILED")
    return uri


@pytest.fixture(scope="session")
def report(store, tmp_path_factory):
    from reports.build import ReportOptions, build_report

    refs = tmp_path_factory.mktemp("refs")
    (refs / "fake.yaml").write_text(
        "id: fake-paper\n"
        "citation: A. Author. A paper. 2099.\n"
        "source: Table 1 of the test fixture\n"
        "url: https://example.org/fake\n"
        "measured: test top-1 error (%) of exit3 and exit1\n"
        "value: top1_error\n"
        "cost: mflops\n"
        "flexbench: {arch: msdnet, dataset: 'synth*', method: ipkd}\n"
        "entries:\n"
        "  - {submodel: exit3, value: 30.0, cost: 4.0}\n"
        "  - {submodel: exit1, value: 50.0, cost: 1.0, method: ipkd_ta}\n"
        "  - {submodel: exit9, value: 10.0}\n"
    )
    (refs / "other.yaml").write_text(
        "id: other\ncitation: B. Author. Other. 2098.\nsource: README\n"
        "url: https://example.org/other\nmeasured: top-1 on ImageNet\nvalue: top1\n"
        "flexbench: null\nentries:\n  - {label: net, value: 70.0}\n"
    )
    out = tmp_path_factory.mktemp("report") / "out"
    t0 = time.process_time()
    r = build_report("known", store, ReportOptions(out=out, references_dir=refs))
    r.cpu_seconds = time.process_time() - t0  # CPU time: robust to other jobs on the machine
    return r


def _row(df, **keys):
    sel = df
    for k, v in keys.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (keys, sel)
    return sel.iloc[0]


def test_loads_cells_statuses_and_ignores_non_cells(report):
    exp = report.experiment
    cells = exp.cells.set_index(["method", "seed"])
    assert cells.loc[("joint", 0), "status"] == "finished"  # latest finished beats old failed
    assert cells.loc[("joint", 0), "superseded"] == 1
    assert cells.loc[("ipkd_ta", 1), "status"] == "failed"
    assert "non-finite" in cells.loc[("ipkd_ta", 1), "error"]
    assert cells.loc[("ipkd_ta", 2), "status"] == "missing"
    assert 7 not in set(exp.cells["seed"])  # the study trial is no cell and adds no seed
    assert len(exp.cells) == 9 and (exp.cells["status"] == "finished").sum() == 7
    assert len(exp.tidy) == 7 * 3
    assert exp.ignored["report and other non-cell flexbench runs"] == 1
    assert exp.ignored["runs without flexbench tags"] == 1
    assert exp.ignored["cells evaluated on the validation split only (study trials)"] == 1
    assert list(exp.tidy[exp.tidy["seed"] == 0]["submodel"].unique()) == SUBS
    assert report.baseline == "joint"
    assert report.order == ["joint", "ipkd", "ipkd_ta"]


def test_means_stds_and_cis_by_hand(report):
    s = report.summary
    r = _row(s, method="joint", key="exit1")  # 50, 52, 48
    assert r["n"] == 3 and r["mean"] == pytest.approx(50.0)
    assert r["std"] == pytest.approx(2.0)  # sqrt((0 + 4 + 4) / 2)
    assert r["ci95"] == pytest.approx(T_975_2 * 2.0 / math.sqrt(3))
    assert r["mflops"] == pytest.approx(1.0)
    r = _row(s, method="ipkd", key="exit1")  # 53, 55, 52: squares 1/9 + 25/9 + 16/9
    assert r["mean"] == pytest.approx(160 / 3)
    assert r["std"] == pytest.approx(math.sqrt(42 / 9 / 2))
    r = _row(s, method="ipkd_ta", key="exit1")  # a single seed
    assert r["n"] == 1 and r["mean"] == 54.0 and math.isnan(r["std"]) and math.isnan(r["ci95"])
    # per-cell summaries: joint means 60, 62, 60; AUC of seed 0 = (1*(50+60)/2 + 2*(60+70)/2)/3
    r = _row(s, method="joint", key="top-1 mean")
    assert r["mean"] == pytest.approx(182 / 3)
    assert r["std"] == pytest.approx(math.sqrt((4 / 9 + 16 / 9 + 4 / 9) / 2))
    auc = {0: (55 + 130) / 3, 1: (56.5 + 134) / 3, 2: (55 + 132) / 3}
    r = _row(s, method="joint", key="AUC")
    assert r["mean"] == pytest.approx(sum(auc.values()) / 3)
    sc = report.scores
    assert _row(sc, method="joint", seed=0, key="AUC")["value"] == pytest.approx(auc[0])
    # the early-exit curve's area is the cell's own test/budgeted_auc, summarised over seeds
    r = _row(s, method="ipkd", key="early-exit AUC")
    assert r["n"] == 3 and r["mean"] == pytest.approx(60.0) and r["std"] == pytest.approx(1.0)
    assert _row(sc, method="joint", seed=2, key="early-exit AUC")["value"] == 60.0


def test_tables_show_the_early_exit_area_with_its_paired_test(report):
    """The early-exit panel's table has the 'early-exit AUC' column, defined in its caption, and
    the paired test against the baseline (ipkd - joint = +1 at every seed)."""
    (t,) = [t for t in report.tables if t.panel[0] == ARCH]
    assert t.keys[-3:] == ["top-1 mean", "AUC", "early-exit AUC"]
    assert "'early-exit AUC' is the cell's test/budgeted_auc" in t.caption
    r = _row(report.pairs, method="ipkd", key="early-exit AUC")
    assert r["diff_mean"] == pytest.approx(1.0) and r["n"] == 3
    m = report.methods.set_index("method").loc["ipkd"]
    assert m["early-exit AUC"].startswith("60.00") and m["Δ early-exit AUC"].startswith("+1.00")


def test_paired_tests_by_hand(report):
    p = report.pairs
    # t-distribution with 2 dof: two-sided p = 1 - t / sqrt(2 + t^2)
    r = _row(p, method="ipkd", key="exit1")  # diffs 3, 3, 4: mean 10/3, sd sqrt(1/3), t = 10
    assert r["n"] == 3 and r["seeds"] == "0,1,2"
    assert r["diff_mean"] == pytest.approx(10 / 3)
    assert r["diff_std"] == pytest.approx(math.sqrt(1 / 3))
    assert r["diff_ci95"] == pytest.approx(T_975_2 * math.sqrt(1 / 3) / math.sqrt(3))
    assert r["t"] == pytest.approx(10.0)
    assert r["p"] == pytest.approx(1 - 10 / math.sqrt(102))  # 0.00985
    assert r["mark"] == "**"
    r = _row(p, method="ipkd", key="exit2")  # diffs 2, 3, 1: t = 2 / (1 / sqrt 3)
    assert r["t"] == pytest.approx(2 * math.sqrt(3))
    assert r["p"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14))  # 0.074
    assert r["mark"] == ""
    r = _row(p, method="ipkd", key="exit3")  # diffs 2, 2, 3: t = 7
    assert r["t"] == pytest.approx(7.0)
    assert r["p"] == pytest.approx(1 - 7 / math.sqrt(51))  # 0.0198
    assert r["mark"] == "*"
    assert math.isnan(r["wilcoxon_p"])  # fewer than 6 pairs
    r = _row(p, method="ipkd_ta", key="exit1")  # one pair: never a test, never a mark
    assert r["n"] == 1 and r["diff_mean"] == 4.0 and math.isnan(r["p"]) and r["mark"] == ""


def test_wilcoxon_and_degenerate_tests():
    from reports.stats import mark, paired_test

    res = paired_test([1, 2, 3, 4, 5, 6])  # all positive: exact two-sided p = 2 / 2^6
    assert res["wilcoxon_p"] == pytest.approx(2 / 64)
    assert paired_test([0.0, 0.0, 0.0])["p"] == 1.0
    assert math.isnan(paired_test([1.0, 1.0, 1.0])["t"])
    assert mark(0.001, 2) == "" and mark(0.001, 3) == "**" and mark(0.03, 3) == "*"


def test_result_table_files(report):
    out = report.out
    slug = "msdnet_synthetic_smoke"
    md = (out / "tables" / f"results_{slug}.md").read_text()
    assert "n = 1–3 seeds per method" in md
    assert "| ipkd | 3 | 53.33 ± 1.53\\*\\* |" in md  # mean ± std, paired-test mark
    assert "**54.00**" in md  # best exit1 mean (ipkd_ta, a single seed: no ±)
    assert "exit3 (4 MFLOPs)" in md
    tex = (out / "tables" / f"results_{slug}.tex").read_text()
    for token in (
        "\\toprule",
        "\\midrule",
        "\\bottomrule",
        "\\textbf{54.00}",
        "$^{**}$",
        "ipkd\\_ta",
        "53.33 $\\pm$ 1.53",
    ):
        assert token in tex, token
    csv = pd.read_csv(out / "tables" / f"results_{slug}.csv")
    r = _row(csv, method="ipkd", key="exit3")
    assert r["mean"] == pytest.approx(220 / 3) and r["mark"] == "*" and r["n"] == 3
    assert r["p_vs_baseline"] == pytest.approx(1 - 7 / math.sqrt(51))
    assert bool(_row(csv, method="ipkd", key="exit3")["best"])
    summary = pd.read_csv(out / "tables" / "summary.csv")
    assert _row(summary, method="joint", key="exit1")["std"] == pytest.approx(2.0)
    cells = pd.read_csv(out / "tables" / "cells.csv")
    assert set(cells["status"]) == {"finished", "failed", "missing"}


def test_figures_written_and_not_blank(report):
    files = [p for figs in report.figures.values() for f in figs for p in f.files]
    stems = {Path(f.stem).name for figs in report.figures.values() for f in figs}
    assert stems == {
        "acc_vs_mflops_msdnet_synthetic_smoke",
        "gain_msdnet_synthetic_smoke",
        "curves_msdnet_synthetic_smoke",
        "val_curves_msdnet_synthetic_smoke",
        "budgeted_msdnet_synthetic_smoke",
    }
    assert len(files) == 10
    for path in files:
        assert path.exists() and path.stat().st_size > 8_000, path
        if path.suffix == ".png":
            img = mpimg.imread(path)
            assert img.shape[0] > 300 and img.shape[1] > 500
            assert img.std() > 0.05  # not a blank canvas


def test_index_and_markdown(report):
    html = (report.out / "index.html").read_text()
    for text in (
        "flexbench report — known",
        "figures/acc_vs_mflops_msdnet_synthetic_smoke.png",
        "n = 1–3 seeds",
        "missing",
        "non-finite loss",
        "Published vs ours",
        "fake-paper",
    ):
        assert text in html, text
    md = (report.out / "report.md").read_text()
    assert "![Accuracy vs MFLOPs" in md and "| ipkd | 3 | 53.33 ± 1.53\\*\\* |" in md


def test_references_vs_ours(report):
    ref = report.ref_table
    r = _row(ref, submodel="exit3")  # published error 30 -> top-1 70; ours (72+75+73)/3
    assert r["published top-1"] == 70.0
    assert r["ours top-1"] == pytest.approx(220 / 3) and r["n"] == 3
    assert r["ours − published"] == pytest.approx(220 / 3 - 70)
    assert r["ours cost"] == pytest.approx(4.0) and r["cost unit"] == "MFLOPs"
    r = _row(ref, submodel="exit1")  # entry-level method override: ipkd_ta, one seed
    assert r["method"] == "ipkd_ta" and r["ours top-1"] == 54.0 and r["n"] == 1
    r = _row(ref, submodel="exit9")  # nothing of ours to compare with: shown as not run
    assert r["n"] == 0 and math.isnan(r["ours top-1"]) and math.isnan(r["ours − published"])
    assert "not run" in (report.out / "index.html").read_text()
    assert [x.id for x in report.ref_unrelated] == ["other"]


def test_shipped_references_have_sources(tmp_path):
    from reports.references import load_references

    refs = load_references()
    assert {r.id for r in refs} >= {"snets-mobilenet-v1-imagenet", "takd-resnet-cifar100"}
    for r in refs:
        assert r.url.startswith("https://") and r.citation and r.measured and r.source
    (tmp_path / "bad.yaml").write_text("id: x\ncitation: c\nvalue: top1\nentries: [{value: 1}]\n")
    with pytest.raises(ConfigError, match="source"):
        load_references(tmp_path)


def test_report_logged_to_mlflow_and_ignored_next_time(store, report, tmp_path):
    from reports.build import ReportOptions, build_report

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(report.run_id)
    assert run.data.tags["flexbench.kind"] == "report"
    names = {a.path for a in client.list_artifacts(report.run_id)}
    assert {"index.html", "report.md", "figures", "tables"} <= names
    again = build_report("known", store, ReportOptions(out=tmp_path / "again", log_to_mlflow=False))
    assert again.experiment.ignored["report and other non-cell flexbench runs"] == 2
    assert len(again.experiment.tidy) == 21


def test_report_is_fast(report):
    assert report.cpu_seconds < 30


def test_single_seed_written_by_the_trainer(store, tmp_path):
    from reports.build import ReportOptions, build_report

    r = build_report("single", store, ReportOptions(out=tmp_path, log_to_mlflow=False))
    assert list(r.experiment.tidy["top1"]) == [30.0, 40.0, 50.0]
    assert list(r.experiment.tidy["submodel_index"]) == [0, 1, 2]
    row = _row(r.summary, key="exit2")
    assert row["n"] == 1 and math.isnan(row["std"])
    assert r.pairs.empty  # nothing to pair with
    assert (tmp_path / "index.html").exists()
    assert any("single seed" in n for n in r.notes)


@pytest.mark.parametrize("name", ["empty", "allfailed"])
def test_nothing_finished_never_crashes(store, tmp_path, name):
    from reports.build import ReportOptions, build_report

    r = build_report(name, store, ReportOptions(out=tmp_path, log_to_mlflow=False))
    assert r.tables == [] and r.figures == {}
    html = (tmp_path / "index.html").read_text()
    assert "No finished cell" in html
    if name == "allfailed":
        assert "failed" in html


def test_unknown_experiment_lists_the_others(store, capsys):
    from benchmark.cli import main
    from reports.load import load_experiment

    with pytest.raises(ConfigError, match="known.*single|single.*known"):
        load_experiment("nope", store)
    assert main(["report", "--experiment", "nope", "--tracking-uri", store]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_cli_writes_requested_formats(store, tmp_path, capsys):
    from benchmark.cli import main

    out = tmp_path / "r"
    code = main(
        [
            "report",
            "--experiment",
            "known",
            "--tracking-uri",
            store,
            "--out",
            str(out),
            "--formats",
            "md,csv",
            "--baseline",
            "ipkd",
            "--no-log",
        ]
    )
    assert code == 0
    assert (out / "report.md").exists() and not (out / "index.html").exists()
    assert not list((out / "tables").glob("*.tex"))
    table = (out / "tables" / "results_msdnet_synthetic_smoke.md").read_text()
    assert "ipkd (baseline)" in table
    assert (
        main(
            [
                "report",
                "--experiment",
                "known",
                "--tracking-uri",
                store,
                "--baseline",
                "nope",
                "--no-log",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "baseline method 'nope'" in capsys.readouterr().err


def test_optuna_study_figures(tmp_path):
    import optuna

    from reports.optuna_plots import contour_params, study_figures

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="tiny", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0)
    )
    study.optimize(
        lambda t: (
            -((t.suggest_float("method.T", 1, 8) - 3) ** 2)
            - 10 * (t.suggest_float("method.a", 0, 1) - 0.5) ** 2
        ),
        n_trials=10,
    )
    assert contour_params(study) == ("method.T", "method.a")
    figs, skipped = study_figures(study, tmp_path)
    assert skipped == []
    assert {Path(f.stem).name for f in figs} == {
        "study_tiny_history",
        "study_tiny_importance",
        "study_tiny_contour",
    }
    for f in figs:
        for p in f.files:
            assert p.stat().st_size > 8_000, p
    empty = optuna.create_study(study_name="none")
    figs, skipped = study_figures(empty, tmp_path)
    assert figs == [] and "no finished trial" in skipped[0]


# ---- the cost axis per panel: bit-width sub-models share their MFLOPs ----------------------

BITS = ["b2", "b4", "b8", "b32"]
BIT_ARCH = "switchable_precision_resnet"
BIT_GBITOPS = [0.04, 0.16, 0.64, 10.24]  # 10 MMACs x bits x bits / 1000, MFLOPs 20 each
BIT_TOP1 = {
    ("joint", 0): [40, 60, 70, 72],
    ("joint", 1): [42, 62, 70, 74],
    ("ipkd", 0): [44, 63, 71, 72],
    ("ipkd", 1): [46, 63, 73, 74],
}
# MSDNet-like: MFLOPs differ; its GBitOps are deliberately not proportional to its MFLOPs, so
# that an AUC over the wrong axis would give another value.
MSD_GBITOPS = [0.5, 3.0, 4.0]
BIT_PANEL, MSD_PANEL = (BIT_ARCH, DATASET, PROFILE), (ARCH, DATASET, PROFILE)


@pytest.fixture(scope="session")
def mixed(store, tmp_path_factory):
    """Experiment "mixed": a bit-width panel and an MSDNet-like panel, both logging GBitOps."""
    from reports.build import ReportOptions, build_report

    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("mixed")
    for (method, seed), top1 in BIT_TOP1.items():
        _finished_cell(client, exp, method, seed, top1, 1, BIT_ARCH, BITS, [20.0] * 4, BIT_GBITOPS)
        _finished_cell(client, exp, method, seed, TOP1[(method, seed)], 1, gbitops=MSD_GBITOPS)
    out = tmp_path_factory.mktemp("mixed") / "out"
    return build_report("mixed", store, ReportOptions(out=out, log_to_mlflow=False))


def _panel(df, arch):
    return df[df["arch"] == arch]


def test_auc_over_the_panels_cost_axis_by_hand(mixed, report):
    from reports.load import CELL

    bit, msd = _panel(mixed.scores, BIT_ARCH), _panel(mixed.scores, ARCH)
    assert set(bit["cost_axis"]) == {"gbitops"} and set(msd["cost_axis"]) == {"mflops"}
    # joint seed 0 over GBitOps: (0.12 * 50 + 0.48 * 65 + 9.6 * 71) / 10.2 (over MFLOPs: 60.5)
    auc = _row(bit, method="joint", seed=0, key="AUC")["value"]
    assert auc == pytest.approx((0.12 * 50 + 0.48 * 65 + 9.6 * 71) / 10.2)
    # MSDNet joint seed 0 over MFLOPs as in "known" (over its GBitOps it would be 405 / 7)
    assert _row(msd, method="joint", seed=0, key="AUC")["value"] == pytest.approx(185 / 3)
    assert _row(_panel(mixed.summary, BIT_ARCH), method="ipkd", key="b8")["cost"] == 0.64
    # every cell's AUC is the one the trainer logged
    client = MlflowClient(tracking_uri=mixed.experiment.uri)
    aucs = mixed.scores[mixed.scores["key"] == "AUC"].merge(mixed.experiment.cells, on=CELL)
    assert len(aucs) == 8
    for r in aucs.itertuples():
        assert r.value == pytest.approx(client.get_run(r.run_id).data.metrics["test/top1_auc"])
    # runs logged before GBitOps existed keep MFLOPs
    assert set(report.summary["cost_axis"]) == {"mflops"}


def test_bitwidth_figures_draw_gbitops(mixed, monkeypatch, tmp_path):
    from reports import figures
    from reports.style import method_styles

    stems = {Path(f.stem).name for figs in mixed.figures.values() for f in figs}
    assert {
        "acc_vs_gbitops_" + "_".join(BIT_PANEL),
        "acc_vs_mflops_" + "_".join(MSD_PANEL),
    } <= stems
    drawn = []  # the axes of each figure, taken where it would be saved
    monkeypatch.setattr(figures, "save", lambda fig, out, stem: drawn.append(fig.axes[0]) or [])
    args = (mixed.order, method_styles(mixed.order), "joint", tmp_path)
    bit, msd = figures.PanelPlot(BIT_PANEL, *args), figures.PanelPlot(MSD_PANEL, *args)
    s, p = _panel(mixed.summary, BIT_ARCH), _panel(mixed.pairs, BIT_ARCH)
    f = figures.acc_vs_cost(s, bit)
    assert f.title.startswith("Accuracy vs GBitOps") and "GBitOps (billions" in f.caption
    figures.gain(p, s, bit)
    figures.acc_vs_cost(_panel(mixed.summary, ARCH), msd)
    acc, gain, msd = drawn
    assert acc.get_xlabel() == "GBitOps per image" and acc.get_xscale() == "log"
    for line in acc.get_lines()[:2]:  # one line per method, dodged sideways by < 2%
        assert list(line.get_xdata()) == pytest.approx(BIT_GBITOPS, rel=0.02)
    (top,) = acc.child_axes  # sub-model names sit exactly at their cost
    assert list(top.get_xticks()) == pytest.approx(BIT_GBITOPS)
    labels = [t.get_text() for t in gain.get_xticklabels()]
    assert labels[:2] == ["b2 0.04", "b4 0.16"] and "(GBitOps)" in gain.get_xlabel()
    assert msd.get_xlabel() == "MFLOPs per image (forward)"
    assert list(msd.get_lines()[0].get_xdata()) == pytest.approx(MFLOPS, rel=0.02)


def test_tables_name_each_panels_cost(mixed):
    folder = mixed.out / "tables"
    bit = "results_" + "_".join(BIT_PANEL)
    md = (folder / f"{bit}.md").read_text()
    assert "b2 (0.04 GBitOps)" in md and "b32 (10.2 GBitOps)" in md and " MFLOPs)" not in md
    assert "area under top-1 vs GBitOps divided by the GBitOps range" in md
    assert "0.04 GBitOps" in (folder / f"{bit}.tex").read_text()
    csv = pd.read_csv(folder / f"{bit}.csv")
    assert "mflops" not in csv and _row(csv, method="joint", key="b4")["gbitops"] == 0.16
    msd = "results_" + "_".join(MSD_PANEL)
    md = (folder / f"{msd}.md").read_text()
    assert "exit3 (4 MFLOPs)" in md and "GBitOps" not in md
    assert _row(pd.read_csv(folder / f"{msd}.csv"), method="joint", key="exit3")["mflops"] == 4.0
    assert set(_panel(mixed.methods, BIT_ARCH)["AUC over"]) == {"GBitOps"}
    assert set(_panel(mixed.methods, ARCH)["AUC over"]) == {"MFLOPs"}
    assert "| AUC over |" in (folder / "summary.md").read_text()


# --- seed spread, rankings, and the grid's plan ------------------------------------------------


def test_learning_and_budgeted_curves_show_the_seed_band(report, monkeypatch, tmp_path):
    """val/top1/<sub> = 40 + epoch + 10 x index + 2 x seed; budgeted/top1 = 50 + 5q + seed."""
    from reports import spread_figures as sf
    from reports.figures import PanelPlot
    from reports.load import histories
    from reports.style import method_styles

    cells = report.experiment.finished
    joint = cells[cells["method"] == "joint"]
    keys = (*(sf.VAL_PREFIX + s for s in SUBS), *sf.BUDGETED)
    hist = histories(report.experiment.uri, joint["run_id"].tolist(), keys)
    g = sf.band(hist[hist["key"] == "val/top1/exit2"], "step")  # epoch 2: 51, 53, 55
    assert g.loc[1, "mean"] == pytest.approx(53.0) and g.loc[1, "std"] == pytest.approx(2.0)
    assert g.loc[1, "count"] == 3
    g = sf.band(hist[hist["key"] == "budgeted/top1"], "step")  # q index 2: 60, 61, 62
    assert g.loc[2, "mean"] == pytest.approx(61.0) and g.loc[2, "std"] == pytest.approx(1.0)
    drawn = []  # the figures, taken where they would be saved
    monkeypatch.setattr(sf, "save", lambda fig, out, stem: drawn.append(fig) or [])
    styles, order = method_styles(report.order), report.order
    panel = (ARCH, DATASET, PROFILE)
    ctx = PanelPlot(panel, order, styles, None, tmp_path)
    sf.submodel_curves(hist, joint, SUBS, ctx)
    sf.budgeted_curves(hist, joint, ctx)
    curves, budget = drawn
    ax = next(a for a in curves.axes if a.get_title() == "exit2")
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == pytest.approx([52.0, 53.0, 54.0])  # mean per epoch
    (poly,) = ax.collections  # the band: mean ± 1 std = 50..54 at epoch 1, 52..56 at epoch 3
    ys = poly.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(50.0) and max(ys) == pytest.approx(56.0)
    (line,) = budget.axes[0].get_lines()
    assert list(line.get_xdata()) == pytest.approx([1.1, 2.1, 3.1, 4.1])  # mean MFLOPs
    assert list(line.get_ydata()) == pytest.approx([51.0, 56.0, 61.0, 66.0])
    assert budget.axes[0].collections  # band drawn


def test_win_tie_loss_and_seeds_needed(report):
    from reports.ranks import seeds_needed

    wtl = report.win_tie_loss.set_index("method")
    # ipkd vs joint (test_paired_tests_by_hand): exit1 p = 0.0099 and exit3 p = 0.0198 with
    # higher means: wins; exit2 p = 0.074: tie. ipkd_ta: one pair per sub-model: ties.
    assert wtl.loc["ipkd", ["cells", "wins", "ties", "losses"]].tolist() == [3, 2, 1, 0]
    assert wtl.loc["ipkd_ta", ["cells", "wins", "ties", "losses"]].tolist() == [3, 0, 3, 0]
    assert wtl.loc["ipkd_ta", "ties with < 3 pairs"] == 3
    sep = report.separation.set_index("key")
    r = sep.loc["exit3"]  # means: ipkd 73.33, joint 71, ipkd_ta 70; diffs 2, 2, 3
    assert (r["best"], r["second"], r["n pairs"]) == ("ipkd", "joint", 3)
    assert r["diff_mean"] == pytest.approx(7 / 3) and r["diff_std"] == pytest.approx(3**-0.5)
    assert r["seeds needed"] == seeds_needed([2, 2, 3])
    r = sep.loc["exit1"]  # ipkd_ta (54, one seed) before ipkd: one shared seed, no estimate
    assert r["best"] == "ipkd_ta" and r["n pairs"] == 1 and pd.isna(r["seeds needed"])
    # ipkd_ta ran seed 0 only: the three methods are ranked over its 3 cases (a set of at
    # least 3 methods, for Friedman), seeds 1-2 left out. Seed 0: exit1 54/53/50, exit2
    # 63/62/60, exit3 ipkd 72, joint and ipkd_ta 70 (tied: 2.5 each)
    t = report.ranks
    assert t.n_cases == 3 and t.cases_left_out == 6 and t.left_out == []
    assert t.avg_rank.to_dict() == pytest.approx({"ipkd_ta": 1.5, "ipkd": 5 / 3, "joint": 8.5 / 3})
    assert (
        "Rank statistics across architectures: 6 case(s) without every ranked method are left out."
        in report.notes
    )
    html = (report.out / "index.html").read_text()
    md = (report.out / "report.md").read_text()
    for text in ("Rankings across cases", "Win / tie / loss", "Seeds needed", "Friedman χ²"):
        assert text in html and text in md, text
    assert (report.out / "tables" / "win_tie_loss.csv").exists()


SLIM, SLIM_SUBS, SLIM_MFLOPS = "slimmable_mobilenet_v1", ["w0.5", "w1.0"], [1.0, 4.0]


@pytest.fixture(scope="session")
def planned(store, tmp_path_factory):
    """Experiment "planned": a grid plan (msdnet x joint/ipkd/ipkd_ta + slimmable x joint/ipkd,
    seeds 0, 1; ipkd_ta excluded on slimmable) recorded by the grid's own writer. msdnet ipkd_ta
    seed 1 has no run, slimmable joint seed 1 failed, and a takd cell outside the plan ran."""
    from reports.build import ReportOptions, build_report

    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("planned")
    plan_cells = [
        {"arch": a, "dataset": DATASET, "profile": PROFILE, "method": m, "seed": s, "key": "k"}
        for a, methods in ((ARCH, ["joint", "ipkd", "ipkd_ta"]), (SLIM, ["joint", "ipkd"]))
        for m in methods
        for s in (0, 1)
    ]
    tracking.record_grid_plan(
        store, "planned", {"grid": "planned", "path": "g.yaml", "excluded": 2, "cells": plan_cells}
    )
    for c in plan_cells:
        if (c["arch"], c["method"], c["seed"]) in ((ARCH, "ipkd_ta", 1), (SLIM, "joint", 1)):
            continue
        top1 = TOP1.get((c["method"], c["seed"]), [51, 61, 71])
        if c["arch"] == SLIM:
            _finished_cell(
                client, exp, c["method"], c["seed"], top1[:2], 1, SLIM, SLIM_SUBS, SLIM_MFLOPS
            )
        else:
            _finished_cell(client, exp, c["method"], c["seed"], top1, 1)
    bad = client.create_run(exp, tags=_tags("joint", 1, SLIM, **{"flexbench.status": "failed"}))
    client.set_terminated(bad.info.run_id, "FAILED")
    _finished_cell(client, exp, "takd", 0, [49, 58, 69], 1)  # not planned
    out = tmp_path_factory.mktemp("planned") / "out"
    return build_report("planned", store, ReportOptions(out=out, log_to_mlflow=False))


def test_only_planned_cells_count_as_missing(planned):
    cells = planned.experiment.cells
    assert planned.experiment.plan["excluded"] == 2 and len(planned.experiment.plan["cells"]) == 10
    assert cells["status"].value_counts().to_dict() == {"finished": 9, "failed": 1, "missing": 1}
    (miss,) = cells[cells["status"] == "missing"].itertuples()
    assert (miss.arch, miss.method, miss.seed) == (ARCH, "ipkd_ta", 1)
    # excluded pairs and the cells of the unplanned takd run's other seeds are not expected
    assert cells[(cells["arch"] == SLIM) & (cells["method"].isin(["ipkd_ta", "takd"]))].empty
    assert len(cells[cells["method"] == "takd"]) == 1
    assert cells.set_index(["arch", "method", "seed"]).loc[(ARCH, "takd", 0), "planned"] == False  # noqa: E712
    assert cells["planned"].sum() == 10
    note = next(n for n in planned.notes if n.startswith("Expected cells"))
    assert "the 10 cells of the plan" in note and "the 2 cell(s) its grid file excludes" in note
    assert "1 cell(s) with runs are not in that plan" in note
    html = (planned.out / "index.html").read_text()
    assert "Cells: 9 finished, 1 failed, 1 missing." in html


def test_planned_report_ranks_methods_and_draws_the_cd_diagram(planned):
    t = planned.ranks  # the cases where all four methods ran: msdnet seed 0, three exits
    assert (
        t is not None and t.n_cases == 3 and set(t.methods) == {"joint", "ipkd", "ipkd_ta", "takd"}
    )
    # exit1: ipkd_ta 54, ipkd 53, joint 50, takd 49; exit2: 63, 62, 60, 58; exit3: 70, 72, 70, 69
    assert t.avg_rank.to_dict() == pytest.approx(
        {"ipkd": 5 / 3, "ipkd_ta": 4.5 / 3, "joint": 8.5 / 3, "takd": 4.0}
    )
    assert t.cases_left_out == 7
    (fig,) = planned.rank_figures
    assert fig.files[0].exists() and "cd_diagram" in fig.stem
    html = (planned.out / "index.html").read_text()
    assert "figures/cd_diagram.png" in html and "Friedman χ²" in html
    # each architecture is also ranked alone where it has 3 methods: msdnet, not slimmable (2)
    ((panel, alone, alone_fig),) = planned.panel_ranks
    assert panel == (ARCH, DATASET, PROFILE) and alone.n_cases == 3
    assert alone.avg_rank.to_dict() == pytest.approx(t.avg_rank.to_dict())
    assert alone_fig.files[0].exists() and alone_fig.stem.endswith("msdnet_synthetic_smoke")
    md = (planned.out / "report.md").read_text()
    assert f"### One architecture alone: {ARCH} on {DATASET}" in md
    assert f"({alone_fig.stem}.png)" in md and f"{alone_fig.stem}.png" in html


def test_a_data_file_is_named_by_its_file_name_in_runs_and_plan(store):
    """Runs log the absolute path of the data file; the report names the panel by the file
    name (the same on every machine) and still matches the plan's cells to the runs."""
    from reports.load import dataset_names, load_experiment

    here = "imagefolder:/machine-a/shared/data/cifar10-jpeg.zip"
    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("moved")
    plan = [
        {"arch": ARCH, "dataset": here, "profile": PROFILE, "method": "joint", "seed": s}
        for s in (0, 1)
    ]
    tracking.record_grid_plan(store, "moved", {"grid": "moved", "path": "g.yaml", "cells": plan})
    rid = _finished_cell(client, exp, "joint", 0, TOP1[("joint", 0)])
    client.set_tag(rid, "flexbench.dataset", here)
    cells = load_experiment("moved", store).cells
    assert set(cells["dataset"]) == {"imagefolder:cifar10-jpeg.zip"}
    assert cells.set_index("seed")["status"].to_dict() == {0: "finished", 1: "missing"}
    # two different files of one name keep their full names; names without a path stay
    clash = ["imagefolder:/a/x.zip", "imagefolder:/b/x.zip", "cifar10", "imagefolder:/c/y/"]
    assert dataset_names(clash) == {
        "imagefolder:/a/x.zip": "imagefolder:/a/x.zip",
        "imagefolder:/b/x.zip": "imagefolder:/b/x.zip",
        "cifar10": "cifar10",
        "imagefolder:/c/y/": "imagefolder:y",
    }


def test_a_cell_of_another_network_is_not_pooled_with_its_method(store, tmp_path):
    """A joint cell trained with `--set arch.n_blocks=4` (4 exits) beside 3-exit joint cells:
    a row of its own, named by the setting, and the joint means are over the 3-exit cells only.
    The method's own architecture settings (imta's arch.ge) are the method, not a variant."""
    from reports.build import ReportOptions, build_report

    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("variant")
    four = [*SUBS, "exit4"]
    cells = [("joint", 0, "3", SUBS), ("joint", 1, "3", SUBS), ("joint", 2, "4", four)]
    for method, seed, blocks, subs in [*cells, ("imta", 0, "3", SUBS)]:
        top1 = [*TOP1[("joint", seed)], 80][: len(subs)]
        rid = _finished_cell(client, exp, method, seed, top1, subs=subs, mflops=[*MFLOPS, 8.0])
        ge = str(method == "imta")  # imta turns GE on (KEY_NEUTRAL: False); the root differs
        params = {"arch.n_blocks": blocks, "arch.ge": ge, "train.epochs": "3", "data.root": rid}
        client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    plan = [
        {"key": f"{m}-{seed}", "arch": ARCH, "dataset": DATASET, "profile": PROFILE,
         "method": m, "label": m, "seed": seed}
        for m, seed, _, _ in [*cells, ("imta", 0, "3", SUBS)]
    ]  # fmt: skip
    tracking.record_grid_plan(
        store, "variant", {"grid": "variant", "path": "v.yaml", "cells": plan}
    )
    opts = ReportOptions(out=tmp_path / "out", formats="md", log_to_mlflow=False)
    built = build_report("variant", store, opts)
    cells = built.experiment.cells  # the plan's joint seed 2 is the variant's run, by its key
    assert set(cells["status"]) == {"finished"} and cells["planned"].all() and len(cells) == 4
    s = built.summary
    r = _row(s, method="joint", key="exit1")  # seeds 0 and 1: 50, 52
    assert r["n"] == 2 and r["mean"] == pytest.approx(51.0)
    assert _row(s, method="joint [arch.n_blocks=4]", key="exit4")["n"] == 1
    assert s[(s["method"] == "joint") & (s["key"] == "exit4")].empty
    assert _row(s, method="imta", key="exit1")["n"] == 1


# --- method styles ---------------------------------------------------------------------------
SHIPPED_STYLES = {  # colours and markers every report has drawn these methods with
    "joint": ("#000000", "o"),
    "independent": ("#E69F00", "s"),
    "ipkd": ("#0072B2", "^"),
    "ipkd_ta": ("#009E73", "D"),
    "takd": ("#D55E00", "v"),
    "ekd": ("#CC79A7", "P"),
    "multi_teacher": ("#56B4E9", "X"),
    "hsd": ("#999999", "*"),
}


def test_method_colours_stay_and_come_from_the_registry():
    from benchmark.methods import METHODS
    from reports.style import method_order, method_styles

    styles = method_styles(METHODS.names())
    assert {m: (s["color"], s["marker"]) for m, s in styles.items() if m in SHIPPED_STYLES} == (
        SHIPPED_STYLES
    )
    # every registered method declares its own slot: adding one changes no other's colour
    assert all(METHODS.get(m).plot_slot is not None for m in METHODS.names())
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(styles)
    # a subset, or names from older runs, do not move anyone
    assert method_styles(["hsd", "old_method"])["hsd"] == styles["hsd"]
    assert method_order(["hsd", "old_method", "ipkd", "joint"], "joint") == [
        "joint",
        "ipkd",
        "hsd",
        "old_method",
    ]


def test_variants_and_every_method_differ_by_colour():
    """byot is not joint's black, sandwich not ipkd's blue, and a tuned variant or a cell of
    another setup is not drawn in its method's colour (markers alone are hard to tell apart)."""
    from benchmark.methods import METHODS
    from reports.style import method_styles

    variants = ["ipkd (T=3.71, a=0.62)", "ipkd_ta (T=2, a=0.5)", "joint [arch.n_blocks=4]"]
    styles = method_styles([*METHODS.names(), *variants])
    colours = [s["color"] for s in styles.values()]
    assert len(set(colours)) == len(colours), styles
    assert styles["byot"]["color"] != styles["joint"]["color"]


def test_the_accuracy_legend_is_off_the_curves(report, monkeypatch, tmp_path):
    """The legend of accuracy vs MFLOPs sits below the axes, not on the curves."""
    from reports import figures
    from reports.style import method_styles

    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, out, stem: drawn.append(fig) or [])
    ctx = figures.PanelPlot((ARCH, DATASET, PROFILE), report.order,
                            method_styles(report.order), "joint", tmp_path)  # fmt: skip
    figures.acc_vs_cost(report.summary, ctx)
    (fig,) = drawn
    fig.canvas.draw()
    (legend,) = fig.legends + [a.get_legend() for a in fig.axes if a.get_legend()]
    assert not legend.get_window_extent().overlaps(fig.axes[0].get_window_extent())
    assert len(legend.get_texts()) == 3


def test_a_taken_plot_slot_is_refused():
    from benchmark.methods import Method, register_method

    with pytest.raises(ValueError, match="plot_slot 2 is taken by ipkd"):

        @register_method("tmp_same_colour_as_ipkd")
        class SameColour(Method):
            plot_slot = 2


def test_selected_on_val_summaries_sit_beside_the_last_epoch(report):
    """Cells log test/top1_bestval one point below test/top1: the selected-on-val summaries are
    the last-epoch ones shifted by exactly that, and both appear on the page."""
    bv = report.methods_bestval.set_index(["method"])
    last = report.methods.set_index(["method"])
    assert list(bv.index) == list(last.index)
    joint_last = _row(report.summary, method="joint", key="top-1 mean")["mean"]
    assert bv.loc["joint", "top-1 mean"].startswith(f"{joint_last - 1:.2f}")
    for page in ("index.html", "report.md"):
        text = (report.out / page).read_text()
        assert "Selected on val" in text and "nothing is ever chosen on test" in text.lower()
    assert (report.out / "tables" / "summary_bestval.csv").exists()


def test_families_figure_puts_architectures_of_one_dataset_side_by_side(tmp_path, mixed):
    """Two architectures on MFLOPs sharing (dataset, profile) -> one families figure, files
    written; a lone MFLOPs architecture, or one next to a GBitOps panel (another unit), none."""
    from reports.figures import families
    from reports.style import method_styles

    rows = [
        {"arch": a, "dataset": "cifar10", "profile": "mini", "method": m, "key": f"s{i}",
         "key_index": i, "cost": c * (i + 1), "cost_axis": "mflops", "n": 2,
         "mean": 40.0 + 10 * i, "std": 1.0}
        for a, c in (("flex_vit", 3.0), ("slimmable_mobilenet_v1", 5.0))
        for m in ("joint", "sandwich")
        for i in range(3)
    ]  # fmt: skip
    summary = pd.DataFrame(rows)
    styles = method_styles(["joint", "sandwich"])
    (fig,) = families(summary, ["joint", "sandwich"], styles, tmp_path)
    assert fig.stem == "figures/families_cifar10_mini"
    assert {p.suffix for p in fig.files} == {".png", ".pdf"} and all(p.exists() for p in fig.files)
    assert "one line per architecture (colour) and method (marker)" in fig.caption
    assert families(summary[summary["arch"] == "flex_vit"], ["joint"], styles, tmp_path) == []
    assert mixed.family_figures == []  # msdnet on MFLOPs, the bit-width panel on GBitOps
