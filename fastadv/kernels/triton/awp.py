"""Triton kernels for AWP, SAM and weight averaging, on multi-tensor tables.

Table lists (see :mod:`.multi_tensor`):

* AWP and SAM: ``0 = w`` (weights), ``1 = g`` (gradients), ``2 = b`` (backup);
* lerp (EMA / SWA): ``0 = a`` (the average, updated), ``1 = x`` (the model).

Every function here launches a constant number of kernels for any number of
tensors; the CUDA library (``csrc/awp.cu``, ``fastadv.kernels.cuda.awp``)
implements the same functions with the same arguments.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch
from . import multi_tensor as mt
from .multi_tensor import full_blocks, load, store, tensor_ptr, work_item

AWP_EPS = 1e-6   # the seed's e
SAM_EPS = 1e-12  # davda54's


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


# ---------------------------------------------------------------- SAM

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


# ---------------------------------------------------------------- lerp (EMA, SWA)

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


# ---------------------------------------------------------------- shared

per_tensor_norms = mt.per_tensor_norms
global_norm = mt.global_norm
copy = mt.copy
