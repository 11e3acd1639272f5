"""AWP as a functional op over many tensors: ``torch.ops.fastadv.awp_step_``.

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
launch -- for any number of tensors, without a host sync.  The restore is the
multi-tensor copy (:func:`fastadv.ops.multi_tensor.restore_live_`).

The torch backend (CPU, or tensors the kernels do not take) is built on
``torch._foreach_*``; it makes no host sync either.

FSDP2 (weights and gradients are DTensor shards): the per-tensor norms of
the local shards of *every* tensor go into one fp32 buffer ``[||g_t||] ++
[||w_t||]`` per dtype group, squared, summed across the shard group by ONE
``all_reduce`` per call (8 bytes per tensor, on the device), square-rooted,
and the usual update runs on the local shards with those global norms.  The
local norm is squared back from its ``sqrt`` (one extra rounding per shard:
within the fp32 tolerance, and 0 / NaN / inf stay what they are, so the
device-side skip decides as on one process).
"""
from __future__ import annotations

import torch

from ..kernels import count_launch, device_guard
from . import _dist, _registry
from .multi_tensor import check_lists, f32, group, split, tables, take

AWP_EPS = 1e-6


@_registry.op("awp_step_", mutates_args={"weights", "backups"})
def awp_step_op(weights: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
                adv_lr: float, adv_eps: float, write_backup: bool, backend: str) -> None:
    """One AWP attack step in place over tensors on one device (see the module
    docstring); the kernel backends take one dtype per index."""
    if not weights:
        return
    groups = group([w.dtype for w in weights])
    if backend == "torch":
        for idx in groups.values():
            _torch_awp_step(take(weights, idx), take(grads, idx), take(backups, idx), adv_lr, adv_eps,
                            write_backup)
        count_launch("torch.awp")
        return
    k = _registry.kernels("awp", backend)
    with device_guard(weights[0]):
        for dtype, idx in groups.items():
            table = tables().get("awp", [take(weights, idx), take(grads, idx), take(backups, idx)])
            norms = torch.empty(2 * max(len(idx), 1), dtype=torch.float32, device=weights[0].device)
            k.awp_norms(table, dtype, norms)
            k.awp_update(table, dtype, norms, adv_lr, adv_eps, write_backup)


@awp_step_op.register_fake
def _(weights, grads, backups, adv_lr, adv_eps, write_backup, backend):
    return None


def _torch_awp_step(ws, gs, bs, lr, eps, write_backup) -> None:
    """torch._foreach_* version (one dtype group); fp32 math, no host sync."""
    gnorm, wnorm = _torch_norms(ws, gs)
    _torch_update(ws, gs, bs, gnorm, wnorm, lr, eps, write_backup)


def _torch_norms(ws, gs):
    """(``[||g_t||]``, ``[||w_t||]``) as two fp32 vectors."""
    return torch.stack(torch._foreach_norm(f32(gs))), torch.stack(torch._foreach_norm(f32(ws)))


def _torch_update(ws, gs, bs, gnorm, wnorm, lr, eps, write_backup) -> None:
    """The step + clamp given the norms (one dtype group)."""
    if write_backup:
        torch._foreach_copy_(bs, ws)
    w32, g32, b32 = f32(ws), f32(gs), f32(bs)
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


def _sharded_awp_step(lists, parts, lr, eps, write_backup, group_) -> None:
    """FSDP2: local norms of every (backend, dtype) group into one buffer, one
    all_reduce of their squares, then the update on the local shards.
    ``parts``: ``[(backend name, indices)]``."""
    ws, gs, bs = lists
    segments = []  # (backend, indices of one dtype group, kernel module or None, table or None)
    for name, idx in parts:
        for _, sub in group([ws[i].dtype for i in idx]).items():
            sub = take(idx, sub)
            if name == "torch":
                segments.append((name, sub, None, None))
            else:
                table = tables().get("awp", [take(ws, sub), take(gs, sub), take(bs, sub)])
                segments.append((name, sub, _registry.kernels("awp", name), table))
    offsets, total = [], 0
    for seg in segments:
        offsets.append(total)
        total += 2 * len(seg[1])
    norms = torch.empty(total, dtype=torch.float32, device=ws[0].device)
    with device_guard(ws[0]):
        for (name, sub, k, table), off in zip(segments, offsets):
            out = norms[off: off + 2 * len(sub)]
            if k is None:
                torch.cat(_torch_norms(take(ws, sub), take(gs, sub)), out=out)
            else:
                k.awp_norms(table, ws[sub[0]].dtype, out)
        _dist.all_reduce_sum_(norms.square_(), group_).sqrt_()
        for (name, sub, k, table), off in zip(segments, offsets):
            out, n = norms[off: off + 2 * len(sub)], len(sub)
            if k is None:
                _torch_update(take(ws, sub), take(gs, sub), take(bs, sub), out[:n], out[n:], lr, eps,
                              write_backup)
                count_launch("torch.awp")
            else:
                k.awp_update(table, ws[sub[0]].dtype, out, lr, eps, write_backup)


def awp_step_(weights, grads, backups, *, adv_lr: float, adv_eps: float, write_backup: bool,
              backend: str | None = None) -> None:
    """One AWP attack step over every tensor, in place (see the module docstring).

    ``backups[i]`` holds ``w0`` of ``weights[i]``; with ``write_backup`` it is
    written here from the current weights first.  The work tables live in the
    shared cache of the multi-tensor ops (keyed by the tensors' addresses).
    FSDP2: weights and grads may be DTensor shards (all of them, over one
    group); ``backups`` are then the local shards' backups (see the module
    docstring for the one all_reduce)."""
    lists = (list(weights), list(grads), list(backups))
    if not lists[0]:
        return
    lists, group_ = _dist.localize(lists, ("weights", "grads", "backups"))
    device = check_lists(lists, ("weights", "grads", "backups"))
    lr, eps = float(adv_lr), float(adv_eps)
    name, fast, slow = split(backend, device, lists, ("weight", "gradient", "backup"))
    with torch.no_grad():
        if group_ is not None:  # FSDP2 shards: one all_reduce of every norm, then local updates
            parts = [(n, idx) for n, idx in ((name, fast), ("torch", slow)) if idx]
            _sharded_awp_step(lists, parts, lr, eps, bool(write_backup), group_)
            return
        if fast:
            awp_step_op(*[take(lst, fast) for lst in lists], lr, eps, bool(write_backup), name)
        if slow:
            awp_step_op(*[take(lst, slow) for lst in lists], lr, eps, bool(write_backup), "torch")


def design_bytes(numel_by_size: dict, steps: int = 1) -> int:
    """Bytes the kernels move for save + ``steps`` attack steps + restore.

    ``numel_by_size``: ``{element_size: total elements}`` of the perturbed
    tensors.  Per step: the reduction reads g and w (2 passes), the update
    reads w, g and (after the first step) the backup and writes w (first step:
    writes the backup instead of reading it): 4 passes.  Restore reads the
    backup and writes w: 2 passes.  Total ``6 * steps + 2`` passes.
    """
    return sum((6 * steps + 2) * n * size for size, n in numel_by_size.items())
