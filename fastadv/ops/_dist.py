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


def _fsdp_module_cls():
    """FSDP2's module class (None: a torch built without torch.distributed)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule
    return FSDPModule


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


def localize(lists, names):
    """The local shards of every tensor of ``lists`` and the process group
    over which ``lists[0]``'s tensors are sharded (None when none is).

    One call of a multi-tensor op combines all its partial sums with *one*
    all_reduce, so its sharded tensors must share one shard group, and it
    cannot mix sharded and unsharded tensors (an unsharded tensor's partial
    would be counted once per rank): both are refused, naming the index."""
    first = lists[0]
    sharded = [is_sharded(t) for t in first]
    if not any(sharded):
        return [list(lst) for lst in lists], None
    if not all(sharded):
        i = sharded.index(False)
        raise ValueError(f"{names[0]}[{i}] is not sharded but {names[0]}[{sharded.index(True)}] is "
                         f"(FSDP2): one call cannot combine sharded and unsharded tensors; call the op "
                         f"once for each kind")
    group = shard_group(first[0])
    for i, t in enumerate(first):
        if shard_group(t) is not group:
            raise ValueError(f"{names[0]}[{i}] is sharded over another process group than "
                             f"{names[0]}[0]: one call combines its norms over one group")
    return [[local(t) for t in lst] for lst in lists], group


def local_lists(lists):
    """The local shards of every tensor (ops without a collective: EMA, copies)."""
    return [[local(t) for t in lst] for lst in lists]


def shard_of(full: torch.Tensor, t) -> torch.Tensor:
    """The part of ``full`` (a tensor of ``t``'s global shape) that ``t``'s
    local shard holds: ``torch.chunk`` along each sharded dim at this rank's
    mesh coordinate, which is how ``Shard`` placements (and FSDP2) split a
    tensor, uneven last shards and empty shards included.  Checked against
    the local shape: any other layout raises instead of returning wrong rows."""
    coords = t.device_mesh.get_coordinate()
    part = full
    for mesh_dim, p in enumerate(t.placements):
        if p.is_shard():
            pieces = torch.chunk(part, t.device_mesh.size(mesh_dim), dim=p.dim)
            c = coords[mesh_dim]
            part = pieces[c] if c < len(pieces) else part.narrow(p.dim, 0, 0)
    if part.shape != local(t).shape:
        raise NotImplementedError(f"a shard of shape {tuple(local(t).shape)} is not the torch.chunk "
                                  f"part {tuple(part.shape)} of its global shape {tuple(full.shape)} "
                                  f"(placements {t.placements})")
    return part


def shard_offset(t) -> int:
    """The flat index, in ``t``'s global tensor, of its local shard's first
    element: where the shard sits in the unsharded element order (the noise
    kernels number their random counters by it).  Raises unless the shard is
    one contiguous range of the global tensor (FSDP2's ``Shard(0)`` is; a
    shard along another dim is not)."""
    part = shard_of(torch.empty(t.shape, dtype=t.dtype, device="meta"), t)
    if part.numel() and not part.is_contiguous():
        raise NotImplementedError(f"a shard along a dim other than the first (placements {t.placements}) "
                                  f"is not one range of the global tensor's elements")
    return part.storage_offset()


def check_gradients_synced(model, params, what: str) -> None:
    """Refuse to read the gradients of FSDP2 shards whose gradient sync is off.

    Under ``set_requires_gradient_sync(False)`` (gradient accumulation without
    communication) FSDP2 keeps each backward's gradient unsharded and
    unreduced; the shard's ``.grad`` is ``None`` or the last synced step's.
    An op reading it would perturb nothing, or by a stale gradient, and say
    nothing: refused, naming the parameter.  ``params``: ``(name, parameter)``
    pairs the op is about to read.  Reads FSDP2's per-module state (private:
    a torch whose FSDP2 moved it raises rather than guesses)."""
    sharded = {id(p): n for n, p in params if is_sharded(p)}
    if not sharded:
        return
    for module in model.modules():
        if not isinstance(module, _fsdp_module_cls()):
            continue
        try:
            groups = module._get_fsdp_state()._fsdp_param_groups
            unsynced = [fp.sharded_param for g in groups if not g.reduce_grads for fp in g.fsdp_params]
        except AttributeError as exc:
            raise NotImplementedError(f"cannot read whether FSDP2 syncs the gradients of "
                                      f"{type(module).__name__} in this torch ({torch.__version__}): {exc}") from exc
        for p in unsynced:
            if id(p) in sharded:
                raise RuntimeError(
                    f"{what}: the gradient of {sharded[id(p)]!r} is not synced: its FSDP2 module has "
                    f"set_requires_gradient_sync(False), so the shard's .grad is not this backward's "
                    f"gradient (it stays unsharded and unreduced until a synced backward); call "
                    f"set_requires_gradient_sync(True) before the backward the attack follows (under "
                    f"gradient accumulation: attack after the last micro-batch's synced backward)")


def named_parameters(model) -> list:
    """``model.named_parameters()`` with every FSDP2 module's parameters sharded.

    A ``fully_shard`` module left unsharded between passes
    (``reshard_after_forward=False`` / ``set_reshard_after_backward(False)``,
    or an explicit ``unshard()``) registers its full unsharded parameters:
    FSDP2 has moved their gradient to the shards (``.grad`` is None there)
    and the next forward reuses their values as they are.  An op would read
    no gradient and a write to the shards would not reach that forward --
    the attack silently lost.  So each such module is resharded first
    (``FSDPModule.reshard()``: it frees the unsharded copy; the next forward
    all-gathers the shards again, one all-gather more than the user's
    setting).  A module that stays unsharded after ``reshard()`` is refused.
    Not detected: an op called between a forward and its backward on a
    module with ``reshard_after_forward=False`` (its backward all-gathers the
    values the op wrote; a plain model raises autograd's in-place error
    there) -- call the ops between a backward and the next forward."""
    fsdp = _fsdp_module_cls()
    for module in model.modules() if fsdp is not None else ():
        if isinstance(module, fsdp) and not _all_sharded(module):
            module.reshard()
            if not _all_sharded(module):
                raise RuntimeError(
                    f"the parameters of FSDP2 module {type(module).__name__} are unsharded and cannot be "
                    f"resharded now (between its forward and its backward?): call the op after the "
                    f"backward, when FSDP2 holds the shards and their gradients")
    return list(model.named_parameters())


def _all_sharded(module) -> bool:
    """Whether every parameter group of an FSDP2 module holds its shards
    (private state: a torch whose FSDP2 moved it raises rather than guesses)."""
    try:
        return all(g.is_sharded for g in module._get_fsdp_state()._fsdp_param_groups)
    except AttributeError as exc:
        raise NotImplementedError(f"cannot read whether FSDP2 module {type(module).__name__} is sharded in "
                                  f"this torch ({torch.__version__}): {exc}") from exc


def unwrapped(model):
    """The module a ``DistributedDataParallel`` / ``DataParallel`` wrapper holds
    (their own forward is what trains; their attributes are the wrapper's)."""
    from torch import nn

    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    inner = getattr(model, "_orig_mod", model)  # torch.compile(DDP(...)): the DDP inside
    return inner.module if isinstance(inner, wrappers) else model


def check_not_static_graph(model, what: str) -> None:
    """Refuse a ``DistributedDataParallel(static_graph=True)`` model for an op
    that runs extra forward passes backpropagated to the inputs only (input
    attacks, SiFT): DDP records its static graph from such an iteration (no
    parameter used) and never all-reduces the gradients again -- every rank
    keeps its own gradient and the replicas drift, silently."""
    from torch import nn

    model = getattr(model, "_orig_mod", model)  # torch.compile(DDP(...)): the DDP inside
    if isinstance(model, nn.parallel.DistributedDataParallel) and getattr(model, "static_graph", False):
        raise ValueError(
            f"{what}: the model is DistributedDataParallel(static_graph=True); the extra forward passes "
            f"would make DDP record a static graph that uses no parameter, after which it never "
            f"all-reduces the gradients (silently, the replicas drift). Run the attack on the wrapped "
            f"module (ddp.module; batch-norm statistics are then the rank's own) or build DDP without "
            f"static_graph")
