"""The width spectrum of a universally slimmable cell: accuracy and cost of many widths.

US-Nets (Yu & Huang, ICCV 2019, Table/Fig. "spectrum") report a network's accuracy at every
width of a fine grid rather than at a few listed widths; here the widths are w_min, w_min +
`spectrum_step`, ... w_max of the network's declared range (`caps.widths`, `arch.spectrum_step`,
0: none), each evaluated after its own BN recalibration. Each point becomes an extra sub-model
row, named `spectrum/w<width>` and marked `spectrum` = "true" (schema field), so that the cell's
MLflow record, `submodels.csv` and the reports carry it as a curve beside the fixed sub-models.
"""

from __future__ import annotations

from benchmark.costs.flops import width_costs
from benchmark.data.pipeline import ImageSet
from benchmark.models import FlexibleModel
from benchmark.record.schema import SPECTRUM_NAME_PREFIX, Measurement
from benchmark.training.evaluate import EvalSpec, run_eval


def spectrum_widths(model: FlexibleModel) -> list[float]:
    """The widths of the model's spectrum, smallest first; [] for models without one."""
    return [] if model.caps.widths is None else model.caps.widths.spectrum()


def measure_spectrum(
    model: FlexibleModel, data: ImageSet, spec: EvalSpec, image_size: int, start: int
) -> list[Measurement]:
    """One measurement per spectrum width (no latency), indices from `start`. `spec.calibrate`
    recalibrates each width before its pass (required: shared BN statistics belong to no width
    after training)."""
    widths = spectrum_widths(model)
    if not widths:
        return []
    names = [f"{SPECTRUM_NAME_PREFIX}w{w:.2f}" for w in widths]
    forwards = [lambda x, w=w: [model.forward_width(x, w)] for w in widths]
    acc = run_eval(model, forwards, [1] * len(widths), data, spec)
    costs = width_costs(model, widths, names, image_size)
    return [
        Measurement(start + i, c.name, True, a1, a5, c)
        for i, (c, a1, a5) in enumerate(zip(costs, acc.top1, acc.top5))
    ]
