"""The single-cell trainer: forwards per step, equal initial weights, frozen TAKD teachers,
the MLflow record of a cell, and kill-and-resume giving the uninterrupted result."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, all_runs, smoke_cfg

from benchmark import cli
from benchmark.config import cell_key, resolve
from benchmark.errors import IncompatibleError
from benchmark.methods import METHODS, EpochContext
from benchmark.models import ARCHS, IndependentModel
from benchmark.record import schema
from benchmark.training import checkpoint
from benchmark.training.build import make_method, make_model
from benchmark.training.step import Step, step_generator
from benchmark.training.train import CellOptions, train_cell

ALL_ARCHS = ARCHS.names()
ALL_METHODS = METHODS.names()


def _incompatible(arch: str, method: str) -> str | None:
    """Why `method` cannot train `arch` as its `check_model` says at resolve time (None when it
    can); see docs/methods.md."""
    try:
        resolve(arch, "synthetic", method, 0, "smoke")
    except IncompatibleError as exc:
        return str(exc)
    return None


def test_hsd_refuses_exactly_the_architectures_without_rerankable_channels():
    refused = {arch for arch in ALL_ARCHS if _incompatible(arch, "hsd")}
    assert refused == set(ALL_ARCHS) - {"saliency_vgg"}
    assert "method hsd needs saliency-ranked channels" in _incompatible("msdnet", "hsd")


# --- forwards per training step -------------------------------------------------------------
class ForwardLog:
    """Records every forward_sub/forward_all call of a model (the real ones still run) and how
    often each trunk part executes."""

    def __init__(self, model) -> None:
        self.calls: list[tuple[str, object, bool]] = []
        self.parts: dict[str, int] = {}
        for fn in (
            "forward_sub",
            "forward_all",
            "forward_sub_features",
            "forward_all_features",
            "forward_width",
            "forward_subnet",
        ):
            real = getattr(model, fn, None)
            if real is None:  # forward_width: only universally slimmable networks
                continue

            def wrapped(x, arg=None, _real=real, _fn=fn):
                self.calls.append((_fn.replace("_features", ""), arg, torch.is_grad_enabled()))
                return _real(x, arg)

            setattr(model, fn, wrapped)
        for name, mod in model.named_modules():
            if re.fullmatch(r"(members\.\d+\.)?(blocks\.\d+|heads\.\d+|features)", name):
                mod.register_forward_hook(lambda *_, n=name: self._count(n))

    def _count(self, name: str) -> None:
        self.parts[name] = self.parts.get(name, 0) + 1


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_trains_every_architecture_with_one_forward_per_submodel(arch, name, tmp_path):
    """The full arch x method matrix: one real training step per stage, the expected forwards
    (one per sub-model, one in all for early exits), finite loss, gradients and an optimizer
    step that changes the weights; combinations that make no sense fail at resolve time."""
    why = _incompatible(arch, name)
    if why:
        with pytest.raises(IncompatibleError, match=re.escape(why)):
            smoke_cfg(arch, name, tmp_path)
        return
    cfg = smoke_cfg(arch, name, tmp_path)
    model = make_model(cfg, 10, 32).train()
    method = make_method(cfg, model.num_submodels)
    k_all = model.num_submodels
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    stages = [s for s in method.stages(k_all) if not s.fit]  # fitting stages take no step
    if name == "attentive":  # its cost curve is counted once, on a copy: not a training pass
        method.cost_curve(model, 32)
    if name == "ieb":  # its EMA teacher: a copy of the network, made before the log wraps it
        method.ensure_teacher(model)
    for stage in stages:
        log = ForwardLog(model)
        step = Step(model, method, stage)
        before = [p.detach().clone() for p in model.parameters()]
        if method.own_teacher:  # ofa_ps: the stage's phase; the teacher after phase 0
            ctx = EpochContext(model, stage, 0, 1, lambda e: iter(()), torch.autocast)
            method.epoch_start(ctx)
        out = step(x, y, step_generator(0, 0, 0), 0.1)
        if method.own_teacher:
            method.epoch_end(ctx)
        loss, outs = out.loss, out.logits
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        if method.draws_subnets:  # progressive shrinking: drawn sub-networks, in order
            draws = method.draw_submodels(step_generator(0, 0, 0), model)
            assert log.calls == [("forward_subnet", s, True) for s in draws]
            listed = {model.caps.elastic.submodel_of(s) for s in draws} - {None}
            assert set(outs) == listed
            continue
        if method.draws_submodels:  # the sandwich rule: drawn widths, largest first
            trained = [c for c in log.calls if c[2]]
            widths = [w for _, w, _ in trained][::-1]
            if name != "attentive":  # attentive's draw reads the batch (tests/test_supernet_..)
                assert widths == METHODS.get("sandwich").draw_submodels(
                    method, step_generator(0, 0, 0), model
                )
            # attentive: first, without gradient, its candidates for the n - 2 middle widths
            scored = (len(widths) - 2) * 3 if name == "attentive" else 0
            assert log.calls[scored:] == [("forward_width", w, True) for w in widths[::-1]]
            assert [c[0] for c in log.calls[:scored] if not c[2]] == ["forward_width"] * scored
            assert log.parts == {"features": len(widths) + scored}
            assert sorted(outs) == [0, k_all - 1]  # w_min and w_max are evaluation widths
            continue
        assert sorted(outs) == sorted(stage.train)
        if method.owns_step:  # l2w: look-ahead passes on both halves, then the update on half 1
            assert log.calls == [("forward_all", None, True)] * 3
            assert log.parts == {f"{p}.{i}": 3 for p in ("blocks", "heads") for i in range(k_all)}
            continue
        trained = sorted(stage.train, reverse=True)
        teachers = [("forward_sub", t, False) for t in stage.frozen_teachers]
        if isinstance(model, IndependentModel):
            # one forward per trained network; a TAKD stage adds one frozen-teacher forward
            assert log.calls == teachers + [("forward_sub", k, True) for k in trained]
            if arch == "msdnet":
                ran = {k: n for k, n in log.parts.items() if k.endswith("blocks.0")}
                used = {t for t in stage.frozen_teachers} | set(stage.train)
                assert ran == {f"members.{k}.blocks.0": 1 for k in used}
        elif model.caps.single_pass:  # early exits: every exit from exactly one forward pass
            assert stages == [stages[0]] and not stage.frozen_teachers
            assert log.calls == [("forward_all", list(range(k_all))[::-1], True)]
            assert log.parts == {f"{p}.{i}": 1 for p in ("blocks", "heads") for i in range(k_all)}
        else:  # one forward per sub-model (its own width, depth or bit-width), largest first
            assert log.calls == [("forward_sub", k, True) for k in range(k_all)[::-1]]
            if arch.endswith("mobilenet_v1") and not method.uses_features:
                assert log.parts == {"features": k_all}
    if name == "takd":  # largest first; each next stage: next larger one as frozen teacher
        assert [(s.train, s.frozen_teachers) for s in stages] == [((k_all - 1,), ())] + [
            ((k,), (k + 1,)) for k in range(k_all - 2, -1, -1)
        ]


def test_takd_stage_gives_the_frozen_teacher_no_gradient(tmp_path):
    cfg = smoke_cfg("slimmable_mobilenet_v1", "takd", tmp_path)
    model = make_model(cfg, 10, 32).train()
    method = make_method(cfg, model.num_submodels)
    stage = method.stages(model.num_submodels)[1]  # train K-2 from frozen K-1
    Step(model, method, stage)(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    (student,), (teacher,) = stage.train, stage.frozen_teachers
    assert all(p.grad is None for p in model.members[teacher].parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.members[student].parameters())


# --- same initial weights for every method ----------------------------------------------------
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_same_initial_weights_for_every_method(arch, tmp_path):
    def weights(method: str, seed: int = 0) -> object:
        return make_model(smoke_cfg(arch, method, tmp_path, seed=seed), 10, 32)

    shared = weights("joint").state_dict()
    for name in ALL_METHODS:
        if _incompatible(arch, name) or METHODS.get(name).ARCH_SETTINGS.get(arch):
            continue  # another network (imta: ISC modules); tests/test_exits.py checks imta
        model = weights(name)
        if METHODS.get(name).separate_networks:
            assert isinstance(model, IndependentModel)
            members = list(model.members)
            assert len(members) == model.num_submodels
            # no parameter is shared between the copies
            ptrs = [{p.data_ptr() for p in m.parameters()} for m in members]
            assert all(not (a & b) for i, a in enumerate(ptrs) for b in ptrs[i + 1 :])
        else:
            members = [model]
        for m in members:
            sd = m.state_dict()
            assert sd.keys() == shared.keys()
            assert all(torch.equal(sd[k], shared[k]) for k in shared), name
    other = weights("joint", seed=1).state_dict()
    assert any(not torch.equal(other[k], shared[k]) for k in shared)


def test_takd_end_to_end_freezes_each_teacher(tracking_uri, tmp_path):
    """Across a whole TAKD chain, a network never changes after its own stage."""
    cfg = smoke_cfg("msdnet", "takd", tmp_path / "runs", train__epochs=1)
    ckpt = checkpoint.cell_dir(cfg, "flexbench", cell_key(cfg)) / "checkpoint.pt"
    snapshots = []
    train_cell(
        cfg,
        CellOptions(
            tracking_uri=tracking_uri,
            progress=False,
            epoch_callback=lambda e, m: snapshots.append(checkpoint.load(ckpt)["model"]),
        ),
    )
    assert len(snapshots) == 3  # one stage (of one epoch) per sub-model

    def member(sd: dict, k: int) -> dict:
        return {n: v for n, v in sd.items() if n.startswith(f"members.{k}.") and "running" not in n}

    init = make_model(cfg, 10, 32).state_dict()
    for stage, k in enumerate([2, 1, 0]):  # stage i trains member k, leaves the others alone
        before = init if stage == 0 else snapshots[stage - 1]
        for j in range(3):
            same = all(torch.equal(before[n], v) for n, v in member(snapshots[stage], j).items())
            assert same == (j != k), (stage, j)


# --- the MLflow record of one cell -------------------------------------------------------------
def test_mlflow_record_of_a_cell(tracking_uri, client, tmp_path):
    epochs = 2
    cfg = smoke_cfg("msdnet", "ipkd_ta", tmp_path / "runs", train__epochs=epochs, seed=3)
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    subs = ["exit1", "exit2", "exit3"]
    runs = all_runs(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == len(subs)
    parent = parents[0]
    assert parent.info.run_id == result.run_id and parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == "flexbench"
    tags = parent.data.tags
    assert {k: tags[f"flexbench.{k}"] for k in
            ("cell", "arch", "dataset", "method", "seed", "profile", "status")} == {
        "cell": cell_key(cfg), "arch": "msdnet", "dataset": "synthetic", "method": "ipkd_ta",
        "seed": "3", "profile": "smoke", "status": "finished",
    }  # fmt: skip
    assert "flexbench.git_commit" in tags and "flexbench.device" in tags

    params = parent.data.params
    assert params["train.epochs"] == str(epochs) and params["method.T"] == "1.0"
    assert params["arch.growth_rate"] == "2" and params["data.name"] == "synthetic"
    assert params["arch.gr_factor"] == "[1, 2, 4]" and params["seed"] == "3"

    for key in ("train/loss", "val/top1_mean"):
        hist = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in hist) == list(range(epochs)), key
    m = parent.data.metrics
    for sub in subs:
        for key in ("test/top1", "test/top5", "mflops", "mmacs", "params_m", "latency_ms"):
            assert f"{key}/{sub}" in m, f"{key}/{sub}"
        assert 0 <= m[f"test/top1/{sub}"] <= m[f"test/top5/{sub}"] <= 100
        assert m[f"mflops/{sub}"] == pytest.approx(2 * m[f"mmacs/{sub}"])
    assert m["test/top1_mean"] == pytest.approx(sum(m[f"test/top1/{s}"] for s in subs) / 3)
    assert "test/top1_auc" in m
    assert m["mflops/exit1"] < m["mflops/exit2"] < m["mflops/exit3"]

    by_sub = {c.data.tags["flexbench.submodel"]: c for c in children}
    assert sorted(by_sub) == subs
    for sub, child in by_sub.items():
        assert child.data.tags["mlflow.parentRunId"] == result.run_id
        assert child.info.status == "FINISHED"
        assert {"top1", "top5", "mflops", "params_m", "latency_ms"} <= set(child.data.metrics)
        assert child.data.metrics["top1"] == m[f"test/top1/{sub}"]
        assert child.data.metrics["mflops"] == m[f"mflops/{sub}"]

    files = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "submodels.csv", "plots"} <= files
    assert [a.path for a in client.list_artifacts(result.run_id, "plots")] == [
        "plots/acc_vs_flops.png"
    ]
    local = Path(client.download_artifacts(result.run_id, "", str(tmp_path / "art")))
    assert yaml.safe_load((local / "config.yaml").read_text()) == cfg
    rows = list(csv.DictReader((local / "submodels.csv").open()))
    assert [r["name"] for r in rows] == subs
    assert float(rows[0]["top1"]) == pytest.approx(m["test/top1/exit1"])
    assert (local / "plots" / "acc_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["name"] for r in result.rows] == subs

    # MSDNet is an early-exit model: the budgeted-batch curve (39 points) is logged too
    top1 = client.get_metric_history(result.run_id, "budgeted/top1")
    cost = client.get_metric_history(result.run_id, "budgeted/mflops")
    assert sorted(p.step for p in top1) == list(range(39)) == sorted(p.step for p in cost)
    assert all(m["mflops/exit1"] <= p.value <= m["mflops/exit3"] + 1e-9 for p in cost)
    budget_rows = list(csv.DictReader((local / "budgeted.csv").open()))
    assert len(budget_rows) == 39 and float(budget_rows[0]["q"]) == pytest.approx(0.05)


# --- kill and resume ------------------------------------------------------------------------
EPOCHS = 3
RESUME_SETS = {**FAST, "train.epochs": EPOCHS, "data.train_subset": 192}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark.cli", *args]


def test_killed_run_resumes_to_the_uninterrupted_result(tracking_uri, client, tmp_path, capsys):
    wd = tmp_path / "runs"
    sets = {**RESUME_SETS, "runtime.workdir": str(wd)}
    cfg = resolve("msdnet", "synthetic", "ipkd", 1, "smoke", sets)
    key = cell_key(cfg)
    argv = ["train", "--arch", "msdnet", "--dataset", "synthetic", "--method", "ipkd",
            "--seed", "1", "--tracking-uri", tracking_uri, "--experiment", "killed"]  # fmt: skip
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # 1. start a run and SIGKILL it once the first epoch's checkpoint exists
    ckpt = wd / "killed" / key / "checkpoint.pt"
    proc = subprocess.Popen(
        _cli(*argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{err}"
    done = checkpoint.load(ckpt)["epoch"]
    assert 1 <= done < EPOCHS, "killed too late to test resuming"
    (killed,) = all_runs(client)
    assert killed.data.tags["flexbench.status"] == "running"

    # 2. rerunning without --resume/--restart is refused with a clear message
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"flexbench: error: a checkpoint of this cell exists ({ckpt})" in err
    assert "--resume" in err and "--restart" in err

    # 3. resume to the end
    resumed = subprocess.run(
        _cli(*argv, "--resume"), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming cell {key} at stage 1, epoch {done + 1}" in resumed.stderr
    assert f"cell {key}: MLflow run {killed.info.run_id}" in resumed.stdout

    # 4. the uninterrupted reference (same seed, same config, another experiment)
    reference = train_cell(
        cfg, CellOptions(tracking_uri=tracking_uri, experiment="reference", progress=False)
    )

    parents = [r for r in all_runs(client) if "mlflow.parentRunId" not in r.data.tags]
    resumed_parents = [
        r for r in parents if client.get_experiment(r.info.experiment_id).name == "killed"
    ]
    assert len(resumed_parents) == 1  # the resumed run reused the parent run
    run = resumed_parents[0]
    assert run.info.run_id == killed.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["flexbench.status"] == "finished"
    assert run.data.tags["flexbench.cell"] == key
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == 3

    got = run.data.metrics
    final = {k: v for k, v in reference.metrics.items() if not schema.is_wall_time(k)}
    assert {k: got[k] for k in final} == final
    for metric in ("train/loss", "val/top1_mean", "val/top1/exit1"):
        want = [m.value for m in sorted(
            client.get_metric_history(reference.run_id, metric), key=lambda m: m.step)]  # fmt: skip
        hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
        assert sorted(hist) == list(range(EPOCHS))
        assert [hist[s] for s in range(EPOCHS)] == want, metric
