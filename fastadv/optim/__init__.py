"""Optimizers with the reference APIs on fused kernels."""
from .sam import SAM

__all__ = ["SAM"]
