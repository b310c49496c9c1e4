"""Selected on val, reported on test: the trainer keeps the weights of the epoch with the best
mean validation top-1 and evaluates them on test at the end, next to the last epoch's."""

from __future__ import annotations

import pytest
import torch
from conftest import smoke_cfg

from benchmark.config import cell_key
from benchmark.costs import speed
from benchmark.data import load_splits
from benchmark.data.base import Splits
from benchmark.data.pipeline import Normalizer
from benchmark.training import checkpoint
from benchmark.training.build import make_model
from benchmark.training.evaluate import EvalSpec, evaluate
from benchmark.training.train import CellOptions, train_cell


def test_best_val_epoch_is_chosen_on_val_and_evaluated_on_test(
    tracking_uri, client, tmp_path, monkeypatch
):
    cfg = smoke_cfg("msdnet", "joint", tmp_path / "runs", train__epochs=4, train__lr=0.2)
    ckpt = checkpoint.cell_dir(cfg, "flexbench", cell_key(cfg)) / "checkpoint.pt"
    snapshots, reads = [], []
    real_test = Splits.test

    def spy_test(self):  # every read of the test split, with the number of epochs done then
        reads.append(len(snapshots))
        return real_test(self)

    monkeypatch.setattr(Splits, "test", spy_test)

    def on_epoch(epoch, metrics):
        snapshots.append(checkpoint.load(ckpt)["model"])

    opts = CellOptions(tracking_uri=tracking_uri, progress=False, epoch_callback=on_epoch)
    result = train_cell(cfg, opts)
    assert reads == [4]  # test read once, after the last epoch: the selection never saw it
    run = client.get_run(result.run_id)
    val_mean = [p.value for p in client.get_metric_history(result.run_id, "val/top1_mean")]
    best = max(range(4), key=lambda e: (val_mean[e], -e))  # first epoch with the best mean
    assert run.data.metrics["bestval_epoch"] == best
    # the reported numbers are those of that epoch's weights on test
    splits = load_splits("synthetic", cfg["data"])
    model = make_model(cfg, splits.num_classes, splits.image_size)
    model.load_state_dict(snapshots[best])
    norm = Normalizer(splits.mean, splits.std, torch.device("cpu"))
    spec = EvalSpec(128, norm, speed.choose(cfg, torch.device("cpu")))  # as the trainer evaluates
    acc = evaluate(model, splits.test(), spec)
    for name, a1 in zip(("exit1", "exit2", "exit3"), acc.top1):
        assert run.data.metrics[f"test/top1_bestval/{name}"] == a1
    # the last epoch's numbers stay under test/top1/<sub>
    model.load_state_dict(snapshots[-1])
    last = evaluate(model, splits.test(), spec)
    assert [run.data.metrics[f"test/top1/exit{k}"] for k in (1, 2, 3)] == last.top1
    child = {r.data.tags["flexbench.submodel"]: r for r in client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")}  # fmt: skip
    assert child["exit1"].data.metrics["top1_bestval"] == acc.top1[0]


def test_a_resumed_cell_keeps_the_best_epoch_it_had_seen(tracking_uri, client, tmp_path):
    """The best weights are part of the checkpoint: stopping after epoch 2 and resuming selects
    exactly what the uninterrupted run selects."""
    cfg = smoke_cfg("slimmable_mobilenet_v1", "ipkd", tmp_path / "runs", train__epochs=3)

    def stop_after_two(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cell(
            cfg, CellOptions(tracking_uri, "a", progress=False, epoch_callback=stop_after_two)
        )
    resumed = train_cell(cfg, CellOptions(tracking_uri, "a", resume=True, progress=False))
    whole = train_cell(cfg, CellOptions(tracking_uri, "b", progress=False))
    keys = [k for k in whole.metrics if "bestval" in k]
    assert len(keys) == 5  # 4 widths + the epoch
    assert {k: resumed.metrics[k] for k in keys} == {k: whole.metrics[k] for k in keys}


def test_sealed_cells_log_no_selection(tracking_uri, tmp_path):
    cfg = smoke_cfg("msdnet", "joint", tmp_path / "runs")
    result = train_cell(cfg, CellOptions(tracking_uri, evaluate_test=False, progress=False))
    assert not [k for k in result.metrics if "bestval" in k or k.startswith("test/")]
