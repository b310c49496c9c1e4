"""Train one cell, top to bottom: prepare -> every epoch of the flat schedule -> finish.

`prepare` validates everything and builds the cell (data, model, method, optimizer, checkpoint,
MLflow run) before any work; `train_cell` then runs each remaining position (stage, epoch) of
the method's schedule: train one epoch -> the method's epoch end -> validate -> checkpoint -> log
-> callback; `benchmark.training.final.finish` evaluates every sub-model once on test and writes
the MLflow record.
The step itself is in `benchmark.training.step`, the checkpoint format in
`benchmark.training.checkpoint`, run statuses in `benchmark.record.tracking`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmark import data as datasets
from benchmark.config import cell_key, flatten
from benchmark.costs import speed
from benchmark.data.base import Splits
from benchmark.data.pipeline import Normalizer, TrainSource
from benchmark.errors import ConfigError, TrainingError
from benchmark.methods import EpochContext, Method
from benchmark.models import FlexibleModel, IndependentModel
from benchmark.models.syncbn import make_syncable, synced
from benchmark.record import schema, tracking
from benchmark.training import checkpoint
from benchmark.training.bn_calib import calibrator
from benchmark.training.build import (
    lr_at,
    make_method,
    make_model,
    new_optimizer,
    pick_device,
    set_lr,
)
from benchmark.training.distributed import (
    SINGLE,
    Dist,
    average_bn_buffers,
    average_grads,
    ddp_forwards,
    peers_lost_interrupt,
)
from benchmark.training.evaluate import EvalSpec, evaluate, exit_logits
from benchmark.training.final import CellResult, finish
from benchmark.training.plan import CellPlan, Position, plan_of
from benchmark.training.step import Step, step_generator

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class CellOptions:
    """How to run a cell. `evaluate_test=False` seals the test split (studies: final metrics on
    val only); `epoch_callback(global epoch, metrics)` runs after every epoch's checkpoint and
    may raise CellPruned (run marked `pruned`) or anything else (run marked `failed`).
    `run_id_file`: where rank 0 writes the MLflow run id once the run is open (set by
    `distributed.launch_cell`, which marks the run `interrupted` if rank 0 dies unreported)."""

    tracking_uri: str | None = None
    experiment: str | None = None
    resume: bool = False
    restart: bool = False
    evaluate_test: bool = True
    epoch_callback: EpochCallback | None = None
    progress: bool = True
    extra_tags: dict[str, str] = field(default_factory=dict)
    run_id_file: str | None = None


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
    batches: TrainSource
    norm: Normalizer
    device: torch.device
    speed: speed.Speed
    eval: EvalSpec
    run: tracking.CellRun | tracking.SilentRun
    ckpt: Path
    start: int
    opts: CellOptions
    dist: Dist = SINGLE
    ddp: nn.Module | None = None  # the DDP-wrapped forwards of a distributed cell
    best: BestVal = field(default_factory=BestVal)


def train_cell(
    cfg: dict[str, Any], opts: CellOptions | None = None, dist: Dist = SINGLE
) -> CellResult:
    """Train and evaluate one resolved cell; returns its per-sub-model results. Raises
    ConfigError (before any work) for bad input and TrainingError for a diverging cell. `dist`:
    this rank of a distributed cell (`benchmark.training.distributed`; every rank calls this)."""
    opts = opts or CellOptions()
    cell = prepare(cfg, opts, dist)
    with cell.run.status_on_exit(), peers_lost_interrupt(dist):
        step = None
        for pos in cell.plan.positions(cell.start):
            if step is None or pos.epoch == 0:
                stage = cell.plan.stages[pos.stage]
                step = Step(cell.model, cell.method, stage, cell.speed, cell.ddp)
            cell.method.epoch_start(_epoch_context(cell, pos))
            metrics = fit_epoch(cell) if stage.fit else train_epoch(cell, step, pos)
            metrics.update(cell.method.epoch_end(_epoch_context(cell, pos)))
            if not cfg["train"]["sync_bn"]:  # per-rank statistics: one network on every rank
                average_bn_buffers(cell.model, dist)
            metrics.update(validate(cell))
            cell.best.update(pos.index, metrics[schema.TOP1_MEAN.format(split="val")], cell.model)
            if pos.last_of_stage and not pos.last:  # each stage of a chain starts fresh
                cell.optimizer = new_optimizer(cell.model, cell.method, cfg["train"])
            save_checkpoint(cell, pos, metrics)
            cell.run.log_metrics(metrics, pos.index)
            if opts.progress and dist.main:
                _progress_line(_epoch_line(cell, pos, metrics))
            if opts.epoch_callback is not None:
                opts.epoch_callback(pos.index, metrics)
        return finish(cell)


def prepare(cfg: dict[str, Any], opts: CellOptions, dist: Dist = SINGLE) -> PreparedCell:
    """Validate, build and restore everything; nothing is discarded (`--restart`) or written
    until every check has passed and the MLflow run is open. A resumed checkpoint must be this
    cell's, fit its modules and come from the same data (`_resume_record`). In a distributed
    cell every rank restores the checkpoint; rank 0 alone opens and writes the MLflow run."""
    experiment = opts.experiment or tracking.DEFAULT_EXPERIMENT
    key = cell_key(cfg)
    if cfg["runtime"]["world_size"] != dist.world:
        raise ConfigError(
            f"runtime.world_size {cfg['runtime']['world_size']} is set by the launcher "
            f"(--nproc-per-node x --nnodes); this process runs with world size {dist.world}"
        )
    datasets.check(*datasets.cell_source(cfg))
    device = pick_device(str(cfg["runtime"]["device"]))
    described = datasets.describe(*datasets.cell_source(cfg))
    model = make_model(cfg, *described)
    method = make_method(cfg, model.num_submodels)
    plan = plan_of(cfg, model, method, described)
    uri = tracking.resolve_uri(opts.tracking_uri)
    ckpt = checkpoint.cell_dir(cfg, experiment, key) / "checkpoint.pt"
    state = _existing_checkpoint(ckpt, opts, key)
    run = _open_run(uri, experiment, ckpt, state) if dist.main else tracking.SilentRun()
    if cfg["runtime"]["threads"]:
        torch.set_num_threads(cfg["runtime"]["threads"])
    fast = speed.choose(cfg, device)
    if dist.world > 1:  # BN recalibration (and train.sync_bn) take the global batch's statistics
        make_syncable(model)
    model = model.to(device, memory_format=fast.torch_format)
    method = method.to(device)
    optimizer = new_optimizer(model, method, cfg["train"])
    start = 0
    if state is not None:  # a state that does not fit stops here, before the data is loaded
        modules = {"model": model, "method": method, "optimizer": optimizer}
        stage, epoch = checkpoint.restore(state, modules, device, ckpt)
        start = plan.index_of(stage, epoch)
    splits, batches, norm = _load_data(cfg, device, fast, not opts.evaluate_test, dist)
    changes = _resume_record(uri, ckpt, state, cfg, splits.data_hash, start) if dist.main else ""
    tags = {
        **tracking.environment_tags(device, torch.get_num_threads()),
        schema.SPLIT_SEED: str(cfg["data"]["split_seed"]),
        schema.VAL_HASH: splits.val_hash,
        schema.DATA_HASH: splits.data_hash,
        schema.DATA_IN_MEMORY: str(splits.in_memory).lower(),
        schema.DATA_MEMORY_NOTE: splits.memory_note,
        schema.TEST_EVALUATED: str(opts.evaluate_test).lower(),
        **fast.tags(),
        **opts.extra_tags,
    }
    tags[schema.WORLD_SIZE] = str(dist.world)
    run.start(cfg, key, flatten(cfg), tags, run_id=state["run_id"] if state else None)
    run.run_id = dist.from_main(run.run_id)
    if opts.run_id_file and dist.main:  # whole or absent: written aside, then renamed
        tmp = Path(opts.run_id_file + ".tmp")
        tmp.write_text(str(run.run_id))
        tmp.replace(opts.run_id_file)
    calibrate = calibrator(model, batches.epoch, cfg["train"]["bn_calib_batches"])
    spec = EvalSpec(
        cfg["train"]["eval_batch_size"], norm, fast, calibrate, dist, method.exit_outputs
    )
    cell = PreparedCell(
        cfg, key, plan, model, method, optimizer, splits, batches, norm, device, fast, spec, run,
        ckpt, start, opts, dist, ddp_forwards(model, dist, device),
    )  # fmt: skip
    if opts.restart and dist.main:
        ckpt.unlink(missing_ok=True)
    if state is not None:
        _resume_into(cell, state, changes)
    return cell


def _existing_checkpoint(ckpt: Path, opts: CellOptions, key: str) -> dict[str, Any] | None:
    """The checkpoint to resume from (with --resume), None (none, or --restart), else an error:
    an existing checkpoint is never silently overwritten, and one that cannot be read or that
    another cell wrote (copied or moved into this cell's folder) is never resumed."""
    if not ckpt.exists() or opts.restart:
        return None
    if not opts.resume:
        raise ConfigError(
            f"a checkpoint of this cell exists ({ckpt}); pass --resume to continue it "
            f"or --restart to discard it"
        )
    state = checkpoint.load(ckpt)
    if state.get("key") != key:
        raise checkpoint.CannotResume(
            ckpt,
            f"it is the checkpoint of cell {state.get('key')} (run {state.get('run_id')}), not of "
            f"this cell {key} (copied or moved here?)",
        )
    return state


def _open_run(
    uri: str, experiment: str, ckpt: Path, state: dict[str, Any] | None
) -> tracking.CellRun:
    """The cell's MLflow record, checked before any work: the store is reachable and has its
    schema, the experiment is not deleted, and a resumed checkpoint's run can still be
    continued (else CannotResume naming the fix; the checkpoint is left as it is)."""
    if state is not None and (why := tracking.missing_run(uri, experiment, state.get("run_id"))):
        raise checkpoint.CannotResume(ckpt, why)
    tracking.open_store(uri)
    return tracking.CellRun(uri, experiment)


def _resume_record(
    uri: str,
    ckpt: Path,
    state: dict[str, Any] | None,
    cfg: dict[str, Any],
    data_hash: str,
    start: int,
) -> str:
    """Check a resume against what its run recorded; returns the run's new
    `flexbench.resume_changes` value, or "" when nothing changed.

    Data that hashes otherwise than the run's `flexbench.data_hash` is refused (CannotResume):
    the epochs already trained saw the old images, so no record could say what the network
    learned from. A changed setting is recorded instead: with the same cell key only settings of
    how and where a cell runs can differ (`runtime.*`, `data.root`; any other change is another
    cell), and MLflow cannot change a logged param, so the tag lists, per resume, the epoch and
    every setting that differs from the attempt that wrote the checkpoint."""
    if state is None:
        return ""
    params, tags = tracking.run_record(uri, state["run_id"])
    recorded = tags.get(schema.DATA_HASH)
    if recorded and recorded != data_hash:
        raise checkpoint.CannotResume(
            ckpt,
            f"its run {state['run_id']} trained on data with hash {recorded}, and "
            f"{cfg['data']['name']} now hashes {data_hash} (its files changed since)",
            "restore the original files, or ",
        )
    before, now = state.get("settings") or params, flatten(cfg)
    changed = [
        f"{k} {before.get(k, '-')} -> {now.get(k, '-')}"
        for k in sorted(before.keys() | now.keys())
        if before.get(k) != now.get(k)
    ]
    if not changed:
        return ""
    line = f"epoch {start + 1}: " + ", ".join(changed)
    return "; ".join(filter(None, [tags.get(schema.RESUME_CHANGES), line]))


def _resume_into(cell: PreparedCell, state: dict[str, Any], changes: str) -> None:
    """Continue the checkpoint's run: its best-val copy, its pending metrics, and the record of
    any setting this resume changed (also said on stderr)."""
    cell.best = BestVal(**state["best"])
    _log_pending_metrics(cell.run, state)
    at = f"stage {state['stage'] + 1}, epoch {state['epoch'] + 1}"
    if cell.dist.main:
        _progress_line(f"resuming cell {cell.key} at {at}")
    if changes:
        cell.run.set_tags({schema.RESUME_CHANGES: changes})
        _progress_line(
            f"[{cell.key}] resumed with changed settings, recorded in the run's tag "
            f"{schema.RESUME_CHANGES}: {changes.rsplit('; ', 1)[-1]}"
        )


def _load_data(
    cfg: dict[str, Any], device: torch.device, fast: speed.Speed, sealed: bool, dist: Dist
) -> tuple[Splits, TrainSource, Normalizer]:
    splits = datasets.load_splits(*datasets.cell_source(cfg), cfg["runtime"], device)
    splits.sealed = sealed
    norm = Normalizer(splits.mean, splits.std, device, fast.torch_format)
    t = cfg["train"]
    batches = splits.train.train_batches(
        t["batch_size"], norm, cfg["seed"], device, dist.shard, t["augment_policy"]
    )
    if len(batches) == 0:
        raise ConfigError(
            f"train.batch_size {t['batch_size']} exceeds the {len(splits.train)} training images"
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


def train_epoch(cell: PreparedCell, step: Step, pos: Position) -> dict[str, float]:
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
        disable=not (cell.opts.progress and cell.dist.main and sys.stderr.isatty()),
        desc=f"epoch {pos.index + 1}/{cell.plan.total_epochs}",
        leave=False,
    )
    schedule = cell.plan.stage_train(pos.stage, cell.cfg["train"])  # the stage's own schedule
    lr = schedule["lr"]
    # sub-models this epoch's steps trained (drawn widths: a subset), each with the fraction of
    # the batch its logits cover (the leading rows: l2w trains on the first half of each batch)
    trained: dict[int, float] = {}
    for i, (xb, yb) in enumerate(cell.batches.epoch(pos.epoch)):
        lr = lr_at(schedule, pos.epoch, i, steps)
        set_lr(cell.optimizer, lr)
        with synced(cell.cfg["train"]["sync_bn"]):
            out = step(xb, yb, step_generator(cell.cfg["seed"], pos.index, i), lr)
        average_grads(cell.method.parameters(), cell.dist)  # the model's: DDP averaged them
        trained.update({k: len(z) / len(yb) for k, z in out.logits.items()})
        cell.optimizer.step()
        cell.method.after_optimizer_step(cell.model)
        cell.optimizer.zero_grad(set_to_none=True)
        loss_sum += out.loss
        for name, v in out.terms.items():
            term_sums[name] = term_sums.get(name, 0) + v
        for k, z in out.logits.items():
            correct[k] += (z.argmax(1) == yb[: len(z)]).sum()
        if (i + 1) % log_every == 0:
            _check_finite(loss_sum.item() / (i + 1), pos, f", step {i + 1}")
            bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.3f}", lr=f"{lr:.3g}")
        bar.update()
    bar.close()
    loss_sum, term_sums, correct = _over_ranks(cell.dist, loss_sum, term_sums, correct)
    metrics = {"train/loss": loss_sum.item() / steps, "lr": lr}
    _check_finite(metrics["train/loss"], pos, "")
    metrics.update({f"train/loss_terms/{n}": float(v) / steps for n, v in term_sums.items()})
    seen = steps * cell.batches.batch_size
    for k in sorted(trained):
        metrics[f"train/top1/{cell.plan.names[k]}"] = float(correct[k]) * 100 / (seen * trained[k])
    metrics["time/epoch_s"] = time.perf_counter() - t0
    return metrics


def fit_epoch(cell: PreparedCell) -> dict[str, float]:
    """One epoch of a fitting stage (`Stage.fit`): the method fits its own state on the exit
    logits of the validation split (the network frozen, in eval mode; no training or test
    image is read); the fit's final loss is the epoch's train/loss."""
    t0 = time.perf_counter()
    logits, labels = exit_logits(cell.model, cell.splits.val, cell.eval)
    fitted = cell.method.fit(logits, labels, cell.cfg["seed"])
    metrics = {"train/loss": fitted["loss"], "lr": 0.0}
    metrics.update({f"method/{k}": v for k, v in fitted.items()})
    metrics["time/epoch_s"] = time.perf_counter() - t0
    return metrics


def _over_ranks(
    d: Dist, loss: Tensor, terms: dict[str, Tensor], correct: Tensor
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """An epoch's sums over the ranks, in one all-reduce: the rank-mean of the loss sums and of
    the loss terms (each rank's loss is the mean over its equal part of the batch, so their mean
    is the global batch's loss) and the summed correct counts."""
    if d.world == 1:
        return loss, terms, correct
    names = sorted(terms)
    flat = torch.stack([loss, *(torch.as_tensor(terms[n], device=loss.device) for n in names)])
    flat = d.sum_(torch.cat([flat / d.world, correct]))
    k = len(names) + 1
    return flat[0], dict(zip(names, flat[1:k])), flat[k:]


def _check_finite(loss: float, pos: Position, where: str) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"non-finite loss at epoch {pos.index + 1}{where}; lower train.lr or check the data"
        )


def _epoch_context(cell: PreparedCell, pos: Position) -> EpochContext:
    stage = cell.plan.stages[pos.stage]
    return EpochContext(
        cell.model, stage, pos.epoch, cell.plan.stage_epochs(pos.stage), cell.batches.epoch,
        cell.speed.autocast,
    )  # fmt: skip


def validate(cell: PreparedCell) -> dict[str, float]:
    """`val/top1/<sub>` of every sub-model and their mean, on the validation split."""
    acc = evaluate(cell.model, cell.splits.val, cell.eval)
    top1 = schema.FIELDS["top1"]
    metrics = {top1.parent_key(n, "val"): v for n, v in zip(cell.plan.names, acc.top1)}
    metrics[schema.TOP1_MEAN.format(split="val")] = sum(acc.top1) / len(acc.top1)
    return metrics


def save_checkpoint(cell: PreparedCell, pos: Position, metrics: dict[str, float]) -> None:
    """Atomically save the state after `pos`, pointing at the next (stage, epoch) (rank 0 of a
    distributed cell; the ranks hold the same state)."""
    if not cell.dist.main:
        return
    nxt = pos.index + 1
    modules = {"model": cell.model, "method": cell.method, "optimizer": cell.optimizer}
    extra = {"run_id": cell.run.run_id, "key": cell.key, "metrics": metrics}
    extra["settings"] = flatten(cell.cfg)  # what this attempt ran with: a resume compares
    extra["best"] = cell.best.state()
    extra["metrics_step"] = pos.index
    next_pos = cell.plan.stage_epoch(nxt)
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
