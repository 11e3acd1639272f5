"""SAM's first step as a functional op over many tensors.

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
:func:`fastadv.ops.awp.copy_tensors_`.
"""
from __future__ import annotations

import torch

from ..kernels import count_launch, device_guard
from .awp import _cache, check_lists, choose, f32, group, kernels, pick

SAM_EPS = 1e-12


def sam_perturb_(weights, grads, backups, rhos, adaptives, *, backend: str | None = None,
                 cache=None) -> torch.Tensor:
    """Back up and perturb every weight in place; returns the global gradient
    norm (an fp32 device tensor, never read back)."""
    lists = (list(weights), list(grads), list(backups))
    rhos, adaptives = [float(r) for r in rhos], [bool(a) for a in adaptives]
    if not (len(rhos) == len(adaptives) == len(lists[0])):
        raise ValueError("rhos and adaptives need one entry per weight")
    if not lists[0]:
        return torch.zeros((), dtype=torch.float32)
    device = check_lists(lists, ("weights", "grads", "backups"))
    name, fast, slow = choose(backend, device, lists)
    if slow:  # one global norm: all tensors on one path
        count_launch("torch.sam")
        return _torch_sam(*lists, rhos, adaptives)
    with device_guard(lists[0][0]):
        k = kernels(name)
        cache = _cache(cache)
        keys = [(lists[0][i].dtype, rhos[i], adaptives[i]) for i in range(len(rhos))]
        buckets = []
        for (dtype, rho, adaptive), idx in group(keys).items():
            buckets.append((dtype, rho, adaptive, cache.get("sam", [pick(lst, idx) for lst in lists])))
        total = sum(b[3].n_chunks for b in buckets)
        partials = torch.empty(max(total, 1), dtype=torch.float32, device=device)
        offset = 0
        for dtype, _, adaptive, table in buckets:
            k.sam_sumsq(table, dtype, partials[offset: offset + max(table.n_chunks, 1)], adaptive)
            offset += table.n_chunks
        norm = torch.empty(1, dtype=torch.float32, device=device)
        k.global_norm(partials, total, norm)
        for dtype, rho, adaptive, table in buckets:
            k.sam_update(table, dtype, norm, rho, adaptive)
    return norm[0]


def _torch_sam(ws, gs, bs, rhos, adaptives) -> torch.Tensor:
    """torch._foreach_* version: fp32 math, no host sync."""
    w32, g32 = f32(ws), f32(gs)
    buckets = group(list(zip(rhos, adaptives)))
    norms = []
    for (_, adaptive), idx in buckets.items():
        g = pick(g32, idx)
        if adaptive:
            g = torch._foreach_mul(torch._foreach_abs(pick(w32, idx)), g)
        norms += torch._foreach_norm(g)
    norm = torch.linalg.vector_norm(torch.stack(norms))
    torch._foreach_copy_(bs, ws)
    for (rho, adaptive), idx in buckets.items():
        w, g = pick(w32, idx), pick(g32, idx)
        e = torch._foreach_mul(torch._foreach_mul(w, w), g) if adaptive else g
        e = torch._foreach_mul(e, rho / (norm + SAM_EPS))
        torch._foreach_copy_(pick(ws, idx), torch._foreach_add(w, e))
    return norm
