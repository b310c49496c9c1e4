"""The Method contract and the shared distillation loss.

A method turns the logits of the sub-models computed in one training step into a loss per
sub-model. Teachers are always logits of the *same* step, detached (no extra forward, no gradient
into the teacher from a student's KD term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError


def kd_loss(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    `batchmean` is the mathematically correct KL; `nn.KLDivLoss()`'s default 'mean' (used by
    the TAKD and IMTA code) also divides by the number of classes.
    """
    return (
        F.kl_div(
            F.log_softmax(student / T, dim=1),
            F.log_softmax(teacher.detach() / T, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * T
        * T
    )


@dataclass(frozen=True)
class ParamSpec:
    """One tunable method parameter: default and validity check (with its error text)."""

    default: float
    check: Any
    rule: str


def temperature(default: float = 1.0) -> ParamSpec:
    return ParamSpec(default, lambda v: v > 0, "T must be > 0")


def weight(default: float = 1.0) -> ParamSpec:
    return ParamSpec(default, lambda v: 0 <= v <= 1, "a must be in [0, 1]")


@dataclass(frozen=True)
class Stage:
    """Sub-models trained in one stage and frozen teachers they distill from (offline KD)."""

    train: tuple[int, ...]
    frozen_teachers: tuple[int, ...] = ()


class Method(nn.Module):
    """Base class. Subclasses set PARAMS and implement `loss`.

    `separate_networks`: train K independent networks (no weight sharing) instead of the shared
    flexible model. `stages(K)`: the training schedule; online methods have one stage training
    every sub-model at once, offline methods (TAKD) one stage per sub-model.
    """

    PARAMS: ClassVar[dict[str, ParamSpec]] = {}
    separate_networks: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, params: dict[str, Any] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.params = self.resolve(params or {})
        self.label_smoothing = label_smoothing

    @classmethod
    def resolve(cls, params: dict[str, Any]) -> dict[str, float]:
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            valid = ", ".join(cls.PARAMS) or "none"
            raise ConfigError(
                f"unknown parameter(s) {', '.join(unknown)} for method {cls.name}; valid: {valid}"
            )
        out: dict[str, float] = {}
        for key, spec in cls.PARAMS.items():
            value = params.get(key, spec.default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"method {cls.name}: {key} must be a number, got {value!r}")
            if not spec.check(value):
                raise ConfigError(f"method {cls.name}: {spec.rule}, got {value}")
            out[key] = float(value)
        return out

    name: ClassVar[str] = ""

    def stages(self, num_submodels: int) -> list[Stage]:
        return [Stage(tuple(range(num_submodels)))]

    def ce(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def loss(
        self, k: int, logits: Tensor, teachers: dict[int, Tensor], y: Tensor, num_submodels: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of sub-model k and its named terms (for diagnostics).

        `teachers` holds detached logits of the larger sub-models of this step (k+1..K-1) and,
        in offline stages, of frozen teachers.
        """
        raise NotImplementedError
