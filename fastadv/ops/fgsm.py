"""FGSM on embeddings: ``fgsm_perturb(embeds, grad, epsilon) = embeds +
epsilon * sign(grad)`` in one fused pass, differentiable in ``embeds`` (the
perturbation is a constant, as in the seed's ``embeds + perturb``)."""
from __future__ import annotations

import torch

from ..kernels import count_launch, device_guard
from . import _registry


@_registry.op("fgsm_perturb", triton=True)
def fgsm_perturb_op(embeds: torch.Tensor, grad: torch.Tensor, epsilon: float, backend: str) -> torch.Tensor:
    """``embeds + epsilon * sign(grad)``: one pass, fp32 math (the input's
    precision for fp64 on the torch backend), rounded once."""
    if backend == "torch":
        count_launch("torch.fgsm")
        wide = torch.promote_types(embeds.dtype, torch.float32)
        return (embeds.to(wide) + epsilon * grad.sign().to(wide)).to(embeds.dtype)
    e, g = embeds.contiguous(), grad.to(embeds.dtype).contiguous()
    out = torch.empty_like(e)
    with device_guard(e):
        _registry.kernels("fgsm", backend).fgsm_perturb(e, g, out, epsilon)
    return out


@fgsm_perturb_op.register_fake
def _(embeds, grad, epsilon, backend):
    return torch.empty_like(embeds, memory_format=torch.contiguous_format)


def _backward(ctx, grad_out):
    return grad_out, None, None, None  # the perturbation is a constant


fgsm_perturb_op.register_autograd(_backward)


def fgsm_perturb(embeds: torch.Tensor, grad: torch.Tensor, epsilon: float, *,
                 backend: str | None = None) -> torch.Tensor:
    """``embeds + epsilon * sign(grad)`` (``sign(0) = 0``), one read of each
    input and one write; gradients flow to ``embeds`` only."""
    if grad.shape != embeds.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match embeds {tuple(embeds.shape)}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"epsilon must be a number, got {type(epsilon).__name__}")
    name = _registry.pick(backend, embeds.device, dtypes=[("embeddings", embeds)],
                          same_device=[("embeds", embeds), ("grad", grad)])
    return fgsm_perturb_op(embeds, grad.detach(), float(epsilon), name)
