"""FFGSM (Wong et al., 2020) with torchattacks' API: ``FFGSM(model, eps=8/255, alpha=10/255)``."""
import torch

from ..ops.attacks import pgd_step_, real_number
from .base import Attack, _check_number


class FFGSM(Attack):
    r"""New FGSM proposed in 'Fast is better than free: Revisiting adversarial
    training' [https://arxiv.org/abs/2001.03994].  Distance measure: Linf.

    ``adv = clip01(images + U(-eps, eps))``, then one PGD step of size ``alpha``
    (one fused kernel).  The uniform start is drawn as torchattacks draws it,
    ``randn_like(images).uniform_(-eps, eps)`` (a normal draw, overwritten by
    the uniform one): the generator advances the same way, so a seeded run
    gives torchattacks' start and every later random number.

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
        images, labels, target_labels, layout = self._prepare(images, labels)
        eps = real_number("eps", self.eps)
        start = torch.randn_like(layout).uniform_(-eps, eps)
        adv = self._start(images, start)
        grad = self._grad(adv, labels, target_labels)
        return pgd_step_(adv, images, grad, self.alpha, self.eps, backend=self.backend)
