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

Many tensors (the end of this file): the same passes over every tensor of one
call through multi-tensor work tables -- FSDP2 shards, with the all_reduce of
the sums between the reduction and the (finalize-fused) update, and unsharded
calls with several tables, without it.
"""

import torch
import triton
import triton.language as tl

from .. import count_launch, host
from ._trace import wrap_triton
from .fgm import DENSE_BLOCK, FINALIZE_BLOCK, _row_block
from . import multi_tensor
from .multi_tensor import tensor_ptr, work_item


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
def _row_sums(w_p, b_p, g_p, base, cols, saved, BLOCK_C: tl.constexpr):
    # One row's [||g||^2, ||r||^2, <r, g>] and whether it holds a non-zero
    # entry of g (NaN / inf included); r = w - w0 is read only on a saved row
    # (zero on rows never perturbed).  Shared by the per-tensor and the
    # multi-tensor row kernels, so both sum in the same order.
    gg = tl.zeros([BLOCK_C], dtype=tl.float32)
    rr = tl.zeros([BLOCK_C], dtype=tl.float32)
    rg = tl.zeros([BLOCK_C], dtype=tl.float32)
    nonzero = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        m = offs < cols
        g = tl.load(g_p + base + offs, mask=m, other=0.0).to(tl.float32)
        gg += g * g
        nonzero += (g != 0).to(tl.int32)
        if saved:
            r = (tl.load(w_p + base + offs, mask=m, other=0.0).to(tl.float32)
                 - tl.load(b_p + base + offs, mask=m, other=0.0).to(tl.float32))
            rr += r * r
            rg += r * g
    return tl.sum(gg, axis=0), tl.sum(rr, axis=0), tl.sum(rg, axis=0), tl.sum(nonzero, axis=0) != 0


@triton.jit
def _partial_rows(w_ptr, b_ptr, g_ptr, mask_ptr, saved_ptr, part_ptr, rows, cols,
                  BLOCK_C: tl.constexpr):
    # Every row of g is read (the norm is over all of it) and mask[row] set to
    # whether the row holds a non-zero entry (NaN / inf included): which rows
    # carry gradient is read from the gradient itself.
    row = tl.program_id(0)
    saved = tl.load(saved_ptr + row) != 0
    gg, rr, rg, any_g = _row_sums(w_ptr, b_ptr, g_ptr, row.to(tl.int64) * cols, cols, saved, BLOCK_C)
    tl.store(mask_ptr + row, any_g.to(tl.uint8))
    tl.store(part_ptr + row, gg)
    tl.store(part_ptr + rows + row, rr)
    tl.store(part_ptr + 2 * rows + row, rg)


@triton.jit
def _coef(gsum, rr, rg, alpha, eps):
    """(||g||, ||r'||, step?, project?) from the three sums: the one formula of
    the finalize, shared by the per-tensor and the multi-tensor kernels."""
    norm_g = tl.sqrt_rn(gsum)
    valid = (norm_g != 0) & (norm_g == norm_g)
    s = alpha / norm_g
    norm_r = tl.sqrt_rn(tl.maximum(rr + 2.0 * s * rg + s * s * gsum, 0.0))
    return norm_g, norm_r, valid, valid & (norm_r > eps)


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
    norm_g, norm_r, valid, project = _coef(tl.sum(gg, axis=0), tl.sum(rr, axis=0), tl.sum(rg, axis=0),
                                           alpha, eps)
    tl.store(coef_ptr, norm_g)
    tl.store(coef_ptr + 1, norm_r)
    tl.store(coef_ptr + 2, valid.to(tl.float32))
    tl.store(coef_ptr + 3, project.to(tl.float32))


@triton.jit
def _step_values(w, w0, g, norm_g, norm_r, project, alpha, eps):
    # The reference's order: d = w + (alpha g)/||g||; r = d - w0; project; w0 + r.
    r = (w + tl.div_rn(g * alpha, norm_g)) - w0
    r = tl.where(project, tl.div_rn(r * eps, norm_r), r)
    return w0 + r


@triton.jit
def _stepped(w, w0, g, coef_ptr, alpha, eps):
    return _step_values(w, w0, g, tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 3) != 0,
                        alpha, eps)


@triton.jit
def _update_row(w_p, b_p, g_p, base, cols, marked, saved, norm_g, norm_r, project, alpha, eps,
                BLOCK_C: tl.constexpr):
    # One visited row (flagged or perturbed before): backed up the first time it
    # is perturbed, then stepped; shared by the per-tensor and the multi-tensor
    # row kernels (same loads, same arithmetic).
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        m = offs < cols
        w_raw = tl.load(w_p + base + offs, mask=m)
        if saved:
            w0 = tl.load(b_p + base + offs, mask=m).to(tl.float32)
        else:  # first perturbation of this row: back it up now
            tl.store(b_p + base + offs, w_raw, mask=m)
            w0 = w_raw.to(tl.float32)
        g = tl.zeros([BLOCK_C], dtype=tl.float32)
        if marked:
            g = tl.load(g_p + base + offs, mask=m, other=0.0).to(tl.float32)
        new = _step_values(w_raw.to(tl.float32), w0, g, norm_g, norm_r, project, alpha, eps)
        tl.store(w_p + base + offs, new.to(w_p.dtype.element_ty), mask=m)


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
        _update_row(w_ptr, b_ptr, g_ptr, row.to(tl.int64) * cols, cols, marked, saved,
                    tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 3) != 0, alpha, eps, BLOCK_C)
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


# ---- the step over many tensors (FSDP2 shards, several tables): partials, sums, all_reduce (caller), apply
#
# One call steps every tensor of one PGD attack.  Per group of non-empty tensors -- (dtype, mode,
# dense first step, row block): the row block is ``_row_block(cols)``, a power of two from 1 to
# 2048, so a dtype has at most 12 row-mode groups and two dense ones however many tensors it
# holds -- one partials launch and one apply launch walk a multi-tensor work table (host.py's
# layout; dense: chunks of DENSE_BLOCK elements, lists w, g, b; rows: chunks of ROW_ITEM rows,
# lists mask, saved, w, g, b, so list 0's "numel" is the row count); one launch sums every
# tensor's partials into its 3-float slot of the caller's buffer: 2 x groups + 1 launches (3 for
# one group).  Each work item computes what the per-tensor kernels compute for its block / rows
# (same blocks, same row block, same partials, same summation order, the finalize's formula), so
# a tensor's sums and step are bitwise those of ``pgd_step``.  A small int64 *plan*
# (multi_tensor.plan_call, one host-to-device copy per call) says where each tensor's partials
# start, which slot of ``sums`` is its, and its row length.

ROW_ITEM = 16   # rows per program of the row-mode multi-tensor kernels (a table chunk: multiple of 16)


@triton.jit
def _mt_partial_dense(table, T, like, plan, part_ptr, NP, FIRST: tl.constexpr, BLOCK: tl.constexpr,
                      ALIGNED: tl.constexpr):
    # Chunk pid (BLOCK elements of tensor t): the partials _partial_dense writes for that block,
    # at plan[t] (the tensor's first partial) + its block index.
    pid = tl.program_id(0)
    t, start, end = work_item(table, pid, T, 3, BLOCK)
    idx = tl.load(plan + t) + (pid - tl.load(table + 4 * T + t))
    offs = start + tl.arange(0, BLOCK)
    m = offs < end
    g = tl.load(tensor_ptr(table, 1, t, T, like, ALIGNED) + offs, mask=m, other=0.0).to(tl.float32)
    if FIRST:
        w = g
        w0 = g
    else:
        w = tl.load(tensor_ptr(table, 0, t, T, like, ALIGNED) + offs, mask=m, other=0.0).to(tl.float32)
        w0 = tl.load(tensor_ptr(table, 2, t, T, like, ALIGNED) + offs, mask=m, other=0.0).to(tl.float32)
    gg, rr, rg = _sums(w, w0, g, FIRST)
    tl.store(part_ptr + idx, gg)
    tl.store(part_ptr + NP + idx, rr)
    tl.store(part_ptr + 2 * NP + idx, rg)


@triton.jit
def _mt_partial_rows(table, T, like, flags, plan, part_ptr, NP, ITEM: tl.constexpr,
                     BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr):
    # Rows [start, end) of tensor t, each as _partial_rows does it (mask from the gradient itself).
    t, start, end = work_item(table, tl.program_id(0), T, 5, ITEM)
    mask_p = tensor_ptr(table, 0, t, T, flags, ALIGNED)
    saved_p = tensor_ptr(table, 1, t, T, flags, ALIGNED)
    w_p = tensor_ptr(table, 2, t, T, like, ALIGNED)
    g_p = tensor_ptr(table, 3, t, T, like, ALIGNED)
    b_p = tensor_ptr(table, 4, t, T, like, ALIGNED)
    first_part = tl.load(plan + t)
    cols = tl.load(plan + 2 * T + t)
    for row in range(start, end):
        saved = tl.load(saved_p + row) != 0
        gg, rr, rg, any_g = _row_sums(w_p, b_p, g_p, row * cols, cols, saved, BLOCK_C)
        tl.store(mask_p + row, any_g.to(tl.uint8))
        tl.store(part_ptr + first_part + row, gg)
        tl.store(part_ptr + NP + first_part + row, rr)
        tl.store(part_ptr + 2 * NP + first_part + row, rg)


@triton.jit
def _mt_sum_parts(plan, K, part_ptr, NP, out_ptr, BLOCK: tl.constexpr):
    # Program i: out[3 slot_i + a] = the partials [P_i, P_{i+1}) of array a summed as _sum_parts
    # summed a tensor's (lanes counted from P_i); plan = [P (K + 1) | slot (K)].  An empty
    # tensor (P_i == P_{i+1}) gets zeros.
    i = tl.program_id(0)
    lo = tl.load(plan + i)
    hi = tl.load(plan + i + 1)
    slot = tl.load(plan + K + 1 + i)
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    rr = tl.zeros([BLOCK], dtype=tl.float32)
    rg = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(lo, hi, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < hi
        gg += tl.load(part_ptr + offs, mask=m, other=0.0)
        rr += tl.load(part_ptr + NP + offs, mask=m, other=0.0)
        rg += tl.load(part_ptr + 2 * NP + offs, mask=m, other=0.0)
    tl.store(out_ptr + 3 * slot, tl.sum(gg, axis=0))
    tl.store(out_ptr + 3 * slot + 1, tl.sum(rr, axis=0))
    tl.store(out_ptr + 3 * slot + 2, tl.sum(rg, axis=0))


@triton.jit
def _slot_coef(plan, T, t, sums_ptr, alpha, eps):
    # The finalize of tensor t, from its (all-reduced) slot: plan[T + t] is the slot.
    slot = tl.load(plan + T + t)
    return _coef(tl.load(sums_ptr + 3 * slot), tl.load(sums_ptr + 3 * slot + 1),
                 tl.load(sums_ptr + 3 * slot + 2), alpha, eps)


@triton.jit
def _mt_apply_dense(table, T, like, plan, sums_ptr, alpha, eps, FIRST: tl.constexpr,
                    BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # Finalize + _update_dense on one block of tensor t.
    t, start, end = work_item(table, tl.program_id(0), T, 3, BLOCK)
    norm_g, norm_r, valid, project = _slot_coef(plan, T, t, sums_ptr, alpha, eps)
    w_p = tensor_ptr(table, 0, t, T, like, ALIGNED)
    b_p = tensor_ptr(table, 2, t, T, like, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    m = offs < end
    w_raw = tl.load(w_p + offs, mask=m)
    if FIRST:
        tl.store(b_p + offs, w_raw, mask=m)
        w0 = w_raw.to(tl.float32)
    else:
        w0 = tl.load(b_p + offs, mask=m).to(tl.float32)
    if valid:
        g = tl.load(tensor_ptr(table, 1, t, T, like, ALIGNED) + offs, mask=m).to(tl.float32)
        new = _step_values(w_raw.to(tl.float32), w0, g, norm_g, norm_r, project, alpha, eps)
        tl.store(w_p + offs, new.to(w_p.dtype.element_ty), mask=m)


@triton.jit
def _mt_apply_rows(table, T, like, flags, plan, sums_ptr, alpha, eps, ITEM: tl.constexpr,
                   BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr):
    # Finalize + _update_rows on rows [start, end) of tensor t.
    t, start, end = work_item(table, tl.program_id(0), T, 5, ITEM)
    norm_g, norm_r, valid, project = _slot_coef(plan, T, t, sums_ptr, alpha, eps)
    mask_p = tensor_ptr(table, 0, t, T, flags, ALIGNED)
    saved_p = tensor_ptr(table, 1, t, T, flags, ALIGNED)
    w_p = tensor_ptr(table, 2, t, T, like, ALIGNED)
    g_p = tensor_ptr(table, 3, t, T, like, ALIGNED)
    b_p = tensor_ptr(table, 4, t, T, like, ALIGNED)
    cols = tl.load(plan + 2 * T + t)
    for row in range(start, end):
        marked = tl.load(mask_p + row) != 0
        saved = tl.load(saved_p + row) != 0
        if (marked | saved) & valid:
            _update_row(w_p, b_p, g_p, row * cols, cols, marked, saved, norm_g, norm_r, project, alpha, eps, BLOCK_C)
            tl.store(saved_p + row, 1)


ShardStep = host.ShardStep  # one tensor of a call (the host layer's, shared by both backends)

ShardSums = multi_tensor.Planned  # what pgd_sums_many planned, for pgd_apply_many (the same call's tensors)


def _parts(step: ShardStep) -> int:
    return step.w.shape[0] if step.mask is not None else triton.cdiv(step.w.numel(), DENSE_BLOCK)


def _key(step: ShardStep):
    """The (dtype, mode, dense first step, row block) group of a step; None for one with nothing
    to launch (a row-mode tensor has rows: flags to write).  The row block is the one pgd_step
    takes for its width (0 when dense), so each step runs exactly the per-tensor kernels'
    arithmetic: bitwise their result."""
    if step.mask is not None:
        return step.w.dtype, True, False, _row_block(step.w.shape[1])
    return (step.w.dtype, False, step.first, 0) if step.w.numel() else None


def _cols(step: ShardStep) -> int:
    return step.w.shape[1] if step.mask is not None else 0


def pgd_sums_many(steps, sums: torch.Tensor) -> ShardSums:
    """``sums[3 s : 3 s + 3] = [||g||^2, ||r||^2, <r, g>]`` of every step's
    tensor (``s`` its slot); row mode also writes ``mask``.  Launches: one
    partials launch per group of non-empty tensors (see above), one sum."""
    if not steps:
        return ShardSums([])
    device = steps[0].w.device
    call = multi_tensor.plan_call(steps, _parts, _key, _cols, device)
    NP = call.n_parts
    part = torch.empty(3 * max(NP, 1), dtype=torch.float32, device=device)
    groups, launches = [], 1
    for planned in call.groups:
        g = _group([steps[i] for i in planned.idx], planned.key, planned.plan)
        like = host.witness(g.dtype, device)
        if g.rows:
            _mt_partial_rows[(g.table.n_chunks,)](g.table.data, g.table.n_tensors, like,
                                                  host.witness(torch.uint8, device), g.plan, part, NP,
                                                  ITEM=ROW_ITEM, BLOCK_C=g.block_c, ALIGNED=g.table.aligned)
        else:
            _mt_partial_dense[(g.table.n_chunks,)](g.table.data, g.table.n_tensors, like, g.plan, part, NP,
                                                   FIRST=g.first, BLOCK=DENSE_BLOCK, ALIGNED=g.table.aligned)
        groups.append(g)
        launches += 1
    _mt_sum_parts[(len(steps),)](call.plan, len(steps), part, NP, sums, BLOCK=FINALIZE_BLOCK)
    count_launch("triton.pgd", launches)
    return ShardSums(groups)


def _group(steps, key, plan) -> multi_tensor.Group:
    dtype, rows, first, block_c = key
    if rows:
        lists = [[s.mask for s in steps], [s.saved for s in steps], [s.w for s in steps],
                 [s.g for s in steps], [s.backup for s in steps]]
        table = host.shared_tables().get("pgd_rows", lists, chunk=ROW_ITEM)
    else:
        lists = [[s.w for s in steps], [s.g for s in steps], [s.backup for s in steps]]
        table = host.shared_tables().get("pgd_dense", lists, chunk=DENSE_BLOCK)
    return multi_tensor.Group(rows, dtype, table, plan, block_c, first)


def pgd_apply_many(planned: ShardSums, sums: torch.Tensor, alpha: float, eps: float) -> None:
    """Every tensor's step from its (all-reduced) slot of ``sums``: the
    finalize (skip and projection decided on the device) fused into the
    update, one launch per group of :func:`pgd_sums_many`."""
    alpha, eps = float(alpha), float(eps)
    for g in planned.groups:
        device = g.table.device
        like = host.witness(g.dtype, device)
        if g.rows:
            _mt_apply_rows[(g.table.n_chunks,)](g.table.data, g.table.n_tensors, like,
                                                host.witness(torch.uint8, device), g.plan, sums, alpha, eps,
                                                ITEM=ROW_ITEM, BLOCK_C=g.block_c, ALIGNED=g.table.aligned)
        else:
            _mt_apply_dense[(g.table.n_chunks,)](g.table.data, g.table.n_tensors, like, g.plan, sums,
                                                 alpha, eps, FIRST=g.first, BLOCK=DENSE_BLOCK,
                                                 ALIGNED=g.table.aligned)
    if planned.groups:
        count_launch("triton.pgd", len(planned.groups))

def pgd_restore_rows(w, backup, saved) -> None:
    """Copy every saved row back, bit for bit, and clear ``saved``."""
    rows, cols = w.shape
    if rows:
        wrap_triton(_restore_rows)[(rows,)](w, backup, saved, cols, BLOCK_C=_row_block(cols))
        count_launch("triton.pgd_restore")
