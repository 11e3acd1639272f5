"""ctypes launchers of the multi-tensor plumbing in ``csrc/multi_tensor.cu``:
the chunk reductions (sums of squares), their per-tensor and global
finalizes, and the multi-tensor copy.  Same functions and arguments as
:mod:`fastadv.kernels.triton.multi_tensor`; the tables are the shared
:class:`fastadv.kernels.host.TensorTable`.  The end of the file plans the
multi-tensor FGM / PGD steps (``kernels/cuda/fgm.py``, ``pgd.py``)."""
from __future__ import annotations

import dataclasses
import functools

import torch

from .. import count_launch, host
from ..host import CHUNK, shared_tables  # noqa: F401  (CHUNK: the dense groups' chunk)
from . import _c_int, _c_int64, _c_void_p, _call, _check, _stream, declare, dtype_code

# fastadv_mt_sumsq modes: AWP (sum g^2 and sum w^2), SAM (sum g^2), ASAM (sum (|w| g)^2)
MODE_AWP, MODE_GRAD, MODE_ADAPTIVE = 0, 1, 2

declare({
    "fastadv_mt_sumsq": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int,
                                  _c_void_p, _c_void_p]),
    "fastadv_mt_norms": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_void_p, _c_int, _c_void_p,
                                  _c_void_p]),
    "fastadv_mt_global_norm": (_c_int, [_c_void_p, _c_int64, _c_void_p, _c_void_p]),
    "fastadv_mt_copy": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_int, _c_int,
                                 _c_void_p]),
})


def where(table):
    """The device guard of a table's launches (refusing a table on another device type)."""
    if table.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors; got tensors on {table.device}")
    return torch.cuda.device(table.device)


def f32_ptr(t: torch.Tensor, what: str) -> int:
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cuda":
        raise ValueError(f"{what} must be a contiguous float32 CUDA tensor")
    return t.data_ptr()


def sumsq(table, dtype, partials: torch.Tensor, mode: int) -> None:
    """One fp32 partial per chunk (``[2, N]`` for :data:`MODE_AWP`)."""
    if table.n_chunks == 0:
        return
    with where(table):
        _call("fastadv_mt_sumsq", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              table.chunk, dtype_code(dtype), mode, f32_ptr(partials, "partials"), _stream(table.data))
    count_launch("cuda.mt_sumsq")


def per_tensor_norms(table, partials: torch.Tensor, arrays: int, out: torch.Tensor) -> None:
    """``out[a*T + t] = sqrt(sum of tensor t's partials in array a)``."""
    if table.n_tensors == 0:
        return
    with where(table):
        _call("fastadv_mt_norms", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              f32_ptr(partials, "partials"), arrays, f32_ptr(out, "out"), _stream(table.data))
    count_launch("cuda.mt_norms")


def global_norm(partials: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """``out[0] = sqrt(sum(partials[:n]))``, fixed order."""
    with torch.cuda.device(partials.device):
        _call("fastadv_mt_global_norm", f32_ptr(partials, "partials"), n, f32_ptr(out, "out"),
              _stream(partials))
    count_launch("cuda.mt_global_norm")


def copy(table, dst: int, src: int, dst_dtype, src_dtype) -> None:
    """List ``dst`` <- list ``src`` of ``table``; bit-exact when the dtypes match."""
    if table.n_chunks == 0:
        return
    with where(table):
        _call("fastadv_mt_copy", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              table.chunk, dst, dtype_code(dst_dtype), src, dtype_code(src_dtype), _stream(table.data))
    count_launch("cuda.mt_copy")


# ---- per-tensor reductions of one call (FGM's and PGD's multi-tensor steps) ------------------
#
# The device plan of one call (layout in csrc/multi_tensor.cuh, "per-tensor reductions of one
# call"): [P (K + 1) | slot (K)] for the sum launch, then per group [first partial | slot | cols]
# of its T tensors and, for a dense group, [first block (T + 1) | owner (B)]: a dense tensor's
# stage-1 blocks are those of its per-tensor launch (``dense_parts`` of them), each block
# running that launch's grid-stride order, so every partial is bitwise the per-tensor one.

@dataclasses.dataclass
class Group:
    """One group of a call, ready for its launches: the mode, the dtype, PGD's dense first step,
    its work table, its rows of the call's device plan and its dense stage-1 blocks."""
    rows: bool
    dtype: torch.dtype
    first: bool
    table: object
    plan: torch.Tensor
    blocks: int


@dataclasses.dataclass
class Planned:
    """The groups of one call's reduction, for the same call's update (FGM's ``ShardPlan``,
    PGD's ``ShardSums``); ``plan`` keeps the device plan alive until then."""
    groups: list
    plan: torch.Tensor | None = None
    slots: int = 0  # the caller's buffer holds at least this many slots

    def check(self, buf: torch.Tensor, per_slot: int, what: str) -> None:
        """``buf`` (fp32, contiguous, CUDA) holds ``per_slot`` floats for each slot planned."""
        f32_ptr(buf, what)
        if buf.numel() < per_slot * self.slots:
            raise ValueError(f"{what} holds {buf.numel()} floats; the call's slots need {per_slot * self.slots}")


# the host layer's planner, with each dense group's stage-1 block owners (the CUDA blocks run the
# per-tensor launch's grid-stride order)
plan_call = functools.partial(host.plan_call, dense_owners=True)


def group_args(g: Group) -> tuple:
    """The leading C arguments of a group's launch: its table (address, lists, tensors, chunks,
    chunk), dtype code and mode."""
    t = g.table
    return t.data.data_ptr(), t.n_lists, t.n_tensors, t.n_chunks, t.chunk, dtype_code(g.dtype), int(g.rows)


def group_table(tag: str, lists, chunk: int):
    """The shared (cached, immutable) work table of a group's lists."""
    return shared_tables().get(tag, lists, chunk=chunk)


def check_items(what: str, items, flag_names) -> None:
    """The tensors of a multi-tensor FGM / PGD call: CUDA, contiguous, one dtype per item
    (a kernel dtype), the flags uint8 with one entry per row."""
    for s in items:
        for t, name in ((s.w, "w"), (s.g, "g"), (s.backup, "backup")):
            _check(t, f"{what}[slot {s.slot}].{name}")
        dtype_code(s.w.dtype)
        if s.g.dtype != s.w.dtype or s.backup.dtype != s.w.dtype:
            raise ValueError(f"{what}[slot {s.slot}]: w, g and backup must have one dtype")
        flags = [getattr(s, f) for f in flag_names]
        if flags[0] is None:
            if s.g.numel() != s.w.numel() or s.backup.numel() != s.w.numel():
                raise ValueError(f"{what}[slot {s.slot}]: g and backup need w's numel")
            continue
        if s.w.dim() != 2 or s.g.shape != s.w.shape or s.backup.shape != s.w.shape:
            raise ValueError(f"{what}[slot {s.slot}]: row mode needs 2-D w, g and backup of one shape")
        for f, name in zip(flags, flag_names):
            if f is None:
                raise ValueError(f"{what}[slot {s.slot}]: row mode needs {' and '.join(flag_names)}")
            _check(f, f"{what}[slot {s.slot}].{name}")
            if f.dtype != torch.uint8 or f.numel() != s.w.shape[0]:
                raise ValueError(f"{what}[slot {s.slot}].{name} must be a uint8 tensor of {s.w.shape[0]} elements")


def check_slots(items, buf: torch.Tensor, per_slot: int, what: str) -> None:
    """``buf`` (fp32, contiguous, CUDA) holds ``per_slot`` floats at every item's slot."""
    f32_ptr(buf, what)
    for s in items:
        if not 0 <= s.slot or per_slot * (s.slot + 1) > buf.numel():
            raise ValueError(f"slot {s.slot} is outside {what} ({buf.numel()} floats, {per_slot} per slot)")
