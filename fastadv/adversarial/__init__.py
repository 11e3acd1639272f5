"""Drop-in adversarial-training classes with the reference APIs."""
from .awp import AWP
from .fgm import FGM
from .pgd import PGD

__all__ = ["FGM", "PGD", "AWP"]
