"""Augmentation cost per batch vs the training step of small models, side by side in one run.

Times, in alternating rounds (so machine load hits them alike), per batch of `--batch` images
at the dataset's size (32 px CIFAR-size by default):
- `crop_flip`: the in-memory training batch of today (permutation, pad-4 crop + flip gather,
  normalisation; `pipeline.TrainBatches`, `train.augment_policy: none`);
- `crop_flip+<policy>`: the same batch through an augmentation policy
  (`benchmark.data.autoaugment`, e.g. AutoAugment's CIFAR-10 policy);
- `step:<arch>`: one training step of each `--archs` cell (forward of every sub-model the
  method trains, backward, optimizer step; `benchmark.training.step.Step`) on a fixed batch.
Prints one line per runner (median ms per batch, the rounds) and the policy's added time as a
fraction of each step: the step stays limited by the model's arithmetic while that is small.

    python scripts/bench_augment.py --archs slimmable_mobilenet_v1 msdnet --profile mini
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import data as datasets  # noqa: E402
from benchmark.config import resolve  # noqa: E402
from benchmark.costs import speed  # noqa: E402
from benchmark.data.autoaugment import POLICIES  # noqa: E402
from benchmark.data.pipeline import Normalizer, TrainBatches  # noqa: E402
from benchmark.training.build import (  # noqa: E402
    make_method,
    make_model,
    new_optimizer,
    pick_device,
)
from benchmark.training.step import Step, step_generator  # noqa: E402


def batch_runner(
    splits, norm: Normalizer, batch: int, policy: str, dev: torch.device
) -> Callable[[], None]:
    """One call = the next training batch of `policy` on `dev` (endless over epochs)."""
    source = TrainBatches(splits.train.x, splits.train.y, batch, norm, 0, dev, policy=policy)
    it = (b for e in range(10**9) for b in source.epoch(e))
    return lambda: next(it)


def step_runner(cfg: dict, splits, xb: torch.Tensor, yb: torch.Tensor) -> Callable[[], None]:
    """One call = one training step of the cell `cfg` on the fixed batch (xb, yb)."""
    dev = xb.device
    fast = speed.choose(cfg, dev)
    model = make_model(cfg, splits.num_classes, splits.image_size).to(
        dev, memory_format=fast.torch_format
    )
    method = make_method(cfg, model.num_submodels).to(dev)
    opt = new_optimizer(model, method, cfg["train"])
    step = Step(model, method, method.stages(model.num_submodels)[0], fast)
    model.train()
    i = iter(range(10**9))

    def run() -> None:
        step(xb, yb, step_generator(0, 0, next(i)))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def mean_ms(fn: Callable[[], None], calls: int, dev: torch.device) -> float:
    """Mean wall time of `calls` calls, in ms (a CUDA device synchronised before each clock)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / calls


def measure(
    runners: dict[str, Callable[[], None]], rounds: int, calls: int, dev: torch.device
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(median ms per call over the rounds, each round's mean) of every runner, after one
    warm-up call each; runners alternate within a round."""
    for fn in runners.values():
        fn()
    each: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            each[name].append(mean_ms(fn, calls, dev))
    return {name: statistics.median(v) for name, v in each.items()}, each


def report(rec: dict) -> None:
    print(f"{rec['dataset']} {rec['image_size']} px, batch {rec['batch']}, {rec['device']}, "
          f"{rec['threads']} thread(s)")  # fmt: skip
    for name, v in rec["ms_per_batch"].items():
        each = ", ".join(f"{x:.1f}" for x in rec["rounds_ms"][name])
        print(f"  {name:<34} {v:8.1f} ms/batch  (rounds: {each})")
    added = rec["policy_added_ms"]
    for a, r in rec["policy_added_vs_step"].items():
        print(f"  {rec['policy']} adds {added:.1f} ms = {100 * r:.1f}% of a {a} step")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["slimmable_mobilenet_v1", "msdnet"])
    ap.add_argument("--method", default="joint")
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--policy", default="autoaugment_cifar10", choices=POLICIES[1:])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per runner and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--json", type=Path, help="append the result record to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    sets = {"runtime.device": args.device, "train.batch_size": args.batch, "data.val_size": 200,
            "data.train_subset": None}  # fmt: skip
    cfgs = {a: resolve(a, args.dataset, args.method, 0, args.profile, sets) for a in args.archs}
    first = next(iter(cfgs.values()))
    splits = datasets.load_splits(*datasets.cell_source(first), first["runtime"], dev)
    norm = Normalizer(splits.mean, splits.std, dev)
    runners = {
        "crop_flip": batch_runner(splits, norm, args.batch, "none", dev),
        f"crop_flip+{args.policy}": batch_runner(splits, norm, args.batch, args.policy, dev),
    }
    xb, yb = next(iter(TrainBatches(splits.train.x, splits.train.y, args.batch, norm, 0, dev)
                       .epoch(0)))  # fmt: skip
    runners |= {f"step:{a}": step_runner(cfg, splits, xb, yb) for a, cfg in cfgs.items()}
    med, rounds = measure(runners, args.rounds, args.calls, dev)
    added = med[f"crop_flip+{args.policy}"] - med["crop_flip"]
    rec = {
        "device": str(dev), "dataset": args.dataset, "image_size": splits.image_size,
        "batch": args.batch, "threads": torch.get_num_threads(), "profile": args.profile,
        "method": args.method, "policy": args.policy, "ms_per_batch": med, "rounds_ms": rounds,
        "policy_added_ms": added,
        "policy_added_vs_step": {a: added / med[f"step:{a}"] for a in args.archs},
    }  # fmt: skip
    report(rec)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return rec


if __name__ == "__main__":
    main()
