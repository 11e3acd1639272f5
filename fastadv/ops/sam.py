"""SAM's first step as a functional op over many tensors:
``torch.ops.fastadv.sam_perturb_``.

``sam_perturb_(weights, grads, backups, rhos, adaptives)`` computes, as in
davda54's SAM (``fastadv.reference.sam``)::

    norm = || [ ||(|w| if adaptive else 1) * g|| for every tensor ] ||
    b = w                                      # the backup (old_p)
    w = w + ((w^2 if adaptive else 1) * g) * (rho / (norm + 1e-12))

with one global norm over all tensors and ``rho`` / ``adaptive`` per tensor
(per parameter group).  Kernel backends: one reduction launch per bucket of
(dtype, rho, adaptive), one finalize launch, one update launch per bucket;
no host sync.  FSDP2 (DTensor shards): the local shards' global norm is
squared and summed over the shard group by one ``all_reduce`` of 4 bytes per
call, then the update runs on the local shards.  Each bucket has its own work table (immutable, keyed by its
tensors' addresses), so buckets of equal sizes -- per-block ``rho`` on
identical blocks -- never share one.  The restore (second step) is
:func:`fastadv.ops.multi_tensor.restore_live_`.
"""
from __future__ import annotations

import torch

from ..kernels import count_launch, device_guard
from . import _dist, _registry
from .multi_tensor import check_lists, f32, group, split, tables, take

SAM_EPS = 1e-12


@_registry.op("sam_perturb_", mutates_args={"weights", "backups"})
def sam_perturb_op(weights: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
                   rhos: list[float], adaptives: list[bool], backend: str) -> torch.Tensor:
    """Back up and perturb every weight in place (one device, at least one
    tensor); returns the global gradient norm, a 0-dim fp32 device tensor."""
    if backend == "torch":
        count_launch("torch.sam")
        return _torch_sam(weights, grads, backups, rhos, adaptives)
    with device_guard(weights[0]):
        buckets = _kernel_buckets(weights, grads, backups, rhos, adaptives, backend)
        norm = _kernel_norm(buckets, backend, weights[0].device)
        _kernel_update(buckets, backend, norm)
    return norm


def _kernel_buckets(weights, grads, backups, rhos, adaptives, backend):
    """One work table per bucket of (dtype, rho, adaptive)."""
    buckets = []
    for (dtype, rho, adaptive), idx in group([(w.dtype, r, a) for w, r, a in
                                             zip(weights, rhos, adaptives)]).items():
        table = tables().get("sam", [take(weights, idx), take(grads, idx), take(backups, idx)])
        buckets.append((dtype, rho, adaptive, table))
    return buckets


def _kernel_norm(buckets, backend, device) -> torch.Tensor:
    """The global norm over every bucket: per-chunk partials, one finalize."""
    k, mt = _registry.kernels("sam", backend), _registry.kernels("multi_tensor", backend)
    total = sum(b[3].n_chunks for b in buckets)
    partials = torch.empty(max(total, 1), dtype=torch.float32, device=device)
    offset = 0
    for dtype, _, adaptive, table in buckets:
        k.sam_sumsq(table, dtype, partials[offset: offset + max(table.n_chunks, 1)], adaptive)
        offset += table.n_chunks
    norm = torch.empty((), dtype=torch.float32, device=device)
    mt.global_norm(partials, total, norm)
    return norm


def _kernel_update(buckets, backend, norm) -> None:
    k = _registry.kernels("sam", backend)
    for dtype, rho, adaptive, table in buckets:
        k.sam_update(table, dtype, norm, rho, adaptive)


@sam_perturb_op.register_fake
def _(weights, grads, backups, rhos, adaptives, backend):
    return torch.empty((), dtype=torch.float32, device=weights[0].device)


def _torch_sam(ws, gs, bs, rhos, adaptives) -> torch.Tensor:
    """torch._foreach_* version: fp32 math, no host sync."""
    norm = _torch_norm(ws, gs, rhos, adaptives)
    _torch_update(ws, gs, bs, rhos, adaptives, norm)
    return norm


def _torch_norm(ws, gs, rhos, adaptives) -> torch.Tensor:
    w32, g32 = f32(ws), f32(gs)
    norms = []
    for (_, adaptive), idx in group(list(zip(rhos, adaptives))).items():
        g = take(g32, idx)
        if adaptive:
            g = torch._foreach_mul(torch._foreach_abs(take(w32, idx)), g)
        norms += torch._foreach_norm(g)
    return torch.linalg.vector_norm(torch.stack(norms))


def _torch_update(ws, gs, bs, rhos, adaptives, norm) -> None:
    w32, g32 = f32(ws), f32(gs)
    torch._foreach_copy_(bs, ws)
    for (rho, adaptive), idx in group(list(zip(rhos, adaptives))).items():
        w, g = take(w32, idx), take(g32, idx)
        e = torch._foreach_mul(torch._foreach_mul(w, w), g) if adaptive else g
        e = torch._foreach_mul(e, rho / (norm + SAM_EPS))
        torch._foreach_copy_(take(ws, idx), torch._foreach_add(w, e))


def _sharded_sam(ws, gs, bs, rhos, adaptives, backend, group_) -> torch.Tensor:
    """FSDP2: the local shards' norm, squared, summed over the shard group by
    one all_reduce (4 bytes), square-rooted; then the update on the local shards."""
    with device_guard(ws[0]):
        if backend == "torch":
            count_launch("torch.sam")
            norm = _torch_norm(ws, gs, rhos, adaptives)
        else:
            buckets = _kernel_buckets(ws, gs, bs, rhos, adaptives, backend)
            norm = _kernel_norm(buckets, backend, ws[0].device)
        norm = _dist.all_reduce_sum_(norm.reshape(1).square_(), group_).sqrt_().reshape(())
        if backend == "torch":
            _torch_update(ws, gs, bs, rhos, adaptives, norm)
        else:
            _kernel_update(buckets, backend, norm)
    return norm


def sam_perturb_(weights, grads, backups, rhos, adaptives, *, backend: str | None = None) -> torch.Tensor:
    """Back up and perturb every weight in place; returns the global gradient
    norm (an fp32 device tensor, never read back)."""
    lists = (list(weights), list(grads), list(backups))
    rhos, adaptives = [float(r) for r in rhos], [bool(a) for a in adaptives]
    if not (len(rhos) == len(adaptives) == len(lists[0])):
        raise ValueError("rhos and adaptives need one entry per weight")
    if not lists[0]:
        return torch.zeros((), dtype=torch.float32)
    lists, group_ = _dist.localize(lists, ("weights", "grads", "backups"))
    device = check_lists(lists, ("weights", "grads", "backups"))
    name, fast, slow = split(backend, device, lists, ("weight", "gradient", "backup"))
    if slow:  # one global norm: all tensors on one path
        name = "torch"
    with torch.no_grad():
        if group_ is not None:  # FSDP2 shards: one all_reduce of the norm's square
            return _sharded_sam(*lists, rhos, adaptives, name, group_)
        return sam_perturb_op(*lists, rhos, adaptives, name)
