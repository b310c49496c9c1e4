"""Data: disjoint, seeded train/val splits (synthetic and imagefolder dir/zip), a test split
read only by the final evaluation, and the batched augmentation."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, all_runs, smoke_cfg
from PIL import Image

from benchmark import data as datasets
from benchmark.config import cell_key, resolve
from benchmark.data import imagefolder
from benchmark.data.pipeline import Normalizer, TrainBatches, crop_flip
from benchmark.errors import ConfigError
from benchmark.training.train import CellOptions, train_cell

CLASSES = ["cat", "dog", "emu"]
PER_CLASS = {"train": 12, "test": 4}


def data_cfg(**over) -> dict:
    cfg = {"root": "./data", "download": False, "val_size": 10, "train_subset": None,
           "test_subset": None, "split_seed": 0, "image_size": None}  # fmt: skip
    cfg.update(over)
    return cfg


def image_ids(x: torch.Tensor) -> list[int]:
    """Our generated images carry their global id in pixel (0, 0): R*256 + G."""
    return [int(img[0, 0, 0]) * 256 + int(img[1, 0, 0]) for img in x]


def write_tree(root: Path) -> Path:
    """train/<class>/*.png and test/<class>/*.png; every image unique, 16x16."""
    uid = 0
    rng = np.random.default_rng(0)
    for split, n in PER_CLASS.items():
        for label, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                img[0, 0] = (uid // 256, uid % 256, label)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
                uid += 1
    return root


def write_zip(tree: Path, path: Path) -> Path:
    """Every file under `tree` (hidden ones included) as a zip entry of the same name."""
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(p for p in tree.rglob("*") if p.is_file()):
            z.write(f, f.relative_to(tree).as_posix())
    return path


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("imgs") / "tiny")


@pytest.fixture(scope="module")
def image_zip(image_tree) -> Path:
    return write_zip(image_tree, image_tree.parent / "tiny.zip")


def check_disjoint(splits, n_train_total: int) -> None:
    train = [bytes(x.numpy().tobytes()) for x in splits.train.x]
    val = [bytes(x.numpy().tobytes()) for x in splits.val.x]
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)
    assert len(train) + len(val) <= n_train_total


def test_synthetic_split_is_disjoint_and_seeded():
    cfg = data_cfg(val_size=200, train_subset=500)
    a = datasets.load_splits("synthetic", cfg)
    assert (a.val.x.shape[0], a.train.x.shape[0]) == (200, 500)
    check_disjoint(a, 2000)
    full = datasets.load_splits("synthetic", data_cfg(val_size=200))
    assert full.train.x.shape[0] == 1800
    check_disjoint(full, 2000)
    b = datasets.load_splits("synthetic", cfg)
    assert a.val_hash == b.val_hash
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.x, b.train.x)
    assert torch.equal(a.test().x, b.test().x)
    c = datasets.load_splits("synthetic", data_cfg(val_size=200, train_subset=500, split_seed=1))
    assert c.val_hash != a.val_hash and not torch.equal(c.val.x, a.val.x)


@pytest.mark.parametrize("form", ["dir", "zip"])
def test_imagefolder_split_is_disjoint_and_seeded(form, image_tree, image_zip):
    path = image_tree if form == "dir" else image_zip
    name = f"imagefolder:{path}"
    assert datasets.describe(name, data_cfg()) == (3, 16)
    s = datasets.load_splits(name, data_cfg(val_size=9))
    assert s.classes == CLASSES
    assert s.train.x.dtype == torch.uint8 and tuple(s.train.x.shape[1:]) == (3, 16, 16)
    n_train = len(CLASSES) * PER_CLASS["train"]
    assert s.val.x.shape[0] == 9 and s.train.x.shape[0] == n_train - 9
    train_ids, val_ids = image_ids(s.train.x), image_ids(s.val.x)
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(n_train))
    test_x, test_y = s.test().x, s.test().y
    assert sorted(image_ids(test_x)) == list(range(n_train, n_train + 3 * PER_CLASS["test"]))
    for x, y in ((s.train.x, s.train.y), (s.val.x, s.val.y), (test_x, test_y)):
        assert x[:, 2, 0, 0].tolist() == y.tolist()  # labels follow the class folders
    again = datasets.load_splits(name, data_cfg(val_size=9))
    assert image_ids(again.val.x) == val_ids and again.val_hash == s.val_hash
    other = datasets.load_splits(name, data_cfg(val_size=9, split_seed=5))
    assert image_ids(other.val.x) != val_ids


def test_imagefolder_zip_and_dir_give_the_same_data(image_tree, image_zip):
    a = datasets.load_splits(f"imagefolder:{image_tree}", data_cfg(val_size=6))
    b = datasets.load_splits(f"imagefolder:{image_zip}", data_cfg(val_size=6))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.x, b.val.x)
    assert torch.equal(a.test().x, b.test().x)


def test_imagefolder_resizes_to_image_size(image_tree):
    name = f"imagefolder:{image_tree}"
    assert datasets.describe(name, data_cfg(image_size=24)) == (3, 24)
    s = datasets.load_splits(name, data_cfg(image_size=24))
    assert tuple(s.train.x.shape[1:]) == (3, 24, 24)


# --- what users' folders really hold: system files, broken images, changed data -----------
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # 24 bytes


def add_system_files(root: Path) -> None:
    """What copies from macOS and Windows leave next to the images (none is data)."""
    (root / "train/dog/._005.png").write_bytes(APPLEDOUBLE)
    (root / "test/emu/._000.png").write_bytes(APPLEDOUBLE)
    (root / "train/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train/cat/Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "test/cat/desktop.ini").write_text("[.ShellClassInfo]\n")
    (root / "__MACOSX/train/dog").mkdir(parents=True)
    (root / "__MACOSX/train/dog/._005.png").write_bytes(APPLEDOUBLE)
    (root / "__MACOSX/train/dog/007.png").write_bytes(APPLEDOUBLE)
    hidden_class = root / "train/.ipynb_checkpoints"  # a hidden folder is no class
    hidden_class.mkdir()
    (hidden_class / "000.png").write_bytes((root / "train/cat/000.png").read_bytes())


@pytest.mark.parametrize("form", ["dir", "zip"])
def test_hidden_and_system_files_are_skipped(form, image_tree, tmp_path):
    root = write_tree(tmp_path / "mac")
    add_system_files(root)
    path = root if form == "dir" else write_zip(root, tmp_path / "mac.zip")
    name = f"imagefolder:{path}"
    assert datasets.describe(name, data_cfg()) == (3, 16)
    got = datasets.load_splits(name, data_cfg(val_size=6))
    clean = datasets.load_splits(f"imagefolder:{image_tree}", data_cfg(val_size=6))
    assert got.classes == CLASSES
    assert torch.equal(got.train.x, clean.train.x) and torch.equal(got.val.x, clean.val.x)
    assert torch.equal(got.test().x, clean.test().x)
    assert got.data_hash == clean.data_hash


@pytest.mark.parametrize("form", ["dir", "zip"])
def test_undecodable_images_fail_before_training_naming_their_paths(
    form, tmp_path, tracking_uri, client
):
    root = write_tree(tmp_path / "broken")
    (root / "train/dog/bad.png").write_bytes(b"not a png, 24 bytes long")
    good = (root / "test/emu/000.png").read_bytes()
    (root / "test/emu/cut.png").write_bytes(good[: len(good) // 2])  # truncated
    path = root if form == "dir" else write_zip(root, tmp_path / "broken.zip")
    shown = f"{path}:train/dog/bad.png" if form == "zip" else str(path / "train/dog/bad.png")
    with pytest.raises(ConfigError) as err:
        datasets.load_splits(f"imagefolder:{path}", data_cfg(val_size=6))
    msg = str(err.value)
    assert shown in msg and "1 other file(s) failed" in msg and "test/emu/cut.png" in msg

    sets = {**FAST, "runtime.workdir": str(tmp_path / "runs"), "data.image_size": 32}
    cfg = resolve("slimmable_mobilenet_v1", f"imagefolder:{path}", "joint", 0, "smoke", sets)
    with pytest.raises(ConfigError, match="bad.png"):
        train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    assert all_runs(client) == []  # no run was started: it failed before training


def test_changed_image_folder_is_decoded_again(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "grows")
    name = f"imagefolder:{root}"
    before = datasets.load_splits(name, data_cfg(val_size=6))
    rng = np.random.default_rng(1)
    for f in sorted((root / "test/cat").iterdir()):  # overwrite in place (same file names)
        stat = f.stat()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(f)
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    for i in range(3):  # and new training images
        img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"train/cat/new{i}.png")
    after = datasets.load_splits(name, data_cfg(val_size=6))
    assert after.train.x.shape[0] == before.train.x.shape[0] + 3
    assert not torch.equal(after.test().x, before.test().x)
    assert after.data_hash != before.data_hash

    monkeypatch.setenv("FLEXBENCH_CACHE", str(tmp_path / "fresh-cache"))
    fresh = datasets.load_splits(name, data_cfg(val_size=6))
    assert torch.equal(after.test().x, fresh.test().x) and after.data_hash == fresh.data_hash

    def no_decoding(*args):
        raise AssertionError("an unchanged folder must be read from the cache")

    monkeypatch.setattr(imagefolder, "_load_split", no_decoding)
    again = datasets.load_splits(name, data_cfg(val_size=6))
    assert again.data_hash == fresh.data_hash and torch.equal(again.train.x, fresh.train.x)


def test_cell_key_knows_an_image_folder_by_its_images_not_its_path(image_tree, tmp_path):
    """Moved, renamed or zipped, a folder keeps its cells' keys (the grid skips them, a study
    continues); an image added or rewritten to another size changes them."""

    def key(path: Path) -> str:
        sets = {"data.image_size": 32}
        return cell_key(resolve("slimmable_mobilenet_v1", f"imagefolder:{path}", "joint", 0,
                                "smoke", sets))  # fmt: skip

    before = key(image_tree)
    moved = shutil.copytree(image_tree, tmp_path / "elsewhere" / "renamed")
    assert key(moved) == before
    assert key(write_zip(moved, tmp_path / "tiny.zip")) == before
    image = moved / "train" / "cat" / "000.png"
    image.write_bytes(image.read_bytes() + b"\0")
    rewritten = key(moved)
    (moved / "test" / "dog" / "extra.png").write_bytes(image.read_bytes())
    assert len({before, rewritten, key(moved)}) == 3


def test_data_hash_identifies_the_decoded_data(image_tree, image_zip):
    a = datasets.load_splits(f"imagefolder:{image_tree}", data_cfg(val_size=6))
    b = datasets.load_splits(f"imagefolder:{image_zip}", data_cfg(val_size=9))
    assert a.data_hash == b.data_hash  # same images: same identity, whatever the container
    resized = datasets.load_splits(f"imagefolder:{image_tree}", data_cfg(image_size=24))
    synthetic = datasets.load_splits("synthetic", data_cfg())
    assert len({a.data_hash, resized.data_hash, synthetic.data_hash}) == 3
    assert synthetic.data_hash == datasets.load_splits("synthetic", data_cfg()).data_hash


def test_a_subset_larger_than_the_folder_names_the_fix(image_tree):
    """The smoke profile's 640 training images from a folder of 36: the message says what to
    pass instead."""
    with pytest.raises(ConfigError) as err:
        datasets.load_splits(f"imagefolder:{image_tree}", data_cfg(val_size=6, train_subset=640))
    msg = str(err.value)
    assert "data.train_subset 640 exceeds the 30 images available" in msg
    assert "--set data.train_subset=30" in msg and "--profile paper" in msg


def test_sealed_test_split_refuses_reads():
    s = datasets.load_splits("synthetic", data_cfg())
    s.sealed = True
    with pytest.raises(datasets.TestSplitSealed):
        s.test()
    assert s.test_reads == 0
    s.sealed = False
    s.test()
    assert s.test_reads == 1


@pytest.fixture
def spy_splits(monkeypatch):
    """Keeps every Splits object train_cell loads (the real loader does the work)."""
    seen = []
    real = datasets.load_splits

    def spy(name, cfg, runtime=None, device=None):
        seen.append(real(name, cfg, runtime, device))
        return seen[-1]

    monkeypatch.setattr(datasets, "load_splits", spy)
    return seen


def test_test_split_is_read_only_by_the_final_evaluation(spy_splits, tracking_uri, tmp_path):
    reads_at_epoch_end = []

    def on_epoch(epoch, metrics):
        reads_at_epoch_end.append(spy_splits[0].test_reads)
        assert not any(k.startswith("test/") for k in metrics)

    cfg = smoke_cfg("slimmable_mobilenet_v1", "joint", tmp_path / "runs", train__epochs=2)
    result = train_cell(
        cfg, CellOptions(tracking_uri=tracking_uri, epoch_callback=on_epoch, progress=False)
    )
    assert reads_at_epoch_end == [0, 0]
    assert spy_splits[0].test_reads == 1
    assert "test/top1_mean" in result.metrics


def test_evaluate_test_false_seals_the_test_split(spy_splits, tracking_uri, client, tmp_path):
    cfg = smoke_cfg("msdnet", "joint", tmp_path / "runs", train__epochs=1)
    result = train_cell(
        cfg, CellOptions(tracking_uri=tracking_uri, evaluate_test=False, progress=False)
    )
    (splits,) = spy_splits
    assert splits.sealed and splits.test_reads == 0
    with pytest.raises(datasets.TestSplitSealed):
        splits.test()
    assert not any(k.startswith("test/") for k in result.metrics)
    assert "val/top1_mean" in result.metrics and "val/top1/exit1" in result.metrics
    run = client.get_run(result.run_id)
    assert run.data.tags["flexbench.test_evaluated"] == "false"
    assert not any(k.startswith("test/") for k in run.data.metrics)


# --- augmentation -------------------------------------------------------------------------
def reference_crop_flip(x: torch.Tensor, dy, dx, flip, pad: int = 4) -> torch.Tensor:
    """Per sample: zero-pad by `pad`, take the HxW window at (dy, dx), mirror it if flip."""
    out = torch.empty_like(x)
    _, _, h, w = x.shape
    for i in range(x.shape[0]):
        padded = torch.zeros(x.shape[1], h + 2 * pad, w + 2 * pad, dtype=x.dtype)
        padded[:, pad : pad + h, pad : pad + w] = x[i]
        crop = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def test_crop_flip_equals_per_sample_reference():
    g0 = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 12, 10), generator=g0, dtype=torch.uint8)
    out = crop_flip(x, torch.Generator().manual_seed(7))
    # the documented draws, in order: row offsets, column offsets, flips (one each per sample)
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 9, (64, 1), generator=g)[:, 0].tolist()
    dx = torch.randint(0, 9, (64, 1), generator=g)[:, 0].tolist()
    flip = (torch.rand((64, 1), generator=g) < 0.5)[:, 0].tolist()
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, reference_crop_flip(x, dy, dx, flip))
    assert out.is_contiguous(memory_format=torch.channels_last)
    # the draws cover the whole range: every offset and both flip states occur
    assert set(dy) == set(range(9)) and set(dx) == set(range(9)) and set(flip) == {True, False}


def test_train_batches_are_seeded_normalised_channels_last():
    x = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(70)
    norm = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), torch.device("cpu"))
    batches = TrainBatches(x, y, 32, norm, seed=3, device=torch.device("cpu"))
    assert len(batches) == 2  # the last partial batch is dropped
    a, b = list(batches.epoch(0)), list(batches.epoch(0))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.float32 and xa.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(a[0][1], list(batches.epoch(1))[0][1])
    seen = torch.cat([yb for _, yb in a])
    assert len(set(seen.tolist())) == 64  # a permutation: no sample twice in an epoch
    # normalisation: (x/255 - mean)/std, float, channels_last
    out = norm(x)
    mean = torch.tensor((0.5, 0.4, 0.3)).view(1, 3, 1, 1)
    std = torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert out.is_contiguous(memory_format=torch.channels_last)
