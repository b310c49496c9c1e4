"""Latency under load: sub-models are timed interleaved, so a burst of load from another process
cannot reorder them; the record says how latency was measured."""

from __future__ import annotations

import time

import pytest
import torch

from benchmark.costs.flops import latency_profile
from benchmark.models.base import Capabilities, FlexibleModel, SubModel

BASE_MS = (2.0, 6.0, 10.0)  # exit k's cost includes every earlier exit's, as in MSDNet
BURST_MS = 40.0


class BusyMachine:
    """Counts forwards; those in [start, start + length) run while another process holds the
    cores, so they take `BURST_MS` longer."""

    def __init__(self, start: int, length: int) -> None:
        self.calls, self.start, self.length = 0, start, length

    def extra_s(self) -> float:
        busy = self.start <= self.calls < self.start + self.length
        self.calls += 1
        return BURST_MS / 1e3 if busy else 0.0


class TimedExits(FlexibleModel):
    """Three exits whose forward takes BASE_MS[k] (sleeping, so the test loads no core)."""

    caps = Capabilities(("exit",), early_exit=True)

    def __init__(self, machine: BusyMachine) -> None:
        super().__init__()
        self.submodels = [SubModel(k, f"exit{k + 1}") for k in range(len(BASE_MS))]
        self.machine = machine

    def forward_sub(self, x: torch.Tensor, k: int) -> torch.Tensor:
        time.sleep(BASE_MS[k] / 1e3 + self.machine.extra_s())
        return x.new_zeros(x.shape[0], 10)


WARMUP, REPEATS = 1, 9
TOTAL_CALLS = (WARMUP + REPEATS) * len(BASE_MS)


@pytest.mark.parametrize("start", range(0, TOTAL_CALLS - REPEATS + 1, 4))
def test_a_burst_of_load_does_not_reorder_sub_models(start):
    """A burst as long as one sub-model's repeats, anywhere in the measurement."""
    model = TimedExits(BusyMachine(start, REPEATS))
    lat = latency_profile(model, 8, torch.device("cpu"), warmup=WARMUP, repeats=REPEATS)
    assert model.machine.calls == TOTAL_CALLS
    assert lat.median_ms == sorted(lat.median_ms), lat.median_ms
    for ms, base in zip(lat.median_ms, BASE_MS):
        assert base <= ms < base + BURST_MS / 2  # the burst is not in the median
    quiet = latency_profile(TimedExits(BusyMachine(0, 0)), 8, torch.device("cpu"), 1, 0, 3)
    assert quiet.median_ms == pytest.approx(list(BASE_MS), abs=BURST_MS / 4)


def test_latency_record_says_how_it_was_measured():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = TimedExits(BusyMachine(6, 3))  # three slow samples: they widen the spread
        lat = latency_profile(model, 8, torch.device("cpu"), warmup=1, repeats=8)
        assert lat.threads == 1  # batch-1 CPU latency runs on one thread by default
        assert torch.get_num_threads() == 2 and model.training  # settings are restored
        assert latency_profile(model, 8, torch.device("cpu"), 1, 0, 1, threads=None).threads == 2
    finally:
        torch.set_num_threads(before)
    metrics, tags = lat.metrics(), lat.tags()
    keys = {f"{p}/exit{k}" for p in ("latency_ms", "latency_iqr_ms") for k in (1, 2, 3)}
    assert set(metrics) == keys
    assert metrics["latency_ms/exit3"] == lat.median_ms[2]
    assert all(metrics[f"latency_iqr_ms/exit{k}"] >= 0 for k in (1, 2, 3))
    assert tags["flexbench.latency_threads"] == "1"
    method = tags["flexbench.latency_method"]
    assert "median" in method and "8 interleaved rounds" in method and "1 thread" in method
