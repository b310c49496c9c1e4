"""A search range of one method parameter, declared beside the parameter (`ParamSpec.search`).

Here rather than in `studies/` so that a method file can declare its ranges without importing
the study machinery (Optuna); `studies.space` reads them from the method registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dim:
    """A float parameter searched uniformly (or log-uniformly) in [low, high]."""

    low: float
    high: float
    log: bool = False

    def describe(self) -> str:
        return f"{'log-uniform' if self.log else 'uniform'}[{self.low:g}, {self.high:g}]"

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log}


# Ranges shared by several methods (from the research notes): a distillation temperature, and a
# mixing weight such as a in (1 - a) CE + a KD.
TEMPERATURE = Dim(1.0, 10.0, log=True)
KD_WEIGHT = Dim(0.0, 1.0)
