"""Dataset registry: `cifar10`, `cifar100`, `imagefolder:<dir or .zip>`, `imagenet:<dir or .zip>`,
`tiny_imagenet:<dir or .zip>`, `imagenet32:<dir>`, `imagenet64:<dir>`, `synthetic`.

Importing this package imports every module in it (`benchmark.registry.discover`): a new
dataset kind is one file that calls `register_dataset(DatasetSpec(...))`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from benchmark.data.base import DatasetSpec, ImageData, Splits, TestSplitSealed, make_splits
from benchmark.errors import ConfigError
from benchmark.registry import Registry, discover

DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name)(spec)


def parse_name(name: str) -> tuple[DatasetSpec, str | None]:
    """`imagefolder:/data/x.zip` -> (imagefolder spec, '/data/x.zip'). A kind with a fixed
    shape (`DatasetSpec.describe_bare`, e.g. `imagenet`) may be named without its path, for
    `describe` (`flexbench info`); reading its files then asks for the path (`needs_path`)."""
    key, _, arg = name.partition(":")
    spec = DATASETS.get(key)
    if spec.needs_arg and not arg and not spec.describe_bare:
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


def needs_path(spec: DatasetSpec, arg: str | None) -> None:
    """ConfigError naming the layout when a kind that reads files was named without its path."""
    if spec.needs_arg and not arg:
        raise ConfigError(
            f"dataset {spec.name} needs a path to read its files: {spec.name}:<dir or .zip> "
            f"({spec.description})"
        )


def check(name: str, cfg: dict[str, Any]) -> None:
    """Raise ConfigError unless the dataset's source can be loaded (e.g. its files exist) the
    way `data.in_memory` asks (a kind without streaming cannot be streamed, one that only
    streams cannot be held in memory)."""
    spec, arg = parse_name(name)
    needs_path(spec, arg)
    setting = cfg.get("in_memory", "auto")
    if setting is False and spec.load_encoded is None:
        raise ConfigError(
            f"data.in_memory false: dataset {spec.name} is always decoded in memory (only image "
            f"folders and zips stream); valid for it: auto, true"
        )
    if setting is True and not spec.in_memory_ok:
        raise ConfigError(
            f"data.in_memory true: dataset {spec.name} only streams (RandomResizedCrop needs the "
            f"full-size images); valid for it: auto, false"
        )
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
    if spec.identity is None:
        return name
    needs_path(spec, arg)
    return spec.identity(arg)


def load_splits(
    name: str,
    cfg: dict[str, Any],
    runtime: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> Splits:
    """The cell's splits, in memory or streamed as `cfg["in_memory"]` (auto | true | false)
    decides for the data on `device` (`stream.choose_in_memory`; the choice and its numbers are
    said on stderr for auto and kept in `Splits.memory_note`); `runtime` holds the loader
    settings of streamed data (`runtime.loader_workers`, `prefetch`, `decode`)."""
    check(name, cfg)
    spec, arg = parse_name(name)
    device = device or torch.device("cpu")
    setting = cfg.get("in_memory", "auto")
    in_memory, note = True, "always in memory"
    if spec.load_encoded is not None:
        encoded = spec.load_encoded(arg, cfg)
        n = len(encoded.train_entries) + len(encoded.test_entries)
        in_memory, note = (False, "streams only") if not spec.in_memory_ok else (
            stream.choose_in_memory(setting, n, encoded.image_size, device)
        )  # fmt: skip
        if setting in (None, "auto") and spec.in_memory_ok:
            print(f"{'in memory' if in_memory else 'streaming'}: {note}", file=sys.stderr)
        if not in_memory:
            loader = stream.LoaderSettings.of(runtime or {}, device)
            splits = stream.make_stream_splits(encoded, cfg, loader)
            splits.in_memory, splits.memory_note = False, note
            return splits
    splits = make_splits(
        spec.load(arg, cfg),
        val_size=cfg["val_size"],
        train_subset=cfg.get("train_subset"),
        test_subset=cfg.get("test_subset"),
        split_seed=cfg.get("split_seed", 0),
    )
    splits.memory_note = note
    return splits


from benchmark.data import stream  # noqa: E402  (stream imports base only)

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
    "needs_path",
    "parse_name",
    "train_size",
]
