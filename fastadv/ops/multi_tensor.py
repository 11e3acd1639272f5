"""What the multi-tensor ops share (AWP, SAM, EMA / SWA, weight noise): list
checks, the backend split, backups in one flat buffer, the bit-exact
multi-tensor copy (a registered op) and the restore into the live parameters.

Backend split (:func:`split`): the registry's one rule
(:func:`fastadv.ops._registry.pick`) applied to each index of the lists, once
per distinct (dtype, contiguity) signature -- a model has a handful of
signatures for hundreds of tensors.  ``auto``: the indices the kernels cannot
take (a dtype they lack, a non-contiguous or non-dense tensor) go to the torch
path; a forced kernel backend raises instead, naming the index (``pick``'s
``where``): every limit and its message live in ``_registry``.

Work tables: built inside the registered ops (so under ``torch.compile`` an op
is one opaque node receiving plain tensor lists) from the live tensors, in the
one shared :func:`fastadv.kernels.host.shared_tables` cache; a table is
immutable and keyed by the addresses it lists, so sharing it is safe.
"""
from __future__ import annotations

import torch

from ..kernels import count_launch, device_guard, host
from . import _dist, _registry
from ._live import StorageMoved, follow, retarget


def check_lists(lists, names) -> torch.device | None:
    """Same lengths, tensors, one device, matching shapes; returns the device."""
    n = len(lists[0])
    device = None
    for lst, what in zip(lists, names):
        if len(lst) != n:
            raise ValueError(f"{names[0]} and {what} must have the same length, got {n} and {len(lst)}")
        for i, t in enumerate(lst):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what}[{i}] must be a tensor, got {type(t).__name__}")
            if t.shape != lists[0][i].shape:
                raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, {names[0]}[{i}] has "
                                 f"{tuple(lists[0][i].shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{what}[{i}] must be a floating-point tensor, got {t.dtype}")
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"all tensors must be on one device; {what}[{i}] is on {t.device}, "
                                 f"not {device}")
    return device


def _signature(tensors) -> tuple:
    return tuple((t.dtype, t.layout == torch.strided and t.is_contiguous()) for t in tensors)


def split(backend: str | None, device, lists, names, same_dtype: bool = True):
    """(backend name, indices the kernels run, indices the torch path runs).

    ``names``: what one tensor of each list is, for the messages ("weight",
    "gradient", ...).  ``same_dtype``: the tensors of one index must share a
    dtype on the kernels (a weight, its gradient and its backup); copies and
    averages may mix dtypes."""
    n = len(lists[0])
    name = _registry.pick(backend, device)
    if name == "torch":
        return name, [], list(range(n))
    fast, slow = [], []
    for sig, idx in group([_signature([lst[i] for lst in lists]) for i in range(n)]).items():
        i = idx[0]
        tensors = [lst[i] for lst in lists]
        pairs = list(zip(names, tensors))
        got = _registry.pick(backend, device, where=f"index {i}", strided=pairs,
                             dtypes=[("tensors", t) for t in tensors], contiguous=pairs,
                             same_dtype=pairs if same_dtype else ())
        (fast if got != "torch" else slow).extend(idx)
    return name, sorted(fast), sorted(slow)


def take(lst, idx):
    return [lst[i] for i in idx]


def f32(ts):
    """The tensors in fp32 (the same objects where they already are)."""
    return [t if t.dtype == torch.float32 else t.float() for t in ts]


def group(keys) -> dict:
    """``{key: [positions]}`` in first-seen order: one launch per key."""
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups


def tables() -> host.TableCache:
    """The work-table cache of the multi-tensor ops (see the module docstring)."""
    return host.shared_tables()


# ---------------------------------------------------------------- the copy

@_registry.op("mt_copy_", mutates_args={"dst"})
def mt_copy_op(dst: list[torch.Tensor], src: list[torch.Tensor], backend: str) -> None:
    """``dst[i].copy_(src[i])`` for every i (one device); bit-exact when the
    dtypes match.  Kernel backends: one launch per (dst, src) dtype pair."""
    if not dst:
        return
    if backend == "torch":
        torch._foreach_copy_(dst, src)
        count_launch("torch.copy")
        return
    k = _registry.kernels("multi_tensor", backend)
    with device_guard(dst[0]):
        for (dt_d, dt_s), idx in group([(d.dtype, s.dtype) for d, s in zip(dst, src)]).items():
            lists = [take(dst, idx), take(src, idx)]
            k.copy(tables().get("copy", lists), 0, 1, dt_d, dt_s)


@mt_copy_op.register_fake
def _(dst, src, backend):
    return None


def copy_tensors_(dst, src, *, backend: str | None = None) -> None:
    """``dst[i].copy_(src[i])`` for every i, in place; bit-exact when the
    dtypes match (one launch per dtype pair on the kernel backends)."""
    lists = _dist.local_lists((dst, src))  # FSDP2: shard by shard
    if not lists[0]:
        return
    device = check_lists(lists, ("dst", "src"))
    name, fast, slow = split(backend, device, lists, ("destination", "source"), same_dtype=False)
    with torch.no_grad():
        if fast:
            mt_copy_op(take(lists[0], fast), take(lists[1], fast), name)
        if slow:
            mt_copy_op(take(lists[0], slow), take(lists[1], slow), "torch")


def restore_live_(names, live, backups, *, between: str, backend: str | None = None) -> None:
    """Write each backup back into the *live* tensor of its parameter, bit-exact.

    ``live[i]`` is the current tensor of the parameter ``names[i]`` (looked up
    again by the caller after user code ran: ``model.double().float()``,
    ``.to()`` and ``load_state_dict(assign=True)`` give a parameter new
    storage, or a new object).  Every pair is checked first
    (:func:`fastadv.ops._live.retarget`): same shape and dtype -- the new
    storage is written (a device move carries the backup along); anything else
    raises :class:`~fastadv.ops._live.StorageMoved` naming the parameter and
    what changed, before anything is written, and the backups are untouched.
    ``live[i]`` may be None (the parameter left the model): that raises too."""
    names = list(names)
    # FSDP2: the local shards (a backup holds its shard's bits; nothing to combine)
    live = [None if t is None else _dist.local(t) for t in live]
    backups = [_dist.local(b) for b in backups]
    for n, t, b in zip(names, live, backups):
        if t is None:
            raise StorageMoved(f"{n} is no longer a parameter of the model (it was renamed or removed "
                               f"between {between}); its original values are kept in the backup")
        retarget(n, b, t, between)
    backups = [follow(b, t) for b, t in zip(backups, live)]
    for idx in group([t.device for t in live]).values():
        copy_tensors_(take(live, idx), take(backups, idx), backend=backend)


class BackupBuffers:
    """Backups of many tensors: views of one flat buffer per (device, dtype),
    kept and reused while the layout (the list of sizes) stays the same, so
    their addresses -- and the device tables built on them -- stay valid.
    Views start on multiples of 16 elements (aligned vector access)."""

    ALIGN = 16

    def __init__(self):
        self._held: dict = {}

    def views(self, tensors) -> list[torch.Tensor]:
        """One uninitialised backup tensor per tensor (same shape, dtype, device)."""
        out: list = [None] * len(tensors)
        for key, idx in group([(t.device, t.dtype) for t in tensors]).items():
            layout = tuple(tensors[i].numel() for i in idx)
            offsets, total = [], 0
            for n in layout:
                offsets.append(total)
                total += -(-n // self.ALIGN) * self.ALIGN
            held = self._held.get(key)
            if held is None or held[0] != layout:
                self._held[key] = held = (layout, torch.empty(total, dtype=key[1], device=key[0]))
            for i, off in zip(idx, offsets):
                t = tensors[i]
                out[i] = held[1][off: off + t.numel()].view(t.shape)
        return out

    def clear(self) -> None:
        self._held = {}

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for _, buf in self._held.values())
