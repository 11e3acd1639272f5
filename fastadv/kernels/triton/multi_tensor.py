"""Multi-tensor apply: one launch over many tensors through a device table.

The host side (the tables, their cache, the witnesses) is in
:mod:`fastadv.kernels.host`, which the CUDA backend uses without Triton.

A *work list* cuts every tensor of a group into chunks of ``chunk`` elements;
one program (Triton) or one block (CUDA) handles one chunk, so a launch covers
any number of tensors and the number of launches never grows with the model.

The table lives on the device as one int64 buffer, shared by the Triton and
the CUDA kernels (``csrc/multi_tensor.cuh`` reads the same layout)::

    [0,          L*T)          data_ptr of tensor t of list l at l*T + t
    [L*T,        L*T+T)        numel of tensor t
    [L*T+T,      L*T+2T+1)     first chunk of tensor t (prefix sum; entry T = N)
    [L*T+2T+1,   L*T+2T+1+N)   owner: the tensor of chunk c

(L lists of T tensors each, N chunks.)  Tables are immutable and cached by
the addresses they hold (see :mod:`fastadv.kernels.host`): a kernel always
reads a table built for exactly the tensors it was given.

Per-tensor reductions are two-stage: a chunk kernel writes one fp32 partial
per chunk, then :func:`per_tensor_norms` sums the partials of each tensor in
chunk order (deterministic: no atomics), or :func:`global_norm` sums all of
them.

Element types: a kernel casts the int64 addresses to the pointer type of a
*witness* argument (a one-element tensor of the group's dtype, see
:func:`witness`), so one kernel source serves fp32, fp16 and bf16.

Vector access.  An address loaded from the table carries no alignment
information, so the compiler would issue scalar loads.  When every address of
a table is a multiple of :data:`ALIGN` bytes (``TensorTable.aligned``, checked
on the host when the table is built; true for anything PyTorch's allocators return) the
launchers pass ``ALIGNED=True`` and :func:`tensor_ptr` tells the compiler so;
the chunk loops run full blocks unmasked (:func:`load` / :func:`store` with
``MASKED=False``) and only the tail of a tensor masked.  Tables holding a view
at an odd address run the same kernels with ``ALIGNED=False`` (correct,
scalar).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .. import count_launch
from ..host import (ALIGN, CHUNK, CallPlan, PlannedGroup, TableCache, TensorTable, host_to,  # noqa: F401
                    plan_call, witness)  # (re-exported)

BLOCK = 2048           # elements per loop iteration of a Triton program
FINALIZE_BLOCK = 1024  # partials summed per iteration by the finalize programs


# ------------------------------------------------------------- device side

@triton.jit
def work_item(table, pid, T, L: tl.constexpr, CHUNK: tl.constexpr):
    """(tensor, first element, end element) of chunk ``pid``."""
    t = tl.load(table + L * T + 2 * T + 1 + pid)
    numel = tl.load(table + L * T + t)
    first = tl.load(table + L * T + T + t)
    start = (pid - first) * CHUNK
    end = tl.minimum(start + CHUNK, numel)
    return t, start, end


@triton.jit
def tensor_ptr(table, lst, t, T, like, ALIGNED: tl.constexpr):
    """Pointer to tensor ``t`` of list ``lst``, typed like the witness ``like``;
    ``ALIGNED``: the host checked that it is a multiple of 16 bytes."""
    p = tl.load(table + lst * T + t).to(like.dtype)
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def load(p, offs, end, MASKED: tl.constexpr):
    """``p[offs]``; ``MASKED``: only where ``offs < end`` (0 elsewhere).  The
    unmasked form lets the compiler vectorise (a run-time mask hides how many
    neighbouring lanes share it)."""
    if MASKED:
        v = tl.load(p + offs, mask=offs < end, other=0)
    else:
        v = tl.load(p + offs)
    return v


@triton.jit
def store(p, offs, v, end, MASKED: tl.constexpr):
    """``p[offs] = v`` (where ``offs < end`` when ``MASKED``)."""
    if MASKED:
        tl.store(p + offs, v, mask=offs < end)
    else:
        tl.store(p + offs, v)


@triton.jit
def full_blocks(start, end, BLOCK: tl.constexpr):
    """Whole blocks of ``[start, end)`` (run unmasked) and where the tail starts."""
    n = (end - start) // BLOCK
    return n, start + n * BLOCK


@triton.jit
def _per_tensor_norms(table, part_ptr, out_ptr, T, N, L: tl.constexpr, ARRAYS: tl.constexpr,
                      BLOCK: tl.constexpr):
    # One program per tensor: out[a*T + t] = sqrt(sum of its partials in array a).
    t = tl.program_id(0)
    lo = tl.load(table + L * T + T + t)
    hi = tl.load(table + L * T + T + t + 1)
    for a in tl.static_range(ARRAYS):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(lo, hi, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            acc += tl.load(part_ptr + a * N + offs, mask=offs < hi, other=0.0)
        tl.store(out_ptr + a * T + t, tl.sqrt_rn(tl.sum(acc, axis=0)))


@triton.jit
def _global_norm(part_ptr, n, out_ptr, BLOCK: tl.constexpr):
    # One program: out = sqrt(sum of all partials), in a fixed order.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sqrt_rn(tl.sum(acc, axis=0)))


@triton.jit
def _copy(table, T, like_dst, like_src, DST: tl.constexpr, SRC: tl.constexpr, L: tl.constexpr,
          CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # list DST <- list SRC; same dtype: bit-exact (no arithmetic), else one rounding.
    t, start, end = work_item(table, tl.program_id(0), T, L, CHUNK)
    d = tensor_ptr(table, DST, t, T, like_dst, ALIGNED)
    s_ = tensor_ptr(table, SRC, t, T, like_src, ALIGNED)
    n_full, tail = full_blocks(start, end, BLOCK)
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        store(d, offs, load(s_, offs, end, False).to(d.dtype.element_ty), end, False)
    if tail < end:
        offs = tail + tl.arange(0, BLOCK)
        store(d, offs, load(s_, offs, end, True).to(d.dtype.element_ty), end, True)


def _bits_witness(like: torch.Tensor) -> torch.Tensor:
    """Same-size integer witness: copies then move raw bits, never floats."""
    kind = {4: torch.int32, 2: torch.int16, 1: torch.uint8, 8: torch.int64}[like.element_size()]
    return witness(kind, like.device)


def per_tensor_norms(table: TensorTable, partials: torch.Tensor, arrays: int, out: torch.Tensor) -> None:
    """``out[a*T + t] = sqrt(sum of the chunk partials of tensor t in array a)``;
    ``partials`` is fp32 ``[arrays, N]``."""
    if table.n_tensors == 0:
        return
    _per_tensor_norms[(table.n_tensors,)](table.data, partials, out, table.n_tensors,
                                          max(table.n_chunks, 1), L=table.n_lists, ARRAYS=arrays,
                                          BLOCK=FINALIZE_BLOCK)
    count_launch("triton.mt_norms")


def global_norm(partials: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """``out[0] = sqrt(sum(partials[:n]))`` (fp32, fixed order)."""
    _global_norm[(1,)](partials, n, out, BLOCK=FINALIZE_BLOCK)
    count_launch("triton.mt_global_norm")


def copy(table: TensorTable, dst: int, src: int, dst_dtype: torch.dtype, src_dtype: torch.dtype) -> None:
    """List ``dst`` <- list ``src`` of ``table``; bit-exact when the dtypes match."""
    if table.n_chunks == 0:
        return
    if dst_dtype == src_dtype:
        like_d = like_s = _bits_witness(witness(dst_dtype, table.device))
    else:
        like_d, like_s = witness(dst_dtype, table.device), witness(src_dtype, table.device)
    _copy[(table.n_chunks,)](table.data, table.n_tensors, like_d, like_s, DST=dst, SRC=src,
                             L=table.n_lists, CHUNK=table.chunk, BLOCK=BLOCK, ALIGNED=table.aligned)
    count_launch("triton.mt_copy")


# ------------------------------------------------------------- per-tensor reductions of one call

# The shard steps of FGM and PGD (kernels/triton/fgm.py, pgd.py): their items and plan_call are
# the host layer's (kernels/host.py, shared with the CUDA backend); a planned group with its
# work table is a Group.

@dataclasses.dataclass
class Group:
    """A planned group with its work table, ready for its launches: the mode (row mode or
    dense), the dtype, the plan rows (:class:`PlannedGroup`), the row block (0 when dense) and
    ``first`` (PGD's dense first step, which writes the backup)."""
    rows: bool
    dtype: torch.dtype
    table: TensorTable
    plan: torch.Tensor
    block_c: int
    first: bool = False


@dataclasses.dataclass
class Planned:
    """The groups of one call's reduction, for the same call's update (FGM's ``ShardPlan``,
    PGD's ``ShardSums``)."""
    groups: list
