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

from benchmark.data.pipeline import shard_slice
from benchmark.errors import ConfigError
from benchmark.models.syncbn import make_syncable, synced
from benchmark.training.build import make_method, make_model
from benchmark.training.distributed import Dist, check_world, ddp_forwards
from benchmark.training.step import Step, step_generator

# one single-pass family, one per-sub-model family (private BN per width), the drawn widths
CASES = (
    ("msdnet", "joint"),
    ("slimmable_mobilenet_v1", "ipkd"),
    ("us_mobilenet_v1", "sandwich"),
)
BATCH, STEP = 8, (0, 1, 3)  # global batch; the step's (seed, epoch, step)
# float32 with the statistics and gradients summed in another order: 1e-4 relative, 1e-5 absolute
RTOL, ATOL = 1e-4, 1e-5


def _case(arch: str, method: str, workdir: Path) -> tuple:
    """The case's model, method, stage and global batch, the same in every process."""
    cfg = smoke_cfg(arch, method, workdir, train__sync_bn=True, runtime__amp=False)
    model = make_model(cfg, 10, 32)
    meth = make_method(cfg, model.num_submodels)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return model, meth, meth.stages(model.num_submodels)[0], x, y


def _record(model: torch.nn.Module, loss: torch.Tensor) -> dict:
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")}
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
        rec["draws"] = (
            meth.draw_submodels(step_generator(*STEP), model) if method == "sandwich" else None
        )
        results[arch] = rec
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_step_equals_one_process_step(tmp_path):
    """2 gloo ranks, each on half of the batch (DDP, train.sync_bn): the loss (mean over ranks),
    every parameter's gradient and the BN running means equal one process's step on the whole
    batch, for msdnet + joint, slimmable_mobilenet_v1 + ipkd and us_mobilenet_v1 + sandwich;
    both ranks draw the same sandwich widths."""
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
        if method == "sandwich":
            assert ranks[0][arch]["draws"] == ranks[1][arch]["draws"]
            assert len(set(ranks[0][arch]["draws"])) > 2  # random widths were drawn
        assert sum(g is not None for g in one["grads"].values()) > 0
