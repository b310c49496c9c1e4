"""The width spectrum of a universally slimmable cell, and its resolution axis: accuracy and cost
of many widths, at every evaluated input resolution.

US-Nets (Yu & Huang, ICCV 2019, Table/Fig. "spectrum") report a network's accuracy at every
width of a fine grid rather than at a few listed widths; here the widths are w_min, w_min +
`spectrum_step`, ... w_max of the network's declared range (`caps.widths`, `arch.spectrum_step`,
0: none), each evaluated after its own BN recalibration. Each point becomes an extra sub-model
row, named `spectrum/w<width>` and marked `spectrum` = "true" (schema field), so that the cell's
MLflow record, `submodels.csv` and the reports carry it as a curve beside the fixed sub-models.

MutualNet (Yang et al., ECCV 2020; taoyang1122/MutualNet `train.py` `test`) evaluates every
width at every input resolution, BN statistics recomputed at that resolution. With a resolution
axis (`caps.resolutions`, `arch.resolutions`), every fixed sub-model is also measured at each
listed resolution below the image size (rows `w0.25-r16`: the test images and the calibration
images resized alike, costs and latency counted at that input size), and the spectrum is swept
at every listed resolution (`spectrum/w0.30-r16`); every row of such a cell records its
`resolution`. Without the axis nothing changes: the same rows, names and numbers as before.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmark.costs.flops import LatencyProfile, count_costs, width_costs
from benchmark.data.pipeline import ImageSet
from benchmark.models import FlexibleModel
from benchmark.models.base import resize
from benchmark.record.schema import SPECTRUM_NAME_PREFIX, Measurement, at_resolution
from benchmark.training.evaluate import EvalSpec, evaluate, run_eval


def spectrum_widths(model: FlexibleModel) -> list[float]:
    """The widths of the model's spectrum, smallest first; [] for models without one."""
    return [] if model.caps.widths is None else model.caps.widths.spectrum()


def evaluated_resolutions(model: FlexibleModel) -> list[int | None]:
    """The input resolutions every width is evaluated at, the data's image size first: [None]
    (the batch as it is, no resolution recorded) without a resolution axis."""
    axis = model.caps.resolutions
    return list(axis.listed) if axis is not None and axis.on else [None]


def lower_resolutions(model: FlexibleModel) -> list[int]:
    """The listed resolutions below the image size (each a row per fixed sub-model)."""
    axis = model.caps.resolutions
    return [] if axis is None else list(axis.lower)


def measure_spectrum(
    model: FlexibleModel, data: ImageSet, spec: EvalSpec, image_size: int, start: int
) -> list[Measurement]:
    """One measurement per spectrum width and evaluated resolution (no latency), indices from
    `start`, the image size first. `spec.calibrate` recalibrates each point before its pass, on
    the calibration images resized alike (required: shared BN statistics belong to no width
    after training)."""
    widths = spectrum_widths(model)
    out: list[Measurement] = []
    for r in evaluated_resolutions(model) if widths else []:
        suffix = None if r in (None, image_size) else r
        names = [at_resolution(f"{SPECTRUM_NAME_PREFIX}w{w:.2f}", suffix) for w in widths]
        forwards = [lambda x, w=w, r=r: [model.forward_width(resize(x, r), w)] for w in widths]
        acc = run_eval(model, forwards, [1] * len(widths), data, spec)
        costs = width_costs(model, widths, names, r or image_size)
        first = start + len(out)
        out += [
            Measurement(first + i, c.name, True, a1, a5, c, resolution=r)
            for i, (c, a1, a5) in enumerate(zip(costs, acc.top1, acc.top5))
        ]
    return out


def measure_resolutions(
    model: FlexibleModel,
    data: ImageSet,
    spec: EvalSpec,
    start: int,
    latency: Callable[[int], LatencyProfile],
) -> list[Measurement]:
    """Every fixed sub-model at each listed resolution below the image size (rows named
    `<sub>-r<resolution>`, indices from `start`): accuracy with the images resized (BN
    recalibrated at that resolution where the model needs it), costs counted at that input size
    (`count_costs`) and `latency(r)`, the sub-models' latency profile at input size r."""
    out: list[Measurement] = []
    for r in lower_resolutions(model):
        acc = evaluate(model, data, spec, resolution=r)
        lat = latency(r)
        for c, a1, a5, med, iqr in zip(
            count_costs(model, r), acc.top1, acc.top5, lat.median_ms, lat.iqr_ms
        ):
            c.name = at_resolution(c.name, r)
            out.append(Measurement(start + len(out), c.name, False, a1, a5, c, None, med, iqr, r))
    return out
