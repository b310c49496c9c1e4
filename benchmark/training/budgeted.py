"""Budgeted-batch classification for early-exit models (MSDNet's dynamic evaluation).

Protocol of the MSDNet reference code (`adaptive_inference.py`): confidence = max softmax of an
exit. For each of `n_points` geometric exit distributions pi_k ∝ q^k (q = p/20, p = 1..n_points,
k = 1..K), thresholds are fitted on the VALIDATION split: for exits k < K in order, walk the samples
that have not exited yet in decreasing confidence and take the confidence of the floor(N·pi_k)-th
as T_k (no sample exits at k when that count is 0); every sample with confidence >= T_k exits.
The last exit takes the rest. The thresholds are then applied unchanged to the test split: each
sample exits at the first k with confidence >= T_k, and the point is (accuracy, expected cost =
sum_k fraction exiting at k × cumulative cost of exit k).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NO_EXIT = 1e8  # a threshold no softmax confidence reaches


def exit_proportions(q: float, k: int) -> Tensor:
    probs = torch.tensor([q**i for i in range(1, k + 1)], dtype=torch.float64)
    return probs / probs.sum()


def fit_thresholds(val_conf: Tensor, proportions: Tensor) -> Tensor:
    """Thresholds (K,) from validation confidences (K, N) and target exit proportions (K,)."""
    k_exits, n = val_conf.shape
    thresholds = torch.full((k_exits,), NO_EXIT, dtype=val_conf.dtype)
    exited = torch.zeros(n, dtype=torch.bool)
    for k in range(k_exits - 1):
        out_n = math.floor(n * float(proportions[k]))
        order = val_conf[k].argsort(descending=True, stable=True)
        remaining = order[~exited[order]]
        if 1 <= out_n <= remaining.numel():
            thresholds[k] = val_conf[k, remaining[out_n - 1]]
        exited |= val_conf[k] >= thresholds[k]
    thresholds[-1] = -NO_EXIT
    return thresholds


def apply_thresholds(
    conf: Tensor, correct: Tensor, thresholds: Tensor, costs: list[float]
) -> tuple[float, float]:
    """(top-1 %, expected cost) when each sample exits at the first exit above its threshold."""
    exits = conf >= thresholds[:, None]
    exits[-1] = True
    first = exits.float().argmax(0)  # index of the first True per sample
    cols = torch.arange(conf.shape[1])
    acc = correct[first, cols].float().mean().item() * 100
    expected = torch.tensor(costs, dtype=torch.float64)[first].mean().item()
    return acc, expected


def budgeted_curve(
    val_conf: Tensor,
    test_conf: Tensor,
    test_correct: Tensor,
    costs: list[float],
    n_points: int = 39,
) -> list[dict[str, float]]:
    """One (q, test top-1, expected MFLOPs) point per exit distribution; thresholds from val."""
    points = []
    for p in range(1, n_points + 1):
        q = p / 20
        thresholds = fit_thresholds(val_conf, exit_proportions(q, val_conf.shape[0]))
        acc, cost = apply_thresholds(test_conf, test_correct, thresholds, costs)
        points.append({"q": q, "top1": acc, "mflops": cost})
    return points
