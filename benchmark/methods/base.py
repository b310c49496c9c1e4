"""The Method contract and the shared distillation loss.

A method turns the logits of the sub-models computed in one training step into a loss per
sub-model. Teachers are always logits of the *same* step, detached (no extra forward, no gradient
into the teacher from a student's KD term).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.dim import KD_WEIGHT, TEMPERATURE, Dim
from benchmark.errors import ConfigError, IncompatibleError, got
from benchmark.models import FlexibleModel, use_instead


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


def max_softmax(logits: list[Tensor]) -> Tensor:
    """Softmax (N, C) of the last of the exits' logits given: MSDNet's max-probability exit rule
    (`Method.exit_probabilities`' default; kalviny/MSDNet-PyTorch `adaptive_inference.py`)."""
    return logits[-1].float().softmax(1)


def _log_ratio_terms(
    log_q: Tensor, log_p: Tensor, alpha: float, clip: float
) -> tuple[Tensor, Tensor]:
    """Per sample: the alpha-divergence D_alpha(p || q) (value, (N,)) and the surrogate whose
    gradient w.r.t. the student's logits is the clipped gradient of AlphaNet (Wang et al., ICML
    2021, Eq. 6 and its released `f_divergence`). With t = p / q (importance ratio):
    D_alpha = 1/(alpha (alpha-1)) sum_c q_c (t_c^alpha - 1); alpha -> 0 gives KL(q || p),
    alpha -> 1 gives KL(p || q). Its gradient is -sum_c q_c rho_c d(log q_c) with
    rho = t^alpha / alpha + 1/(alpha (alpha-1)) (rho = log t - 1 at 0, rho = t at 1), and
    t^alpha (t at alpha = 0) clipped to at most `clip` in value and gradient alike.

    Computed in log space: t itself overflows float32 where log p - log q > 88, so the clip is
    applied to log t, and at alpha = 1 the product q t is p (value sum p log t, the KL)."""
    log_t = log_p - log_q.detach()
    q = log_q.detach().exp()
    if abs(alpha) < 1e-3:
        log_tc = log_t.clamp(max=math.log(clip))
        q_f, q_rho = -q * log_tc, q * (log_tc - 1.0)
    elif abs(alpha - 1.0) < 1e-3:
        p = (log_q.detach() + log_t).exp()
        q_f, q_rho = p * log_t, p
    else:
        base = 1.0 / (alpha * (alpha - 1.0))
        t_a = (alpha * log_t).clamp(max=math.log(clip)).exp()
        q_f, q_rho = q * (t_a - 1.0) * base, q * (t_a / alpha + base)
    return q_f.sum(1), -(q_rho * log_q).sum(1)


def alpha_kd_loss(
    student: Tensor, teacher: Tensor, T: float, alpha_minus: float, alpha_plus: float, clip: float
) -> Tensor:
    """AlphaNet's adaptive alpha-divergence distillation (Wang et al., ICML 2021, §3), scalar:
    T^2 x mean over the batch of max(D_{alpha-}(p || q), D_{alpha+}(p || q)) per sample, with
    p = softmax(teacher / T) (detached) and q = softmax(student (N, C) / T). The value is the
    divergence; its gradient is the clipped one of `_log_ratio_terms` (the paper's code returns
    only the surrogate, whose value is not the divergence). The paper uses T = 1."""
    log_q = F.log_softmax(student / T, dim=1)
    log_p = F.log_softmax(teacher.detach() / T, dim=1)
    v_lo, g_lo = _log_ratio_terms(log_q, log_p, alpha_minus, clip)
    v_hi, g_hi = _log_ratio_terms(log_q, log_p, alpha_plus, clip)
    left = v_lo > v_hi
    value, grad = torch.where(left, v_lo, v_hi), torch.where(left, g_lo, g_hi)
    return (value + grad - grad.detach()).mean() * T * T


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: default, validity check (with its error text) and the range a study
    searches (`search`, see `studies/space.py`). `searched=False` for a method's schedule
    settings, which a study keeps at their value (e.g. hsd's re-ranking period); every searched
    parameter declares its range, inside the valid values (checked when the method is defined).
    `choices`: a named option (a string among these) instead of a number; never searched.
    `active_if=(param, value)`: the parameter only matters when `param` has that value; setting
    it otherwise is an error, and studies do not search it.
    """

    default: float | str
    check: Any
    rule: str
    search: Dim | None = None
    searched: bool = True
    choices: tuple[str, ...] = ()
    active_if: tuple[str, str] | None = None

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


def choice(default: str, name: str, choices: tuple[str, ...]) -> ParamSpec:
    """A named option (e.g. the divergence of the distillation term); not searched."""
    return ParamSpec(
        default, lambda v: v in choices, f"{name} must be one of {', '.join(choices)}",
        searched=False, choices=choices,
    )  # fmt: skip


def integer(default: int, name: str, low: int = 1, search: Dim | None = None) -> ParamSpec:
    """A whole-number setting (e.g. a schedule period); stored as a float like every param.
    Without `search` it is not searched (studies keep it at its value); with it, studies draw
    whole numbers."""
    if search is not None:
        search = Dim(search.low, search.high, search.log, integer=True)
    return ParamSpec(
        default,
        lambda v: v >= low and float(v).is_integer(),
        f"{name} must be an integer >= {low}",
        search,
        searched=search is not None,
    )


_ALPHA = ("divergence", "alpha")

# The distillation term's divergence, shared by the KD methods that declare these parameters
# (`**DIVERGENCE` in their PARAMS; `Method.distill` uses them). kl: `kd_loss`; alpha: AlphaNet's
# `alpha_kd_loss` with the defaults of the paper's code (alpha- = -1, alpha+ = 1, clip 5).
DIVERGENCE: dict[str, ParamSpec] = {
    "divergence": choice("kl", "divergence", ("kl", "alpha")),
    "alpha_minus": ParamSpec(
        -1.0, lambda v: True, "alpha_minus must be a number < alpha_plus", Dim(-2.0, 0.0),
        active_if=_ALPHA,
    ),
    "alpha_plus": ParamSpec(
        1.0, lambda v: True, "alpha_plus must be a number > alpha_minus", Dim(0.25, 2.0),
        active_if=_ALPHA,
    ),
    "alpha_clip": ParamSpec(
        5.0, lambda v: v > 0, "alpha_clip must be > 0", searched=False, active_if=_ALPHA
    ),
}  # fmt: skip


# The input-resolution option of the methods that draw widths (`**RESOLUTION` in their PARAMS;
# `Method.draw_resolutions`): full, every drawn width at the data's image size (US-Nets); random,
# every drawn width but the largest at a resolution drawn uniformly from the network's
# `arch.resolutions` (MutualNet, Yang et al., ECCV 2020; taoyang1122/MutualNet `train.py`).
RESOLUTION: dict[str, ParamSpec] = {
    "resolution": choice("full", "resolution", ("full", "random")),
}


@dataclass(frozen=True)
class StepBatch:
    """This step's batch, for methods whose draw reads it (`draw_submodels(g, model, batch)`):
    x (N, 3, H, W) normalised, y (N,), the step's autocast, and `losses(widths, criterion)`:
    criterion(z_w, y) () of each width w on x, no gradient, the model in train mode (batch
    statistics, as a trained forward sees them) and its buffers left as they were (BN running
    statistics), averaged over the ranks of a distributed cell so every rank draws alike;
    a tensor (len(widths),) on x's device. Built by `benchmark.training.step.Step`."""

    x: Tensor
    y: Tensor
    autocast: Callable[[], AbstractContextManager]
    losses: Callable[[list[float], Callable[[Tensor, Tensor], Tensor]], Tensor]


# The key of a method's own teacher's logits in `Method.loss`'s `teachers` (`teacher_logits`)
OWN_TEACHER = -1


@dataclass(frozen=True)
class Stage:
    """Sub-models trained in one stage and frozen teachers they distill from (offline KD).

    `epochs`: the stage's length (None: the cell's `train.epochs`). `fit`: a fitting stage,
    which trains no sub-model: each of its epochs hands the frozen network's exit logits on the
    validation split to `Method.fit` (ZTW's ensemble; the test split is never read).
    `share`: instead of `epochs`, the stage's share of `train.epochs`, split among the stages
    with a share in proportion (`benchmark.training.plan.split_epochs`; ofa_ps's phases).
    `lr_scale`: the stage's learning rate is `train.lr` times this (its schedule runs over the
    stage's own epochs). `name`: what the stage is (ofa_ps's phases), for the method and logs."""

    train: tuple[int, ...]
    frozen_teachers: tuple[int, ...] = ()
    epochs: int | None = None
    fit: bool = False
    share: float | None = None
    lr_scale: float = 1.0
    name: str = ""


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
    # True for methods that draw each step's widths (`draw_submodels`, e.g. the sandwich rule)
    draws_submodels: ClassVar[bool] = False
    # True for methods whose loss(k) reads the detached logits of the earlier exits of the
    # same step (`teachers[j]`, j < k; boosted): their `check_model` requires `single_pass`,
    # where the step hands every exit of its one forward to every loss
    reads_earlier_exits: ClassVar[bool] = False
    # True for methods that run the whole training step themselves (`train_step`; l2w's
    # look-ahead on a held-out half batch); the step then needs the step's learning rate
    owns_step: ClassVar[bool] = False
    # True for drawing methods whose draws are sub-networks of an elastic model
    # (`caps.elastic`, run by `forward_subnet`) rather than widths (ofa_ps)
    draws_subnets: ClassVar[bool] = False
    # True for methods that distill from a teacher network of their own (`teacher_logits`:
    # ofa_ps's frozen copy of the full network); the step puts its logits at OWN_TEACHER
    own_teacher: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.params = self.resolve(params or {})
        self.label_smoothing = label_smoothing

    @classmethod
    def resolve(cls, params: dict[str, Any]) -> dict[str, float | str]:
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            valid = ", ".join(cls.PARAMS) or "none"
            raise ConfigError(
                f"unknown parameter(s) {', '.join(unknown)} for method {cls.name}; valid: {valid}"
            )
        out: dict[str, float | str] = {}
        for key, spec in cls.PARAMS.items():
            value = params.get(key, spec.default)
            if spec.choices:
                if not isinstance(value, str) or not spec.check(value):
                    raise ConfigError(f"method {cls.name}: {spec.rule}, got {value!r}")
                out[key] = value
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"method {cls.name}: {key} must be a number, {got(value)}")
            if not spec.check(value):
                raise ConfigError(f"method {cls.name}: {spec.rule}, {got(value)}")
            out[key] = float(value)
        return cls._check_combination(params, out)

    @classmethod
    def _check_combination(
        cls, given: dict[str, Any], out: dict[str, float | str]
    ) -> dict[str, float | str]:
        """Refuses a parameter set away from its default where it has no effect (`active_if`)
        and alpha- >= alpha+; returns `out` without the inactive parameters (a config holds
        only what has an effect)."""
        inactive = set()
        for key, spec in cls.PARAMS.items():
            if spec.active_if and out[spec.active_if[0]] != spec.active_if[1]:
                inactive.add(key)
                if key in given and given[key] != spec.default:
                    on, value = spec.active_if
                    raise ConfigError(
                        f"method {cls.name}: {key} has an effect only with {on}={value}, "
                        f"got {on}={out[on]!r}; add --set method.{on}={value} or drop {key}"
                    )
        out = {k: v for k, v in out.items() if k not in inactive}
        if "alpha_minus" in out and not out["alpha_minus"] < out["alpha_plus"]:
            raise ConfigError(
                f"method {cls.name}: alpha_minus must be < alpha_plus, got alpha_minus="
                f"{out['alpha_minus']:g}, alpha_plus={out['alpha_plus']:g}"
            )
        return out

    def distill(self, student: Tensor, teacher: Tensor, T: float) -> Tensor:
        """The distillation term of this method's `divergence` (kl: `kd_loss`; alpha:
        `alpha_kd_loss`); methods without DIVERGENCE parameters always use kl."""
        p = self.params
        if p.get("divergence", "kl") == "kl":
            return kd_loss(student, teacher, T)
        return alpha_kd_loss(
            student, teacher, T, p["alpha_minus"], p["alpha_plus"], p["alpha_clip"]
        )

    def teacher_logits(self, x: Tensor) -> Tensor | None:
        """Logits (N, C) of the method's own teacher on the batch x (N, 3, H, W), without
        gradient, or None where it has none (yet); methods with `own_teacher`. The step hands
        them to `loss` as `teachers[OWN_TEACHER]`."""
        return None

    def draw_submodels(
        self, g: torch.Generator, model: nn.Module, batch: StepBatch | None = None
    ) -> list[float]:
        """Widths to train this step, smallest first (the largest last, the teacher), drawn
        from `g` (seeded by seed, epoch and step: `benchmark.training.step.step_generator`), by
        methods that set `draws_submodels` (the others train the stage's fixed sub-models). The
        step trains them with `model.forward_width` (the model declares `caps.widths`) and
        `loss` sees the drawn widths as sub-models 0..n-1. `batch`: this step's batch, which
        the step always passes (attentive scores candidate widths on it, ieb runs its EMA
        teacher on it); draws that do not read it may be called without. With `draws_subnets`:
        `SubNet`s of `caps.elastic`, run by `model.forward_subnet`, in the order drawn."""
        raise NotImplementedError(f"method {self.name} draws no sub-models")

    def draw_resolutions(
        self, g: torch.Generator, model: FlexibleModel, n: int
    ) -> list[int | None]:
        """The input resolution of each of the n widths `draw_submodels` drew (same order, the
        largest last), drawn from `g` after the widths: None runs a width on the batch as it is
        (the data's image size); an int r on the batch resized to r x r px (`resize`). Default:
        None for every width."""
        return [None] * n

    name: ClassVar[str] = ""

    def stages(self, num_submodels: int) -> list[Stage]:
        return [Stage(tuple(range(num_submodels)))]

    def ce(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        """Raise ConfigError when this method cannot train `model` (checked before any work)."""

    @classmethod
    def check_params(cls, model: nn.Module, arch: str, params: dict[str, Any]) -> None:
        """Like `check_model`, for what only some parameter values cannot train (sdn's
        IC-only training needs an SDN); `params` are the resolved method parameters."""

    @classmethod
    def require(cls, model: FlexibleModel, arch: str, capability: str, need: str) -> None:
        """Raise IncompatibleError unless `model` declares `capability` (a `Capabilities`
        field), naming what the method needs and the architectures that have it."""
        if not model.caps.has(capability):
            raise IncompatibleError(
                f"method {cls.name} needs {need}; architecture {arch} has none with these "
                f"settings; {use_instead(capability, arch)}"
            )

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

    def exit_probabilities(self, logits: list[Tensor]) -> Tensor:
        """The class probabilities (N, C) on which early exiting decides at exit k, from the
        outputs (N, C) of exits 0..k (`logits`, in order, k = len(logits) - 1; the method's
        `exit_outputs` of the exits' logits, which evaluation reads): a sample leaves
        at exit k when their maximum passes exit k's threshold and is then predicted as their
        argmax (`benchmark.training.early_exit`). Default: softmax of exit k alone, MSDNet's
        max-probability rule (Huang et al., ICLR 2018, §5.2; kalviny/MSDNet-PyTorch
        `adaptive_inference.py`). A method with another rule overrides this; it may read only
        the exits it is given, so that the rule can be applied while the network runs."""
        return max_softmax(logits)

    def train_step(
        self, model: nn.Module, x: Tensor, y: Tensor, lr: float
    ) -> tuple[Tensor, dict[int, dict[str, Tensor]], dict[int, Tensor]]:
        """The whole training step of a method with `owns_step`, on a batch x (N, 3, H, W),
        y (N,) at learning rate `lr`: leaves the model's gradients in `.grad` (the trainer
        steps the optimizer) and returns the detached total loss, the named loss terms per
        sub-model index and the logits (N', C) of every trained sub-model, detached."""
        raise NotImplementedError(f"method {self.name} does not run its own step")

    def exit_outputs(self, logits: list[Tensor]) -> list[Tensor]:
        """The predictions evaluated for every exit (validation, test, early exiting), from the
        logits [(N, C), ...] of all exits of one pass, smallest first. Default: the logits
        themselves; methods whose exits predict with a combination of exits (boosted's sums,
        ZTW's fitted ensembles) override it, and need an early-exit model (one pass, no BN
        recalibration)."""
        return logits

    def fit(self, logits: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
        """One epoch of a fitting stage (`Stage.fit`): fit the method's own state on the exit
        logits (K, N, C) of the validation split and its labels (N,), the network frozen;
        `seed` is the cell's. Returns metrics; `loss` is logged as the epoch's train/loss."""
        raise NotImplementedError(f"method {self.name} has no fitting stage")

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called after every optimizer step of training, once the model's weights are the
        updated ones (ieb's EMA teacher follows them here); default: nothing."""

    def epoch_start(self, ctx: EpochContext) -> None:
        """Called before every training epoch, also the first one after a resume; methods whose
        loss follows the position in training (sdn's IC weights) or whose stage freezes part of
        the model (sdn's IC-only stage) set it here, from `ctx` alone, so a resume needs no
        state of theirs."""

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
