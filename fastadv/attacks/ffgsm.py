"""FFGSM (Wong et al., 2020) with torchattacks' API: ``FFGSM(model, eps=8/255, alpha=10/255)``."""
import torch

from ..ops.attacks import pgd_step_
from .base import Attack, _check_number


class FFGSM(Attack):
    r"""New FGSM proposed in 'Fast is better than free: Revisiting adversarial
    training' [https://arxiv.org/abs/2001.03994].  Distance measure: Linf.

    ``adv = clip01(images + U(-eps, eps))``, then one PGD step of size ``alpha``
    (one fused kernel).  The uniform start is drawn with ``uniform_`` only
    (torchattacks also draws, and discards, a normal sample first).

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 10/255)
        backend (str): kernels of the step: None (default), "auto", "triton", "cuda", "torch".

    Examples::
        >>> attack = fastadv.attacks.FFGSM(model, eps=8/255, alpha=10/255)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model, eps=8 / 255, alpha=10 / 255, *, backend=None):
        super().__init__("FFGSM", model, backend=backend)
        self.eps = eps
        self.alpha = alpha
        self.supported_mode = ["default", "targeted"]
        self._check_params()

    def _check_params(self):
        _check_number("eps", self.eps)
        _check_number("alpha", self.alpha)

    def forward(self, images, labels):
        images, labels, target_labels = self._prepare(images, labels)
        adv = torch.empty_like(images).uniform_(-self.eps, self.eps)
        adv = torch.clamp(adv.add_(images), min=0, max=1)
        grad = self._grad(adv, labels, target_labels)
        return pgd_step_(adv, images, grad, self.alpha, self.eps, backend=self.backend)
