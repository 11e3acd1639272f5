"""Weight averaging as a functional op over many tensors: ``lerp_``.

``lerp_(averages, currents, weight)`` sets ``a <- a + weight * (x - a)`` for
every pair, in fp32 with ``torch.lerp``'s formula, rounded once (the average
may be stored in another dtype than the model, e.g. an fp32 EMA of a bf16
model).  EMA uses ``weight = 1 - decay``; SWA passes ``count`` (a device
tensor, e.g. ``AveragedModel.n_averaged``) and gets ``weight = 1 / (count +
1)`` computed on the device.  Kernel backends: one launch per dtype pair,
reading each tensor once and writing the average once (3 passes); no host
sync.
"""
from __future__ import annotations

import torch

from ..kernels import count_launch, device_guard
from .awp import _cache, check_lists, choose, device_of, f32, group, kernels, pick


def lerp_(averages, currents, weight: float | None = None, *, count: torch.Tensor | None = None,
          backend: str | None = None, cache=None) -> None:
    """``a <- a + w * (x - a)`` in place, ``w = weight``, or ``1 / (count + 1)``
    with ``count`` read on the device."""
    if (weight is None) == (count is None):
        raise ValueError("give exactly one of weight= and count=")
    lists = (list(averages), list(currents))
    if not lists[0]:
        return
    device = check_lists(lists, ("averages", "currents"))
    if count is not None:
        count = count.detach().reshape(()).to(device=device, dtype=torch.int64)
    name, fast, slow = choose(backend, device, lists, same_dtype=False)
    if fast:
        with device_guard(device_of(lists, fast)):
            k = kernels(name)
            cache = _cache(cache)
            keys = [(lists[0][i].dtype, lists[1][i].dtype) for i in fast]
            for (dt_a, dt_x), pos in group(keys).items():
                idx = pick(fast, pos)
                table = cache.get("lerp", [pick(lst, idx) for lst in lists])
                k.lerp(table, dt_a, dt_x, 0.0 if weight is None else float(weight), count)
    if slow:
        keys = [(lists[0][i].dtype, lists[1][i].dtype) for i in slow]
        for pos in group(keys).values():
            idx = pick(slow, pos)
            _torch_lerp(pick(lists[0], idx), pick(lists[1], idx), weight, count)
        count_launch("torch.lerp")


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
