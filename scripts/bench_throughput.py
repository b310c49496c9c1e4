"""Training throughput: flexbench's step vs a plain PyTorch loop on the same model and method.

flexbench: uint8 data resident on the device, batched crop+flip, channels_last, device-side
metrics (one host sync per `log_every` steps). Plain loop (how the anchor repositories train):
DataLoader + torchvision PIL transforms, contiguous NCHW, `.item()` on the loss every step.
Both run the same sub-models with the same method loss, one optimizer step per batch, side by
side in one process. Prints images/s through all sub-models and the ratio.

    python scripts/bench_throughput.py --arch slimmable_mobilenet_v1 --profile mini \
        --dataset imagefolder:../shared/data/cifar10-jpeg.zip --steps 30
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

from benchmark import data as datasets
from benchmark.cell import make_method, make_model, pick_device
from benchmark.config import parse_sets, resolve
from benchmark.data.pipeline import Normalizer, TrainBatches
from benchmark.step import make_step


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


def images_per_s(train_step, batches, device, steps: int, warmup: int, finish=None) -> float:
    """Images/s of `train_step(i, xb, yb)` over `steps` batches after `warmup` untimed ones,
    the same clock for both loops; `finish` waits for queued device work to count it."""
    n = 0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        xb, yb = next(batches)
        train_step(i, xb, yb)
        n += yb.shape[0]
    if finish is not None:
        finish()
    return n / (time.perf_counter() - t0)


def run_flexbench(cfg, splits, device, steps: int, warmup: int) -> float:
    model = make_model(cfg, splits.num_classes, splits.image_size).to(
        device, memory_format=torch.channels_last
    )
    method = make_method(cfg, model.num_submodels)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(
        model, method, method.stages(model.num_submodels)[0], device, amp=device.type == "cuda"
    )
    norm = Normalizer(splits.mean, splits.std, device)
    batches = TrainBatches(
        splits.train_x, splits.train_y, cfg["train"]["batch_size"], norm, 0, device
    )
    log_every = cfg["runtime"]["log_every"]
    loss_sum = torch.zeros((), device=device)

    def train_step(i: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        nonlocal loss_sum
        loss = step(xb, yb).loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss
        if (i + 1) % log_every == 0:
            loss_sum.item()

    return images_per_s(train_step, batches.epoch(0), device, steps, warmup, loss_sum.item)


def run_plain(cfg, splits, device, steps: int, warmup: int, workers: int) -> float:
    model = make_model(cfg, splits.num_classes, splits.image_size).to(device)
    method = make_method(cfg, model.num_submodels)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(
        PILDataset(splits.train_x, splits.train_y, splits.mean, splits.std),
        batch_size=cfg["train"]["batch_size"],
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    k_all = list(range(model.num_submodels))[::-1]

    def train_step(i: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        xb, yb = xb.to(device), yb.to(device)
        teachers, feats, total = {}, {}, 0.0
        for k in k_all:
            if method.uses_features:
                z, feats[k] = model.forward_sub_features(xb, k)
                fk = {j: [f.detach() for f in v] for j, v in feats.items() if j != k}
                fk[k] = feats[k]
            else:
                z, fk = model.forward_sub(xb, k), None
            loss, _ = method.loss(k, z, teachers, yb, model.num_submodels, fk)
            teachers[k] = z.detach()
            total = total + loss
        opt.zero_grad()
        total.backward()
        opt.step()
        total.item()

    return images_per_s(train_step, iter(loader), device, steps, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="slimmable_mobilenet_v1")
    ap.add_argument("--method", default="ipkd_ta")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--loader-workers", type=int, default=2)
    args = ap.parse_args()
    cfg = resolve(args.arch, args.dataset, args.method, 0, args.profile, parse_sets(args.sets))
    device = pick_device(cfg["runtime"]["device"])
    splits = datasets.load_splits(args.dataset, cfg["data"])
    print(
        f"{args.arch} / {args.method} / {args.profile} on {device} "
        f"({torch.get_num_threads()} threads), batch {cfg['train']['batch_size']}, "
        f"{args.steps} timed steps"
    )
    fb = run_flexbench(cfg, splits, device, args.steps, args.warmup)
    plain = run_plain(cfg, splits, device, args.steps, args.warmup, args.loader_workers)
    print(f"flexbench step : {fb:9.1f} images/s")
    print(
        f"plain loop     : {plain:9.1f} images/s "
        f"(DataLoader x{args.loader_workers} workers, PIL transforms, NCHW, .item() per step)"
    )
    print(f"ratio          : {fb / plain:9.2f}x")


if __name__ == "__main__":
    main()
