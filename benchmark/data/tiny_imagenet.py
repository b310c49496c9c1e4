"""`tiny_imagenet:<dir or .zip>`: Tiny-ImageNet-200 (Stanford CS231n), 200 classes of 64x64.

The official `tiny-imagenet-200/` layout, as the folder itself, the folder holding it, or the
zip (with or without that top folder): `wnids.txt` (one WordNet id per class),
`train/<wnid>/images/*.JPEG` (500 per class), `val/images/*.JPEG` with their labels in
`val/val_annotations.txt` (tab-separated: file, wnid, 4 box ints), and `test/images/`
(unlabelled, ignored). flexbench's test split is the labelled val set (10,000 images); the
validation split is carved from train (`make_splits`). Class k is the k-th wnid in sorted order,
the order of torchvision's `ImageFolder` over `train/` (what the SDN code uses); class names are
the wnids (`words.txt` is not read).

Normalisation: the fixed mean/std of the SDN reference code (`yigitcankaya/Shallow-Deep-
Networks`, data.py, `TinyImagenet`). SDN augments with pad-8 crop + flip + colour jitter;
flexbench keeps its one on-device augmentation (pad-4 crop + flip, `pipeline.crop_flip`).
Images are decoded once (libjpeg-turbo via `torchvision.io.decode_image`) and cached; hidden and
system files are skipped as in `imagefolder`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmark.data import register_dataset
from benchmark.data.base import DatasetSpec, ImageData, cached
from benchmark.data.imagefolder import IMAGE_EXT, Listing, _listing, names_and_sizes
from benchmark.errors import ConfigError, got

KIND, NUM_CLASSES, SIZE = "tiny_imagenet", 200, 64
MEAN = (0.4802, 0.4481, 0.3975)  # SDN data.py TinyImagenet: transforms.Normalize
STD = (0.2302, 0.2265, 0.2262)
WNIDS, ANNOTATIONS = "wnids.txt", "val/val_annotations.txt"
LAYOUT = (
    "the tiny-imagenet-200 layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG "
    "and val/val_annotations.txt (file<TAB>wnid<TAB>4 box ints per line), in a folder or .zip"
)
MAX_NAMED = 5


def require_path(kind: str, arg: str | None, layout: str) -> Path:
    """The dataset path of `kind:<path>`; ConfigError naming the layout when it was left out
    (a kind with `describe_bare` is described without it) or does not exist."""
    if not arg:
        raise ConfigError(f"dataset {kind} needs its path here: {kind}:<path> holding {layout}")
    path = Path(arg).expanduser()
    if not path.exists():
        raise ConfigError(f"{kind} path {path} does not exist; expected {layout}")
    return path


def fixed_image_size(kind: str, size: int, cfg: dict[str, Any]) -> None:
    """A fixed-size kind refuses any other `data.image_size` (it does not resize)."""
    asked = cfg.get("image_size")
    if asked is not None and asked != size:
        raise ConfigError(
            f"data.image_size must be {size} or null for {kind} (its images are {size}x{size}), "
            f"{got(asked)}"
        )


@dataclass(frozen=True)
class Layout:
    """The indexed dataset: entries relative to the source, `root` their common prefix."""

    source: Path
    root: str  # "" or "<top folder>/"
    wnids: list[str]  # sorted: class k is wnids[k]
    train: list[tuple[str, int]]  # (entry, label), classes then file names in order
    test: list[tuple[str, int]]  # the labelled val images, by file name
    listing: Listing


def _root(path: Path, listing: Listing) -> str:
    """The prefix ("" or one top folder) that holds wnids.txt."""
    roots = sorted(n[: -len(WNIDS)] for n in listing if n.endswith(WNIDS) and n.count("/") <= 1)
    roots = [r for r in roots if r == "" or r.endswith("/")]
    if len(roots) != 1:
        found = "no wnids.txt" if not roots else f"wnids.txt in {len(roots)} places {roots}"
        raise ConfigError(f"{path}: {found} at the top or in one top folder; expected {LAYOUT}")
    return roots[0]


def _read_text(source: Path, entry: str) -> str:
    try:
        if source.is_dir():
            return (source / entry).read_text(encoding="utf-8")
        with zipfile.ZipFile(source) as z:
            return z.read(entry).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: {entry} is not UTF-8 text ({exc}); expected {LAYOUT}"
        ) from None


def _wnids(source: Path, root: str) -> list[str]:
    lines = [w.strip() for w in _read_text(source, root + WNIDS).splitlines() if w.strip()]
    if not lines or len(set(lines)) != len(lines):
        raise ConfigError(
            f"{source}: {root}{WNIDS} must list distinct wnids, one a line "
            f"({len(lines)} lines, {len(set(lines))} distinct); expected {LAYOUT}"
        )
    return sorted(lines)


def _train(path: Path, root: str, wnids: list[str], listing: Listing) -> list[tuple[str, int]]:
    """train/<wnid>/images/<image> entries with their labels; every wnid has images."""
    folders: dict[str, list[str]] = {}
    for name in listing:
        parts = name[len(root) :].split("/") if name.startswith(root) else []
        image = name.lower().endswith(IMAGE_EXT)
        if image and len(parts) == 4 and parts[0] == "train" and parts[2] == "images":
            folders.setdefault(parts[1], []).append(name)
    if not folders:
        raise ConfigError(f"{path}: no {root}train/<wnid>/images/<image> files; expected {LAYOUT}")
    extra, missing = sorted(set(folders) - set(wnids)), sorted(set(wnids) - set(folders))
    if extra or missing:
        raise ConfigError(
            f"{path}: train/ folders and {WNIDS} differ: not in {WNIDS}: "
            f"{extra[:MAX_NAMED] or 'none'}; without train images: {missing[:MAX_NAMED] or 'none'}"
        )
    return [(n, k) for k, w in enumerate(wnids) for n in sorted(folders[w])]


def _annotations(source: Path, root: str, wnids: list[str]) -> dict[str, int]:
    """{val image file name: label} from val_annotations.txt; ConfigError on a bad line."""
    label = {w: k for k, w in enumerate(wnids)}
    out: dict[str, int] = {}
    text = _read_text(source, root + ANNOTATIONS)
    for i, line in enumerate(text.splitlines(), 1):
        fields = line.rstrip("\r\n").split("\t")
        if not line.strip():
            continue
        where = f"{source}: {root}{ANNOTATIONS} line {i}"
        if len(fields) < 2 or fields[0] in out:
            why = "a repeated file" if len(fields) >= 2 else "not file<TAB>wnid<TAB>box"
            raise ConfigError(f"{where} is {why} ({line.strip()!r}); expected {LAYOUT}")
        if fields[1] not in label:
            raise ConfigError(
                f"{where} names wnid {fields[1]!r} (for {fields[0]}), which {WNIDS} does not "
                f"list ({len(wnids)} wnids, e.g. {wnids[:3]})"
            )
        out[fields[0]] = label[fields[1]]
    return out


def _test(path: Path, root: str, wnids: list[str], listing: Listing) -> list[tuple[str, int]]:
    """val/images/<image> entries with their annotated labels; every image is annotated once."""
    prefix = root + "val/images/"
    images = {
        n[len(prefix) :]: n
        for n in listing
        if n.startswith(prefix) and "/" not in n[len(prefix) :] and n.lower().endswith(IMAGE_EXT)
    }
    if not images:
        raise ConfigError(f"{path}: no {prefix}<image> files; expected {LAYOUT}")
    if root + ANNOTATIONS not in listing:
        raise ConfigError(f"{path}: {root}{ANNOTATIONS} is missing; expected {LAYOUT}")
    labels = _annotations(path, root, wnids)
    unlabelled, absent = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
    if unlabelled or absent:
        raise ConfigError(
            f"{path}: val/images and {ANNOTATIONS} differ: without annotation: "
            f"{unlabelled[:MAX_NAMED] or 'none'}; annotated but absent: "
            f"{absent[:MAX_NAMED] or 'none'}"
        )
    return [(images[f], labels[f]) for f in sorted(images)]


def layout(arg: str | None) -> Layout:
    """Index and validate the layout (file names and the two text files; nothing decoded)."""
    path = require_path(KIND, arg, LAYOUT)
    if path.is_dir():
        return _layout(path)
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{KIND} path {path} is neither a folder nor a .zip; expected {LAYOUT}")
    st = path.stat()
    return _zip_layout(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _zip_layout(path: str, size: int, mtime_ns: int) -> Layout:
    """A zip's layout, read once per process per (path, size, mtime): each read of the
    110,000-entry central directory takes about a second, and a grid resolves every cell."""
    return _layout(Path(path))


def _layout(path: Path) -> Layout:
    listing = _listing(path)
    root = _root(path, listing)
    wnids = _wnids(path, root)
    train = _train(path, root, wnids, listing)
    return Layout(path, root, wnids, train, _test(path, root, wnids, listing), listing)


def _entries(lay: Layout) -> list[str]:
    """What identifies the data: every image (train, then test) and both label files."""
    names = [n for n, _ in lay.train + lay.test]
    return names + [lay.root + WNIDS, lay.root + ANNOTATIONS]


def describe(arg: str | None, cfg: dict[str, Any]) -> tuple[int, int]:
    """(200, 64) without the path; with it, (number of wnids, 64) after validating the layout."""
    fixed_image_size(KIND, SIZE, cfg)
    return (NUM_CLASSES, SIZE) if not arg else (len(layout(arg).wnids), SIZE)


def check(arg: str | None, cfg: dict[str, Any]) -> None:
    fixed_image_size(KIND, SIZE, cfg)
    layout(arg)


def identity(arg: str | None) -> str:
    """`tiny_imagenet@<16 hex>`: names (below the top folder) and byte sizes of every image and
    of both label files, as `imagefolder.identity` (a moved or re-zipped copy keeps its key)."""
    lay = layout(arg)
    inner = {n[len(lay.root) :]: lay.listing[n] for n in _entries(lay)}
    return names_and_sizes(KIND, inner, [n[len(lay.root) :] for n in _entries(lay)])


def train_size(arg: str | None, cfg: dict[str, Any]) -> int:
    return len(layout(arg).train)


def _image(name: str, raw: bytes, failed: list[str]) -> torch.Tensor | None:
    """One decoded (3, 64, 64) uint8 image, or None with the reason appended to `failed`."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), ImageReadMode.RGB)
    except RuntimeError as exc:
        failed.append(f"{name} (cannot decode: {str(exc).splitlines()[0]})")
        return None
    if img.shape[1:] != (SIZE, SIZE):
        failed.append(f"{name} ({img.shape[2]}x{img.shape[1]}, not {SIZE}x{SIZE})")
        return None
    return img


def _decode(
    source: Path, items: list[tuple[str, int]], failed: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 64, 64) uint8, labels (N,) int64); grey JPEGs become RGB. The images that
    cannot be decoded or are not 64x64 are appended to `failed` (see `_failure`)."""
    x = torch.empty((len(items), 3, SIZE, SIZE), dtype=torch.uint8)
    with contextlib.ExitStack() as stack:
        zf = None if source.is_dir() else stack.enter_context(zipfile.ZipFile(source))
        raws = (zf.read(n) if zf else (source / n).read_bytes() for n, _ in items)
        for i, ((name, _), raw) in enumerate(zip(items, raws)):
            img = _image(name, raw, failed)
            if img is not None:
                x[i] = img
    return x, torch.tensor([k for _, k in items], dtype=torch.int64)


def _failure(source: Path, failed: list[str]) -> ConfigError:
    return ConfigError(
        f"{source}: {len(failed)} image(s) cannot be used, e.g. "
        f"{'; '.join(failed[:MAX_NAMED])}; every {KIND} image is a {SIZE}x{SIZE} JPEG"
    )


def load(arg: str | None, cfg: dict[str, Any]) -> ImageData:
    fixed_image_size(KIND, SIZE, cfg)
    lay = layout(arg)
    h = hashlib.sha1(f"{KIND}|{lay.source.resolve()}".encode())
    for name in _entries(lay):  # a changed image (size, mtime, zip CRC) decodes again
        h.update(f"\n{name}|{lay.listing[name][0]}:{lay.listing[name][1]}".encode())

    def build() -> ImageData:
        failed: list[str] = []
        trx, try_ = _decode(lay.source, lay.train, failed)
        tex, tey = _decode(lay.source, lay.test, failed)
        if failed:  # nothing is cached
            raise _failure(lay.source, failed)
        return ImageData(trx, try_, tex, tey, list(lay.wnids), MEAN, STD)

    return cached(f"{KIND}-{h.hexdigest()[:16]}", build)


register_dataset(
    DatasetSpec(
        KIND,
        describe,
        load,
        "Tiny-ImageNet-200 (dir or .zip): 200 classes, 64px; test = its labelled val",
        needs_arg=True,
        check=check,
        train_size=train_size,
        identity=identity,
        describe_bare=True,
    )
)
