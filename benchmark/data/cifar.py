"""CIFAR-10/100 through torchvision's real loaders over the standard files in `data.root`.

Nothing is downloaded unless the user asks (`data.download=true` / `--download`). The
normalisation constants are the ones of the MSDNet reference code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmark.data import register_dataset
from benchmark.data.base import DatasetSpec, ImageData
from benchmark.errors import ConfigError

N_TRAIN = 50000  # both CIFARs: 50,000 training and 10,000 test images
_INFO = {
    "cifar10": (10, "cifar-10-batches-py", (0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": (100, "cifar-100-python", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


def _check(name: str, cfg: dict[str, Any]) -> Path:
    root = Path(cfg.get("root") or "./data").expanduser()
    folder = _INFO[name][1]
    if not (root / folder).is_dir() and not cfg.get("download"):
        raise ConfigError(
            f"{name} not found: expected {root / folder}/ (the standard python version). "
            f"Point --data-root at its parent directory, or pass --download to fetch it"
        )
    return root


def _spec(name: str) -> DatasetSpec:
    num_classes, _, mean, std = _INFO[name]

    def describe(arg: str | None, cfg: dict[str, Any]) -> tuple[int, int]:
        return num_classes, 32  # fixed: `flexbench info` needs no data files

    def check(arg: str | None, cfg: dict[str, Any]) -> None:
        _check(name, cfg)

    def load(arg: str | None, cfg: dict[str, Any]) -> ImageData:
        from torchvision import datasets

        root = _check(name, cfg)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        parts = [cls(str(root), train=t, download=bool(cfg.get("download"))) for t in (True, False)]

        def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            return x, torch.tensor(ds.targets, dtype=torch.int64)

        (trx, try_), (tex, tey) = tensors(parts[0]), tensors(parts[1])
        return ImageData(trx, try_, tex, tey, list(parts[0].classes), mean, std)

    return DatasetSpec(
        name,
        describe,
        load,
        f"{name.upper()} (torchvision files in data.root)",
        check=check,
        train_size=lambda arg, cfg: N_TRAIN,
    )


register_dataset(_spec("cifar10"))
register_dataset(_spec("cifar100"))
