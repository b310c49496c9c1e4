"""Training throughput: flexbench's step vs a plain PyTorch loop (and, for early-exit models, the
reference MSDNet loop) on the same model and method, side by side in one process.

- flexbench: uint8 data resident on the device, batched crop+flip, the cell's settings from
  `benchmark.costs.speed` (memory format per architecture, bf16 where native, compile if asked),
  device-side metrics (one host sync per `log_every` steps).
- plain: how a plain PyTorch loop trains the same method: DataLoader + torchvision PIL
  transforms, contiguous NCHW fp32, `.item()` on the loss every step; exactly one forward per
  step for a single-pass model (MSDNet: all exits at once), one per sub-model otherwise.
- reference (single-pass early-exit models only): the loop of the MSDNet reference code
  (kalviny/MSDNet-PyTorch, main.py `train`): PIL DataLoader, one forward returning every exit,
  the sum of cross-entropies, `loss.item()` and per-exit top-1/top-5 errors read with `.item()`
  every step, zero_grad -> backward -> SGD step. Written here from its description, run on
  flexbench's MSDNet module (not a copy of the reference model).

Runners alternate in rounds (`--rounds` x `--steps` timed steps each) so machine load hits them
alike; the median images/s per runner and the ratios are printed, plus the step's arithmetic
rate (3 x forward FLOPs per image, forward + backward) against this process's measured fp32
matmul peak. `--profile-ops N` prints a torch.profiler table of N flexbench steps.

    python scripts/bench_throughput.py --arch msdnet --method joint --profile paper
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import data as datasets  # noqa: E402
from benchmark.config import parse_sets, resolve  # noqa: E402
from benchmark.costs import speed  # noqa: E402
from benchmark.costs.flops import count_costs  # noqa: E402
from benchmark.data.pipeline import Normalizer  # noqa: E402
from benchmark.training.build import make_method, make_model, pick_device  # noqa: E402
from benchmark.training.distributed import SINGLE, Dist, average_grads, ddp_forwards  # noqa: E402
from benchmark.training.step import Step, step_generator  # noqa: E402


class PILDataset(Dataset):
    """Per-sample PIL images and torchvision transforms, as in the anchor repositories."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std) -> None:
        from torchvision import transforms

        self.x, self.y = x.permute(0, 2, 3, 1).numpy(), y.tolist()
        self.tf = transforms.Compose(
            [
                transforms.RandomCrop(x.shape[-1], padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.tf(Image.fromarray(self.x[i])), self.y[i]


def _batches(loader: DataLoader):
    while True:  # endless: a round may cross an epoch boundary
        yield from loader


class Runner:
    """One training loop, built once; `run(steps)` times `steps` steps and returns images/s."""

    name = ""

    def step(self) -> int:
        raise NotImplementedError

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> float:
        self.sync()
        t0, n = time.perf_counter(), 0
        for _ in range(steps):
            n += self.step()
        self.finish()
        self.sync()
        return n / (time.perf_counter() - t0)

    def finish(self) -> None:
        pass


class FlexbenchRunner(Runner):
    name = "flexbench"

    def __init__(self, cfg, splits, device, fast: speed.Speed) -> None:
        self.build(cfg, splits.num_classes, splits.image_size, device, fast)
        norm = Normalizer(splits.mean, splits.std, device, fast.torch_format)
        bs = cfg["train"]["batch_size"]
        batches = splits.train.train_batches(bs, norm, 0, device)
        self.it = (b for e in range(10**9) for b in batches.epoch(e))

    def build(
        self, cfg, num_classes: int, image_size: int, device, fast: speed.Speed, d: Dist = SINGLE
    ) -> None:
        """The cell's model (in the settings' memory format), method, first stage's Step (its
        forwards through DDP when `d` is a rank of several) and an SGD optimizer (lr 0.01,
        momentum 0.9); the batches (`self.it`) are the caller's."""
        self.device, self.fast, self.dist = device, fast, d
        self.model = make_model(cfg, num_classes, image_size)
        self.model = self.model.to(device, memory_format=fast.torch_format)
        self.method = make_method(cfg, self.model.num_submodels).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        stage = self.method.stages(self.model.num_submodels)[0]
        ddp = ddp_forwards(self.model, d, device)
        self._step = Step(self.model, self.method, stage, fast, ddp)
        self.log_every, self.i = cfg["runtime"]["log_every"], 0
        self.loss_sum = torch.zeros((), device=device)
        self.model.train()

    def step(self) -> int:
        xb, yb = next(self.it)
        self.loss_sum += self._step(xb, yb, step_generator(0, 0, self.i)).loss
        average_grads(self.method.parameters(), self.dist)  # the model's: DDP averaged them
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        if self.i % self.log_every == 0:
            self.loss_sum.item()
        return yb.shape[0]

    def finish(self) -> None:
        self.loss_sum.item()


class _LoaderRunner(Runner):
    def __init__(self, cfg, splits, device, workers: int) -> None:
        self.device = device
        self.model = make_model(cfg, splits.num_classes, splits.image_size).to(device)
        self.method = make_method(cfg, self.model.num_submodels).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        loader = DataLoader(
            PILDataset(splits.train.x, splits.train.y, splits.mean, splits.std),
            batch_size=cfg["train"]["batch_size"],
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        self.it = _batches(loader)
        self.model.train()


class PlainRunner(_LoaderRunner):
    """One forward for a single-pass model, one per sub-model otherwise; one backward."""

    name = "plain"

    def step(self) -> int:
        xb, yb = next(self.it)
        xb, yb = xb.to(self.device), yb.to(self.device)
        m, method = self.model, self.method
        order = list(range(m.num_submodels))[::-1]  # largest first: teachers before students
        feats_on = method.uses_features
        if m.caps.single_pass:
            outs = m.forward_all_features(xb, order) if feats_on else m.forward_all(xb, order)
        teachers, feats, total = {}, {}, 0.0
        for i, k in enumerate(order):
            if m.caps.single_pass:
                z, fk = outs[i] if feats_on else (outs[i], None)
            elif feats_on:
                z, fk = m.forward_sub_features(xb, k)
            else:
                z, fk = m.forward_sub(xb, k), None
            if feats_on:
                feats[k] = fk
                fk = {j: [f.detach() for f in v] for j, v in feats.items() if j != k} | {k: fk}
            loss, _ = method.loss(k, z, teachers, yb, m.num_submodels, fk)
            teachers[k] = z.detach()
            total = total + loss
        self.opt.zero_grad()
        total.backward()
        self.opt.step()
        total.item()
        return yb.shape[0]


class ReferenceRunner(_LoaderRunner):
    """The MSDNet reference training loop's per-step work (see the module docstring)."""

    name = "reference"
    criterion = nn.CrossEntropyLoss()

    def step(self) -> int:
        xb, yb = next(self.it)
        xb, yb = xb.to(self.device), yb.to(self.device)
        output = self.model.forward_all(xb)
        loss = 0.0
        for z in output:
            loss = loss + self.criterion(z, yb)
        loss.item()
        for z in output:  # per-exit top-1 / top-5 error, read every step
            _, pred = z.detach().topk(5, 1, True, True)
            correct = pred.t().eq(yb.view(1, -1).expand_as(pred.t()))
            for k in (1, 5):
                (correct[:k].reshape(-1).float().sum(0) * (100.0 / yb.shape[0])).item()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return yb.shape[0]


def alternate(
    runners: list[Runner], rounds: int, steps: int, warmup: int
) -> tuple[dict[str, float], dict[str, list[float]], float]:
    """`warmup` untimed steps of every runner (with compile: the compilation), then `rounds`
    rounds of `steps` timed steps of each in turn, so that load from other processes hits
    them alike. Returns (median items/s per runner, every round's items/s, warm-up seconds)."""
    t0 = time.perf_counter()
    for r in runners:
        r.run(warmup)
    warm_s = time.perf_counter() - t0
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(rounds):
        for r in runners:
            rates[r.name].append(r.run(steps))
    return {k: statistics.median(v) for k, v in rates.items()}, rates, warm_s


def matmul_peak_gflops(device: torch.device, n: int = 1024, reps: int = 10) -> float:
    """Best-of-3 fp32 matmul rate (GFLOP/s) in this process: the step's arithmetic ceiling."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = 0.0
    for _ in range(3):
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def train_gflop_per_image(model, image_size: int) -> float:
    """Forward + backward GFLOP per image through every sub-model a step trains (3 x forward
    FLOPs, the usual estimate): the full model for a single-pass model, else the sum."""
    costs = count_costs(model, image_size)
    fwd = costs[-1].mflops if model.caps.single_pass else sum(c.mflops for c in costs)
    return 3 * fwd / 1e3


def profile_ops(runner: FlexbenchRunner, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if runner.device.type == "cuda" else []
    )
    with profile(activities=acts) as prof:
        runner.run(steps)
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def build_runners(args, cfg, splits, device, fast) -> list[Runner]:
    runners: list[Runner] = [FlexbenchRunner(cfg, splits, device, fast)]
    runners.append(PlainRunner(cfg, splits, device, args.loader_workers))
    model = runners[0].model
    if model.caps.single_pass and model.caps.early_exit:
        runners.append(ReferenceRunner(cfg, splits, device, args.loader_workers))
    return runners


def measure(args, cfg, splits, device, fast) -> dict:
    """Alternating rounds of every runner; returns the result record (also printed)."""
    runners = build_runners(args, cfg, splits, device, fast)
    med, rates, warm_s = alternate(runners, args.rounds, args.steps, args.warmup)
    peak = matmul_peak_gflops(device)
    gflop_img = train_gflop_per_image(runners[0].model, splits.image_size)
    rec = {
        "arch": args.arch,
        "method": args.method,
        "profile": args.profile,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": cfg["train"]["batch_size"],
        "steps": args.steps,
        "rounds": args.rounds,
        "settings": fast.tags(),
        "images_per_s": med,
        "rounds_images_per_s": rates,
        "ratio_vs_plain": med["flexbench"] / med["plain"],
        "train_gflop_per_image": gflop_img,
        "step_gflops": med["flexbench"] * gflop_img,
        "matmul_peak_gflops": peak,
        "warmup_s": warm_s,
    }
    if "reference" in med:
        rec["ratio_vs_reference"] = med["flexbench"] / med["reference"]
    rec["fraction_of_peak"] = rec["step_gflops"] / peak
    if args.profile_ops:
        print(profile_ops(runners[0], args.profile_ops))
    return rec


def optional(rec: dict, key: str, fmt: str, missing: str = "") -> str:
    """`fmt` filled with `rec[key]`, else `missing`: a record has a reference loop's rate only
    for early-exit models, and peak memory only on a GPU."""
    return fmt.format(rec[key]) if key in rec else missing


def report(rec: dict) -> None:
    print(
        f"{rec['arch']} / {rec['method']} / {rec['profile']} on {rec['device']} "
        f"({rec['threads']} threads), batch {rec['batch']}, {rec['rounds']} rounds x "
        f"{rec['steps']} steps, settings {rec['settings']}"
    )
    for name, v in rec["images_per_s"].items():
        rounds = ", ".join(f"{x:.0f}" for x in rec["rounds_images_per_s"][name])
        print(f"  {name:<10}: {v:9.1f} images/s (rounds: {rounds})")
    print(f"  ratio vs plain loop     : {rec['ratio_vs_plain']:.2f}x")
    if "ratio_vs_reference" in rec:
        print(f"  ratio vs reference loop : {rec['ratio_vs_reference']:.2f}x")
    print(
        f"  step arithmetic: {rec['step_gflops']:.1f} GFLOP/s = "
        f"{100 * rec['fraction_of_peak']:.0f}% of the measured fp32 matmul peak "
        f"({rec['matmul_peak_gflops']:.1f} GFLOP/s)"
    )


def run(argv: list[str] | None = None, quiet: bool = False) -> dict:
    """Parse `argv`, measure, print the report (unless quiet) and return the result record."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="msdnet")
    ap.add_argument("--method", default="joint")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per runner and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--profile-ops", type=int, default=0, metavar="N")
    ap.add_argument("--json", type=Path, help="append the result record to this file")
    args = ap.parse_args(argv)
    sets = {"data.val_size": 200} | parse_sets(args.sets)  # validation is not timed: keep it small
    cfg = resolve(args.arch, args.dataset, args.method, 0, args.profile, sets)
    device = pick_device(cfg["runtime"]["device"])
    if cfg["runtime"]["threads"]:
        torch.set_num_threads(cfg["runtime"]["threads"])
    splits = datasets.load_splits(args.dataset, cfg["data"])
    rec = measure(args, cfg, splits, device, speed.choose(cfg, device))
    if not quiet:
        report(rec)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return rec


if __name__ == "__main__":
    run()
