"""Triton kernels for FGM: a two-stage norm, one fused update, a row restore.

Layout and semantics are documented in docs/ARCHITECTURE.md ("FGM kernels");
the CUDA library (csrc/fgm.cu) implements the same functions.  Dense mode works
on the flat tensor; row mode works on ``[rows, cols]``: the norm pass reads all
of ``g`` and flags, on the device, every row holding a non-zero (or NaN / inf)
entry; the update and the restore touch only the flagged rows.  No value is
ever read back to the host.

Many tensors (the end of this file): the same passes over every tensor of one
call through multi-tensor work tables -- FSDP2 shards, with the all_reduce of
the squared norms between the reduction and the update, and unsharded calls
with several tables, without it.
"""

import torch
import triton
import triton.language as tl

from .. import count_launch, host
from ._trace import wrap_triton
from . import multi_tensor
from .multi_tensor import tensor_ptr, work_item

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
def _row_sq(g_p, base, cols, BLOCK_C: tl.constexpr):
    # One row's sum of squares and whether it holds an entry that is not zero
    # (NaN and inf included); shared by the per-tensor and the multi-tensor
    # row kernels, so both sum in the same order.
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    nonzero = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        g = tl.load(g_p + base + offs, mask=offs < cols, other=0.0).to(tl.float32)
        acc += g * g
        nonzero += (g != 0).to(tl.int32)
    return tl.sum(acc, axis=0), tl.sum(nonzero, axis=0) != 0


@triton.jit
def _partial_rows(g_ptr, rows_ptr, part_ptr, cols, BLOCK_C: tl.constexpr):
    # Stage 1, by rows: one program per row reads the whole row (the norm is
    # over all of g anyway) and records whether the row holds any entry that
    # is not zero (NaN and inf included).  Which rows carry gradient is read
    # from the gradient itself, never assumed from how the model read the table.
    row = tl.program_id(0)
    sq, any_g = _row_sq(g_ptr, row.to(tl.int64) * cols, cols, BLOCK_C)
    tl.store(part_ptr + row, sq)
    tl.store(rows_ptr + row, any_g.to(tl.uint8))


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
def _update_row(w_p, g_p, b_p, base, cols, norm, eps, valid, BLOCK_C: tl.constexpr):
    # One flagged row: back it up and, for a usable norm, perturb it (shared by
    # the per-tensor and the multi-tensor row kernels).
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        m = offs < cols
        w = tl.load(w_p + base + offs, mask=m)
        tl.store(b_p + base + offs, w, mask=m)
        if valid:
            new = _perturbed(w, g_p, base + offs, m, norm, eps)
            tl.store(w_p + base + offs, new.to(w_p.dtype.element_ty), mask=m)


@triton.jit
def _update_rows(w_ptr, g_ptr, b_ptr, rows_ptr, norm_ptr, eps, cols, BLOCK_C: tl.constexpr):
    # Rows without gradient are left alone: w + eps * 0 / norm == w.  The
    # backup is full-size and written only at the rows that change.
    row = tl.program_id(0)
    if tl.load(rows_ptr + row) != 0:
        norm = tl.load(norm_ptr)
        valid = (norm != 0) & (norm == norm)
        _update_row(w_ptr, g_ptr, b_ptr, row.to(tl.int64) * cols, cols, norm, eps, valid, BLOCK_C)


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


# ---- many tensors (FSDP2 shards, several tables): partials, sums, all_reduce + sqrt (caller), update
#
# One call attacks every tensor of one FGM attack.  Per group of non-empty tensors -- (dtype, mode,
# row block): the row block is ``_row_block(cols)``, a power of two from 1 to 2048, so a dtype has
# at most 12 row-mode groups and one dense group however many tensors it holds -- one partials
# launch and one update launch walk one multi-tensor work table (host.py's layout; dense: chunks
# of DENSE_BLOCK elements, lists w, g, b; rows: chunks of ROW_ITEM rows, lists flags, w, g, b, so
# list 0's "numel" is the row count); one launch sums every tensor's partials into its slot of
# the caller's [n] fp32 buffer: 2 x groups + 1 launches (3 for one group).  Each work item
# computes what the per-tensor kernels compute for its block / row (same blocks, same row block,
# same partials, the finalize's summation order), so a tensor's ||g||^2 is bitwise the one
# fgm_norm takes the sqrt of, and its update bitwise fgm_update's.  A small int64 *plan*
# (multi_tensor.plan_call, one host-to-device copy per call) says where each tensor's partials
# start, which slot is its, and its row length.

ROW_ITEM = 16   # rows per program of the row-mode multi-tensor kernels (a table chunk: multiple of 16)


@triton.jit
def _mt_partial_dense(table, T, like, plan, part_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # Chunk pid (BLOCK elements of tensor t): the partial _partial_dense writes for that block, at
    # plan[t] (the tensor's first partial) + its block index (table[4T + t]: its first chunk).
    pid = tl.program_id(0)
    t, start, end = work_item(table, pid, T, 3, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    g = tl.load(tensor_ptr(table, 1, t, T, like, ALIGNED) + offs, mask=offs < end, other=0.0).to(tl.float32)
    tl.store(part_ptr + tl.load(plan + t) + (pid - tl.load(table + 4 * T + t)), tl.sum(g * g, axis=0))


@triton.jit
def _mt_partial_rows(table, T, like, flags, plan, part_ptr, ITEM: tl.constexpr, BLOCK_C: tl.constexpr,
                     ALIGNED: tl.constexpr):
    # Rows [start, end) of tensor t, each as _partial_rows does it (the flag from the gradient itself).
    t, start, end = work_item(table, tl.program_id(0), T, 4, ITEM)
    rows_p = tensor_ptr(table, 0, t, T, flags, ALIGNED)
    g_p = tensor_ptr(table, 2, t, T, like, ALIGNED)
    first_part = tl.load(plan + t)
    cols = tl.load(plan + 2 * T + t)
    for row in range(start, end):
        sq, any_g = _row_sq(g_p, row * cols, cols, BLOCK_C)
        tl.store(part_ptr + first_part + row, sq)
        tl.store(rows_p + row, any_g.to(tl.uint8))


@triton.jit
def _mt_sum_parts(plan, K, part_ptr, out_ptr, BLOCK: tl.constexpr):
    # Program i: out[slot_i] = the partials [P_i, P_{i+1}) summed as _finalize sums a tensor's
    # (lanes counted from P_i), without the sqrt; plan = [P (K + 1) | slot (K)].  An empty tensor
    # (P_i == P_{i+1}) gets 0.
    i = tl.program_id(0)
    lo = tl.load(plan + i)
    hi = tl.load(plan + i + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(lo, hi, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < hi, other=0.0)
    tl.store(out_ptr + tl.load(plan + K + 1 + i), tl.sum(acc, axis=0))


@triton.jit
def _mt_update_dense(table, T, like, plan, norm_ptr, eps, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # _update_dense on one block of tensor t, with the (all-reduced) norm of its slot plan[T + t].
    t, start, end = work_item(table, tl.program_id(0), T, 3, BLOCK)
    norm = tl.load(norm_ptr + tl.load(plan + T + t))
    w_p = tensor_ptr(table, 0, t, T, like, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    m = offs < end
    w = tl.load(w_p + offs, mask=m)
    tl.store(tensor_ptr(table, 2, t, T, like, ALIGNED) + offs, w, mask=m)
    if (norm != 0) & (norm == norm):  # the reference's skip of a zero / NaN norm, on the device
        new = _perturbed(w, tensor_ptr(table, 1, t, T, like, ALIGNED), offs, m, norm, eps)
        tl.store(w_p + offs, new.to(w_p.dtype.element_ty), mask=m)


@triton.jit
def _mt_update_rows(table, T, like, flags, plan, norm_ptr, eps, ITEM: tl.constexpr, BLOCK_C: tl.constexpr,
                    ALIGNED: tl.constexpr):
    # _update_rows on rows [start, end) of tensor t: flagged rows backed up and, for a usable norm,
    # perturbed; the others left alone (their backup rows are never written nor read).
    t, start, end = work_item(table, tl.program_id(0), T, 4, ITEM)
    norm = tl.load(norm_ptr + tl.load(plan + T + t))
    valid = (norm != 0) & (norm == norm)
    rows_p = tensor_ptr(table, 0, t, T, flags, ALIGNED)
    w_p = tensor_ptr(table, 1, t, T, like, ALIGNED)
    g_p = tensor_ptr(table, 2, t, T, like, ALIGNED)
    b_p = tensor_ptr(table, 3, t, T, like, ALIGNED)
    cols = tl.load(plan + 2 * T + t)
    for row in range(start, end):
        if tl.load(rows_p + row) != 0:
            _update_row(w_p, g_p, b_p, row * cols, cols, norm, eps, valid, BLOCK_C)


ShardNorm = host.ShardNorm  # one tensor of a call (the host layer's, shared by both backends)

ShardPlan = multi_tensor.Planned  # what fgm_sq_many planned, for fgm_update_many (the same call's tensors)


def _by_rows(item: ShardNorm) -> bool:
    return item.rows is not None and item.w.shape[0] > 0


def _parts(item: ShardNorm) -> int:
    return item.w.shape[0] if _by_rows(item) else triton.cdiv(item.w.numel(), DENSE_BLOCK)


def _key(item: ShardNorm):
    """The (dtype, mode, row block) group of an item; None for one with nothing to launch (a
    row-mode tensor with rows has flags to write, even 0 wide).  The row block is the one
    fgm_norm / fgm_update take for its width (0 when dense), so each item runs exactly the
    per-tensor kernels' arithmetic: bitwise their result."""
    if _by_rows(item):
        return item.w.dtype, True, _row_block(item.w.shape[1])
    return (item.w.dtype, False, 0) if item.w.numel() else None


def _cols(item: ShardNorm) -> int:
    return item.w.shape[1] if _by_rows(item) else 0


def _group(items, key, plan) -> multi_tensor.Group:
    dtype, rows, block_c = key
    if rows:
        lists = [[s.rows for s in items], [s.w for s in items], [s.g for s in items],
                 [s.backup for s in items]]
        table = host.shared_tables().get("fgm_rows", lists, chunk=ROW_ITEM)
    else:
        lists = [[s.w.view(-1) for s in items], [s.g.view(-1) for s in items],
                 [s.backup.view(-1) for s in items]]
        table = host.shared_tables().get("fgm_dense", lists, chunk=DENSE_BLOCK)
    return multi_tensor.Group(rows, dtype, table, plan, block_c)


def fgm_sq_many(items, sq: torch.Tensor) -> ShardPlan:
    """``sq[s] = ||g||^2`` (fp32) of every item's tensor (``s`` its slot); row
    mode also writes the flags.  Launches: one partials launch per group of
    non-empty tensors (dtype, mode, row block), one sum launch."""
    if not items:
        return ShardPlan([])
    device = items[0].w.device
    call = multi_tensor.plan_call(items, _parts, _key, _cols, device)
    part = torch.empty(max(call.n_parts, 1), dtype=torch.float32, device=device)
    groups = []
    for planned in call.groups:
        g = _group([items[i] for i in planned.idx], planned.key, planned.plan)
        like = host.witness(g.dtype, device)
        if g.rows:
            _mt_partial_rows[(g.table.n_chunks,)](g.table.data, g.table.n_tensors, like,
                                                  host.witness(torch.uint8, device), g.plan, part,
                                                  ITEM=ROW_ITEM, BLOCK_C=g.block_c, ALIGNED=g.table.aligned)
        else:
            _mt_partial_dense[(g.table.n_chunks,)](g.table.data, g.table.n_tensors, like, g.plan, part,
                                                   BLOCK=DENSE_BLOCK, ALIGNED=g.table.aligned)
        groups.append(g)
    _mt_sum_parts[(len(items),)](call.plan, len(items), part, sq, BLOCK=FINALIZE_BLOCK)
    count_launch("triton.fgm", len(groups) + 1)
    return ShardPlan(groups)


def fgm_update_many(planned: ShardPlan, norms: torch.Tensor, eps: float) -> None:
    """Every item's backup and, where the norm of its slot of ``norms`` is
    usable (decided on the device), ``w += eps * g / norm``; one launch per
    group of :func:`fgm_sq_many`."""
    eps = float(eps)
    for g in planned.groups:
        device = g.table.device
        like = host.witness(g.dtype, device)
        if g.rows:
            _mt_update_rows[(g.table.n_chunks,)](g.table.data, g.table.n_tensors, like,
                                                 host.witness(torch.uint8, device), g.plan, norms, eps,
                                                 ITEM=ROW_ITEM, BLOCK_C=g.block_c, ALIGNED=g.table.aligned)
        else:
            _mt_update_dense[(g.table.n_chunks,)](g.table.data, g.table.n_tensors, like, g.plan, norms, eps,
                                                  BLOCK=DENSE_BLOCK, ALIGNED=g.table.aligned)
    if planned.groups:
        count_launch("triton.fgm", len(planned.groups))
