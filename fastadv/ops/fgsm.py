"""FGSM on embeddings: ``fgsm_perturb(embeds, grad, epsilon) = embeds +
epsilon * sign(grad)`` in one fused pass, differentiable in ``embeds`` (the
perturbation is a constant, as in the seed's ``embeds + perturb``)."""
from __future__ import annotations

import torch

from .. import _backend
from ..kernels import device_guard
from .fgm import KERNEL_DTYPES


def _fused(embeds: torch.Tensor, grad: torch.Tensor, epsilon: float, name: str) -> torch.Tensor:
    if name == "torch":  # fp32 math, rounded once, like the kernel
        return (embeds.float() + epsilon * grad.sign().float()).to(embeds.dtype)
    from ..kernels.triton import fgsm
    e, g = embeds.contiguous(), grad.to(embeds.dtype).contiguous()
    out = torch.empty_like(e)
    with device_guard(e):
        fgsm.fgsm_perturb(e, g, out, epsilon)
    return out


class _FGSMPerturb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeds, grad, epsilon, name):
        return _fused(embeds, grad, epsilon, name)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None, None, None


def fgsm_perturb(embeds: torch.Tensor, grad: torch.Tensor, epsilon: float, *,
                 backend: str | None = None) -> torch.Tensor:
    """``embeds + epsilon * sign(grad)`` (``sign(0) = 0``), one read of each
    input and one write; gradients flow to ``embeds`` only."""
    if grad.shape != embeds.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match embeds {tuple(embeds.shape)}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"epsilon must be a number, got {type(epsilon).__name__}")
    name = _backend.resolve(backend, embeds.device)
    if name == "cuda" or embeds.dtype not in KERNEL_DTYPES:
        name = "torch"  # a single elementwise pass: the torch path is already one kernel per op
    return _FGSMPerturb.apply(embeds, grad.detach(), float(epsilon), name)
