"""Every family at paper and mini size: flexbench's step vs the plain loop (and the MSDNet
reference loop for early-exit models), one `bench_throughput` measurement each (alternating
rounds in one process), then one Markdown table with the ratios (docs/performance.md).

    python scripts/bench_families.py --json bench.jsonl [--profiles paper,mini] [--set K=V]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_throughput as bt  # noqa: E402

from benchmark.costs.speed import FAMILIES  # noqa: E402

# (timed steps per round, rounds): paper-size steps take ~1 s on 2 CPU cores, mini ~0.1 s
STEPS = {"paper": (3, 3), "mini": (8, 3), "smoke": (2, 1)}


def table(records: list[dict]) -> str:
    head = (
        "| arch / method / profile | flexbench img/s | plain img/s | reference img/s | "
        "vs plain | vs reference | step GFLOP/s (% of matmul peak) |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in records:
        ips = r["images_per_s"]
        ref = bt.optional(ips, "reference", "{:.1f}", "–")
        vs_ref = bt.optional(r, "ratio_vs_reference", "{:.2f}×", "–")
        rows.append(
            f"| `{r['arch']}` / `{r['method']}` / {r['profile']} (batch {r['batch']}) | "
            f"{ips['flexbench']:.1f} | {ips['plain']:.1f} | {ref} | {r['ratio_vs_plain']:.2f}× | "
            f"{vs_ref} | {r['step_gflops']:.1f} ({100 * r['fraction_of_peak']:.0f}% of "
            f"{r['matmul_peak_gflops']:.0f}) |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default="paper,mini")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="append each result record to this file")
    args = ap.parse_args(argv)
    records = []
    for profile in args.profiles.split(","):
        steps, rounds = STEPS[profile]
        for arch, method in FAMILIES:
            run = ["--arch", arch, "--method", method, "--profile", profile]
            run += ["--steps", str(steps), "--rounds", str(rounds), "--warmup", "1"]
            run += ["--loader-workers", str(args.loader_workers)]
            if profile != "paper":  # the generated set holds 2,000 images; the cost per step
                run += ["--set=data.train_subset=1024"]  # does not depend on the subset
            run += [f"--set={s}" for s in args.sets]
            rec = bt.run(run, quiet=False)
            records.append(rec)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
