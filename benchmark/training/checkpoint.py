"""A cell's checkpoint: where it lives, what it holds, and atomic writes.

A kill at any instant leaves either the old or the new file, never half of one. The checkpoint
holds the position of the next epoch to run, so a resumed cell continues exactly there (same
weights, optimizer, method state and RNG), plus the metrics of the epoch it closes, which the
trainer logs to MLflow only after the file is on disk (so a kill never duplicates a point).
It also names what it continues: the cell key, the MLflow run and the settings it ran with, so
a resume can check that it continues this cell (`benchmark.training.train.prepare`).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.errors import ConfigError
from benchmark.files import check_name, write_atomic


class CannotResume(ConfigError):
    """A checkpoint that cannot continue this cell: unreadable, another cell's, written by
    another code version, or trained on other data. `train --resume` stops with one line naming
    `--restart` and keeps the file; a grid starts the cell from scratch instead, as it does for
    a checkpoint whose run is gone (a grid has no one to ask)."""

    def __init__(self, path: Path | str, why: str, other_fix: str = "") -> None:
        self.path, self.why, self.other_fix = path, why, other_fix
        super().__init__(
            f"cannot resume {path}: {why}; {other_fix}pass --restart to train the cell from "
            f"scratch (the checkpoint is kept until then)"
        )


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
    """The checkpoint at `path`, or CannotResume naming what is wrong with the file (truncated
    by a kill during a copy, empty, not a checkpoint): torch.load's own errors are many and
    long, and none of them names the way out."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (whatever torch.load raises, the file is unusable)
        raise CannotResume(path, _unreadable(path, exc)) from exc
    if not isinstance(state, dict) or not {"stage", "epoch"} <= state.keys():
        raise CannotResume(path, "the file is not a flexbench checkpoint")
    return state


def _unreadable(path: Path, exc: Exception) -> str:
    if not path.is_file():
        return f"it is not a file ({type(exc).__name__})"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    lines = str(exc).split(". ")[0].splitlines()
    error = type(exc).__name__ + (f": {lines[0][:120]}" if lines and lines[0] else "")
    return f"the file is truncated or damaged ({size} bytes; {error})"


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
    path: Path | str = "the checkpoint",
) -> tuple[int, int]:
    """Load `modules` and the RNG states from `state`; returns the next (stage, epoch). A
    checkpoint written on CUDA resumes on CPU (and vice versa): the CPU RNG always restores,
    the CUDA RNG only where both sides are CUDA. A state that does not fit `modules` (another
    code version's network, method or optimizer) raises CannotResume for `path`."""
    for name, m in modules.items():
        try:
            m.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError) as exc:
            detail = textwrap.shorten(str(exc), 240, placeholder=" ...")
            raise CannotResume(
                path, f"its {name} state does not fit this cell's (another code version?): {detail}"
            ) from exc
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state["stage"], state["epoch"]
