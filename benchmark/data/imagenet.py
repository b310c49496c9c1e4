"""`imagenet:<dir or .zip>`: the ILSVRC-2012 folder layout, always streamed.

`train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG` (any number of class folders, the same in both;
1000 for ILSVRC-2012). `val/` is flexbench's test split; the validation split is carved from
train by `data.split_seed` as for every dataset. Training: RandomResizedCrop to
`data.image_size` (default 224) + horizontal flip; evaluation: short side to S * 256 / 224,
centre crop S; ImageNet mean/std (`benchmark.data.stream`). Listing, system-file skipping and
the class index are imagefolder's. Never held in memory: RandomResizedCrop needs the full-size
images (~1.3 M of them, ~140 GB as uint8 at their own sizes), and storing them pre-cropped would
change the augmentation; the in-memory downsampled variants are `imagenet32` / `imagenet64`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.data import register_dataset
from benchmark.data.base import DatasetSpec, EncodedData, ImageData
from benchmark.data.imagefolder import (
    IMAGE_EXT,
    Index,
    _images,
    _index,
    _listing,
    encoded,
    names_and_sizes,
)
from benchmark.data.stream import IMAGENET_MEAN, IMAGENET_STD
from benchmark.errors import ConfigError, got

NUM_CLASSES, SIZE = 1000, 224  # ILSVRC-2012 classes; the crop of the papers' ImageNet networks
SPLITS = ("train", "val")
LAYOUT = "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG in a dir or .zip (ILSVRC-2012)"
VAL_FIX = (
    "sort val/ into one folder per class first: the well-known valprep.sh (from the "
    "soumith/imagenetloader.torch repository) moves each file into its wnid folder, or use the "
    "devkit's ground truth (ILSVRC2012_validation_ground_truth.txt with meta.mat); see docs/data.md"
)


def _layout(arg: str | None) -> tuple[Path, dict[str, tuple[int, int]], Index]:
    """(path, listing, {train, val} index); ConfigError for a missing split, differing classes
    or a flat (devkit) val folder."""
    path = Path(str(arg)).expanduser()
    listing = _listing(path, "imagenet")
    flat = [n for n in listing if n.count("/") == 1 and n.startswith("val/")]
    flat = [n for n in flat if n.lower().endswith(IMAGE_EXT)]
    if flat:
        raise ConfigError(
            f"{path}: val/ holds {len(flat)} images directly (e.g. {flat[0]}), the flat layout of "
            f"the ILSVRC-2012 download; expected val/<wnid>/*.JPEG: {VAL_FIX}"
        )
    return path, listing, _index(path, list(listing), SPLITS)


def _size(cfg: dict[str, Any]) -> int:
    size = cfg.get("image_size")
    if size is None:
        return SIZE
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ConfigError(f"data.image_size must be an integer >= 8 (imagenet: 224), {got(size)}")
    return size


def describe(arg: str | None, cfg: dict[str, Any]) -> tuple[int, int]:
    """(class folders, image size); (1000, 224) without a path (`flexbench info`)."""
    if arg is None:
        return NUM_CLASSES, _size(cfg)
    return len(_layout(arg)[2]["train"]), _size(cfg)


def load_encoded(arg: str | None, cfg: dict[str, Any]) -> EncodedData:
    path, listing, index = _layout(arg)
    digest = names_and_sizes("imagenet", listing, _images(index)).partition("@")[2]  # 16 hex
    return encoded(
        path.resolve(), index, _size(cfg), "rrc", digest, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


def load(arg: str | None, cfg: dict[str, Any]) -> ImageData:
    raise ConfigError("imagenet is never decoded into memory; set data.in_memory to auto or false")


def identity(arg: str | None) -> str:
    """`imagenet@<16 hex digits>`: every image's entry name and byte size (as imagefolder)."""
    _, listing, index = _layout(arg)
    return names_and_sizes("imagenet", listing, _images(index))


def train_size(arg: str | None, cfg: dict[str, Any]) -> int:
    return sum(len(v) for v in _layout(arg)[2]["train"].values())


register_dataset(
    DatasetSpec(
        "imagenet",
        describe,
        load,
        LAYOUT,
        needs_arg=True,
        train_size=train_size,
        identity=identity,
        load_encoded=load_encoded,
        in_memory_ok=False,
        describe_bare=True,
    )
)
