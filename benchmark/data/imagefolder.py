"""`imagefolder:<dir or .zip>`: any dataset laid out as train/<class>/* and test/<class>/*.

Images are decoded once (in parallel) into uint8 tensors and cached; later runs load the cache.
Every image is resized to `data.image_size` (default: the size of the first training image).
Hidden and system files (dot-files such as macOS `._x.png` AppleDouble files, `__MACOSX/`,
`Thumbs.db`, `desktop.ini`) are skipped everywhere; an image that cannot be decoded stops the
load with its path. The cache key covers every image's name, size and mtime (CRC in a zip),
so a changed dataset is decoded again. The cell key knows the dataset by `identity`: its images'
names and sizes, not where the folder or zip is (a moved dataset keeps its cells).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import zipfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.data import register_dataset
from benchmark.data.base import DatasetSpec, EncodedData, ImageData, cached
from benchmark.errors import ConfigError, got

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Folders and files that operating systems and archivers leave behind; never data.
SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", "$recycle.bin"})
MAX_NAMED_FAILURES = 5

Index = dict[str, dict[str, list[str]]]  # {split: {class: [entry, ...]}}
Listing = dict[str, tuple[int, int]]  # {entry: (byte size, mtime_ns in a folder, CRC in a zip)}


def is_system_file(name: str) -> bool:
    """True for a path with a hidden (dot) or system component: `train/dog/._5.png`,
    `__MACOSX/train/dog/5.png`, `train/dog/Thumbs.db`, `train/.ipynb_checkpoints/x.png`."""
    parts = name.replace("\\", "/").split("/")
    return any(p.startswith(".") or p.lower() in SYSTEM_NAMES for p in parts if p)


def _listing(path: Path, kind: str = "imagefolder") -> Listing:
    """{entry name: (size, mtime_ns)} of every non-system file in a directory, (size, CRC-32)
    in a zip. Hidden folders are not walked. `kind`: the dataset kind a missing path names."""
    if not path.exists():
        raise ConfigError(f"{kind} path {path} does not exist")
    if path.is_dir():
        found: Listing = {}
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not is_system_file(d))
            rel = Path(folder).relative_to(path)
            for f in files:
                if not is_system_file(f):
                    st = os.stat(os.path.join(folder, f))
                    found[(rel / f).as_posix()] = (st.st_size, st.st_mtime_ns)
        return found
    if zipfile.is_zipfile(path):
        st = path.stat()
        return dict(_zip_listing(str(path.resolve()), st.st_size, st.st_mtime_ns))
    raise ConfigError(f"imagefolder path {path} is neither a directory nor a .zip file")


@functools.lru_cache(maxsize=8)
def _zip_listing(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, tuple[int, int]], ...]:
    """A zip's listing, read once per process per (path, size, mtime): a grid resolves every
    cell of a 60,000-image zip, and each read of its central directory takes ~0.5 s."""
    with zipfile.ZipFile(path) as z:
        return tuple(
            (i.filename, (i.file_size, i.CRC))
            for i in z.infolist()
            if not i.is_dir() and not is_system_file(i.filename)
        )


def _index(path: Path, names: list[str], splits: tuple[str, str] = ("train", "test")) -> Index:
    """Group `names` into `splits[0]`/`splits[1]` classes (entries sorted), keyed by those split
    names; ConfigError on a bad layout (a split without class folders, classes that differ)."""
    index: Index = {s: {} for s in splits}
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if len(parts) == 3 and parts[0] in index and name.lower().endswith(IMAGE_EXT):
            index[parts[0]].setdefault(parts[1], []).append(name)
    a, b = splits
    for split in splits:
        if not index[split]:
            raise ConfigError(
                f"{path} has no {split}/<class>/<image> files; expected {a}/ and {b}/ "
                f"folders with one sub-folder per class"
            )
    if set(index[a]) != set(index[b]):
        only_a = sorted(set(index[a]) - set(index[b]))
        only_b = sorted(set(index[b]) - set(index[a]))
        raise ConfigError(
            f"{path}: {a}/ and {b}/ have different classes (only in {a}/: "
            f"{_few(only_a)}; only in {b}/: {_few(only_b)})"
        )
    return {s: {c: sorted(v) for c, v in sorted(d.items())} for s, d in index.items()}


def _index_of(path: Path) -> tuple[Listing, Index]:
    """The listing and the train/test index of a folder or zip. A zip's index is built once
    per process per (path, size, mtime) like its listing (a grid resolves, describes and counts
    every cell's data); each call gets its own copy. An error is not kept."""
    listing = _listing(path)
    if path.is_dir():
        return listing, _index(path, list(listing))
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _ZIP_INDEX:
        _ZIP_INDEX.clear()  # one zip at a time is the common case; keep the memory bounded
        _ZIP_INDEX[key] = _index(path, list(listing))
    index = _ZIP_INDEX[key]
    return listing, {s: {c: list(v) for c, v in d.items()} for s, d in index.items()}


_ZIP_INDEX: dict[tuple[str, int, int], Index] = {}


def _few(names: list[str], n: int = 5) -> str:
    """Up to `n` names, then how many more: `a, b, c (+12 more)`; `none` when empty."""
    if not names:
        return "none"
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _open(source: Path, name: str, zf: zipfile.ZipFile | None):
    """The PIL image of one entry (not yet decoded)."""
    from PIL import Image

    raw = zf.read(name) if zf else (source / name).read_bytes()
    return Image.open(io.BytesIO(raw))


def _why(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL can read"
    return f"{type(exc).__name__}: {exc}"


def _decode(job: tuple[str, list[str], int]) -> tuple[np.ndarray | None, list[tuple[str, str]]]:
    """Decode and resize a chunk of entries: (images (n, size, size, 3) uint8 or None when any
    failed, [(entry, reason), ...] for those that failed)."""
    from PIL import Image

    source, names, size = job
    zf = zipfile.ZipFile(source) if zipfile.is_zipfile(source) else None
    out, failed = [], []
    for name in names:
        try:
            img = _open(Path(source), name, zf).convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            out.append(np.asarray(img))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            failed.append((name, _why(exc)))
    return (None if failed else np.stack(out)), failed


def _shown(source: Path, name: str) -> str:
    """Where an entry is, for messages: a file path, or `archive.zip:entry`."""
    return f"{source}:{name}" if source.is_file() else str(source / name)


def _failure_error(source: Path, failed: list[tuple[str, str]]) -> ConfigError:
    first, why = failed[0]
    lines = [f"  {_shown(source, n)}: {w}" for n, w in failed[:MAX_NAMED_FAILURES]]
    more = len(failed) - len(lines)
    others = len(failed) - 1
    return ConfigError(
        f"cannot decode image {_shown(source, first)} ({why}); "
        + (f"{others} other file(s) failed too" if others else "no other file failed")
        + ". Fix or delete what cannot be decoded (hidden and system files are skipped):\n"
        + "\n".join(lines)
        + (f"\n  ... and {more} more" if more else "")
    )


def _first_size(source: Path, names: list[str]) -> int:
    """Side of the first training image that opens (broken ones are reported by the load).
    A zip's is found once per process per (path, size, mtime, first names): opening the zip
    reads its whole central directory (~0.5 s for 60,000 images), and a grid describes every
    cell's data. An error is not kept (the next call raises it again)."""
    if not zipfile.is_zipfile(source):
        return _first_size_in(source, names, None)
    st = source.stat()
    key = (str(source.resolve()), st.st_size, st.st_mtime_ns, tuple(names[:50]))
    if key not in _ZIP_FIRST_SIZE:
        with zipfile.ZipFile(source) as zf:
            _ZIP_FIRST_SIZE[key] = _first_size_in(source, names, zf)
    return _ZIP_FIRST_SIZE[key]


_ZIP_FIRST_SIZE: dict[tuple[str, int, int, tuple[str, ...]], int] = {}


def _first_size_in(source: Path, names: list[str], zf: zipfile.ZipFile | None) -> int:
    from PIL import Image

    failed = []
    for name in names[:50]:
        try:
            w, h = _open(source, name, zf).size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            failed.append((name, _why(exc)))
            continue
        if w != h:
            raise ConfigError(
                f"first image {name} is {w}x{h}; set data.image_size for non-square data"
            )
        return w
    raise _failure_error(source, failed)


def _load_split(
    source: Path, classes: dict[str, list[str]], size: int
) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[str, str]]]:
    """(images (N, 3, size, size) uint8 or None if any failed, labels (N,), failures)."""
    items = [(n, label) for label, names in enumerate(classes.values()) for n in names]
    names = [n for n, _ in items]
    chunk = max(1, len(names) // (8 * (os.cpu_count() or 1)) + 1)
    jobs = [(str(source), names[i : i + chunk], size) for i in range(0, len(names), chunk)]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_decode, jobs))
    else:
        results = [_decode(j) for j in jobs]
    failed = [f for _, fails in results for f in fails]
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    if failed:
        return None, labels, failed
    x = torch.from_numpy(np.concatenate([a for a, _ in results])).permute(0, 3, 1, 2)
    return x.contiguous(), labels, []


def _size(path: Path, index: Index, cfg: dict[str, Any]) -> int:
    size = cfg.get("image_size")
    if size is None:
        return _first_size(path, [n for names in index["train"].values() for n in names])
    if not isinstance(size, int) or size < 8:
        raise ConfigError(f"data.image_size must be an integer >= 8, {got(size)}")
    return size


def describe(arg: str | None, cfg: dict[str, Any]) -> tuple[int, int]:
    path = Path(arg).expanduser()
    _, index = _index_of(path)
    return len(index["train"]), _size(path, index, cfg)


def _images(index: Index) -> list[str]:
    """Every image entry of the index, its splits in order, classes and entries in name order."""
    return [n for split in index.values() for names in split.values() for n in names]


def encoded(
    path: Path, index: Index, size: int, augment: str, digest: str, **extra: Any
) -> EncodedData:
    """The index as `EncodedData` (streaming): its two splits' entries and labels (class order
    = the first split's sorted class folders); `extra`: mean/std or stats_key."""
    first, second = index.values()

    def flat(split: dict[str, list[str]]) -> tuple[list[str], torch.Tensor]:
        items = [(n, label) for label, names in enumerate(split.values()) for n in names]
        return [n for n, _ in items], torch.tensor([lab for _, lab in items], dtype=torch.int64)

    (tr, try_), (te, tey) = flat(first), flat(second)
    return EncodedData(str(path), tr, try_, te, tey, list(first), size, augment, digest, **extra)


def cache_key(path: Path, index: Index, listing: Listing, size: int) -> str:
    """Changes whenever any image's name, size or mtime (zip: CRC) or the image size does."""
    h = hashlib.sha1(f"{path}|{size}".encode())
    for name in _images(index):
        h.update(f"\n{name}|{listing[name][0]}:{listing[name][1]}".encode())
    return h.hexdigest()[:16]


def identity(arg: str | None) -> str:
    """`imagefolder@<16 hex digits>`: SHA-1 of every image's entry name (`train/<class>/<file>`)
    and byte size. Not where the folder or zip is, nor what it is called, so a moved or renamed
    dataset (or the same images zipped) keeps its cell keys, while an image added, removed,
    renamed or rewritten to another size changes them. Names and sizes come from the listing the
    load reads anyway (one stat per file, a zip's central directory); hashing the bytes would
    read the whole dataset for every cell a grid resolves. A same-size rewrite is left to the
    data hash (`base.data_digest`), which the trainer records."""
    path = Path(str(arg)).expanduser()
    listing, index = _index_of(path)
    return names_and_sizes("imagefolder", listing, _images(index))


def names_and_sizes(kind: str, listing: Listing, names: Iterable[str]) -> str:
    """`<kind>@<16 hex digits>`: SHA-1 over `names` (in the order given) with their byte sizes
    from `listing`; the identity of a file-backed dataset (see `identity`)."""
    h = hashlib.sha1()
    for name in names:
        h.update(f"{name}|{listing[name][0]}\n".encode())
    return f"{kind}@{h.hexdigest()[:16]}"


def train_size(arg: str | None, cfg: dict[str, Any]) -> int:
    """Images under train/ (from the file index, nothing decoded)."""
    path = Path(arg).expanduser()
    return sum(len(v) for v in _index_of(path)[1]["train"].values())


def load(arg: str | None, cfg: dict[str, Any]) -> ImageData:
    path = Path(arg).expanduser().resolve()
    listing = _listing(path)
    index = _index(path, list(listing))
    size = _size(path, index, cfg)

    def build() -> ImageData:
        trx, try_, train_failed = _load_split(path, index["train"], size)
        tex, tey, test_failed = _load_split(path, index["test"], size)
        if train_failed or test_failed:
            raise _failure_error(path, train_failed + test_failed)
        return ImageData(trx, try_, tex, tey, list(index["train"]))

    return cached(f"imagefolder-{cache_key(path, index, listing, size)}", build)


def load_encoded(arg: str | None, cfg: dict[str, Any]) -> EncodedData:
    """The folder or zip for streaming: entries resized to `data.image_size` (default: the first
    image's side), CIFAR-style pad-4 crop + flip; mean/std of the training split, computed once
    by a streamed pass and cached (`stream.train_stats`)."""
    path = Path(arg).expanduser().resolve()
    listing = _listing(path)
    index = _index(path, list(listing))
    size = _size(path, index, cfg)
    key = f"imagefolder-{cache_key(path, index, listing, size)}"
    return encoded(
        path,
        index,
        size,
        "pad",
        names_and_sizes("imagefolder", listing, _images(index)).partition("@")[2],  # 16 hex
        stats_key=key,
    )


register_dataset(
    DatasetSpec(
        "imagefolder",
        describe,
        load,
        "train/<class>/*, test/<class>/* in a dir or .zip",
        needs_arg=True,
        train_size=train_size,
        identity=identity,
        load_encoded=load_encoded,
    )
)
