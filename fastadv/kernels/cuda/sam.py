"""ctypes launchers of SAM's first-step kernels (``csrc/sam.cu``, with the
shared reductions of ``csrc/multi_tensor.cu``).  Same functions and arguments
as :mod:`fastadv.kernels.triton.sam`."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _stream, declare, dtype_code
from . import multi_tensor as mt

declare({
    "fastadv_sam_update": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int, _c_void_p, _c_float,
                                    _c_int, _c_void_p]),
})


def sam_sumsq(table, dtype, partials: torch.Tensor, adaptive: bool) -> None:
    """``partials[c]`` for each chunk c of the table (a slice of the shared buffer)."""
    mt.sumsq(table, dtype, partials, mt.MODE_ADAPTIVE if adaptive else mt.MODE_GRAD)


def sam_update(table, dtype, norm: torch.Tensor, rho: float, adaptive: bool) -> None:
    """Backup and perturbation of every tensor of the table."""
    if table.n_chunks == 0:
        return
    with mt.where(table):
        _call("fastadv_sam_update", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              dtype_code(dtype), mt.f32_ptr(norm, "norm"), float(rho), int(bool(adaptive)), _stream(table.data))
    count_launch("cuda.sam_update")
