"""The fast paths (bf16 autocast, torch.compile, memory format, cross-device checkpoints, GPU
slot assignment) exercised on a CPU, so the CUDA-side branches cannot rot unseen. What needs a
real GPU is marked `cuda` and skipped without one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.config import resolve
from benchmark.costs import speed
from benchmark.costs.speed import FAMILIES
from benchmark.data.pipeline import Normalizer
from benchmark.errors import ConfigError
from benchmark.grid import local
from benchmark.models import ARCHS
from benchmark.record import schema
from benchmark.training import checkpoint
from benchmark.training.build import make_method, make_model
from benchmark.training.step import Step

ROOT = Path(__file__).resolve().parents[1]


def _setup(arch: str, method: str, **sets):
    cfg = resolve(arch, "synthetic", method, 0, "smoke", {"runtime.device": "cpu", **sets})
    model = make_model(cfg, 10, 32)
    fast = speed.choose(cfg, torch.device("cpu"))
    model = model.to(memory_format=fast.torch_format)
    meth = make_method(cfg, model.num_submodels)
    opt = torch.optim.SGD(list(model.parameters()) + list(meth.parameters()), lr=0.05)
    stage = meth.stages(model.num_submodels)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g).contiguous(memory_format=fast.torch_format)
    y = torch.randint(0, 10, (16,), generator=g)
    return model, meth, stage, opt, x, y, fast


def _train(step, opt, x, y, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        losses.append(float(step(x, y).loss))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("arch,method", FAMILIES)
def test_bf16_autocast_on_cpu_trains_every_family(arch, method):
    """runtime.amp=true runs the convolutions in bf16 on a CPU (the path CUDA takes by default);
    16 steps on one batch give finite losses that fall."""
    model, meth, stage, opt, x, y, fast = _setup(arch, method, **{"runtime.amp": True})
    assert fast.amp and fast.tags()[schema.AMP] == "bf16"
    dtypes = set()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    step = Step(model, meth, stage, fast)
    losses = _train(step, opt, x, y, 16)
    assert dtypes == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_amp_auto_follows_native_bf16_and_false_keeps_fp32(monkeypatch):
    cfg = resolve("msdnet", "synthetic", "joint", 0, "smoke", {})
    assert cfg["runtime"]["amp"] == "auto"
    cpu = torch.device("cpu")
    monkeypatch.setattr(speed, "native_bf16", lambda d: True)
    assert speed.choose(cfg, cpu).amp
    monkeypatch.setattr(speed, "native_bf16", lambda d: False)
    assert not speed.choose(cfg, cpu).amp
    cfg["runtime"]["amp"] = False
    monkeypatch.setattr(speed, "native_bf16", lambda d: True)
    assert not speed.choose(cfg, cpu).amp


def test_mini_trains_in_fp32_even_where_bf16_is_native(monkeypatch):
    """mini's small models are slower in bf16 on a CPU (profiles.md): the profile turns it off,
    so a mini cell never depends on the CPU's flags; --set still turns it on."""
    monkeypatch.setattr(speed, "native_bf16", lambda d: True)
    cpu = torch.device("cpu")
    for arch in ("flex_vit", "us_mobilenet_v1", "ofa_mobilenet_v3"):
        assert not speed.choose(resolve(arch, "synthetic", "joint", 0, "mini", {}), cpu).amp
    forced = resolve("flex_vit", "synthetic", "joint", 0, "mini", {"runtime.amp": True})
    assert speed.choose(forced, cpu).amp


def test_native_bf16_on_cpu_needs_avx512_bf16_or_amx(monkeypatch):
    speed.cpu_capability.cache_clear()
    monkeypatch.setattr(speed, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert not speed.native_bf16(torch.device("cpu"))
    assert "+bf16" not in speed.cpu_capability()
    speed.cpu_capability.cache_clear()
    monkeypatch.setattr(speed, "_cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    assert speed.cpu_capability().endswith("+bf16+amx")
    assert speed.native_bf16(torch.device("cpu")) == bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    speed.cpu_capability.cache_clear()


def test_memory_format_is_declared_per_architecture_and_overridable():
    for arch, method in FAMILIES:
        cfg = resolve(arch, "synthetic", method, 0, "smoke", {})
        assert speed.choose(cfg, torch.device("cpu")).memory_format == ARCHS.get(arch).memory_format
    cfg = resolve(
        "msdnet", "synthetic", "joint", 0, "smoke", {"runtime.memory_format": "contiguous"}
    )
    fast = speed.choose(cfg, torch.device("cpu"))
    assert fast.torch_format == torch.contiguous_format
    assert fast.tags()[schema.MEMORY_FORMAT] == "contiguous"
    # the batches follow the model's layout (a conv follows its input's layout)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"), fast.torch_format)
    out = norm(
        torch.zeros(2, 3, 8, 8, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    )
    assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "sets,shown",
    [
        ({"runtime.amp": "yes"}, "runtime.amp must be auto, true or false, got 'yes'"),
        ({"runtime.memory_format": "nhwc"}, "got 'nhwc'"),
    ],
)
def test_bad_speed_settings_are_refused_with_the_valid_values(sets, shown):
    with pytest.raises(ConfigError, match=shown):
        resolve("msdnet", "synthetic", "joint", 0, "smoke", sets)


def _compiled_vs_eager(arch: str, method: str, steps: int = 3) -> tuple[list[float], list[float]]:
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, meth, stage, opt, x, y, fast = _setup(arch, method, **{"runtime.amp": False})
        step = Step(model, meth, stage, speed.Speed(compile=compiled))
        runs.append(_train(step, opt, x, y, steps))
    return runs[0], runs[1]


# The compiled step's losses equal the eager step's to this relative tolerance (fp32; inductor
# reorders reductions, so bit-equality is not expected).
COMPILE_RTOL = 1e-3


def test_compiled_step_matches_the_eager_step():
    """runtime.compile=true (torch.compile of the forwards) gives the eager losses, step by
    step, for a per-sub-model family; all five families: the `slow` test below."""
    eager, compiled = _compiled_vs_eager("slimmable_mobilenet_v1", "ipkd_ta")
    assert compiled == pytest.approx(eager, rel=COMPILE_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", FAMILIES)
def test_compiled_step_matches_the_eager_step_for_every_family(arch, method):
    eager, compiled = _compiled_vs_eager(arch, method)
    assert compiled == pytest.approx(eager, rel=COMPILE_RTOL)


def _tiny_modules():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def test_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path):
    """A CUDA checkpoint carries the device's RNG state; on a CPU it is ignored, the weights,
    optimizer, position and CPU RNG restore exactly."""
    mods = _tiny_modules()
    state = checkpoint.build(mods, (0, 3), torch.device("cpu"), {"run_id": "r"})
    assert state["rng_cuda"] is None
    state["rng_cuda"] = torch.zeros(16, dtype=torch.uint8)  # as torch.cuda.get_rng_state()
    checkpoint.save(tmp_path / "c.pt", state)
    expected = torch.rand(3)
    fresh = {"model": torch.nn.Linear(4, 3)}
    fresh["optimizer"] = torch.optim.SGD(fresh["model"].parameters(), lr=0.1, momentum=0.9)
    pos = checkpoint.restore(checkpoint.load(tmp_path / "c.pt"), fresh, torch.device("cpu"))
    assert pos == (0, 3)
    assert torch.equal(fresh["model"].weight, mods["model"].weight)
    assert (
        fresh["optimizer"]
        .state_dict()["state"][0]["momentum_buffer"]
        .equal(mods["optimizer"].state_dict()["state"][0]["momentum_buffer"])
    )
    assert torch.equal(torch.rand(3), expected)  # the CPU RNG continues where it was saved


def test_checkpoint_written_on_cpu_resumes_on_cuda_without_touching_the_cuda_rng(
    tmp_path, monkeypatch
):
    """A CPU checkpoint has no CUDA RNG state: resuming it on a GPU leaves the device's RNG
    alone (it is never set from a missing state)."""
    mods = _tiny_modules()
    state = checkpoint.build(mods, (1, 0), torch.device("cpu"), {})
    checkpoint.save(tmp_path / "c.pt", state)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: calls.append(a))
    pos = checkpoint.restore(checkpoint.load(tmp_path / "c.pt"), mods, torch.device("cuda:0"))
    assert pos == (1, 0) and calls == []


@pytest.fixture
def four_gpus(monkeypatch):
    """torch reports 4 CUDA devices (the slot logic only asks torch.cuda for the count)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_grid_puts_one_worker_on_each_gpu_by_default(four_gpus, monkeypatch):
    monkeypatch.setattr(local, "cpu_count", lambda: 16)
    assert local.parse_devices("auto") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    slots = local.make_slots(None, "auto", 10)
    assert [s.device for s in slots] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert {s.threads for s in slots} == {4}
    assert len(local.make_slots(None, "auto", 2)) == 2  # never more workers than cells


def test_grid_shares_gpus_round_robin_between_more_workers(four_gpus, monkeypatch):
    monkeypatch.setattr(local, "cpu_count", lambda: 16)
    slots = local.make_slots(8, "cuda:0,cuda:1", 20)
    assert [s.device for s in slots] == ["cuda:0", "cuda:1"] * 4
    assert {s.threads for s in slots} == {2}


def test_grid_refuses_a_gpu_the_machine_does_not_have(four_gpus):
    with pytest.raises(ConfigError, match=r"cuda:4 requested but this machine has 4 CUDA"):
        local.parse_devices("cuda:0,cuda:4")
    with pytest.raises(ConfigError, match="'gpu1' is not a device; valid: cpu, cuda:N"):
        local.parse_devices("gpu1")


def test_grid_without_gpus_runs_on_cpu_and_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local.parse_devices("auto") == ["cpu"]
    with pytest.raises(ConfigError, match="has 0 CUDA device.*use --devices cpu"):
        local.parse_devices("cuda:0")


def test_gpu_check_dry_run_writes_its_json_and_summary(tmp_path):
    """scripts/gpu_check.sh --dry-run runs every stage of the GPU check at toy size on this
    machine's CPU, so the script cannot rot between GPU machines: the families' throughput,
    concurrent workers, CPU-worker JPEG decoding, the ResNet-50 step in bf16 + channels_last
    beside torchvision's, a 2-rank gloo DDP step whose ranks end with the same weights, the
    real-data cell."""
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    rec = json.loads((out / "gpu_check.json").read_text())
    assert rec["dry_run"] is True
    assert {f["arch"] for f in rec["throughput"]} == {a for a, _ in FAMILIES}
    assert all(f["images_per_s"]["flexbench"] > 0 for f in rec["throughput"])
    assert [w["workers"] for w in rec["concurrency"]] == [1, 2]
    assert [r["decode"] for r in rec["decode"]["runs"]] == ["cpu"]  # nvjpeg only on CUDA
    assert rec["decode"]["runs"][0]["images_per_s"] > 0
    step = rec["imagenet_step"]
    assert step["settings"]["flexbench.amp"] == "bf16"
    assert step["settings"]["flexbench.memory_format"] == "channels_last"
    assert step["parameters"] == {"flexbench": 25_557_032, "torchvision": 25_557_032}
    assert all(v > 0 for v in step["images_per_s"].values())
    ddp = rec["ddp"]  # 2 gloo ranks (CPU here; one shared GPU on a 1-GPU machine)
    assert (ddp["rc"], ddp["world"], ddp["backend"]) == (0, 2, "gloo")
    assert ddp["ranks_agree"] is True and ddp["images_per_s"] > 0
    assert rec["real_data"]["learned"] in (True, False)
    assert "summary" in (out / "gpu_check.txt").read_text()


@pytest.mark.cuda
def test_bf16_step_and_checkpoint_round_trip_on_cuda(tmp_path):
    """On a GPU: amp=auto picks bf16, a step trains, and a CUDA checkpoint restores the device
    RNG exactly."""
    dev = torch.device("cuda:0")
    cfg = resolve("msdnet", "synthetic", "joint", 0, "smoke", {"runtime.device": "cuda"})
    fast = speed.choose(cfg, dev)
    assert fast.amp == torch.cuda.is_bf16_supported()
    model = make_model(cfg, 10, 32).to(dev, memory_format=fast.torch_format)
    meth = make_method(cfg, model.num_submodels).to(dev)
    step = Step(model, meth, meth.stages(model.num_submodels)[0], fast)
    x = torch.randn(8, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (8,), device=dev)
    assert torch.isfinite(step(x, y).loss)
    state = checkpoint.build({"model": model}, (0, 1), dev, {})
    expected = torch.rand(3, device=dev)
    checkpoint.save(tmp_path / "c.pt", state)
    checkpoint.restore(checkpoint.load(tmp_path / "c.pt"), {"model": model}, dev)
    assert torch.equal(torch.rand(3, device=dev), expected)


def test_meta_builds_skip_initialisers_and_restore_them():
    """Grid validation builds every architecture on `meta` without running initialisers (no
    torch._dynamo import on the skip path); real builds afterwards are initialised as before."""
    from benchmark.models import build_on_meta

    normal = torch.nn.init.normal_
    for arch, _ in FAMILIES:
        model = build_on_meta(arch, ARCHS.get(arch).resolve({}), 10, 32)
        assert all(p.is_meta for p in model.parameters())
    assert torch.nn.init.normal_ is normal
    cfg = resolve("slimmable_mobilenet_v1", "synthetic", "ipkd_ta", 0, "smoke", {})
    w = [p for p in make_model(cfg, 10, 32).parameters() if p.dim() == 4][0]
    assert w.std() > 0  # initialised, not left empty
