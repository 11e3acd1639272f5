"""SiFT's perturbation ops (``fastadv.ops.sift``): cases and implementations
for the benchmark.

Cases, on ``[tokens, hidden]`` normalised activations (16x512 tokens x 768 and
32x512 x 1024; on CPU 256x64), fp32 and bf16:

* ``init``: the initial ``delta = clamp(N(0, ip^2), -2 ip, 2 ip)`` (fp32) and
  ``x + delta`` (reference: ``PerturbationLayer.update_delta`` of
  ``fastadv.reference.sift``, DeBERTa's layer, on its first call;
  fastadv: ``sift_init``, one pass with the noise drawn in the kernel);
* ``update``: one max-norm step ``delta += lr * g / (1e-6 + max|g|)`` unless
  ``||g||`` is NaN / inf, then ``x + delta`` (reference: ``update_delta`` with
  ``delta.grad`` set, which reads the norm on the host; fastadv:
  ``sift_update_``, the test on the device).

Implementations: ``reference`` and each fastadv backend usable here (no
``compiled``: the reference is a stateful layer with a host-side branch).

Checks before timing: ``init``: ``x + delta`` equals ``(x + delta)`` in fp32
rounded once, bit for bit, ``|delta| <= 2 ip``, and the spread of ``delta``
matches the reference's own draw (a clamped normal: mean within 6 sigma of
the sampling error, std within 6 sigma of the reference's); ``update``:
``delta`` equals DeBERTa's formula (``rtol=1e-5``), ``x + delta`` is the fp32
sum rounded once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .case import CaseCache, Impl, Prepared, real_sizes
from .check import SHORT, interpreted, skip_unsupported, usable_backends

LR = 1e-3
IP = 1e-2
SHAPES_FULL = ((16 * 512, 768), (32 * 512, 1024))
SHAPES_SMALL = ((256, 64),)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    kind: str  # "init" or "update"
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.kind} {'x'.join(map(str, self.shape))} {SHORT[self.dtype]}"

    @property
    def size(self) -> tuple[int, int]:
        return self.shape


def cases(device, full: bool | None = None) -> list[Case]:
    """Real sizes on CUDA or with ``full``; a small stand-in on CPU."""
    shapes = SHAPES_FULL if real_sizes(device, full) else SHAPES_SMALL
    return [Case(kind, s, dt) for s in shapes for kind in ("init", "update") for dt in DTYPES]


class Data:
    """Normalised activations, a first delta, a gradient, the updated delta."""

    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(case.shape, generator=gen, device=device)
        self.x = torch.nn.functional.layer_norm(x, (case.shape[-1],), eps=1e-7).to(case.dtype)
        self.delta0 = (IP * torch.randn(case.shape, generator=gen, device=device)).clamp_(-2 * IP, 2 * IP)
        self.grad = 1e-3 * torch.randn(case.shape, generator=gen, device=device)
        self.updated = self.delta0 + LR * self.grad / (1e-6 + self.grad.abs().amax(-1, keepdim=True))
        self.rows = case.shape[0]

    def reference_layer(self):
        from fastadv.reference.sift import PerturbationLayer

        layer = PerturbationLayer(self.x.shape[-1], LR, IP)
        layer.input = self.x
        layer.adversarial_(True)
        return layer

    def sum_rounded(self, delta: torch.Tensor) -> torch.Tensor:
        return (self.x.float() + delta).to(self.x.dtype)

    def check_init(self, delta: torch.Tensor, pert: torch.Tensor) -> str | None:
        if float(delta.abs().max()) > 2 * IP:
            return "initial delta beyond 2 * init_perturbation"
        if not torch.equal(pert, self.sum_rounded(delta)):
            return "x + delta is not the fp32 sum rounded once"
        layer = self.reference_layer()
        layer.update_delta(True)
        want = layer.delta.detach()
        n = delta.numel()
        mean, std, ref_std = float(delta.mean()), float(delta.std()), float(want.std())
        if abs(mean) > 6 * ref_std / math.sqrt(n) or abs(std / ref_std - 1) > 6 * math.sqrt(2 / n):
            return f"delta mean {mean:.3g}, std {std:.4g}; the reference's draw: std {ref_std:.4g}"
        return None

    def check_update(self, delta: torch.Tensor, pert: torch.Tensor) -> str | None:
        if not torch.allclose(delta, self.updated, rtol=1e-5, atol=1e-7):
            return "delta differs from DeBERTa's formula"
        if not torch.equal(pert, self.sum_rounded(delta)):
            return "x + delta is not the fp32 sum rounded once"
        return None

    def design_bytes(self, kind: str) -> int:
        from fastadv.ops.sift import design_bytes

        op = "sift_init" if kind == "init" else "sift_update"
        return design_bytes(op, self.x.numel(), self.x.element_size(), rows=self.rows)


_data = CaseCache(Data)


def release() -> None:
    _data.clear()


def _reference_impl(case: Case, device) -> Impl:
    def setup() -> Prepared:
        d = _data(case, device)
        layer = d.reference_layer()
        if case.kind == "init":
            def step():
                layer.delta = None
                layer.update_delta(True)
            check = None  # the reference's own draw is the yardstick of the fastadv check
        else:
            def step():
                layer.delta = d.delta0.clone().requires_grad_(True)
                layer.delta.grad = d.grad
                layer.update_delta(True)

            def check():
                step()
                return d.check_update(layer.delta.detach(), layer.perturbated_input)
        return Prepared(step=step, check=check)

    return Impl("reference", setup)


def _fastadv_impl(case: Case, device, backend: str) -> Impl:
    def setup() -> Prepared:
        from fastadv.ops.sift import sift_init, sift_update_

        skip_unsupported(backend, device, case.dtype)
        d = _data(case, device)
        if case.kind == "init":
            buf = torch.empty(case.shape, dtype=torch.float32, device=device)

            def step():
                return sift_init(d.x, IP, out=buf, backend=backend)

            def check():
                delta, pert = step()
                return d.check_init(delta, pert)
        else:
            delta = d.delta0.clone()

            def step():
                return sift_update_(d.x, delta, d.grad, LR, backend=backend)

            def check():
                delta.copy_(d.delta0)
                pert, _ = step()
                return d.check_update(delta, pert)
        slow = interpreted(backend, device)
        return Prepared(step=step, check=check, design_bytes=d.design_bytes(case.kind),
                        extra={"interpreted": True} if slow else {}, timed=not slow)

    return Impl(backend, setup)


def impls(case: Case, device) -> list[Impl]:
    """reference, then every fastadv backend usable on ``device``."""
    return [_reference_impl(case, device)] + [_fastadv_impl(case, device, b) for b in usable_backends(device)]
