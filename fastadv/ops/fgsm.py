"""FGSM on embeddings: ``fgsm_perturb(embeds, grad, epsilon) = embeds +
epsilon * sign(grad)`` in one fused pass, differentiable in ``embeds`` (the
perturbation is a constant, as in the seed's ``embeds + perturb``)."""
from __future__ import annotations

import torch

from .. import _backend
from ..kernels import count_launch, device_guard
from .fgm import KERNEL_DTYPES


def _kernels(name: str):
    if name == "triton":
        from ..kernels.triton import fgsm
        return fgsm
    from ..kernels.cuda import fgsm
    return fgsm


def _fused(embeds: torch.Tensor, grad: torch.Tensor, epsilon: float, name: str) -> torch.Tensor:
    if name == "torch":  # fp32 math (the input's precision for fp64), rounded once, like the kernel
        count_launch("torch.fgsm")
        wide = torch.promote_types(embeds.dtype, torch.float32)
        return (embeds.to(wide) + epsilon * grad.sign().to(wide)).to(embeds.dtype)
    e, g = embeds.contiguous(), grad.to(embeds.dtype).contiguous()
    out = torch.empty_like(e)
    with device_guard(e):
        _kernels(name).fgsm_perturb(e, g, out, epsilon)
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
    if name != "torch" and embeds.dtype not in KERNEL_DTYPES:
        if (backend or _backend.default()) != "auto":  # forced: run it or say why not
            raise TypeError(f"the {name} backend supports float32, float16 and bfloat16 embeddings, "
                            f"got {embeds.dtype}; use backend='torch'")
        name = "torch"
    return _FGSMPerturb.apply(embeds, grad.detach(), float(epsilon), name)
