"""Datasets as decoded uint8 tensors, a seeded train/val split, and a sealed test split."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.errors import ConfigError, WriteError, got
from benchmark.files import write_atomic


@dataclass
class ImageData:
    """A whole decoded dataset: uint8 images (N, 3, H, W) and int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    digest: str | None = None  # content hash (see `data_digest`); filled in by `cached`


def data_digest(data: ImageData) -> str:
    """Identity of a decoded dataset: BLAKE2b (16 hex digits) over the uint8 images, labels and
    class names of both splits, with their shapes.

    It depends on what the network sees (pixels after decoding and resizing), not on file names
    or times, so two runs with equal digests trained on identical data.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(data.classes).encode())
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


class TestSplitSealed(RuntimeError):
    """Raised when something reads the test split where only validation is allowed."""


@dataclass
class Splits:
    """train/val carved from the training set; test only through `test()`.

    `test()` counts reads and refuses them when sealed (studies seal it), so "test is used only
    for the final evaluation" is enforced by code, not convention. `data_hash` identifies the
    decoded dataset (the trainer tags it), `val_hash` the validation indices within it.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val_hash: str
    data_hash: str  # `data_digest` of the whole decoded dataset, before splitting
    _test_x: Tensor = field(repr=False)
    _test_y: Tensor = field(repr=False)
    sealed: bool = False
    test_reads: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def test(self) -> tuple[Tensor, Tensor]:
        if self.sealed:
            raise TestSplitSealed("the test split is sealed here (validation only)")
        self.test_reads += 1
        return self._test_x, self._test_y


def _subset(n: int, size: int | float | None, what: str) -> int:
    """The number of images `size` (a count, a fraction in (0, 1] or None: all) takes of `n`;
    a count above `n` is a ConfigError naming the ways out."""
    if size is None:
        return n
    if isinstance(size, float) and 0 < size <= 1:
        return max(1, int(round(n * size)))
    if isinstance(size, int) and size > 0:
        if size > n:
            hint = (  # the profiles' subsets: `benchmark.config.PROFILES`; paper takes all
                f", --set {what}=null (every image) or a profile without a subset (--profile paper)"
                if what != "data.val_size"
                else ""
            )
            raise ConfigError(
                f"{what} {size} exceeds the {n} images available: pass --set {what}={n} "
                f"or a fraction such as {what}=0.5{hint}"
            )
        return size
    raise ConfigError(f"{what} must be a positive integer or a fraction in (0, 1], {got(size)}")


def make_splits(
    data: ImageData,
    val_size: int | float,
    train_subset: int | float | None = None,
    test_subset: int | float | None = None,
    split_seed: int = 0,
) -> Splits:
    """Deterministic split: a permutation from `split_seed`; val first, then train (subset)."""
    n = data.train_x.shape[0]
    n_val = _subset(n, val_size, "data.val_size") if val_size else 0
    if n_val >= n:
        raise ConfigError(f"data.val_size {val_size} leaves no training images (of {n})")
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=g)
    val_idx = perm[:n_val].sort().values
    rest = perm[n_val:]
    train_idx = rest[: _subset(rest.numel(), train_subset, "data.train_subset")].sort().values
    n_test = data.test_x.shape[0]
    test_perm = torch.randperm(n_test, generator=torch.Generator().manual_seed(split_seed + 1))
    test_idx = test_perm[: _subset(n_test, test_subset, "data.test_subset")].sort().values
    train_x = data.train_x[train_idx]
    mean, std = data.mean, data.std
    if mean is None or std is None:
        flat = train_x.transpose(0, 1).reshape(3, -1).double() / 255
        mean = tuple(flat.mean(1).tolist())
        std = tuple(flat.std(1).tolist())
    return Splits(
        train_x=train_x,
        train_y=data.train_y[train_idx],
        val_x=data.train_x[val_idx],
        val_y=data.train_y[val_idx],
        classes=data.classes,
        mean=mean,
        std=std,
        val_hash=hashlib.sha1(val_idx.numpy().tobytes()).hexdigest()[:12],
        data_hash=data.digest or data_digest(data),
        _test_x=data.test_x[test_idx],
        _test_y=data.test_y[test_idx],
    )


@dataclass
class DatasetSpec:
    """A dataset kind. `arg` is the part after ':' in names like `imagefolder:/path`.

    `describe` is cheap (no decoding) and needs no data files where the shape is fixed (so
    `flexbench info` works without them); `check` validates that the source can be loaded (files
    present), and training runs it before any work, so bad paths fail early. `train_size`: the
    number of images of the training split (before the validation split and subsets), without
    decoding, or None where unknown; the grid uses it to estimate a cell's compute. `identity`:
    what the cell key knows a file-backed dataset by instead of its path (what the data is, not
    where); None keeps the name (`cifar10`, `synthetic`). `shape_without_path`: a kind whose
    shape is fixed (`tiny_imagenet`, `imagenet32`) may be named without its path, and then only
    `describe` answers (`flexbench info --dataset tiny_imagenet`); its other callables get
    `arg=None` and raise ConfigError naming the layout they expect.
    """

    name: str
    describe: Callable[[str | None, dict[str, Any]], tuple[int, int]]  # -> (classes, image px)
    load: Callable[[str | None, dict[str, Any]], ImageData]
    description: str = ""
    needs_arg: bool = False
    check: Callable[[str | None, dict[str, Any]], None] | None = None
    train_size: Callable[[str | None, dict[str, Any]], int | None] | None = None
    identity: Callable[[str | None], str] | None = None
    shape_without_path: bool = False


def cache_dir() -> Path:
    """$FLEXBENCH_CACHE, else ~/.cache/flexbench (created by the first write)."""
    return Path(os.environ.get("FLEXBENCH_CACHE") or Path.home() / ".cache" / "flexbench")


_warned: set[Path] = set()  # cache folders already warned about in this process


def cached(key: str, build: Callable[[], ImageData]) -> ImageData:
    """Decode once, then load the uint8 tensors from the cache (atomic write).

    `key` must change whenever the source data does (see imagefolder's file fingerprints); the
    cached entry also stores the data's digest, so loading it needs no re-hashing. The cache is
    best-effort: a full or read-only cache folder costs a warning (once per folder), never the
    run, and leaves no partial file.
    """
    path = cache_dir() / f"{key}.pt"
    if path.exists():
        try:
            return ImageData(**torch.load(path, weights_only=True))
        except Exception:  # a corrupt cache file is rebuilt, never trusted
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    data = build()
    data.digest = data.digest or data_digest(data)
    fix = "set FLEXBENCH_CACHE to a writable folder with free space to cache decoded data"
    try:
        write_atomic(path, lambda fh: torch.save(data.__dict__, fh), fix)
    except (WriteError, OSError) as exc:  # OSError: e.g. FLEXBENCH_CACHE names a file
        if path.parent not in _warned:
            _warned.add(path.parent)
            print(f"warning: training without the decoded-data cache: {exc}", file=sys.stderr)
    return data
