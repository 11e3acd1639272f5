"""Triton kernel of weight averaging (EMA, SWA): ``a <- lerp(a, x, weight)``
over a multi-tensor table (:mod:`.multi_tensor`).

Table lists: ``0 = a`` (the average, updated), ``1 = x`` (the model).  One
launch per (average, model) dtype pair, reading each tensor once and writing
the average once.  The CUDA twin is ``csrc/ema.cu`` / ``fastadv.kernels.cuda.ema``.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch
from . import multi_tensor as mt
from .multi_tensor import full_blocks, load, store, tensor_ptr, work_item


@triton.jit
def _lerp_block(a_p, x_p, offs, end, weight, MASKED: tl.constexpr):
    a = load(a_p, offs, end, MASKED).to(tl.float32)
    x = load(x_p, offs, end, MASKED).to(tl.float32)
    diff = x - a
    new = tl.where(weight < 0.5, a + weight * diff, x - diff * (1.0 - weight))
    store(a_p, offs, new.to(a_p.dtype.element_ty), end, MASKED)


@triton.jit
def _lerp(table, T, like_a, like_x, weight, count_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
          FROM_COUNT: tl.constexpr, ALIGNED: tl.constexpr):
    # a <- lerp(a, x, weight) in fp32 (torch.lerp's formula); with FROM_COUNT the
    # weight is 1 / (count + 1), count read on the device (SWA's n_averaged).
    pid = tl.program_id(0)
    t, start, end = work_item(table, pid, T, 2, CHUNK)
    a_p = tensor_ptr(table, 0, t, T, like_a, ALIGNED)
    x_p = tensor_ptr(table, 1, t, T, like_x, ALIGNED)
    if FROM_COUNT:
        weight = tl.div_rn(1.0, (tl.load(count_ptr) + 1).to(tl.float32))
    n_full, tail = full_blocks(start, end, BLOCK)
    for i in range(0, n_full):
        _lerp_block(a_p, x_p, start + i * BLOCK + tl.arange(0, BLOCK), end, weight, False)
    if tail < end:
        _lerp_block(a_p, x_p, tail + tl.arange(0, BLOCK), end, weight, True)


def lerp(table: mt.TensorTable, dtype_a: torch.dtype, dtype_x: torch.dtype, weight: float,
         count: torch.Tensor | None = None) -> None:
    """``a <- a + weight * (x - a)`` over the table (``count``: weight = 1/(count+1))."""
    if table.n_chunks == 0:
        return
    dev = table.device
    _lerp[(table.n_chunks,)](table.data, table.n_tensors, mt.witness(dtype_a, dev), mt.witness(dtype_x, dev),
                             float(weight), count if count is not None else mt.witness(torch.int64, dev),
                             CHUNK=table.chunk, BLOCK=mt.BLOCK, FROM_COUNT=count is not None,
                             ALIGNED=table.aligned, enable_fp_fusion=False)
    count_launch("triton.lerp")
