"""PGD (L-inf) with torchattacks' API:
``PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True)``."""
import torch

from ..ops.attacks import pgd_step_, real_number
from .base import Attack, _check_number, _check_steps


class PGD(Attack):
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial
    Attacks' [https://arxiv.org/abs/1706.06083].  Distance measure: Linf.

    Each step is one forward / backward and one fused kernel:
    ``adv = clip01(images + clamp(adv + alpha*sign(grad) - images, -eps, eps))``.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps (0: the start point). (Default: 10)
        random_start (bool): using random initialization of delta. (Default: True)
        backend (str): kernels of the step: None (default), "auto", "triton", "cuda", "torch".

    Shape:
        - images: :math:`(N, C, H, W)` (any ``(N, ...)``), in [0, 1].
        - labels: :math:`(N)` class indices.
        - output: like images.

    Examples::
        >>> attack = fastadv.attacks.PGD(model, eps=8/255, alpha=1/255, steps=10, random_start=True)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, *, backend=None):
        super().__init__("PGD", model, backend=backend)
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.random_start = random_start
        self.supported_mode = ["default", "targeted"]
        self._check_params()

    def _check_params(self):
        _check_number("eps", self.eps)
        _check_number("alpha", self.alpha)
        _check_steps(self.steps)

    def forward(self, images, labels):
        images, labels, target_labels, layout = self._prepare(images, labels)
        eps = real_number("eps", self.eps)
        if self.random_start:
            # torchattacks' start, same random numbers: clip01(images + U(-eps, eps))
            adv = self._start(images, torch.empty_like(layout).uniform_(-eps, eps))
        else:
            adv = images  # read only; the first step writes a new tensor
        if int(self.steps) == 0:
            return adv.clone() if adv is images else adv
        for _ in range(int(self.steps)):
            grad = self._grad(adv, labels, target_labels)
            out = torch.empty_like(images) if adv is images else None
            adv = pgd_step_(adv, images, grad, self.alpha, self.eps, out=out, backend=self.backend)
        return adv
