"""scripts/bench_imagenet.py (the ImageNet-size speed benchmark) at toy size: both comparisons
run side by side and report positive rates, the step compares networks of the same size, bad
choices are refused before any work; and the backend choice the GPU check's one-GPU DDP stage
relies on (`distributed.init_rank(backend=...)`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmark.errors import ConfigError
from benchmark.training.distributed import init_rank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_imagenet as bi  # noqa: E402

TOY = ["--size", "64", "--batch", "2", "--steps", "1", "--rounds", "1", "--warmup", "1"]
TOY += ["--loader-batch", "4", "--loader-batches", "2", "--workers", "1", "--prefetch", "1"]
TOY += ["--set", "runtime.threads=1"]


def test_both_comparisons_run_side_by_side_at_toy_size(tmp_path, capsys):
    """Loader (flexbench stream vs ImageFolder + PIL) and steps (ResNet-50 vs torchvision's,
    MobileNet-V1 vs a plain loop over the same module): every runner measured, every rate
    positive, the ratio is flexbench's over the reference's, the ResNet-50s have torchvision's
    25,557,032 parameters on both sides, one JSON line and one table row per comparison."""
    out = tmp_path / "bench.jsonl"
    rec = bi.run([*TOY, "--json", str(out)])
    lo = rec["loader"]
    assert set(lo["images_per_s"]) == {"flexbench", "torchvision"}
    assert all(v > 0 for v in lo["images_per_s"].values())
    assert lo["ratio"] == pytest.approx(
        lo["images_per_s"]["flexbench"] / lo["images_per_s"]["torchvision"]
    )
    resnet, mobilenet = rec["steps"]
    assert (resnet["model"], resnet["reference"]) == ("resnet50", "torchvision")
    assert resnet["parameters"] == {"flexbench": 25_557_032, "torchvision": 25_557_032}
    assert (mobilenet["model"], mobilenet["reference"]) == ("mobilenet_v1", "plain")
    assert mobilenet["parameters"]["flexbench"] == mobilenet["parameters"]["plain"]
    for s in rec["steps"]:
        assert all(v > 0 for v in s["steps_per_s"].values())
        assert s["steps_per_s"]["flexbench"] == pytest.approx(
            s["images_per_s"]["flexbench"] / s["batch"]
        )
    assert len(out.read_text().splitlines()) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # the header, the loader, two steps


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--parts", "loader,decode"], "valid: loader, step, got 'decode'"),
        (["--models", "vgg16"], "valid: resnet50, mobilenet_v1, got 'vgg16'"),
        (["--size", "32"], "--size must be an integer >= 64, got 32"),
        (["--rounds", "0"], "--rounds must be an integer >= 1, got 0"),
    ],
)
def test_bad_choices_and_sizes_are_one_error_naming_the_valid_ones(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        bi.run(argv)


def test_init_rank_refuses_an_unknown_backend_before_joining():
    """The GPU check asks init_rank for gloo on CUDA (ranks sharing one GPU); any backend
    other than nccl / gloo is one ConfigError naming both, before any process group exists."""
    with pytest.raises(ConfigError, match="backend must be one of nccl, gloo, got 'mpi'"):
        init_rank("cpu", backend="mpi")
