"""`imagenet32:<dir>`, `imagenet64:<dir>`: downsampled ImageNet (Chrabaszcz, Loshchilov, Hutter
2017, "A Downsampled Variant of ImageNet as an Alternative to the CIFAR datasets").

The npz files of image-net.org (`Imagenet32_train_npz.zip` / `Imagenet64_train_npz.zip` and
`Imagenet32_val_npz.zip` / `Imagenet64_val_npz.zip`), unpacked: `<dir>` holds
`train_data_batch_1.npz` .. `train_data_batch_10.npz` and `val_data.npz`, directly or in
sub-folders (as the zips unpack). Each file holds `data` (N, 3*S*S) uint8, channel-planar (all R,
then G, then B: reshaped to (N, 3, S, S)), `labels` in 1..1000 (class k is label k+1) and `mean`
(the per-pixel mean image, not read). Layout, label base and reshape as in the authors' scripts
(`PatrykChrabaszcz/Imagenet32_Scripts`: image2numpy_imagenet_train.py writes R, G, B planes and
1-based labels; imgnet.py reads `reshape(-1, 3, size, size)` and `y - 1`). The test split is
`val_data.npz` (50,000 images); the validation split is carved from the 1,281,167 training
images (`make_splits`). Classes are named by their index (`class0` .. `class999`; the files hold
no wnids).

Normalisation: per-channel mean and std over all training-batch images, counted exactly from
256-bin histograms while loading (no float copy of the images; the authors subtract the mean
image instead and do not divide by a std). Memory: one uint8 tensor of N x 3 x S x S bytes,
preallocated and filled file by file: 3.9 GB (32 px) / 15.7 GB (64 px) for the training images,
plus one file's `data` (a tenth) while it is copied, plus the 50,000 test images (0.15 / 0.6 GB).
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.data import register_dataset
from benchmark.data.base import DatasetSpec, ImageData, cached
from benchmark.data.imagefolder import _listing, names_and_sizes
from benchmark.data.tiny_imagenet import fixed_image_size, require_path
from benchmark.errors import ConfigError

NUM_CLASSES = 1000
TRAIN_FILES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
TEST_FILE = "val_data.npz"
FILES = (*TRAIN_FILES, TEST_FILE)
SIZES = (32, 64)  # the kinds imagenet32, imagenet64


def _layout(kind: str) -> str:
    return (
        f"a folder holding {', '.join(TRAIN_FILES[:2])} .. {TRAIN_FILES[-1]} and {TEST_FILE} "
        f"(the unpacked {kind.capitalize()}_train_npz / _val_npz zips of image-net.org)"
    )


def _files(kind: str, arg: str | None) -> tuple[list[Path], dict[str, tuple[int, int]]]:
    """The 11 npz paths (train batches 1..10, then val) found in `<dir>` or its sub-folders, and
    {file name: (byte size, mtime_ns)}; ConfigError naming the missing or repeated ones."""
    path = require_path(kind, arg, _layout(kind))
    if not path.is_dir():
        raise ConfigError(f"{kind} path {path} is not a folder (unpack the zips); expected "
                          f"{_layout(kind)}")  # fmt: skip
    found: dict[str, list[str]] = {}
    listing = _listing(path)
    for entry in listing:
        found.setdefault(entry.rsplit("/", 1)[-1], []).append(entry)
    missing = [f for f in FILES if f not in found]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}; expected {_layout(kind)}")
    repeated = {f: found[f] for f in FILES if len(found[f]) > 1}
    if repeated:
        raise ConfigError(
            f"{path}: several copies of {', '.join(repeated)} "
            f"({sorted(repeated.values())[0]}); point {kind}:<dir> at the folder of one resolution"
        )
    return [path / found[f][0] for f in FILES], {f: listing[found[f][0]] for f in FILES}


def _header(file: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `key` of an npz file from its .npy header (no data read)."""
    try:
        with zipfile.ZipFile(file) as z, z.open(f"{key}.npy") as fh:
            major, _ = np.lib.format.read_magic(fh)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (KeyError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ConfigError(f"{file}: not an npz file with a {key!r} array ({exc})") from None
    return shape, dtype


def _labels(file: Path) -> np.ndarray:
    try:
        with np.load(file) as z:
            return np.asarray(z["labels"])
    except (KeyError, ValueError, OSError) as exc:  # ValueError: an object (pickled) array
        raise ConfigError(f"{file}: no integer 'labels' array ({exc})") from None


@functools.lru_cache(maxsize=16)
def _validated(kind: str, size: int, files: tuple[Path, ...], stamps: tuple) -> tuple[int, ...]:
    """Rows of each file after checking `data` (N, 3*S*S) uint8, labels 1..1000 of the same
    length; read once per process per file state (`stamps`), labels only."""
    rows = []
    for file in files:
        shape, dtype = _header(file, "data")
        if len(shape) != 2 or shape[1] != 3 * size * size or dtype != np.uint8:
            other = {3 * s * s: s for s in SIZES}.get(shape[-1] if shape else -1)
            hint = f" (a {other}-px file: use imagenet{other}:)" if other and other != size else ""
            raise ConfigError(
                f"{file}: data is {dtype} {tuple(shape)}, expected uint8 (N, {3 * size * size}) "
                f"for {kind} (N images of 3x{size}x{size}){hint}"
            )
        labels = _labels(file)
        if labels.shape != (shape[0],):
            raise ConfigError(
                f"{file}: {shape[0]} images but labels of shape {labels.shape}; expected one "
                f"label per image"
            )
        numeric = labels.dtype.kind in "iuf"
        bad = labels[(labels < 1) | (labels > 1000)] if numeric else labels
        if labels.dtype.kind not in "iu" or bad.size:
            raise ConfigError(
                f"{file}: labels must be integers in 1..1000 (1-based, as image-net.org's files), "
                f"got {labels.dtype} values such as {bad[:3].tolist()}"
            )
        rows.append(shape[0])
    return tuple(rows)


def _checked(kind: str, size: int, arg: str | None) -> tuple[list[Path], tuple[int, ...], dict]:
    files, stamps = _files(kind, arg)
    return files, _validated(kind, size, tuple(files), tuple(stamps.items())), stamps


def _fill(files: list[Path], rows: tuple[int, ...], size: int) -> tuple[torch.Tensor, ...]:
    """(images (N, 3, S, S) uint8, labels (N,) int64 0-based, per-channel value counts (3, 256))
    of `files`, copied one file at a time into preallocated tensors."""
    x = torch.empty((sum(rows), 3, size, size), dtype=torch.uint8)
    y = torch.empty(sum(rows), dtype=torch.int64)
    counts = torch.zeros((3, 256), dtype=torch.int64)
    start = 0
    for file, n in zip(files, rows):
        with np.load(file) as z:
            part = torch.from_numpy(z["data"]).view(n, 3, size, size)
            x[start : start + n] = part
            y[start : start + n] = torch.from_numpy(np.asarray(z["labels"], dtype=np.int64)) - 1
        for c in range(3):
            counts[c] += torch.bincount(part[:, c].flatten(), minlength=256)
        del part
        start += n
    return x, y, counts


def _mean_std(counts: torch.Tensor) -> tuple[Any, Any]:
    """Per-channel mean and (unbiased, as `torch.std`) std of values / 255 from (3, 256) counts."""
    v = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1).double()
    mean = (counts * v).sum(1) / n
    var = ((counts * (v - mean[:, None]) ** 2).sum(1) / (n - 1)).clamp(min=0)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def _spec(size: int) -> DatasetSpec:
    kind = f"imagenet{size}"

    def describe(arg: str | None, cfg: dict[str, Any]) -> tuple[int, int]:
        """(1000, S); with a path, after checking its files (headers and labels only)."""
        fixed_image_size(kind, size, cfg)
        if arg:
            _checked(kind, size, arg)
        return NUM_CLASSES, size

    def check(arg: str | None, cfg: dict[str, Any]) -> None:
        fixed_image_size(kind, size, cfg)
        _checked(kind, size, arg)

    def identity(arg: str | None) -> str:
        """`imagenet<S>@<16 hex>`: the 11 file names and byte sizes (not where they are)."""
        return names_and_sizes(kind, _files(kind, arg)[1], FILES)

    def train_size(arg: str | None, cfg: dict[str, Any]) -> int:
        return sum(_checked(kind, size, arg)[1][: len(TRAIN_FILES)])

    def load(arg: str | None, cfg: dict[str, Any]) -> ImageData:
        fixed_image_size(kind, size, cfg)
        files, rows, stamps = _checked(kind, size, arg)
        h = hashlib.sha1(kind.encode())
        for file, (nbytes, mtime) in zip(files, stamps.values()):  # a rewritten file: read again
            h.update(f"\n{file.resolve()}|{nbytes}:{mtime}".encode())

        def build() -> ImageData:
            trx, try_, counts = _fill(files[:-1], rows[:-1], size)
            tex, tey, _ = _fill(files[-1:], rows[-1:], size)
            mean, std = _mean_std(counts)
            names = [f"class{k}" for k in range(NUM_CLASSES)]
            return ImageData(trx, try_, tex, tey, names, mean, std)

        return cached(f"{kind}-{h.hexdigest()[:16]}", build)

    return DatasetSpec(
        kind,
        describe,
        load,
        f"downsampled ImageNet npz batches (dir): 1000 classes, {size}px; test = val_data",
        needs_arg=True,
        check=check,
        train_size=train_size,
        identity=identity,
        describe_bare=True,
    )


for _size in SIZES:
    register_dataset(_spec(_size))
