"""BN recalibration: running statistics of one sub-model (or width) re-estimated from training
batches before it is evaluated (Yu & Huang, ICCV 2019, §3.3 "post-statistics of BN"; reference
code `bn_calibration_init` + `bn_cal_batch_num` with `cumulative_bn_stats`).

For a width network whose widths share BatchNorm buffers (universally slimmable), the running
statistics after training are a mixture over widths and belong to none; for a switchable-BN
network recalibration is optional and measurable. The mechanism is the same for both: the BN
layers that a sub-model's forward actually runs (found by a forward pre-hook, so a switchable
network's other widths keep theirs) are reset on first use, their momentum set to None
(cumulative average), and `n` training batches are forwarded in train mode without gradient.
Only training batches are ever used: validation and test images never reach this module.
In a distributed cell each rank forwards its part of every calibration batch and BatchNorm takes
the statistics of the whole batch (`benchmark.models.syncbn.synced`): the exact combination of
the ranks' means and variances, so every rank ends with one process's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.models.base import forward_hooks
from benchmark.models.syncbn import synced

# Calibration batches are drawn as the training batches of this virtual epoch (same augmentation
# as training, a data order no training epoch uses): fixed per seed, identical for every width
# and every evaluation of a cell, and independent of the method.
CALIB_EPOCH = 1_000_003


def recalibrate_bn(
    model: nn.Module, run: Callable[[Tensor], Any], batches: Iterable[Tensor], n: int
) -> int:
    """Re-estimate the running mean/var of every BatchNorm layer that `run(x)` uses, as the
    cumulative average over the first `n` of `batches` (each (N, 3, H, W), normalised).

    Returns the number of BN layers recalibrated. The model's train/eval mode and each layer's
    momentum are restored; no gradient is computed and no parameter changes.
    """
    touched: dict[int, tuple[nn.modules.batchnorm._BatchNorm, float | None]] = {}

    def reset_on_first_use(module: nn.modules.batchnorm._BatchNorm, _inp, _out) -> None:
        if id(module) not in touched:
            touched[id(module)] = (module, module.momentum)
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average over the calibration batches

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.train()
    try:
        # a distributed cell: each rank forwards its part of every calibration batch and the
        # statistics are those of the whole batch (`syncbn.synced`), as in one process
        with forward_hooks(bns, reset_on_first_use, pre=True), torch.no_grad(), synced():
            for x in islice(batches, n):
                run(x)
    finally:
        for module, momentum in touched.values():
            module.momentum = momentum
        model.train(was_training)
    return len(touched)


def calibration_inputs(
    batches_of_epoch: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
) -> Callable[[], Iterable[Tensor]]:
    """A fresh iterator over the calibration images (labels dropped) each time it is called,
    from the training batches of `CALIB_EPOCH` (`TrainBatches.epoch`)."""
    return lambda: (x for x, _ in batches_of_epoch(CALIB_EPOCH))


def calibrator(
    model: nn.Module, batches_of_epoch: Callable[[int], Iterable[tuple[Tensor, Tensor]]], n: int
) -> Callable[[Callable[[Tensor], Any]], int] | None:
    """`calibrate(run)` recalibrating the BN layers `run` uses on `n` calibration batches of
    the training set (`calibration_inputs`); None when `n` is 0 (no recalibration)."""
    if n <= 0:
        return None
    inputs = calibration_inputs(batches_of_epoch)
    return lambda run: recalibrate_bn(model, run, inputs(), n)
