"""diffnas: differentiable neural architecture search (DARTS and its family) in PyTorch."""

__version__ = "0.1.0"
