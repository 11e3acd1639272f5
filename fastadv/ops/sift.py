"""SiFT's two steps as functional ops: ``torch.ops.fastadv.sift_init_`` and
``torch.ops.fastadv.sift_update_`` (DeBERTa's perturbation layer; the plain
form is ``fastadv.reference.sift``, the layer ``fastadv.sift``).

* ``sift_init(x, ip)``: ``delta = clamp(N(0, ip^2), -2 ip, 2 ip)`` (fp32) and
  ``pert = x + delta`` in ``x``'s dtype, one pass on the kernel backends (the
  noise drawn in the kernel; randomness as in :mod:`fastadv.ops.noise`).
* ``sift_update_(x, delta, grad, lr)``: ``delta += lr * g / (1e-6 + max|g|
  over the last dim)`` in place unless ``||g||`` is NaN or inf (decided on the
  device), then ``pert = x + delta``; returns ``(pert, ok)``.

Both write ``delta`` in place (declared: ``mutates_args``), which is why the
ops carry no autograd formula (``torch.library`` refuses one on a mutating
op); the layer links ``pert`` to the ``delta`` leaf with a one-line
``torch.autograd.Function`` whose backward is the identity in fp32
(``fastadv/sift/sift.py``), which costs no pass over memory.
"""
from __future__ import annotations

import torch

from ..kernels import count_launch, device_guard
from . import _registry
from .noise import check_float, draw, number


@_registry.op("sift_init_", mutates_args={"delta"})
def sift_init_op(x: torch.Tensor, delta: torch.Tensor, rand: torch.Tensor, init_perturbation: float,
                 backend: str) -> torch.Tensor:
    """``delta <- clamp(ip * z, -2 ip, 2 ip)`` (``delta``: contiguous fp32 of x's
    shape); returns ``pert = x + delta`` in x's dtype.  ``z`` from the key
    ``rand`` (kernels) or ``rand`` itself (torch, fp32)."""
    ip = init_perturbation
    if backend == "torch":
        count_launch("torch.sift_init")
        delta.copy_(torch.clamp(rand * ip, -2 * ip, 2 * ip))
        return (x.to(torch.float32) + delta).to(x.dtype)
    x = x.contiguous()
    pert = torch.empty_like(x)
    with device_guard(x):
        _registry.kernels("sift", backend).sift_init(x, delta, pert, rand, ip)
    return pert


@sift_init_op.register_fake
def _(x, delta, rand, init_perturbation, backend):
    if backend == "torch":
        return (x.to(torch.float32) + delta).to(x.dtype)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_registry.op("sift_update_", mutates_args={"delta"})
def sift_update_op(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, learning_rate: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DeBERTa's step on ``delta`` in place; returns ``(pert, ok)``, ``ok`` a
    0-dim bool device tensor (the step was taken)."""
    lr = learning_rate
    g = grad.to(torch.float32)
    if backend == "torch":
        count_launch("torch.sift_update")
        norm = torch.linalg.vector_norm(g)
        ok = torch.isfinite(norm)
        step = lr * g / (1e-6 + g.abs().amax(-1, keepdim=True))
        delta.copy_(torch.where(ok, delta + step, delta))
        return (x.to(torch.float32) + delta).to(x.dtype), ok
    cols = x.shape[-1] if x.dim() else 1
    x2 = x.contiguous().view(-1, cols)
    pert = torch.empty_like(x2)
    with device_guard(x2):
        ok = _registry.kernels("sift", backend).sift_update(x2, delta.view(-1, cols),
                                                          g.contiguous().view(-1, cols), pert, lr)
    return pert.view(x.shape), ok


@sift_update_op.register_fake
def _(x, delta, grad, learning_rate, backend):
    ok = torch.empty((), dtype=torch.bool, device=x.device)
    if backend == "torch":
        return (x.to(torch.float32) + delta).to(x.dtype), ok
    return torch.empty_like(x, memory_format=torch.contiguous_format), ok


def sift_init(x: torch.Tensor, init_perturbation: float, *, out: torch.Tensor | None = None,
              generator: torch.Generator | None = None, backend: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta, pert)``: ``delta = clamp(N(0, ip^2), -2 ip, 2 ip)`` in fp32
    (written into ``out`` when given: contiguous fp32 of ``x``'s shape) and
    ``pert = x + delta`` in ``x``'s dtype.  No autograd; one pass on kernels."""
    check_float(x, "x")
    ip = number(init_perturbation, "init_perturbation")
    if out is not None and (out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError("out must be a contiguous float32 tensor of x's shape")
    name = _registry.pick(backend, x.device, dtypes=[("tensors", x)], same_device=[("x", x), ("out", out)])
    with torch.no_grad():
        delta = torch.empty(x.shape, dtype=torch.float32, device=x.device) if out is None else out
        rand = draw(name, x.shape, torch.float32, x.device, generator)
        return delta, sift_init_op(x, delta, rand, ip, name)


def sift_update_(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, learning_rate: float, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeBERTa's step, ``delta += lr * g / (1e-6 + max|g| over the last dim)``
    in place unless ``||g||`` is NaN or inf, then ``pert = x + delta``.

    Returns ``(pert, ok)``: ``ok`` is a 0-dim bool device tensor (the step was
    taken), never read on the host.  ``delta`` and ``grad`` are fp32 of ``x``'s
    shape."""
    check_float(x, "x")
    lr = number(learning_rate, "learning_rate", nonneg=False)
    if delta.shape != x.shape or grad.shape != x.shape:
        raise ValueError(f"delta {tuple(delta.shape)} and grad {tuple(grad.shape)} must have x's shape "
                         f"{tuple(x.shape)}")
    if delta.dtype != torch.float32 or not delta.is_contiguous():
        raise ValueError("delta must be a contiguous float32 tensor")
    name = _registry.pick(backend, x.device, dtypes=[("tensors", x)],
                          same_device=[("x", x), ("delta", delta), ("grad", grad)])
    with torch.no_grad():
        return sift_update_op(x, delta, grad, lr, name)


def design_bytes(op: str, numel: int, element_size: int, *, rows: int = 0) -> int:
    """Bytes the fused design moves per call: ``sift_init`` reads x, writes
    pert and the fp32 delta; ``sift_update`` reads g twice (stats + update),
    delta (read + write), x, writes pert, plus the per-row statistics."""
    s = element_size
    if op == "sift_init":
        return numel * (2 * s + 4)
    if op == "sift_update":
        return numel * (4 * 4 + 2 * s) + 8 * rows
    raise ValueError(f"unknown op {op!r}")
