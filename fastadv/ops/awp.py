"""AWP as a functional op over many tensors, plus the multi-tensor plumbing
shared with SAM and weight averaging (backend choice, dtype groups, restore).

``awp_step_(weights, grads, backups, adv_lr=, adv_eps=, write_backup=)`` does,
per tensor (``w0`` = its backup)::

    if ||g|| != 0 and not NaN:                        # decided on the device
        w = clamp(w + ((adv_lr * g) / (||g|| + 1e-6)) * (||w|| + 1e-6),
                  w0 - adv_eps * |w0|, w0 + adv_eps * |w0|)

in fp32, rounded once, with ``write_backup`` first copying ``w`` into the
backup (the first attack step).  Only one backup is kept: the clamp bounds
are recomputed from it inside the kernel.  Kernel backends (triton, cuda):
per dtype group, one reduction launch (per-chunk partial sums of ``g^2`` and
``w^2``), one finalize launch (per-tensor norms, fixed order), one update
launch -- for any number of tensors, without a host sync.  ``copy_tensors_``
is the bit-exact multi-tensor restore (one launch per dtype group).

The torch backend (CPU, or tensors the kernels do not take) is built on
``torch._foreach_*``; it makes no host sync either.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..kernels import count_launch, device_guard
from ._live import StorageMoved, follow, retarget

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AWP_EPS = 1e-6


# ---------------------------------------------------------------- plumbing

def kernels(name: str):
    """The kernel module of backend ``name`` (same functions for triton and cuda)."""
    if name == "triton":
        from ..kernels.triton import awp
        return awp
    from ..kernels.cuda import awp
    return awp


class Tables:
    """The device work lists of one owner (an AWP, SAM or EMA object): a
    :class:`fastadv.kernels.host.TableCache` made on first use.  Its tables
    are immutable and keyed by the live tensors' addresses at every call, so
    two buckets of equal sizes never share one and none can go stale."""

    def __init__(self):
        self._cache = None

    def get(self, tag, lists):
        if self._cache is None:
            from ..kernels.host import TableCache
            self._cache = TableCache()
        return self._cache.get(tag, lists)

    def clear(self) -> None:
        if self._cache is not None:
            self._cache.clear()


_shared = Tables()


def _cache(cache):
    return _shared if cache is None else cache


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


def kernel_reason(tensors, same_dtype: bool):
    """Why the kernels cannot take the tensors of one index, as (exception
    type, message); None if they can."""
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return TypeError, f"supports float32, float16 and bfloat16 tensors, got {t.dtype}"
        if t.layout != torch.strided:
            return ValueError, f"needs dense tensors, got {t.layout}"
        if not t.is_contiguous():
            return ValueError, "needs contiguous tensors"
    if same_dtype and len({t.dtype for t in tensors}) > 1:
        return TypeError, f"needs one dtype per tensor and its gradient/backup, got {[t.dtype for t in tensors]}"
    return None


def choose(backend: str | None, device, lists, same_dtype: bool = True):
    """(backend name, indices the kernels run, indices the torch path runs).

    With ``auto`` (or no choice) tensors the kernels cannot take go to the
    torch path; a forced kernel backend raises instead, saying why."""
    name = _backend.resolve(backend, device)
    n = len(lists[0])
    if name == "torch":
        return name, [], list(range(n))
    forced = (backend or _backend.default()) != "auto"
    fast, slow = [], []
    for i in range(n):
        why = kernel_reason([lst[i] for lst in lists], same_dtype)
        if why is None:
            fast.append(i)
        elif forced:
            raise why[0](f"the {name} backend {why[1]}; use backend='torch' (index {i})")
        else:
            slow.append(i)
    return name, fast, slow


def device_of(lists, idx) -> torch.Tensor:
    """A tensor of the kernel group, for :func:`fastadv.kernels.device_guard`
    (Triton launches on the current CUDA device)."""
    return lists[0][idx[0]]


def pick(lst, idx):
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


# ---------------------------------------------------------------- AWP

def awp_step_(weights, grads, backups, *, adv_lr: float, adv_eps: float, write_backup: bool,
              backend: str | None = None, cache=None) -> None:
    """One AWP attack step over every tensor, in place (see the module docstring).

    ``backups[i]`` holds ``w0`` of ``weights[i]``; with ``write_backup`` it is
    written here from the current weights first.  ``cache`` (a :class:`Tables`)
    keeps the device tables between calls; give each caller its own (the
    default is one shared by every caller that passes none).
    """
    lists = (list(weights), list(grads), list(backups))
    if not lists[0]:
        return
    device = check_lists(lists, ("weights", "grads", "backups"))
    lr, eps = float(adv_lr), float(adv_eps)
    name, fast, slow = choose(backend, device, lists)
    if fast:
        with device_guard(device_of(lists, fast)):
            k = kernels(name)
            cache = _cache(cache)
            for dtype, pos in group([lists[0][i].dtype for i in fast]).items():
                idx = pick(fast, pos)
                table = cache.get("awp", [pick(lst, idx) for lst in lists])
                norms = torch.empty(2 * max(len(idx), 1), dtype=torch.float32, device=device)
                k.awp_norms(table, dtype, norms)
                k.awp_update(table, dtype, norms, lr, eps, write_backup)
    if slow:
        for pos in group([lists[0][i].dtype for i in slow]).values():
            idx = pick(slow, pos)
            _torch_awp_step(*[pick(lst, idx) for lst in lists], lr, eps, write_backup)
        count_launch("torch.awp")


def _torch_awp_step(ws, gs, bs, lr, eps, write_backup) -> None:
    """torch._foreach_* version (one dtype group); fp32 math, no host sync."""
    if write_backup:
        torch._foreach_copy_(bs, ws)
    w32, g32, b32 = f32(ws), f32(gs), f32(bs)
    gnorm = torch.stack(torch._foreach_norm(g32))
    wnorm = torch.stack(torch._foreach_norm(w32))
    valid = (gnorm != 0) & ~torch.isnan(gnorm)
    new = torch._foreach_mul(g32, lr)
    torch._foreach_div_(new, list((gnorm + AWP_EPS).unbind()))
    torch._foreach_mul_(new, list((wnorm + AWP_EPS).unbind()))
    torch._foreach_add_(new, w32)
    bound = torch._foreach_abs(b32)
    torch._foreach_mul_(bound, eps)
    torch._foreach_maximum_(new, torch._foreach_sub(b32, bound))
    torch._foreach_minimum_(new, torch._foreach_add(b32, bound))
    for w, n, v in zip(ws, new, valid.unbind()):  # skipped tensors keep their exact bits
        if n.dtype == w.dtype:
            torch.where(v, n, w, out=w)
        else:
            w.copy_(torch.where(v, n, w))


def copy_tensors_(dst, src, *, backend: str | None = None, cache=None) -> None:
    """``dst[i].copy_(src[i])`` for every i, in place; bit-exact when the
    dtypes match (one launch per dtype pair on the kernel backends)."""
    lists = (list(dst), list(src))
    if not lists[0]:
        return
    device = check_lists(lists, ("dst", "src"))
    name, fast, slow = choose(backend, device, lists, same_dtype=False)
    if fast:
        with device_guard(device_of(lists, fast)):
            k = kernels(name)
            cache = _cache(cache)
            keys = [(lists[0][i].dtype, lists[1][i].dtype) for i in fast]
            for (dt_d, dt_s), pos in group(keys).items():
                idx = pick(fast, pos)
                table = cache.get("copy", [pick(lst, idx) for lst in lists])
                k.copy(table, 0, 1, dt_d, dt_s)
    if slow:
        torch._foreach_copy_(pick(lists[0], slow), pick(lists[1], slow))
        count_launch("torch.copy")


def restore_live_(names, live, backups, *, between: str, backend: str | None = None, cache=None) -> None:
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
    names, live, backups = list(names), list(live), list(backups)
    for n, t, b in zip(names, live, backups):
        if t is None:
            raise StorageMoved(f"{n} is no longer a parameter of the model (it was renamed or removed "
                               f"between {between}); its original values are kept in the backup")
        retarget(n, b, t, between)
    backups = [follow(b, t) for b, t in zip(backups, live)]
    for idx in group([t.device for t in live]).values():
        copy_tensors_(pick(live, idx), pick(backups, idx), backend=backend, cache=cache)


def design_bytes(numel_by_size: dict, steps: int = 1) -> int:
    """Bytes the kernels move for save + ``steps`` attack steps + restore.

    ``numel_by_size``: ``{element_size: total elements}`` of the perturbed
    tensors.  Per step: the reduction reads g and w (2 passes), the update
    reads w, g and (after the first step) the backup and writes w (first step:
    writes the backup instead of reading it): 4 passes.  Restore reads the
    backup and writes w: 2 passes.  Total ``6 * steps + 2`` passes.
    """
    return sum((6 * steps + 2) * n * size for size, n in numel_by_size.items())


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
