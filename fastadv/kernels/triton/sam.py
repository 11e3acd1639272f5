"""Triton kernels of SAM's first step on multi-tensor tables (:mod:`.multi_tensor`).

Table lists: ``0 = w`` (weights), ``1 = g`` (gradients), ``2 = b`` (backup).
One call is, per bucket of (dtype, rho, adaptive), a reduction launch
(:func:`sam_sumsq`, one fp32 partial per chunk into a buffer shared by the
buckets), then one global finalize (``multi_tensor.global_norm``), then an
update launch per bucket (:func:`sam_update`: backup + perturbation in one
pass).  The CUDA twins are ``csrc/sam.cu`` / ``fastadv.kernels.cuda.sam``.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch
from . import multi_tensor as mt
from .multi_tensor import full_blocks, load, store, tensor_ptr, work_item

SAM_EPS = 1e-12  # davda54's


@triton.jit
def _sam_sumsq_block(w_p, g_p, offs, end, acc, ADAPTIVE: tl.constexpr, MASKED: tl.constexpr):
    g = load(g_p, offs, end, MASKED).to(tl.float32)
    if ADAPTIVE:
        g = tl.abs(load(w_p, offs, end, MASKED).to(tl.float32)) * g
    return acc + g * g


@triton.jit
def _sam_sumsq(table, T, like, part_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
               ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr):
    # part[pid] = sum over one chunk of g^2, or (|w| * g)^2 when adaptive.
    pid = tl.program_id(0)
    t, start, end = work_item(table, pid, T, 3, CHUNK)
    w_p = tensor_ptr(table, 0, t, T, like, ALIGNED)
    g_p = tensor_ptr(table, 1, t, T, like, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_full, tail = full_blocks(start, end, BLOCK)
    for i in range(0, n_full):
        acc = _sam_sumsq_block(w_p, g_p, start + i * BLOCK + tl.arange(0, BLOCK), end, acc, ADAPTIVE, False)
    if tail < end:
        acc = _sam_sumsq_block(w_p, g_p, tail + tl.arange(0, BLOCK), end, acc, ADAPTIVE, True)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _sam_update_block(w_p, g_p, b_p, offs, end, scale, ADAPTIVE: tl.constexpr, MASKED: tl.constexpr):
    w = load(w_p, offs, end, MASKED)
    store(b_p, offs, w, end, MASKED)
    w32 = w.to(tl.float32)
    e = load(g_p, offs, end, MASKED).to(tl.float32)
    if ADAPTIVE:
        e = (w32 * w32) * e
    store(w_p, offs, (w32 + e * scale).to(w_p.dtype.element_ty), end, MASKED)


@triton.jit
def _sam_update(table, T, like, norm_ptr, rho, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr):
    # b <- w; w <- w + ((w^2 if adaptive) * g) * (rho / (||.|| + 1e-12)).
    pid = tl.program_id(0)
    t, start, end = work_item(table, pid, T, 3, CHUNK)
    w_p = tensor_ptr(table, 0, t, T, like, ALIGNED)
    g_p = tensor_ptr(table, 1, t, T, like, ALIGNED)
    b_p = tensor_ptr(table, 2, t, T, like, ALIGNED)
    scale = tl.div_rn(rho, tl.load(norm_ptr) + 1e-12)
    n_full, tail = full_blocks(start, end, BLOCK)
    for i in range(0, n_full):
        _sam_update_block(w_p, g_p, b_p, start + i * BLOCK + tl.arange(0, BLOCK), end, scale, ADAPTIVE, False)
    if tail < end:
        _sam_update_block(w_p, g_p, b_p, tail + tl.arange(0, BLOCK), end, scale, ADAPTIVE, True)


def sam_sumsq(table: mt.TensorTable, dtype: torch.dtype, partials: torch.Tensor, adaptive: bool) -> None:
    """``partials[c]`` for each chunk c of the table (a slice of the shared buffer)."""
    if table.n_chunks == 0:
        return
    _sam_sumsq[(table.n_chunks,)](table.data, table.n_tensors, mt.witness(dtype, table.device), partials,
                                  CHUNK=table.chunk, BLOCK=mt.BLOCK, ADAPTIVE=bool(adaptive),
                                  ALIGNED=table.aligned)
    count_launch("triton.sam_sumsq")


def sam_update(table: mt.TensorTable, dtype: torch.dtype, norm: torch.Tensor, rho: float,
               adaptive: bool) -> None:
    """Backup and perturbation of every tensor of the table."""
    if table.n_chunks == 0:
        return
    _sam_update[(table.n_chunks,)](table.data, table.n_tensors, mt.witness(dtype, table.device), norm,
                                   float(rho), CHUNK=table.chunk, BLOCK=mt.BLOCK, ADAPTIVE=bool(adaptive),
                                   ALIGNED=table.aligned, enable_fp_fusion=False)
    count_launch("triton.sam_update")
