"""Sharded parameters (FSDP2's ``fully_shard``: DTensors with ``Shard``
placements): an op works on the local shard, and every norm it takes is
combined across the shards with one ``all_reduce`` of the partial sums, on the
device (no host sync).  Replicated parameters (DDP) need nothing: their
gradients are already reduced, so every rank computes the same perturbation.
"""
from __future__ import annotations

import torch


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor
        return None
    return DTensor


def is_sharded(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls) and any(p.is_shard() for p in t.placements)


def local(t):
    """The local shard of a DTensor (a view of its storage), else ``t``."""
    cls = _dtensor_cls()
    return t.to_local() if cls is not None and isinstance(t, cls) else t


def shard_group(t):
    """The process group over which ``t``'s shards are spread (one mesh dim)."""
    mesh = t.device_mesh
    dims = [i for i, p in enumerate(t.placements) if p.is_shard()]
    if len(dims) != 1:
        raise NotImplementedError(f"fastadv supports parameters sharded on one mesh dimension "
                                  f"(FSDP2), got placements {t.placements}")
    return mesh.get_group(dims[0])


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """In place sum across ``group`` (asynchronous on the device stream, no host sync)."""
    import torch.distributed as dist
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
