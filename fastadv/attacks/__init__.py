"""Input-space attacks with torchattacks' API, each step one fused kernel.

Swap ``import torchattacks`` for ``from fastadv import attacks as torchattacks``
(or use ``fastadv.attacks.PGD`` ...): same classes, arguments, defaults, modes
and call ``atk(images, labels)``.  See docs/attacks.md.
"""
from .base import Attack
from .ffgsm import FFGSM
from .fgsm import FGSM
from .mifgsm import MIFGSM
from .pgd import PGD
from .pgdl2 import PGDL2

__all__ = ["Attack", "FGSM", "PGD", "PGDL2", "MIFGSM", "FFGSM"]
