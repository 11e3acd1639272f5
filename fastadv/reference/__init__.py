"""The seed algorithms in plain PyTorch: the oracle for tests and the baseline
for benchmarks.  Each keeps its seed's constructor, methods and call protocol.

The image attacks: torchattacks' in ``fastadv.reference.attacks`` (``fgsm``
and ``pgd`` are not re-exported here: those names are also the submodules
``fgsm`` and ``pgd`` of this package), seed 002's MI-FGSM in
``fastadv.reference.mifgsm.mifgsm`` (not re-exported either: the submodule's
name).
"""
from .awp import AWP
from .dp import DPOptimizer, clip_and_noise
from .fgm import FGM
from .fgsm import adversarial_train_step, fgsm_perturb
from .attacks import ffgsm, mifgsm_torchattacks, pgdl2
from .noise import GaussianNoise, add_gaussian_noise, noisy_token_ids, weight_noise
from .pgd import PGD
from .sam import SAM
from .ema import EMA, swa_average

__all__ = [
    "FGM", "PGD", "AWP", "SAM", "EMA", "swa_average",
    "adversarial_train_step", "fgsm_perturb",
    "mifgsm_torchattacks", "pgdl2", "ffgsm",
    "DPOptimizer", "clip_and_noise",
    "add_gaussian_noise", "noisy_token_ids", "GaussianNoise", "weight_noise",
]
