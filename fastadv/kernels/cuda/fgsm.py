"""ctypes launcher of the embedding FGSM kernel in ``csrc/fgsm.cu``."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _check, _ptr, _stream, declare, dtype_code

declare({
    "fastadv_fgsm_perturb": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64, _c_float,
                                      _c_void_p]),
})


def fgsm_perturb(e: torch.Tensor, g: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    """``out = e + eps * sign(g)`` (one pass; the Triton twin's contract)."""
    for t, what in ((e, "embeds"), (g, "grad"), (out, "out")):
        _check(t, what)
    if not (e.shape == g.shape == out.shape and e.dtype == g.dtype == out.dtype):
        raise ValueError("embeds, grad and out must have one shape and one dtype")
    with torch.cuda.device(e.device):
        _call("fastadv_fgsm_perturb", _ptr(e), _ptr(g), _ptr(out), dtype_code(e.dtype), e.numel(),
              float(eps), _stream(e))
    count_launch("cuda.fgsm", 1 if e.numel() else 0)
