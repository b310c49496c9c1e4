"""Architecture registry: one file per flexible architecture, registered by name.

Importing this package imports every module in it (`benchmark.registry.discover`), so a new
architecture is its file: `@register_arch(...)` declares its knobs, presets, its scaled-down
sizes for the `smoke` / `mini` profiles and any per-profile training settings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmark.errors import ConfigError
from benchmark.models.base import (
    Capabilities,
    FlexibleModel,
    IndependentModel,
    SubModel,
    WidthRange,
)
from benchmark.registry import Registry, discover


@dataclass
class ArchSpec:
    """How to build one architecture: its knobs (with defaults) and named presets.

    `profiles`: {profile: knob values} applied in that profile (e.g. the tiny `smoke` sizes);
    `train`: {profile: train settings} this architecture needs in that profile on top of the
    profile's own (e.g. a lower lr), as timm keeps per-model default configs beside each model.
    A `--set arch.X` / `--set train.X` still overrides both.
    `memory_format`: `channels_last` or `contiguous`, the layout its step is fastest in
    (benchmark.costs.speed; `runtime.memory_format` overrides it).
    """

    name: str
    build: Callable[..., FlexibleModel]
    defaults: dict[str, Any]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory_format: str = "channels_last"

    def resolve(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults <- preset <- overrides, with unknown keys rejected."""
        overrides = dict(overrides)
        params = dict(self.defaults)
        preset = overrides.pop("preset", params.get("preset"))
        if self.presets:
            if preset not in self.presets:
                raise ConfigError(
                    f"unknown preset {preset!r} for arch {self.name}; "
                    f"valid presets: {', '.join(self.presets)}"
                )
            params.update(self.presets[preset])
            params["preset"] = preset
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            owners = [
                f"{key} is a parameter of {', '.join(names)}"
                for key in unknown
                if (names := [n for n in ARCHS.names() if key in ARCHS.get(n).defaults])
            ]
            raise ConfigError(
                f"unknown parameter(s) {', '.join(unknown)} for arch {self.name}; "
                f"valid: {', '.join(sorted(params))}" + "".join(f"; {o}" for o in owners)
            )
        params.update(overrides)
        return params


ARCHS: Registry[ArchSpec] = Registry("architecture")


def register_arch(
    name: str,
    defaults: dict[str, Any],
    presets: dict[str, dict[str, Any]] | None = None,
    description: str = "",
    profiles: dict[str, dict[str, Any]] | None = None,
    train: dict[str, dict[str, Any]] | None = None,
    memory_format: str = "channels_last",
) -> Callable[[Callable[..., FlexibleModel]], Callable[..., FlexibleModel]]:
    """Register a builder `build(num_classes, image_size, **knobs) -> FlexibleModel` (see
    ArchSpec for `profiles`, `train` and `memory_format`; profile names are checked by
    `config.resolve`)."""
    if memory_format not in ("channels_last", "contiguous"):
        raise ValueError(
            f"memory_format of {name}: channels_last or contiguous, got {memory_format!r}"
        )

    def deco(build: Callable[..., FlexibleModel]) -> Callable[..., FlexibleModel]:
        spec = ArchSpec(
            name, build, defaults, presets or {}, description, profiles or {}, train or {},
            memory_format,
        )  # fmt: skip
        ARCHS.register(name)(spec)
        return build

    return deco


def build_model(
    arch: str, params: dict[str, Any], num_classes: int, image_size: int
) -> FlexibleModel:
    """Build the shared flexible model from resolved params (see ArchSpec.resolve)."""
    spec = ARCHS.get(arch)
    kwargs = {k: v for k, v in params.items() if k != "preset"}
    return spec.build(num_classes=num_classes, image_size=image_size, **kwargs)


# Initialisers skipped on the meta device (see build_on_meta).
_INITS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
    "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_",
)  # fmt: skip


def build_on_meta(
    arch: str, params: dict[str, Any], num_classes: int, image_size: int
) -> FlexibleModel:
    """The model on the meta device, for its structure only (no memory, no values): config
    validation and method compatibility checks. `torch.nn.init` initialisers are skipped while
    it is built: on `meta` they fill nothing, yet `normal_` runs through `torch._refs` and
    imports `torch._dynamo`, seconds of CPU on every `flexbench grid run` of a finished grid."""
    import torch
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(init, name, _keep)
        with torch.device("meta"):
            return build_model(arch, params, num_classes, image_size)
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _keep(tensor, *args, **kwargs):
    return tensor


def archs_having(capability: str) -> tuple[str, ...]:
    """Registered architectures whose default model (built on the meta device, no memory)
    declares `capability` (a `Capabilities` field, e.g. `exit_features`)."""
    fits = _presets_having(capability, tuple(ARCHS.names()))
    return tuple(name for name, preset in fits if preset is None)


def use_instead(capability: str, refused: str) -> str:
    """The tail of a refusal of architecture `refused` for lack of `capability`: `use A or B
    (arch.preset=p)`, every other architecture whose default or one of whose presets has it,
    plus `; <refused> has it with arch.preset=q` where another preset of its own does."""
    fits = _presets_having(capability, tuple(ARCHS.names()))
    others = [
        name if p is None else f"{name} (arch.preset={p})" for name, p in fits if name != refused
    ]
    text = f"use {' or '.join(others)}"
    for name, preset in fits:
        if name == refused:
            preset = preset or ARCHS.get(name).defaults.get("preset")
            text += f"; {name} has it with " + (
                f"arch.preset={preset}" if preset else "its default arch.* settings"
            )
    return text


@functools.cache  # a grid asks once per cell; keyed on the registry so a new arch is seen
def _presets_having(capability: str, names: tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    """(architecture, preset) for each architecture with `capability`: preset None where its
    default model has it, else the first of its presets whose model does."""
    found = []
    for name in names:
        spec = ARCHS.get(name)
        default = spec.defaults.get("preset")
        for preset in [None] + [p for p in spec.presets if p != default]:
            try:
                params = spec.resolve({} if preset is None else {"preset": preset})
                model = build_on_meta(name, params, 10, 32)
            except ConfigError:
                continue
            if model.caps.has(capability):
                found.append((name, preset))
                break
    return tuple(found)


discover(__name__, __path__)  # importing each module registers its architecture

__all__ = [
    "ARCHS",
    "ArchSpec",
    "Capabilities",
    "FlexibleModel",
    "IndependentModel",
    "SubModel",
    "WidthRange",
    "archs_having",
    "use_instead",
    "build_model",
    "build_on_meta",
]
