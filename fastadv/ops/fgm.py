"""FGM as a functional op: ``w += epsilon * g / ||g||`` with a backup, in place.

``fgm_attack_`` perturbs one parameter and returns the :class:`FGMBackup` that
``fgm_restore_`` needs to put it back bit for bit.  The zero / NaN norm test of
the reference is made on the device: nothing is read back to the host.

Dense mode (any tensor): a norm pass and one fused update pass that writes the
backup and the perturbed weights; restore is one copy.  Row mode (a 2-D
parameter, the default on the kernel backends): the norm pass reads all of
``g`` and flags, on the device, every row that holds a non-zero (or NaN / inf)
entry; the update and the restore touch the flagged rows only.  Which rows
carry gradient is read from the gradient, never assumed from how the model
reads the table, so the result equals the dense reference for every model
(tied heads ``h @ W.t()``, ``F.embedding``, ``W[ids]``, accumulation, DDP).
The backup is full-size (allocated, written only at flagged rows), as large as
the reference's clone, so no bound on the number of rows is ever needed.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _backend
from ..kernels import count_launch, device_guard
from ._live import follow, retarget

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class FGMBackup:
    """What restore needs: the parameter, its saved values and, in row mode,
    the uint8 row flags (row r was saved and perturbed)."""
    param: torch.Tensor
    data: torch.Tensor
    rows: torch.Tensor | None
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
                row_sparse: bool = True, backend: str | None = None) -> FGMBackup:
    """Perturb ``param`` in place by ``epsilon * grad / ||grad||`` (skipped on the
    device when the norm is 0 or NaN) and return its backup.

    ``row_sparse`` (default): a 2-D parameter on a kernel backend takes the
    row mode (rows without gradient are neither read twice nor written); the
    result is the same as the dense one.  The torch backend is always dense.
    """
    _check(param, grad, epsilon)
    w = param.data
    if grad.is_sparse:
        grad = grad.to_dense()
    name = resolve(w, grad, backend)
    if name == "torch":
        count_launch("torch.fgm")
        return FGMBackup(param, _torch_attack(w, grad.data, float(epsilon)), None, name)
    with device_guard(w):
        return _kernel_attack(_kernels(name), name, param, w, grad.data.contiguous(), float(epsilon),
                              row_sparse and w.dim() == 2)


def resolve(w: torch.Tensor, grad: torch.Tensor, backend: str | None) -> str:
    """The backend that runs on ``w``: a forced kernel backend that cannot take
    these tensors raises and says why; ``auto`` then picks torch."""
    name = _backend.resolve(backend, w.device)
    if name != "torch" and (w.dtype not in KERNEL_DTYPES or grad.dtype != w.dtype
                            or not w.is_contiguous()):
        if (backend or _backend.default()) != "auto":  # forced: say why it cannot run
            _explain_kernel_limits(w, grad, name)
        name = "torch"
    return name


def _kernel_attack(k, name, param, w, g, epsilon, by_rows) -> FGMBackup:
    norm = torch.empty(1, dtype=torch.float32, device=w.device)
    backup = torch.empty_like(w)
    if not by_rows:
        k.fgm_norm(g.view(1, -1), None, norm)
        k.fgm_update(w.view(1, -1), g.view(1, -1), backup, None, norm, epsilon)
        return FGMBackup(param, backup, None, name)
    rows = torch.empty(w.shape[0], dtype=torch.uint8, device=w.device)
    k.fgm_norm(g, rows, norm)
    k.fgm_update(w, g, backup, rows, norm, epsilon)
    return FGMBackup(param, backup, rows, name)


def _explain_kernel_limits(w, grad, name):
    if w.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the {name} backend supports float32, float16 and bfloat16 parameters, "
                        f"got {w.dtype}; use backend='torch'")
    if grad.dtype != w.dtype:
        raise TypeError(f"the {name} backend needs the gradient in the parameter's dtype "
                        f"({w.dtype}), got {grad.dtype}; use backend='torch'")
    raise ValueError(f"the {name} backend needs a contiguous parameter; use backend='torch'")


def fgm_restore_(state: FGMBackup, param: torch.Tensor | None = None, name: str = "the parameter") -> None:
    """Put the saved values back, bit-exact, into ``param`` (default: the
    parameter attacked) as it is now: into its current storage if user code
    reallocated it (same shape and dtype; a device move is followed), else
    :class:`~fastadv.ops._live.StorageMoved` is raised and ``state`` kept."""
    target = state.param if param is None else param
    w = target.data
    retarget(name, state.data, w, "attack() and restore()")
    state.data, state.rows, state.param = follow(state.data, w), follow(state.rows, w), target
    if state.rows is None:
        w.copy_(state.data)
    elif state.backend != "torch" and w.is_contiguous() and _backend.why_not(state.backend, w.device) is None:
        with device_guard(w):
            _kernels(state.backend).fgm_restore_rows(w, state.data, state.rows)
    else:  # the storage moved to where the kernel cannot go: same values, dense write
        count_launch("torch.fgm_restore")
        w.copy_(torch.where(state.rows.bool().unsqueeze(1), state.data, w))


def design_bytes(numel: int, element_size: int, touched_rows: int | None = None,
                 cols: int | None = None) -> int:
    """Bytes the fused design moves per attack + restore.

    Dense: norm reads g (1 pass), update reads w and g and writes backup and w
    (4), restore reads backup and writes w (2): 7 passes.  Row mode: the norm
    reads all of g (1 pass) and writes one flag byte per row; update and
    restore move 6 passes over the touched rows and read the flags twice.
    """
    if touched_rows is None:
        return 7 * numel * element_size
    rows = numel // cols
    return numel * element_size + 6 * touched_rows * cols * element_size + 3 * rows
