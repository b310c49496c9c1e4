"""Method registry: one file per training method, registered by name.

Importing this package imports every module in it (`benchmark.registry.discover`), so a new
method is its file: `@register_method(name)` on a `Method` subclass whose `PARAMS` declare each
parameter's default, valid values and search range.
"""

from __future__ import annotations

from benchmark.methods.base import EpochContext, Method, Stage, kd_loss
from benchmark.registry import Registry, discover

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a Method subclass under `name` (also its `name`)."""

    def deco(cls: type[Method]) -> type[Method]:
        slot = cls.__dict__.get("plot_slot")  # not inherited: a subclass needs its own
        taken = {METHODS.get(n).plot_slot: n for n in METHODS.names()}
        if slot is not None and slot in taken:
            raise ValueError(
                f"method {name}: plot_slot {slot} is taken by {taken[slot]}; free slots start at "
                f"{max(s for s in taken if s is not None) + 1}"
            )
        cls.name = name
        cls.plot_slot = slot
        METHODS.register(name)(cls)
        return cls

    return deco


def _differs(value: object, default: float | str) -> bool:
    try:
        return abs(float(value) - float(default)) > 1e-12
    except (TypeError, ValueError):
        return str(value) != str(default)


def _shown(value: object) -> str:
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)


def method_label(method: str, params: dict[str, object]) -> str:
    """The name reports give a cell's method: `method` when its parameters (`cfg["method"]`,
    or the logged `method.<param>` params as strings) are the method's defaults, else the name
    with those that differ, e.g. `ipkd (T=3.21, a=0.43)` for parameters a study tuned. Cells of
    one method with other parameters are another treatment: a report never pools them."""
    if method not in METHODS.names():
        return method
    specs = METHODS.get(method).PARAMS
    changed = [  # in the method's declaration order: one label whatever the params' order
        f"{k}={_shown(params[k])}"
        for k in specs
        if params.get(k) not in (None, "") and _differs(params[k], specs[k].default)
    ]
    return f"{method} ({', '.join(changed)})" if changed else method


discover(__name__, __path__)  # importing each module registers its method

__all__ = [
    "METHODS",
    "EpochContext",
    "Method",
    "Stage",
    "kd_loss",
    "method_label",
    "register_method",
]
