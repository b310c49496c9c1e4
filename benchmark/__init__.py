"""flexbench: train and compare training methods for flexible neural networks."""

from benchmark.moved import install as _install_moved

__version__ = "0.1.0"

_install_moved()  # old flat module paths (benchmark.flops, ...) stay importable
