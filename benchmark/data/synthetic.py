"""A generated, learnable dataset for tests and smoke runs (no files needed).

Each class is a fixed random low-frequency colour pattern; samples add a random shift and noise,
so a small network reaches well above chance in a few epochs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from benchmark.data import register_dataset
from benchmark.data.base import DatasetSpec, ImageData

NUM_CLASSES, SIZE, N_TRAIN, N_TEST = 10, 32, 2000, 500


def _make(n: int, protos: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = protos[y]
    shift = torch.randint(-3, 4, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    x = x + 0.35 * torch.randn(x.shape, generator=g)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), y


def load(arg: str | None, cfg: dict[str, Any]) -> ImageData:
    g = torch.Generator().manual_seed(1234)
    coarse = torch.rand(NUM_CLASSES, 3, 4, 4, generator=g) * 2 - 1
    protos = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    trx, try_ = _make(N_TRAIN, protos, g)
    tex, tey = _make(N_TEST, protos, g)
    return ImageData(trx, try_, tex, tey, [f"class{i}" for i in range(NUM_CLASSES)])


register_dataset(
    DatasetSpec(
        "synthetic",
        lambda arg, cfg: (NUM_CLASSES, SIZE),
        load,
        f"generated {NUM_CLASSES}-class {SIZE}px images ({N_TRAIN} train / {N_TEST} test)",
        train_size=lambda arg, cfg: N_TRAIN,
    )
)
