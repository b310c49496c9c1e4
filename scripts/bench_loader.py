"""The streaming loader alone: decoded + augmented training images per second, per worker.

Generates an ILSVRC-style layout of noise JPEGs at ImageNet's typical size (500 x 375, quality
90) in a temporary folder, then reads `--batches` training batches of `imagenet:` through the
streaming path (`benchmark.data.stream`: DataLoader workers decoding with libjpeg-turbo,
RandomResizedCrop + flip to `--size`) for each worker count, after one warm-up batch (worker
start-up excluded). Prints one JSON line per worker count:
{"decode", "workers", "prefetch", "images_per_s", "images_per_s_per_worker"}.

    python scripts/bench_loader.py --workers 0 1 2 --batches 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import data as datasets  # noqa: E402
from benchmark.data.pipeline import Normalizer  # noqa: E402
from benchmark.data.stream import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def make_layout(root: Path, classes: int, per_class: int, hw: tuple[int, int] = (375, 500)) -> Path:
    """train/<wnid>/*.JPEG (per_class each) and val/<wnid>/0.JPEG of smooth noise images."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(n):
                low = torch.randint(0, 256, (1, 3, hw[0] // 8, hw[1] // 8), generator=g).float()
                img = torch.nn.functional.interpolate(low, size=hw, mode="bilinear")[0]
                jpeg = encode_jpeg(img.clamp(0, 255).to(torch.uint8), quality=90)
                (folder / f"{i}.JPEG").write_bytes(jpeg.numpy().tobytes())
    return root


def streamed_batches(
    root: Path, workers: int, prefetch: int, batch: int, size: int, decode: str = "cpu",
    device: str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Endless training batches of `imagenet:<root>` through flexbench's streaming path:
    (normalised images (batch, 3, size, size) float32, labels (batch,) int64) on `device`,
    epoch after epoch (seed 0), decoded by `workers` CPU DataLoader workers (`decode` "cpu") or
    by nvjpeg on a CUDA `device` ("cuda"). Raises ConfigError for decode "cuda" off CUDA."""
    cfg = {"val_size": 0, "train_subset": None, "test_subset": None, "split_seed": 0,
           "image_size": size, "in_memory": False}  # fmt: skip
    runtime = {"loader_workers": workers, "prefetch": prefetch, "decode": decode}
    dev = torch.device(device)
    splits = datasets.load_splits(f"imagenet:{root}", cfg, runtime, dev)
    norm = Normalizer(IMAGENET_MEAN, IMAGENET_STD, dev)
    batches = splits.train.train_batches(batch, norm, 0, dev)
    return (b for e in itertools.count() for b in batches.epoch(e))


def loader_throughput(
    root: Path, workers: int, prefetch: int, batch: int, batches: int, size: int,
    decode: str = "cpu", device: str = "cpu",
) -> dict[str, float]:  # fmt: skip
    """Images/s of the streamed training batches of `imagenet:<root>` on `device`, decoded by
    CPU workers (`decode` "cpu") or by nvjpeg on a CUDA `device` ("cuda", the GPU check's
    comparison); the device is synchronised before the clock stops."""
    dev = torch.device(device)
    it = streamed_batches(root, workers, prefetch, batch, size, decode, device)
    next(it)  # workers started, first batch decoded
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x, _ in (next(it) for _ in range(batches)))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    rate = n / (time.perf_counter() - t0)
    return {"decode": decode, "workers": workers, "prefetch": prefetch,
            "images_per_s": round(rate, 1),
            "images_per_s_per_worker": round(rate / max(1, workers), 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--decode", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (--decode cuda needs cuda)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="flexbench-loader-") as tmp:
        per_class = (args.batches + 2) * args.batch // 4 + 1
        root = make_layout(Path(tmp), 4, per_class)
        for w in args.workers:
            r = loader_throughput(
                root,
                w,
                args.prefetch,
                args.batch,
                args.batches,
                args.size,
                args.decode,
                args.device,
            )
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
