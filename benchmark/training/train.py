"""Train one cell, top to bottom: prepare -> every epoch of the flat schedule -> finish.

`prepare` validates everything and builds the cell (data, model, method, optimizer, checkpoint,
MLflow run) before any work; `train_cell` then runs each remaining position (stage, epoch) of
the method's schedule: train one epoch -> the method's epoch end -> validate -> checkpoint -> log
-> callback; `finish` evaluates every sub-model once on test and writes the MLflow record.
The step itself is in `benchmark.training.step`, the checkpoint format in
`benchmark.training.checkpoint`, run statuses in `benchmark.record.tracking`.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from benchmark import data as datasets
from benchmark.config import cell_key, flatten
from benchmark.costs import speed
from benchmark.costs.axis import auc_top1, cost_axis
from benchmark.costs.flops import latency_profile
from benchmark.data.base import Splits
from benchmark.data.pipeline import Normalizer, TrainBatches
from benchmark.errors import ConfigError, TrainingError
from benchmark.files import disk_errors
from benchmark.methods import EpochContext, Method
from benchmark.models import FlexibleModel, IndependentModel
from benchmark.record import schema, tracking
from benchmark.training import checkpoint
from benchmark.training.bn_calib import calibrator
from benchmark.training.budgeted import budgeted_curve
from benchmark.training.build import (
    lr_at,
    make_method,
    make_model,
    new_optimizer,
    pick_device,
    set_lr,
)
from benchmark.training.evaluate import EvalHow, evaluate
from benchmark.training.plan import CellPlan, Position, plan_cell
from benchmark.training.spectrum import spectrum_rows
from benchmark.training.step import StepResult, make_step, step_generator

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class CellOptions:
    """How to run a cell. `evaluate_test=False` seals the test split (studies: final metrics on
    val only); `epoch_callback(global epoch, metrics)` runs after every epoch's checkpoint and
    may raise CellPruned (run marked `pruned`) or anything else (run marked `failed`)."""

    tracking_uri: str | None = None
    experiment: str | None = None
    resume: bool = False
    restart: bool = False
    evaluate_test: bool = True
    epoch_callback: EpochCallback | None = None
    progress: bool = True
    extra_tags: dict[str, str] = field(default_factory=dict)


@dataclass
class CellResult:
    key: str
    run_id: str
    rows: list[dict[str, Any]]
    metrics: dict[str, float]


@dataclass
class BestVal:
    """The weights of the epoch with the best mean validation top-1 over the sub-models (one
    CPU copy of the network, also kept in the checkpoint). The mean, not one best epoch per
    sub-model: the sub-models share their weights, so one selected network is deployed, and a
    per-sub-model choice would need K copies. Ties keep the earlier epoch."""

    epoch: int = -1
    mean: float = float("-inf")
    model: dict[str, Tensor] | None = None

    def update(self, epoch: int, mean: float, model: FlexibleModel) -> None:
        if mean > self.mean:
            self.epoch, self.mean = epoch, mean
            self.model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "mean": self.mean, "model": self.model}


@dataclass
class PreparedCell:
    """Everything a cell's training loop touches, built once by `prepare`."""

    cfg: dict[str, Any]
    key: str
    plan: CellPlan
    model: FlexibleModel
    method: Method
    optimizer: torch.optim.Optimizer
    splits: Splits
    batches: TrainBatches
    norm: Normalizer
    device: torch.device
    amp: bool
    run: tracking.CellRun
    ckpt: Path
    start: int
    opts: CellOptions
    best: BestVal = field(default_factory=BestVal)

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp)

    def calibrate(self):
        """BN recalibration before each sub-model's evaluation (`train.bn_calib_batches` > 0,
        training batches only; see `benchmark.training.bn_calib`), else None."""
        return calibrator(self.model, self.batches.epoch, self.cfg["train"]["bn_calib_batches"])


def train_cell(cfg: dict[str, Any], opts: CellOptions | None = None) -> CellResult:
    """Train and evaluate one resolved cell; returns its per-sub-model results. Raises
    ConfigError (before any work) for bad input and TrainingError for a diverging cell."""
    opts = opts or CellOptions()
    cell = prepare(cfg, opts)
    with cell.run.status_on_exit():
        step = None
        for pos in cell.plan.positions(cell.start):
            if step is None or pos.epoch == 0:
                stage = cell.plan.stages[pos.stage]
                step = make_step(
                    cell.model, cell.method, stage, cell.device, cell.amp, cfg["runtime"]["compile"]
                )
            metrics = train_epoch(cell, step, pos)
            metrics.update(cell.method.epoch_end(_epoch_context(cell, pos)))
            metrics.update(validate(cell))
            cell.best.update(pos.index, metrics[schema.TOP1_MEAN.format(split="val")], cell.model)
            if pos.last_of_stage and not pos.last:  # each stage of a chain starts fresh
                cell.optimizer = new_optimizer(cell.model, cell.method, cfg["train"])
            save_checkpoint(cell, pos, metrics)
            cell.run.log_metrics(metrics, pos.index)
            if opts.progress:
                _progress_line(_epoch_line(cell, pos, metrics))
            if opts.epoch_callback is not None:
                opts.epoch_callback(pos.index, metrics)
        # the artifact files are made in the temporary folder, then copied to MLflow's store
        with disk_errors(Path(tempfile.gettempdir()), FINISH_FIX):
            return finish(cell)


FINISH_FIX = "make room there, then rerun with --resume to finish the cell (its training is kept)"


def prepare(cfg: dict[str, Any], opts: CellOptions) -> PreparedCell:
    """Validate, build and restore everything; nothing is discarded (`--restart`) or written
    until every check has passed and the MLflow run is open."""
    experiment = opts.experiment or tracking.DEFAULT_EXPERIMENT
    key = cell_key(cfg)
    datasets.check(cfg["data"]["name"], cfg["data"])
    device = pick_device(str(cfg["runtime"]["device"]))
    num_classes, image_size = datasets.describe(cfg["data"]["name"], cfg["data"])
    model = make_model(cfg, num_classes, image_size)
    plan = plan_cell(cfg, model)
    method = make_method(cfg, plan.num_submodels)
    uri = tracking.resolve_uri(opts.tracking_uri)
    ckpt = checkpoint.cell_dir(cfg, experiment, key) / "checkpoint.pt"
    state = _existing_checkpoint(ckpt, opts)
    run = _open_run(uri, experiment, ckpt, state)
    if cfg["runtime"]["threads"]:
        torch.set_num_threads(cfg["runtime"]["threads"])
    fast = speed.choose(cfg, device)
    splits, batches, norm = _load_data(cfg, device, fast, sealed=not opts.evaluate_test)
    model = model.to(device, memory_format=fast.torch_format)
    method = method.to(device)
    optimizer = new_optimizer(model, method, cfg["train"])
    start = 0
    if state is not None:
        modules = {"model": model, "method": method, "optimizer": optimizer}
        stage, epoch = checkpoint.restore(state, modules, device)
        start = stage * plan.epochs + epoch
    tags = {
        **tracking.environment_tags(device, torch.get_num_threads()),
        schema.SPLIT_SEED: str(cfg["data"]["split_seed"]),
        schema.VAL_HASH: splits.val_hash,
        schema.DATA_HASH: splits.data_hash,
        schema.TEST_EVALUATED: str(opts.evaluate_test).lower(),
        **fast.tags(),
        **opts.extra_tags,
    }
    run.start(cfg, key, flatten(cfg), tags, run_id=state["run_id"] if state else None)
    cell = PreparedCell(
        cfg, key, plan, model, method, optimizer, splits, batches, norm, device, fast.amp, run,
        ckpt, start, opts,
    )  # fmt: skip
    if opts.restart:
        ckpt.unlink(missing_ok=True)
    if state is not None:
        cell.best = BestVal(**state["best"])
        _log_pending_metrics(run, state)
        _progress_line(f"resuming cell {key} at stage {stage + 1}, epoch {epoch + 1}")
    return cell


def _existing_checkpoint(ckpt: Path, opts: CellOptions) -> dict[str, Any] | None:
    """The checkpoint to resume from (with --resume), None (none, or --restart), else an error:
    an existing checkpoint is never silently overwritten."""
    if not ckpt.exists() or opts.restart:
        return None
    if opts.resume:
        return checkpoint.load(ckpt)
    raise ConfigError(
        f"a checkpoint of this cell exists ({ckpt}); pass --resume to continue it "
        f"or --restart to discard it"
    )


def _open_run(
    uri: str, experiment: str, ckpt: Path, state: dict[str, Any] | None
) -> tracking.CellRun:
    """The cell's MLflow record, checked before any work: the store is reachable and has its
    schema, the experiment is not deleted, and a resumed checkpoint's run can still be
    continued (else ConfigError naming the fix; the checkpoint is left as it is)."""
    if state is not None and (why := tracking.missing_run(uri, experiment, state.get("run_id"))):
        raise ConfigError(
            f"cannot resume {ckpt}: {why}; pass --restart to train the cell from scratch "
            f"(the checkpoint is kept until then)"
        )
    tracking.open_store(uri)
    return tracking.CellRun(uri, experiment)


def _load_data(
    cfg: dict[str, Any], device: torch.device, fast: speed.Speed, sealed: bool
) -> tuple[Splits, TrainBatches, Normalizer]:
    splits = datasets.load_splits(cfg["data"]["name"], cfg["data"])
    splits.sealed = sealed
    norm = Normalizer(splits.mean, splits.std, device, fast.torch_format)
    t = cfg["train"]
    batches = TrainBatches(
        splits.train_x, splits.train_y, t["batch_size"], norm, cfg["seed"], device
    )
    if len(batches) == 0:
        raise ConfigError(
            f"train.batch_size {t['batch_size']} exceeds the {splits.train_x.shape[0]} "
            f"training images"
        )
    if t["bn_calib_batches"] > len(batches):
        raise ConfigError(
            f"train.bn_calib_batches {t['bn_calib_batches']} exceeds the {len(batches)} training "
            f"batches of {t['batch_size']} images; valid: 0..{len(batches)}"
        )
    return splits, batches, norm


def _log_pending_metrics(run: tracking.CellRun, state: dict[str, Any]) -> None:
    """The checkpoint holds the metrics of the epoch it closed; a kill after the checkpoint and
    before they reached MLflow leaves them unlogged: log them now, exactly once."""
    metrics, step = state.get("metrics"), state.get("metrics_step")
    if metrics and not run.has_metric_at("train/loss", step):
        run.log_metrics(metrics, step)


def train_epoch(
    cell: PreparedCell, step: Callable[[Tensor, Tensor], StepResult], pos: Position
) -> dict[str, float]:
    """One pass over the training batches; metrics stay on the device until the epoch ends
    (one host sync per `runtime.log_every` steps, to catch a diverging loss early)."""
    t0 = time.perf_counter()
    cell.model.train()
    if isinstance(cell.model, IndependentModel):
        for t in cell.plan.stages[pos.stage].frozen_teachers:
            cell.model.members[t].eval()
    steps, log_every = len(cell.batches), cell.cfg["runtime"]["log_every"]
    loss_sum = torch.zeros((), device=cell.device)
    term_sums: dict[str, Tensor] = {}
    correct = torch.zeros(cell.plan.num_submodels, device=cell.device)
    bar = tqdm(
        total=steps,
        disable=not (cell.opts.progress and sys.stderr.isatty()),
        desc=f"epoch {pos.index + 1}/{cell.plan.total_epochs}",
        leave=False,
    )
    lr = cell.cfg["train"]["lr"]
    trained: set[int] = set()  # sub-models this epoch's steps trained (drawn widths: a subset)
    for i, (xb, yb) in enumerate(cell.batches.epoch(pos.epoch)):
        lr = lr_at(cell.cfg["train"], pos.epoch, i, steps)
        set_lr(cell.optimizer, lr)
        out = step(xb, yb, step_generator(cell.cfg["seed"], pos.index, i))
        trained.update(out.logits)
        cell.optimizer.step()
        cell.optimizer.zero_grad(set_to_none=True)
        loss_sum += out.loss
        for name, v in out.terms.items():
            term_sums[name] = term_sums.get(name, 0) + v
        for k, z in out.logits.items():
            correct[k] += (z.argmax(1) == yb).sum()
        if (i + 1) % log_every == 0:
            _check_finite(loss_sum.item() / (i + 1), pos, f", step {i + 1}")
            bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.3f}", lr=f"{lr:.3g}")
        bar.update()
    bar.close()
    metrics = {"train/loss": loss_sum.item() / steps, "lr": lr}
    _check_finite(metrics["train/loss"], pos, "")
    metrics.update({f"train/loss_terms/{n}": float(v) / steps for n, v in term_sums.items()})
    seen = steps * cell.batches.batch_size
    for k in sorted(trained):
        metrics[f"train/top1/{cell.plan.names[k]}"] = float(correct[k]) * 100 / seen
    metrics["time/epoch_s"] = time.perf_counter() - t0
    return metrics


def _check_finite(loss: float, pos: Position, where: str) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"non-finite loss at epoch {pos.index + 1}{where}; lower train.lr or check the data"
        )


def _epoch_context(cell: PreparedCell, pos: Position) -> EpochContext:
    stage = cell.plan.stages[pos.stage]
    return EpochContext(
        cell.model, stage, pos.epoch, cell.plan.epochs, cell.batches.epoch, cell.autocast
    )


def validate(cell: PreparedCell) -> dict[str, float]:
    """`val/top1/<sub>` of every sub-model and their mean, on the validation split."""
    val = (cell.splits.val_x, cell.splits.val_y)
    t = cell.cfg["train"]
    acc = evaluate(
        cell.model, val, t["eval_batch_size"], cell.norm, cell.amp, False, cell.calibrate()
    )
    top1 = schema.FIELDS["top1"]
    metrics = {top1.parent_key(n, "val"): v for n, v in zip(cell.plan.names, acc.top1)}
    metrics[schema.TOP1_MEAN.format(split="val")] = sum(acc.top1) / len(acc.top1)
    return metrics


def save_checkpoint(cell: PreparedCell, pos: Position, metrics: dict[str, float]) -> None:
    """Atomically save the state after `pos`, pointing at the next (stage, epoch)."""
    nxt = pos.index + 1
    modules = {"model": cell.model, "method": cell.method, "optimizer": cell.optimizer}
    extra = {"run_id": cell.run.run_id, "key": cell.key, "metrics": metrics}
    extra["best"] = cell.best.state()
    extra["metrics_step"] = pos.index
    next_pos = (nxt // cell.plan.epochs, nxt % cell.plan.epochs)
    checkpoint.save(cell.ckpt, checkpoint.build(modules, next_pos, cell.device, extra))


def _epoch_line(cell: PreparedCell, pos: Position, metrics: dict[str, float]) -> str:
    eta = metrics["time/epoch_s"] * (cell.plan.total_epochs - pos.index - 1)
    val = " ".join(f"{metrics[f'val/top1/{n}']:.1f}" for n in cell.plan.names)
    return (
        f"[{cell.key}] epoch {pos.index + 1}/{cell.plan.total_epochs}"
        f" loss {metrics['train/loss']:.4f} val top1 {val}"
        f" ({metrics['time/epoch_s']:.1f}s, ETA {eta:.0f}s)"
    )


def _progress_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def finish(cell: PreparedCell) -> CellResult:
    """Final evaluation of every sub-model in one pass, latency, and the MLflow record."""
    cfg, plan, t = cell.cfg, cell.plan, cell.cfg["train"]
    sealed = not cell.opts.evaluate_test
    split = "val" if sealed else "test"
    data = (cell.splits.val_x, cell.splits.val_y) if sealed else cell.splits.test()
    calibrate = cell.calibrate()
    acc = evaluate(cell.model, data, t["eval_batch_size"], cell.norm, cell.amp, True, calibrate)
    budgeted = []
    if cell.model.early_exit and not sealed:  # thresholds are fitted on val, applied to test
        val = (cell.splits.val_x, cell.splits.val_y)
        val_acc = evaluate(
            cell.model, val, t["eval_batch_size"], cell.norm, cell.amp, True, calibrate
        )
        costs = [c.mflops for c in plan.costs]
        budgeted = budgeted_curve(val_acc.confidence, acc.confidence, acc.correct, costs)
    r = cfg["runtime"]
    lat = latency_profile(
        cell.model,
        plan.image_size,
        cell.device,
        r["latency_batch"],
        r["latency_warmup"],
        r["latency_repeats"],
    )
    rows = [
        {"index": i, "name": c.name, "spectrum": "false", "top1": a1, "top5": a5}
        | {"mmacs": c.mmacs, "mflops": c.mflops, "params_m": c.params_m, "gbitops": c.gbitops}
        | lat_row
        for i, (c, a1, a5, lat_row) in enumerate(zip(plan.costs, acc.top1, acc.top5, lat.rows()))
    ]
    axis = cost_axis([row["mflops"] for row in rows], [row["gbitops"] for row in rows])
    how = EvalHow(t["eval_batch_size"], cell.norm, cell.amp, calibrate=calibrate)
    spectrum = spectrum_rows(cell.model, data, how, plan.image_size, len(rows))
    if not sealed and cell.best.model is not None:  # selected on val, reported on test
        cell.model.load_state_dict(cell.best.model)  # last: the last weights are done
        best = evaluate(
            cell.model, data, t["eval_batch_size"], cell.norm, cell.amp, False, calibrate
        )
        for row, a1 in zip(rows, best.top1):
            row["top1_bestval"] = a1
    final = schema.parent_metrics(rows + spectrum, split)
    if not sealed:
        final[schema.BESTVAL_EPOCH] = cell.best.epoch
    final[schema.TOP1_MEAN.format(split=split)] = sum(acc.top1) / len(acc.top1)
    final[schema.TOP1_AUC.format(split=split)] = auc_top1([row[axis] for row in rows], acc.top1)
    cell.run.set_tags({schema.COST_AXIS: axis, **lat.tags()})
    with tempfile.TemporaryDirectory(prefix="flexbench-") as tmp:
        art = _artifacts(Path(tmp), cell, rows + spectrum, split, budgeted, axis)
        cell.run.finish(final, rows + spectrum, art, cfg, cell.key, plan.total_epochs, budgeted)
    _progress_line(
        f"[{cell.key}] finished: "
        + ", ".join(f"{r['name']} {r['top1']:.1f}% @ {r['mflops']:.2f} MFLOPs" for r in rows)
        + f" ({split})"
    )
    return CellResult(cell.key, cell.run.run_id, rows + spectrum, final)


def _artifacts(
    folder: Path,
    cell: PreparedCell,
    rows: list[dict[str, Any]],
    split: str,
    budgeted: list,
    axis: str,
) -> list[tuple[Path, str | None]]:
    """Files attached to the cell's run: resolved config, per-sub-model CSV, the
    accuracy-vs-cost figure, budgeted-batch points, and (runtime.log_checkpoint) the weights."""
    import csv

    from reports.cell_figure import draw_cell_figure

    cfg = cell.cfg
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    schema.write_submodels_csv(folder / "submodels.csv", rows)
    title = f"{cfg['arch']['name']} / {cfg['method']['name']} / seed {cfg['seed']}"
    png = draw_cell_figure(folder / "acc_vs_flops.png", title, rows, axis, split, budgeted)
    out: list[tuple[Path, str | None]] = [
        (folder / "config.yaml", None),
        (folder / "submodels.csv", None),
        (png, "plots"),
    ]
    if budgeted:
        with open(folder / "budgeted.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(budgeted[0]))
            writer.writeheader()
            writer.writerows(budgeted)
        out.append((folder / "budgeted.csv", None))
    if cfg["runtime"]["log_checkpoint"] and cell.ckpt.exists():
        out.append((cell.ckpt, "checkpoint"))
    return out
