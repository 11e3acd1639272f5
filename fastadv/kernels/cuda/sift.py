"""ctypes launchers of the SiFT kernels in ``csrc/sift.cu``.  Same functions,
arguments and semantics as :mod:`fastadv.kernels.triton.sift` (the initial
perturbation draws the same Philox counters, see ``csrc/rng.cuh``); each
counts its launches."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _check, _ptr, _stream, declare, dtype_code, lib
from .noise import _key

declare({
    "fastadv_sift_init": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64, _c_void_p, _c_float,
                                   _c_void_p]),
    "fastadv_sift_workspace_floats": (_c_int64, [_c_int64]),
    "fastadv_sift_update": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                     _c_void_p, _c_void_p, _c_float, _c_void_p]),
})


def sift_init(x: torch.Tensor, delta: torch.Tensor, pert: torch.Tensor, key: torch.Tensor,
              init_perturbation: float) -> None:
    for t, what in ((x, "x"), (delta, "delta"), (pert, "pert")):
        _check(t, what)
    _key(key)
    if delta.dtype != torch.float32 or pert.dtype != x.dtype:
        raise ValueError("delta must be float32 and pert of x's dtype")
    numel = x.numel()
    with torch.cuda.device(x.device):
        _call("fastadv_sift_init", _ptr(x), _ptr(delta), _ptr(pert), dtype_code(x.dtype), numel, _ptr(key),
              float(init_perturbation), _stream(x))
    count_launch("cuda.sift_init", 1 if numel else 0)


def sift_update(x2d: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, pert: torch.Tensor,
                learning_rate: float) -> torch.Tensor:
    """DeBERTa's step on ``[rows, cols]``; returns the device flag ``||grad|| is finite``."""
    for t, what in ((x2d, "x"), (delta, "delta"), (grad, "grad"), (pert, "pert")):
        _check(t, what)
    if delta.dtype != torch.float32 or grad.dtype != torch.float32 or pert.dtype != x2d.dtype:
        raise ValueError("delta and grad must be float32, pert of x's dtype")
    rows, cols = x2d.shape
    with torch.cuda.device(x2d.device):
        ws = torch.empty(int(lib().fastadv_sift_workspace_floats(rows)), dtype=torch.float32, device=x2d.device)
        ok = torch.empty(1, dtype=torch.uint8, device=x2d.device)
        _call("fastadv_sift_update", _ptr(x2d), _ptr(delta), _ptr(grad), _ptr(pert), dtype_code(x2d.dtype),
              rows, cols, _ptr(ws), _ptr(ok), float(learning_rate), _stream(x2d))
    count_launch("cuda.sift_update", 3 if rows * cols else 1)
    return ok.view(torch.bool)[0]
