"""Old module paths of the flat `benchmark/` layout, kept importable for users' scripts.

The modules were grouped into packages (`benchmark.training`, `benchmark.costs`,
`benchmark.record`); `import benchmark.flops` or `from benchmark import schema` still work and
give the module at its new place (the same module object, so patching one patches the other),
with a DeprecationWarning naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "benchmark.train": "benchmark.training.train",
    "benchmark.step": "benchmark.training.step",
    "benchmark.evaluate": "benchmark.training.evaluate",
    "benchmark.checkpoint": "benchmark.training.checkpoint",
    "benchmark.bn_calib": "benchmark.training.bn_calib",
    "benchmark.spectrum": "benchmark.training.spectrum",
    "benchmark.budgeted": "benchmark.training.budgeted",
    "benchmark.cell": "benchmark.training.build",
    "benchmark.flops": "benchmark.costs.flops",
    "benchmark.cost_axis": "benchmark.costs.axis",
    "benchmark.speed": "benchmark.costs.speed",
    "benchmark.tracking": "benchmark.record.tracking",
    "benchmark.store": "benchmark.record.store",
    "benchmark.schema": "benchmark.record.schema",
    "benchmark.signals": "benchmark.record.signals",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module at its new one."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec) -> ModuleType:
        new = MOVED[spec.name]
        _warn_at_importer(f"{spec.name} moved to {new}; import it from there")
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module is already executed at its new path."""


def _warn_at_importer(message: str) -> None:
    """The DeprecationWarning attributed to the line that imports (the first frame outside
    the import machinery and this file), so Python's default filters show it in a script."""
    frame = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen importlib")
        or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return
    module = frame.f_globals.get("__name__", "")
    warnings.warn_explicit(
        message, DeprecationWarning, frame.f_code.co_filename, frame.f_lineno, module,
        registry=frame.f_globals.setdefault("__warningregistry__", {}),
    )  # fmt: skip


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
