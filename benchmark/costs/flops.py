"""Cost of every sub-model: multiply-adds, FLOPs, parameters and measured latency.

Conventions (named in the metric keys):
- `mmacs`: millions of multiply-accumulates of convolutions and linear layers (bias, BN,
  activations and pooling not counted); this is what the MSDNet and slimmable papers call "FLOPs".
- `mflops`: `torch.utils.flop_counter.FlopCounterMode` on the forward pass = 2 x mmacs.
  Attention (`F.scaled_dot_product_attention`) counts QK^T and AV: 2 N^2 d MACs per layer for N
  tokens and d channels (torch's `sdpa_flop_count`, here also for the CPU kernel, which the
  counter leaves out: `_count_cpu_attention`); softmax and scaling are not counted.
- For early-exit models the cost of exit k is cumulative: the trunk up to exit k plus every exit
  head up to k (the anytime-inference cost, as counted by the MSDNet reference op counter).
- `gbitops`: billions of bit-operations, sum over layers of MACs x weight bits x activation bits;
  layers that run in full precision count 32 x 32, quantized layers (modules with
  `active_bits()`) their active bit-widths. Comparable across every architecture, and the cost
  that separates the sub-models of a bit-width-switchable network.
- `params_m`: parameters used by the sub-model (cumulative incl. earlier heads for exits).
- `latency_ms`: median wall time of the same forward (eval mode, after warm-up) at the
  recorded batch size, device and thread count (1 intra-op thread on CPU unless asked
  otherwise: robust to other processes on the same cores). Sub-models are timed interleaved
  (one forward of each per round, the order rotating every round), so load from other
  processes falls on all sub-models alike instead of on whichever was being timed.
  `latency_iqr_ms` is the spread (interquartile range) of the same samples.
Counting uses a copy of the model on CPU with batch 1, in eval mode, under no_grad (the counter's
backward counts are wrong for grouped convolutions, so only forwards are counted). A model built
on the meta device (`benchmark.models.build_on_meta`) is counted there: the same numbers from
shapes alone, without parameter memory or arithmetic (how the tests count ImageNet-size tables).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from benchmark.models.base import (
    FlexibleModel,
    QuantizedLayer,
    SubNet,
    count_active_params,
    forward_hooks,
)
from benchmark.record import schema


def _count_cpu_attention() -> None:
    """Count the CPU flash-attention kernel as torch counts the GPU ones (QK^T and AV): without
    it a transformer's attention costs nothing on CPU, where every cost table is counted."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _attention(q_shape, k_shape, v_shape, *_args, out_shape=None, **_kwargs) -> int:
            return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)


_count_cpu_attention()


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
    m, x = _counting_copy(model, image_size)
    costs = [_cost(m, lambda k=sub.index: m.cost_forward(x, k), sub.name) for sub in m.submodels]
    if cache_key is not None:
        _CACHE[cache_key] = copy.deepcopy(costs)
    return costs


def width_costs(
    model: FlexibleModel, widths: list[float], names: list[str], image_size: int
) -> list[SubCost]:
    """Costs of arbitrary widths of a universally slimmable model (`forward_width`), counted
    like `count_costs` (the width spectrum's points)."""
    m, x = _counting_copy(model, image_size)
    return [_cost(m, lambda w=w: m.forward_width(x, w), n) for w, n in zip(widths, names)]


def subnet_costs(
    model: FlexibleModel, subnets: list[SubNet], names: list[str], image_size: int
) -> list[SubCost]:
    """Costs of arbitrary sub-networks of an elastic model (`caps.elastic`, `forward_subnet`),
    counted like `count_costs`: the MACs and parameters of the sub-network as deployed (an
    elastic kernel counts its k x k filters, not the transformation matrices)."""
    m, x = _counting_copy(model, image_size)
    return [_cost(m, lambda s=s: m.forward_subnet(x, s), n) for s, n in zip(subnets, names)]


def _counting_copy(model: FlexibleModel, image_size: int) -> tuple[FlexibleModel, torch.Tensor]:
    """A float32 eval-mode copy on CPU (or on meta, for a meta model) and a zero image batch of
    one, (1, 3, image_size, image_size), on the same device."""
    m = copy.deepcopy(model)
    meta = any(p.is_meta for p in m.parameters())
    m = (m if meta else m.cpu()).float().eval()
    x = torch.zeros(1, 3, image_size, image_size, device="meta" if meta else "cpu")
    return m, x


def _cost(m: FlexibleModel, run: Callable[[], object], name: str) -> SubCost:
    """MACs, FLOPs, active parameters and bit-ops of the forward `run()` (batch 1, CPU)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    flops = counter.get_total_flops()
    params = count_active_params(m, run)
    bitops = _bitops(m, run, flops)
    return SubCost(name, flops / 2e6, flops / 1e6, params / 1e6, bitops / 1e9)


def _bitops(model: FlexibleModel, run: Callable[[], object], flops: int) -> float:
    """MACs x bits of sub-model k: `QuantizedLayer`s (modules with `active_bits()`) have their
    MACs counted apart at their active bit-widths; all other MACs count 32 x 32. Quantized
    modules are found by identity (a forward hook), not by FlopCounterMode's module names, which
    depend on how the forward reaches a module (e.g. through IndependentModel's members)."""
    calls: list[tuple[torch.nn.Module, tuple, tuple[int, int]]] = []
    quantized = [mod for mod in model.modules() if isinstance(mod, QuantizedLayer)]
    with (
        forward_hooks(
            quantized, lambda mod, inp, _out: calls.append((mod, inp, mod.active_bits()))
        ),
        torch.no_grad(),
    ):
        run()
    quant_macs, bitops = 0.0, 0.0
    for mod, inp, (w_bits, a_bits) in calls:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            mod(*inp)  # still set to the sub-model `run` ran
        macs = counter.get_total_flops() / 2
        quant_macs += macs
        bitops += macs * w_bits * a_bits
    return bitops + (flops / 2 - quant_macs) * 32 * 32


@dataclass
class LatencyProfile:
    """Latency of every sub-model (ms), from interleaved timing rounds (see `latency_profile`).

    `median_ms[k]` is the robust statistic (what `latency_ms/<sub>` records), `iqr_ms[k]` its
    spread (75th minus 25th percentile of the samples).
    """

    names: list[str]
    median_ms: list[float]
    iqr_ms: list[float]
    repeats: int
    warmup: int
    batch: int
    device: str
    threads: int

    def method(self) -> str:
        """How it was measured, in words (the `flexbench.latency_method` tag)."""
        return (
            f"median and IQR of {self.repeats} interleaved rounds (sub-model order rotating) after "
            f"{self.warmup} warm-up rounds; batch {self.batch}, {self.device}, "
            f"{self.threads} thread" + ("" if self.threads == 1 else "s")
        )

    def relative_spread(self) -> float:
        """Largest IQR / median over sub-models: above ~0.25 the machine was busy."""
        return max((q / m for q, m in zip(self.iqr_ms, self.median_ms) if m > 0), default=0.0)

    def metrics(self) -> dict[str, float]:
        """`latency_ms/<sub>` (median) and `latency_iqr_ms/<sub>` for the MLflow record."""
        return schema.parent_metrics(self.rows(), "")

    def rows(self) -> list[dict[str, float | str]]:
        """Per sub-model: `name`, `latency_ms` (median) and `latency_iqr_ms` (schema fields)."""
        return [
            {"name": n, "latency_ms": m, "latency_iqr_ms": q}
            for n, m, q in zip(self.names, self.median_ms, self.iqr_ms)
        ]

    def tags(self) -> dict[str, str]:
        """`flexbench.latency_method` and `flexbench.latency_threads` for the MLflow record."""
        return {
            schema.LATENCY_METHOD: self.method(),
            schema.LATENCY_THREADS: str(self.threads),
        }


@contextmanager
def timing_threads(device: torch.device, threads: int | None = 1) -> Iterator[int]:
    """While the block runs, CPU operators use `threads` intra-op threads (None: the current
    setting; no change on other devices); yields the thread count in effect. One thread is the
    default of every timing: see `latency_profile`."""
    prev = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)


def latency_profile(
    model: FlexibleModel,
    image_size: int,
    device: torch.device,
    batch: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = 1,
) -> LatencyProfile:
    """Time each sub-model's cost forward (eval mode, no_grad) in `repeats` interleaved rounds.

    Round r runs every sub-model once, starting at sub-model r mod K, so a burst of load from
    another process slows a few samples of every sub-model rather than all samples of one;
    the median then ignores it. Timing blocks of one sub-model at a time (as before) let a
    loaded machine report exit2 slower than exit7 although exit7 runs exit2's whole trunk.
    On CPU the forwards run on `threads` intra-op threads (None: the current setting): with
    several threads, one thread descheduled by another process stalls every operator, which
    on a busy 2-core machine inflated batch-1 latencies ~10-100x and erratically.
    """
    was_training = model.training
    model.eval()
    conv_w = next((p for p in model.parameters() if p.dim() == 4), None)
    nhwc = conv_w is not None and conv_w.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last if nhwc else torch.contiguous_format
    )  # the layout the model's weights are in, as in training
    subs = [s.index for s in model.submodels]
    samples: dict[int, list[float]] = {k: [] for k in subs}
    try:
        with timing_threads(device, threads) as used_threads, torch.no_grad():
            for r in range(-warmup, repeats):  # r < 0: warm-up rounds, not recorded
                shift = r % len(subs)
                for k in subs[shift:] + subs[:shift]:
                    t0 = time.perf_counter()
                    model.cost_forward(x, k)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if r >= 0:
                        samples[k].append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    q1, med, q3 = np.percentile([samples[k] for k in subs], [25, 50, 75], axis=1).tolist()
    return LatencyProfile(
        names=[s.name for s in model.submodels],
        median_ms=med,
        iqr_ms=[b - a for a, b in zip(q1, q3)],
        repeats=repeats,
        warmup=warmup,
        batch=batch,
        device=str(device),
        threads=used_threads,
    )
