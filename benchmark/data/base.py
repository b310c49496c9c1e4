"""Datasets as decoded uint8 tensors or encoded files, a seeded train/val split, and a sealed test
split."""

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

from benchmark.data.pipeline import ImageSet, TensorSet
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


@dataclass
class EncodedData:
    """A whole dataset as encoded image files, read and decoded per batch (streaming): the
    folder or zip `source`, entry names and int64 labels of both splits, and how the images
    become tensors: `image_size` S (every batch is (B, 3, S, S)) and `augment` ("pad": resize to
    S, then the device pad-4 crop + flip of `pipeline.crop_flip`; "rrc": ImageNet-style, see
    `benchmark.data.stream`). `digest` identifies the files without decoding them (the kind's
    identity: entry names and byte sizes); `stats_key` names the cached mean/std when the kind
    has none of its own (None: `mean`/`std` are given)."""

    source: str
    train_entries: list[str]
    train_y: Tensor
    test_entries: list[str]
    test_y: Tensor
    classes: list[str]
    image_size: int
    augment: str
    digest: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    stats_key: str | None = None


class TestSplitSealed(RuntimeError):
    """Raised when something reads the test split where only validation is allowed."""


@dataclass
class Splits:
    """train/val carved from the training set; test only through `test()`. Each split is an
    `ImageSet` (`pipeline.TensorSet` in memory, `stream.EncodedSet` streamed): `len()`,
    `labels`, `train_batches(...)`, `eval_batches(...)`.

    `test()` counts reads and refuses them when sealed (studies seal it), so "test is used only
    for the final evaluation" is enforced by code, not convention. `data_hash` identifies the
    data (the trainer tags it): the decoded dataset in memory (`data_digest`), the files'
    names and sizes when streamed (`EncodedData.digest`); `val_hash` the validation indices.
    `in_memory` / `memory_note`: which path the data took and why (`stream.choose_in_memory`).
    """

    train: ImageSet
    val: ImageSet
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val_hash: str
    data_hash: str
    image_size: int
    _test: ImageSet = field(repr=False)
    in_memory: bool = True
    memory_note: str = "always in memory"
    sealed: bool = False
    test_reads: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def test(self) -> ImageSet:
        if self.sealed:
            raise TestSplitSealed("the test split is sealed here (validation only)")
        self.test_reads += 1
        return self._test


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


@dataclass(frozen=True)
class SplitIndices:
    """Sorted indices of the train and val images (into the training set) and of the test
    images kept (into the test set), and the validation split's hash."""

    train: Tensor
    val: Tensor
    test: Tensor
    val_hash: str


def split_indices(
    n: int,
    n_test: int,
    val_size: int | float,
    train_subset: int | float | None = None,
    test_subset: int | float | None = None,
    split_seed: int = 0,
) -> SplitIndices:
    """Deterministic split: a permutation from `split_seed`; val first, then train (subset);
    a seeded test subset from `split_seed + 1`."""
    n_val = _subset(n, val_size, "data.val_size") if val_size else 0
    if n_val >= n:
        raise ConfigError(f"data.val_size {val_size} leaves no training images (of {n})")
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=g)
    val_idx = perm[:n_val].sort().values
    rest = perm[n_val:]
    train_idx = rest[: _subset(rest.numel(), train_subset, "data.train_subset")].sort().values
    test_perm = torch.randperm(n_test, generator=torch.Generator().manual_seed(split_seed + 1))
    test_idx = test_perm[: _subset(n_test, test_subset, "data.test_subset")].sort().values
    val_hash = hashlib.sha1(val_idx.numpy().tobytes()).hexdigest()[:12]
    return SplitIndices(train_idx, val_idx, test_idx, val_hash)


def make_splits(
    data: ImageData,
    val_size: int | float,
    train_subset: int | float | None = None,
    test_subset: int | float | None = None,
    split_seed: int = 0,
) -> Splits:
    """The in-memory splits of a decoded dataset (`split_indices`); mean/std from the training
    split's pixels where the dataset has none of its own."""
    n, n_test = data.train_x.shape[0], data.test_x.shape[0]
    idx = split_indices(n, n_test, val_size, train_subset, test_subset, split_seed)
    train_x = data.train_x[idx.train]
    mean, std = data.mean, data.std
    if mean is None or std is None:
        flat = train_x.transpose(0, 1).reshape(3, -1).double() / 255
        mean = tuple(flat.mean(1).tolist())
        std = tuple(flat.std(1).tolist())
    return Splits(
        train=TensorSet(train_x, data.train_y[idx.train]),
        val=TensorSet(data.train_x[idx.val], data.train_y[idx.val]),
        classes=data.classes,
        mean=mean,
        std=std,
        val_hash=idx.val_hash,
        data_hash=data.digest or data_digest(data),
        image_size=int(data.train_x.shape[-1]),
        _test=TensorSet(data.test_x[idx.test], data.test_y[idx.test]),
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
    where); None keeps the name (`cifar10`, `synthetic`). `load_encoded`: the files without
    decoding them, for streaming (None: the kind is always in memory); `in_memory_ok` False: the
    kind only streams (`load` is never called). `describe_bare`: the kind may be named without
    its path for `describe` (a fixed shape, e.g. `imagenet` -> (1000, 224)).
    """

    name: str
    describe: Callable[[str | None, dict[str, Any]], tuple[int, int]]  # -> (classes, image px)
    load: Callable[[str | None, dict[str, Any]], ImageData]
    description: str = ""
    needs_arg: bool = False
    check: Callable[[str | None, dict[str, Any]], None] | None = None
    train_size: Callable[[str | None, dict[str, Any]], int | None] | None = None
    identity: Callable[[str | None], str] | None = None
    load_encoded: Callable[[str | None, dict[str, Any]], EncodedData] | None = None
    in_memory_ok: bool = True
    describe_bare: bool = False


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
