"""Architecture registry: one file per flexible architecture, registered by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmark.errors import ConfigError
from benchmark.models.base import FlexibleModel, IndependentModel, SubModel
from benchmark.registry import Registry


@dataclass
class ArchSpec:
    """How to build one architecture: its knobs (with defaults) and named presets."""

    name: str
    build: Callable[..., FlexibleModel]
    defaults: dict[str, Any]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

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
) -> Callable[[Callable[..., FlexibleModel]], Callable[..., FlexibleModel]]:
    def deco(build: Callable[..., FlexibleModel]) -> Callable[..., FlexibleModel]:
        ARCHS.register(name)(ArchSpec(name, build, defaults, presets or {}, description))
        return build

    return deco


def build_model(
    arch: str, params: dict[str, Any], num_classes: int, image_size: int
) -> FlexibleModel:
    """Build the shared flexible model from resolved params (see ArchSpec.resolve)."""
    spec = ARCHS.get(arch)
    kwargs = {k: v for k, v in params.items() if k != "preset"}
    return spec.build(num_classes=num_classes, image_size=image_size, **kwargs)


def archs_having(attribute: str) -> list[str]:
    """Registered architectures whose default model (built on the meta device, no memory) has a
    true `attribute`, e.g. `exit_features`: for errors that name the architectures that fit."""
    import torch

    names = []
    for name in ARCHS.names():
        try:
            with torch.device("meta"):
                model = build_model(name, ARCHS.get(name).resolve({}), 10, 32)
        except ConfigError:
            continue
        if getattr(model, attribute, False):
            names.append(name)
    return names


# Importing the modules registers them.
from benchmark.models import (  # noqa: E402,F401
    byot_resnet,
    ddnn_resnet,
    msdnet,
    saliency_vgg,
    slimmable_mobilenet_v1,
    switchable_precision,
)

__all__ = [
    "ARCHS",
    "ArchSpec",
    "FlexibleModel",
    "IndependentModel",
    "SubModel",
    "archs_having",
    "build_model",
]
