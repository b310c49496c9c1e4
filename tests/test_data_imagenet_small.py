"""Tiny-ImageNet-200 and downsampled ImageNet (imagenet32 / imagenet64) on generated layouts:
labels, classes and test split as the official files define them, the decoded-data cache,
one-line errors before any work for every malformed layout, and a smoke cell on each."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, all_runs
from torchvision.io import encode_jpeg

from benchmark import cli
from benchmark import data as datasets
from benchmark.config import PROFILES, cell_key, resolve
from benchmark.data import downsampled_imagenet, tiny_imagenet
from benchmark.errors import ConfigError
from benchmark.training.train import CellOptions, train_cell

WNIDS = ["n03", "n01", "n02"]  # listed unsorted: class k is the k-th in sorted order
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2


def data_cfg(**over) -> dict:
    cfg = {"root": "./data", "download": False, "val_size": 3, "train_subset": None,
           "test_subset": None, "split_seed": 0, "image_size": None}  # fmt: skip
    return {**cfg, **over}


def jpeg(label: int, uid: int, size: int = 64) -> bytes:
    """A flat-colour JPEG: R encodes the label, G the image id (flat blocks decode exactly)."""
    img = torch.empty((3, size, size), dtype=torch.uint8)
    img[0], img[1], img[2] = 40 * label + 20, 8 * uid, 128
    return bytes(encode_jpeg(img, quality=95).numpy())


def write_tiny(root: Path) -> Path:
    """The tiny-imagenet-200 layout with 3 wnids, 4 train and 2 val images each, a boxes file
    per class, test/images (unlabelled) and words.txt; val files interleave the classes."""
    (root / "val/images").mkdir(parents=True)
    (root / "test/images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    uid, lines = 0, []
    for w in WNIDS:
        label = sorted(WNIDS).index(w)
        (root / f"train/{w}/images").mkdir(parents=True)
        (root / f"train/{w}/{w}_boxes.txt").write_text("")
        for i in range(TRAIN_PER_CLASS):
            (root / f"train/{w}/images/{w}_{i}.JPEG").write_bytes(jpeg(label, uid))
            uid += 1
    for i in range(VAL_PER_CLASS * len(WNIDS)):
        w = WNIDS[i % len(WNIDS)]
        (root / f"val/images/val_{i}.JPEG").write_bytes(jpeg(sorted(WNIDS).index(w), uid))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
        uid += 1
    (root / "val/val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test/images/test_0.JPEG").write_bytes(jpeg(0, 0))
    return root


def write_zip(tree: Path, path: Path, top: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(p for p in tree.rglob("*") if p.is_file()):
            z.write(f, top + f.relative_to(tree).as_posix())
    return path


def labels_of(x: torch.Tensor) -> list[int]:
    return [round((int(v) - 20) / 40) for v in x[:, 0, 32, 32]]


def one_line_error(name: str, cfg: dict | None = None, load: bool = False) -> str:
    """The ConfigError of resolving a cell on `name` and checking (or loading) its data."""
    with pytest.raises(ConfigError) as err:
        # an architecture that takes every size here (msdnet's CIFAR network refuses 64 px)
        c = resolve("slimmable_mobilenet_v1", name, "joint", 0, "smoke", {"data.val_size": 3})
        datasets.check(*datasets.cell_source(c))
        if load:
            datasets.load_splits(name, cfg or data_cfg())
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("ti") / "tiny-imagenet-200")


def test_tiny_imagenet_labels_classes_and_test_split(tiny, tmp_path):
    name = f"tiny_imagenet:{tiny}"
    assert datasets.describe(name, data_cfg()) == (3, 64)
    assert datasets.describe("tiny_imagenet", data_cfg()) == (200, 64)  # no files needed
    assert datasets.train_size(name, data_cfg()) == 12
    s = datasets.load_splits(name, data_cfg())
    assert s.classes == sorted(WNIDS) and (s.mean, s.std) == (tiny_imagenet.MEAN, tiny_imagenet.STD)
    assert s.train.x.dtype == torch.uint8 and tuple(s.train.x.shape[1:]) == (3, 64, 64)
    assert (s.train.x.shape[0], s.val.x.shape[0]) == (9, 3)
    test_x, test_y = s.test().x, s.test().y
    assert test_x.shape[0] == 6  # the labelled val images; test/images is ignored
    assert test_y.tolist() == [sorted(WNIDS).index(WNIDS[i % 3]) for i in range(6)]  # val_0..5
    for x, y in ((s.train.x, s.train.y), (s.val.x, s.val.y), (test_x, test_y)):
        assert labels_of(x) == y.tolist()
    ids = sorted(round(int(v) / 8) for v in torch.cat([s.train.x, s.val.x])[:, 1, 32, 32])
    assert ids == list(range(12))
    for top in ("tiny-imagenet-200/", ""):  # the official zip has a top folder
        other = f"tiny_imagenet:{write_zip(tiny, tmp_path / f'{len(top)}.zip', top)}"
        assert datasets.load_splits(other, data_cfg()).data_hash == s.data_hash
        assert datasets.identity(other) == datasets.identity(name)
    assert datasets.identity(f"tiny_imagenet:{tiny.parent}") == datasets.identity(name)
    assert datasets.identity(name).startswith("tiny_imagenet@")


def test_tiny_imagenet_decodes_once(tiny, monkeypatch):
    name = f"tiny_imagenet:{tiny}"
    first = datasets.load_splits(name, data_cfg())

    def no_decoding(*args):
        raise AssertionError("an unchanged dataset must be read from the cache")

    monkeypatch.setattr(tiny_imagenet, "_decode", no_decoding)
    again = datasets.load_splits(name, data_cfg())
    assert again.data_hash == first.data_hash and torch.equal(again.train.x, first.train.x)


def break_tiny(root: Path, how: str) -> None:
    if how == "no wnids.txt":
        (root / "wnids.txt").unlink()
    elif how == "no train":
        for f in sorted((root / "train").rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    elif how == "no val":
        for f in (root / "val/images").iterdir():
            f.unlink()
    elif how == "no annotations":
        (root / "val/val_annotations.txt").unlink()
    elif how == "unknown wnid":
        ann = root / "val/val_annotations.txt"
        ann.write_text(ann.read_text().replace("val_4.JPEG\tn01", "val_4.JPEG\tn99"))
    elif how == "untrained wnid":
        (root / "wnids.txt").write_text("\n".join([*WNIDS, "n04"]))


BAD_TINY = {
    "no wnids.txt": "no wnids.txt at the top or in one top folder; expected the tiny-imagenet-200",
    "no train": "no train/<wnid>/images/<image> files; expected the tiny-imagenet-200 layout",
    "no val": "no val/images/<image> files; expected the tiny-imagenet-200 layout",
    "no annotations": "val/val_annotations.txt is missing; expected the tiny-imagenet-200",
    "unknown wnid": "line 5 names wnid 'n99' (for val_4.JPEG), which wnids.txt does not list",
    "untrained wnid": "without train images: ['n04']",
}


@pytest.mark.parametrize("how", list(BAD_TINY))
def test_tiny_imagenet_bad_layouts_fail_in_one_line_before_work(how, tmp_path):
    root = write_tiny(tmp_path / "t")
    break_tiny(root, how)
    assert BAD_TINY[how] in one_line_error(f"tiny_imagenet:{root}")


def test_tiny_imagenet_refuses_images_that_are_not_64px_and_other_sizes(tmp_path):
    root = write_tiny(tmp_path / "t")
    (root / "train/n01/images/n01_2.JPEG").write_bytes(jpeg(0, 0, size=32))
    (root / "val/images/val_1.JPEG").write_bytes(b"not a JPEG")
    msg = one_line_error(f"tiny_imagenet:{root}", load=True)
    assert "2 image(s) cannot be used" in msg and "n01_2.JPEG (32x32, not 64x64)" in msg
    assert "val_1.JPEG (cannot decode" in msg
    msg = one_line_error("tiny_imagenet")
    assert "tiny_imagenet needs a path to read its files: tiny_imagenet:<dir or .zip>" in msg
    with pytest.raises(ConfigError, match="data.image_size must be 64 or null for tiny_imagenet"):
        datasets.describe("tiny_imagenet", data_cfg(image_size=32))


# --- downsampled ImageNet ----------------------------------------------------------------
ROWS = [3] * 10 + [10]  # rows of train_data_batch_1..10, then val_data


def write_npz(root: Path, size: int = 32, rows: list[int] = ROWS, seed: int = 0) -> Path:
    """The unpacked zips: <root>/Imagenet<S>_train_npz/train_data_batch_<i>.npz and
    <root>/Imagenet<S>_val_npz/val_data.npz, images (N, 3, S, S) stored channel-planar."""
    rng = np.random.default_rng(seed)
    for name, n in zip(downsampled_imagenet.FILES, rows):
        folder = root / f"Imagenet{size}_{'val' if name.startswith('val') else 'train'}_npz"
        folder.mkdir(parents=True, exist_ok=True)
        imgs = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
        labels = rng.integers(1, 1001, n).tolist()
        mean = imgs.reshape(n, -1).mean(0)
        np.savez(folder / name, data=imgs.reshape(n, -1), labels=labels, mean=mean)
    return root


def stored(root: Path, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, S, S), labels 1..1000) of every file, in file order, read back raw."""
    xs, ys = [], []
    for f in downsampled_imagenet.FILES:
        sub = "val" if f.startswith("val") else "train"
        with np.load(root / f"Imagenet{size}_{sub}_npz" / f) as z:
            xs.append(z["data"].reshape(-1, 3, size, size))
            ys.append(z["labels"])
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def npz32(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("in32"))


def test_imagenet32_images_labels_and_test_split(npz32, monkeypatch):
    name = f"imagenet32:{npz32}"
    assert datasets.describe(name, data_cfg()) == (1000, 32)
    assert datasets.describe("imagenet64", data_cfg()) == (1000, 64)  # no files needed
    assert datasets.train_size(name, data_cfg()) == 30
    x, y = stored(npz32)
    data = datasets.DATASETS.get("imagenet32").load(str(npz32), data_cfg())
    assert torch.equal(data.train_x, torch.from_numpy(x[:30]))  # planes R, G, B in file order
    assert torch.equal(data.test_x, torch.from_numpy(x[30:]))  # val_data is the test split
    assert (
        data.train_y.tolist() == (y[:30] - 1).tolist()
        and data.test_y.tolist() == (y[30:] - 1).tolist()
    )
    assert len(data.classes) == 1000
    flat = torch.from_numpy(x[:30]).transpose(0, 1).reshape(3, -1).double() / 255
    assert np.allclose(data.mean, flat.mean(1)) and np.allclose(data.std, flat.std(1))
    s = datasets.load_splits(name, data_cfg())
    assert (s.train.x.shape[0], s.val.x.shape[0], len(s.test())) == (27, 3, 10)

    def no_reading(*args):
        raise AssertionError("unchanged npz files must be read from the cache")

    monkeypatch.setattr(downsampled_imagenet, "_fill", no_reading)
    assert datasets.load_splits(name, data_cfg()).data_hash == s.data_hash
    assert datasets.identity(name).startswith("imagenet32@")


def rewrite(root: Path, file: str, **arrays) -> None:
    """Replace arrays of one npz file (the others kept)."""
    path = next(root.rglob(file))
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files}
    np.savez(path, **{**kept, **arrays})


def test_imagenet32_bad_files_fail_in_one_line_before_work(tmp_path):
    root = write_npz(tmp_path / "a")
    next(root.rglob("train_data_batch_7.npz")).unlink()
    next(root.rglob("val_data.npz")).unlink()
    msg = one_line_error(f"imagenet32:{root}")
    assert "missing train_data_batch_7.npz, val_data.npz; expected a folder holding" in msg

    wrong = write_npz(tmp_path / "b", size=64)
    msg = one_line_error(f"imagenet32:{wrong}")
    assert "data is uint8 (3, 12288), expected uint8 (N, 3072) for imagenet32" in msg
    assert "(a 64-px file: use imagenet64:)" in msg

    for arrays, expected in (
        ({"labels": [0, 5, 1001]}, "labels must be integers in 1..1000 (1-based"),
        ({"labels": [5, 6]}, "3 images but labels of shape (2,)"),
        ({"data": np.zeros((3, 3072), np.float32)}, "data is float32 (3, 3072), expected uint8"),
    ):
        bad = write_npz(tmp_path / f"c{len(expected)}")
        rewrite(bad, "train_data_batch_2.npz", **arrays)
        msg = one_line_error(f"imagenet32:{bad}")
        assert "train_data_batch_2.npz" in msg and expected in msg

    both = write_npz(write_npz(tmp_path / "d"), size=64)
    assert "several copies of train_data_batch_1.npz" in one_line_error(f"imagenet64:{both}")


def test_ls_shows_the_kinds_and_every_profile(capsys):
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    for kind in ("tiny_imagenet", "imagenet32", "imagenet64"):
        spec = datasets.DATASETS.get(kind)
        assert f"{kind + ':<path>':26s} {spec.description}" in out
    for name, prof in PROFILES.items():
        assert f"{name:26s} {prof['description']}" in out


@pytest.mark.parametrize("kind", ["tiny_imagenet", "imagenet32"])
def test_smoke_cell_trains(kind, tiny, npz32, tracking_uri, client, tmp_path):
    """One cell end to end: msdnet on imagenet32; tiny_imagenet at 64 px on the CIFAR-style
    slimmable MobileNet (the CIFAR MSDNet's exit heads fit 32 px only)."""
    path, arch = (tiny, "slimmable_mobilenet_v1") if kind == "tiny_imagenet" else (npz32, "msdnet")
    sets = {**FAST, "runtime.workdir": str(tmp_path / "runs"), "data.val_size": 3,
            "data.train_subset": None, "data.test_subset": None, "train.epochs": 1,
            "train.batch_size": 4}  # fmt: skip
    cfg = resolve(arch, f"{kind}:{path}", "joint", 0, "smoke", sets)
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    assert result.key == cell_key(cfg) and "test/top1_mean" in result.metrics
    (run,) = [r for r in all_runs(client) if r.info.run_id == result.run_id]
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("kind,shape", [("tiny_imagenet", "200 classes, 64px"),
                                        ("imagenet32", "1000 classes, 32px")])  # fmt: skip
def test_info_needs_no_files_but_train_needs_the_path(kind, shape, tmp_path, capsys):
    args = ["--arch", "slimmable_mobilenet_v1", "--dataset", kind, "--profile", "smoke"]
    assert cli.main(["info", *args, "--repeats", "1", "--set", "arch.widths=[1.0]"]) == 0
    assert f"for {kind} ({shape}), profile smoke" in capsys.readouterr().out
    db = tmp_path / "mlflow.db"
    train = ["train", *args, "--method", "joint", "--tracking-uri", f"sqlite:///{db}"]
    assert cli.main([*train, "--set", f"runtime.workdir={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err
    assert f"dataset {kind} needs a path to read its files: {kind}:<" in err
    assert not db.exists() and not (tmp_path / "runs").exists()
