"""Each family with its own method learns on real CIFAR-10 (the JPEG copy in ../shared/data),
`mini` profile: every sub-model reaches >= 35% test top-1 and bit-widths cost what they should.

Minutes per cell on 2 CPU cores, so marked `slow` (run with `make test-all`); the default suite
covers the same code paths on synthetic data (tests/test_train.py trains every arch x method).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.config import resolve
from benchmark.training.train import CellOptions, train_cell

ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ZIP.is_file(), reason=f"real CIFAR-10 copy not found at {ZIP}"),
]


@pytest.mark.parametrize(
    "arch,method",
    [
        ("msdnet", "ipkd_ta"),
        ("slimmable_mobilenet_v1", "ipkd_ta"),
        ("ddnn_resnet", "ekd"),
        ("switchable_precision_resnet", "multi_teacher"),
        ("saliency_vgg", "hsd"),
        ("msdnet", "imta"),
        ("byot_resnet", "byot"),
    ],
)
def test_family_learns_on_real_cifar10(arch, method, tracking_uri, tmp_path):
    cfg = resolve(
        arch,
        f"imagefolder:{ZIP}",
        method,
        0,
        "mini",
        {"runtime.device": "cpu", "runtime.threads": 2, "runtime.workdir": str(tmp_path / "runs")},
    )
    result = train_cell(
        cfg, CellOptions(tracking_uri=tracking_uri, experiment="real", progress=False)
    )
    print(arch, method, [(r["name"], round(r["top1"], 1)) for r in result.rows])
    for row in result.rows:
        assert row["top1"] >= 35.0, (row["name"], row["top1"])
    bitops = [row["gbitops"] for row in result.rows]
    assert bitops == sorted(bitops)  # a smaller sub-model never costs more bit-operations
