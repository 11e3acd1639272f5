"""NEFTune (``fastadv.ops.neftune``): cases and implementations for the benchmark.

Cases: NEFTune with an attention mask (every row a random length between
half the sequence and all of it) on 16x512x768 and 8x2048x4096 embeddings
(on CPU, without ``--full``, 4x64x64), fp32 and bf16, timed per call.

Implementations: ``reference`` (NEFTune's training-loop code,
``fastadv.reference.neftune``), ``compiled`` (``torch.compile`` of it:
Inductor draws the noise inside its fused kernel too, the fair baseline), and
``fastadv.neftune`` on each backend usable here.  The ``GB/s`` and ``%copy``
columns use ``fastadv.ops.neftune.design_bytes`` for fastadv rows and the
counted aten traffic for the others.

Check before timing: padding gets no noise, and the noise of the kept tokens
divided by NEFTune's scale ``alpha / sqrt(length * dim)`` is U(-1, 1) (mean
and std within 6 sigma of the sampling error, within the bound).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .case import CaseCache, Impl, Prepared, real_sizes
from .check import SHORT, compile_or_skip, interpreted, noise_spread, skip_unsupported, usable_backends

ALPHA = 5.0
SHAPES_FULL = ((16, 512, 768), (8, 2048, 4096))
SHAPES_SMALL = ((4, 64, 64),)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {SHORT[self.dtype]}"

    @property
    def size(self) -> tuple[int, int, int]:
        return self.shape


def cases(device, full: bool | None = None) -> list[Case]:
    """Real sizes on CUDA or with ``full``; a small stand-in on CPU."""
    shapes = SHAPES_FULL if real_sizes(device, full) else SHAPES_SMALL
    return [Case(s, dt) for s in shapes for dt in DTYPES]


class Data:
    """Embeddings and an attention mask, built once per case."""

    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        b, seq, _ = case.shape
        self.dtype = case.dtype
        self.x = torch.randn(case.shape, device=device, generator=gen).to(case.dtype)
        lengths = torch.randint(seq // 2, seq + 1, (b,), device=device, generator=gen)
        self.mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()

    def check(self, out: torch.Tensor) -> str | None:
        kept = self.mask[:, :, None].bool().expand_as(self.x)
        if bool((out[~kept] != self.x[~kept]).any()):
            return "padding got noise"
        mag = ALPHA / torch.sqrt(self.mask.sum(1).float() * self.x.shape[-1])
        scaled = ((out.float() - self.x.float()) / mag[:, None, None])[kept]
        return noise_spread(scaled, torch.zeros_like(scaled), 1.0, self.dtype, uniform=True)

    def design_bytes(self) -> int:
        from fastadv.ops.neftune import design_bytes

        b, seq, _ = self.x.shape
        return design_bytes(self.x.numel(), self.x.element_size(), rows=b * seq)


_data = CaseCache(Data)


def release() -> None:
    _data.clear()


def _reference_impl(case: Case, device, compiled: bool) -> Impl:
    def setup() -> Prepared:
        from fastadv.reference.neftune import neftune

        d = _data(case, device)

        def step():
            return neftune(d.x, ALPHA, d.mask)

        if not compiled:
            return Prepared(step=step, check=lambda: d.check(step()))
        fn = compile_or_skip(step)
        return Prepared(step=fn, check=lambda: d.check(fn()), counting="compiled",
                        teardown=torch._dynamo.reset)

    return Impl("compiled" if compiled else "reference", setup)


def _fastadv_impl(case: Case, device, backend: str) -> Impl:
    def setup() -> Prepared:
        from fastadv import noise

        skip_unsupported(backend, device, case.dtype)
        d = _data(case, device)

        def step():
            return noise.neftune(d.x, ALPHA, d.mask, backend=backend)

        slow = interpreted(backend, device)
        return Prepared(step=step, check=lambda: d.check(step()), design_bytes=d.design_bytes(),
                        extra={"interpreted": True} if slow else {}, timed=not slow)

    return Impl(backend, setup)


def impls(case: Case, device) -> list[Impl]:
    """reference, compiled, then every fastadv backend usable on ``device``."""
    return [_reference_impl(case, device, False), _reference_impl(case, device, True)] + \
        [_fastadv_impl(case, device, b) for b in usable_backends(device)]
