"""`imagefolder:<dir or .zip>`: any dataset laid out as train/<class>/* and test/<class>/*.

Images are decoded once (in parallel) into uint8 tensors and cached; later runs load the cache.
Every image is resized to `data.image_size` (default: the size of the first training image).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.data import register_dataset
from benchmark.data.base import DatasetSpec, ImageData, cached
from benchmark.errors import ConfigError

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _index(path: Path) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [entry, ...]}} for a directory or a zip (entries sorted)."""
    if not path.exists():
        raise ConfigError(f"imagefolder path {path} does not exist")
    if path.is_dir():
        names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    else:
        raise ConfigError(f"imagefolder path {path} is neither a directory nor a .zip file")
    index: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if len(parts) == 3 and parts[0] in index and name.lower().endswith(IMAGE_EXT):
            index[parts[0]].setdefault(parts[1], []).append(name)
    for split in ("train", "test"):
        if not index[split]:
            raise ConfigError(
                f"{path} has no {split}/<class>/<image> files; expected train/ and test/ "
                f"folders with one sub-folder per class"
            )
    if set(index["train"]) != set(index["test"]):
        raise ConfigError(
            f"{path}: train/ and test/ have different classes "
            f"({sorted(index['train'])} vs {sorted(index['test'])})"
        )
    return {s: {c: sorted(v) for c, v in sorted(d.items())} for s, d in index.items()}


def _decode(job: tuple[str, list[str], int | None]) -> np.ndarray:
    from PIL import Image

    source, names, size = job
    zf = zipfile.ZipFile(source) if zipfile.is_zipfile(source) else None
    out = []
    for name in names:
        raw = zf.read(name) if zf else (Path(source) / name).read_bytes()
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        out.append(np.asarray(img))
    return np.stack(out)


def _first_size(source: Path, name: str) -> int:
    from PIL import Image

    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            w, h = Image.open(io.BytesIO(z.read(name))).size
    else:
        w, h = Image.open(source / name).size
    if w != h:
        raise ConfigError(f"first image {name} is {w}x{h}; set data.image_size for non-square data")
    return w


def _load_split(source: Path, classes: dict[str, list[str]], size: int):
    items = [(n, label) for label, names in enumerate(classes.values()) for n in names]
    names = [n for n, _ in items]
    chunk = max(1, len(names) // (8 * (os.cpu_count() or 1)) + 1)
    jobs = [(str(source), names[i : i + chunk], size) for i in range(0, len(names), chunk)]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_decode, jobs))
    else:
        arrays = [_decode(j) for j in jobs]
    x = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([label for _, label in items], dtype=torch.int64)


def _size(path: Path, index, cfg: dict[str, Any]) -> int:
    size = cfg.get("image_size")
    if size is None:
        first_class = next(iter(index["train"].values()))
        return _first_size(path, first_class[0])
    if not isinstance(size, int) or size < 8:
        raise ConfigError(f"data.image_size must be an integer >= 8, got {size!r}")
    return size


def describe(arg: str | None, cfg: dict[str, Any]) -> tuple[int, int]:
    path = Path(arg).expanduser()
    index = _index(path)
    return len(index["train"]), _size(path, index, cfg)


def train_size(arg: str | None, cfg: dict[str, Any]) -> int:
    """Images under train/ (from the file index, nothing decoded)."""
    return sum(len(v) for v in _index(Path(arg).expanduser())["train"].values())


def load(arg: str | None, cfg: dict[str, Any]) -> ImageData:
    path = Path(arg).expanduser().resolve()
    index = _index(path)
    size = _size(path, index, cfg)
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{size}".encode()).hexdigest()[:16]

    def build() -> ImageData:
        trx, try_ = _load_split(path, index["train"], size)
        tex, tey = _load_split(path, index["test"], size)
        return ImageData(trx, try_, tex, tey, list(index["train"]))

    return cached(f"imagefolder-{key}", build)


register_dataset(
    DatasetSpec(
        "imagefolder",
        describe,
        load,
        "train/<class>/*, test/<class>/* in a dir or .zip",
        needs_arg=True,
        train_size=train_size,
    )
)
