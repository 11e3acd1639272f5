"""The input-space attacks of torchattacks (FGSM, PGD, PGD-L2, MI-FGSM, FFGSM),
written from their math: the reference of ``fastadv.attacks`` /
``fastadv.ops.attacks`` (tests/test_reference.py checks them; fastadv.attacks
itself is tested against torchattacks 3.5.1).  Seed 002's MI-FGSM, which has
no installable peer, is :func:`fastadv.reference.mifgsm.mifgsm`.

Images live in ``[0, 1]``; ``B`` is the batch (first) dimension and per-sample
reductions run over all other dimensions (torchattacks assumes NCHW; any rank
works here).  ``g`` below is the gradient of the cost with respect to the
current adversarial input, the cost being ``CE(model(x), y)``, or
``-CE(model(x), target_labels)`` when ``targeted`` (target labels are given by
the caller; torchattacks derives them from a mapping).  Each returns detached
adversarial images; the model's train/eval mode is left to the caller.

* ``fgsm``:   ``clip01(x + eps * sign(g))``.
* ``pgd``:    optional start ``clip01(x + U(-eps, eps))``; ``steps`` times
  ``x' <- clip01(x + clamp(x' + alpha * sign(g) - x, -eps, eps))``.
* ``pgdl2``:  optional start ``x + delta``, ``delta = eps * u * z / ||z||``
  (``z ~ N(0, I)``, ``u ~ U(0, 1)`` per sample), clipped to [0, 1]; ``steps``
  times ``x' <- x' + alpha * g / (||g|| + eps_for_division)``, then
  ``delta = x' - x`` scaled by ``min(1, eps / ||delta||)`` and
  ``x' <- clip01(x + delta)``.
* ``mifgsm_torchattacks``: ``m <- g / mean(|g|) + decay * m`` (per-sample L1
  mean), ``x' <- clip01(x + clamp(x' + alpha * sign(m) - x, -eps, eps))``.
  A sample whose gradient is all zero gives NaN (0/0), as in torchattacks.
* ``ffgsm``:  ``x' = clip01(x + U(-eps, eps))``, then one step of size
  ``alpha`` from ``x'``, projected to the eps ball around ``x``, clipped.
  The start is drawn as torchattacks draws it, ``randn_like(x).uniform_``
  (a normal draw overwritten by the uniform one), so the generator advances
  the same way.

``fgsm`` and ``pgd`` are not re-exported by ``fastadv.reference`` (they would
shadow its submodules of the same names): import them from here.
"""
import torch
import torch.nn.functional as F


def _bshape(x):
    return (x.shape[0],) + (1,) * (x.dim() - 1)


def _grad(model, x, labels, targeted, target_labels, loss_fn=F.cross_entropy):
    x = x.detach().requires_grad_()
    if targeted:
        if target_labels is None:
            raise ValueError("targeted=True needs target_labels")
        cost = -loss_fn(model(x), target_labels)
    else:
        cost = loss_fn(model(x), labels)
    return torch.autograd.grad(cost, x)[0]


def _linf_project(x, adv, eps):
    return torch.clamp(x + torch.clamp(adv - x, min=-eps, max=eps), min=0, max=1).detach()


def fgsm(model, images, labels, eps=8 / 255, targeted=False, target_labels=None):
    x = images.detach()
    g = _grad(model, x, labels, targeted, target_labels)
    return torch.clamp(x + eps * g.sign(), min=0, max=1).detach()


def pgd(model, images, labels, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True,
        targeted=False, target_labels=None):
    x = images.detach()
    adv = x.clone()
    if random_start:
        adv = torch.clamp(adv + torch.empty_like(adv).uniform_(-eps, eps), min=0, max=1)
    for _ in range(steps):
        g = _grad(model, adv, labels, targeted, target_labels)
        adv = _linf_project(x, adv + alpha * g.sign(), eps)
    return adv


def pgdl2(model, images, labels, eps=1.0, alpha=0.2, steps=10, random_start=True,
          eps_for_division=1e-10, targeted=False, target_labels=None):
    x = images.detach()
    b = _bshape(x)
    adv = x.clone()
    if random_start:
        z = torch.empty_like(adv).normal_()
        n = z.flatten(1).norm(p=2, dim=1).view(b)
        u = torch.zeros_like(n).uniform_(0, 1)
        adv = torch.clamp(adv + z * (u / n * eps), min=0, max=1)
    for _ in range(steps):
        g = _grad(model, adv, labels, targeted, target_labels)
        g_norm = g.flatten(1).norm(p=2, dim=1) + eps_for_division
        adv = adv + alpha * (g / g_norm.view(b))
        delta = adv - x
        d_norm = delta.flatten(1).norm(p=2, dim=1)
        factor = torch.min(eps / d_norm, torch.ones_like(d_norm))
        adv = torch.clamp(x + delta * factor.view(b), min=0, max=1).detach()
    return adv


def _momentum_attack(model, x, labels, eps, alpha, steps, decay, targeted, target_labels,
                     loss_fn=F.cross_entropy):
    x = x.detach()
    dims = tuple(range(1, x.dim()))
    momentum = torch.zeros_like(x)
    adv = x.clone()
    for _ in range(steps):
        g = _grad(model, adv, labels, targeted, target_labels, loss_fn)
        momentum = g / torch.mean(torch.abs(g), dim=dims, keepdim=True) + momentum * decay
        adv = _linf_project(x, adv + alpha * momentum.sign(), eps)
    return adv


def mifgsm_torchattacks(model, images, labels, eps=8 / 255, alpha=2 / 255, steps=10, decay=1.0,
                        targeted=False, target_labels=None):
    return _momentum_attack(model, images, labels, eps, alpha, steps, decay, targeted,
                            target_labels)


def ffgsm(model, images, labels, eps=8 / 255, alpha=10 / 255, targeted=False, target_labels=None):
    x = images.detach()
    adv = torch.clamp(x + torch.randn_like(x).uniform_(-eps, eps), min=0, max=1)
    g = _grad(model, adv, labels, targeted, target_labels)
    return _linf_project(x, adv + alpha * g.sign(), eps)

