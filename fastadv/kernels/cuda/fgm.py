"""ctypes launchers of the FGM kernels in ``csrc/fgm.cu`` (see ``csrc/fastadv.h``).

The end of the file: the same passes over many tensors in one call
(``fgm_sq_many`` / ``fgm_update_many``, the interface of
:mod:`fastadv.kernels.triton.fgm`'s), bitwise the per-tensor ones."""
from __future__ import annotations


import torch

from .. import count_launch, host
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _check, _ptr, _stream, declare, dtype_code, lib
from . import multi_tensor

declare({
    "fastadv_fgm_workspace_floats": (_c_int64, [_c_int64, _c_int64, _c_int]),
    "fastadv_fgm_norm": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_void_p, _c_void_p,
                                  _c_void_p, _c_void_p]),
    "fastadv_fgm_update": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                    _c_void_p, _c_void_p, _c_float, _c_void_p]),
    "fastadv_fgm_restore_rows": (_c_int, [_c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                          _c_void_p, _c_void_p]),
    "fastadv_fgm_mt_partials": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int,
                                         _c_void_p, _c_int64, _c_void_p, _c_void_p]),
    "fastadv_fgm_mt_sum": (_c_int, [_c_void_p, _c_int64, _c_void_p, _c_void_p, _c_void_p]),
    "fastadv_fgm_mt_update": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int,
                                       _c_void_p, _c_void_p, _c_float, _c_void_p]),
})


def fgm_workspace_floats(rows: int, cols: int, sparse: bool) -> int:
    return int(lib().fastadv_fgm_workspace_floats(rows, cols, int(bool(sparse))))


def fgm_norm(g2d: torch.Tensor, rows_out: torch.Tensor | None, norm_out: torch.Tensor) -> torch.Tensor:
    """``norm_out[0] = ||g||_2`` (fp32, deterministic).

    ``g2d``: [rows, cols] contiguous (dense: pass ``rows_out=None`` and any 2-D
    view, it is reduced as one flat tensor).  ``rows_out``: uint8 [rows] or
    None; set to 1 where the row of g holds a non-zero entry, else 0.
    """
    _check(g2d, "g")
    _check(norm_out, "norm_out")
    if norm_out.dtype != torch.float32 or norm_out.numel() != 1:
        raise ValueError("norm_out must be a float32 tensor of one element")
    code = dtype_code(g2d.dtype)
    if rows_out is None:
        rows, cols, work = 1, g2d.numel(), g2d.numel()
    else:
        if g2d.dim() != 2:
            raise ValueError(f"row-mode fgm_norm needs a 2-D gradient, got shape {tuple(g2d.shape)}")
        rows, cols = g2d.shape
        work = rows
        _check_flags(rows_out, rows)
    with torch.cuda.device(g2d.device):
        ws = torch.empty(fgm_workspace_floats(rows, cols, rows_out is not None),
                         dtype=torch.float32, device=g2d.device)
        _call("fastadv_fgm_norm", _ptr(g2d), code, rows, cols, _ptr(rows_out), _ptr(ws),
              _ptr(norm_out), _stream(g2d))
    count_launch("cuda.fgm_norm", 2 if work > 0 else 1)  # partial sums (if any) + finalize
    return norm_out


def _check_flags(flags: torch.Tensor, rows: int) -> None:
    _check(flags, "rows")
    if flags.dtype != torch.uint8 or flags.numel() != rows:
        raise ValueError(f"rows must be a uint8 tensor of {rows} elements")


def fgm_update(w2d: torch.Tensor, g2d: torch.Tensor, backup: torch.Tensor,
               rows_in: torch.Tensor | None, norm: torch.Tensor, eps: float) -> None:
    """``backup <- w``; ``w += (eps * g) / norm`` unless ``norm`` is 0 or NaN (read on the device).

    Dense (``rows_in=None``): every element.  Row mode: only the rows flagged in
    ``rows_in`` (uint8 [rows], from :func:`fgm_norm`).  ``backup`` has w's shape.
    """
    for t, what in ((w2d, "w"), (g2d, "g"), (backup, "backup"), (norm, "norm")):
        _check(t, what)
    if g2d.shape != w2d.shape or g2d.dtype != w2d.dtype or backup.dtype != w2d.dtype:
        raise ValueError("w and g must have one shape, and w, g and backup one dtype")
    if backup.numel() != w2d.numel():
        raise ValueError("fgm_update needs a backup of w's numel")
    if norm.dtype != torch.float32 or norm.numel() != 1:
        raise ValueError("norm must be a float32 tensor of one element")
    code = dtype_code(w2d.dtype)
    if rows_in is None:
        rows, cols = 1, w2d.numel()
    else:
        if w2d.dim() != 2:
            raise ValueError(f"row-mode fgm_update needs a 2-D parameter, got shape {tuple(w2d.shape)}")
        rows, cols = w2d.shape
        _check_flags(rows_in, rows)
    with torch.cuda.device(w2d.device):
        _call("fastadv_fgm_update", _ptr(w2d), _ptr(g2d), _ptr(backup), code, rows, cols,
              _ptr(rows_in), _ptr(norm), float(eps), _stream(w2d))
    count_launch("cuda.fgm_update", 1 if rows * cols > 0 else 0)


def fgm_restore_rows(w2d: torch.Tensor, backup: torch.Tensor, rows_in: torch.Tensor) -> None:
    """``w[r] <- backup[r]`` for every row flagged in ``rows_in``, bit-exact."""
    for t, what in ((w2d, "w"), (backup, "backup")):
        _check(t, what)
    if w2d.dim() != 2:
        raise ValueError(f"fgm_restore_rows needs a 2-D parameter, got shape {tuple(w2d.shape)}")
    if backup.dtype != w2d.dtype or backup.shape != w2d.shape:
        raise ValueError("w and backup must have one shape and dtype")
    rows, cols = w2d.shape
    _check_flags(rows_in, rows)
    code = dtype_code(w2d.dtype)
    with torch.cuda.device(w2d.device):
        _call("fastadv_fgm_restore_rows", _ptr(w2d), _ptr(backup), code, rows, cols,
              _ptr(rows_in), _stream(w2d))
    count_launch("cuda.fgm_restore_rows", 1 if rows * cols > 0 else 0)


# ---- many tensors (FSDP2 shards, several tables): partials, sum, all_reduce + sqrt (caller), update
#
# Per group of non-empty tensors -- (dtype, mode): the CUDA row kernels take any row width, so a
# call has at most 6 groups -- one partials launch and one update launch over a work table, one
# sum launch for the call: 2 x groups + 1 launches.  Each tensor's partials are those of
# fgm_norm (its stage-1 blocks and row partials, the same helpers, the same vector width) and
# the sum is the finalize's, without the sqrt: ||g||^2 is bitwise the square fgm_norm takes the
# sqrt of, and the update bitwise fgm_update's (see csrc/fgm.cu).  That is the CUDA per-tensor
# summation order (stage-1 grids of up to 1024 grid-stride blocks, a warp per row), not the Triton
# kernels' (blocks of 4096): the backends agree within fp32 rounding, each is bitwise with itself.

ROW_ITEM = 16  # rows per block of the row-mode kernels (a table chunk: multiple of 16)


ShardNorm = host.ShardNorm  # one tensor of a call (the host layer's, shared by both backends)

ShardPlan = multi_tensor.Planned  # what fgm_sq_many planned, for fgm_update_many (the same call's tensors)


def _by_rows(item: ShardNorm) -> bool:
    return item.rows is not None and item.w.shape[0] > 0


def _parts(item: ShardNorm) -> int:
    return item.w.shape[0] if _by_rows(item) else fgm_workspace_floats(1, item.w.numel(), False)


def _key(item: ShardNorm):
    """The (dtype, mode) group of an item; None for one with nothing to launch (a row-mode
    tensor with rows has flags to write, even 0 wide)."""
    if _by_rows(item):
        return item.w.dtype, True
    return (item.w.dtype, False) if item.w.numel() else None


def _cols(item: ShardNorm) -> int:
    return item.w.shape[1] if _by_rows(item) else 0


def _group(items, key, plan, blocks) -> multi_tensor.Group:
    dtype, rows = key
    if rows:
        lists = [[s.rows for s in items], [s.w for s in items], [s.g for s in items], [s.backup for s in items]]
        table = multi_tensor.group_table("cuda_fgm_rows", lists, ROW_ITEM)
    else:
        lists = [[s.w.view(-1) for s in items], [s.g.view(-1) for s in items], [s.backup.view(-1) for s in items]]
        table = multi_tensor.group_table("cuda_fgm_dense", lists, multi_tensor.CHUNK)
    return multi_tensor.Group(rows, dtype, False, table, plan, blocks)


def fgm_sq_many(items, sq: torch.Tensor) -> ShardPlan:
    """``sq[s] = ||g||^2`` (fp32) of every item's tensor (``s`` its slot); row mode also
    writes the flags.  Launches: one partials launch per group of non-empty tensors (dtype,
    mode), one sum launch."""
    if not items:
        return ShardPlan([])
    multi_tensor.check_items("fgm_sq_many", items, ["rows"])
    multi_tensor.check_slots(items, sq, 1, "sq")
    device = items[0].w.device
    call = multi_tensor.plan_call(items, _parts, _key, _cols, device)
    part = torch.empty(max(call.n_parts, 1), dtype=torch.float32, device=device)
    groups = [_group([items[i] for i in p.idx], p.key, p.plan, p.blocks) for p in call.groups]
    with multi_tensor.where(call.plan):
        stream = _stream(call.plan)
        for g in groups:
            _call("fastadv_fgm_mt_partials", *multi_tensor.group_args(g), g.plan.data_ptr(), g.blocks,
                  part.data_ptr(), stream)
        _call("fastadv_fgm_mt_sum", call.plan.data_ptr(), len(items), part.data_ptr(), sq.data_ptr(), stream)
    count_launch("cuda.fgm", len(groups) + 1)
    return ShardPlan(groups, call.plan, max(s.slot for s in items) + 1)


def fgm_update_many(planned: ShardPlan, norms: torch.Tensor, eps: float) -> None:
    """Every item's backup and, where the norm of its slot of ``norms`` is usable (decided
    on the device), ``w += eps * g / norm``; one launch per group of :func:`fgm_sq_many`."""
    if not planned.groups:
        return
    planned.check(norms, 1, "norms")
    with multi_tensor.where(planned.plan):
        stream = _stream(planned.plan)
        for g in planned.groups:
            _call("fastadv_fgm_mt_update", *multi_tensor.group_args(g), g.plan.data_ptr(), norms.data_ptr(),
                  float(eps), stream)
    count_launch("cuda.fgm", len(planned.groups))
