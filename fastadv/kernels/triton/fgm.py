"""Triton kernels for FGM: a two-stage norm, one fused update, a row restore.

Layout and semantics are documented in docs/ARCHITECTURE.md ("FGM kernels");
the CUDA library (csrc/fgm.cu) implements the same functions.  Dense mode works
on the flat tensor; row mode works on ``[rows, cols]``: the norm pass reads all
of ``g`` and flags, on the device, every row holding a non-zero (or NaN / inf)
entry; the update and the restore touch only the flagged rows.  No value is
ever read back to the host.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch
from ._trace import wrap_triton

DENSE_BLOCK = 4096      # elements per program, dense passes
FINALIZE_BLOCK = 1024   # partials summed per iteration by the finalize program


@triton.jit
def _partial_dense(g_ptr, part_ptr, numel, BLOCK: tl.constexpr):
    # Stage 1 of ||g||: one fp32 sum of squares per block of BLOCK elements.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(g * g, axis=0))


@triton.jit
def _partial_rows(g_ptr, rows_ptr, part_ptr, cols, BLOCK_C: tl.constexpr):
    # Stage 1, by rows: one program per row reads the whole row (the norm is
    # over all of g anyway) and records whether the row holds any entry that
    # is not zero (NaN and inf included).  Which rows carry gradient is read
    # from the gradient itself, never assumed from how the model read the table.
    row = tl.program_id(0)
    base = row.to(tl.int64) * cols
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    nonzero = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        g = tl.load(g_ptr + base + offs, mask=offs < cols, other=0.0).to(tl.float32)
        acc += g * g
        nonzero += (g != 0).to(tl.int32)
    tl.store(part_ptr + row, tl.sum(acc, axis=0))
    tl.store(rows_ptr + row, (tl.sum(nonzero, axis=0) != 0).to(tl.uint8))


@triton.jit
def _finalize(part_ptr, n, norm_ptr, BLOCK: tl.constexpr):
    # Stage 2: a single program sums the partials in a fixed order (deterministic).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < n, other=0.0)
    tl.store(norm_ptr, tl.sqrt_rn(tl.sum(acc, axis=0)))


@triton.jit
def _perturbed(w, g_ptr, offs, m, norm, eps):
    # w + (eps * g) / norm in fp32, in the reference's order (bit-equal for fp32).
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    return w.to(tl.float32) + tl.div_rn(g * eps, norm)


@triton.jit
def _update_dense(w_ptr, g_ptr, b_ptr, norm_ptr, eps, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    w = tl.load(w_ptr + offs, mask=m)
    tl.store(b_ptr + offs, w, mask=m)
    norm = tl.load(norm_ptr)
    # The reference skips a zero or NaN norm; decided here, on the device.
    if (norm != 0) & (norm == norm):
        new = _perturbed(w, g_ptr, offs, m, norm, eps)
        tl.store(w_ptr + offs, new.to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _update_rows(w_ptr, g_ptr, b_ptr, rows_ptr, norm_ptr, eps, cols, BLOCK_C: tl.constexpr):
    # Rows without gradient are left alone: w + eps * 0 / norm == w.  The
    # backup is full-size and written only at the rows that change.
    row = tl.program_id(0)
    if tl.load(rows_ptr + row) != 0:
        norm = tl.load(norm_ptr)
        valid = (norm != 0) & (norm == norm)
        base = row.to(tl.int64) * cols
        for start in range(0, cols, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            m = offs < cols
            w = tl.load(w_ptr + base + offs, mask=m)
            tl.store(b_ptr + base + offs, w, mask=m)
            if valid:
                new = _perturbed(w, g_ptr, base + offs, m, norm, eps)
                tl.store(w_ptr + base + offs, new.to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _restore_rows(w_ptr, b_ptr, rows_ptr, cols, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(rows_ptr + row) != 0:
        base = row.to(tl.int64) * cols
        for start in range(0, cols, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            m = offs < cols
            tl.store(w_ptr + base + offs, tl.load(b_ptr + base + offs, mask=m), mask=m)


def _row_block(cols: int) -> int:
    return min(triton.next_power_of_2(max(cols, 1)), 2048)


def fgm_norm(g2d: torch.Tensor, rows_out, norm_out: torch.Tensor) -> None:
    """``norm_out[0] = ||g||`` (fp32).  ``rows_out``: None (dense, ``g2d`` is
    reduced flat) or uint8 ``[rows]``, set to 1 where the row of ``g2d`` holds
    a non-zero entry (NaN / inf included) and 0 elsewhere."""
    if rows_out is None:
        numel = g2d.numel()
        n = triton.cdiv(numel, DENSE_BLOCK)
        part = torch.empty(max(n, 1), dtype=torch.float32, device=g2d.device)
        if n:
            wrap_triton(_partial_dense)[(n,)](g2d, part, numel, BLOCK=DENSE_BLOCK)
            count_launch("triton.fgm_partial")
    else:
        n, cols = g2d.shape
        part = torch.empty(max(n, 1), dtype=torch.float32, device=g2d.device)
        if n:
            wrap_triton(_partial_rows)[(n,)](g2d, rows_out, part, cols, BLOCK_C=_row_block(cols))
            count_launch("triton.fgm_partial")
    wrap_triton(_finalize)[(1,)](part, n, norm_out, BLOCK=FINALIZE_BLOCK)
    count_launch("triton.fgm_finalize")


def fgm_update(w2d, g2d, backup, rows, norm, eps: float) -> None:
    """Write the backup and, if the norm is usable, ``w += eps * g / norm``;
    ``rows`` (uint8 per row, from :func:`fgm_norm`) limits both to the rows
    that hold gradient, None means every element."""
    if rows is None:
        numel = w2d.numel()
        if numel:
            wrap_triton(_update_dense)[(triton.cdiv(numel, DENSE_BLOCK),)](
                w2d, g2d, backup, norm, float(eps), numel, BLOCK=DENSE_BLOCK)
            count_launch("triton.fgm_update")
        return
    n, cols = w2d.shape
    if n:
        wrap_triton(_update_rows)[(n,)](w2d, g2d, backup, rows, norm, float(eps), cols, BLOCK_C=_row_block(cols))
        count_launch("triton.fgm_update")


def fgm_restore_rows(w2d, backup, rows) -> None:
    """Copy the rows marked in ``rows`` back from the full-size backup, bit for bit."""
    n, cols = w2d.shape
    if n:
        wrap_triton(_restore_rows)[(n,)](w2d, backup, rows, cols, BLOCK_C=_row_block(cols))
        count_launch("triton.fgm_restore")
