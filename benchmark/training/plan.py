"""How a cell will run (sub-models, stages, epochs, costs): the one plan the trainer, the grid's
compute estimate and the studies share, so they cannot disagree."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from benchmark import data as datasets
from benchmark.costs.flops import SubCost, count_costs
from benchmark.errors import ConfigError
from benchmark.methods import METHODS, Method, Stage
from benchmark.models import FlexibleModel
from benchmark.training.build import make_method, make_model


@dataclass(frozen=True)
class Position:
    """One epoch of the flat schedule: `index` counts epochs over all stages (the MLflow step)."""

    index: int
    stage: int
    epoch: int
    last_of_stage: bool
    last: bool


@dataclass
class CellPlan:
    """How a cell runs: sub-model names (smallest first), the method's stages, epochs per stage
    (`epochs`, unless a stage sets its own `Stage.epochs`) and the cost of every sub-model
    (MACs, FLOPs, params, bit-ops; counted once per arch)."""

    names: list[str]
    stages: list[Stage]
    epochs: int
    costs: list[SubCost]
    single_pass: bool
    image_size: int

    @property
    def num_submodels(self) -> int:
        return len(self.names)

    def __post_init__(self) -> None:
        shares = [s.share for s in self.stages if s.share is not None]
        split = iter(split_epochs(shares, self.epochs) if shares else [])
        self._shared = [next(split) if s.share is not None else None for s in self.stages]

    def stage_epochs(self, stage: int) -> int:
        """Number of epochs of stage `stage`: its own `epochs`, its part of `train.epochs`
        (a `share`), else `train.epochs`."""
        s = self.stages[stage]
        if s.share is not None:
            return self._shared[stage]
        return self.epochs if s.epochs is None else s.epochs

    def stage_train(self, stage: int, t: dict[str, Any]) -> dict[str, Any]:
        """The train settings stage `stage`'s learning-rate schedule runs with
        (`benchmark.training.build.lr_at`): its epochs, lr x its `lr_scale`."""
        scale = self.stages[stage].lr_scale
        return {**t, "epochs": self.stage_epochs(stage), "lr": t["lr"] * scale}

    @property
    def total_epochs(self) -> int:
        return sum(self.stage_epochs(s) for s in range(len(self.stages)))

    def index_of(self, stage: int, epoch: int) -> int:
        """The flat index (global epoch) of (stage, epoch)."""
        return sum(self.stage_epochs(s) for s in range(stage)) + epoch

    def stage_epoch(self, index: int) -> tuple[int, int]:
        """(stage, epoch) of the flat index `index` (the inverse of `index_of`); the index
        after the last epoch is (number of stages, 0)."""
        for stage in range(len(self.stages)):
            n = self.stage_epochs(stage)
            if index < n:
                return stage, index
            index -= n
        return len(self.stages), index

    def positions(self, start: int = 0) -> list[Position]:
        """The epochs still to run, from global epoch `start` (a resumed checkpoint's)."""
        out, last = [], self.total_epochs - 1
        for g in range(start, self.total_epochs):
            stage, epoch = self.stage_epoch(g)
            n = self.stage_epochs(stage)
            out.append(Position(g, stage, epoch, epoch == n - 1, g == last))
        return out


def split_epochs(shares: list[float], total: int) -> list[int]:
    """`total` epochs split in proportion to `shares` (stages, in order), each stage at least
    one: every stage gets max(1, floor(total x share / sum)), then the epochs still missing go
    one each to the stages with the largest remainders (ties: the earlier stage), or, where the
    minimum of one took too many, come off the longest stages. ConfigError when `total` is
    fewer than the stages."""
    if total < len(shares):
        raise ConfigError(
            f"train.epochs must be at least {len(shares)}, one per stage of the method's "
            f"{len(shares)} stages (they split train.epochs in the proportion "
            f"{':'.join(f'{v:g}' for v in shares)}), got {total}"
        )
    exact = [total * v / sum(shares) for v in shares]
    out = [max(1, math.floor(e)) for e in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in by_remainder[: max(0, total - sum(out))]:
        out[i] += 1
    while sum(out) > total:
        out[max(range(len(out)), key=lambda i: (out[i], -i))] -= 1
    return out


def _costs(cfg: dict[str, Any], model: FlexibleModel, described: tuple[int, int]) -> list[SubCost]:
    """Per-sub-model costs, counted once per (architecture config, classes, image size)."""
    arch_key = json.dumps([cfg["arch"], *described], sort_keys=True)
    return count_costs(model, described[1], cache_key=arch_key)


def plan_of(
    cfg: dict[str, Any], model: FlexibleModel, method: Method, described: tuple[int, int]
) -> CellPlan:
    """The plan of a cell whose model and method are built (the trainer's); `described` is
    the data's (classes, image size)."""
    names = [s.name for s in model.submodels]
    stages = method.stages(len(names))
    costs = _costs(cfg, model, described)
    return CellPlan(
        names, stages, cfg["train"]["epochs"], costs, model.caps.single_pass, described[1]
    )


# (arch config, data, separate networks) -> the plan's model facts: a grid plans many cells
# of one model and builds it once
_MODEL_FACTS: dict[str, tuple[list[str], list[SubCost], bool]] = {}


def plan_cell(cfg: dict[str, Any]) -> CellPlan:
    """The plan of a resolved cell before anything is built (the grid's estimate, the
    studies): describes the data and builds the model on CPU once per architecture config and
    process; only the method (cheap) is made per call, for its stages."""
    described = datasets.describe(*datasets.cell_source(cfg))
    separate = METHODS.get(cfg["method"]["name"]).separate_networks
    key = json.dumps([cfg["arch"], *described, separate], sort_keys=True)
    if key not in _MODEL_FACTS:
        model = make_model(cfg, *described)
        facts = ([s.name for s in model.submodels], _costs(cfg, model, described))
        _MODEL_FACTS[key] = (*facts, model.caps.single_pass)
    names, costs, single_pass = _MODEL_FACTS[key]
    stages = make_method(cfg, len(names)).stages(len(names))
    return CellPlan(names, stages, cfg["train"]["epochs"], costs, single_pass, described[1])
