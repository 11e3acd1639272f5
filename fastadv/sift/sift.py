"""SiFT (scale-invariant fine-tuning, DeBERTa) with DeBERTa's API on fused kernels.

The math is DeBERTa's (``DeBERTa/sift/sift.py``; plain-PyTorch form in
``fastadv.reference.sift``):

* normal mode: the layer returns ``x_hat = LayerNorm(x)`` (eps 1e-7, no
  affine; PyTorch's layer norm, which autograd needs here) and keeps it;
* first adversarial forward: ``delta = clamp(N(0, ip^2), -2 ip, 2 ip)`` and
  ``x_hat + delta`` in **one** kernel pass (noise drawn in the kernel);
* ``update_delta``: ``delta += lr * g / (1e-6 + max_token |g|)`` unless
  ``||g||`` is NaN or inf, and the new ``x_hat + delta``: a row pass, a
  one-program norm, one element-wise pass; the NaN / inf test is made on the
  device (DeBERTa reads the norm on the host: a sync per step);
* ``AdversarialLearner.loss``: DeBERTa's protocol, symmetric KL.

The adversarial kernels read the stored ``x_hat``: the same bytes as
normalising the raw input again, and DeBERTa's values bit for bit.

Differences from DeBERTa, none in the math: each hooked module gets its own
layer (DeBERTa's hook closure late-binds every hook to the last layer);
``update_delta`` returns a 0-dim bool device tensor (truthy like DeBERTa's
bool, but reading it syncs; a missing gradient returns ``False``);
``loss`` restores ``requires_grad`` and normal mode also when ``logits_fn``
raises; ``backend=`` and ``generator=`` keyword arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import check_name
from ..ops import sift as _ops
from ..ops._dist import check_not_static_graph

__all__ = ["PerturbationLayer", "AdversarialLearner", "hook_sift_layer", "symmetric_kl", "kl", "mse",
           "perturbation_loss_fns"]


class _Perturbed(torch.autograd.Function):
    """``x_hat + delta`` computed by ``compute()`` (the registered op
    ``fastadv::sift_init_`` / ``sift_update_``, which writes ``delta`` in the
    same pass); the gradient w.r.t. ``delta`` (fp32) is the incoming gradient
    in fp32, as for ``(x_hat.float() + delta).to(x_hat.dtype)``.  The link is
    made here rather than by ``register_autograd`` because ``torch.library``
    takes no autograd formula for an op that mutates an input."""

    @staticmethod
    def forward(ctx, delta, compute):
        return compute()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.float32), None


class PerturbationLayer(nn.Module):
    """DeBERTa's perturbation layer (same constructor, attributes and methods)."""

    def __init__(self, hidden_size, learning_rate=1e-4, init_perturbation=1e-2, *,
                 backend: str | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.learning_rate = learning_rate
        self.init_perturbation = init_perturbation
        self.delta = None
        self.LayerNorm = nn.LayerNorm(hidden_size, 1e-7, elementwise_affine=False)
        self.adversarial_mode = False
        self.backend = check_name(backend.lower()) if backend else None
        self.generator = generator

    def adversarial_(self, adversarial=True):
        self.adversarial_mode = adversarial
        if not adversarial:
            self.delta = None

    def forward(self, input):
        if not self.adversarial_mode:
            self.input = self.LayerNorm(input)
            return self.input
        if self.delta is None:
            self.update_delta(requires_grad=True)
        return self.perturbated_input

    def update_delta(self, requires_grad=False):
        if not self.adversarial_mode:
            return True
        x_hat = self.input.detach()
        result = {"ok": True}
        if self.delta is None:
            delta = torch.empty(x_hat.shape, dtype=torch.float32, device=x_hat.device)

            def compute():
                return _ops.sift_init(x_hat, self.init_perturbation, out=delta, generator=self.generator,
                                      backend=self.backend)[1]
        else:
            grad = self.delta.grad
            self.delta.grad = None
            if grad is None:  # the loss did not reach delta (DeBERTa fails on grad.norm())
                return False
            delta = self.delta.detach()  # the same storage, updated in place by the kernel

            def compute():
                pert, result["ok"] = _ops.sift_update_(x_hat, delta, grad, self.learning_rate,
                                                       backend=self.backend)
                return pert
        self.delta = delta.requires_grad_(requires_grad)
        self.perturbated_input = _Perturbed.apply(self.delta, compute)
        return result["ok"]


def _hook_for(layer: PerturbationLayer):
    def adv_hook(module, inputs):  # the name DeBERTa looks for when re-hooking
        return layer(inputs[0])
    return adv_hook


def hook_sift_layer(model, hidden_size, learning_rate=1e-4, init_perturbation=1e-2,
                    target_module="embeddings.LayerNorm", *, backend: str | None = None,
                    generator: torch.Generator | None = None):
    """Insert a :class:`PerturbationLayer` before every module whose name contains
    ``target_module`` (or before the module given), as a forward pre-hook
    replacing any earlier SiFT hook there.  Returns the layers."""
    if isinstance(target_module, str):
        modules = [m for n, m in model.named_modules() if target_module in n]
    else:
        if not isinstance(target_module, nn.Module):
            raise TypeError(f"{type(target_module)} is not an instance of torch.nn.Module")
        modules = [target_module]
    layers = []
    for m in modules:
        layer = PerturbationLayer(hidden_size, learning_rate, init_perturbation, backend=backend,
                                  generator=generator)
        for h in [h for h, fn in m._forward_pre_hooks.items() if getattr(fn, "__name__", "") == "adv_hook"]:
            del m._forward_pre_hooks[h]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_pre_hooks_always_called"):
                getattr(m, extra, {}).pop(h, None)
        m.register_forward_pre_hook(_hook_for(layer))
        layers.append(layer)
    return layers


def symmetric_kl(logits, target):
    """Per row ``CE(p_t, log p_s) + CE(p_s, log p_t)`` in fp32, probabilities detached (DeBERTa)."""
    s = logits.reshape(-1, logits.size(-1)).float()
    t = target.reshape(-1, target.size(-1)).float()
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return -(log_t.exp().detach() * log_s).sum(-1) - (log_s.exp().detach() * log_t).sum(-1)


def kl(logits, target):
    """Per row ``CE(softmax(target), log_softmax(logits))`` in fp32 (DeBERTa's ``kl``)."""
    s = logits.reshape(-1, logits.size(-1)).float()
    t = target.reshape(-1, target.size(-1)).float()
    return -(F.log_softmax(t.detach(), -1).exp() * F.log_softmax(s, -1)).sum(-1)


def mse(logits, target):
    return F.mse_loss(logits.reshape(-1).float(), target.reshape(-1).float())


perturbation_loss_fns = {"symmetric-kl": symmetric_kl, "kl": kl, "mse": mse}


class AdversarialLearner:
    """DeBERTa's adversarial learner: ``loss = loss + adv.loss(logits, logits_fn, **data)``."""

    def __init__(self, model, adv_modules=None):
        check_not_static_graph(model, "SiFT's AdversarialLearner")
        if adv_modules is None:
            adv_modules = [m for m in model.modules() if isinstance(m, PerturbationLayer)]
        self.adv_modules = adv_modules
        self.parameters = [p for p in model.parameters()]
        self.model = model

    def loss(self, target, logits_fn, loss_fn="symmetric-kl", *wargs, **kwargs):
        """The adversarial loss: one perturbation step on the SiFT layers, then the
        symmetric KL between the perturbed logits and ``target`` (mean over rows)."""
        self.prepare()
        try:
            if isinstance(loss_fn, str):
                loss_fn = perturbation_loss_fns[loss_fn]
            pert_logits = logits_fn(self.model, *wargs, **kwargs)
            pert_loss = loss_fn(pert_logits, target.detach()).sum()
            pert_loss.backward()
            for m in self.adv_modules:
                m.update_delta(True)
            for r, p in zip(self.prev, self.parameters):
                p.requires_grad_(r)
            pert_logits = logits_fn(self.model, *wargs, **kwargs)
            pert_loss = symmetric_kl(pert_logits, target)
        finally:
            self.cleanup()
        return pert_loss.mean()

    def prepare(self):
        self.prev = [p.requires_grad for p in self.parameters]
        for p in self.parameters:
            p.requires_grad_(False)
        for m in self.adv_modules:
            m.adversarial_(True)

    def cleanup(self):
        for r, p in zip(self.prev, self.parameters):
            p.requires_grad_(r)
        for m in self.adv_modules:
            m.adversarial_(False)
