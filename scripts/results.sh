#!/usr/bin/env bash
# Reproduce docs/results/ (`make results`): the default grid (benchmark/configs/results.yaml),
# Optuna studies of ipkd and ipkd_ta on msdnet (validation split), the tuned grid
# (results_tuned.yaml) and the report. Every step resumes: rerun the same command after any
# stop; finished cells are skipped, a study stops at its trial count (--until).
# The data: ../shared/data/cifar10-jpeg.zip beside the repository, the path the grid files name
# (relative to themselves) and the studies use; with the file elsewhere, link it there.
# Environment: WORKERS (grid cells at a time, default 2), TRIALS (per study, default 8: what
# docs/results ran; a mini msdnet trial takes ~6 min on 1 core of a 2-core machine),
# MLFLOW_TRACKING_URI (default sqlite:///<repo>/results.db), FLEXBENCH_STUDY_STORAGE.
set -euo pipefail
cd "$(dirname "$0")/.."
FB=.venv/bin/flexbench
URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/results.db}
STORAGE=${FLEXBENCH_STUDY_STORAGE:-sqlite:///$PWD/results-studies.db}
DATA=../shared/data/cifar10-jpeg.zip
WORKERS=${WORKERS:-2}
TRIALS=${TRIALS:-8}
THREADS=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))
BEST=docs/results/best_params.yaml
[ -f "$DATA" ] || { echo "results.sh: $DATA not found (link the CIFAR-10 JPEG zip there)" >&2; exit 2; }

$FB grid run benchmark/configs/results.yaml --workers "$WORKERS" --tracking-uri "$URI"
# The two studies side by side, one worker each, sampler seed 0 (docs/results: trials 0-4; see
# its README), each with half the CPU threads.
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT  # one study failed: stop the other too
for method in ipkd ipkd_ta; do
  $FB study run --arch msdnet --dataset "imagefolder:$DATA" --method "$method" --profile mini \
    --study-name "results-msdnet-$method" --until "$TRIALS" --workers 1 --sampler-seed 0 \
    --set "runtime.threads=$THREADS" --storage "$STORAGE" --tracking-uri "$URI" \
    --experiment results-studies &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
trap - EXIT
for method in ipkd ipkd_ta; do
  $FB study best --study-name "results-msdnet-$method" --storage "$STORAGE" --export "$BEST"
done
$FB grid run benchmark/configs/results_tuned.yaml --workers "$WORKERS" --tracking-uri "$URI"
$FB report --experiment results --tracking-uri "$URI" --out docs/results/report \
  --formats md,csv --baseline joint --no-log --optuna-storage "$STORAGE" \
  --study results-msdnet-ipkd --study results-msdnet-ipkd_ta
