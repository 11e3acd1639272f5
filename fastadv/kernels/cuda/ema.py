"""ctypes launcher of the weight-averaging kernel (``csrc/ema.cu``): EMA /
SWA's ``a <- lerp(a, x, weight)`` over a multi-tensor table.  Same function
and arguments as :mod:`fastadv.kernels.triton.ema`."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _stream, declare, dtype_code
from . import multi_tensor as mt

declare({
    "fastadv_mt_lerp": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_float, _c_void_p,
                                 _c_void_p]),
})


def lerp(table, dtype_a, dtype_x, weight: float, count: torch.Tensor | None = None) -> None:
    """``a <- a + weight * (x - a)`` over the table (``count``: weight = 1/(count+1))."""
    if table.n_chunks == 0:
        return
    if count is not None and (count.dtype != torch.int64 or count.device != table.device):
        raise ValueError("count must be an int64 tensor on the tables' device")
    with mt.where(table):
        _call("fastadv_mt_lerp", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              dtype_code(dtype_a), dtype_code(dtype_x), float(weight),
              None if count is None else count.data_ptr(), _stream(table.data))
    count_launch("cuda.lerp")
