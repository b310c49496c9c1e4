"""Train one cell: data -> model -> method -> epochs -> final evaluation -> MLflow.

Read top to bottom: `train_cell` validates everything first, then runs the stages of the method
(one stage for online methods), checkpointing atomically after every epoch, and finally
evaluates every sub-model on the test split once and writes the MLflow record.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from benchmark import checkpoint, tracking
from benchmark import data as datasets
from benchmark.budgeted import budgeted_curve
from benchmark.config import cell_key, flatten
from benchmark.cost_axis import auc_top1, cost_axis
from benchmark.data.pipeline import Normalizer, TrainBatches, eval_batches
from benchmark.errors import ConfigError, TrainingError
from benchmark.flops import SubCost, count_costs, measure_latency
from benchmark.methods import METHODS, EpochContext, Method, Stage
from benchmark.models import FlexibleModel, IndependentModel, build_model

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class CellResult:
    key: str
    run_id: str
    rows: list[dict[str, Any]]
    metrics: dict[str, float]


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device {spec!r} requested but CUDA is not available; use cpu")
    return dev


def make_model(cfg: dict[str, Any], num_classes: int, image_size: int) -> FlexibleModel:
    """Same seed -> same initial weights for every method (independent copies included)."""
    torch.manual_seed(cfg["seed"])
    arch = {k: v for k, v in cfg["arch"].items() if k != "name"}
    model = build_model(cfg["arch"]["name"], arch, num_classes, image_size)
    method_cls = METHODS.get(cfg["method"]["name"])
    method_cls.check_model(model, cfg["arch"]["name"])
    if method_cls.separate_networks:
        model = IndependentModel(model)
    return model


def make_method(cfg: dict[str, Any], num_submodels: int) -> Method:
    """The cell's method, bound to its K sub-models (methods may own K-dependent parameters)."""
    params = {k: v for k, v in cfg["method"].items() if k != "name"}
    method = METHODS.get(cfg["method"]["name"])(params, cfg["train"]["label_smoothing"])
    method.bind(num_submodels)
    return method


def lr_at(t: dict[str, Any], epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at (epoch, step): linear warm-up, then multi-step or cosine decay."""
    pos = epoch + step / steps_per_epoch
    warm = t["warmup_epochs"]
    if warm and pos < warm:
        return t["lr"] * (pos + 1 / steps_per_epoch) / warm
    if t["schedule"] == "multistep":
        return t["lr"] * t["gamma"] ** sum(epoch >= m * t["epochs"] for m in t["milestones"])
    frac = (pos - warm) / max(t["epochs"] - warm, 1e-9)
    return 0.5 * t["lr"] * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def evaluate(
    model: FlexibleModel,
    x: Tensor,
    y: Tensor,
    batch: int,
    norm: Normalizer,
    device: torch.device,
    amp: bool,
    confidences: bool = False,
) -> tuple[list[float], list[float]] | tuple[list[float], list[float], Tensor, Tensor]:
    """Top-1/top-5 (%) of every sub-model in one pass over (x, y); one host sync at the end.

    With `confidences`, also the per-sample max-softmax confidence and top-1 correctness of every
    sub-model, (K, N) each, for budgeted-batch evaluation.
    """
    was_training = model.training
    model.eval()
    k = model.num_submodels
    c1 = torch.zeros(k, device=device)
    c5 = torch.zeros(k, device=device)
    conf, hit1 = [], []
    for xb, yb in eval_batches(x, y, batch, norm, device):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            outs = model.forward_all(xb)
        for i, z in enumerate(outs):
            top = z.topk(min(5, z.shape[1]), dim=1).indices
            hit = top == yb[:, None]
            c1[i] += hit[:, 0].sum()
            c5[i] += hit.any(1).sum()
        if confidences:
            conf.append(torch.stack([z.float().softmax(1).amax(1) for z in outs]))
            hit1.append(torch.stack([z.argmax(1) == yb for z in outs]))
    model.train(was_training)
    n = max(1, x.shape[0])
    acc = (c1 * 100 / n).tolist(), (c5 * 100 / n).tolist()
    if not confidences:
        return acc
    return (*acc, torch.cat(conf, 1).cpu(), torch.cat(hit1, 1).cpu())


class _Step:
    """One optimisation step of a stage; teachers' logits are reused, detached, never recomputed."""

    def __init__(
        self,
        model: FlexibleModel,
        method: Method,
        stage: Stage,
        amp: bool,
        device: torch.device,
        compile_model: bool,
    ) -> None:
        self.model, self.method, self.stage, self.amp, self.device = (
            model,
            method,
            stage,
            amp,
            device,
        )
        self.k = model.num_submodels
        fwd_all, fwd_sub = model.forward_all, model.forward_sub
        if method.uses_features:
            fwd_all, fwd_sub = model.forward_all_features, model.forward_sub_features
        self.fwd_all = torch.compile(fwd_all) if compile_model else fwd_all
        self.fwd_sub = torch.compile(fwd_sub) if compile_model else fwd_sub

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[int, Tensor]]:
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp)
        feats = self.method.uses_features
        teachers: dict[int, Tensor] = {}
        t_feats: dict[int, list[Tensor]] = {}  # detached; the student's own are added per k
        with torch.no_grad(), autocast:
            for t in self.stage.frozen_teachers:
                if feats:
                    z, f = self.fwd_sub(x, t)
                    t_feats[t] = [v.float() for v in f]
                else:
                    z = self.fwd_sub(x, t)
                teachers[t] = z.float()
        terms: dict[str, Tensor] = {}
        order = sorted(self.stage.train, reverse=True)  # largest first: teachers exist in time
        total = torch.zeros((), device=self.device)
        if self.model.single_pass:
            with autocast:
                outs_f = dict(zip(order, self.fwd_all(x, order)))
            if feats:
                outs = {k: z.float() for k, (z, _) in outs_f.items()}
                live = {k: [v.float() for v in f] for k, (_, f) in outs_f.items()}
                t_feats.update({k: [v.detach() for v in f] for k, f in live.items()})
            else:
                outs = {k: z.float() for k, z in outs_f.items()}
            teachers.update({k: z.detach() for k, z in outs.items()})
            for k in order:
                fk = {**t_feats, k: live[k]} if feats else None
                loss_k, tk = self.method.loss(k, outs[k], teachers, y, self.k, fk)
                total = total + loss_k
                self._terms(terms, k, tk)
            total.backward()
        else:  # one forward per sub-model; backward each at once so memory stays at one sub-model
            outs = {}
            for k in order:
                with autocast:
                    out = self.fwd_sub(x, k)
                fk = None
                if feats:
                    out, f = out
                    f = [v.float() for v in f]
                    fk = {**t_feats, k: f}
                z = out.float()
                loss_k, tk = self.method.loss(k, z, teachers, y, self.k, fk)
                loss_k.backward()
                teachers[k] = outs[k] = z.detach()
                if feats:
                    t_feats[k] = [v.detach() for v in f]
                total = total + loss_k.detach()
                self._terms(terms, k, tk)
        return total.detach(), terms, outs

    def _terms(self, terms: dict[str, Tensor], k: int, tk: dict[str, Tensor]) -> None:
        name = self.model.submodels[k].name
        for term, v in tk.items():
            terms[f"{term}/{name}"] = v.detach()


def _train_epoch(
    model,
    stage,
    step_fn,
    optimizer,
    batches,
    t_cfg,
    r_cfg,
    epoch,
    g_epoch,
    total_epochs,
    names,
    progress,
    device,
) -> dict[str, float]:
    """One pass over the training batches; metrics stay on the device until the epoch ends."""
    t0 = time.perf_counter()
    model.train()
    if isinstance(model, IndependentModel):
        for t in stage.frozen_teachers:
            model.members[t].eval()
    loss_sum = torch.zeros((), device=device)
    term_sums: dict[str, Tensor] = {}
    correct = torch.zeros(model.num_submodels, device=device)
    steps = len(batches)
    bar = tqdm(
        total=steps,
        disable=not (progress and sys.stderr.isatty()),
        desc=f"epoch {g_epoch + 1}/{total_epochs}",
        leave=False,
    )
    lr = t_cfg["lr"]
    for i, (xb, yb) in enumerate(batches.epoch(epoch)):
        lr = lr_at(t_cfg, epoch, i, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss, terms, outs = step_fn(xb, yb)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss
        for name, v in terms.items():
            term_sums[name] = term_sums.get(name, 0) + v
        for k, z in outs.items():
            correct[k] += (z.argmax(1) == yb).sum()
        if (i + 1) % r_cfg["log_every"] == 0:
            mean_loss = loss_sum.item() / (i + 1)  # one host sync per log_every steps
            if not math.isfinite(mean_loss):
                raise TrainingError(
                    f"non-finite loss at epoch {g_epoch + 1}, step {i + 1}; "
                    f"lower train.lr or check the data"
                )
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}")
        bar.update()
    bar.close()
    metrics = {"train/loss": loss_sum.item() / steps, "lr": lr}
    if not math.isfinite(metrics["train/loss"]):
        raise TrainingError(
            f"non-finite loss in epoch {g_epoch + 1}; lower train.lr or check the data"
        )
    metrics.update({f"train/loss_terms/{n}": float(v) / steps for n, v in term_sums.items()})
    seen = steps * batches.batch_size
    for k in stage.train:
        metrics[f"train/top1/{names[k]}"] = float(correct[k]) * 100 / seen
    metrics["time/epoch_s"] = time.perf_counter() - t0
    return metrics


def _progress_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_dir(cfg: dict[str, Any], experiment: str, key: str) -> Path:
    return Path(cfg["runtime"]["workdir"]) / experiment / key


def train_cell(
    cfg: dict[str, Any],
    tracking_uri: str | None = None,
    experiment: str | None = None,
    resume: bool = False,
    restart: bool = False,
    evaluate_test: bool = True,
    epoch_callback: EpochCallback | None = None,
    progress: bool = True,
    extra_tags: dict[str, str] | None = None,
) -> CellResult:
    """Train and evaluate one resolved cell; returns its per-sub-model results.

    `evaluate_test=False` seals the test split (studies): final metrics are then on val only.
    `epoch_callback(epoch, metrics)` runs after every epoch (e.g. Optuna pruning); an exception
    it raises ends the cell, which is marked failed unless the exception is TrialPruned-like.
    """
    experiment = experiment or tracking.DEFAULT_EXPERIMENT
    key = cell_key(cfg)
    t_cfg, r_cfg = cfg["train"], cfg["runtime"]
    # --- validate everything before any work -------------------------------------------
    num_classes, image_size = datasets.describe(cfg["data"]["name"], cfg["data"])
    datasets.check(cfg["data"]["name"], cfg["data"])
    device = pick_device(str(r_cfg["device"]))
    model = make_model(cfg, num_classes, image_size)
    method = make_method(cfg, model.num_submodels)
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    ckpt_path = run_dir(cfg, experiment, key) / "checkpoint.pt"
    state = None
    if ckpt_path.exists():
        if restart:
            ckpt_path.unlink()
        elif resume:
            state = checkpoint.load(ckpt_path)
        else:
            raise ConfigError(
                f"a checkpoint of this cell exists ({ckpt_path}); pass --resume to continue it "
                f"or --restart to discard it"
            )
    if r_cfg["threads"]:
        torch.set_num_threads(r_cfg["threads"])
    splits = datasets.load_splits(cfg["data"]["name"], cfg["data"])
    splits.sealed = not evaluate_test
    norm = Normalizer(splits.mean, splits.std, device)
    batches = TrainBatches(
        splits.train_x, splits.train_y, t_cfg["batch_size"], norm, cfg["seed"], device
    )
    if len(batches) == 0:
        raise ConfigError(
            f"train.batch_size {t_cfg['batch_size']} exceeds the {splits.train_x.shape[0]} "
            f"training images"
        )
    amp = bool(r_cfg["amp"]) and device.type == "cuda"
    arch_key = json.dumps([cfg["arch"], num_classes, image_size], sort_keys=True)
    costs: list[SubCost] = count_costs(model, image_size, cache_key=arch_key)

    model = model.to(device, memory_format=torch.channels_last)
    method = method.to(device)
    names = [s.name for s in model.submodels]
    stages = method.stages(model.num_submodels)

    def new_optimizer() -> torch.optim.Optimizer:
        groups = [{"params": list(model.parameters()), "lr_scale": 1.0}]
        if list(method.parameters()):  # learned by the method itself: own lr scale, no decay
            groups.append(
                {
                    "params": list(method.parameters()),
                    "lr_scale": method.param_lr_scale,
                    "weight_decay": 0.0,
                }
            )
        return torch.optim.SGD(
            groups,
            lr=t_cfg["lr"],
            momentum=t_cfg["momentum"],
            nesterov=t_cfg["nesterov"],
            weight_decay=t_cfg["weight_decay"],
        )

    optimizer = new_optimizer()
    stage_idx, epoch = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        stage_idx, epoch = state["stage"], state["epoch"]

    run = tracking.CellRun(uri, experiment)
    tags = {
        tracking.TAG + "device": str(device)
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({torch.get_num_threads()} threads)"
        ),
        tracking.TAG + "split_seed": str(cfg["data"]["split_seed"]),
        tracking.TAG + "val_hash": splits.val_hash,
        tracking.TAG + "torch": torch.__version__,
        tracking.TAG + "test_evaluated": str(evaluate_test).lower(),
        **(extra_tags or {}),
    }
    run.start(cfg, key, flatten(cfg), tags, run_id=state["run_id"] if state else None)
    if state:
        _progress_line(f"resuming cell {key} at stage {stage_idx + 1}, epoch {epoch + 1}")

    n_epochs = t_cfg["epochs"]
    total_epochs = n_epochs * len(stages)
    try:
        while stage_idx < len(stages):
            stage = stages[stage_idx]
            step_fn = _Step(model, method, stage, amp, device, bool(r_cfg["compile"]))
            while epoch < n_epochs:
                g_epoch = stage_idx * n_epochs + epoch
                metrics = _train_epoch(
                    model,
                    stage,
                    step_fn,
                    optimizer,
                    batches,
                    t_cfg,
                    r_cfg,
                    epoch,
                    g_epoch,
                    total_epochs,
                    names,
                    progress,
                    device,
                )
                metrics.update(
                    method.epoch_end(
                        EpochContext(
                            model,
                            stage,
                            epoch,
                            n_epochs,
                            batches.epoch,
                            lambda: torch.autocast(device.type, torch.bfloat16, enabled=amp),
                        )
                    )
                )
                val1, _ = evaluate(
                    model, splits.val_x, splits.val_y, t_cfg["eval_batch_size"], norm, device, amp
                )
                metrics.update({f"val/top1/{n}": v for n, v in zip(names, val1)})
                metrics["val/top1_mean"] = sum(val1) / len(val1)
                run.log_metrics(metrics, g_epoch)
                epoch += 1
                if epoch == n_epochs and stage_idx + 1 < len(stages):
                    optimizer = new_optimizer()  # each stage of a chain starts fresh
                next_pos = (stage_idx + 1, 0) if epoch == n_epochs else (stage_idx, epoch)
                checkpoint.save(
                    ckpt_path,
                    {
                        "model": model.state_dict(),
                        "method": method.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "stage": next_pos[0],
                        "epoch": next_pos[1],
                        "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": torch.cuda.get_rng_state(device)
                        if device.type == "cuda"
                        else None,
                        "run_id": run.run_id,
                        "key": key,
                    },
                )
                if progress:
                    eta = metrics["time/epoch_s"] * (total_epochs - g_epoch - 1)
                    _progress_line(
                        f"[{key}] epoch {g_epoch + 1}/{total_epochs}"
                        f" loss {metrics['train/loss']:.4f}"
                        f" val top1 {' '.join(f'{v:.1f}' for v in val1)}"
                        f" ({metrics['time/epoch_s']:.1f}s, ETA {eta:.0f}s)"
                    )
                if epoch_callback is not None:
                    epoch_callback(g_epoch, metrics)
            stage_idx, epoch = stage_idx + 1, 0
        return _finish(
            cfg,
            key,
            run,
            model,
            splits,
            norm,
            device,
            amp,
            costs,
            evaluate_test,
            total_epochs,
            ckpt_path,
        )
    except KeyboardInterrupt:
        run.interrupted()
        raise
    except Exception as exc:
        if type(exc).__name__ == "TrialPruned":
            run.set_tags({tracking.TAG + "status": "pruned"})
            run.client.set_terminated(run.run_id, "KILLED")
        else:
            run.fail(f"{type(exc).__name__}: {exc}")
        raise


def _finish(
    cfg, key, run, model, splits, norm, device, amp, costs, evaluate_test, total_epochs, ckpt_path
) -> CellResult:
    """Final evaluation of every sub-model in one pass, latency, and the MLflow record."""
    r_cfg, t_cfg = cfg["runtime"], cfg["train"]
    split = "test" if evaluate_test else "val"
    x, y = splits.test() if evaluate_test else (splits.val_x, splits.val_y)
    top1, top5, conf, correct = evaluate(
        model, x, y, t_cfg["eval_batch_size"], norm, device, amp, confidences=True
    )
    budgeted = []
    if model.early_exit and evaluate_test:
        val_conf = evaluate(
            model,
            splits.val_x,
            splits.val_y,
            t_cfg["eval_batch_size"],
            norm,
            device,
            amp,
            confidences=True,
        )[2]
        budgeted = budgeted_curve(val_conf, conf, correct, [c.mflops for c in costs])
    lat = measure_latency(
        model,
        splits.image_size,
        device,
        r_cfg["latency_batch"],
        r_cfg["latency_warmup"],
        r_cfg["latency_repeats"],
    )
    rows = []
    final: dict[str, float] = {}
    for sub, c, a1, a5, ms in zip(model.submodels, costs, top1, top5, lat):
        row = {
            "index": sub.index,
            "name": sub.name,
            "top1": a1,
            "top5": a5,
            "mmacs": c.mmacs,
            "mflops": c.mflops,
            "params_m": c.params_m,
            "gbitops": c.gbitops,
            "latency_ms": ms,
        }
        rows.append(row)
        final.update(
            {
                f"{split}/top1/{sub.name}": a1,
                f"{split}/top5/{sub.name}": a5,
                f"mmacs/{sub.name}": c.mmacs,
                f"mflops/{sub.name}": c.mflops,
                f"params_m/{sub.name}": c.params_m,
                f"gbitops/{sub.name}": c.gbitops,
                f"latency_ms/{sub.name}": ms,
            }
        )
    axis = cost_axis([r["mflops"] for r in rows], [r["gbitops"] for r in rows])
    final[f"{split}/top1_mean"] = sum(top1) / len(top1)
    final[f"{split}/top1_auc"] = auc_top1([r[axis] for r in rows], top1)
    run.set_tags({tracking.TAG + "cost_axis": axis})
    with tempfile.TemporaryDirectory(prefix="flexbench-") as tmp:
        art = _artifacts(
            Path(tmp), cfg, rows, split, r_cfg["log_checkpoint"], ckpt_path, budgeted, axis
        )
        run.finish(final, rows, art, cfg, key, total_epochs, budgeted)
    _progress_line(
        f"[{key}] finished: "
        + ", ".join(f"{r['name']} {r['top1']:.1f}% @ {r['mflops']:.2f} MFLOPs" for r in rows)
        + f" ({split})"
    )
    return CellResult(key, run.run_id, rows, final)


def _artifacts(
    folder: Path, cfg, rows, split, log_checkpoint, ckpt_path, budgeted, axis
) -> list[tuple[Path, str | None]]:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with open(folder / "submodels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=150)
    xs, ys = [r[axis] for r in rows], [r["top1"] for r in rows]
    ax.plot(xs, ys, marker="o", label="anytime (each exit)" if budgeted else None)
    if budgeted:
        ax.plot(
            [p["mflops"] for p in budgeted],
            [p["top1"] for p in budgeted],
            lw=1,
            label="budgeted batch (thresholds from val)",
        )
        ax.legend(fontsize=7)
    for r in rows:
        ax.annotate(
            r["name"],
            (r[axis], r["top1"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    ax.set_xlabel(
        "MFLOPs (FlopCounterMode, forward)"
        if axis == "mflops"
        else "GBitOps (MACs x weight bits x activation bits)"
    )
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.set_title(
        f"{cfg['arch']['name']} / {cfg['method']['name']} / seed {cfg['seed']}", fontsize=8
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "acc_vs_flops.png")
    plt.close(fig)
    out = [
        (folder / "config.yaml", None),
        (folder / "submodels.csv", None),
        (folder / "acc_vs_flops.png", "plots"),
    ]
    if budgeted:
        with open(folder / "budgeted.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(budgeted[0]))
            writer.writeheader()
            writer.writerows(budgeted)
        out.append((folder / "budgeted.csv", None))
    if log_checkpoint and ckpt_path.exists():
        out.append((ckpt_path, "checkpoint"))
    return out
