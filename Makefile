# Quick start: `make demo` (small benchmark run), `make test` (the test suite).
# Both bootstrap .venv on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flexbench-installed

.PHONY: venv sysdeps demo test test-all lint bench bench-imagenet results clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The smoke grid (every arch x every method, synthetic data) with 2 workers; a second run skips
# every finished cell. Results: ./mlflow.db (or $MLFLOW_TRACKING_URI); see docs/grid.md.
demo: venv
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	$(VENV)/bin/flexbench grid run benchmark/configs/smoke.yaml --workers 2

# PostgreSQL and Chromium for the server/browser tests (installed only when missing, as root).
sysdeps:
	bash scripts/install_system_deps.sh

# One pytest worker per core (pytest-xdist); each test file stays on one worker, so a file's
# module fixtures (servers, stores) are started once.
test: venv sysdeps
	$(PY) -m pytest -q -n auto --dist loadfile

test-all: venv sysdeps
	$(PY) -m pytest -q -n auto --dist loadfile -m ''

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Paper-size MSDNet `joint` (flexbench vs plain loop vs the MSDNet reference loop) and slimmable
# MobileNet-V1 `ipkd_ta` (vs plain loop), alternating rounds in one process; see docs/performance.md.
bench: venv
	$(PY) scripts/bench_throughput.py --arch msdnet --method joint --profile paper
	$(PY) scripts/bench_throughput.py --arch slimmable_mobilenet_v1 --method ipkd_ta --profile paper

# ImageNet size: the streamed loader vs torchvision ImageFolder + PIL transforms (224 px crops of
# generated 500 x 375 JPEGs), and the ResNet-50 / MobileNet-V1 training steps vs the torchvision
# reference loop, alternating rounds in one process; sizes: --batch, --steps, --rounds (CPU-small
# defaults). See docs/performance.md.
bench-imagenet: venv  # flags: make bench-imagenet ARGS="--rounds 5 --batch 8"
	$(PY) scripts/bench_imagenet.py $(ARGS)

# docs/results/: the real-data grid (mini profile, real CIFAR-10, 3 seeds), the ipkd/ipkd_ta
# studies and the tuned grid, then the report; resumes after any stop (hours on 2 CPU cores).
results: venv
	bash scripts/results.sh

clean:
	rm -rf $(VENV) mlruns mlartifacts flexbench_runs
