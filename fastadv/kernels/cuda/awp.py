"""ctypes launchers of AWP's kernels (``csrc/awp.cu``, with the shared
reductions of ``csrc/multi_tensor.cu``).  Same functions and arguments as
:mod:`fastadv.kernels.triton.awp`."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _stream, declare, dtype_code
from . import multi_tensor as mt

declare({
    "fastadv_awp_update": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int, _c_void_p, _c_float,
                                    _c_float, _c_int, _c_void_p]),
})


def awp_norms(table, dtype, norms: torch.Tensor) -> None:
    """``norms[t] = ||g_t||``, ``norms[T + t] = ||w_t||``."""
    partials = torch.empty(2 * max(table.n_chunks, 1), dtype=torch.float32, device=table.device)
    mt.sumsq(table, dtype, partials, mt.MODE_AWP)
    mt.per_tensor_norms(table, partials, 2, norms)


def awp_update(table, dtype, norms: torch.Tensor, lr: float, eps: float, write_backup: bool) -> None:
    if table.n_chunks == 0:
        return
    with mt.where(table):
        _call("fastadv_awp_update", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              dtype_code(dtype), mt.f32_ptr(norms, "norms"), float(lr), float(eps), int(bool(write_backup)),
              _stream(table.data))
    count_launch("cuda.awp_update")
