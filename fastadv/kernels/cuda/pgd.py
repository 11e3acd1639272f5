"""ctypes launchers of the PGD kernels in ``csrc/pgd.cu`` (contracts in ``csrc/fastadv.h``).

Same signatures and semantics as :mod:`fastadv.kernels.triton.pgd`: one step is
a reduction (``||g||^2``, ``||r||^2``, ``<r, g>``), a finalize writing
``coef = [||g||, ||r'||, step, project]`` on the device, and one fused step +
projection; the restore copies the saved rows back bit for bit.  The end of
the file: the step over many tensors in one call (``pgd_sums_many`` /
``pgd_apply_many``), bitwise the per-tensor one.
"""
from __future__ import annotations


import torch

from .. import count_launch, host
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _check, _ptr, _stream, declare, dtype_code, lib
from . import multi_tensor
from .fgm import ROW_ITEM

declare({
    "fastadv_pgd_workspace_floats": (_c_int64, [_c_int64, _c_int64, _c_int]),
    "fastadv_pgd_step": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                  _c_void_p, _c_void_p, _c_int, _c_void_p, _c_void_p,
                                  _c_float, _c_float, _c_void_p]),
    "fastadv_pgd_sums": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                  _c_void_p, _c_void_p, _c_int, _c_void_p, _c_void_p, _c_void_p]),
    "fastadv_pgd_restore_rows": (_c_int, [_c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                          _c_void_p, _c_void_p]),
    "fastadv_pgd_mt_partials": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_int,
                                         _c_void_p, _c_int64, _c_int64, _c_void_p, _c_void_p]),
    "fastadv_pgd_mt_sum": (_c_int, [_c_void_p, _c_int64, _c_void_p, _c_int64, _c_void_p, _c_void_p]),
    "fastadv_pgd_mt_apply": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_int,
                                      _c_void_p, _c_void_p, _c_float, _c_float, _c_void_p]),
})


def pgd_workspace_floats(rows: int, cols: int, sparse: bool) -> int:
    """fp32 scratch floats one :func:`pgd_step` needs (3 per partial sum)."""
    return int(lib().fastadv_pgd_workspace_floats(rows, cols, int(bool(sparse))))


def _check_flags(t: torch.Tensor, rows: int, what: str) -> None:
    _check(t, what)
    if t.dtype != torch.uint8 or t.numel() != rows:
        raise ValueError(f"{what} must be a uint8 tensor of {rows} elements")


def _sizes(w, g, backup, mask, saved) -> tuple[int, int, int]:
    """``(rows, cols, work)`` of a step, the arguments checked: dense (flat
    tensors, ``mask is None``) or row-sparse (``[rows, cols]``, uint8 flags)."""
    for t, what in ((w, "w"), (g, "g"), (backup, "backup")):
        _check(t, what)
    if g.dtype != w.dtype or backup.dtype != w.dtype:
        raise ValueError("w, g and backup must have one dtype")
    if mask is None:
        if saved is not None:
            raise ValueError("saved is only for the row-sparse step (give mask too)")
        if g.numel() != w.numel() or backup.numel() != w.numel():
            raise ValueError("dense pgd_step needs g and backup of w's numel")
        return 1, w.numel(), w.numel()
    if saved is None:
        raise ValueError("the row-sparse pgd_step needs saved with mask")
    if w.dim() != 2 or g.shape != w.shape or backup.shape != w.shape:
        raise ValueError(f"row-sparse pgd_step needs 2-D w, g and backup of one shape, got "
                         f"{tuple(w.shape)}, {tuple(g.shape)}, {tuple(backup.shape)}")
    rows, cols = w.shape
    _check_flags(mask, rows, "mask")
    _check_flags(saved, rows, "saved")
    return rows, cols, rows


def _check_f32(t, n: int, what: str) -> None:
    _check(t, what)
    if t.dtype != torch.float32 or t.numel() != n or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous float32 tensor of {n} elements")


def pgd_sums(w, g, backup, sums, first: bool, mask=None, saved=None) -> None:
    """The step's reduction only (FSDP2 shards: the caller all_reduces
    ``sums`` next): ``sums`` (fp32, 3 elements, may be a view into a larger
    buffer) <- ``[||g||^2, ||r||^2, <r, g>]``; row mode writes ``mask``."""
    rows, cols, work = _sizes(w, g, backup, mask, saved)
    _check_f32(sums, 3, "sums")
    with torch.cuda.device(w.device):
        ws = torch.empty(pgd_workspace_floats(rows, cols, mask is not None),
                         dtype=torch.float32, device=w.device)
        _call("fastadv_pgd_sums", _ptr(w), _ptr(g), _ptr(backup), dtype_code(w.dtype), rows, cols,
              _ptr(mask), _ptr(saved), int(bool(first)), _ptr(ws), _ptr(sums), _stream(w))
    count_launch("cuda.pgd", 2 if work else 1)  # partial sums + their sum, or the sum only


def pgd_step(w, g, backup, coef, alpha: float, eps: float, first: bool,
             mask=None, saved=None) -> None:
    """One PGD step in place (reduction + finalize + fused update).

    Dense (``mask is None``): flat tensors; ``first`` writes ``backup``.
    Row-sparse: ``w, g, backup`` are ``[rows, cols]``, ``mask`` and ``saved``
    uint8 ``[rows]`` (``mask`` loses the marked rows whose gradient is all
    zero; ``saved`` is updated: rows perturbed so far).  ``coef`` (fp32, 4
    elements) receives ``[||g||, ||r'||, step, project]``.
    """
    alpha, eps = float(alpha), float(eps)
    rows, cols, work = _sizes(w, g, backup, mask, saved)
    _check_f32(coef, 4, "coef")
    code = dtype_code(w.dtype)
    with torch.cuda.device(w.device):
        ws = torch.empty(pgd_workspace_floats(rows, cols, mask is not None),
                         dtype=torch.float32, device=w.device)
        _call("fastadv_pgd_step", _ptr(w), _ptr(g), _ptr(backup), code, rows, cols, _ptr(mask),
              _ptr(saved), int(bool(first)), _ptr(ws), _ptr(coef), alpha, eps, _stream(w))
    count_launch("cuda.pgd", 3 if work else 1)  # partial sums + finalize + update, or finalize only


def pgd_restore_rows(w, backup, saved) -> None:
    """Copy every saved row back, bit for bit, and clear ``saved``."""
    for t, what in ((w, "w"), (backup, "backup")):
        _check(t, what)
    if w.dim() != 2 or backup.shape != w.shape or backup.dtype != w.dtype:
        raise ValueError("pgd_restore_rows needs 2-D w and backup of one shape and dtype")
    rows, cols = w.shape
    _check_flags(saved, rows, "saved")
    code = dtype_code(w.dtype)
    with torch.cuda.device(w.device):
        _call("fastadv_pgd_restore_rows", _ptr(w), _ptr(backup), code, rows, cols, _ptr(saved),
              _stream(w))
    if rows:
        count_launch("cuda.pgd_restore")


# ---- the step over many tensors (FSDP2 shards, several tables): partials, sum, all_reduce (caller), apply
#
# Per group of non-empty tensors -- (dtype, mode, dense first step): at most 9 -- one partials
# launch and one apply launch over a work table, one sum launch for the call: 2 x groups + 1
# launches.  Each tensor's partials are those of pgd_sums (its stage-1 blocks and row partials,
# the same helpers, the same vector width), its three sums the finalize's, and its step the
# finalize's formula fused into the update: bitwise pgd_step's (see csrc/pgd.cu).


ShardStep = host.ShardStep  # one tensor of a call (the host layer's, shared by both backends)

ShardSums = multi_tensor.Planned  # what pgd_sums_many planned, for pgd_apply_many (the same call's tensors)


def _parts(step: ShardStep) -> int:
    if step.mask is not None:
        return step.w.shape[0]
    return pgd_workspace_floats(1, step.w.numel(), False) // 3


def _key(step: ShardStep):
    """The (dtype, mode, dense first step) group of a step; None for one with nothing to
    launch (a row-mode tensor has rows: flags to write)."""
    if step.mask is not None:
        return step.w.dtype, True, False
    return (step.w.dtype, False, bool(step.first)) if step.w.numel() else None


def _cols(step: ShardStep) -> int:
    return step.w.shape[1] if step.mask is not None else 0


def _group(steps, key, plan, blocks) -> multi_tensor.Group:
    dtype, rows, first = key
    if rows:
        lists = [[s.mask for s in steps], [s.saved for s in steps], [s.w for s in steps], [s.g for s in steps],
                 [s.backup for s in steps]]
        table = multi_tensor.group_table("cuda_pgd_rows", lists, ROW_ITEM)
    else:
        lists = [[s.w.view(-1) for s in steps], [s.g.view(-1) for s in steps], [s.backup.view(-1) for s in steps]]
        table = multi_tensor.group_table("cuda_pgd_dense", lists, multi_tensor.CHUNK)
    return multi_tensor.Group(rows, dtype, first, table, plan, blocks)


def pgd_sums_many(steps, sums: torch.Tensor) -> ShardSums:
    """``sums[3 s : 3 s + 3] = [||g||^2, ||r||^2, <r, g>]`` of every step's tensor (``s``
    its slot); row mode also writes ``mask``.  Launches: one partials launch per group of
    non-empty tensors, one sum launch."""
    if not steps:
        return ShardSums([])
    multi_tensor.check_items("pgd_sums_many", steps, ["mask", "saved"])
    multi_tensor.check_slots(steps, sums, 3, "sums")
    device = steps[0].w.device
    call = multi_tensor.plan_call(steps, _parts, _key, _cols, device)
    n_parts = call.n_parts
    part = torch.empty(3 * max(n_parts, 1), dtype=torch.float32, device=device)
    groups = [_group([steps[i] for i in p.idx], p.key, p.plan, p.blocks) for p in call.groups]
    with multi_tensor.where(call.plan):
        stream = _stream(call.plan)
        for g in groups:
            _call("fastadv_pgd_mt_partials", *multi_tensor.group_args(g), int(g.first), g.plan.data_ptr(), g.blocks,
                  n_parts, part.data_ptr(), stream)
        _call("fastadv_pgd_mt_sum", call.plan.data_ptr(), len(steps), part.data_ptr(), n_parts, sums.data_ptr(),
              stream)
    count_launch("cuda.pgd", len(groups) + 1)
    return ShardSums(groups, call.plan, max(s.slot for s in steps) + 1)


def pgd_apply_many(planned: ShardSums, sums: torch.Tensor, alpha: float, eps: float) -> None:
    """Every tensor's step from its (all-reduced) slot of ``sums``: the finalize (skip and
    projection decided on the device) fused into the update, one launch per group of
    :func:`pgd_sums_many`."""
    if not planned.groups:
        return
    planned.check(sums, 3, "sums")
    with multi_tensor.where(planned.plan):
        stream = _stream(planned.plan)
        for g in planned.groups:
            _call("fastadv_pgd_mt_apply", *multi_tensor.group_args(g), int(g.first), g.plan.data_ptr(), sums.data_ptr(),
                  float(alpha), float(eps), stream)
    count_launch("cuda.pgd", len(planned.groups))
