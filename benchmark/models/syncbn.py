"""BatchNorm with batch statistics over every rank of a distributed cell (`train.sync_bn`).

`torch.nn.SyncBatchNorm` runs on CUDA only (its forward refuses CPU tensors) and knows plain
BatchNorm layers only; this one implementation serves every device and every BatchNorm of the
zoo: plain `nn.BatchNorm1d/2d` (switched to `SyncableBatchNorm*d` by `make_syncable`, e.g. the
per-sub-model BatchNorms of `SwitchableBatchNorm2d`), the sliced `USBatchNorm2d` and the per-level
`LevelBatchNorm2d`, which call `batch_norm` (the `F.batch_norm` signature) themselves.

Inside a `synced()` block, a training-mode `batch_norm` takes the mean and variance of the global
batch from two differentiable all-reduces per layer, [sum, count] per channel and then the sum of
squared deviations from the global mean (`torch.distributed.nn.functional.all_reduce`, whose
backward all-reduces the gradient: the gradient of the global batch's statistics, as torch's
SyncBatchNorm computes it). Outside such a
block, or in eval mode, it is `F.batch_norm`: the papers compute BN per GPU, so the default
(`train.sync_bn: false`) keeps per-rank statistics, and a single process is never affected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce as sum_over_ranks

_SYNC = {"on": False}


@contextmanager
def synced(on: bool = True) -> Iterator[None]:
    """Within the block (with `on` and an initialised process group of world size > 1),
    training-mode BatchNorm uses the statistics of the global batch."""
    before = _SYNC["on"]
    _SYNC["on"] = on and dist.is_initialized() and dist.get_world_size() > 1
    try:
        yield
    finally:
        _SYNC["on"] = before


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """`F.batch_norm` of x (N, C, ...) with, in training mode inside `synced()`, the batch
    statistics of all ranks: mean and biased variance normalise; the running statistics move by
    `momentum` towards the global mean and the unbiased global variance (as F.batch_norm does)."""
    if not (training and _SYNC["on"]):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = [1, c] + [1] * (x.dim() - 2)
    xf = x.float()
    count = torch.full((1,), x.numel() / c, device=x.device, dtype=torch.float32)
    # two passes, as one process computes them: the global mean, then the global sum of squared
    # deviations from it (a sum of squares minus the squared mean loses the digits of a small
    # variance under a large mean)
    totals = sum_over_ranks(torch.cat([xf.sum(dims), count]))
    n = totals[-1]
    mean = totals[:c] / n
    var = sum_over_ranks(((xf - mean.view(shape)) ** 2).sum(dims)) / n
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / (n - 1))
    out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape) + bias.view(shape)
    return out.to(x.dtype)


class _Syncable:
    """Forward of a plain BatchNorm through `batch_norm` (nn.BatchNorm's own momentum rule)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average (BN recalibration)
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )


class SyncableBatchNorm1d(_Syncable, nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics span the ranks inside `synced()`."""


class SyncableBatchNorm2d(_Syncable, nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span the ranks inside `synced()`."""


_SYNCABLE: dict[type, type] = {
    nn.BatchNorm1d: SyncableBatchNorm1d,
    nn.BatchNorm2d: SyncableBatchNorm2d,
}


def make_syncable(model: nn.Module) -> int:
    """Switch every plain nn.BatchNorm1d/2d of `model` to its syncable class, in place (same
    parameters, buffers and state-dict keys); returns how many were switched."""
    n = 0
    for m in model.modules():
        cls = _SYNCABLE.get(type(m))
        if cls is not None:
            m.__class__ = cls
            n += 1
    return n
