"""flexbench: train and compare training methods for flexible neural networks."""

__version__ = "0.1.0"
