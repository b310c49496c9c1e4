"""One cell on several devices (docs/scaling.md): a 2-process gloo DDP step equals the 1-process
step on the concatenated batch; a 2-process cell killed mid-epoch ends `interrupted` and resumes
(with one process too) into one MLflow run with one point per metric and step; bad world sizes
are refused before any process starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import all_runs, smoke_cfg

from benchmark.data.pipeline import Normalizer, TensorSet, shard_slice
from benchmark.errors import ConfigError
from benchmark.models.syncbn import make_syncable, synced
from benchmark.training.build import make_method, make_model
from benchmark.training.distributed import Dist, check_world, ddp_forwards
from benchmark.training.evaluate import EvalSpec, evaluate
from benchmark.training.step import Step, step_generator

# one single-pass family, one per-sub-model family (private BN per width), the drawn widths
CASES = (
    ("msdnet", "joint"),
    ("slimmable_mobilenet_v1", "ipkd"),
    ("us_mobilenet_v1", "sandwich"),
)
BATCH, STEP = 8, (0, 1, 3)  # global batch; the step's (seed, epoch, step)
# float32 with the statistics and gradients summed in another order: 1e-4 relative, 1e-5 absolute
RTOL, ATOL = 1e-5, 1e-6


def _case(arch: str, method: str, workdir: Path) -> tuple:
    """The case's model, method, stage and global batch, the same in every process."""
    cfg = smoke_cfg(arch, method, workdir, train__sync_bn=True, runtime__amp=False)
    model = make_model(cfg, 10, 32)
    meth = make_method(cfg, model.num_submodels)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return model, meth, meth.stages(model.num_submodels)[0], x, y


def _evaluation(model: torch.nn.Module, d: Dist) -> dict:
    """Accuracy and confidences of every sub-model on 11 images (parts of 5 and 6 images)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (11, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (11,), generator=g)
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    acc = evaluate(model, TensorSet(x, y), EvalSpec(4, norm, dist=d), confidences=True)
    return {"top1": acc.top1, "top5": acc.top5, "confidence": acc.confidence}


def _record(model: torch.nn.Module, loss: torch.Tensor) -> dict:
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}  # BN running statistics
    return {"loss": loss.detach().clone(), "grads": grads, "bufs": bufs}


def _rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank: every case's step on its part of the batch through DDP with sync BN."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    d, results = Dist(rank, world), {}
    for arch, method in CASES:
        model, meth, stage, x, y = _case(arch, method, Path(out))
        make_syncable(model)
        part = shard_slice(BATCH, d.shard)
        step = Step(model, meth, stage, ddp=ddp_forwards(model, d, torch.device("cpu")))
        with synced():
            res = step(x[part], y[part], step_generator(*STEP))
        rec = _record(model, d.sum_(res.loss.clone()) / world)
        if arch == "msdnet":  # sharded evaluation, reduced over the ranks
            rec["eval"] = _evaluation(model, d)
        rec["draws"] = (
            meth.draw_submodels(step_generator(*STEP), model) if method == "sandwich" else None
        )
        results[arch] = rec
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_step_equals_one_process_step(tmp_path):
    """2 gloo ranks, each on half of the batch (DDP, train.sync_bn): the loss (mean over ranks),
    every parameter's gradient and the BN buffers (running mean, variance, count) equal one
    process's step on the whole batch, for msdnet + joint, slimmable_mobilenet_v1 + ipkd and
    us_mobilenet_v1 + sandwich;
    both ranks draw the same sandwich widths; the sharded evaluation (msdnet) reduces to one
    process's accuracies and confidences."""
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for arch, method in CASES:
        model, meth, stage, x, y = _case(arch, method, tmp_path)
        res = Step(model, meth, stage)(x, y, step_generator(*STEP))
        one, two = _record(model, res.loss), ranks[0][arch]
        torch.testing.assert_close(two["loss"], one["loss"], rtol=RTOL, atol=ATOL)
        assert one["grads"].keys() == two["grads"].keys()
        for name, g in one["grads"].items():
            if g is None:  # unused by this step in one process: untouched by DDP too
                assert two["grads"][name] is None, (arch, name)
                continue
            torch.testing.assert_close(
                two["grads"][name], g, rtol=RTOL, atol=ATOL, msg=f"{arch} {name}"
            )
        for name, b in one["bufs"].items():
            torch.testing.assert_close(
                two["bufs"][name], b, rtol=RTOL, atol=ATOL, msg=f"{arch} {name}"
            )
        if arch == "msdnet":
            single = _evaluation(model, Dist())
            assert two["eval"]["top1"] == single["top1"] and two["eval"]["top5"] == single["top5"]
            torch.testing.assert_close(two["eval"]["confidence"], single["confidence"])
        if method == "sandwich":
            assert ranks[0][arch]["draws"] == ranks[1][arch]["draws"]
            assert len(set(ranks[0][arch]["draws"])) > 2  # random widths were drawn
        assert sum(g is not None for g in one["grads"].values()) > 0


# --- a killed rank: the cell ends interrupted and resumes (here with one process) -------------
def _cell_args(tracking_uri: str, workdir: Path) -> list[str]:
    sets = {
        "runtime.workdir": workdir, "train.epochs": 4, "data.train_subset": 1024,
        "data.val_size": 64, "data.test_subset": 64, "runtime.latency_warmup": 0,
        "runtime.latency_repeats": 1, "runtime.device": "cpu",
    }  # fmt: skip
    args = ["train", "--arch", "msdnet", "--method", "joint", "--dataset", "synthetic"]
    args += ["--profile", "smoke", "--tracking-uri", tracking_uri]
    return args + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _wait_for(path_glob, root: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list(root.glob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, "the cell ended before its first checkpoint"
        time.sleep(0.05)
    raise AssertionError(f"no {path_glob} under {root} after {timeout}s")


def _rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    for p in launcher.children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "ddp_worker" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank} under {launcher.pid}")


@pytest.mark.parametrize(
    ("killed", "resume_world"),
    [(1, 2), (0, 2), pytest.param(1, 1, marks=pytest.mark.slow)],  # another world size
)
def test_killed_rank_interrupts_then_resumes_into_one_run(
    tmp_path, tracking_uri, client, killed, resume_world
):
    """`flexbench train --nproc-per-node 2`: rank 1 (or rank 0, which writes the record)
    SIGKILLed in epoch 2 -> the command exits 130 and the run is `interrupted`; `--resume` with
    2 processes (or 1) finishes the same run: one parent run, one child per sub-model, one point
    per metric and step, a change of world size recorded."""
    from benchmark import cli
    from benchmark.record import schema

    args = _cell_args(tracking_uri, tmp_path / "w")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "benchmark.cli", *args, "--nproc-per-node", "2"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    _wait_for("*/*/checkpoint.pt", tmp_path / "w", proc)  # epoch 1 is done
    _rank_process(psutil.Process(proc.pid), killed).send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    # rank 0 reports (its collective failed, or torchrun's SIGTERM came first); a rank 0 gone
    # without a word (killed here; else SIGKILLed by torchrun 30 s after its SIGTERM) leaves
    # the record to the launcher
    reported = "the cell's ranks stopped (rank 0: " in err
    unreported = "rank 0 ended without a result" in err and "is marked interrupted" in err
    assert unreported if killed == 0 else reported or unreported, err[-2000:]
    assert "--resume" in err
    (run,) = all_runs(client)
    assert run.data.tags[schema.STATUS] == "interrupted"
    assert run.data.tags[schema.WORLD_SIZE] == "2"
    epochs_before = len(client.get_metric_history(run.info.run_id, "train/loss"))
    assert epochs_before < 4

    launch = ["--nproc-per-node", "2"] if resume_world == 2 else []
    assert cli.main([*args, "--resume", *launch]) == 0
    parents = [r for r in all_runs(client) if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs(client) if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.run_id for r in parents] == [run.info.run_id]
    assert parents[0].data.tags[schema.STATUS] == "finished"
    assert sorted(c.data.params["submodel"] for c in children) == ["exit1", "exit2", "exit3"]
    for key in parents[0].data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), key
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    for sub in ("exit1", "exit2", "exit3"):  # the record of every sub-model
        assert {f"test/top1/{sub}", f"val/top1/{sub}"} <= parents[0].data.metrics.keys()
    changes = parents[0].data.tags.get(schema.RESUME_CHANGES, "")
    assert ("runtime.world_size 2 -> 1" in changes) == (resume_world == 1)


# --- bad input: one line before any process starts ------------------------------------------
def test_bad_world_sizes_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from benchmark import cli

    monkeypatch.chdir(tmp_path)
    cfg = smoke_cfg("msdnet", "joint", tmp_path)  # train.batch_size 32
    with pytest.raises(
        ConfigError,
        match=r"batch_size 32 is not divisible by the world size 3 .*"
        r"valid world sizes: 1, 2, 4, 8, 16, 32",
    ):
        check_world(cfg, 1, nnodes=3)
    with pytest.raises(ConfigError, match=r"batch_size 32 is not divisible by the world size 6"):
        check_world(cfg, 2, nnodes=3)
    with pytest.raises(ConfigError, match=r"--nproc-per-node must be an integer >= 1, got 0"):
        check_world(cfg, 0)
    cores = os.cpu_count() or 1
    with pytest.warns(UserWarning, match=f"oversubscribes the {cores} cores"):
        assert check_world(cfg, 2 * cores) == 2 * cores
    base = ["train", "--arch", "msdnet", "--method", "joint", "--dataset", "synthetic"]
    where = ["--nnodes", "3", "--master-addr", "127.0.0.1", "--node-rank", "0"]
    assert cli.main([*base, "--nproc-per-node", "1", *where]) == 2
    assert "not divisible by the world size 3" in capsys.readouterr().err
    two = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--node-rank", "2"]
    assert cli.main([*base, "--nproc-per-node", "1", *two]) == 2
    assert "--node-rank must be in 0..1, got 2 (int)" in capsys.readouterr().err
    assert cli.main([*base, "--nproc-per-node", "2", "--nnodes", "2"]) == 2
    assert "--nnodes 2 needs --master-addr" in capsys.readouterr().err
    port = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", "99999"]
    assert cli.main([*base, "--nproc-per-node", "2", *port]) == 2
    assert "--master-port must be a TCP port in 1..65535, got 99999 (int)" in (
        capsys.readouterr().err
    )
    for alone in (["--node-rank", "1"], ["--nnodes", "0"], ["--master-port", "29501"]):
        assert cli.main([*base, *alone]) == 2  # without --nproc-per-node they would be ignored
        assert f"{alone[0]} describe the ranks of a distributed cell and need --nproc-per-node" in (
            capsys.readouterr().err
        )
    assert not any(tmp_path.iterdir())  # nothing started


def test_more_ranks_than_cuda_devices_is_refused(tmp_path, monkeypatch):
    cfg = smoke_cfg("msdnet", "joint", tmp_path, runtime__device="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        ConfigError, match=r"--nproc-per-node 2 exceeds the 1 CUDA devices here; valid: 1..1"
    ):
        check_world(cfg, 2)


def test_world_size_is_the_launchers(tmp_path, tracking_uri):
    from benchmark.training.train import CellOptions, train_cell

    cfg = smoke_cfg("msdnet", "joint", tmp_path, runtime__world_size=2)
    with pytest.raises(ConfigError, match=r"runtime.world_size 2 is set by the launcher"):
        train_cell(cfg, CellOptions(tracking_uri))


def test_a_rank_0_lost_unreported_leaves_a_true_record(tmp_path, tracking_uri, client):
    """The launcher's side of a rank 0 gone without an outcome: a run left `running` becomes
    `interrupted`; a run rank 0 did close keeps its status; a store that cannot be opened
    is said, and the RankLost message still comes."""
    from benchmark.record import schema
    from benchmark.training.distributed import _rank0_lost
    from benchmark.training.train import CellOptions

    exp = client.create_experiment("lost")
    rid = client.create_run(exp, tags={schema.STATUS: "running"}).info.run_id
    (tmp_path / "run_id").write_text(rid)
    opts = CellOptions(tracking_uri=tracking_uri, experiment="lost")
    msg = _rank0_lost(1, tmp_path / "run_id", opts)
    lost = "rank 0 ended without a result (torchrun exit code 1)"
    assert msg == f"{lost}; its run {rid} is marked interrupted"
    assert client.get_run(rid).data.tags[schema.STATUS] == "interrupted"
    assert client.get_run(rid).info.status == "KILLED"
    assert _rank0_lost(1, tmp_path / "run_id", opts).endswith(f"its run {rid} is interrupted")
    assert _rank0_lost(1, tmp_path / "none", opts).endswith("(torchrun exit code 1)")
    gone = CellOptions(tracking_uri=f"sqlite:///{tmp_path}/no/such/dir/m.db", experiment="lost")
    assert "could not be marked interrupted" in _rank0_lost(1, tmp_path / "run_id", gone)
