"""ctypes launchers of the FGM kernels in ``csrc/fgm.cu`` (see ``csrc/fastadv.h``)."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _check, _ptr, _stream, declare, dtype_code, lib

declare({
    "fastadv_fgm_workspace_floats": (_c_int64, [_c_int64, _c_int64, _c_int]),
    "fastadv_fgm_norm": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_void_p, _c_void_p,
                                  _c_void_p, _c_void_p]),
    "fastadv_fgm_update": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                    _c_void_p, _c_void_p, _c_float, _c_void_p]),
    "fastadv_fgm_restore_rows": (_c_int, [_c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                          _c_void_p, _c_void_p]),
})


def fgm_workspace_floats(rows: int, cols: int, sparse: bool) -> int:
    return int(lib().fastadv_fgm_workspace_floats(rows, cols, int(bool(sparse))))


def fgm_norm(g2d: torch.Tensor, rows_out: torch.Tensor | None, norm_out: torch.Tensor) -> torch.Tensor:
    """``norm_out[0] = ||g||_2`` (fp32, deterministic).

    ``g2d``: [rows, cols] contiguous (dense: pass ``rows_out=None`` and any 2-D
    view, it is reduced as one flat tensor).  ``rows_out``: uint8 [rows] or
    None; set to 1 where the row of g holds a non-zero entry, else 0.
    """
    _check(g2d, "g")
    _check(norm_out, "norm_out")
    if norm_out.dtype != torch.float32 or norm_out.numel() != 1:
        raise ValueError("norm_out must be a float32 tensor of one element")
    code = dtype_code(g2d.dtype)
    if rows_out is None:
        rows, cols, work = 1, g2d.numel(), g2d.numel()
    else:
        if g2d.dim() != 2:
            raise ValueError(f"row-mode fgm_norm needs a 2-D gradient, got shape {tuple(g2d.shape)}")
        rows, cols = g2d.shape
        work = rows
        _check_flags(rows_out, rows)
    with torch.cuda.device(g2d.device):
        ws = torch.empty(fgm_workspace_floats(rows, cols, rows_out is not None),
                         dtype=torch.float32, device=g2d.device)
        _call("fastadv_fgm_norm", _ptr(g2d), code, rows, cols, _ptr(rows_out), _ptr(ws),
              _ptr(norm_out), _stream(g2d))
    count_launch("cuda.fgm_norm", 2 if work > 0 else 1)  # partial sums (if any) + finalize
    return norm_out


def _check_flags(flags: torch.Tensor, rows: int) -> None:
    _check(flags, "rows")
    if flags.dtype != torch.uint8 or flags.numel() != rows:
        raise ValueError(f"rows must be a uint8 tensor of {rows} elements")


def fgm_update(w2d: torch.Tensor, g2d: torch.Tensor, backup: torch.Tensor,
               rows_in: torch.Tensor | None, norm: torch.Tensor, eps: float) -> None:
    """``backup <- w``; ``w += (eps * g) / norm`` unless ``norm`` is 0 or NaN (read on the device).

    Dense (``rows_in=None``): every element.  Row mode: only the rows flagged in
    ``rows_in`` (uint8 [rows], from :func:`fgm_norm`).  ``backup`` has w's shape.
    """
    for t, what in ((w2d, "w"), (g2d, "g"), (backup, "backup"), (norm, "norm")):
        _check(t, what)
    if g2d.shape != w2d.shape or g2d.dtype != w2d.dtype or backup.dtype != w2d.dtype:
        raise ValueError("w and g must have one shape, and w, g and backup one dtype")
    if backup.numel() != w2d.numel():
        raise ValueError("fgm_update needs a backup of w's numel")
    if norm.dtype != torch.float32 or norm.numel() != 1:
        raise ValueError("norm must be a float32 tensor of one element")
    code = dtype_code(w2d.dtype)
    if rows_in is None:
        rows, cols = 1, w2d.numel()
    else:
        if w2d.dim() != 2:
            raise ValueError(f"row-mode fgm_update needs a 2-D parameter, got shape {tuple(w2d.shape)}")
        rows, cols = w2d.shape
        _check_flags(rows_in, rows)
    with torch.cuda.device(w2d.device):
        _call("fastadv_fgm_update", _ptr(w2d), _ptr(g2d), _ptr(backup), code, rows, cols,
              _ptr(rows_in), _ptr(norm), float(eps), _stream(w2d))
    count_launch("cuda.fgm_update", 1 if rows * cols > 0 else 0)


def fgm_restore_rows(w2d: torch.Tensor, backup: torch.Tensor, rows_in: torch.Tensor) -> None:
    """``w[r] <- backup[r]`` for every row flagged in ``rows_in``, bit-exact."""
    for t, what in ((w2d, "w"), (backup, "backup")):
        _check(t, what)
    if w2d.dim() != 2:
        raise ValueError(f"fgm_restore_rows needs a 2-D parameter, got shape {tuple(w2d.shape)}")
    if backup.dtype != w2d.dtype or backup.shape != w2d.shape:
        raise ValueError("w and backup must have one shape and dtype")
    rows, cols = w2d.shape
    _check_flags(rows_in, rows)
    code = dtype_code(w2d.dtype)
    with torch.cuda.device(w2d.device):
        _call("fastadv_fgm_restore_rows", _ptr(w2d), _ptr(backup), code, rows, cols,
              _ptr(rows_in), _stream(w2d))
    count_launch("cuda.fgm_restore_rows", 1 if rows * cols > 0 else 0)
