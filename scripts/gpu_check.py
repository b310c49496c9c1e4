"""One prepared check of flexbench on a GPU machine: writes gpu_check.json + gpu_check.txt.

Stages (each timed; the whole check is sized to finish in < 8 minutes on one GPU):
1. the `cuda` tests (pytest -m cuda);
2. per family, paper-size training throughput (img/s) with the device's defaults (bf16 +
   channels_last where declared), compile off and on, beside the plain loop (and the MSDNet
   reference loop) on the same device, plus peak memory (scripts/bench_throughput.py);
3. concurrent cells per GPU: 1, 2, 4, 8 worker processes training MSDNet on one device at once,
   total img/s (CIFAR models at batch 64 cannot fill a large GPU);
4. JPEG decoding of the streamed ImageNet loader at 224 px on generated 500 x 375 JPEGs:
   nvjpeg (`runtime.decode=cuda`) against CPU DataLoader workers, both delivering to the GPU
   (scripts/bench_loader.py `loader_throughput`);
5. the ResNet-50 ImageNet-size step in bf16 + channels_last, flexbench's against the
   torchvision reference loop's (scripts/bench_imagenet.py `step_bench`);
6. a 2-process DDP step of that ResNet-50 (`torch.distributed.run`, flexbench's Step through
   DDP): on one GPU both ranks share it over gloo (NCCL refuses two ranks on one device;
   `distributed.init_rank(backend="gloo")`), on two or more NCCL; the ranks' weights must agree;
7. a short real-data run (MSDNet `joint`, a few epochs on the CIFAR-10 JPEG copy) that must learn.

`--dry-run` runs every stage at toy size on whatever device there is (a CPU in the tests), so
the script cannot rot between GPU machines; `--stages a,b` runs only those stages (e.g. to
rerun one within the time budget). The JSON is rewritten after every stage, so a check stopped
by its timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark.costs.speed import FAMILIES  # noqa: E402

BF16_NHWC = {"runtime.amp": True, "runtime.memory_format": "channels_last"}


def cuda_tests() -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            "tests/test_speed.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"rc": proc.returncode, "summary": tail[0], "seconds": time.perf_counter() - t0}


def throughput(dry: bool) -> list[dict]:
    import bench_throughput as bt
    import torch

    profile = "smoke" if dry else "paper"
    steps, rounds = (1, 1) if dry else (10, 2)
    out = []
    for arch, method in FAMILIES:
        for compiled in (False,) if dry else (False, True):
            argv = ["--arch", arch, "--method", method, "--profile", profile]
            argv += ["--steps", str(steps), "--rounds", str(rounds), "--warmup", "1"]
            argv += ["--loader-workers", "0" if dry else "4"]
            argv += ["--set", f"runtime.compile={str(compiled).lower()}"]
            if dry:
                argv += ["--set", "data.train_subset=256", "--set", "train.batch_size=16"]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rec = bt.run(argv, quiet=dry)
            rec["compile"] = compiled
            if torch.cuda.is_available():
                rec["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out.append(rec)
    return out


def _worker(argv: list[str]) -> None:
    """One concurrent cell: train MSDNet for a fixed number of steps, print images/s."""
    import bench_throughput as bt
    import torch

    from benchmark import data as datasets
    from benchmark.config import parse_sets, resolve
    from benchmark.costs import speed
    from benchmark.training.build import pick_device

    profile, steps = argv[0], int(argv[1])
    sets = {"data.val_size": 200} | parse_sets(argv[2:])
    cfg = resolve("msdnet", "synthetic", "joint", 0, profile, sets)
    device = pick_device(cfg["runtime"]["device"])
    torch.set_num_threads(1)
    splits = datasets.load_splits("synthetic", cfg["data"])
    r = bt.FlexbenchRunner(cfg, splits, device, speed.choose(cfg, device))
    r.run(2)
    print(json.dumps({"images_per_s": r.run(steps)}), flush=True)


def concurrency(dry: bool) -> list[dict]:
    """Total img/s of N processes training at once on one device."""
    profile, steps = ("smoke", 3) if dry else ("paper", 40)
    extra = ["data.train_subset=256", "train.batch_size=16"] if dry else []
    out = []
    for n in (1, 2) if dry else (1, 2, 4, 8):
        cmd = [sys.executable, __file__, "--worker", profile, str(steps), *extra]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        rates = [
            json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs
        ]
        out.append({"workers": n, "total_images_per_s": sum(rates), "per_worker": rates})
    return out


def decode(dry: bool) -> dict:
    """Streamed training images/s at 224 px decoded by CPU workers and (on CUDA) by nvjpeg,
    both ending on the training device; ratio = nvjpeg / CPU workers."""
    import bench_loader
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    workers, batch, batches = (1, 4, 2) if dry else (8, 64, 20)
    runs = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-jpeg-") as tmp:
        root = bench_loader.make_layout(Path(tmp), 4, (batches + 2) * batch // 4 + 1)
        for how in ("cpu", "cuda") if cuda else ("cpu",):
            runs.append(
                bench_loader.loader_throughput(root, workers, 2, batch, batches, 224, how, device)
            )
    rec = {"device": device, "batch": batch, "batches": batches, "runs": runs}
    if cuda:
        rec["ratio"] = runs[1]["images_per_s"] / runs[0]["images_per_s"]
    return rec


def imagenet_step(dry: bool) -> dict:
    """flexbench's ResNet-50 step against the torchvision reference loop, bf16 + channels_last."""
    import bench_imagenet as bi

    from benchmark.training.build import pick_device

    size, batch, steps, rounds, warmup = (64, 2, 1, 1, 1) if dry else (224, 64, 10, 2, 3)
    return bi.step_bench("resnet50", batch, size, BF16_NHWC, pick_device("auto"), rounds, steps,
                         warmup)  # fmt: skip


def _ddp_worker(argv: list[str]) -> None:
    """One rank of the DDP stage (under torchrun): flexbench's ResNet-50 step through DDP on
    this rank's half of a global batch; rank 0 writes images/s (global) and whether every
    rank holds the same weights after the steps to the JSON file argv[4]."""
    import bench_imagenet as bi
    import torch

    from benchmark.costs import speed
    from benchmark.data.pipeline import shard_slice
    from benchmark.training.distributed import init_rank

    backend, size, batch, steps, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    torch.set_num_threads(1)
    d, dev = init_rank("auto", None if backend == "default" else backend)
    device = torch.device(dev)
    cfg = bi.step_cfg("resnet50", batch * d.world, BF16_NHWC)
    fast = speed.choose(cfg, device)
    part = shard_slice(batch * d.world, d.shard)
    batches = [(x[part], y[part]) for x, y in bi.fixed_batches(2, batch * d.world, size, device,
                                                                fast.torch_format)]  # fmt: skip
    runner = bi.FlexbenchStep(cfg, batches, size, device, fast, d)
    runner.run(1)
    rate = runner.run(steps)
    weights = sum(p.detach().double().sum().item() for p in runner.model.parameters())
    rates, sums = zip(*d.gather((rate, weights)))
    if d.main:
        rec = {"backend": torch.distributed.get_backend(), "world": d.world, "device": dev}
        rec |= {"batch_per_rank": batch, "steps": steps, "size": size}
        rec |= {"images_per_s": min(rates) * d.world, "ranks_agree": len(set(sums)) == 1}
        Path(out).write_text(json.dumps(rec))
    torch.distributed.destroy_process_group()


def ddp(dry: bool) -> dict:
    """2 ranks under `torch.distributed.run` training the ResNet-50 step through DDP: gloo
    when fewer than 2 GPUs are present (both ranks on one), else NCCL (one GPU each)."""
    import torch

    backend = "default" if torch.cuda.device_count() >= 2 else "gloo"
    size, batch, steps = (64, 2, 1) if dry else (224, 32, 5)
    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--max-restarts", "0", __file__, "--ddp-worker",
               backend, str(size), str(batch), str(steps), str(out)]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        rec = json.loads(out.read_text()) if out.exists() else {"ranks_agree": False}
    rec |= {"rc": proc.returncode, "seconds": time.perf_counter() - t0}
    if proc.returncode:
        rec["stderr_tail"] = proc.stderr[-2000:]
    return rec


def real_data(data: str | None, dry: bool) -> dict:
    """A few epochs of MSDNet `joint`; learned = mean test top-1 of the exits above chance + 15."""
    from benchmark.config import resolve
    from benchmark.training.train import CellOptions, train_cell

    dataset = "synthetic" if dry or not data else f"imagefolder:{data}"
    sets = {"train.epochs": 2 if dry else 4, "runtime.latency_repeats": 1}
    sets |= {"runtime.latency_warmup": 0}
    if dry:
        sets |= {"data.train_subset": 256, "data.val_size": 64, "data.test_subset": 128}
        sets |= {"train.batch_size": 32}
    cfg = resolve("msdnet", dataset, "joint", 0, "smoke" if dry else "mini", sets)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        cfg["runtime"]["workdir"] = tmp
        opts = CellOptions(tracking_uri=f"sqlite:///{tmp}/mlflow.db", progress=False)
        t0 = time.perf_counter()
        res = train_cell(cfg, opts)
    top1 = [r["top1"] for r in res.rows]
    chance = 100 / 10
    return {
        "dataset": dataset,
        "epochs": cfg["train"]["epochs"],
        "test_top1": top1,
        "seconds": time.perf_counter() - t0,
        "learned": sum(top1) / len(top1) > chance + 15,
    }


def _throughput_lines(rows: list[dict]) -> list[str]:
    import bench_throughput as bt

    lines = []
    for t in rows:
        ips = t["images_per_s"]
        ref = bt.optional(ips, "reference", ", reference {:.0f}")
        mem = bt.optional(t, "peak_memory_mib", ", peak {:.0f} MiB")
        lines.append(
            f"{t['arch']}/{t['method']} compile={t['compile']}: flexbench {ips['flexbench']:.0f} "
            f"img/s, plain {ips['plain']:.0f}{ref} ({t['ratio_vs_plain']:.2f}x plain){mem}"
        )
    return lines


def _decode_lines(rec: dict) -> list[str]:
    runs = ", ".join(
        f"{r['decode']} decode {r['images_per_s']:.0f} img/s ({r['workers']} workers)"
        for r in rec["runs"]
    )
    ratio = f" -> nvjpeg {rec['ratio']:.2f}x CPU workers" if "ratio" in rec else ""
    return [f"JPEG decode at 224 px onto {rec['device']}: {runs}{ratio}"]


def _step_lines(rec: dict) -> list[str]:
    ips, ref = rec["images_per_s"], rec["reference"]
    return [
        f"ResNet-50 step ({rec['settings']['flexbench.amp']}, batch {rec['batch']}, "
        f"{rec['size']} px): flexbench {ips['flexbench']:.0f} img/s, {ref} {ips[ref]:.0f} "
        f"({rec['ratio']:.2f}x)"
    ]


def _ddp_lines(rec: dict) -> list[str]:
    if "world" not in rec:
        return [f"DDP step: FAILED (rc {rec['rc']})"]
    return [
        f"DDP step ({rec['world']} ranks, {rec['backend']}, {rec['device']}, batch "
        f"{rec['batch_per_rank']} per rank): {rec['images_per_s']:.0f} img/s, ranks "
        f"{'agree' if rec['ranks_agree'] else 'DISAGREE'}"
    ]


def _real_data_lines(rd: dict) -> list[str]:
    return [
        f"real data ({rd['dataset']}, {rd['epochs']} epochs): test top-1 "
        + ", ".join(f"{v:.1f}" for v in rd["test_top1"])
        + f" -> {'learned' if rd['learned'] else 'DID NOT LEARN'}"
    ]


SUMMARY = {
    "cuda_tests": lambda r: [f"cuda tests: {r['summary']} (rc {r['rc']})"],
    "throughput": _throughput_lines,
    "concurrency": lambda rows: [
        f"{c['workers']} worker(s): {c['total_images_per_s']:.0f} img/s in total" for c in rows
    ],
    "decode": _decode_lines,
    "imagenet_step": _step_lines,
    "ddp": _ddp_lines,
    "real_data": _real_data_lines,
}


def summary(rec: dict) -> str:
    """The short text of a check record: one or more lines per stage that ran."""
    lines = [f"flexbench GPU check ({'dry run' if rec['dry_run'] else 'full'}): {rec['device']}"]
    for name, lines_of in SUMMARY.items():
        if name in rec:
            lines += lines_of(rec[name])
    lines.append(f"summary: {rec['seconds']:.0f} s in total")
    return "\n".join(lines) + "\n"


def passed(rec: dict, dry: bool) -> bool:
    """The cuda tests passed (or none ran), the DDP ranks agree, and the real-data cell
    learned (not required of a dry run's toy cell); stages that did not run are not judged."""
    ok = rec.get("cuda_tests", {"rc": 0})["rc"] in (0, 5)
    ok = ok and rec.get("ddp", {"ranks_agree": True})["ranks_agree"]
    return ok and (dry or rec.get("real_data", {"learned": True})["learned"])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--worker", "--ddp-worker"):
        (_worker if sys.argv[1] == "--worker" else _ddp_worker)(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes: any device, ~minutes")
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--data", help="the CIFAR-10 JPEG zip/folder for the real-data run")
    ap.add_argument("--stages", default=",".join(SUMMARY), help="comma-separated, in order")
    args = ap.parse_args()
    stages = {
        "cuda_tests": cuda_tests,
        "throughput": lambda: throughput(args.dry_run),
        "concurrency": lambda: concurrency(args.dry_run),
        "decode": lambda: decode(args.dry_run),
        "imagenet_step": lambda: imagenet_step(args.dry_run),
        "ddp": lambda: ddp(args.dry_run),
        "real_data": lambda: real_data(args.data, args.dry_run),
    }
    asked = args.stages.split(",")
    if unknown := [n for n in asked if n not in stages]:
        ap.error(f"--stages: valid: {', '.join(stages)}; got {', '.join(unknown)}")
    import torch

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    t0 = time.perf_counter()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    rec = {"dry_run": args.dry_run, "device": dev, "torch": torch.__version__}
    rec["date"] = time.strftime("%Y-%m-%d %H:%M")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in asked:
        t = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        rec[name] = stages[name]()
        print(f"gpu_check: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rec["seconds"] = time.perf_counter() - t0
        (args.out / "gpu_check.json").write_text(json.dumps(rec, indent=1))
    text = summary(rec)
    (args.out / "gpu_check.txt").write_text(text)
    print(text, end="")
    return 0 if passed(rec, args.dry_run) else 1


if __name__ == "__main__":
    sys.exit(main())
