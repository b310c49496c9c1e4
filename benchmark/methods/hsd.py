"""hsd (hierarchical self-distillation, Miles & Mikolajczyk, BMVC 2020): the ipkd_ta chain on
channel sub-models whose channels each level re-chooses by saliency w.r.t. its own teacher.

From the paper's abstract: a teacher -> teaching assistants -> student cascade sharing weights,
each model pruned using gradient information from its own teacher. Its saliency formula,
schedule and loss weights are not published in anything we could read; the rest is our design:
- Loss: exactly ipkd_ta's, CE(z_K, y) for the full model and (1-a) CE(z_k, y) + a KD(z_k, z_{k+1};
  T) for k < K, with ipkd_ta's defaults (a = 1, T = 1), so hsd vs ipkd_ta on `saliency_vgg`
  isolates "which channels" (ipkd_ta trains the prefix channels, hsd the salient ones).
- Saliency: first-order Taylor (Molchanov et al., ICLR 2017) of level k's KD loss from level k+1
  (teacher logits of the same batch, no gradient) w.r.t. a 0/1 gate on each of level k+1's
  channels: s_c = mean over samples of |d(sum of per-sample KD)/d(gate of c in that sample)|, i.e.
  |sum over positions of a_c * dL/d(gated a_c)|; for a dropped channel the estimated loss change of
  adding it back, for a kept one of removing it. BatchNorm uses batch statistics and running
  statistics are not updated; only the gates get gradients, never the parameters.
- Schedule: after epoch e (1-based) with e % rerank_every == 0 and e <= rerank_until * epochs,
  on `saliency_batches` training batches of that epoch, every level k < K-1 keeps its
  highest-saliency channels among level k+1's, largest level first (each level chooses among its
  new teacher's channels, so levels stay nested). Later epochs fine-tune the final structure.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from itertools import islice

import torch
from torch import Tensor, nn

from benchmark.methods import register_method
from benchmark.methods.base import EpochContext, ParamSpec, integer, kd_loss
from benchmark.methods.ipkd_ta import IPKDTA


def kd_saliency(
    model: nn.Module,
    k: int,
    batches: list[tuple[Tensor, Tensor]],
    T: float,
    autocast: Callable[[], AbstractContextManager],
) -> list[Tensor]:
    """Per layer, the Taylor saliency of each of level k's candidates (aligned with
    `model.candidates(k)`) for its KD loss from level k+1, averaged over the samples."""
    total: list[Tensor] | None = None
    n = 0
    for x, _ in batches:
        with torch.no_grad(), autocast():
            teacher = model.forward_gated(x, k + 1, own=True).float()
        gates = [g.expand(x.shape[0], -1).clone().requires_grad_() for g in model.gates(k)]
        with autocast():
            student = model.forward_gated(x, k, gates).float()
        per_sample_sum = kd_loss(student, teacher, T) * x.shape[0]
        grads = torch.autograd.grad(per_sample_sum, gates)
        scores = [g.abs().sum(0) for g in grads]
        total = scores if total is None else [a + b for a, b in zip(total, scores)]
        n += x.shape[0]
    return [s / n for s in total]


@register_method("hsd")
class HSD(IPKDTA):
    description = "ipkd_ta chain on channel sub-models re-chosen by KD-loss Taylor saliency"
    plot_slot = 7
    PARAMS = {
        **IPKDTA.PARAMS,
        # The re-ranking schedule: kept at its value by studies (not a loss weight).
        "rerank_every": integer(1, "rerank_every"),
        "rerank_until": ParamSpec(
            0.5, lambda v: 0 < v <= 1, "rerank_until must be in (0, 1]", searched=False
        ),
        "saliency_batches": integer(8, "saliency_batches"),
    }

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        cls.require(model, arch, "reranks_channels", "saliency-ranked channels")

    def epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Re-rank every non-full level's channels on re-rank epochs; logs the fraction of each
        level's channels that changed (only on those epochs)."""
        e, p = ctx.epoch + 1, self.params
        if e % int(p["rerank_every"]) or e > p["rerank_until"] * ctx.epochs:
            return {}
        model = ctx.model
        batches = list(islice(ctx.batches(ctx.epoch), int(p["saliency_batches"])))
        metrics = {}
        for k in range(model.num_submodels - 2, -1, -1):
            scores = kd_saliency(model, k, batches, p["T"], ctx.autocast)
            changed = model.rerank(k, scores)
            metrics[f"method/channels_changed/{model.submodels[k].name}"] = changed
        return metrics
