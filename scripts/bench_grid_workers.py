"""Wall time of a whole grid run with 1 worker vs N workers (local executor, CPU).

Each run is a real `flexbench grid run` process on a fresh MLflow SQLite copy (schema created
once, outside the timing) and a fresh workdir, so every cell is trained. Runs alternate
(1, N, 1, N, ...) so that a change in machine load hits both settings alike.

    python scripts/bench_grid_workers.py                       # smoke grid, 1 vs 2 workers
    python scripts/bench_grid_workers.py --workers 1 2 4 --repeat 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_once(config: Path, workers: int, schema_db: Path, folder: Path, sets: list[str]) -> dict:
    folder.mkdir(parents=True)
    db = folder / "mlflow.db"
    shutil.copy(schema_db, db)
    cmd = [
        sys.executable, "-m", "benchmark.cli", "grid", "run", str(config),
        "--workers", str(workers), "--devices", "cpu",
        "--tracking-uri", f"sqlite:///{db}", "--set", f"runtime.workdir={folder / 'runs'}",
    ]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"grid run failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    summary = [line for line in proc.stdout.splitlines() if line.startswith("summary:")]
    return {
        "workers": workers,
        "wall_s": round(wall, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "summary": summary[-1] if summary else "",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "benchmark" / "configs" / "smoke.yaml")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fb-bench-grid-"))
    try:
        from mlflow.tracking import MlflowClient

        schema_db = tmp / "schema.db"
        MlflowClient(tracking_uri=f"sqlite:///{schema_db}").search_experiments()
        results = []
        for r in range(args.repeat):
            for w in args.workers:
                res = run_once(args.config, w, schema_db, tmp / f"r{r}-w{w}", args.sets)
                results.append(res)
                print(
                    f"workers {w}: {res['wall_s']:.1f} s (load {res['load_before']:.1f} -> "
                    f"{res['load_after']:.1f}) {res['summary']}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    walls = {w: [x["wall_s"] for x in results if x["workers"] == w] for w in args.workers}
    w0 = args.workers[0]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs")
    for w, s in walls.items():
        best, med = min(s), statistics.median(s)
        print(
            f"  {w} worker(s): best {best:.1f} s (x{min(walls[w0]) / best:.2f} vs {w0}), "
            f"median {med:.1f} s (x{statistics.median(walls[w0]) / med:.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps({"config": str(args.config), "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
