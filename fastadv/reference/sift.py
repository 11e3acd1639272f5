"""SiFT, scale-invariant fine-tuning (DeBERTa, He et al. 2021; seed
``002_a8eb003f55ca757d.txt``), in plain PyTorch, written from the math of
DeBERTa's ``DeBERTa/sift/sift.py`` with the same API and protocol:

* ``PerturbationLayer(hidden_size, learning_rate=1e-4, init_perturbation=1e-2)``
  sits before a target module (a forward pre-hook).  Normal mode: it returns
  ``x_hat = LayerNorm(x)`` (eps 1e-7, no affine) and remembers it.
  Adversarial mode: it returns ``x_hat.detach() + delta`` (fp32 add, cast to
  ``x_hat``'s dtype), where
  - first: ``delta = clamp(N(0, ip^2), -2 ip, 2 ip)`` (fp32, requires grad);
  - ``update_delta``: ``g = delta.grad``; if ``||g||`` is NaN or inf nothing
    changes (returns False); else
    ``delta <- delta + lr * g / (1e-6 + max_{last dim} |g|)``.
* ``AdversarialLearner(model, adv_modules).loss(target, logits_fn,
  loss_fn='symmetric-kl', *args, **kwargs)``: freeze every parameter, turn
  adversarial mode on, ``logits_fn(model, ...)`` with the initial delta,
  ``loss_fn(logits, target.detach()).sum().backward()`` (grad reaches delta
  only), one ``update_delta``, unfreeze, ``logits_fn`` again, return
  ``symmetric_kl(logits, target).mean()`` (DeBERTa uses the symmetric KL here
  whatever ``loss_fn`` is), normal mode again.
* ``symmetric_kl(p, q) = CE(softmax(q).detach(), log_softmax(p)) +
  CE(softmax(p).detach(), log_softmax(q))`` per row, fp32.

Differences from DeBERTa's file, none of them in the math: every hooked module
gets its own layer (DeBERTa's hook closure late-binds to the last layer
created), and ``initial_delta`` is a method so tests can inject a draw.
The norm test reads the norm on the host (a sync), as DeBERTa does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerturbationLayer(nn.Module):
    def __init__(self, hidden_size, learning_rate=1e-4, init_perturbation=1e-2):
        super().__init__()
        self.learning_rate = learning_rate
        self.init_perturbation = init_perturbation
        self.delta = None
        self.LayerNorm = nn.LayerNorm(hidden_size, 1e-7, elementwise_affine=False)
        self.adversarial_mode = False

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

    def initial_delta(self):
        ip = self.init_perturbation
        noise = torch.empty_like(self.input).normal_(0, ip).float()
        return torch.clamp(noise, -2 * ip, 2 * ip)

    def update_delta(self, requires_grad=False):
        if not self.adversarial_mode:
            return True
        if self.delta is None:
            delta = self.initial_delta()
        else:
            grad = self.delta.grad
            self.delta.grad = None
            norm = grad.norm()
            if torch.isnan(norm) or torch.isinf(norm):
                return False
            with torch.no_grad():
                step = self.learning_rate * grad / (1e-6 + grad.abs().amax(-1, keepdim=True))
                delta = self.delta + step
        self.delta = delta.float().detach().requires_grad_(requires_grad)
        x = self.input.detach().to(self.delta.dtype)
        self.perturbated_input = (x + self.delta).to(self.input.dtype)
        return True


def hook_sift_layer(model, hidden_size, learning_rate=1e-4, init_perturbation=1e-2,
                    target_module="embeddings.LayerNorm"):
    if isinstance(target_module, str):
        modules = [m for n, m in model.named_modules() if target_module in n]
    else:
        assert isinstance(target_module, nn.Module), f"{type(target_module)} is not an nn.Module"
        modules = [target_module]
    layers = []
    for m in modules:
        layer = PerturbationLayer(hidden_size, learning_rate, init_perturbation)
        m.register_forward_pre_hook(lambda module, inputs, layer=layer: layer(inputs[0]))
        layers.append(layer)
    return layers


def symmetric_kl(logits, target):
    p = logits.reshape(-1, logits.size(-1)).float()
    q = target.reshape(-1, target.size(-1)).float()
    logp, logq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    forward_ce = -(logq.exp().detach() * logp).sum(-1)
    backward_ce = -(logp.exp().detach() * logq).sum(-1)
    return forward_ce + backward_ce


def kl(logits, target):
    p = logits.reshape(-1, logits.size(-1)).float()
    q = target.reshape(-1, target.size(-1)).float()
    return -(F.log_softmax(q.detach(), -1).exp() * F.log_softmax(p, -1)).sum(-1)


def mse(logits, target):
    p = logits.reshape(-1).float()
    q = target.reshape(-1).float()
    return F.mse_loss(p, q)


perturbation_loss_fns = {"symmetric-kl": symmetric_kl, "kl": kl, "mse": mse}


class AdversarialLearner:
    def __init__(self, model, adv_modules=None):
        if adv_modules is None:
            adv_modules = [m for m in model.modules() if isinstance(m, PerturbationLayer)]
        self.adv_modules = adv_modules
        self.parameters = list(model.parameters())
        self.model = model

    def loss(self, target, logits_fn, loss_fn="symmetric-kl", *wargs, **kwargs):
        self.prepare()
        if isinstance(loss_fn, str):
            loss_fn = perturbation_loss_fns[loss_fn]
        logits = logits_fn(self.model, *wargs, **kwargs)
        loss_fn(logits, target.detach()).sum().backward()
        for m in self.adv_modules:
            m.update_delta(True)
        for r, p in zip(self.prev, self.parameters):
            p.requires_grad_(r)
        logits = logits_fn(self.model, *wargs, **kwargs)
        loss = symmetric_kl(logits, target)
        self.cleanup()
        return loss.mean()

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
