"""Accuracy of every sub-model in one pass over a split (one host sync at the end)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from benchmark.data.pipeline import Normalizer, eval_batches
from benchmark.models import FlexibleModel


@dataclass
class Accuracy:
    """Top-1/top-5 in % per sub-model (smallest first). With confidences: the per-sample
    max-softmax confidence and top-1 correctness of every sub-model, (K, N) each, on CPU, for
    budgeted-batch evaluation (MSDNet, Huang et al. 2018, §5.2)."""

    top1: list[float]
    top5: list[float]
    confidence: Tensor | None = None
    correct: Tensor | None = None


@torch.no_grad()
def evaluate(
    model: FlexibleModel,
    data: tuple[Tensor, Tensor],
    batch: int,
    norm: Normalizer,
    amp: bool,
    confidences: bool = False,
) -> Accuracy:
    """Evaluate every sub-model on `data` = (uint8 images (N,3,H,W), labels (N,)) in eval mode,
    on the normaliser's device; the model's train/eval mode is restored afterwards."""
    x, y = data
    device = norm.scale.device
    was_training = model.training
    model.eval()
    k = model.num_submodels
    c1 = torch.zeros(k, device=device)
    c5 = torch.zeros(k, device=device)
    conf, hit1 = [], []
    for xb, yb in eval_batches(x, y, batch, norm, device):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            outs = model.forward_all(xb)
        for i, z in enumerate(outs):
            top = z.topk(min(5, z.shape[1]), dim=1).indices
            hit = top == yb[:, None]
            c1[i] += hit[:, 0].sum()
            c5[i] += hit.any(1).sum()
        if confidences:
            conf.append(torch.stack([z.float().softmax(1).amax(1) for z in outs]))
            hit1.append(torch.stack([z.argmax(1) == yb for z in outs]))
    model.train(was_training)
    n = max(1, x.shape[0])
    acc = Accuracy((c1 * 100 / n).tolist(), (c5 * 100 / n).tolist())
    if confidences:
        acc.confidence, acc.correct = torch.cat(conf, 1).cpu(), torch.cat(hit1, 1).cpu()
    return acc
