"""Dataset registry: `cifar10`, `cifar100`, `imagefolder:<dir or .zip>`, `synthetic`,
`tiny_imagenet:<dir or .zip>`, `imagenet32:<dir>`, `imagenet64:<dir>`.

Importing this package imports every module in it (`benchmark.registry.discover`): a new
dataset kind is one file that calls `register_dataset(DatasetSpec(...))`.
"""

from __future__ import annotations

from typing import Any

from benchmark.data.base import DatasetSpec, ImageData, Splits, TestSplitSealed, make_splits
from benchmark.errors import ConfigError
from benchmark.registry import Registry, discover

DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name)(spec)


def parse_name(name: str) -> tuple[DatasetSpec, str | None]:
    """`imagefolder:/data/x.zip` -> (imagefolder spec, '/data/x.zip'); a kind declaring
    `shape_without_path` may come without its path (arg None: only `describe` answers)."""
    key, _, arg = name.partition(":")
    spec = DATASETS.get(key)
    if spec.needs_arg and not arg and not spec.shape_without_path:
        raise ConfigError(f"dataset {key} needs a path: {key}:<dir or .zip>")
    if arg and not spec.needs_arg:
        raise ConfigError(f"dataset {key} takes no ':' argument (got {name!r})")
    return spec, arg or None


def cell_source(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(dataset name, data settings) of a resolved cell config: the arguments `describe`,
    `check`, `train_size` and `load_splits` take, e.g. `describe(*cell_source(cfg))`."""
    return cfg["data"]["name"], cfg["data"]


def describe(name: str, cfg: dict[str, Any]) -> tuple[int, int]:
    """(num_classes, image_size) without decoding; raises ConfigError on a bad source."""
    spec, arg = parse_name(name)
    return spec.describe(arg, cfg)


def check(name: str, cfg: dict[str, Any]) -> None:
    """Raise ConfigError unless the dataset's source can be loaded (e.g. its files exist)."""
    spec, arg = parse_name(name)
    if spec.check is not None:
        spec.check(arg, cfg)


def train_size(name: str, cfg: dict[str, Any]) -> int | None:
    """Images of the training split before the validation split and subsets (no decoding);
    None where the dataset kind cannot tell cheaply or its source is unreadable."""
    spec, arg = parse_name(name)
    if spec.train_size is None:
        return None
    try:
        return spec.train_size(arg, cfg)
    except (ConfigError, OSError):
        return None


def identity(name: str) -> str:
    """What identifies a dataset in cell keys and studies: the name for datasets without a path
    (`cifar10`, `synthetic`), what the files are for a file-backed one (`imagefolder:<path>` ->
    `imagefolder@<hash of its images' names and sizes>`); ConfigError when they cannot be read."""
    spec, arg = parse_name(name)
    return name if spec.identity is None else spec.identity(arg)


def load_splits(name: str, cfg: dict[str, Any]) -> Splits:
    spec, arg = parse_name(name)
    data = spec.load(arg, cfg)
    return make_splits(
        data,
        val_size=cfg["val_size"],
        train_subset=cfg.get("train_subset"),
        test_subset=cfg.get("test_subset"),
        split_seed=cfg.get("split_seed", 0),
    )


discover(__name__, __path__)  # importing each module registers its dataset kinds

__all__ = [
    "DATASETS",
    "cell_source",
    "DatasetSpec",
    "ImageData",
    "Splits",
    "TestSplitSealed",
    "check",
    "describe",
    "identity",
    "load_splits",
    "parse_name",
    "train_size",
]
