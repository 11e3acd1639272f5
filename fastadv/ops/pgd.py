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

from ..kernels import count_launch, device_guard
from ._live import follow, retarget
from .fgm import _check, resolve


@dataclasses.dataclass
class PGDState:
    """The backup ``w0`` and, in row mode, which rows were perturbed
    (``saved``) and the per-step flags of the rows holding gradient (``mask``)."""
    param: torch.Tensor
    backup: torch.Tensor
    saved: torch.Tensor | None
    backend: str
    mask: torch.Tensor | None = None


def _torch_step(w, w0, g, alpha: float, eps: float) -> None:
    g32 = g.to(torch.float32)
    norm_g = torch.linalg.vector_norm(g32)
    valid = (norm_g != 0) & ~torch.isnan(norm_g)
    w32, w0_32 = w.to(torch.float32), w0.to(torch.float32)
    r = (w32 + alpha * g32 / norm_g) - w0_32
    norm_r = torch.linalg.vector_norm(r)
    r = torch.where(valid & (norm_r > eps), eps * r / norm_r, r)
    w.copy_(torch.where(valid, w0_32 + r, w32))


def _kernels(name):
    if name == "triton":
        from ..kernels.triton import pgd
        return pgd
    from ..kernels.cuda import pgd
    return pgd


def pgd_attack_(param: torch.Tensor, grad: torch.Tensor, alpha: float, epsilon: float,
                state: PGDState | None = None, *, row_sparse: bool = True, name: str = "the parameter",
                backend: str | None = None) -> PGDState:
    """One PGD step on ``param``; ``state`` is None on the first step (which
    saves ``w0``) and the returned state afterwards.  ``row_sparse``: a 2-D
    parameter on a kernel backend takes the row mode (rows found from the
    gradient on the device; same result as dense).  Later steps run on
    ``param`` as it is now (its storage may have moved: see ``ops._live``)."""
    _check(param, grad, alpha)
    _check(param, grad, epsilon)
    w = param.data
    if grad.is_sparse:
        grad = grad.to_dense()
    first = state is None
    if first:
        backend_name = resolve(w, grad, backend)
        by_rows = row_sparse and backend_name != "torch" and w.dim() == 2
        saved = torch.zeros(w.shape[0], dtype=torch.uint8, device=w.device) if by_rows else None
        state = PGDState(param, torch.empty_like(w), saved, backend_name,
                         torch.empty_like(saved) if by_rows else None)
    else:
        _follow(state, param, name, "two PGD attack() steps")
    if state.backend == "torch":
        count_launch("torch.pgd")
        if first:
            state.backup.copy_(w)
        _torch_step(w, state.backup, grad.data, float(alpha), float(epsilon))
        return state

    if grad.dtype != w.dtype:
        raise TypeError(f"the {state.backend} backend needs the gradient in the parameter's dtype "
                        f"({w.dtype}), got {grad.dtype}")
    g = grad.data.contiguous()
    coef = torch.empty(4, dtype=torch.float32, device=w.device)
    k = _kernels(state.backend)
    with device_guard(w):
        if state.saved is not None:
            k.pgd_step(w, g, state.backup, coef, alpha, epsilon, first, state.mask, state.saved)
        else:
            k.pgd_step(w.view(-1), g.view(-1), state.backup.view(-1), coef, alpha, epsilon, first)
    return state


def _follow(state: PGDState, param: torch.Tensor, name: str, between: str) -> None:
    """Point ``state`` at ``param``'s current storage, or raise if that is not exact."""
    w = param.data
    retarget(name, state.backup, w, between)
    if state.backend != "torch" and not w.is_contiguous():
        raise RuntimeError(f"{name} is no longer contiguous after {between}; the {state.backend} "
                           f"kernels need a contiguous parameter")
    state.backup, state.saved, state.mask = follow(state.backup, w), follow(state.saved, w), follow(state.mask, w)
    state.param = param


def pgd_restore_(state: PGDState, param: torch.Tensor | None = None, name: str = "the parameter") -> None:
    """Put ``w0`` back in place, bit-exact (``data_ptr`` unchanged), into
    ``param`` (default: the parameter attacked) as it is now."""
    target = state.param if param is None else param
    w = target.data
    retarget(name, state.backup, w, "attack() and restore()")
    state.backup, state.saved, state.param = follow(state.backup, w), follow(state.saved, w), target
    if state.saved is None:
        w.copy_(state.backup)
    elif w.is_contiguous() and _backend_ok(state.backend, w):
        with device_guard(w):
            _kernels(state.backend).pgd_restore_rows(w, state.backup, state.saved)
    else:  # the storage moved to where the kernel cannot go: same values, dense write
        count_launch("torch.pgd_restore")
        w.copy_(torch.where(state.saved.bool().unsqueeze(1), state.backup, w))
        state.saved.zero_()


def _backend_ok(name: str, w: torch.Tensor) -> bool:
    from .. import _backend
    return _backend.why_not(name, w.device) is None


def design_bytes(numel: int, element_size: int, steps: int = 3, touched_rows: int | None = None,
                 cols: int | None = None) -> int:
    """Bytes the fused design moves for ``steps`` attacks + restore.

    First step: the reduction reads g, the update reads w and g and writes the
    backup and w (5 passes).  Later steps: the reduction reads w, w0 and g, the
    update reads them and writes w (7 passes).  Restore: 2 passes.  Row mode:
    every reduction reads all of g (1 pass per step) and writes a flag per
    row; the other passes run over the touched rows, plus the uint8 flags
    (mask and saved, 1 byte per row, read by each kernel).  ``backup_grad`` /
    ``restore_grad`` move nothing (no copies).
    """
    passes = 5 + 7 * (steps - 1) + 2
    if touched_rows is None:
        return passes * numel * element_size
    rows = numel // cols
    g_full = steps * numel * element_size
    touched = (passes - steps) * touched_rows * cols * element_size
    return g_full + touched + (5 * steps + 1) * rows
