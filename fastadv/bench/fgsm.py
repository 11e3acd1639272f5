"""Embedding FGSM, ``fastadv.fgsm_perturb(e, g, eps) = e + eps * sign(g)``:
cases and implementations for the benchmark.

Cases: the input embeddings of one BERT-base batch (16x512x768) and of a
long-context 8x2048x4096 batch, fp32 and bf16; on CPU a 4x64x64 stand-in.

Implementations: ``reference`` (``fastadv.reference.fgsm.fgsm_perturb``, the
seed's line: ``sign``, scale, add, three kernels), ``compiled``
(``torch.compile`` of it: Inductor fuses it into one pass, the fair
baseline) and ``fastadv.fgsm_perturb`` on every backend usable here (one pass,
fp32 math rounded once).

Check before timing: the result equals the reference run in fp32 and
rounded once (fp32: ``rtol=1e-5``; bf16: two ulps of the result plus two of
``eps``: the seed rounds ``eps * sign(g)`` to bf16 first).  Design bytes: read
the embeddings and the gradient, write the result (3 passes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .case import CaseCache, Impl, Prepared, Skip, real_sizes
from .check import SHORT, close, interpreted, skip_unsupported, usable_backends

EPSILON = 0.1
SHAPES_FULL = ((16, 512, 768), (8, 2048, 4096))
SHAPES_SMALL = ((4, 64, 64),)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"embeds {'x'.join(map(str, self.shape))} {SHORT[self.dtype]}"

    @property
    def size(self) -> tuple[int, ...]:
        return self.shape


def cases(device, full: bool | None = None) -> list[Case]:
    """Real sizes on CUDA or with ``full``; a small stand-in on CPU."""
    shapes = SHAPES_FULL if real_sizes(device, full) else SHAPES_SMALL
    return [Case(s, dt) for s in shapes for dt in DTYPES]


class Data:
    """Embeddings, a gradient with exact zeros (``sign(0) = 0``) and the
    expected result (the reference in fp32, rounded once)."""

    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        self.embeds = torch.randn(case.shape, generator=gen, device=device).to(case.dtype)
        grad = torch.randn(case.shape, generator=gen, device=device)
        grad[..., ::7] = 0.0
        self.grad = grad.to(case.dtype)
        self.expected = (self.embeds.float() + EPSILON * self.grad.float().sign()).to(case.dtype)
        self.step = torch.full((), EPSILON)

    def check(self, fn) -> str | None:
        ok, err = close(fn(), self.expected, self.step)
        return None if ok else f"differs from the reference: max abs error {err:.3g}"

    def design_bytes(self) -> int:
        return 3 * self.embeds.numel() * self.embeds.element_size()


_data = CaseCache(Data)


def release() -> None:
    _data.clear()


def _reference_impl(case: Case, device, name: str) -> Impl:
    def setup() -> Prepared:
        from fastadv.reference.fgsm import fgsm_perturb

        d = _data(case, device)

        def fn():
            return fgsm_perturb(d.embeds, d.grad, EPSILON)

        if name == "compiled":
            fn = _compiled(fn)
        return Prepared(step=fn, check=lambda: d.check(fn), counting="compiled" if name == "compiled" else "dispatch",
                        teardown=torch._dynamo.reset if name == "compiled" else None)

    return Impl(name, setup)


def _compiled(fn):
    import torch._dynamo

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn)
        compiled()  # compile now, so a failure is a skip, not a crash
    except Exception as exc:
        raise Skip(f"torch.compile failed here: {type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return compiled


def _fastadv_impl(case: Case, device, backend: str) -> Impl:
    def setup() -> Prepared:
        from fastadv import fgsm_perturb

        skip_unsupported(backend, device, case.dtype)
        d = _data(case, device)

        def fn():
            return fgsm_perturb(d.embeds, d.grad, EPSILON, backend=backend)

        slow = interpreted(backend, device)
        return Prepared(step=fn, check=lambda: d.check(fn), design_bytes=d.design_bytes(),
                        extra={"interpreted": True} if slow else {}, timed=not slow)

    return Impl(backend, setup)


def impls(case: Case, device) -> list[Impl]:
    """reference, compiled, then every fastadv backend usable on ``device``."""
    out = [_reference_impl(case, device, "reference"), _reference_impl(case, device, "compiled")]
    return out + [_fastadv_impl(case, device, b) for b in usable_backends(device)]
