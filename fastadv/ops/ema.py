"""Weight averaging as a functional op over many tensors:
``torch.ops.fastadv.ema_lerp_``.

``lerp_(averages, currents, weight)`` sets ``a <- a + weight * (x - a)`` for
every pair, in fp32 with ``torch.lerp``'s formula, rounded once (the average
may be stored in another dtype than the model, e.g. an fp32 EMA of a bf16
model).  EMA uses ``weight = 1 - decay``; SWA passes ``count`` (a device
tensor, e.g. ``AveragedModel.n_averaged``) and gets ``weight = 1 / (count +
1)`` computed on the device.  Kernel backends: one launch per dtype pair,
reading each tensor once and writing the average once (3 passes); no host
sync.  FSDP2: averages and model tensors sharded alike (an EMA of a
``fully_shard``-ed model, registered from its DTensor parameters) are
averaged shard by shard, with no collective.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import count_launch, device_guard
from . import _dist, _registry
from .multi_tensor import check_lists, f32, group, split, tables, take


@_registry.op("ema_lerp_", mutates_args={"averages"})
def lerp_op(averages: list[torch.Tensor], currents: list[torch.Tensor], weight: float,
            count: Optional[torch.Tensor], backend: str) -> None:
    """``a <- a + w * (x - a)`` in place over tensors on one device; ``w =
    weight``, or ``1 / (count + 1)`` (``count``: a 0-dim int64 tensor on that
    device, read by the kernels) when ``count`` is given."""
    if not averages:
        return
    groups = group([(a.dtype, x.dtype) for a, x in zip(averages, currents)])
    if backend == "torch":
        for idx in groups.values():
            _torch_lerp(take(averages, idx), take(currents, idx), weight, count)
        count_launch("torch.lerp")
        return
    k = _registry.kernels("ema", backend)
    with device_guard(averages[0]):
        for (dt_a, dt_x), idx in groups.items():
            table = tables().get("lerp", [take(averages, idx), take(currents, idx)])
            k.lerp(table, dt_a, dt_x, weight, count)


@lerp_op.register_fake
def _(averages, currents, weight, count, backend):
    return None


def _torch_lerp(avg, cur, weight, count) -> None:
    """torch._foreach_* version (one dtype pair), no host sync."""
    if count is None and avg[0].dtype == cur[0].dtype == torch.float32:
        torch._foreach_lerp_(avg, cur, float(weight))
        return
    a32, x32 = f32(avg), f32(cur)
    if count is None:
        new = torch._foreach_lerp(a32, x32, float(weight))
    else:
        new = torch._foreach_sub(x32, a32)
        torch._foreach_mul_(new, 1.0 / (count + 1).to(torch.float32))
        torch._foreach_add_(new, a32)
    torch._foreach_copy_(avg, new)


def lerp_(averages, currents, weight: float | None = None, *, count: torch.Tensor | None = None,
          backend: str | None = None) -> None:
    """``a <- a + w * (x - a)`` in place, ``w = weight``, or ``1 / (count + 1)``
    with ``count`` read on the device."""
    if (weight is None) == (count is None):
        raise ValueError("give exactly one of weight= and count=")
    lists = _dist.local_lists((averages, currents))  # FSDP2: shard by shard, no collective
    if not lists[0]:
        return
    device = check_lists(lists, ("averages", "currents"))
    if count is not None:
        count = count.detach().reshape(()).to(device=device, dtype=torch.int64)
    w = 0.0 if weight is None else float(weight)
    name, fast, slow = split(backend, device, lists, ("average", "model tensor"), same_dtype=False)
    with torch.no_grad():
        if fast:
            lerp_op(take(lists[0], fast), take(lists[1], fast), w, count, name)
        if slow:
            lerp_op(take(lists[0], slow), take(lists[1], slow), w, count, "torch")
