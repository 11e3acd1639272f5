"""FGSM (Goodfellow et al., 2015) with torchattacks' API: ``FGSM(model, eps=8/255)``."""
import torch

from ..ops.attacks import fgsm_step_
from .base import Attack, _check_number


class FGSM(Attack):
    r"""FGSM in the paper 'Explaining and harnessing adversarial examples'
    [https://arxiv.org/abs/1412.6572].  Distance measure: Linf.

    ``adv = clip01(images + eps * sign(grad))``: one forward / backward and one
    fused kernel (the step and the clip).

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        backend (str): kernels of the step: None (default), "auto", "triton", "cuda", "torch".

    Shape:
        - images: :math:`(N, C, H, W)` (any ``(N, ...)``), in [0, 1].
        - labels: :math:`(N)` class indices.
        - output: like images.

    Examples::
        >>> attack = fastadv.attacks.FGSM(model, eps=8/255)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model, eps=8 / 255, *, backend=None):
        super().__init__("FGSM", model, backend=backend)
        self.eps = eps
        self.supported_mode = ["default", "targeted"]
        self._check_params()

    def _check_params(self):
        _check_number("eps", self.eps)

    def forward(self, images, labels):
        images, labels, target_labels, _ = self._prepare(images, labels)
        grad = self._grad(images, labels, target_labels)
        return fgsm_step_(images, grad, self.eps, out=torch.empty_like(images), backend=self.backend)
