"""The host layer shared by both kernel backends; it never imports Triton.

Everything the Triton kernels and the CUDA library both need on the host lives
here, once: the multi-tensor work tables (:class:`TensorTable`, their cache),
the one-element dtype witnesses, pinned host-to-device copies, and the Philox
key layout and its constants (the kernels' side of it is
``kernels/triton/rng.py`` and ``csrc/rng.cuh``).  The ``cuda`` backend and the
``torch`` backend import only this module, so they work with Triton absent.

Work tables.  A *work list* cuts every tensor of a group into chunks of
``chunk`` elements; one program (Triton) or one block (CUDA) handles one chunk,
so a launch covers any number of tensors.  The table lives on the device as
one int64 buffer (``csrc/multi_tensor.cuh`` reads the same layout)::

    [0,          L*T)          data_ptr of tensor t of list l at l*T + t
    [L*T,        L*T+T)        numel of tensor t
    [L*T+T,      L*T+2T+1)     first chunk of tensor t (prefix sum; entry T = N)
    [L*T+2T+1,   L*T+2T+1+N)   owner: the tensor of chunk c

(L lists of T tensors each, N chunks.)  A table is immutable: it is built for
concrete tensors (their addresses are part of it) and never rewritten, so a
table handed to a kernel cannot be re-pointed under it -- not by another bucket
of equal sizes in the same call, not by another caller.  :class:`TableCache`
keys its tables by everything they hold (device, stream, dtypes, sizes,
addresses, chunk) and recomputes that key from the live tensors at every call:
a hit is a table whose bytes are exactly what a fresh build would write, a
miss builds one (the size-dependent part comes from a host-side cache; one
small non-blocking copy from pinned memory).  Nothing is ever read back to the
host.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os

import torch

CHUNK = 32768          # elements per multi-tensor work item (one program / one CUDA block)
ALIGN = 16             # bytes: the address alignment that ALIGNED=True promises

# Philox layout (kernels/triton/rng.py, csrc/rng.cuh): a chunk of RNG_CHUNK
# elements draws RNG_QUARTER counters, four words each.
RNG_QUARTER = 1024
RNG_CHUNK = 4 * RNG_QUARTER
KEY_HIGH = 2 ** 61     # seed and base are drawn in [0, KEY_HIGH): base + counters stay < 2^62


# ---------------------------------------------------------------- copies

def to_device(host: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(host)`` without a host sync (pinned + non_blocking on CUDA).

    The pinned buffer is freshly allocated from PyTorch's caching host
    allocator, which keeps it alive until the copy has run."""
    if dst.device.type == "cuda":
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        dst.copy_(pinned, non_blocking=True)
    else:
        dst.copy_(host)


def host_to(host: torch.Tensor, device) -> torch.Tensor:
    """A copy of the host tensor ``host`` on ``device``, without a host sync."""
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    to_device(host, out)
    return out


# ---------------------------------------------------------------- Philox keys

def same_device(a, b) -> bool:
    """``a`` and ``b`` name the same device (``cuda`` meaning the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def new_key(device, generator: torch.Generator | None = None, secure: bool = False) -> torch.Tensor:
    """A Philox key ``[seed, base]`` (int64, on ``device``) for one launch.

    From ``generator`` (default: the device's default generator) with
    ``torch.randint``: reproducible under ``torch.manual_seed``, a new key per
    call, no host sync, drawn again on every CUDA-graph replay.  A generator on
    another device (Opacus allows a CPU generator for CUDA parameters) draws
    there and the key is copied over.  ``secure=True``: from ``os.urandom``
    (the generator is ignored); not allowed during CUDA-graph capture (the key
    would be frozen into the graph)."""
    device = torch.device(device)
    if secure:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("secure_mode draws its key from os.urandom on every call and cannot run "
                               "inside CUDA-graph capture (the key would be replayed)")
        words = [int.from_bytes(os.urandom(8), "little") % KEY_HIGH for _ in range(2)]
        return host_to(torch.tensor(words, dtype=torch.int64), device)
    if generator is not None and not same_device(generator.device, device):
        key = torch.randint(0, KEY_HIGH, (2,), dtype=torch.int64, device=generator.device,
                            generator=generator)
        return host_to(key, device) if generator.device.type == "cpu" else key.to(device)
    return torch.randint(0, KEY_HIGH, (2,), dtype=torch.int64, device=device, generator=generator)


def shard_counters(global_numels, offsets, local_numels) -> tuple[list[int], list[int]]:
    """Where the shards of a multi-tensor noise launch sit in the Philox stream.

    A launch on whole tensors numbers its chunks of :data:`RNG_CHUNK` elements
    across its tensors (tensor ``t`` starts at chunk ``first[t]``, the prefix
    sum of the chunk counts of the tensors before it), so element ``e`` of
    tensor ``t`` takes counter ``first[t] * RNG_QUARTER + (e // RNG_CHUNK) *
    RNG_QUARTER + e % RNG_QUARTER`` (past the key's base), word
    ``(e // RNG_QUARTER) % 4``.  A shard holding the global elements
    ``[offset, offset + n)`` of tensor ``t`` reproduces that by running the
    chunks of that grid which it overlaps: its work list cuts a *span* of
    ``lead + n`` elements (``lead = offset % RNG_CHUNK``: the span starts on
    the global chunk boundary before the shard) and its chunk ``c`` draws the
    counters of global chunk ``first[t] + offset // RNG_CHUNK + c``; elements
    of the span before ``lead`` are not the shard's and are masked off.  So an
    element's noise depends on (key, tensor's place in the group, global index)
    only, never on how the tensor is split.

    Returns ``(spans, place)``: the span of each shard (0 for an empty shard)
    and, per tensor, ``[first global chunk of its span, lead]`` flattened (the
    kernels' ``place`` array)."""
    spans, place, first = [], [], 0
    for n_global, offset, n in zip(global_numels, offsets, local_numels):
        if offset < 0 or offset + n > n_global:
            raise ValueError(f"a shard [{offset}, {offset + n}) outside its tensor of {n_global} elements")
        lead = offset % RNG_CHUNK
        spans.append(lead + n if n else 0)
        place += [first + offset // RNG_CHUNK, lead]
        first += -(-n_global // RNG_CHUNK)
    return spans, place


# ---------------------------------------------------------------- work tables

@functools.lru_cache(maxsize=128)
def _layout(numels: tuple, chunk: int) -> tuple[torch.Tensor, int]:
    """The size-dependent part of a table (host int64: numels, first chunks,
    owners) and its number of chunks; never modified once made."""
    counts = [-(-n // chunk) for n in numels]
    first = [0]
    for c in counts:
        first.append(first[-1] + c)
    owner = [t for t, c in enumerate(counts) for _ in range(c)]
    return torch.tensor(list(numels) + first + owner, dtype=torch.int64), first[-1]


def _stream_id(device: torch.device):
    """The current stream of a CUDA device (a table is used on the stream that wrote it)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).stream_id


class TensorTable:
    """The device work list of ``n_lists`` lists of tensors with sizes ``numels``
    at the addresses ``ptrs`` (``n_lists * len(numels)`` of them, list-major;
    all zero when omitted).  Immutable; build it from live tensors with
    :meth:`of` (or get it from a :class:`TableCache`).  Kernels must run on the
    stream that built the table (PyTorch's current stream).  ``aligned``: every
    address is a multiple of :data:`ALIGN` bytes.
    """

    def __init__(self, numels, n_lists: int, device, chunk: int = CHUNK, ptrs=None):
        if chunk <= 0 or chunk % 16:
            raise ValueError(f"chunk must be a positive multiple of 16, got {chunk}")
        self.numels = tuple(int(n) for n in numels)
        self.n_lists = int(n_lists)
        self.n_tensors = len(self.numels)
        self.chunk = int(chunk)
        self.device = torch.device(device)
        ptrs = (0,) * (self.n_lists * self.n_tensors) if ptrs is None else tuple(int(p) for p in ptrs)
        if len(ptrs) != self.n_lists * self.n_tensors:
            raise ValueError(f"a table of {self.n_lists} lists of {self.n_tensors} tensors needs "
                             f"{self.n_lists * self.n_tensors} addresses, got {len(ptrs)}")
        layout, self.n_chunks = _layout(self.numels, self.chunk)
        host = torch.cat([torch.tensor(ptrs, dtype=torch.int64), layout]) if ptrs else layout.clone()
        self.data = host_to(host, self.device)
        self.ptrs = ptrs
        self.aligned = all(p % ALIGN == 0 for p in ptrs)

    @classmethod
    def of(cls, lists, chunk: int = CHUNK) -> "TensorTable":
        """The table of ``lists`` (sequences of tensors, one per table entry, on one device)."""
        first = lists[0]
        if any(len(lst) != len(first) for lst in lists):
            raise ValueError("every list must hold one tensor per table entry")
        if not first:
            raise ValueError("a table needs at least one tensor")
        return cls([t.numel() for t in first], len(lists), first[0].device, chunk,
                   ptrs=[t.data_ptr() for lst in lists for t in lst])

    def matches(self, lists) -> bool:
        """Whether the table lists exactly these tensors (addresses and sizes)."""
        return (len(lists) == self.n_lists
                and all(len(lst) == self.n_tensors for lst in lists)
                and tuple(t.data_ptr() for lst in lists for t in lst) == self.ptrs
                and tuple(t.numel() for t in lists[0]) == self.numels)

    def first_chunks(self) -> torch.Tensor:
        """Device view of the T+1 prefix offsets (chunk index of each tensor's first chunk)."""
        base = (self.n_lists + 1) * self.n_tensors
        return self.data[base: base + self.n_tensors + 1]


class TableCache:
    """Tables of one owner (the multi-tensor ops share :func:`shared_tables`; DP has its own), keyed
    by ``(tag, device, stream, dtypes, sizes, addresses, chunk)`` computed from
    the live tensors at every :meth:`get`; least recently used dropped past
    ``maxsize``.  Tables are immutable, so a cached one is exactly the table
    these tensors need: it cannot go stale, and two buckets (or two callers)
    get the same object only when they list the very same tensors."""

    def __init__(self, maxsize: int = 32):
        self.maxsize = maxsize
        self._tables: collections.OrderedDict = collections.OrderedDict()

    def get(self, tag: str, lists, chunk: int = CHUNK) -> TensorTable:
        first = lists[0]
        if not first:
            raise ValueError("a table needs at least one tensor")
        if any(len(lst) != len(first) for lst in lists):
            raise ValueError("every list must hold one tensor per table entry")
        device = first[0].device
        key = (tag, str(device), _stream_id(device), tuple(lst[0].dtype for lst in lists),
               tuple(t.numel() for t in first), tuple(t.data_ptr() for lst in lists for t in lst), chunk)
        table = self._tables.pop(key, None)
        if table is None:
            table = TensorTable(key[4], len(lists), device, chunk, ptrs=key[5])
        self._tables[key] = table
        while len(self._tables) > self.maxsize:
            self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        self._tables.clear()

    def __len__(self) -> int:
        return len(self._tables)


_SHARED_TABLES: TableCache | None = None


def shared_tables() -> TableCache:
    """The one table cache of the multi-tensor ops (AWP, SAM, EMA / SWA, weight
    noise, the multi-tensor copy).  The registered ops build their tables here
    from the tensors they are given; tables are immutable and keyed by the
    addresses they list, so every caller can share it."""
    global _SHARED_TABLES
    if _SHARED_TABLES is None:
        _SHARED_TABLES = TableCache(maxsize=128)
    return _SHARED_TABLES


_witnesses: dict = {}


def witness(dtype: torch.dtype, device) -> torch.Tensor:
    """A one-element tensor whose pointer type tells a kernel the element type."""
    key = (dtype, str(torch.device(device)))
    if key not in _witnesses:
        _witnesses[key] = torch.empty(1, dtype=dtype, device=device)
    return _witnesses[key]


# ---- one call of FGM's / PGD's multi-tensor steps (both kernel backends) ----------------------
#
# The shard steps of FGM and PGD (kernels/{triton,cuda}/{fgm,pgd}.py) reduce every tensor of one
# call into its own slot of the caller's fp32 buffer: per group of tensors one partials launch
# writes each tensor's partials at its offset of one partials buffer, one launch sums every
# tensor's partials into its slot, and per group one update launch reads the slots back.  The
# host side of that -- the items and one small int64 *plan* -- is the same for both backends.

@dataclasses.dataclass
class ShardNorm:
    """One tensor of a multi-tensor FGM call: ``slot`` is its place in the caller's [n] fp32
    buffers; dense: flat ``w, g, backup``; rows: ``[rows, cols]`` with the uint8 ``rows``
    flags (written by the backend's ``fgm_sq_many``)."""
    slot: int
    w: torch.Tensor
    g: torch.Tensor
    backup: torch.Tensor
    rows: torch.Tensor | None = None


@dataclasses.dataclass
class ShardStep:
    """One tensor of a multi-tensor PGD step: ``slot`` is its place in the caller's ``sums``
    buffer (3 floats at ``3 * slot``); dense: flat ``w, g, backup`` (``first`` writes the
    backup); rows: ``[rows, cols]`` with uint8 ``mask`` / ``saved`` per row."""
    slot: int
    w: torch.Tensor
    g: torch.Tensor
    backup: torch.Tensor
    first: bool
    mask: torch.Tensor | None = None
    saved: torch.Tensor | None = None


@dataclasses.dataclass
class PlannedGroup:
    """One group of a call's plan: its key, the indices of its tensors (in the call's order)
    and, as a view of the call's device plan, ``[first partial (T) | slot (T) | cols (T)]``
    of them, then (``dense_owners``, a dense group) ``[first block (T + 1) | owner (blocks)]``."""
    key: tuple
    idx: list
    plan: torch.Tensor
    blocks: int = 0


@dataclasses.dataclass
class CallPlan:
    """The device plan of one call: ``[P (K + 1) | slot (K) | groups...]``, ``P`` the prefix of
    the K tensors' partial counts (``n_parts = P[K]``), then each group's rows."""
    plan: torch.Tensor
    n_parts: int
    groups: list


def plan_call(items, parts, key, cols, device, dense_owners: bool = False) -> CallPlan:
    """Plan one call over ``items`` (each with a ``slot``): ``parts(item)`` its number of
    partials, ``key(item)`` its group ``(dtype, by_rows, ...)`` (None: nothing to launch for it,
    its partials are empty and the sum launch alone writes its zeros), ``cols(item)`` its row
    length (0 when dense).  ``dense_owners`` (the CUDA kernels): a dense group also lists the
    tensor of each of its stage-1 blocks, which run the per-tensor launch's blocks.  Groups
    keep the order in which their first tensor comes; one host-to-device copy."""
    counts = [parts(s) for s in items]
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    keys: dict = {}
    for i, s in enumerate(items):
        k = key(s)
        if k is not None:
            keys.setdefault(k, []).append(i)
    host_plan = prefix + [s.slot for s in items]
    spans = []
    for k, idx in keys.items():
        start = len(host_plan)
        host_plan += [prefix[i] for i in idx] + [items[i].slot for i in idx] + [cols(items[i]) for i in idx]
        blocks = 0
        if dense_owners and not k[1]:
            first = [0]
            for i in idx:
                first.append(first[-1] + counts[i])
            host_plan += first + [t for t, i in enumerate(idx) for _ in range(counts[i])]
            blocks = first[-1]
        spans.append((k, idx, start, len(host_plan), blocks))
    plan = host_to(torch.tensor(host_plan, dtype=torch.int64), device)
    return CallPlan(plan, prefix[-1], [PlannedGroup(k, idx, plan[a:b], blocks) for k, idx, a, b, blocks in spans])
