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


discover(__name__, __path__)  # importing each module registers its method

__all__ = ["METHODS", "EpochContext", "Method", "Stage", "kd_loss", "register_method"]
