"""ImageNet-size speed: flexbench against the loops ImageNet users write, ratios in one process.

a. Loader: flexbench's streamed `imagenet:` loader (`benchmark.data.stream`: DataLoader workers
   decoding whole batches with libjpeg-turbo, RandomResizedCrop + flip on uint8 tensors,
   normalised on the device) against the torchvision classification reference's
   (pytorch/vision references/classification/train.py `load_data` + presets.py
   `ClassificationPresetTrain`): `datasets.ImageFolder` with PIL `RandomResizedCrop(S)`,
   `RandomHorizontalFlip()`, `PILToTensor()`, `ConvertImageDtype(float)`, `Normalize` in a
   `DataLoader` (RandomSampler, pin_memory on CUDA) with the same workers and prefetch depth.
   Both read ILSVRC-layout noise JPEGs of ImageNet's typical 500 x 375 px
   (`bench_loader.make_layout`); images/s of normalised (B, 3, S, S) float32 batches on the
   device. Both keep their workers between rounds (persistent), and each round first takes,
   untimed, the workers x prefetch batches its workers decoded while the other loader ran.
b. Training step at ImageNet size on one fixed pair of generated batches (the data is a's):
   - `resnet50`: flexbench's step (`bench_throughput.FlexbenchRunner`: the trainer's Step,
     SGD, the loss summed on the device) for `ddnn_resnet` with one sub-model, bottleneck
     blocks [3, 4, 6, 3] = ResNet-50 (`--profile imagenet`: arch.variant imagenet), against
     torchvision's `resnet50()` in the reference's `train_one_epoch` step: model.train(),
     `CrossEntropyLoss`, output and loss under autocast, optimizer.zero_grad(),
     loss.backward(), optimizer.step(), then the batch's top-1/top-5 (`utils.accuracy`) and
     `loss.item()`, `acc1.item()`, `acc5.item()` every step;
   - `mobilenet_v1`: flexbench's step for `slimmable_mobilenet_v1` at widths [1.0] with the
     ImageNet stem (stem stride 2) against that same loop over the same module
     (`forward_sub(x, 0)`).
   Same batch, device, optimizer (SGD lr 0.01, momentum 0.9), label smoothing, autocast and
   memory format (`benchmark.costs.speed.choose`: bf16 where native, the architecture's
   declared format; `--set runtime.amp=...`, `runtime.memory_format=...` change both).

Runners alternate in rounds (`bench_throughput.alternate`); medians, step/s and ratios are
printed as one table; `--json PATH` appends the record.

    python scripts/bench_imagenet.py --batch 8 --steps 2 --rounds 3 --set runtime.threads=1
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_loader  # noqa: E402
import bench_throughput as bt  # noqa: E402

from benchmark.config import parse_sets, resolve  # noqa: E402
from benchmark.costs import speed  # noqa: E402
from benchmark.data.pipeline import Normalizer  # noqa: E402
from benchmark.data.stream import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from benchmark.errors import ConfigError, got  # noqa: E402
from benchmark.models.imagenet_resnet import MIN_IMAGENET_SIZE  # noqa: E402
from benchmark.training.build import pick_device  # noqa: E402
from benchmark.training.distributed import SINGLE, Dist  # noqa: E402

NUM_CLASSES = 1000  # ILSVRC-2012
METHOD = "joint"  # one sub-model: its cross-entropy, the reference loop's loss
PARTS = ("loader", "step")


@dataclass(frozen=True)
class StepModel:
    """One ImageNet network: flexbench's architecture and settings (`--profile imagenet`),
    and the reference loop's module (None: the same flexbench module's `forward_sub(x, 0)`)."""

    arch: str
    sets: dict[str, Any]
    reference: Callable[[], nn.Module] | None
    reference_name: str


def _torchvision_resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(num_classes=NUM_CLASSES)


STEP_MODELS = {
    # ResNet-50: 25.56 M parameters, 4.09 GMACs in both (tests/test_imagenet_archs.py)
    "resnet50": StepModel(
        "ddnn_resnet",
        {"arch.block": "bottleneck", "arch.depths": [[3, 4, 6, 3]]},
        _torchvision_resnet50,
        "torchvision",
    ),
    "mobilenet_v1": StepModel("slimmable_mobilenet_v1", {"arch.widths": [1.0]}, None, "plain"),
}


# -- a. the loaders ---------------------------------------------------------------------------


def reference_loader(
    root: Path, workers: int, prefetch: int, batch: int, size: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (normalised (B, 3, S, S) float32, labels (B,)) batches on `device` from the
    torchvision classification reference's training data path (module docstring, a)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
            transforms.ConvertImageDtype(torch.float),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ds = datasets.ImageFolder(str(root / "train"), tf)
    loader = DataLoader(
        ds,
        batch_size=batch,
        sampler=RandomSampler(ds),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch if workers else None,
        persistent_workers=workers > 0,
    )
    for x, y in bt._batches(loader):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class LoaderRunner(bt.Runner):
    """Images/s of an endless batch iterator; `buffered` batches (what its workers prefetched
    while the other loader was timed) are taken untimed before each round."""

    def __init__(
        self, name: str, it: Iterator[tuple[Tensor, Tensor]], device: torch.device, buffered: int
    ) -> None:
        self.name, self.it, self.device, self.buffered = name, it, device, buffered

    def step(self) -> int:
        return next(self.it)[0].shape[0]

    def run(self, steps: int) -> float:
        for _ in range(self.buffered):
            next(self.it)
        return super().run(steps)


def loader_bench(
    root: Path, workers: int, prefetch: int, batch: int, size: int, device: torch.device,
    rounds: int, batches: int,
) -> dict[str, Any]:  # fmt: skip
    """Alternating rounds of `batches` batches of flexbench's streamed loader and the
    reference loader over the layout at `root`: images/s each (median), per worker, ratio."""
    buffered = workers * prefetch
    runners = [
        LoaderRunner(
            "flexbench",
            bench_loader.streamed_batches(root, workers, prefetch, batch, size, "cpu", str(device)),
            device,
            buffered,
        ),
        LoaderRunner(
            "torchvision",
            reference_loader(root, workers, prefetch, batch, size, device),
            device,
            buffered,
        ),
    ]
    med, rates, warm_s = bt.alternate(runners, rounds, batches, 1)
    return {
        "workers": workers,
        "prefetch": prefetch,
        "batch": batch,
        "size": size,
        "rounds": rounds,
        "batches": batches,
        "images_per_s": med,
        "images_per_s_per_worker": {k: v / max(1, workers) for k, v in med.items()},
        "rounds_images_per_s": rates,
        "ratio": med["flexbench"] / med["torchvision"],
        "warmup_s": warm_s,
    }


# -- b. the training steps ----------------------------------------------------------------------


def step_cfg(model: str, batch: int, sets: dict[str, Any]) -> dict[str, Any]:
    """The resolved `--profile imagenet` cell of `model` (a key of STEP_MODELS) at `batch`,
    with `sets` (e.g. runtime.amp) on top. Raises ConfigError for an unknown model."""
    if model not in STEP_MODELS:
        raise ConfigError(f"unknown step model; valid: {', '.join(STEP_MODELS)}, {got(model)}")
    spec = STEP_MODELS[model]
    over = {**spec.sets, **sets, "train.batch_size": batch}
    return resolve(spec.arch, "imagenet", METHOD, 0, "imagenet", over)


def fixed_batches(
    n: int, batch: int, size: int, device: torch.device, fmt: torch.memory_format
) -> list[tuple[Tensor, Tensor]]:
    """n generated (normalised (B, 3, S, S) float32 in `fmt`, labels (B,)) batches on
    `device`, the same for every loop of a comparison (seeded)."""
    g = torch.Generator().manual_seed(0)
    norm = Normalizer(IMAGENET_MEAN, IMAGENET_STD, device, fmt)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        out.append((norm(x.to(device)), y.to(device)))
    return out


class FlexbenchStep(bt.FlexbenchRunner):
    """flexbench's step (bench_throughput.FlexbenchRunner's) on fixed batches; `d` a rank of
    a DDP group (its forwards then go through DDP, as in a distributed cell)."""

    def __init__(
        self, cfg: dict[str, Any], batches: list[tuple[Tensor, Tensor]], size: int,
        device: torch.device, fast: speed.Speed, d: Dist = SINGLE,
    ) -> None:  # fmt: skip
        self.build(cfg, NUM_CLASSES, size, device, fast, d)
        self.it = itertools.cycle(batches)


def accuracy(output: Tensor, target: Tensor, topk: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Top-k accuracies (%) of a batch, as the reference's `utils.accuracy` computes them."""
    with torch.inference_mode():
        _, pred = output.topk(max(topk), 1, True, True)
        correct = pred.t().eq(target[None])
        return [
            correct[:k].flatten().sum(dtype=torch.float32) * (100.0 / len(target)) for k in topk
        ]


class ReferenceStep(bt.Runner):
    """The torchvision classification reference's training step (module docstring, b) over
    `module` (called as `forward(x)`), in the settings' autocast and memory format."""

    def __init__(
        self, name: str, module: nn.Module, forward: Callable[[Tensor], Tensor],
        batches: list[tuple[Tensor, Tensor]], device: torch.device, fast: speed.Speed,
        label_smoothing: float,
    ) -> None:  # fmt: skip
        self.name, self.device, self.fast, self.forward = name, device, fast, forward
        self.module = module.to(device, memory_format=fast.torch_format)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.01, momentum=0.9)
        self.it = itertools.cycle(batches)
        self.module.train()

    def step(self) -> int:
        image, target = next(self.it)
        image, target = image.to(self.device), target.to(self.device)
        with self.fast.autocast():
            output = self.forward(image)
            loss = self.criterion(output, target)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        acc1, acc5 = accuracy(output, target)
        loss.item(), acc1.item(), acc5.item()
        return image.shape[0]


def step_runners(
    model: str, batch: int, size: int, sets: dict[str, Any], device: torch.device
) -> tuple[list[bt.Runner], speed.Speed]:
    """flexbench's step and the reference loop for `model` (STEP_MODELS) and their settings."""
    cfg = step_cfg(model, batch, sets)
    fast = speed.choose(cfg, device)
    batches = fixed_batches(2, batch, size, device, fast.torch_format)
    flex = FlexbenchStep(cfg, batches, size, device, fast)
    spec = STEP_MODELS[model]
    if spec.reference is None:  # the same module, a fresh copy with the same initial weights
        from benchmark.training.build import make_model

        module = make_model(cfg, NUM_CLASSES, size)
        forward = lambda x: module.forward_sub(x, 0)  # noqa: E731
    else:
        torch.manual_seed(cfg["seed"])
        module = spec.reference()
        forward = module
    smoothing = cfg["train"]["label_smoothing"]
    ref = ReferenceStep(spec.reference_name, module, forward, batches, device, fast, smoothing)
    return [flex, ref], fast


def step_bench(
    model: str, batch: int, size: int, sets: dict[str, Any], device: torch.device,
    rounds: int, steps: int, warmup: int,
) -> dict[str, Any]:  # fmt: skip
    """Alternating rounds of `steps` steps of flexbench's step and the reference loop for
    `model` at `batch` images of `size` px: images/s and steps/s each (median), ratio."""
    runners, fast = step_runners(model, batch, size, sets, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    med, rates, warm_s = bt.alternate(runners, rounds, steps, warmup)
    rec = {
        "model": model,
        "arch": STEP_MODELS[model].arch,
        "reference": runners[1].name,
        "batch": batch,
        "size": size,
        "rounds": rounds,
        "steps": steps,
        "settings": fast.tags(),
        "parameters": {r.name: sum(p.numel() for p in _module(r).parameters()) for r in runners},
        "images_per_s": med,
        "steps_per_s": {k: v / batch for k, v in med.items()},
        "rounds_images_per_s": rates,
        "ratio": med["flexbench"] / med[runners[1].name],
        "warmup_s": warm_s,
    }
    if device.type == "cuda":
        rec["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return rec


def _module(r: bt.Runner) -> nn.Module:
    return r.model if isinstance(r, FlexbenchStep) else r.module


# -- the command --------------------------------------------------------------------------------


def table(rec: dict[str, Any]) -> str:
    """One Markdown row per comparison: flexbench, the reference, the ratio."""
    rows = [
        "| comparison | flexbench | reference | flexbench / reference |",
        "|---|---|---|---|",
    ]
    if "loader" in rec:
        lo, ips = rec["loader"], rec["loader"]["images_per_s"]
        per = lo["images_per_s_per_worker"]
        rows.append(
            f"| loader, {lo['workers']} workers, batch {lo['batch']}, {lo['size']} px (img/s; "
            f"per worker) | {ips['flexbench']:.1f}; {per['flexbench']:.1f} | torchvision "
            f"ImageFolder + PIL: {ips['torchvision']:.1f}; {per['torchvision']:.1f} | "
            f"{lo['ratio']:.2f}x |"
        )
    for s in rec.get("steps", []):
        sps, ips, ref = s["steps_per_s"], s["images_per_s"], s["reference"]
        rows.append(
            f"| {s['model']} step, batch {s['batch']}, {s['size']} px, "
            f"{s['settings']['flexbench.amp']} {s['settings']['flexbench.memory_format']} "
            f"(step/s; img/s) | {sps['flexbench']:.3f}; {ips['flexbench']:.1f} | {ref}: "
            f"{sps[ref]:.3f}; {ips[ref]:.1f} | {s['ratio']:.2f}x |"
        )
    return "\n".join(rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help="loader, step or both")
    ap.add_argument("--models", default=",".join(STEP_MODELS), help="step models")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="runtime.* K=V")
    ap.add_argument("--size", type=int, default=224, help="image side in px (crop and step)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (both loaders)")
    ap.add_argument("--prefetch", type=int, default=2, help="batches prefetched per worker")
    ap.add_argument("--loader-batch", type=int, default=32)
    ap.add_argument("--loader-batches", type=int, default=8, help="timed batches per round")
    ap.add_argument("--batch", type=int, default=8, help="training step batch")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per runner and round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", type=Path, help="append the result record to this file")
    args = ap.parse_args(argv)
    positive = ("rounds", "prefetch", "loader_batch", "loader_batches", "batch", "steps")
    lows = {"size": MIN_IMAGENET_SIZE, "workers": 0, "warmup": 0} | dict.fromkeys(positive, 1)
    for key, low in lows.items():
        if getattr(args, key) < low:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} must be an integer >= {low}, {got(getattr(args, key))}")
    for name, values, valid in (
        ("--parts", args.parts, PARTS),
        ("--models", args.models, tuple(STEP_MODELS)),
    ):
        bad = [v for v in values.split(",") if v not in valid]
        if bad:
            raise ConfigError(f"{name}: valid: {', '.join(valid)}, {got(','.join(bad))}")
    return args


def run(argv: list[str] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Parse `argv`, measure the asked parts, print the table (unless quiet), return the record."""
    args = parse(argv)
    sets = parse_sets(args.sets)
    runtime = step_cfg("resnet50", args.batch, sets)["runtime"]
    device = pick_device(runtime["device"])
    if runtime["threads"]:
        torch.set_num_threads(runtime["threads"])
    rec: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    rec["cpu_capability"] = speed.cpu_capability()
    parts = args.parts.split(",")
    if "loader" in parts:
        with tempfile.TemporaryDirectory(prefix="flexbench-imagenet-") as tmp:
            per = (args.rounds + 1) * (args.loader_batches + args.workers * args.prefetch + 2)
            root = bench_loader.make_layout(Path(tmp), 4, per * args.loader_batch // 4 + 1)
            rec["loader"] = loader_bench(
                root, args.workers, args.prefetch, args.loader_batch, args.size, device,
                args.rounds, args.loader_batches,
            )  # fmt: skip
    if "step" in parts:
        rec["steps"] = [
            step_bench(m, args.batch, args.size, sets, device, args.rounds, args.steps, args.warmup)
            for m in args.models.split(",")
        ]
    if not quiet:
        print(table(rec))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return rec


if __name__ == "__main__":
    try:
        run()
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
