"""The Method contract and the shared distillation loss.

A method turns the logits of the sub-models computed in one training step into a loss per
sub-model. Teachers are always logits of the *same* step, detached (no extra forward, no gradient
into the teacher from a student's KD term).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.dim import KD_WEIGHT, TEMPERATURE, Dim
from benchmark.errors import ConfigError, got


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
    """One method parameter: default, validity check (with its error text) and the range a study
    searches (`search`, see `studies/space.py`). `searched=False` for a method's schedule
    settings, which a study keeps at their value (e.g. hsd's re-ranking period); every searched
    parameter declares its range, inside the valid values (checked when the method is defined).
    """

    default: float
    check: Any
    rule: str
    search: Dim | None = None
    searched: bool = True

    def __post_init__(self) -> None:
        if self.searched and self.search is None:
            raise ValueError(
                f"parameter with rule {self.rule!r}: declare its search range "
                f"(search=Dim(low, high[, log])) or mark it searched=False"
            )
        if self.search is not None and not (
            self.check(self.search.low) and self.check(self.search.high)
        ):
            raise ValueError(
                f"search range {self.search.describe()} leaves the valid values: {self.rule}"
            )


def temperature(default: float = 1.0, search: Dim = TEMPERATURE) -> ParamSpec:
    """A distillation temperature T > 0 (searched log-uniformly in [1, 10] by default)."""
    return ParamSpec(default, lambda v: v > 0, "T must be > 0", search)


def weight(default: float = 1.0, name: str = "a", search: Dim = KD_WEIGHT) -> ParamSpec:
    """A mixing weight in [0, 1] (e.g. a in (1-a) CE + a KD), searched over all of [0, 1]."""
    return ParamSpec(default, lambda v: 0 <= v <= 1, f"{name} must be in [0, 1]", search)


def scale(default: float, name: str, search: Dim) -> ParamSpec:
    """A non-negative loss coefficient without an upper bound (e.g. attention-transfer weight);
    its search range depends on the loss it scales, so each method gives it."""
    return ParamSpec(default, lambda v: v >= 0, f"{name} must be >= 0", search)


def integer(default: int, name: str, low: int = 1, search: Dim | None = None) -> ParamSpec:
    """A whole-number setting (e.g. a schedule period); stored as a float like every param.
    Without `search` it is not searched (studies keep it at its value)."""
    return ParamSpec(
        default,
        lambda v: v >= low and float(v).is_integer(),
        f"{name} must be an integer >= {low}",
        search,
        searched=search is not None,
    )


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
    `uses_features`: the trainer passes every sub-model's stage features to `loss` (`feats`).
    A method's own parameters (e.g. learned importance weights) are trained by the same
    optimizer, at `param_lr_scale` times the learning rate and without weight decay.
    `plot_slot`: its colour, marker and place in report legends and tables (`reports.style`);
    unique among registered methods, so that adding a method changes no other's colour.
    """

    PARAMS: ClassVar[dict[str, ParamSpec]] = {}
    # Architecture settings this method turns on where it trains that architecture (user
    # --set arch.* still wins), e.g. imta: {"msdnet": {"ge": True, "isc": True}}.
    ARCH_SETTINGS: ClassVar[dict[str, dict[str, Any]]] = {}
    separate_networks: ClassVar[bool] = False
    uses_features: ClassVar[bool] = False
    param_lr_scale: ClassVar[float] = 1.0
    description: ClassVar[str] = ""
    plot_slot: ClassVar[int | None] = None

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
                raise ConfigError(f"method {cls.name}: {key} must be a number, {got(value)}")
            if not spec.check(value):
                raise ConfigError(f"method {cls.name}: {spec.rule}, {got(value)}")
            out[key] = float(value)
        return out

    name: ClassVar[str] = ""

    def stages(self, num_submodels: int) -> list[Stage]:
        return [Stage(tuple(range(num_submodels)))]

    def ce(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        """Raise ConfigError when this method cannot train `model` (checked before any work)."""

    def bind(self, num_submodels: int) -> None:
        """Called by the trainer once the number of sub-models K is known, before the optimizer
        and the checkpoint see the method: methods whose own parameters depend on K create them
        here."""

    def loss(
        self,
        k: int,
        logits: Tensor,
        teachers: dict[int, Tensor],
        y: Tensor,
        num_submodels: int,
        feats: dict[int, list[Tensor]] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of sub-model k and its named terms (for diagnostics).

        `teachers` holds detached logits of the larger sub-models of this step (k+1..K-1) and,
        in offline stages, of frozen teachers. With `uses_features`, `feats[k]` are sub-model
        k's stage features (with gradient) and `feats[j]` of its teachers are detached.
        """
        raise NotImplementedError

    def epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Called after every training epoch, before validation and the checkpoint; methods that
        change the model between epochs (hsd re-ranks channels) do it here. Returns metrics."""
        return {}


@dataclass
class EpochContext:
    """What `Method.epoch_end` may use: the model, the position in training and a way to draw
    training batches (normalised, augmented as in training) for extra passes such as saliency."""

    model: nn.Module
    stage: Stage
    epoch: int
    epochs: int
    batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]]
    autocast: Callable[[], AbstractContextManager]
