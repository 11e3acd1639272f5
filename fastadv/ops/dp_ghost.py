"""Ghost clipping's per-sample norms as a registered op:
``torch.ops.fastadv.dp_ghost_linear_sq_norms``.

``linear_sq_norms(a, g)``: for a Linear layer with inputs ``a [B, T, I]`` and
output gradients ``g [B, T, O]``, the squared Frobenius norm of every
sample's weight gradient ``g_b^T a_b`` without forming it, in fp32 (the Gram
form, :func:`fastadv.reference.dp_ghost.gram_sq_norms`).  Backends: torch (the
reference math) and triton (one launch, one program per sample,
deterministic); no CUDA kernel yet, so a forced ``backend="cuda"`` raises.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..kernels import count_launch, device_guard
from ..reference import dp_ghost as ref
from . import _registry

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@_registry.op("dp_ghost_linear_sq_norms", mutates_args={"out"})
def linear_sq_norms_op(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """``out[b] = ||g_b^T a_b||^2`` (``out``: fp32 ``[B]``)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_linear_sq_norms")
        out.copy_(ref.gram_sq_norms([ref.MatUse(p=g, q=a)]))
        return
    with device_guard(a):
        _registry.kernels("dp_ghost", backend).linear_sq_norms(a, g, out)


@linear_sq_norms_op.register_fake
def _(a, g, out, backend):
    return None


def _check(a: torch.Tensor, g: torch.Tensor) -> None:
    if not (isinstance(a, torch.Tensor) and isinstance(g, torch.Tensor)):
        raise TypeError("a and g must be tensors")
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a must be [B, T, I] and g [B, T, O] with the same B and T, got "
                         f"{tuple(a.shape)} and {tuple(g.shape)}")
    if a.device != g.device:
        raise ValueError(f"a and g must be on one device, got {a.device} and {g.device}")
    if not (a.is_floating_point() and g.is_floating_point()):
        raise TypeError(f"a and g must be floating point, got {a.dtype} and {g.dtype}")


def _backend_for(backend, a, g) -> str:
    name = _registry.pick(backend, a.device, dtypes=[("activations", a), ("output gradients", g)],
                          allowed=_DTYPES, same_dtype=[("activations", a), ("output gradients", g)])
    if name == "cuda":  # no CUDA kernel for this op: forced cuda raises, auto uses triton or torch
        if _registry.forced(backend):
            raise _backend.BackendUnavailable("dp_ghost_linear_sq_norms has no CUDA kernel yet; "
                                              "use backend='triton' or 'torch'")
        name = "torch"
    return name


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-sample ``||g_b^T a_b||_F^2``, fp32 ``[B]`` (fp64 for fp64 inputs on
    the torch backend)."""
    _check(a, g)
    name = _backend_for(backend, a, g)
    if name != "torch":
        a, g = a.contiguous(), g.contiguous()
    out = torch.empty(a.shape[0], dtype=ref.acc_dtype(a, g), device=a.device)
    linear_sq_norms_op(a, g, out, name)
    return out
