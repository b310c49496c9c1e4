"""Which fast-path settings a cell runs with on its device, and the tags that record them.

Three settings change how fast a step runs but not what it computes (up to rounding):

- memory format: `channels_last` (NHWC) or `contiguous` (NCHW). Each architecture declares the
  one that is fastest for it (`register_arch(memory_format=...)`); `runtime.memory_format`
  overrides it (docs/performance.md has the side-by-side measurements behind each default).
- bf16 autocast (`runtime.amp`): `auto` uses it where the device computes bf16 natively (CUDA
  with bf16 support; a CPU with AVX-512 BF16 or AMX), `true` forces it (emulated, slower, on
  other CPUs: for tests), `false` keeps fp32.
- `torch.compile` (`runtime.compile`): off unless asked (see docs/performance.md for when its
  compile time pays back).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from benchmark.record import schema

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

# One (architecture, method) per family of flexible network, each exercising its family's step
# shape and loss terms: what the speed checks (tests/test_speed.py, scripts/gpu_check.py) and
# the per-family table of docs/performance.md run.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("msdnet", "joint"),
    ("slimmable_mobilenet_v1", "ipkd_ta"),
    ("us_mobilenet_v1", "ipkd_ta"),  # fixed widths: the plain loop trains the same ones
    ("ddnn_resnet", "ekd"),
    ("switchable_precision_resnet", "multi_teacher"),
    ("saliency_vgg", "hsd"),
    ("byot_resnet", "byot"),
    ("flex_vit", "ipkd_ta"),  # attention through scaled_dot_product_attention (fused on GPU)
    # the elastic layers on the named sub-networks, one forward each: ofa_ps's drawn
    # sub-networks have no plain-loop counterpart (nor a step without the step's generator)
    ("ofa_mobilenet_v3", "ipkd"),
)


@dataclass(frozen=True)
class Speed:
    """The settings a cell trains and evaluates with: bf16 autocast on its device type
    (`cpu`, `cuda`), torch.compile, and the memory format of its weights and input batches (a
    key of MEMORY_FORMATS). The defaults are plain fp32 eager NCHW on CPU."""

    amp: bool = False
    compile: bool = False
    memory_format: str = "contiguous"
    device_type: str = "cpu"

    def autocast(self) -> torch.autocast:
        """The one autocast of a cell's steps and evaluations: bf16 when `amp`, else off."""
        return torch.autocast(self.device_type, torch.bfloat16, enabled=self.amp)

    @property
    def torch_format(self) -> torch.memory_format:
        return MEMORY_FORMATS[self.memory_format]

    def tags(self) -> dict[str, str]:
        """MLflow tags saying which settings were used (docs/mlflow-schema.md)."""
        return {
            schema.AMP: "bf16" if self.amp else "fp32",
            schema.COMPILE: str(self.compile).lower(),
            schema.MEMORY_FORMAT: self.memory_format,
            schema.CPU_CAPABILITY: cpu_capability(),
        }


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no native bf16 is assumed
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


@cache
def cpu_capability() -> str:
    """The CPU's vector ISA as torch dispatches it (e.g. AVX2, AVX512), plus `+bf16` / `+amx`
    where the CPU has native bf16 dot products (avx512_bf16) or AMX tiles (amx_bf16)."""
    cap = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if "avx512_bf16" in flags:
        cap += "+bf16"
    if "amx_bf16" in flags:
        cap += "+amx"
    return cap


def native_bf16(device: torch.device) -> bool:
    """True when bf16 matmuls/convs run natively (faster than fp32) on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cap = cpu_capability()
        return ("+bf16" in cap or "+amx" in cap) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def choose(cfg: dict[str, Any], device: torch.device) -> Speed:
    """The settings for a resolved cell config on `device`: its `runtime` section, where `auto`
    defers to the device (bf16) and to the architecture's declared memory format."""
    from benchmark.models import ARCHS

    r = cfg["runtime"]
    amp = native_bf16(device) if r["amp"] == "auto" else bool(r["amp"])
    fmt = r.get("memory_format", "auto")
    if fmt == "auto":
        fmt = ARCHS.get(cfg["arch"]["name"]).memory_format
    return Speed(amp, bool(r["compile"]), fmt, device.type)
