"""MI-FGSM (Dong et al., 2018) with torchattacks' API:
``MIFGSM(model, eps=8/255, alpha=2/255, steps=10, decay=1.0)``."""
import torch

from ..ops.attacks import mifgsm_step_
from .base import Attack, _check_number, _check_steps


class MIFGSM(Attack):
    r"""MI-FGSM in the paper 'Boosting Adversarial Attacks with Momentum'
    [https://arxiv.org/abs/1710.06081].  Distance measure: Linf.

    Each step is one forward / backward and two kernels: the per-sample L1 mean
    of the gradient, then ``momentum = grad / mean + decay * momentum`` (fp32,
    in place) fused with the sign step, the eps projection and the [0, 1] clip.
    The seed's variant (``alpha = eps / steps``) is
    ``MIFGSM(model, eps=eps, alpha=eps / steps, steps=steps)``.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of iterations (0: the images, a copy). (Default: 10)
        decay (float): momentum factor. (Default: 1.0)
        backend (str): kernels of the step: None (default), "auto", "triton", "cuda", "torch".

    Examples::
        >>> attack = fastadv.attacks.MIFGSM(model, eps=8/255, steps=10, decay=1.0)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, decay=1.0, *, backend=None):
        super().__init__("MIFGSM", model, backend=backend)
        self.eps = eps
        self.steps = steps
        self.decay = decay
        self.alpha = alpha
        self.supported_mode = ["default", "targeted"]
        self._check_params()

    def _check_params(self):
        _check_number("eps", self.eps)
        _check_number("alpha", self.alpha)
        _check_number("decay", self.decay, minimum=float("-inf"))
        _check_steps(self.steps)

    def forward(self, images, labels):
        images, labels, target_labels, _ = self._prepare(images, labels)
        # the first step writes it; float32 (the kernels' buffer), float64 for float64 images
        momentum = torch.empty_like(images, dtype=torch.float64 if images.dtype == torch.float64
                                    else torch.float32)
        adv = images  # read only; the first step writes a new tensor
        if int(self.steps) == 0:
            return images.clone()
        for step in range(int(self.steps)):
            grad = self._grad(adv, labels, target_labels)
            out = torch.empty_like(images) if adv is images else None
            adv = mifgsm_step_(adv, images, grad, momentum, self.alpha, self.eps, self.decay,
                               first=step == 0, out=out, backend=self.backend)
        return adv
