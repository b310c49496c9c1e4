"""Streaming: encoded images (entries of a folder or zip) read and decoded per batch.

A split that does not fit the memory budget (`choose_in_memory`) stays encoded on disk; every
batch is read and decoded in `torch.utils.data.DataLoader` worker processes on CPU
(`torchvision.io.decode_jpeg`, libjpeg-turbo; other formats through `decode_image`), or its
bytes are decoded on the GPU in one call (`decode_jpeg(list, device="cuda")`, nvjpeg) with the
per-image crop/resize on the device (`runtime.decode: cuda`).

Determinism: the sampler yields (epoch, batch index) keys and a worker returns one whole batch,
so the order is the same for any worker count. The permutation of an epoch is drawn from a CPU
generator seeded by (seed, epoch) (`pipeline.epoch_order`), as the in-memory path draws it.
Augmentation "pad" (CIFAR-style, small images): workers only decode (and resize to S), the
pad-4 crop + flip runs on the device with the in-memory path's draws, so streamed batches equal
the in-memory ones. Augmentation "rrc" (ImageNet-style): per-image RandomResizedCrop (scale
(0.08, 1), ratio (3/4, 4/3); torchvision's `RandomResizedCrop.get_params` algorithm) + flip,
from a generator seeded by (seed, epoch, position in the epoch), so the draws depend neither on
the worker count nor on the sharding; evaluation resizes the short side to S * 256 / 224 and
centre-crops S (torchvision `references/classification/presets.py`: 256 -> 224).
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from benchmark.data.autoaugment import augment_policy, check_policy
from benchmark.data.base import EncodedData, Splits, cache_dir, split_indices
from benchmark.data.pipeline import (
    NO_SHARD,
    Normalizer,
    Shard,
    apply_crop_flip,
    check_shard,
    crop_flip_params,
    epoch_generator,
    epoch_order,
    shard_slice,
)
from benchmark.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision references/classification/presets.py
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision RandomResizedCrop defaults
EVAL_RESIZE = 256 / 224  # resize 256 -> centre crop 224 (classification reference presets)
MEMORY_FRACTION = 0.5  # decoded data may take at most half of the free memory (auto)
DECODERS = ("cpu", "cuda")
JPEG_EXT = (".jpg", ".jpeg")


@dataclass(frozen=True)
class LoaderSettings:
    """DataLoader worker processes per process (0: decode in the training process), batches
    prefetched per worker, and where images are decoded ("cpu" workers or "cuda" nvjpeg)."""

    workers: int = 2
    prefetch: int = 2
    decode: str = "cpu"

    @classmethod
    def of(cls, runtime: dict[str, Any], device: torch.device) -> LoaderSettings:
        """From `runtime.loader_workers`, `runtime.prefetch`, `runtime.decode`; ConfigError for
        decode=cuda on a device that is not CUDA."""
        decode = runtime.get("decode", "cpu")
        if decode == "cuda" and device.type != "cuda":
            raise ConfigError(
                f"runtime.decode cuda needs a CUDA device, got runtime.device {device}; "
                f"valid here: cpu"
            )
        return cls(runtime.get("loader_workers", 2), runtime.get("prefetch", 2), decode)


# -- the free-memory budget ----------------------------------------------------------------


def free_bytes(device: torch.device) -> int:
    """Free memory where decoded data would live: MemAvailable of /proc/meminfo for the host,
    `torch.cuda.mem_get_info` for a CUDA device (the host bound applies too: data is decoded
    there first)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def choose_in_memory(
    setting: Any, n_images: int, size: int, device: torch.device
) -> tuple[bool, str]:
    """(in memory?, why) for `data.in_memory` = auto | true | false. auto keeps the data in
    memory when its decoded size, N x 3 x S x S bytes (uint8), is at most MEMORY_FRACTION of the
    free memory of the host and (CUDA) of the device."""
    need = n_images * 3 * size * size
    if setting is not None and setting != "auto":
        return bool(
            setting
        ), f"data.in_memory={str(setting).lower()}; decoded {need / 2**30:.2f} GiB"
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    free = min(free_bytes(d) for d in devices)
    fits = need <= MEMORY_FRACTION * free
    why = (
        f"data.in_memory=auto: decoded {n_images} x 3 x {size} x {size} = {need / 2**30:.2f} GiB "
        f"{'<=' if fits else '>'} {MEMORY_FRACTION:g} x {free / 2**30:.2f} GiB free"
    )
    return fits, why


# -- reading, decoding and per-image transforms (device-agnostic) ---------------------------


class _Reader:
    """Reads entries of a folder or zip; a zip is opened once per process (workers included)."""

    def __init__(self, source: str) -> None:
        self.source, self._zip, self._pid = source, None, -1

    def read(self, name: str) -> Tensor:
        if Path(self.source).is_dir():
            raw = (Path(self.source) / name).read_bytes()
        else:
            if self._pid != os.getpid():
                self._zip, self._pid = zipfile.ZipFile(self.source), os.getpid()
            raw = self._zip.read(name)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode(raw: Tensor, name: str, source: str) -> Tensor:
    """(3, H, W) uint8 RGB of one encoded image on CPU; ConfigError naming the entry."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        if name.lower().endswith(JPEG_EXT):
            return decode_jpeg(raw, mode=ImageReadMode.RGB)
        return decode_image(raw, mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        where = f"{source}/{name}" if Path(source).is_dir() else f"{source}:{name}"
        why = str(exc).rsplit(", ", 1)[-1]  # torchvision: "<function>, <file:line>, <reason>"
        raise ConfigError(f"cannot decode image {where} ({why})") from None


def resize_to(img: Tensor, size: int) -> Tensor:
    """(3, S, S): bilinear with antialias (torchvision v2 `resize`) unless already S x S."""
    from torchvision.transforms.v2 import functional as F

    if tuple(img.shape[-2:]) == (size, size):
        return img
    return F.resize(img, [size, size], antialias=True)


def rrc_params(h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop of an h x w image: torchvision's
    `RandomResizedCrop.get_params` algorithm (10 attempts at a random area in RRC_SCALE and
    log-uniform aspect ratio in RRC_RATIO, then the centre crop of the clamped ratio), drawing
    from `g` in the same order torchvision draws from the global generator."""
    area, log_r = h * w, torch.log(torch.tensor(RRC_RATIO))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*RRC_SCALE, generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_r[0], log_r[1], generator=g)).item()
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, w - cw + 1, size=(1,), generator=g).item())
            return top, left, ch, cw
    ratio = w / h
    if ratio < min(RRC_RATIO):
        cw, ch = w, int(round(w / min(RRC_RATIO)))
    elif ratio > max(RRC_RATIO):
        cw, ch = int(round(h * max(RRC_RATIO))), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The generator of one training image's draws: seeded by (seed, epoch, its position in
    the epoch's global order), so they do not depend on workers or shards."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 10_000_019 + position)


def rrc_flip(img: Tensor, size: int, g: torch.Generator) -> Tensor:
    """RandomResizedCrop to S x S (bilinear, antialias) then a horizontal flip with p = 0.5."""
    from torchvision.transforms.v2 import functional as F

    top, left, ch, cw = rrc_params(int(img.shape[-2]), int(img.shape[-1]), g)
    out = F.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    return out.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else out


def eval_crop(img: Tensor, size: int) -> Tensor:
    """Short side resized to round(S * 256 / 224) (bilinear, antialias), then centre crop S."""
    from torchvision.transforms.v2 import functional as F

    img = F.resize(img, round(size * EVAL_RESIZE), antialias=True)
    return F.center_crop(img, [size, size])


def decode_batch_cuda(raws: list[Tensor], names: list[str], device: torch.device) -> list[Tensor]:
    """Decode one batch on the GPU: JPEGs in one nvjpeg call (`decode_jpeg(list, device=...)`),
    other formats on CPU then moved; (3, H, W) uint8 each on `device`. The GPU check script
    calls this for its nvjpeg throughput."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    jpeg = [i for i, n in enumerate(names) if n.lower().endswith(JPEG_EXT)]
    out: list[Tensor | None] = [None] * len(raws)
    if jpeg:
        imgs = decode_jpeg([raws[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpeg, imgs):
            out[i] = img
    for i, raw in enumerate(raws):
        if out[i] is None:
            out[i] = decode_image(raw, mode=ImageReadMode.RGB).to(device)
    return out  # type: ignore[return-value]


# -- batches: a map-style dataset of whole batches, keyed by (epoch, batch index) ------------


def _items(loader: DataLoader) -> Iterator[Any]:
    """The loader's items; an image a worker could not decode is one ConfigError line naming it
    (a worker's exception arrives wrapped in its traceback)."""
    try:
        yield from loader
    except ConfigError as exc:
        line = str(exc).strip().splitlines()[-1]
        raise ConfigError(line.removeprefix(f"{ConfigError.__module__}.ConfigError: ")) from None


class _Keys(Sampler):
    """The (epoch, batch index) keys of the pass being read; set before each pass."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class _Geometry:
    """Which images a key names. Training: the global batch i of the epoch's permutation, this
    shard's part `part`; evaluation (`batch` = eval batch size): images of this shard's
    contiguous range, in order."""

    train: bool
    batch: int
    part: slice
    seed: int = 0


class BatchDataset(Dataset):
    """key (epoch, i) -> one batch: (images (b, 3, S, S) uint8, labels (b,)) decoded on CPU, or
    (list of b encoded uint8 tensors, labels, draw positions) when the GPU decodes."""

    def __init__(self, images: EncodedSet, geo: _Geometry, raw: bool) -> None:
        self.images, self.geo, self.raw = images, geo, raw
        self.reader = _Reader(images.source)
        self._perm: tuple[int, Tensor] | None = None

    def _perm_of(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = epoch_generator(self.geo.seed, epoch, torch.device("cpu"))
            self._perm = (epoch, torch.randperm(len(self.images), generator=g))
        return self._perm[1]

    def positions(self, key: tuple[int, int]) -> range:
        """Positions (in the epoch's global order, or in the split) of the key's images."""
        epoch, i = key
        geo = self.geo
        if geo.train:
            start = i * geo.batch + geo.part.start
            return range(start, i * geo.batch + geo.part.stop)
        start = geo.part.start + i * geo.batch
        return range(start, min(start + geo.batch, geo.part.stop))

    def __getitem__(self, key: tuple[int, int]):
        epoch = key[0]
        pos = self.positions(key)
        if self.geo.train:
            idx = self._perm_of(epoch)[pos.start : pos.stop]
        else:
            idx = torch.arange(pos.start, pos.stop)
        names = [self.images.entries[j] for j in idx.tolist()]
        labels = self.images.labels[idx]
        raws = [self.reader.read(n) for n in names]
        if self.raw:
            return raws, names, labels, torch.tensor(list(pos))
        imgs = [decode(r, n, self.images.source) for r, n in zip(raws, names)]
        x = self.images.transform(imgs, epoch, pos, self.geo.train, self.geo.seed)
        return torch.stack(x), labels


class EncodedSet:
    """One split as encoded files (an `ImageSet`): entry names and labels, decoded per batch
    with `LoaderSettings` (see the module docstring)."""

    def __init__(
        self, source: str, entries: list[str], labels: Tensor, size: int, augment: str,
        loader: LoaderSettings,
    ) -> None:  # fmt: skip
        self.source, self.entries, self.labels = source, entries, labels
        self.size, self.augment, self.loader = size, augment, loader
        self._eval: dict[tuple[int, Shard], tuple[DataLoader, _Keys, _Geometry]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def shard_len(self, shard: Shard = NO_SHARD) -> int:
        s = shard_slice(len(self), shard)
        return s.stop - s.start

    def transform(
        self, imgs: list[Tensor], epoch: int, pos: range, train: bool, seed: int
    ) -> list[Tensor]:
        """Decoded (3, H, W) images -> (3, S, S) each: "pad" resizes (the crop + flip follow on
        the device); "rrc" crops per image (training) or resizes + centre-crops (evaluation)."""
        if self.augment == "pad":
            return [resize_to(im, self.size) for im in imgs]
        if not train:
            return [eval_crop(im, self.size) for im in imgs]
        gens = [sample_generator(seed, epoch, p) for p in pos]
        return [rrc_flip(im, self.size, g) for im, g in zip(imgs, gens)]

    def loader_of(self, geo: _Geometry) -> tuple[DataLoader, _Keys]:
        """A DataLoader over whole batches (persistent workers) and the sampler to fill."""
        keys = _Keys()
        w = self.loader.workers
        loader = DataLoader(
            BatchDataset(self, geo, raw=self.loader.decode == "cuda"),
            batch_size=None,
            sampler=keys,
            num_workers=w,
            prefetch_factor=self.loader.prefetch if w else None,
            persistent_workers=w > 0,
        )
        return loader, keys

    def on_device(
        self, item: Any, device: torch.device, epoch: int, geo: _Geometry
    ) -> tuple[Tensor, Tensor]:
        """A loader item -> (uint8 images (b, 3, S, S), labels) on `device` (decoding there when
        the GPU decodes)."""
        if self.loader.decode != "cuda":
            x, y = item
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        raws, names, y, pos = item
        imgs = decode_batch_cuda(raws, names, device)
        span = range(int(pos[0]), int(pos[-1]) + 1)
        x = torch.stack(self.transform(imgs, epoch, span, geo.train, geo.seed))
        return x, y.to(device)

    def close_eval(self) -> None:
        """Drop the evaluation loaders (their worker processes end)."""
        self._eval.clear()

    def train_batches(
        self, batch_size: int, norm: Normalizer, seed: int, device: torch.device,
        shard: Shard = NO_SHARD, policy: str = "none",
    ) -> StreamTrainBatches:  # fmt: skip
        return StreamTrainBatches(self, batch_size, norm, seed, device, shard, policy)

    def eval_batches(
        self, batch_size: int, norm: Normalizer, device: torch.device, shard: Shard = NO_SHARD
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The rank's contiguous part of the split, in order (one persistent loader per batch
        size and shard)."""
        check_shard(shard)
        if (batch_size, shard) not in self._eval:
            geo = _Geometry(False, batch_size, shard_slice(len(self), shard))
            self._eval[batch_size, shard] = (*self.loader_of(geo), geo)
        loader, keys, geo = self._eval[batch_size, shard]
        keys.keys = [(0, i) for i in range(math.ceil(self.shard_len(shard) / batch_size))]
        for item in _items(loader):
            x, y = self.on_device(item, device, 0, geo)
            yield norm(x), y


class StreamTrainBatches:
    """Streamed training batches (a `TrainSource`): the global batch i of epoch e is the
    in-memory path's batch i (same permutation; "pad": same crop/flip draws, on the device),
    this shard's contiguous part of `batch_size // world` images; last partial batch dropped.
    `policy` follows on the device as in memory (after "pad"'s crop/flip draws, or first on the
    epoch's generator after "rrc"'s per-image crops)."""

    def __init__(
        self, images: EncodedSet, batch_size: int, norm: Normalizer, seed: int,
        device: torch.device, shard: Shard = NO_SHARD, policy: str = "none",
    ) -> None:  # fmt: skip
        check_shard(shard, batch_size)
        check_policy(policy)
        self.policy = policy
        self.images, self.global_batch, self.norm, self.seed = images, batch_size, norm, seed
        self.device, self.part = device, shard_slice(batch_size, shard)
        self.batch_size = self.part.stop - self.part.start
        self.geo = _Geometry(True, batch_size, self.part, seed)
        self.loader, self.keys = images.loader_of(self.geo)

    def __len__(self) -> int:
        return len(self.images) // self.global_batch

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        _, g = epoch_order(self.seed, epoch, len(self.images), self.device)  # g as in memory
        self.keys.keys = [(epoch, i) for i in range(len(self))]
        for item in _items(self.loader):
            x, y = self.images.on_device(item, self.device, epoch, self.geo)
            if self.images.augment == "pad":
                params = tuple(p[self.part] for p in crop_flip_params(self.global_batch, g))
                x = apply_crop_flip(x, params)
            x = augment_policy(x, g, self.global_batch, self.part, self.policy)
            yield self.norm(x), y


# -- splits of encoded data ------------------------------------------------------------------


def _exact_stats(counts: tuple[int, list[int], list[int]]) -> tuple[tuple, tuple]:
    """Mean and (unbiased) std per channel in [0, 1] from exact integer sums of the uint8
    pixels: n pixels per channel, sums, sums of squares."""
    n, s, ss = counts
    mean = tuple(si / (255 * n) for si in s)
    std = tuple(math.sqrt((n * q - si * si) / (n * (n - 1))) / 255 for si, q in zip(s, ss))
    return mean, std


def train_stats(images: EncodedSet, key: str) -> tuple[tuple, tuple]:
    """The training split's mean/std, as the in-memory path computes them (over every pixel at
    S x S, before augmentation), from one streamed pass, cached as `stats-<key>.json` under
    `base.cache_dir()` (best-effort)."""
    path = cache_dir() / f"stats-{key}.json"
    if path.exists():
        try:
            got_ = json.loads(path.read_text())
            return tuple(got_["mean"]), tuple(got_["std"])
        except (OSError, ValueError, KeyError):
            pass
    n, s, ss = 0, [0, 0, 0], [0, 0, 0]
    norm = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), torch.device("cpu"))
    for x, _ in images.eval_batches(256, norm, torch.device("cpu")):
        v = x.round().to(torch.int64).transpose(0, 1).reshape(3, -1)
        n += v.shape[1]
        s = [a + int(b) for a, b in zip(s, v.sum(1))]
        ss = [a + int(b) for a, b in zip(ss, (v * v).sum(1))]
    images.close_eval()  # its workers are not needed again
    mean, std = _exact_stats((n, s, ss))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"mean": mean, "std": std}))
    except OSError as exc:
        print(f"warning: mean/std not cached ({exc})", file=sys.stderr)
    return mean, std


def make_stream_splits(data: EncodedData, cfg: dict[str, Any], loader: LoaderSettings) -> Splits:
    """The streamed splits of `data`: the same indices as `base.make_splits` on the decoded data
    (`split_indices`), each split an `EncodedSet`."""
    idx = split_indices(
        len(data.train_entries), len(data.test_entries), cfg["val_size"],
        cfg.get("train_subset"), cfg.get("test_subset"), cfg.get("split_seed", 0),
    )  # fmt: skip

    def part(entries: list[str], labels: Tensor, which: Tensor) -> EncodedSet:
        chosen = [entries[i] for i in which.tolist()]
        return EncodedSet(data.source, chosen, labels[which], data.image_size, data.augment, loader)

    train = part(data.train_entries, data.train_y, idx.train)
    mean, std = data.mean, data.std
    if mean is None or std is None:
        mean, std = train_stats(train, f"{data.stats_key}-{idx.val_hash}-{len(train)}")
    return Splits(
        train=train,
        val=part(data.train_entries, data.train_y, idx.val),
        classes=data.classes,
        mean=mean,
        std=std,
        val_hash=idx.val_hash,
        data_hash=data.digest,
        image_size=data.image_size,
        _test=part(data.test_entries, data.test_y, idx.test),
    )
