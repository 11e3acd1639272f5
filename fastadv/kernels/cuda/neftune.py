"""ctypes launcher of NEFTune's row-scale kernel in ``csrc/neftune.cu`` (the
noise itself is :func:`fastadv.kernels.cuda.noise.add_noise` with that row
scale).  Same function and arguments as :mod:`fastadv.kernels.triton.neftune`."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _check, _ptr, _stream, declare

declare({
    "fastadv_neftune_scale": (_c_int, [_c_void_p, _c_void_p, _c_int64, _c_int64, _c_float, _c_void_p]),
})


def neftune_scale(mask2d: torch.Tensor, scale_out: torch.Tensor, alpha_over_sqrt_d: float) -> None:
    """``scale_out[b, t] = mask[b, t] * alpha / sqrt(L_b * d)`` (fp32); the mask is
    converted to float32 first when it is not."""
    _check(scale_out, "scale_out")
    mask = mask2d if mask2d.dtype == torch.float32 else mask2d.to(torch.float32)
    mask = mask.contiguous()
    batch, seq_len = mask.shape
    with torch.cuda.device(mask.device):
        _call("fastadv_neftune_scale", _ptr(mask), _ptr(scale_out), batch, seq_len, float(alpha_over_sqrt_d),
              _stream(mask))
    count_launch("cuda.neftune_scale", 1 if batch * seq_len else 0)
