"""Triton kernels for one PGD step on an embedding: a reduction and a fused
step + projection (see docs/ARCHITECTURE.md, "PGD kernels").

With ``r = w - w0`` the perturbation so far and ``s = alpha / ||g||``, the new
perturbation ``r' = r + s g`` has ``||r'||^2 = ||r||^2 + 2 s <r, g> + s^2 ||g||^2``,
so one reduction pass (``||g||^2``, ``||r||^2``, ``<r, g>``) decides both the
skip (norm 0 / NaN) and the projection, on the device, before the one update
pass writes anything.  The update mirrors the reference's rounding order:
``d = w + (alpha g) / ||g||``, ``r = d - w0``, ``r = (eps r) / ||r||`` when
``||r|| > eps``, ``w = w0 + r``.

Dense mode works on the flat tensor (FIRST: ``r = 0`` and the update writes the
backup).  Row mode works on ``[rows, cols]`` with a full-size backup and a
``saved`` flag per row: the reduction reads all of ``g`` and flags (``mask``,
written on the device) every row holding a non-zero entry; the update visits a
row when it is flagged or was perturbed by an earlier step (``saved``), and
backs it up the first time it is perturbed.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch
from ._trace import wrap_triton
from .fgm import DENSE_BLOCK, FINALIZE_BLOCK, _row_block


@triton.jit
def _sums(w, w0, g, FIRST: tl.constexpr):
    gg = tl.sum(g * g, axis=0)
    if FIRST:
        return gg, 0.0, 0.0
    r = w - w0
    return gg, tl.sum(r * r, axis=0), tl.sum(r * g, axis=0)


@triton.jit
def _partial_dense(w_ptr, b_ptr, g_ptr, part_ptr, numel, nblocks,
                   FIRST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if FIRST:
        w = g
        w0 = g
    else:
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        w0 = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gg, rr, rg = _sums(w, w0, g, FIRST)
    tl.store(part_ptr + pid, gg)
    tl.store(part_ptr + nblocks + pid, rr)
    tl.store(part_ptr + 2 * nblocks + pid, rg)


@triton.jit
def _partial_rows(w_ptr, b_ptr, g_ptr, mask_ptr, saved_ptr, part_ptr, rows, cols,
                  BLOCK_C: tl.constexpr):
    # Every row of g is read (the norm is over all of it) and mask[row] set to
    # whether the row holds a non-zero entry (NaN / inf included): which rows
    # carry gradient is read from the gradient itself.
    row = tl.program_id(0)
    saved = tl.load(saved_ptr + row) != 0
    gg = tl.zeros([BLOCK_C], dtype=tl.float32)
    rr = tl.zeros([BLOCK_C], dtype=tl.float32)
    rg = tl.zeros([BLOCK_C], dtype=tl.float32)
    nonzero = tl.zeros([BLOCK_C], dtype=tl.int32)
    base = row.to(tl.int64) * cols
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        m = offs < cols
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        gg += g * g
        nonzero += (g != 0).to(tl.int32)
        if saved:  # r = w - w0 is zero on rows never perturbed
            r = (tl.load(w_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
                 - tl.load(b_ptr + base + offs, mask=m, other=0.0).to(tl.float32))
            rr += r * r
            rg += r * g
    tl.store(mask_ptr + row, (tl.sum(nonzero, axis=0) != 0).to(tl.uint8))
    tl.store(part_ptr + row, tl.sum(gg, axis=0))
    tl.store(part_ptr + rows + row, tl.sum(rr, axis=0))
    tl.store(part_ptr + 2 * rows + row, tl.sum(rg, axis=0))


@triton.jit
def _finalize(part_ptr, n, coef_ptr, alpha, eps, BLOCK: tl.constexpr):
    """coef = [||g||, ||r'||, step?, project?] from the three partial sums."""
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    rr = tl.zeros([BLOCK], dtype=tl.float32)
    rg = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        gg += tl.load(part_ptr + offs, mask=m, other=0.0)
        rr += tl.load(part_ptr + n + offs, mask=m, other=0.0)
        rg += tl.load(part_ptr + 2 * n + offs, mask=m, other=0.0)
    gsum = tl.sum(gg, axis=0)
    norm_g = tl.sqrt_rn(gsum)
    valid = (norm_g != 0) & (norm_g == norm_g)
    s = alpha / norm_g
    norm_r = tl.sqrt_rn(tl.maximum(tl.sum(rr, axis=0) + 2.0 * s * tl.sum(rg, axis=0) + s * s * gsum, 0.0))
    tl.store(coef_ptr, norm_g)
    tl.store(coef_ptr + 1, norm_r)
    tl.store(coef_ptr + 2, valid.to(tl.float32))
    tl.store(coef_ptr + 3, (valid & (norm_r > eps)).to(tl.float32))


@triton.jit
def _sum_parts(part_ptr, n, out_ptr, BLOCK: tl.constexpr):
    """out[0:3] = the three sums of ``n`` partials each (the reduction half of
    ``_finalize``), so that an all_reduce can combine them across shards
    before ``_finalize`` reads them back as ``n = 1`` partials."""
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    rr = tl.zeros([BLOCK], dtype=tl.float32)
    rg = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        gg += tl.load(part_ptr + offs, mask=m, other=0.0)
        rr += tl.load(part_ptr + n + offs, mask=m, other=0.0)
        rg += tl.load(part_ptr + 2 * n + offs, mask=m, other=0.0)
    tl.store(out_ptr, tl.sum(gg, axis=0))
    tl.store(out_ptr + 1, tl.sum(rr, axis=0))
    tl.store(out_ptr + 2, tl.sum(rg, axis=0))


@triton.jit
def _stepped(w, w0, g, coef_ptr, alpha, eps):
    # The reference's order: d = w + (alpha g)/||g||; r = d - w0; project; w0 + r.
    norm_g = tl.load(coef_ptr)
    norm_r = tl.load(coef_ptr + 1)
    project = tl.load(coef_ptr + 3) != 0
    r = (w + tl.div_rn(g * alpha, norm_g)) - w0
    r = tl.where(project, tl.div_rn(r * eps, norm_r), r)
    return w0 + r


@triton.jit
def _update_dense(w_ptr, b_ptr, g_ptr, coef_ptr, alpha, eps, numel,
                  FIRST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    w_raw = tl.load(w_ptr + offs, mask=m)
    if FIRST:
        tl.store(b_ptr + offs, w_raw, mask=m)
        w0 = w_raw.to(tl.float32)
    else:
        w0 = tl.load(b_ptr + offs, mask=m).to(tl.float32)
    if tl.load(coef_ptr + 2) != 0:
        g = tl.load(g_ptr + offs, mask=m).to(tl.float32)
        new = _stepped(w_raw.to(tl.float32), w0, g, coef_ptr, alpha, eps)
        tl.store(w_ptr + offs, new.to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _update_rows(w_ptr, b_ptr, g_ptr, mask_ptr, saved_ptr, coef_ptr, alpha, eps, cols,
                 BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    marked = tl.load(mask_ptr + row) != 0
    saved = tl.load(saved_ptr + row) != 0
    if (marked | saved) & (tl.load(coef_ptr + 2) != 0):
        base = row.to(tl.int64) * cols
        for start in range(0, cols, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            m = offs < cols
            w_raw = tl.load(w_ptr + base + offs, mask=m)
            if saved:
                w0 = tl.load(b_ptr + base + offs, mask=m).to(tl.float32)
            else:  # first perturbation of this row: back it up now
                tl.store(b_ptr + base + offs, w_raw, mask=m)
                w0 = w_raw.to(tl.float32)
            g = tl.zeros([BLOCK_C], dtype=tl.float32)
            if marked:
                g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            new = _stepped(w_raw.to(tl.float32), w0, g, coef_ptr, alpha, eps)
            tl.store(w_ptr + base + offs, new.to(w_ptr.dtype.element_ty), mask=m)
        tl.store(saved_ptr + row, 1)


@triton.jit
def _restore_rows(w_ptr, b_ptr, saved_ptr, cols, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(saved_ptr + row) != 0:
        base = row.to(tl.int64) * cols
        for start in range(0, cols, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            m = offs < cols
            tl.store(w_ptr + base + offs, tl.load(b_ptr + base + offs, mask=m), mask=m)
        tl.store(saved_ptr + row, 0)


def pgd_step(w, g, backup, coef, alpha: float, eps: float, first: bool,
             mask=None, saved=None) -> None:
    """One PGD step in place (reduction + finalize + fused update).

    Dense (``mask is None``): flat tensors; ``first`` writes ``backup``.
    Row mode: ``w, g, backup`` are ``[rows, cols]``, ``mask`` and ``saved``
    uint8 ``[rows]``; ``mask`` is written (rows of g holding a non-zero
    entry), ``saved`` updated (rows perturbed so far).
    """
    alpha, eps = float(alpha), float(eps)
    part, n = _partials(w, g, backup, first, mask, saved)
    wrap_triton(_finalize)[(1,)](part, n, coef, alpha, eps, BLOCK=FINALIZE_BLOCK)
    _update(w, g, backup, coef, alpha, eps, first, mask, saved)
    count_launch("triton.pgd", 3 if n else 1)


def _partials(w, g, backup, first: bool, mask, saved) -> tuple[torch.Tensor, int]:
    """The reduction pass of a step: ``(part, n)``, ``part`` holding ``n``
    partials of each of ``[||g||^2, ||r||^2, <r, g>]`` (no launch when ``n == 0``)."""
    if mask is None:
        numel = w.numel()
        n = triton.cdiv(numel, DENSE_BLOCK)
        part = torch.empty(3 * max(n, 1), dtype=torch.float32, device=w.device)
        if n:
            wrap_triton(_partial_dense)[(n,)](w, backup, g, part, numel, n, FIRST=first, BLOCK=DENSE_BLOCK)
        return part, n
    rows, cols = w.shape
    part = torch.empty(3 * max(rows, 1), dtype=torch.float32, device=w.device)
    if rows:
        wrap_triton(_partial_rows)[(rows,)](w, backup, g, mask, saved, part, rows, cols,
                                            BLOCK_C=_row_block(cols))
    return part, rows


def _update(w, g, backup, coef, alpha: float, eps: float, first: bool, mask, saved) -> int:
    """The fused update pass from ``coef``; returns its grid size (0: no launch)."""
    if mask is None:
        numel = w.numel()
        n = triton.cdiv(numel, DENSE_BLOCK)
        if n:
            wrap_triton(_update_dense)[(n,)](w, backup, g, coef, alpha, eps, numel, FIRST=first, BLOCK=DENSE_BLOCK)
        return n
    rows, cols = w.shape
    if rows:
        wrap_triton(_update_rows)[(rows,)](w, backup, g, mask, saved, coef, alpha, eps, cols,
                                           BLOCK_C=_row_block(cols))
    return rows


# ---- the step split for shards (FSDP2): sums, all_reduce (by the caller), apply -------------

def pgd_sums(w, g, backup, sums, first: bool, mask=None, saved=None) -> None:
    """The step's reduction only: ``sums`` (fp32, 3 elements, may be a view
    into the caller's buffer) receives this tensor's ``[||g||^2, ||r||^2,
    <r, g>]``; row mode also writes ``mask``.  Two launches (partials, sum)."""
    part, n = _partials(w, g, backup, first, mask, saved)
    wrap_triton(_sum_parts)[(1,)](part, n, sums, BLOCK=FINALIZE_BLOCK)
    count_launch("triton.pgd", 2 if n else 1)


def pgd_apply(w, g, backup, sums, coef, alpha: float, eps: float, first: bool,
              mask=None, saved=None) -> None:
    """The rest of the step from the (all-reduced) ``sums`` of :func:`pgd_sums`:
    the finalize (skip and projection decided on the device) and the fused
    update, as :func:`pgd_step` does them."""
    alpha, eps = float(alpha), float(eps)
    wrap_triton(_finalize)[(1,)](sums, 1, coef, alpha, eps, BLOCK=FINALIZE_BLOCK)
    n = _update(w, g, backup, coef, alpha, eps, first, mask, saved)
    count_launch("triton.pgd", 2 if n else 1)


def pgd_restore_rows(w, backup, saved) -> None:
    """Copy every saved row back, bit for bit, and clear ``saved``."""
    rows, cols = w.shape
    if rows:
        wrap_triton(_restore_rows)[(rows,)](w, backup, saved, cols, BLOCK_C=_row_block(cols))
        count_launch("triton.pgd_restore")
