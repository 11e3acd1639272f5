"""One PGD step on a parameter, in place: ``w += alpha * g / ||g||`` (skipped
when the norm is 0 or NaN), then ``w - w0`` projected onto the L2 ball of
radius ``epsilon`` around the weights ``w0`` of the first step.

``pgd_attack_`` returns (or updates) a :class:`PGDState`; ``pgd_restore_``
puts ``w0`` back bit for bit.  Kernels: one reduction and one fused step +
projection per step (``fastadv/kernels/triton/pgd.py``); the torch fallback
computes the same function with plain ops.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _backend
from ..kernels import device_guard
from .fgm import KERNEL_DTYPES, _check


@dataclasses.dataclass
class PGDState:
    """The backup ``w0`` and, row-sparse, which rows were perturbed."""
    param: torch.Tensor
    backup: torch.Tensor
    saved: torch.Tensor | None
    backend: str


def _torch_step(w, w0, g, alpha: float, eps: float) -> None:
    g32 = g.to(torch.float32)
    norm_g = torch.linalg.vector_norm(g32)
    valid = (norm_g != 0) & ~torch.isnan(norm_g)
    w32, w0_32 = w.to(torch.float32), w0.to(torch.float32)
    r = (w32 + alpha * g32 / norm_g) - w0_32
    norm_r = torch.linalg.vector_norm(r)
    r = torch.where(valid & (norm_r > eps), eps * r / norm_r, r)
    w.copy_(torch.where(valid, w0_32 + r, w32))


def _resolve(w, grad, backend):
    name = _backend.resolve(backend, w.device)
    if name != "torch" and (w.dtype not in KERNEL_DTYPES or grad.dtype != w.dtype
                            or not w.is_contiguous()):
        if (backend or _backend.default()) != "auto":
            from .fgm import _explain_kernel_limits
            _explain_kernel_limits(w, grad, name)
        name = "torch"
    return name


def _kernels(name):
    if name == "triton":
        from ..kernels.triton import pgd
        return pgd
    from ..kernels.cuda import pgd
    return pgd


def pgd_attack_(param: torch.Tensor, grad: torch.Tensor, alpha: float, epsilon: float,
                state: PGDState | None = None, *, row_mask: torch.Tensor | None = None,
                backend: str | None = None) -> PGDState:
    """One PGD step on ``param``; ``state`` is None on the first step (which
    saves ``w0``) and the returned state afterwards.  ``row_mask`` (uint8 per
    row of a 2-D ``param``, rows with mask 0 have a zero gradient) selects the
    row-sparse path; it must be given on every step or on none."""
    _check(param, grad, alpha)
    _check(param, grad, epsilon)
    w = param.data
    if grad.is_sparse:
        grad = grad.to_dense()
    first = state is None
    name = state.backend if state is not None else _resolve(w, grad, backend)
    if name == "torch":
        if first:
            state = PGDState(param, w.clone(), None, name)
        _torch_step(w, state.backup, grad.data, float(alpha), float(epsilon))
        return state

    g = grad.data.contiguous()
    coef = torch.empty(4, dtype=torch.float32, device=w.device)
    sparse = row_mask is not None and w.dim() == 2
    if first:
        saved = torch.zeros(w.shape[0], dtype=torch.uint8, device=w.device) if sparse else None
        state = PGDState(param, torch.empty_like(w), saved, name)
    if sparse != (state.saved is not None):
        raise ValueError("row_mask must be given on every PGD step of an attack or on none")
    k = _kernels(name)
    with device_guard(w):
        if sparse:
            k.pgd_step(w, g, state.backup, coef, alpha, epsilon, first, row_mask, state.saved)
        else:
            k.pgd_step(w.view(-1), g.view(-1), state.backup.view(-1), coef, alpha, epsilon, first)
    return state


def pgd_restore_(state: PGDState) -> None:
    """Put ``w0`` back in place, bit-exact (``data_ptr`` unchanged)."""
    w = state.param.data
    if state.saved is None:
        w.copy_(state.backup)
    else:
        with device_guard(w):
            _kernels(state.backend).pgd_restore_rows(w, state.backup, state.saved)


def design_bytes(numel: int, element_size: int, steps: int = 3, touched_rows: int | None = None,
                 cols: int | None = None) -> int:
    """Bytes the fused design moves for ``steps`` attacks + restore.

    First step: the reduction reads g, the update reads w and g and writes the
    backup and w (5 passes).  Later steps: the reduction reads w, w0 and g, the
    update reads them and writes w (7 passes).  Restore: 2 passes.  Row-sparse:
    the same over the touched rows, plus the uint8 mask and saved flags (read
    by each kernel, 1 byte per row).  ``backup_grad`` / ``restore_grad`` move
    nothing (no copies).
    """
    passes = 5 + 7 * (steps - 1) + 2
    if touched_rows is None:
        return passes * numel * element_size
    rows = numel // cols
    return passes * touched_rows * cols * element_size + (4 * steps + 1) * rows
