"""Drop-in adversarial-training classes with the reference APIs."""
from .fgm import FGM

__all__ = ["FGM"]
