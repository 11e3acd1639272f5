"""SAM's first and second step (``fastadv.SAM`` vs davda54's reference,
``fastadv.reference.sam``): cases and implementations for the benchmark.

Case: ``first_step()`` + ``second_step()`` over the parameters of a
BERT-base shaped model (199 tensors, 109.5M elements, every one with a
random gradient), fp32 and bf16; on CPU the same structure, tiny.  The base
optimizer's step is a no-op: it is the same ``torch.optim`` code for every
implementation, so the row shows SAM's own work (the norm, the perturbation
with its backup, the restore), and every timed call starts from the same
weights.

Implementations: ``reference`` and ``fastadv.SAM`` on every backend usable
here (no ``compiled``: ``torch.compile`` graph-breaks on the ``p.data``
assignments of the reference).

Check before timing: after ``first_step`` the weights equal the reference
run in fp32 (fp32: ``rtol=1e-5``; bf16: two ulps of the weight plus two of
the perturbation), after ``second_step`` they are bit-identical to the
original (fastadv: same ``data_ptr``).  Design bytes (``rho`` fixed, not
adaptive): the norm reads g, the update reads w and g and writes w and the
backup, the restore reads the backup and writes w: 7 passes.
"""
from __future__ import annotations


import torch

from .awp import MODELS_FULL, MODELS_SMALL, ModelCase, ShapeModel, model_shapes
from .case import CaseCache, Impl, Prepared, real_sizes
from .check import SHORT, close, interpreted, not_restored, skip_unsupported, usable_backends

RHO = 0.05


class Case(ModelCase):
    WHAT = "first+second step"


def cases(device, full: bool | None = None) -> list[Case]:
    """BERT-base shapes on CUDA or with ``full``; tiny ones on CPU."""
    model = MODELS_FULL[0] if real_sizes(device, full) else MODELS_SMALL[0]
    return [Case(model, dt) for dt in (torch.float32, torch.bfloat16)]


class NoStep(torch.optim.Optimizer):
    """A base optimizer whose ``step`` does nothing (see the module docstring)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, dict(kwargs))

    def step(self, closure=None):
        return None


class Data:
    """Weights, gradients and the reference's perturbed weights (fp32, rounded once)."""

    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        shapes = model_shapes(*case.model[1:])
        self.w0 = {n: (0.05 * torch.randn(s, generator=gen, device=device)).to(case.dtype)
                   for n, s in shapes.items()}
        self.g = {n: (1e-3 * torch.randn(s, generator=gen, device=device)).to(case.dtype)
                  for n, s in shapes.items()}
        self.elements = sum(w.numel() for w in self.w0.values())
        self.expected = self._reference_fp32()

    def model(self, dtype=None) -> ShapeModel:
        dtype = dtype or next(iter(self.w0.values())).dtype
        m = ShapeModel({n: v.to(dtype).clone() for n, v in self.w0.items()})
        for n, p in m.named_parameters():
            p.grad = self.g[n].to(dtype)
        return m

    def _reference_fp32(self) -> dict[str, torch.Tensor]:
        from fastadv.reference.sam import SAM as RefSAM

        m = self.model(torch.float32)
        ref = RefSAM(m.parameters(), NoStep, rho=RHO)
        ref.first_step()
        dtype = next(iter(self.w0.values())).dtype
        return {n: p.detach().to(dtype) for n, p in m.named_parameters()}

    def check(self, sam, model: ShapeModel, inplace: bool) -> str | None:
        ptrs = [p.data_ptr() for p in model.parameters()]
        sam.first_step()
        for n, p in model.named_parameters():
            ok, err = close(p.detach(), self.expected[n], self.expected[n].float() - self.w0[n].float())
            if not ok:
                sam.second_step()
                return f"{n} after first_step differs from the reference: max abs error {err:.3g}"
        sam.second_step()
        return not_restored(model.named_parameters(), self.w0, ptrs if inplace else None)

    def design_bytes(self) -> int:
        return 7 * self.elements * next(iter(self.w0.values())).element_size()


_data = CaseCache(Data)


def release() -> None:
    _data.clear()


def _impl(case: Case, device, name: str) -> Impl:
    def setup() -> Prepared:
        from fastadv import SAM
        from fastadv.reference.sam import SAM as RefSAM

        fused = name != "reference"
        if fused:
            skip_unsupported(name, device, case.dtype)
        d = _data(case, device)
        model = d.model()
        if fused:
            sam = SAM(model.parameters(), NoStep, rho=RHO, backend=name)
        else:
            sam = RefSAM(model.parameters(), NoStep, rho=RHO)

        def step():
            sam.first_step()
            sam.second_step()

        slow = fused and interpreted(name, device)
        extra = {"tensors": len(d.w0), "elements": d.elements} | ({"interpreted": True} if slow else {})
        return Prepared(step=step, check=lambda: d.check(sam, model, inplace=fused),
                        design_bytes=d.design_bytes() if fused else None, extra=extra, timed=not slow)

    return Impl(name, setup)


def impls(case: Case, device) -> list[Impl]:
    """reference, then every fastadv backend usable on ``device``."""
    return [_impl(case, device, n) for n in ["reference"] + usable_backends(device)]
