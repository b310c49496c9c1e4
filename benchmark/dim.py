"""A search range of one method parameter, declared beside the parameter (`ParamSpec.search`).

Here rather than in `studies/` so that a method file can declare its ranges without importing
the study machinery (Optuna); `studies.space` reads them from the method registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dim:
    """A parameter searched uniformly (or log-uniformly) in [low, high]; `integer`: whole
    numbers only (e.g. the sandwich rule's number of widths)."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = ("log-" if self.log else "") + ("uniform integer" if self.integer else "uniform")
        return f"{kind}[{self.low:g}, {self.high:g}]"

    def to_dict(self) -> dict[str, Any]:
        out = {"low": self.low, "high": self.high, "log": self.log}
        return {**out, "integer": True} if self.integer else out


# Ranges shared by several methods (from the research notes): a distillation temperature, and a
# mixing weight such as a in (1 - a) CE + a KD.
TEMPERATURE = Dim(1.0, 10.0, log=True)
KD_WEIGHT = Dim(0.0, 1.0)
