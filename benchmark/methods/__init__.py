"""Method registry: one file per training method, registered by name."""

from __future__ import annotations

from benchmark.methods.base import EpochContext, Method, Stage, kd_loss
from benchmark.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.register(name)(cls)
        return cls

    return deco


from benchmark.methods import (  # noqa: E402,F401
    byot,
    ekd,
    hsd,
    imta,
    independent,
    ipkd,
    ipkd_ta,
    joint,
    multi_teacher,
    takd,
)

__all__ = ["METHODS", "EpochContext", "Method", "Stage", "kd_loss", "register_method"]
