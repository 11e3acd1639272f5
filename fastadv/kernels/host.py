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

(L lists of T tensors each, N chunks.)  Everything but the pointers depends on
the sizes only, so a :class:`TensorTable` is kept per shape signature and its
pointer section rewritten (one small non-blocking copy from pinned memory)
when an address changed.  Nothing is ever read back to the host.
"""
from __future__ import annotations

import collections
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


# ---------------------------------------------------------------- work tables

class TensorTable:
    """The device work list of ``n_lists`` lists of tensors with sizes ``numels``.

    ``bind(lists)`` points it at concrete tensors (same sizes); the pointer
    section is copied to the device only when an address changed.  Kernels
    must run on the stream that bound the table (PyTorch's current stream).
    ``aligned``: every bound address is a multiple of :data:`ALIGN` bytes.
    """

    def __init__(self, numels, n_lists: int, device, chunk: int = CHUNK):
        if chunk <= 0 or chunk % 16:
            raise ValueError(f"chunk must be a positive multiple of 16, got {chunk}")
        self.numels = tuple(int(n) for n in numels)
        self.n_lists = int(n_lists)
        self.n_tensors = len(self.numels)
        self.chunk = int(chunk)
        self.device = torch.device(device)
        counts = [-(-n // chunk) for n in self.numels]
        first = [0]
        for c in counts:
            first.append(first[-1] + c)
        self.n_chunks = first[-1]
        owner = [t for t, c in enumerate(counts) for _ in range(c)]
        L, T = self.n_lists, self.n_tensors
        host = torch.tensor([0] * (L * T) + list(self.numels) + first + owner, dtype=torch.int64)
        self.data = torch.empty(host.numel(), dtype=torch.int64, device=self.device)
        to_device(host, self.data)
        self._ptrs: tuple | None = None
        self.aligned = False

    def bind(self, lists) -> "TensorTable":
        """Point the table at ``lists`` (``n_lists`` sequences of tensors)."""
        if len(lists) != self.n_lists:
            raise ValueError(f"table of {self.n_lists} lists bound to {len(lists)}")
        ptrs = tuple(t.data_ptr() for lst in lists for t in lst)
        if len(ptrs) != self.n_lists * self.n_tensors:
            raise ValueError("every list must hold one tensor per table entry")
        if ptrs != self._ptrs:
            to_device(torch.tensor(ptrs, dtype=torch.int64), self.data[: len(ptrs)])
            self._ptrs = ptrs
            self.aligned = all(p % ALIGN == 0 for p in ptrs)
        return self

    def first_chunks(self) -> torch.Tensor:
        """Device view of the T+1 prefix offsets (chunk index of each tensor's first chunk)."""
        base = (self.n_lists + 1) * self.n_tensors
        return self.data[base: base + self.n_tensors + 1]


class TableCache:
    """Tables of one owner (an AWP, SAM or EMA object), keyed by
    ``(tag, dtypes, sizes, chunk)``; least recently used dropped past ``maxsize``."""

    def __init__(self, maxsize: int = 32):
        self.maxsize = maxsize
        self._tables: collections.OrderedDict = collections.OrderedDict()

    def get(self, tag: str, lists, chunk: int = CHUNK) -> TensorTable:
        first = lists[0]
        device = first[0].device
        key = (tag, str(device), tuple(lst[0].dtype for lst in lists),
               tuple(t.numel() for t in first), chunk)
        table = self._tables.pop(key, None)
        if table is None:
            table = TensorTable(key[3], len(lists), device, chunk)
        self._tables[key] = table
        while len(self._tables) > self.maxsize:
            self._tables.popitem(last=False)
        return table.bind(lists)

    def clear(self) -> None:
        self._tables.clear()


_witnesses: dict = {}


def witness(dtype: torch.dtype, device) -> torch.Tensor:
    """A one-element tensor whose pointer type tells a kernel the element type."""
    key = (dtype, str(torch.device(device)))
    if key not in _witnesses:
        _witnesses[key] = torch.empty(1, dtype=dtype, device=device)
    return _witnesses[key]
