"""How a cell will run (sub-models, stages, epochs, costs): the one plan the trainer, the grid's
compute estimate and the studies share, so they cannot disagree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from benchmark import data as datasets
from benchmark.costs.flops import SubCost, count_costs
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

    def stage_epochs(self, stage: int) -> int:
        """Number of epochs of stage `stage`."""
        own = self.stages[stage].epochs
        return self.epochs if own is None else own

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
