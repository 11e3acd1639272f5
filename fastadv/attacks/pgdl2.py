"""PGD (L2) with torchattacks' API:
``PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=True, eps_for_division=1e-10)``."""
import torch

from ..ops.attacks import pgdl2_step_, real_number
from .base import Attack, _check_number, _check_steps


class PGDL2(Attack):
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial
    Attacks' [https://arxiv.org/abs/1706.06083].  Distance measure: L2.

    Each step is one forward / backward and two kernels: one reduction pass
    (per-sample ``||g||^2``, ``<delta, g>``, ``||delta||^2``) and one update pass
    (the normalised gradient step, the projection on the L2 ball and the [0, 1]
    clip together).

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 1.0)
        alpha (float): step size. (Default: 0.2)
        steps (int): number of steps (0: the start point). (Default: 10)
        random_start (bool): using random initialization of delta. (Default: True)
        eps_for_division (float): added to the gradient norm. (Default: 1e-10)
        backend (str): kernels of the step: None (default), "auto", "triton", "cuda", "torch".

    Examples::
        >>> attack = fastadv.attacks.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=True)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model, eps=1.0, alpha=0.2, steps=10, random_start=True, eps_for_division=1e-10,
                 *, backend=None):
        super().__init__("PGDL2", model, backend=backend)
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.random_start = random_start
        self.eps_for_division = eps_for_division
        self.supported_mode = ["default", "targeted"]
        self._check_params()

    def _check_params(self):
        _check_number("eps", self.eps)
        _check_number("alpha", self.alpha)
        _check_number("eps_for_division", self.eps_for_division)
        _check_steps(self.steps)

    def forward(self, images, labels):
        images, labels, target_labels, layout = self._prepare(images, labels)
        if self.random_start:
            # torchattacks' start, same random numbers: a point drawn in the L2 ball
            eps = real_number("eps", self.eps)
            b = (images.shape[0],) + (1,) * (images.dim() - 1)
            delta = torch.empty_like(layout).normal_()
            n = delta.reshape(images.shape[0], -1).norm(p=2, dim=1).view(b)
            r = torch.zeros_like(n).uniform_(0, 1)
            delta *= r / n * eps
            adv = self._start(images, delta)
        else:
            adv = images  # read only; the first step writes a new tensor
        if int(self.steps) == 0:
            return adv.clone() if adv is images else adv
        for _ in range(int(self.steps)):
            grad = self._grad(adv, labels, target_labels)
            out = torch.empty_like(images) if adv is images else None
            adv = pgdl2_step_(adv, images, grad, self.alpha, self.eps, self.eps_for_division, out=out,
                              backend=self.backend)
        return adv
