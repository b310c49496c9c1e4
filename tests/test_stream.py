"""The streaming data path (benchmark.data.stream) and the `imagenet:` dataset kind.

Tiny generated JPEG layouts in tmp_path; every streamed batch is compared with the in-memory
path's (or torchvision's) by equality, not closeness.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import FAST
from torchvision.io import encode_jpeg

from benchmark import data as datasets
from benchmark.config import resolve
from benchmark.data import stream
from benchmark.data.pipeline import Normalizer, TensorSet
from benchmark.errors import ConfigError
from benchmark.record import schema
from benchmark.training.train import CellOptions, train_cell

CPU = torch.device("cpu")
NORM = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), CPU)


def write_jpegs(root: Path, splits: dict[str, int], classes=("n01", "n02", "n03"), size=16) -> Path:
    """`splits` = {split folder: images per class}; noise JPEGs of `size` px (or (h, w))."""
    g = torch.Generator().manual_seed(0)
    h, w = (size, size) if isinstance(size, int) else size
    for split, per_class in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
                (root / split / c / f"{i}.JPEG").write_bytes(encode_jpeg(img).numpy().tobytes())
    return root


def data_cfg(**over) -> dict:
    cfg = {"root": "./data", "download": False, "val_size": 6, "train_subset": None,
           "test_subset": None, "split_seed": 0, "image_size": None,
           "in_memory": "auto"}  # fmt: skip
    cfg.update(over)
    return cfg


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_jpegs(tmp_path / "pets", {"train": 14, "test": 5})


def splits_of(path: Path, in_memory: bool, workers: int = 0, **over):
    name = f"imagefolder:{path}"
    runtime = {"loader_workers": workers, "prefetch": 2, "decode": "cpu"}
    return datasets.load_splits(name, data_cfg(in_memory=in_memory, **over), runtime, CPU)


def batches(source, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(source.epoch(epoch))


def assert_same(a, b) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_the_in_memory_ones(folder, workers):
    mem, streamed = splits_of(folder, True), splits_of(folder, False, workers)
    assert mem.in_memory and not streamed.in_memory
    assert isinstance(mem.train, TensorSet) and isinstance(streamed.train, stream.EncodedSet)
    assert mem.mean + mem.std == pytest.approx(streamed.mean + streamed.std, rel=1e-12)
    assert mem.val_hash == streamed.val_hash and len(mem.val) == len(streamed.val) == 6
    norm = Normalizer(mem.mean, mem.std, CPU)
    a = mem.train.train_batches(8, norm, 3, CPU)
    b = streamed.train.train_batches(8, norm, 3, CPU)
    for epoch in (0, 1):
        assert_same(batches(a, epoch), batches(b, epoch))
    for split in ("val", "test"):
        ma, sa = (mem.val, streamed.val) if split == "val" else (mem.test(), streamed.test())
        assert_same(list(ma.eval_batches(4, norm, CPU)), list(sa.eval_batches(4, norm, CPU)))


def test_a_resumed_loader_sees_the_batches_it_missed(folder):
    first = splits_of(folder, False).train.train_batches(8, NORM, 5, CPU)
    uninterrupted = [batches(first, e) for e in range(3)]
    assert not torch.equal(uninterrupted[1][0][1], uninterrupted[2][0][1])
    resumed = splits_of(folder, False, workers=1).train.train_batches(8, NORM, 5, CPU)
    next(iter(resumed.epoch(0)))  # a pass left unfinished (BN calibration, saliency batches)
    for e in (2, 1):  # a new process resuming at epoch e, any worker count
        assert_same(batches(resumed, e), uninterrupted[e])


def test_streamed_policy_batches_equal_the_in_memory_ones(folder):
    """train.augment_policy runs on the device after the crop/flip in both paths, with the same
    draws: streamed batches (whole and sharded) equal the in-memory ones."""
    mem, streamed = splits_of(folder, True), splits_of(folder, False, 1)
    for shard in ((0, 1), (1, 2)):
        a = mem.train.train_batches(8, NORM, 3, CPU, shard, "autoaugment_cifar10")
        b = streamed.train.train_batches(8, NORM, 3, CPU, shard, "autoaugment_cifar10")
        for epoch in (0, 1):
            assert_same(batches(a, epoch), batches(b, epoch))
    plain = batches(streamed.train.train_batches(8, NORM, 3, CPU, (1, 2)), 0)
    assert not torch.equal(plain[0][0], batches(b, 0)[0][0])  # the policy did apply


@pytest.mark.parametrize("in_memory", [True, False])
def test_shards_concatenate_to_the_unsharded_batches(folder, in_memory):
    s = splits_of(folder, in_memory)
    whole = batches(s.train.train_batches(8, NORM, 1, CPU), 0)
    parts = [batches(s.train.train_batches(8, NORM, 1, CPU, (r, 2)), 0) for r in range(2)]
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]), x)
        assert torch.equal(torch.cat([parts[0][i][1], parts[1][i][1]]), y)
    test = s.test()
    full = list(test.eval_batches(4, NORM, CPU))
    shards = [list(test.eval_batches(4, NORM, CPU, (r, 3))) for r in range(3)]
    lens = [test.shard_len((r, 3)) for r in range(3)]
    assert lens == [5, 5, 5] and sum(lens) == len(test) == 15
    for k in (0, 1):
        cat = torch.cat([xb for part in shards for xb in (b[k] for b in part)])
        assert torch.equal(cat, torch.cat([b[k] for b in full]))
    with pytest.raises(ConfigError, match=r"batch_size 8 is not divisible by the world size 3; "):
        s.train.train_batches(8, NORM, 1, CPU, (0, 3))


@pytest.mark.parametrize("hw", [(300, 400), (50, 500), (500, 40), (64, 64)])
def test_rrc_params_follow_torchvision(hw):
    from torchvision.transforms import RandomResizedCrop

    img = torch.zeros(3, *hw)
    for seed in range(40):
        torch.manual_seed(seed)  # torchvision draws from the global generator
        want = RandomResizedCrop.get_params(img, list(stream.RRC_SCALE), list(stream.RRC_RATIO))
        got = stream.rrc_params(*hw, torch.Generator().manual_seed(seed))
        assert got == tuple(want), (hw, seed)


def test_auto_streams_when_the_budget_is_small(folder, monkeypatch, capsys):
    monkeypatch.setattr(stream, "free_bytes", lambda device: 10_000)
    s = splits_of(folder, "auto")
    assert not s.in_memory and isinstance(s.train, stream.EncodedSet)
    need = 3 * (14 + 5) * 3 * 16 * 16
    said = capsys.readouterr().err
    gib = f"{need / 2**30:.2f} GiB"
    assert f"streaming: data.in_memory=auto: decoded 57 x 3 x 16 x 16 = {gib} >" in said
    monkeypatch.setattr(stream, "free_bytes", lambda device: 2 * need)
    s = splits_of(folder, "auto")
    assert s.in_memory and "in memory: data.in_memory=auto" in capsys.readouterr().err


def test_imagenet_eval_is_resize_then_centre_crop(tmp_path):
    from torchvision.transforms import v2

    img = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8)
    ref = v2.Compose([v2.Resize(round(24 * 256 / 224), antialias=True), v2.CenterCrop(24)])
    assert torch.equal(stream.eval_crop(img, 24), ref(img))
    g = torch.Generator().manual_seed(3)
    out = stream.rrc_flip(img, 24, g)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def imagenet_cell(path: Path, tmp_path: Path, **sets):
    over = {**FAST, "runtime.workdir": str(tmp_path / "runs"), "data.image_size": 32,
            "data.val_size": 6, "data.train_subset": None, "data.test_subset": None,
            "train.batch_size": 8, "train.eval_batch_size": 8, "train.epochs": 1,
            "runtime.loader_workers": 1, **sets}  # fmt: skip
    return resolve("us_mobilenet_v1", f"imagenet:{path}", "sandwich", 0, "smoke", over)


def test_a_tiny_imagenet_layout_trains_a_streamed_cell(tmp_path, tracking_uri, client):
    path = write_jpegs(tmp_path / "ilsvrc", {"train": 10, "val": 3}, size=(40, 56))
    assert datasets.describe(f"imagenet:{path}", data_cfg()) == (3, 224)
    cfg = imagenet_cell(path, tmp_path, **{"data.in_memory": False})
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    run = client.get_run(result.run_id)
    assert run.data.tags["flexbench.data_in_memory"] == "false"
    assert len(run.data.tags["flexbench.data_hash"]) == 16 and len(result.rows) >= 2
    assert all(math.isfinite(r["top1"]) for r in result.rows)


def test_imagenet_without_its_files_is_described_but_not_read():
    assert datasets.describe("imagenet", data_cfg()) == (1000, 224)
    with pytest.raises(ConfigError, match=r"imagenet needs a path to read its files: imagenet:"):
        datasets.check("imagenet", data_cfg())


def test_bad_imagenet_layouts_name_what_was_expected(tmp_path):
    no_val = write_jpegs(tmp_path / "a", {"train": 1})
    with pytest.raises(ConfigError, match=r"has no val/<class>/<image> files; expected train/ and"):
        datasets.describe(f"imagenet:{no_val}", data_cfg())
    differ = write_jpegs(tmp_path / "b", {"train": 1})
    write_jpegs(differ, {"val": 1}, classes=("n01", "n09"))
    with pytest.raises(ConfigError, match=r"only in train/: n02, n03; only in val/: n09"):
        datasets.describe(f"imagenet:{differ}", data_cfg())
    flat = write_jpegs(tmp_path / "c", {"train": 1})
    (flat / "val").mkdir()
    (flat / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"val/ holds 1 images directly .* valprep\.sh"):
        datasets.describe(f"imagenet:{flat}", data_cfg())


def test_bad_streaming_settings_fail_before_any_work(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"data.in_memory false: dataset synthetic is always"):
        datasets.check("synthetic", data_cfg(in_memory=False))
    with pytest.raises(ConfigError, match=r"data.in_memory true: dataset imagenet only streams"):
        datasets.check(f"imagenet:{folder}", data_cfg(in_memory=True))
    with pytest.raises(ConfigError, match=r"data.in_memory must be auto, true or false, got 'yes'"):
        resolve("msdnet", "synthetic", "joint", 0, "smoke", {"data.in_memory": "yes"})
    with pytest.raises(ConfigError, match=r"runtime.decode must be cpu or cuda, got 'gpu'"):
        resolve("msdnet", "synthetic", "joint", 0, "smoke", {"runtime.decode": "gpu"})
    with pytest.raises(ConfigError, match=r"runtime.loader_workers must be an integer >= 0"):
        resolve("msdnet", "synthetic", "joint", 0, "smoke", {"runtime.loader_workers": -1})
    with pytest.raises(ConfigError, match=r"runtime.decode cuda needs a CUDA device, .* cpu"):
        stream.LoaderSettings.of({"decode": "cuda"}, CPU)


@pytest.mark.parametrize("workers", [0, 1])
def test_an_undecodable_streamed_image_is_one_line_naming_it(folder, workers):
    (folder / "train" / "n02" / "3.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError) as err:  # the mean/std pass reads it, before training
        splits_of(folder, False, workers, val_size=1)
    assert str(err.value).startswith(f"cannot decode image {folder}/train/n02/3.JPEG (Not a JPEG")
    assert "\n" not in str(err.value)


def test_in_memory_setting_does_not_change_the_cell_key(folder):
    from benchmark.config import cell_key

    name, size = f"imagefolder:{folder}", {"data.image_size": 32}
    keys = {
        cell_key(resolve("msdnet", name, "joint", 0, "smoke", {"data.in_memory": v, **size}))
        for v in ("auto", True, False)
    }
    assert len(keys) == 1


def test_a_streamed_cell_interrupted_after_an_epoch_resumes_to_the_uninterrupted_result(
    tmp_path, tracking_uri, client
):
    path = write_jpegs(tmp_path / "pets", {"train": 12, "test": 4}, size=32)
    over = {**FAST, "runtime.workdir": str(tmp_path / "runs"), "data.val_size": 6,
            "data.train_subset": None, "data.test_subset": None, "train.batch_size": 10,
            "train.epochs": 2, "data.in_memory": False, "runtime.loader_workers": 1}  # fmt: skip
    cfg = resolve("msdnet", f"imagefolder:{path}", "joint", 0, "smoke", over)

    def stop_after_first(epoch: int, metrics: dict) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    opts = {"tracking_uri": tracking_uri, "progress": False, "experiment": "killed"}
    with pytest.raises(KeyboardInterrupt):
        train_cell(cfg, CellOptions(**opts, epoch_callback=stop_after_first))
    resumed = train_cell(cfg, CellOptions(**opts, resume=True))
    reference = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, experiment="reference",
                                            progress=False))  # fmt: skip
    final = {k: v for k, v in reference.metrics.items() if not schema.is_wall_time(k)}
    assert {k: resumed.metrics[k] for k in final} == final
    losses = [  # the second epoch's training loss: the resumed cell saw the same batches
        [m.value for m in client.get_metric_history(r.run_id, "train/loss") if m.step == 1]
        for r in (resumed, reference)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 1
