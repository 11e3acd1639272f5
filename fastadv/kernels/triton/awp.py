"""Triton kernels of AWP on multi-tensor tables (:mod:`.multi_tensor`).

Table lists: ``0 = w`` (weights), ``1 = g`` (gradients), ``2 = b`` (backup).
Per dtype group a step is one reduction launch (:func:`awp_norms`: per-chunk
partial sums of ``g^2`` and ``w^2``, then the shared per-tensor finalize) and
one update launch (:func:`awp_update`), for any number of tensors.  The CUDA
library (``csrc/awp.cu``, ``fastadv.kernels.cuda.awp``) implements the same
functions with the same arguments; the restore is the multi-tensor copy.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch
from . import multi_tensor as mt
from .multi_tensor import full_blocks, load, store, tensor_ptr, work_item

AWP_EPS = 1e-6   # the seed's e


# ---------------------------------------------------------------- AWP

@triton.jit
def _awp_sumsq_block(w_p, g_p, offs, end, acc_g, acc_w, MASKED: tl.constexpr):
    g = load(g_p, offs, end, MASKED).to(tl.float32)
    w = load(w_p, offs, end, MASKED).to(tl.float32)
    return acc_g + g * g, acc_w + w * w


@triton.jit
def _awp_sumsq(table, T, N, like, part_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
               ALIGNED: tl.constexpr):
    # Stage 1 of ||g|| and ||w||: part[pid] = sum g^2, part[N + pid] = sum w^2 over one chunk.
    pid = tl.program_id(0)
    t, start, end = work_item(table, pid, T, 3, CHUNK)
    w_p = tensor_ptr(table, 0, t, T, like, ALIGNED)
    g_p = tensor_ptr(table, 1, t, T, like, ALIGNED)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    n_full, tail = full_blocks(start, end, BLOCK)
    for i in range(0, n_full):
        acc_g, acc_w = _awp_sumsq_block(w_p, g_p, start + i * BLOCK + tl.arange(0, BLOCK), end, acc_g,
                                        acc_w, False)
    if tail < end:
        acc_g, acc_w = _awp_sumsq_block(w_p, g_p, tail + tl.arange(0, BLOCK), end, acc_g, acc_w, True)
    tl.store(part_ptr + pid, tl.sum(acc_g, axis=0))
    tl.store(part_ptr + N + pid, tl.sum(acc_w, axis=0))


@triton.jit
def _clamp(x, lo, hi):
    # torch.min(torch.max(x, lo), hi), NaN-propagating like torch.
    x = tl.where((x < lo) | (lo != lo), lo, x)
    return tl.where((x > hi) | (hi != hi), hi, x)


@triton.jit
def _awp_update_block(w_p, g_p, b_p, offs, end, lr, den, num, eps, WRITE_BACKUP: tl.constexpr,
                      MASKED: tl.constexpr):
    w = load(w_p, offs, end, MASKED)
    if WRITE_BACKUP:
        store(b_p, offs, w, end, MASKED)
        w0 = w.to(tl.float32)
    else:
        w0 = load(b_p, offs, end, MASKED).to(tl.float32)
    g = load(g_p, offs, end, MASKED).to(tl.float32)
    new = w.to(tl.float32) + tl.div_rn(lr * g, den) * num
    bound = eps * tl.abs(w0)
    new = _clamp(new, w0 - bound, w0 + bound)
    store(w_p, offs, new.to(w_p.dtype.element_ty), end, MASKED)


@triton.jit
def _awp_update(table, T, like, norms_ptr, lr, eps, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                WRITE_BACKUP: tl.constexpr, ALIGNED: tl.constexpr):
    # w <- clamp(w + ((lr * g) / (||g|| + e)) * (||w|| + e), w0 -/+ eps * |w0|), in the
    # seed's order, unless ||g|| is 0 or NaN; w0 is the backup (written here on the first step).
    pid = tl.program_id(0)
    t, start, end = work_item(table, pid, T, 3, CHUNK)
    w_p = tensor_ptr(table, 0, t, T, like, ALIGNED)
    g_p = tensor_ptr(table, 1, t, T, like, ALIGNED)
    b_p = tensor_ptr(table, 2, t, T, like, ALIGNED)
    gnorm = tl.load(norms_ptr + t)
    den = gnorm + 1e-6
    num = tl.load(norms_ptr + T + t) + 1e-6
    n_full, tail = full_blocks(start, end, BLOCK)
    if (gnorm != 0) & (gnorm == gnorm):
        for i in range(0, n_full):
            _awp_update_block(w_p, g_p, b_p, start + i * BLOCK + tl.arange(0, BLOCK), end, lr, den, num,
                              eps, WRITE_BACKUP, False)
        if tail < end:
            _awp_update_block(w_p, g_p, b_p, tail + tl.arange(0, BLOCK), end, lr, den, num, eps,
                              WRITE_BACKUP, True)
    else:
        if WRITE_BACKUP:
            for i in range(0, n_full):
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                store(b_p, offs, load(w_p, offs, end, False), end, False)
            if tail < end:
                offs = tail + tl.arange(0, BLOCK)
                store(b_p, offs, load(w_p, offs, end, True), end, True)


def awp_norms(table: mt.TensorTable, dtype: torch.dtype, norms: torch.Tensor) -> None:
    """``norms[t] = ||g_t||``, ``norms[T + t] = ||w_t||`` (fp32 ``[2 * T]``)."""
    T, N = table.n_tensors, table.n_chunks
    partials = torch.empty(2 * max(N, 1), dtype=torch.float32, device=table.device)
    if N:
        _awp_sumsq[(N,)](table.data, T, N, mt.witness(dtype, table.device), partials,
                         CHUNK=table.chunk, BLOCK=mt.BLOCK, ALIGNED=table.aligned)
        count_launch("triton.awp_sumsq")
    mt.per_tensor_norms(table, partials, 2, norms)


def awp_update(table: mt.TensorTable, dtype: torch.dtype, norms: torch.Tensor, lr: float, eps: float,
               write_backup: bool) -> None:
    """The fused step + clamp (+ backup on the first step) over every tensor."""
    if table.n_chunks == 0:
        return
    _awp_update[(table.n_chunks,)](table.data, table.n_tensors, mt.witness(dtype, table.device), norms,
                                   float(lr), float(eps), CHUNK=table.chunk, BLOCK=mt.BLOCK,
                                   WRITE_BACKUP=bool(write_backup), ALIGNED=table.aligned,
                                   enable_fp_fusion=False)
    count_launch("triton.awp_update")
