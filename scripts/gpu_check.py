"""One prepared check of flexbench on a GPU machine: writes gpu_check.json + gpu_check.txt.

Stages (each timed; the whole check is sized to finish in < 8 minutes on one GPU):
1. the `cuda` tests (pytest -m cuda);
2. per family, paper-size training throughput (img/s) with the device's defaults (bf16 +
   channels_last where declared), compile off and on, beside the plain loop (and the MSDNet
   reference loop) on the same device, plus peak memory (scripts/bench_throughput.py);
3. concurrent cells per GPU: 1, 2, 4, 8 worker processes training MSDNet on one device at once,
   total img/s (CIFAR models at batch 64 cannot fill a large GPU);
4. a short real-data run (MSDNet `joint`, a few epochs on the CIFAR-10 JPEG copy) that must learn.

`--dry-run` runs every stage at toy size on whatever device there is (a CPU in the tests), so
the script cannot rot between GPU machines.
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


def summary(rec: dict) -> str:
    import bench_throughput as bt

    lines = [f"flexbench GPU check ({'dry run' if rec['dry_run'] else 'full'}): {rec['device']}"]
    lines.append(f"cuda tests: {rec['cuda_tests']['summary']} (rc {rec['cuda_tests']['rc']})")
    for t in rec["throughput"]:
        ips = t["images_per_s"]
        ref = bt.optional(ips, "reference", ", reference {:.0f}")
        mem = bt.optional(t, "peak_memory_mib", ", peak {:.0f} MiB")
        lines.append(
            f"{t['arch']}/{t['method']} compile={t['compile']}: flexbench {ips['flexbench']:.0f} "
            f"img/s, plain {ips['plain']:.0f}{ref} ({t['ratio_vs_plain']:.2f}x plain){mem}"
        )
    for c in rec["concurrency"]:
        lines.append(f"{c['workers']} worker(s): {c['total_images_per_s']:.0f} img/s in total")
    rd = rec["real_data"]
    lines.append(
        f"real data ({rd['dataset']}, {rd['epochs']} epochs): test top-1 "
        + ", ".join(f"{v:.1f}" for v in rd["test_top1"])
        + f" -> {'learned' if rd['learned'] else 'DID NOT LEARN'}"
    )
    lines.append(f"summary: {rec['seconds']:.0f} s in total")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes: any device, ~minutes")
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--data", help="the CIFAR-10 JPEG zip/folder for the real-data run")
    args = ap.parse_args()
    import torch

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    t0 = time.perf_counter()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    rec = {"dry_run": args.dry_run, "device": dev, "torch": torch.__version__}
    rec["date"] = time.strftime("%Y-%m-%d %H:%M")
    stages = [
        ("cuda_tests", cuda_tests),
        ("throughput", lambda: throughput(args.dry_run)),
        ("concurrency", lambda: concurrency(args.dry_run)),
        ("real_data", lambda: real_data(args.data, args.dry_run)),
    ]
    for name, stage in stages:
        t = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        rec[name] = stage()
        print(f"gpu_check: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rec["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(rec, indent=1))
    text = summary(rec)
    (args.out / "gpu_check.txt").write_text(text)
    print(text, end="")
    ok = rec["cuda_tests"]["rc"] in (0, 5) and (rec["real_data"]["learned"] or args.dry_run)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
