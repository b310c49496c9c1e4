"""The width spectrum of a universally slimmable cell: accuracy and cost of many widths.

US-Nets (Yu & Huang, ICCV 2019, Table/Fig. "spectrum") report a network's accuracy at every
width of a fine grid rather than at a few listed widths; here the widths are w_min, w_min +
`spectrum_step`, ... w_max of the network's range (`arch.spectrum_step`, 0: none), each
evaluated after its own BN recalibration. Each point becomes an extra sub-model row, named
`spectrum/w<width>` and marked `spectrum` = "true" (schema field), so that the cell's MLflow
record, `submodels.csv` and the reports carry it as a curve beside the fixed sub-models.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from benchmark.costs.flops import width_costs
from benchmark.models import FlexibleModel
from benchmark.record.schema import SPECTRUM_NAME_PREFIX
from benchmark.training.evaluate import EvalHow, run_eval


def spectrum_widths(model: FlexibleModel) -> list[float]:
    """The widths of the model's spectrum, smallest first; [] for models without one."""
    step = getattr(model, "spectrum_step", 0.0)
    if not step or not hasattr(model, "forward_width"):
        return []
    return model.spectrum_widths(step)


def spectrum_rows(
    model: FlexibleModel, data: tuple[Tensor, Tensor], how: EvalHow, image_size: int, start: int
) -> list[dict[str, Any]]:
    """One row per spectrum width (schema fields; no latency), indices from `start`.
    `how.calibrate` recalibrates each width before its pass (required: shared BN statistics
    belong to no width after training)."""
    widths = spectrum_widths(model)
    if not widths:
        return []
    names = [f"{SPECTRUM_NAME_PREFIX}w{w:.2f}" for w in widths]
    forwards = [lambda x, w=w: [model.forward_width(x, w)] for w in widths]
    acc = run_eval(model, forwards, [1] * len(widths), data, how)
    costs = width_costs(model, widths, names, image_size)
    return [
        {"index": start + i, "name": c.name, "spectrum": "true", "top1": a1, "top5": a5}
        | {"mmacs": c.mmacs, "mflops": c.mflops, "params_m": c.params_m, "gbitops": c.gbitops}
        for i, (c, a1, a5) in enumerate(zip(costs, acc.top1, acc.top5))
    ]
