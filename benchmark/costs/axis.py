"""Which cost separates a network's sub-models: the x axis of accuracy-vs-cost curves.

Sub-models of most flexible networks differ in FLOPs; the bit-widths of a switchable-precision
network run the same multiply-adds at different precision, so only bit-operations separate them.
Kept free of torch so that reports and studies can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

UNITS = {"mflops": "MFLOPs", "gbitops": "GBitOps"}


def cost_axis(mflops: Sequence[float], gbitops: Sequence[float | None]) -> str:
    """`mflops`, unless every sub-model has the same MFLOPs and their bit-operations differ."""
    if len(mflops) < 2 or any(b is None for b in gbitops):
        return "mflops"
    same = max(mflops) - min(mflops) <= 1e-9 * max(abs(v) for v in mflops)
    return "gbitops" if same and max(gbitops) > min(gbitops) else "mflops"


def auc_top1(cost: Sequence[float], top1: Sequence[float]) -> float:
    """Normalised area under top-1 vs cost: trapezoid area divided by the cost range, i.e. the
    mean accuracy over the cost range (a cell's `test/top1_auc`, the reports' AUC and the
    studies' `auc` objective); equals mean top-1 when all sub-models cost the same."""
    pts = sorted(zip(cost, top1))
    span = pts[-1][0] - pts[0][0]
    if not span > 0:
        return float(sum(t for _, t in pts) / len(pts))
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    return float(area / span)
