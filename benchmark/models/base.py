"""The FlexibleModel contract every architecture implements.

A flexible model holds K sub-models ordered smallest first (the full model is last). Methods use
`forward_all`/`forward_sub`, so they never care whether the sub-models are exits of one pass
(MSDNet) or widths that each need their own pass (slimmable networks). What else a model can be
asked is declared once, in its `caps` (`Capabilities`): methods, the step, BN recalibration, the
spectrum and the config checks read it and never probe the model for attributes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got

# What sub-models can differ in (`Capabilities.axes`), in the field's terms.
AXES = (
    "exit", "width", "depth", "bits", "channels", "heads", "ffn", "resolution", "kernel", "expand",
)  # fmt: skip


@dataclass(frozen=True)
class SubModel:
    """A stable, human-readable handle of one sub-model (e.g. `exit3`, `w0.5`)."""

    index: int
    name: str


@dataclass(frozen=True)
class WidthRange:
    """A continuous width axis (universally slimmable, Yu & Huang, ICCV 2019): any width in
    [low, high] runs through `FlexibleModel.forward_width`, so methods may draw widths (the
    sandwich rule) and evaluation may sweep a spectrum. `listed`: the widths of the model's
    sub-models, smallest first; `spectrum_step`: the evaluation spectrum's step (0: none)."""

    low: float
    high: float
    listed: tuple[float, ...]
    spectrum_step: float = 0.0

    def __post_init__(self) -> None:
        """ConfigError (before any work: models are built on the meta device when a cell is
        resolved) unless the listed widths are numbers, strictly increasing, inside the range."""
        w = self.listed
        if not w or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in w):
            raise ConfigError(f"widths must be a non-empty list of numbers, got {list(w)!r}")
        if any(b <= a for a, b in zip(w, w[1:])):
            raise ConfigError(f"widths must be strictly increasing (smallest first), got {list(w)}")
        outside = [v for v in w if not self.contains(v)]
        if outside:
            raise ConfigError(
                f"widths {outside} are outside the network's range [{self.low}, {self.high}]; "
                f"valid widths are in [{self.low}, {self.high}]"
            )

    def contains(self, w: float) -> bool:
        return self.low - 1e-9 <= w <= self.high + 1e-9

    def spectrum(self) -> list[float]:
        """low, low + step, ... up to high (inclusive), rounded to 1e-6; [] without a step."""
        if not self.spectrum_step:
            return []
        n = int((self.high - self.low) / self.spectrum_step + 1e-6)
        out = [round(self.low + i * self.spectrum_step, 6) for i in range(n + 1)]
        return out if abs(out[-1] - self.high) < 1e-6 else [*out, self.high]

    def submodel_of(self, w: float) -> int | None:
        """Index of the listed sub-model of width `w` (to 1e-6), None for an unlisted width."""
        for k, listed in enumerate(self.listed):
            if round(listed, 6) == round(w, 6):
                return k
        return None


@dataclass(frozen=True)
class ResolutionAxis:
    """Input resolution as a sub-model axis (MutualNet, Yang et al., ECCV 2020): a network that
    runs inputs of any size that is a multiple of `stride` (its total downsampling; a fully
    convolutional trunk with global pooling). `listed`: the input sizes (px) a cell evaluates
    every width at and methods may draw from (`arch.resolutions`), the data's image size first,
    strictly decreasing; empty: the axis is off (every input at the data's image size)."""

    stride: int
    listed: tuple[int, ...] = ()

    @property
    def on(self) -> bool:
        return bool(self.listed)

    @property
    def lower(self) -> tuple[int, ...]:
        """The listed resolutions below the data's image size (each one extra row per width)."""
        return self.listed[1:]


AUTO_RESOLUTION_STEPS = 3  # "auto": the image size and 3 strides below it, as MutualNet's lists


def resolution_axis(value: object, image_size: int, stride: int) -> ResolutionAxis:
    """The `arch.resolutions` setting of a network of total stride `stride` on images of
    `image_size` px: [] (off), `auto` (the image size, then up to 3 smaller multiples of the
    stride: [224, 192, 160, 128] at stride 32, [32, 28, 24, 20] at stride 4, MutualNet's
    ImageNet and CIFAR lists, taoyang1122/MutualNet `apps/*.yml`), or an explicit list: the
    image size first, then strictly decreasing multiples of the stride. ConfigError otherwise,
    with the valid values."""
    below = [r for r in range(image_size - 1, 0, -1) if r % stride == 0]
    if value == "auto":
        if not below:
            raise ConfigError(
                f"resolutions auto: no multiple of the network's stride {stride} is below the "
                f"image size {image_size}; valid: [] (no resolution axis)"
            )
        return ResolutionAxis(stride, (image_size, *below[:AUTO_RESOLUTION_STEPS]))
    valid = (
        f"[], auto, or a list: the image size {image_size}, then strictly decreasing multiples "
        f"of the network's stride {stride} below it ({', '.join(map(str, below)) or 'none'})"
    )
    ints = isinstance(value, list) and all(
        isinstance(r, int) and not isinstance(r, bool) for r in value
    )
    ok = ints and (
        not value
        or (
            len(value) >= 2
            and value[0] == image_size
            and all(r in below for r in value[1:])
            and all(b < a for a, b in zip(value, value[1:]))
        )
    )
    if not ok:
        raise ConfigError(f"resolutions must be {valid}, {got(value)}")
    if not value:
        return ResolutionAxis(stride)
    return ResolutionAxis(stride, tuple(value))


def resize(x: Tensor, resolution: int | None) -> Tensor:
    """The batch x (N, 3, H, W) at `resolution` x `resolution` px, bilinear with aligned corners
    (MutualNet's `F.interpolate` in `train.py` and `utils/transforms.py` `InputList`); x itself
    when `resolution` is None or already its size."""
    if resolution is None or tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    return F.interpolate(x, (resolution, resolution), mode="bilinear", align_corners=True)


@dataclass(frozen=True)
class SubNet:
    """One sub-network of an elastic network (Once-for-All, Cai et al., ICLR 2020): `kernel[b]`
    and `expand[b]` for every elastic block b (skipped blocks included, as the reference's
    `set_active_subnet` takes them), `depth[s]` the blocks run in stage s (its first ones)."""

    kernel: tuple[int, ...]
    depth: tuple[int, ...]
    expand: tuple[float, ...]


@dataclass(frozen=True)
class ElasticSpace:
    """The choices of an elastic network (`Capabilities.elastic`): kernel sizes, depths per
    stage and expand ratios (each sorted ascending), `stages` stages of up to max(depths)
    blocks; `listed`: the named sub-networks (the model's sub-models), smallest first. Any
    SubNet of the space runs through `FlexibleModel.forward_subnet`."""

    kernels: tuple[int, ...]
    depths: tuple[int, ...]
    expands: tuple[float, ...]
    stages: int
    listed: tuple[SubNet, ...]

    @property
    def blocks(self) -> int:
        """Elastic blocks in all: `stages` x max(depths)."""
        return self.stages * max(self.depths)

    def uniform(self, kernel: int, depth: int, expand: float) -> SubNet:
        """The sub-network with one kernel size, depth and expand ratio everywhere."""
        return SubNet((kernel,) * self.blocks, (depth,) * self.stages, (expand,) * self.blocks)

    def sample(
        self,
        g: torch.Generator,
        kernels: tuple[int, ...],
        depths: tuple[int, ...],
        expands: tuple[float, ...],
    ) -> SubNet:
        """A sub-network drawn from `g`: each block's kernel and expand ratio and each stage's
        depth uniformly from the given choices, independently (the reference's
        `sample_active_subnet`: one `random.choice` per block and per stage)."""

        def pick(choices: tuple, n: int) -> tuple:
            idx = torch.randint(len(choices), (n,), generator=g).tolist()
            return tuple(choices[i] for i in idx)

        k = pick(kernels, self.blocks)
        e = pick(expands, self.blocks)
        return SubNet(k, pick(depths, self.stages), e)

    def submodel_of(self, s: SubNet) -> int | None:
        """Index of the listed sub-network that runs exactly like `s`, None if none does (the
        settings of blocks that `s` skips do not matter)."""
        for k, listed in enumerate(self.listed):
            if listed.depth == s.depth and all(
                (listed.kernel[b], listed.expand[b]) == (s.kernel[b], s.expand[b])
                for b in self.active_blocks(s)
            ):
                return k
        return None

    def active_blocks(self, s: SubNet) -> list[int]:
        """The elastic blocks `s` runs (the first depth[i] of each stage i)."""
        per = max(self.depths)
        return [i * per + j for i, d in enumerate(s.depth) for j in range(d)]


@dataclass(frozen=True)
class Capabilities:
    """What a flexible model can be asked, declared by each architecture (`FlexibleModel.caps`).

    - `axes`: what its sub-models differ in (names from `AXES`).
    - `single_pass`: one forward yields every sub-model's logits; `forward_all` and
      `forward_all_features` do exactly one pass (early exits).
    - `early_exit`: sub-models are exits of one trunk, so an input can stop at the first
      confident exit (budgeted-batch evaluation applies).
    - `exit_features`: every exit's feature list starts with its pooled exit feature,
      (B, C, 1, 1) with one C for all exits (byot's L2 hint compares them).
    - `bn_recalibration`: BatchNorm statistics are shared across sub-models and belong to none
      after training: every evaluated sub-model is recalibrated first (`train.bn_calib_batches`
      >= 1 is required).
    - `widths`: sub-models can be drawn from a continuous width range (`forward_width`).
    - `resolutions`: the network runs other input sizes (`ResolutionAxis`: its stride and the
      resolutions the cell evaluates and methods may draw; `resize` scales a batch).
    - `reranks_channels`: `rerank(k, scores)` re-chooses sub-model k's channels (hsd).
    - `stops_at_exit`: `forward_exits(x)` yields the exits' logits in turn and runs the trunk
      only as far as the exits consumed (real early exiting, timed at batch 1).
    - `cascade`: an early-exit model whose architecture has the bool option `cascade`: built
      with it on, exit k's logits also read exit k-1's detached logits (`CascadeLinks`,
      Zero-Time-Waste's cascade connection).
    - `elastic`: an elastic network (`ElasticSpace`: kernel sizes, depths, expand ratios) whose
      every sub-network runs through `forward_subnet` (Once-for-All's progressive shrinking).
    """

    axes: tuple[str, ...]
    single_pass: bool = False
    early_exit: bool = False
    exit_features: bool = False
    bn_recalibration: bool = False
    widths: WidthRange | None = None
    resolutions: ResolutionAxis | None = None
    reranks_channels: bool = False
    stops_at_exit: bool = False
    cascade: bool = False
    elastic: ElasticSpace | None = None

    def __post_init__(self) -> None:
        unknown = [a for a in self.axes if a not in AXES]
        if not self.axes or unknown:
            raise ValueError(f"axes must be a non-empty subset of {AXES}, got {self.axes}")

    def has(self, capability: str) -> bool:
        """Whether the named capability (a field name) is declared, e.g. `has("widths")`."""
        names = [f.name for f in fields(self) if f.name != "axes"]
        if capability not in names:
            raise ValueError(f"unknown capability {capability!r}; valid: {', '.join(names)}")
        return bool(getattr(self, capability))


@runtime_checkable
class SlicedLayer(Protocol):
    """A layer that runs only a slice of its weights (slimmable layers): its parameter count is
    `active_num_params()`, not its allocated parameters."""

    def active_num_params(self) -> int: ...


@runtime_checkable
class QuantizedLayer(Protocol):
    """A quantized layer: `active_bits()` -> (weight bits, activation bits) of its last use."""

    def active_bits(self) -> tuple[int, int]: ...


class FlexibleModel(nn.Module):
    """Base class: subclasses set `submodels` and `caps` and implement `forward_sub` and
    `forward_sub_features` (and what their capabilities promise: `forward_width` with
    `caps.widths`, `rerank` with `caps.reranks_channels`)."""

    submodels: list[SubModel]
    caps: Capabilities

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        """Logits (N, num_classes) of sub-model k alone."""
        raise NotImplementedError

    def forward_all(self, x: Tensor, which: list[int] | None = None) -> list[Tensor]:
        """Logits of the requested sub-models (default: all), in the order requested."""
        which = list(range(len(self.submodels))) if which is None else which
        return [self.forward_sub(x, k) for k in which]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        """Logits of sub-model k and its stage features (for feature-based methods such as ekd).

        Features are the outputs of the sub-model's resolution stages, in the same order for
        every sub-model, so that position i of two sub-models can be compared when their
        spatial sizes agree (attention transfer compares maps, not channels).
        """
        raise NotImplementedError

    def forward_all_features(
        self, x: Tensor, which: list[int] | None = None
    ) -> list[tuple[Tensor, list[Tensor]]]:
        """`forward_sub_features` of the requested sub-models (one pass for early exits)."""
        which = list(range(len(self.submodels))) if which is None else which
        return [self.forward_sub_features(x, k) for k in which]

    def forward_width(self, x: Tensor, w: float) -> Tensor:
        """Logits (N, num_classes) of width w of `caps.widths` (models declaring `widths`)."""
        raise NotImplementedError(f"{type(self).__name__} declares no continuous width range")

    def forward_subnet(self, x: Tensor, s: SubNet) -> Tensor:
        """Logits (N, num_classes) of sub-network s of `caps.elastic` (elastic models)."""
        raise NotImplementedError(f"{type(self).__name__} declares no elastic sub-networks")

    def rerank(self, k: int, scores: list[Tensor]) -> float:
        """Re-choose sub-model k's channels from per-channel scores; returns the fraction that
        changed (models declaring `reranks_channels`)."""
        raise NotImplementedError(f"{type(self).__name__} declares no channel re-ranking")

    def cost_forward(self, x: Tensor, k: int) -> Tensor:
        """The computation whose cost is reported for sub-model k (see benchmark.costs.flops)."""
        return self.forward_sub(x, k)

    def forward_exits(self, x: Tensor) -> Iterator[Tensor]:
        """Logits (N, num_classes) of exit 0, 1, ..., K-1 in turn (models declaring
        `stops_at_exit`): the trunk past exit k runs only when exit k+1 is asked for, so a
        consumer that stops after exit k has run exactly the anytime computation of exit k."""
        raise NotImplementedError(f"{type(self).__name__} declares no stopping at an exit")

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_all(x)

    @property
    def num_submodels(self) -> int:
        return len(self.submodels)


# one exit's output: logits (N, C), or (logits, its features)
ExitOutput = Tensor | tuple[Tensor, list[Tensor]]


class CascadeLinks(nn.Module):
    """Zero-Time-Waste's cascade connections (Wojcik et al., NeurIPS 2021; gmum/Zero-Time-Waste
    `ztw_cv/architectures/early_exits/heads.py`, `ConvCascadingHead`): exit k's logits (N, C)
    become z_k = head_k(h_k) + W_k LayerNorm(sg[z_{k-1}]) for k >= 1, z_{k-1} being the previous
    exit's cascaded logits, detached. The reference concatenates LayerNorm(sg[z_{k-1}]) to the
    head's pooled features before its last linear layer; W_k (C x C, no bias) is that layer's
    block for the extra inputs, so the function class is the same (only the initialisation of
    W_k differs: PyTorch's default for fan-in C instead of fan-in features + C)."""

    def __init__(self, num_exits: int, num_classes: int) -> None:
        super().__init__()
        self.links = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(num_classes), nn.Linear(num_classes, num_classes, False))
            for _ in range(num_exits - 1)
        )

    def link(self, k: int, raw: ExitOutput, prev: Tensor | None) -> ExitOutput:
        """Exit k's output with its logits cascaded from `prev`, exit k-1's cascaded logits
        (None for exit 0, which has no link)."""
        if k == 0:
            return raw
        if prev is None:
            raise ValueError(f"a cascade needs exit {k - 1} before exit {k}")
        z = raw[0] if isinstance(raw, tuple) else raw
        z = z + self.links[k - 1](prev.detach())
        return (z, raw[1]) if isinstance(raw, tuple) else z

    def forward(self, out: dict[int, ExitOutput]) -> dict[int, ExitOutput]:
        """`out` holds every exit 0..max (logits, or (logits, features)), in exit order."""
        prev: Tensor | None = None
        for k in sorted(out):
            out[k] = self.link(k, out[k], prev)
            prev = logits_of(out[k])
        return out


def logits_of(out: ExitOutput) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class EarlyExitModel(FlexibleModel):
    """A trunk with exits: one forward yields every requested exit (MSDNet, BYOT's ResNet).

    Subclasses implement `_run(x, upto, heads, features)`: the trunk up to exit `upto` and the
    heads in `heads`, returning {exit: logits} (or {exit: (logits, features)}); or, to stop at
    an exit (`caps.stops_at_exit`), `_walk`, the same computation yielding each head's output
    as soon as its block has run, from which `_run` and `forward_exits` follow. The reported
    cost of exit k is the anytime cost: the trunk up to k plus every head up to k, as the
    MSDNet reference op counter counts it.

    A family that offers the cascade (`caps.cascade`) calls `init_cascade(on, num_classes)` in
    its constructor; with it on, every exit up to the deepest requested one runs and
    `CascadeLinks` feeds exit k-1's detached logits into exit k (its cost then includes the
    links, and exit k alone needs every earlier head).
    """

    caps = Capabilities(("exit",), single_pass=True, early_exit=True, exit_features=True)

    def __init__(self) -> None:
        super().__init__()
        self.cascade: CascadeLinks | None = None

    def init_cascade(self, on: bool, num_classes: int) -> None:
        """Build the cascade links (after `submodels` is set) when `on`."""
        self.cascade = CascadeLinks(len(self.submodels), num_classes) if on else None

    def _walk(
        self, x: Tensor, upto: int, heads: set[int], features: bool = False
    ) -> Iterator[tuple[int, ExitOutput]]:
        """(exit i, its output) for each i in `heads` up to `upto`, in order, each yielded
        right after trunk block i (the blocks past it run only when the next item is asked
        for)."""
        raise NotImplementedError(f"{type(self).__name__} implements no exit-by-exit walk")

    def _run(
        self, x: Tensor, upto: int, heads: set[int], features: bool = False
    ) -> dict[int, ExitOutput]:
        return dict(self._walk(x, upto, heads, features))

    def forward_exits(self, x: Tensor) -> Iterator[Tensor]:
        last = self.num_submodels - 1
        prev: Tensor | None = None
        for k, z in self._walk(x, last, set(range(last + 1))):
            if self.cascade is not None:
                z = prev = self.cascade.link(k, z, prev)
            yield z

    def _exits(
        self, x: Tensor, upto: int, heads: set[int], features: bool = False
    ) -> dict[int, ExitOutput]:
        """`_run`, through the cascade links when the model has them."""
        if self.cascade is None:
            return self._run(x, upto, heads, features)
        return self.cascade(self._run(x, upto, set(range(upto + 1)), features))

    def forward_all(self, x: Tensor, which: list[int] | None = None) -> list[Tensor]:
        which = list(range(len(self.submodels))) if which is None else which
        out = self._exits(x, max(which), set(which))
        return [out[k] for k in which]

    def forward_all_features(
        self, x: Tensor, which: list[int] | None = None
    ) -> list[tuple[Tensor, list[Tensor]]]:
        which = list(range(len(self.submodels))) if which is None else which
        out = self._exits(x, max(which), set(which), features=True)
        return [out[k] for k in which]

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._exits(x, k, {k})[k]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        return self._exits(x, k, {k}, features=True)[k]

    def cost_forward(self, x: Tensor, k: int) -> Tensor:
        return self._exits(x, k, set(range(k + 1)))[k]


class IndependentModel(FlexibleModel):
    """K separate copies of a flexible model; copy k only ever runs sub-model k.

    This is how methods without weight sharing (`independent`, `takd`) get their networks:
    sub-model k has the same architecture and the same initial weights as sub-model k of the
    shared model, but no parameter is shared between sub-models.
    """

    def __init__(self, shared: FlexibleModel) -> None:
        super().__init__()
        self.submodels = list(shared.submodels)
        # each copy runs its own sub-model: one pass per sub-model, no drawn widths, no shared
        # exit features, no re-ranking across copies, and no stopping at an exit (copy k does
        # not continue copy k-1's computation); the budgeted curve is kept (architectures.md)
        self.caps = replace(
            shared.caps, single_pass=False, exit_features=False, widths=None,
            reranks_channels=False, stops_at_exit=False, cascade=False, elastic=None,
        )  # fmt: skip
        self.members = nn.ModuleList(copy.deepcopy(shared) for _ in shared.submodels)

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self.members[k].forward_sub(x, k)

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        return self.members[k].forward_sub_features(x, k)

    def cost_forward(self, x: Tensor, k: int) -> Tensor:
        return self.members[k].cost_forward(x, k)


@contextmanager
def forward_hooks(
    modules: list[nn.Module], hook: Callable[[nn.Module, tuple, object], None], pre: bool = False
) -> Iterator[None]:
    """`hook` registered on `modules` (as a forward pre-hook with `pre`) while the block runs;
    removed on every exit path."""
    handles = [
        m.register_forward_pre_hook(lambda mod, inp: hook(mod, inp, None))
        if pre
        else m.register_forward_hook(hook)
        for m in modules
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Every buffer of `module` (BN running statistics and counters) restored, in place, when
    the block exits: forwards in train mode that must not move the statistics (attentive's
    candidate scoring, ieb's EMA teacher) run inside it."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def count_active_params(model: nn.Module, run: Callable[[], object]) -> int:
    """Number of parameters used by `run()`: every leaf module that executes, counted once;
    a `SlicedLayer` counts its active slice, any other leaf all its own parameters."""
    seen: dict[int, int] = {}

    def hook(module: nn.Module, _inp, _out) -> None:
        if id(module) not in seen:
            seen[id(module)] = (
                module.active_num_params()
                if isinstance(module, SlicedLayer)
                else sum(p.numel() for p in module.parameters(recurse=False))
            )

    leaves = [m for m in model.modules() if not list(m.children())]
    with forward_hooks(leaves, hook), torch.no_grad():
        run()
    return sum(seen.values())
