"""FGM as a functional op: ``w += epsilon * g / ||g||`` with a backup, in place.

``fgm_attack_`` perturbs one parameter and returns the :class:`FGMBackup` that
``fgm_restore_`` needs to put it back bit for bit.  The zero / NaN norm test of
the reference is made on the device: nothing is read back to the host.

Dense mode (any tensor): a norm pass and one fused update pass that writes the
backup and the perturbed weights; restore is one copy.  Row-sparse mode (an
embedding table with a ``row_mask`` of the rows that may hold gradient, see
``fastadv.adversarial.fgm``): the same passes over the marked rows only, with a
compact backup of ``row_capacity`` rows.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _backend
from ..kernels import device_guard

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class FGMBackup:
    """What restore needs: the parameter, its saved values and, when row-sparse,
    the slots that map each touched row to its row of ``data``."""
    param: torch.Tensor
    data: torch.Tensor
    slots: torch.Tensor | None
    backend: str


def _kernels(backend: str):
    if backend == "triton":
        from ..kernels.triton import fgm
        return fgm
    from ..kernels.cuda import fgm
    return fgm


def _check(param: torch.Tensor, grad: torch.Tensor, epsilon) -> None:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad must be a tensor, got {type(grad).__name__}")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match parameter shape {tuple(param.shape)}")
    if grad.device != param.device:
        raise ValueError(f"grad is on {grad.device} but the parameter is on {param.device}")
    if not param.is_floating_point():
        raise TypeError(f"FGM perturbs floating-point parameters, got {param.dtype}")
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool):
        raise TypeError(f"epsilon must be a number, got {type(epsilon).__name__}")


def _torch_attack(w: torch.Tensor, g: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Pure-PyTorch fallback (dense, any device and dtype): fp32 math, no sync."""
    backup = w.clone()
    g32 = g.to(torch.float32)
    norm = torch.linalg.vector_norm(g32)
    invalid = (norm == 0) | torch.isnan(norm)
    # (eps * g) / norm as the reference rounds it; zeroed when the norm is
    # unusable; added in fp32 and rounded once into w's dtype.
    w.add_((epsilon * g32).div_(norm).masked_fill_(invalid, 0.0))
    return backup


def fgm_attack_(param: torch.Tensor, grad: torch.Tensor, epsilon: float, *,
                row_mask: torch.Tensor | None = None, row_capacity: int | None = None,
                backend: str | None = None) -> FGMBackup:
    """Perturb ``param`` in place by ``epsilon * grad / ||grad||`` (skipped on the
    device when the norm is 0 or NaN) and return its backup.

    ``row_mask`` (uint8, one entry per row of a 2-D ``param``) selects the
    row-sparse path: rows with mask 0 must have a zero gradient; ``row_capacity``
    bounds the number of marked rows (default: all rows).  The mask is updated
    in place: marked rows found to have an all-zero gradient are unmarked.
    """
    _check(param, grad, epsilon)
    w = param.data
    if grad.is_sparse:
        grad = grad.to_dense()
    name = _backend.resolve(backend, w.device)
    if name != "torch" and (w.dtype not in KERNEL_DTYPES or grad.dtype != w.dtype
                            or not w.is_contiguous()):
        if (backend or _backend.default()) != "auto":  # forced: say why it cannot run
            _explain_kernel_limits(w, grad, name)
        name = "torch"
    if name == "torch":
        return FGMBackup(param, _torch_attack(w, grad.data, float(epsilon)), None, name)

    with device_guard(w):
        return _kernel_attack(_kernels(name), name, param, w, grad.data.contiguous(), float(epsilon),
                              row_mask, row_capacity)


def _kernel_attack(k, name, param, w, g, epsilon, row_mask, row_capacity) -> FGMBackup:
    norm = torch.empty(1, dtype=torch.float32, device=w.device)
    if row_mask is None or w.dim() != 2:
        k.fgm_norm(g.view(1, -1), None, norm)
        backup = torch.empty_like(w)
        k.fgm_update(w.view(1, -1), g.view(1, -1), backup, None, norm, epsilon)
        return FGMBackup(param, backup, None, name)

    if row_mask.dtype != torch.uint8 or row_mask.shape != (w.shape[0],):
        raise ValueError(f"row_mask must be uint8 of shape ({w.shape[0]},), got "
                         f"{row_mask.dtype} {tuple(row_mask.shape)}")
    k.fgm_norm(g, row_mask, norm)
    slots = torch.cumsum(row_mask, 0, dtype=torch.int32)
    capacity = w.shape[0] if row_capacity is None else min(int(row_capacity), w.shape[0])
    if capacity < w.shape[0]:
        # A row past the capacity gets its predecessor's slot, i.e. counts as
        # untouched: never written out of bounds, never perturbed without a backup.
        slots.clamp_(max=capacity)
    backup = torch.empty((capacity, w.shape[1]), dtype=w.dtype, device=w.device)
    k.fgm_update(w, g, backup, slots, norm, epsilon)
    return FGMBackup(param, backup, slots, name)


def _explain_kernel_limits(w, grad, name):
    if w.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the {name} backend supports float32, float16 and bfloat16 parameters, "
                        f"got {w.dtype}; use backend='torch'")
    if grad.dtype != w.dtype:
        raise TypeError(f"the {name} backend needs the gradient in the parameter's dtype "
                        f"({w.dtype}), got {grad.dtype}; use backend='torch'")
    raise ValueError(f"the {name} backend needs a contiguous parameter; use backend='torch'")


def fgm_restore_(state: FGMBackup) -> None:
    """Put the saved values back in place (bit-exact, ``data_ptr`` unchanged)."""
    w = state.param.data
    if state.slots is None:
        w.copy_(state.data)
    else:
        with device_guard(w):
            _kernels(state.backend).fgm_restore_rows(w, state.data, state.slots)


def design_bytes(numel: int, element_size: int, touched_rows: int | None = None,
                 cols: int | None = None) -> int:
    """Bytes the fused design moves per attack + restore.

    Dense: norm reads g (1 pass), update reads w and g and writes backup and w
    (4), restore reads backup and writes w (2): 7 passes.  Row-sparse: the same
    7 passes over the touched rows, plus the row mask (read twice, 1 byte per
    row) and the int32 slots (written once, read by update and restore).
    """
    if touched_rows is None:
        return 7 * numel * element_size
    rows = numel // cols
    return 7 * touched_rows * cols * element_size + 2 * rows + 3 * 4 * rows
