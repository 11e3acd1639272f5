"""Triton kernels for FGM: a two-stage norm, one fused update, a row restore.

Layout and semantics are documented in docs/ARCHITECTURE.md ("FGM kernels");
the CUDA library (csrc/fgm.cu) implements the same four functions.  Dense mode
works on the flat tensor; row-sparse mode works on an embedding table
``[rows, cols]`` and visits only rows whose mask (or slot) says they may hold a
non-zero gradient.  No value is ever read back to the host.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch

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
def _partial_rows(g_ptr, mask_ptr, part_ptr, cols, BLOCK_C: tl.constexpr):
    # Stage 1, row-sparse: one program per row; unmarked rows are not read.
    row = tl.program_id(0)
    if tl.load(mask_ptr + row) == 0:
        tl.store(part_ptr + row, 0.0)
        return
    base = row.to(tl.int64) * cols
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    nonzero = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        g = tl.load(g_ptr + base + offs, mask=offs < cols, other=0.0).to(tl.float32)
        acc += g * g
        nonzero += (g != 0).to(tl.int32)
    tl.store(part_ptr + row, tl.sum(acc, axis=0))
    # A marked row whose gradient is all zero (grads zeroed in place since the
    # lookup) leaves the set, so the set does not grow without bound.
    if tl.sum(nonzero, axis=0) == 0:
        tl.store(mask_ptr + row, 0)


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
def _row_slot(slots_ptr, row):
    # slots = inclusive cumsum of the row mask: (touched, compact backup slot).
    end = tl.load(slots_ptr + row)
    start = tl.load(slots_ptr + row - 1, mask=row > 0, other=0)
    return end != start, (end - 1).to(tl.int64)


@triton.jit
def _update_rows(w_ptr, g_ptr, b_ptr, slots_ptr, norm_ptr, eps, cols, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    touched, slot = _row_slot(slots_ptr, row)
    if touched:
        norm = tl.load(norm_ptr)
        valid = (norm != 0) & (norm == norm)
        base = row.to(tl.int64) * cols
        for start in range(0, cols, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            m = offs < cols
            w = tl.load(w_ptr + base + offs, mask=m)
            tl.store(b_ptr + slot * cols + offs, w, mask=m)
            if valid:
                new = _perturbed(w, g_ptr, base + offs, m, norm, eps)
                tl.store(w_ptr + base + offs, new.to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _restore_rows(w_ptr, b_ptr, slots_ptr, cols, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    touched, slot = _row_slot(slots_ptr, row)
    if touched:
        base = row.to(tl.int64) * cols
        for start in range(0, cols, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            m = offs < cols
            tl.store(w_ptr + base + offs, tl.load(b_ptr + slot * cols + offs, mask=m), mask=m)


def _row_block(cols: int) -> int:
    return min(triton.next_power_of_2(max(cols, 1)), 2048)


def fgm_norm(g2d: torch.Tensor, mask, norm_out: torch.Tensor) -> None:
    """``norm_out[0] = ||g||`` (fp32).  ``mask``: uint8 ``[rows]`` or None (dense)."""
    if mask is None:
        numel = g2d.numel()
        n = triton.cdiv(numel, DENSE_BLOCK)
        part = torch.empty(max(n, 1), dtype=torch.float32, device=g2d.device)
        if n:
            _partial_dense[(n,)](g2d, part, numel, BLOCK=DENSE_BLOCK)
            count_launch("triton.fgm_partial")
    else:
        n, cols = g2d.shape
        part = torch.empty(max(n, 1), dtype=torch.float32, device=g2d.device)
        if n:
            _partial_rows[(n,)](g2d, mask, part, cols, BLOCK_C=_row_block(cols))
            count_launch("triton.fgm_partial")
    _finalize[(1,)](part, n, norm_out, BLOCK=FINALIZE_BLOCK)
    count_launch("triton.fgm_finalize")


def fgm_update(w2d, g2d, backup, slots, norm, eps: float) -> None:
    """Write the backup and, if the norm is usable, ``w += eps * g / norm``."""
    if slots is None:
        numel = w2d.numel()
        if numel:
            _update_dense[(triton.cdiv(numel, DENSE_BLOCK),)](
                w2d, g2d, backup, norm, float(eps), numel, BLOCK=DENSE_BLOCK)
            count_launch("triton.fgm_update")
        return
    rows, cols = w2d.shape
    if rows:
        _update_rows[(rows,)](w2d, g2d, backup, slots, norm, float(eps), cols,
                              BLOCK_C=_row_block(cols))
        count_launch("triton.fgm_update")


def fgm_restore_rows(w2d, backup, slots) -> None:
    """Copy the touched rows back from the compact backup, bit for bit."""
    rows, cols = w2d.shape
    if rows:
        _restore_rows[(rows,)](w2d, backup, slots, cols, BLOCK_C=_row_block(cols))
        count_launch("triton.fgm_restore")
