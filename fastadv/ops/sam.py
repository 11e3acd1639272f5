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
no host sync.  Each bucket has its own work table (immutable, keyed by its
tensors' addresses), so buckets of equal sizes -- per-block ``rho`` on
identical blocks -- never share one.  The restore (second step) is
:func:`fastadv.ops.multi_tensor.restore_live_`.
"""
from __future__ import annotations

import torch

from ..kernels import count_launch, device_guard
from . import _registry
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
    device = weights[0].device
    k, mt = _registry.kernels("sam", backend), _registry.kernels("multi_tensor", backend)
    with device_guard(weights[0]):
        buckets = []
        for (dtype, rho, adaptive), idx in group([(w.dtype, r, a) for w, r, a in
                                                 zip(weights, rhos, adaptives)]).items():
            table = tables().get("sam", [take(weights, idx), take(grads, idx), take(backups, idx)])
            buckets.append((dtype, rho, adaptive, table))
        total = sum(b[3].n_chunks for b in buckets)
        partials = torch.empty(max(total, 1), dtype=torch.float32, device=device)
        offset = 0
        for dtype, _, adaptive, table in buckets:
            k.sam_sumsq(table, dtype, partials[offset: offset + max(table.n_chunks, 1)], adaptive)
            offset += table.n_chunks
        norm = torch.empty((), dtype=torch.float32, device=device)
        mt.global_norm(partials, total, norm)
        for dtype, rho, adaptive, table in buckets:
            k.sam_update(table, dtype, norm, rho, adaptive)
    return norm


@sam_perturb_op.register_fake
def _(weights, grads, backups, rhos, adaptives, backend):
    return torch.empty((), dtype=torch.float32, device=weights[0].device)


def _torch_sam(ws, gs, bs, rhos, adaptives) -> torch.Tensor:
    """torch._foreach_* version: fp32 math, no host sync."""
    w32, g32 = f32(ws), f32(gs)
    buckets = group(list(zip(rhos, adaptives)))
    norms = []
    for (_, adaptive), idx in buckets.items():
        g = take(g32, idx)
        if adaptive:
            g = torch._foreach_mul(torch._foreach_abs(take(w32, idx)), g)
        norms += torch._foreach_norm(g)
    norm = torch.linalg.vector_norm(torch.stack(norms))
    torch._foreach_copy_(bs, ws)
    for (rho, adaptive), idx in buckets.items():
        w, g = take(w32, idx), take(g32, idx)
        e = torch._foreach_mul(torch._foreach_mul(w, w), g) if adaptive else g
        e = torch._foreach_mul(e, rho / (norm + SAM_EPS))
        torch._foreach_copy_(take(ws, idx), torch._foreach_add(w, e))
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
    device = check_lists(lists, ("weights", "grads", "backups"))
    name, fast, slow = split(backend, device, lists, ("weight", "gradient", "backup"))
    if slow:  # one global norm: all tensors on one path
        name = "torch"
    with torch.no_grad():
        return sam_perturb_op(*lists, rhos, adaptives, name)
