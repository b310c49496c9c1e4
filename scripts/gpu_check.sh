#!/usr/bin/env bash
# One prepared check for a GPU machine (< 8 minutes): the `cuda` tests, per-family paper-size
# throughput (bf16 + channels_last, compile off/on, plain loop on the same GPU), peak memory,
# concurrent cells per GPU (1/2/4/8 workers), nvjpeg vs CPU-worker JPEG decoding at 224 px, the
# ResNet-50 ImageNet step (bf16 + channels_last) beside torchvision's, a 2-process DDP step (gloo
# on one shared GPU) and a short real-data MSDNet run that must learn.
# Writes OUT/gpu_check.json and OUT/gpu_check.txt (see scripts/gpu_check.py).
#   scripts/gpu_check.sh --out gpu_check --data /path/to/cifar10-jpeg.zip
#   scripts/gpu_check.sh --dry-run --out /tmp/gpu_check     # toy sizes, any machine (tested)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
case " $* " in
  *" --dry-run "*) exec "$PY" scripts/gpu_check.py "$@" ;;
  *) exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" scripts/gpu_check.py "$@" ;;
esac
