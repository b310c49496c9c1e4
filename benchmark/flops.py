"""Cost of every sub-model: multiply-adds, FLOPs, parameters and measured latency.

Conventions (named in the metric keys):
- `mmacs`: millions of multiply-accumulates of convolutions and linear layers (bias, BN,
  activations and pooling not counted); this is what the MSDNet and slimmable papers call "FLOPs".
- `mflops`: `torch.utils.flop_counter.FlopCounterMode` on the forward pass = 2 x mmacs.
- For early-exit models the cost of exit k is cumulative: the trunk up to exit k plus every exit
  head up to k (the anytime-inference cost, as counted by the MSDNet reference op counter).
- `gbitops`: billions of bit-operations, sum over layers of MACs x weight bits x activation bits;
  layers that run in full precision count 32 x 32, quantized layers (modules with
  `active_bits()`) their active bit-widths. Comparable across every architecture, and the cost
  that separates the sub-models of a bit-width-switchable network.
- `params_m`: parameters used by the sub-model (cumulative incl. earlier heads for exits).
- `latency_ms`: median wall time of the same forward (eval mode, after warm-up) at the
  recorded batch size and device.
Counting uses a copy of the model on CPU with batch 1, in eval mode, under no_grad (the counter's
backward counts are wrong for grouped convolutions, so only forwards are counted).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmark.models.base import FlexibleModel, count_active_params


@dataclass
class SubCost:
    name: str
    mmacs: float
    mflops: float
    params_m: float
    gbitops: float
    latency_ms: float | None = None

    def row(self) -> dict:
        return asdict(self)


_CACHE: dict[str, list[SubCost]] = {}


def count_costs(
    model: FlexibleModel, image_size: int, cache_key: str | None = None
) -> list[SubCost]:
    """MACs/FLOPs/params per sub-model (cached per architecture config)."""
    if cache_key is not None and cache_key in _CACHE:
        return copy.deepcopy(_CACHE[cache_key])
    m = copy.deepcopy(model).cpu().float().eval()
    x = torch.zeros(1, 3, image_size, image_size)
    costs = []
    for sub in m.submodels:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m.cost_forward(x, sub.index)
        flops = counter.get_total_flops()
        params = count_active_params(m, lambda k=sub.index: m.cost_forward(x, k))
        bitops = _bitops(m, x, sub.index, flops)
        costs.append(SubCost(sub.name, flops / 2e6, flops / 1e6, params / 1e6, bitops / 1e9))
    if cache_key is not None:
        _CACHE[cache_key] = copy.deepcopy(costs)
    return costs


def _bitops(model: FlexibleModel, x: torch.Tensor, k: int, flops: int) -> float:
    """MACs x bits of sub-model k: modules with `active_bits()` (quantized layers) have their
    MACs counted apart at their active bit-widths; all other MACs count 32 x 32. Quantized
    modules are found by identity (a forward hook), not by FlopCounterMode's module names, which
    depend on how the forward reaches a module (e.g. through IndependentModel's members)."""
    calls: list[tuple[torch.nn.Module, tuple, tuple[int, int]]] = []
    handles = [
        mod.register_forward_hook(
            lambda mod, inp, _out: calls.append((mod, inp, mod.active_bits()))
        )
        for mod in model.modules()
        if hasattr(mod, "active_bits")
    ]
    try:
        with torch.no_grad():
            model.cost_forward(x, k)
    finally:
        for h in handles:
            h.remove()
    quant_macs, bitops = 0.0, 0.0
    for mod, inp, (w_bits, a_bits) in calls:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            mod(*inp)  # still set to sub-model k
        macs = counter.get_total_flops() / 2
        quant_macs += macs
        bitops += macs * w_bits * a_bits
    return bitops + (flops / 2 - quant_macs) * 32 * 32


def measure_latency(
    model: FlexibleModel,
    image_size: int,
    device: torch.device,
    batch: int = 1,
    warmup: int = 10,
    repeats: int = 50,
) -> list[float]:
    """Median latency (ms) of each sub-model's cost forward, in eval mode."""
    was_training = model.training
    model.eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = []
    with torch.no_grad():
        for sub in model.submodels:
            for _ in range(warmup):
                model.cost_forward(x, sub.index)
            sync()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.cost_forward(x, sub.index)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            out.append(statistics.median(times))
    model.train(was_training)
    return out
