"""NEFTune as a functional op: ``torch.ops.fastadv.neftune``.

``neftune(embeds, alpha, attention_mask)`` is ``embeds + U[-1, 1) * alpha /
sqrt(L * d)`` (Jain et al., 2023; the plain form is
``fastadv.reference.neftune``), one read of the embeddings and one write,
differentiable w.r.t. them (identity).  With a mask the noise of token ``t``
of sequence ``b`` is ``mask[b, t] * alpha / sqrt(L_b * d)``, ``L_b = sum_t
mask[b, t]``: one small launch computes that per-token scale
(``kernels/<backend>/neftune.py``), the noise add is the uniform form of the
noise kernel (``kernels/<backend>/noise.py``).  Randomness as in
:mod:`fastadv.ops.noise` (a Philox key for the kernels, the draw itself for the
torch backend).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels import count_launch, device_guard
from . import _registry
from .noise import check_float, draw, noisy, number, opmath


def _torch_scale(x: torch.Tensor, mask: Optional[torch.Tensor], alpha: float):
    """The noise scale on the torch backend: a number (no mask) or ``[..., L, 1]``."""
    seq_len, dim = x.shape[-2], x.shape[-1]
    if mask is None:
        return alpha / math.sqrt(seq_len * dim) if seq_len * dim else 0.0
    ot = opmath(x.dtype)
    m = mask.to(ot)
    length = m.sum(-1, keepdim=True)
    mag = torch.where(length > 0, alpha / torch.sqrt(length.clamp_min(1e-30) * dim),
                      torch.zeros((), dtype=ot, device=x.device))
    return (m * mag).reshape(*x.shape[:-1], 1)


@_registry.op("neftune")
def neftune_op(embeds: torch.Tensor, rand: torch.Tensor, mask: Optional[torch.Tensor], alpha: float,
               backend: str) -> torch.Tensor:
    """``embeds + U[-1, 1) * scale`` (module docstring); ``embeds`` is ``[B, L, d]``
    or ``[L, d]``, ``mask`` None or ``[B, L]`` (``[1, L]`` for one sequence)."""
    if backend == "torch":
        count_launch("torch.neftune")
        return noisy(embeds, rand * _torch_scale(embeds, mask, alpha))
    x = embeds.contiguous()
    out = torch.empty_like(x)
    seq_len, dim = x.shape[-2], x.shape[-1]
    noise = _registry.kernels("noise", backend)
    with device_guard(x):
        if mask is None:
            scale = alpha / math.sqrt(seq_len * dim) if seq_len * dim else 0.0
            noise.add_noise(x, out, rand, scale, uniform=True)
        else:
            m = mask.contiguous()
            if m.dtype == torch.bool:
                m = m.view(torch.uint8)
            row_scale = torch.empty(m.shape, dtype=torch.float32, device=x.device)
            _registry.kernels("neftune", backend).neftune_scale(m, row_scale, alpha / math.sqrt(dim) if dim else 0.0)
            noise.add_noise(x, out, rand, 1.0, uniform=True, row_scale=row_scale, row_len=dim)
    return out


@neftune_op.register_fake
def _(embeds, rand, mask, alpha, backend):
    if backend == "torch":
        return noisy(embeds, rand * _torch_scale(embeds, mask, alpha))
    return torch.empty_like(embeds, memory_format=torch.contiguous_format)


def _backward(ctx, grad):
    return grad, None, None, None, None


neftune_op.register_autograd(_backward)


def neftune(embeds: torch.Tensor, alpha: float, attention_mask: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, backend: str | None = None) -> torch.Tensor:
    """NEFTune: ``embeds + U[-1, 1) * alpha / sqrt(L * d)`` as a new tensor.

    ``embeds``: ``[B, L, d]`` (or ``[L, d]``, one sequence).  Without a mask
    ``L`` is the padded length ``embeds.shape[-2]``; with ``attention_mask``
    ``[B, L]`` (bool, int or float), ``L_b = sum(mask[b])`` and the noise of
    token ``t`` is multiplied by ``mask[b, t]`` (padding gets none), as in the
    NEFTune training code.  A sequence with ``L_b = 0`` gets no noise (the
    reference divides by zero).  Differentiable w.r.t. ``embeds`` (identity).
    """
    check_float(embeds, "embeds")
    alpha = number(alpha, "alpha")
    if embeds.dim() not in (2, 3):
        raise ValueError(f"embeds must be [B, L, d] or [L, d], got shape {tuple(embeds.shape)}")
    seq_len = embeds.shape[-2]
    batch = embeds.shape[0] if embeds.dim() == 3 else 1
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != embeds.shape[:-1]:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"embeds {tuple(embeds.shape)} (expected {tuple(embeds.shape[:-1])})")
        mask = attention_mask.reshape(batch, seq_len)
    name = _registry.pick(backend, embeds.device, dtypes=[("embeddings", embeds)],
                          same_device=[("embeds", embeds), ("attention_mask", attention_mask)])
    rand = draw(name, embeds.shape, opmath(embeds.dtype), embeds.device, generator, "uniform")
    return neftune_op(embeds, rand, mask, alpha, name)


def design_bytes(numel: int, element_size: int, *, rows: int = 0) -> int:
    """Bytes per call: read the embeddings, write the output (2 passes), plus the
    fp32 per-token scale (``rows`` tokens: written, then read) with a mask."""
    return 2 * numel * element_size + 8 * rows
