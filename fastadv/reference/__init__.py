"""The seed algorithms in plain PyTorch: the oracle for tests and the baseline
for benchmarks.  Each keeps its seed's constructor, methods and call protocol."""
from .fgm import FGM

__all__ = ["FGM"]
