"""The eager cost of one registered op call, by the path it takes: the row
behind the README's "eager calls bypass the dispatcher".

Op: ``fgsm_perturb`` (one input, one output, an autograd formula) on a tiny
8x8 fp32 tensor, so the call's fixed cost is all there is.  One case per
backend usable here; one step is ``calls`` calls in a Python loop (1000 on
CUDA: the row's ``ms`` is then microseconds per call; 100 on CPU, where the
default run counts and does not time).

Implementations (paths):

* ``wrapper``    ``fastadv.fgsm_perturb(e, g, eps, backend=b)``: validation,
  backend choice, then the registered op, which in eager mode calls its
  implementation directly (no dispatcher);
* ``dispatcher`` ``torch.ops.fastadv.fgsm_perturb(e, g, eps, b)``: the
  ``torch.library`` op through the dispatcher (what ``torch.compile`` records);
* ``impl``       the registered implementation called directly (what the
  wrapper's bypass runs);
* ``launcher``   the backend's kernel launcher on preallocated tensors (kernel
  backends only): the floor.

``dispatcher - impl`` is what the bypass saves per call; ``wrapper - impl``
what validation and the backend choice cost.  Check: one call of each path
gives the reference's result bit for bit (``fastadv.reference.fgsm``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .case import CaseCache, Impl, Prepared, Skip
from .check import interpreted, usable_backends

EPSILON = 0.1
SHAPE = (8, 8)
PATHS = ("wrapper", "dispatcher", "impl", "launcher")


@dataclass(frozen=True)
class Case:
    backend: str
    calls: int

    @property
    def name(self) -> str:
        return f"fgsm_perturb {'x'.join(map(str, SHAPE))} fp32 {self.backend}, {self.calls} calls"

    @property
    def size(self) -> tuple[int, int]:
        return SHAPE


def cases(device, full: bool | None = None) -> list[Case]:
    """One case per usable backend (the sizes do not change with ``full``)."""
    calls = 1000 if torch.device(device).type == "cuda" else 100
    return [Case(b, calls) for b in usable_backends(device)]


class Data:
    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        self.embeds = torch.randn(SHAPE, generator=gen, device=device)
        self.grad = torch.randn(SHAPE, generator=gen, device=device)
        self.out = torch.empty_like(self.embeds)
        from fastadv.reference.fgsm import fgsm_perturb

        self.expected = fgsm_perturb(self.embeds, self.grad, EPSILON)


_data = CaseCache(Data)


def release() -> None:
    _data.clear()


def _path(name: str, backend: str, d: Data):
    """One call along path ``name`` (a function returning the result)."""
    import fastadv
    from fastadv.ops import _registry, fgsm

    e, g = d.embeds, d.grad
    if name == "wrapper":
        return lambda: fastadv.fgsm_perturb(e, g, EPSILON, backend=backend)
    if name == "dispatcher":
        op = torch.ops.fastadv.fgsm_perturb
        return lambda: op(e, g, EPSILON, backend)
    if name == "impl":
        impl = getattr(fgsm.fgsm_perturb_op, "impl", None)
        if impl is None:
            raise Skip("the registered op has no directly callable implementation (fgsm_perturb_op.impl)")
        return lambda: impl(e, g, EPSILON, backend)
    launch = _registry.kernels("fgsm", backend).fgsm_perturb

    def launcher():
        launch(e, g, d.out, EPSILON)
        return d.out
    return launcher


def _impl(case: Case, device, name: str) -> Impl:
    def setup() -> Prepared:
        d = _data(case, device)
        call = _path(name, case.backend, d)

        def step():
            for _ in range(case.calls):
                call()

        def check():
            return None if torch.equal(call(), d.expected) else "differs from the reference"

        slow = interpreted(case.backend, device)
        extra = {"calls": case.calls} | ({"interpreted": True} if slow else {})
        kernel = case.backend != "torch"
        return Prepared(step=step, check=check, extra=extra, timed=not slow,
                        design_bytes=3 * d.embeds.nbytes * case.calls if kernel else None)

    return Impl(name, setup)


def impls(case: Case, device) -> list[Impl]:
    """Every path; no ``launcher`` on the torch backend (its implementation is
    the torch code itself: the ``impl`` row)."""
    return [_impl(case, device, p) for p in PATHS if p != "launcher" or case.backend != "torch"]
