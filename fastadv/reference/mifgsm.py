"""MI-FGSM of seed ``002_a8eb003f55ca757d.txt``, written from its math (it has
no installable peer: tests/test_attacks.py checks fastadv.attacks.MIFGSM
against it).  torchattacks' attacks, MI-FGSM included, are in
:mod:`fastadv.reference.attacks`.

``mifgsm(model, x, y, eps, steps=10, decay=1.0, loss_fn=F.cross_entropy)``:
``alpha = eps / steps``, ``g_0 = 0``, ``g_{t+1} = decay * g_t + grad /
||grad||_1`` (per-sample L1 mean, as torchattacks),
``x_{t+1} = x_t + alpha * sign(g_{t+1})``, projected to the L-inf eps ball
around ``x`` and to [0, 1]; any ``loss_fn(logits, y)``.  Returns detached
adversarial images.

``mifgsm`` is not re-exported by ``fastadv.reference`` (it would shadow this
submodule): import it from here.
"""
import torch
import torch.nn.functional as F

from .attacks import _grad, _linf_project


def mifgsm(model, x, y, eps, steps=10, decay=1.0, loss_fn=F.cross_entropy):
    x = x.detach()
    alpha = eps / steps
    dims = tuple(range(1, x.dim()))
    g = torch.zeros_like(x)
    adv = x.clone()
    for _ in range(steps):
        grad = _grad(model, adv, y, False, None, loss_fn)
        g = decay * g + grad / torch.mean(torch.abs(grad), dim=dims, keepdim=True)
        adv = _linf_project(x, adv + alpha * g.sign(), eps)
    return adv
