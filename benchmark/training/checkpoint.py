"""A cell's checkpoint: where it lives, what it holds, and atomic writes.

A kill at any instant leaves either the old or the new file, never half of one. The checkpoint
holds the position of the next epoch to run, so a resumed cell continues exactly there (same
weights, optimizer, method state and RNG), plus the metrics of the epoch it closes, which the
trainer logs to MLflow only after the file is on disk (so a kill never duplicates a point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.files import check_name, write_atomic


def cell_dir(cfg: dict[str, Any], experiment: str, key: str) -> Path:
    """`runtime.workdir/<experiment>/<cell key>/`: the cell's checkpoint folder (ConfigError
    for an experiment name that cannot be a folder name there)."""
    workdir = Path(cfg["runtime"]["workdir"])
    check_name(experiment, "experiment name (--experiment)", workdir)
    return workdir / experiment / key


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` atomically (`benchmark.files.write_atomic`): the previous checkpoint stays
    whole until the new one is on disk; a full disk raises WriteError naming the device."""
    fix = "make room there, then rerun with --resume (the last checkpoint, if any, is kept)"
    write_atomic(path, lambda fh: torch.save(state, fh), fix)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def build(
    modules: dict[str, nn.Module | torch.optim.Optimizer],
    next_pos: tuple[int, int],
    device: torch.device,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """State of `modules` (model, method, optimizer), the next (stage, epoch) to run, the RNG
    states (CPU and, on CUDA, the device's) and `extra` (run id, cell key, pending metrics)."""
    state: dict[str, Any] = {name: m.state_dict() for name, m in modules.items()}
    state.update(
        stage=next_pos[0],
        epoch=next_pos[1],
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        **extra,
    )
    return state


def restore(
    state: dict[str, Any],
    modules: dict[str, nn.Module | torch.optim.Optimizer],
    device: torch.device,
) -> tuple[int, int]:
    """Load `modules` and the RNG states from `state`; returns the next (stage, epoch). A
    checkpoint written on CUDA resumes on CPU (and vice versa): the CPU RNG always restores,
    the CUDA RNG only where both sides are CUDA."""
    for name, m in modules.items():
        m.load_state_dict(state[name])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state["stage"], state["epoch"]
