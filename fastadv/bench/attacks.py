"""One step of the input attacks: cases and implementations for the benchmark.

Cases: one step on a ``256x3x224x224`` batch (ImageNet-sized, the PGD training
batch users meet), fp32 and bf16, for each kind of step:

* ``pgd``: the L-inf PGD step (also FFGSM's and, with ``x = adv``, FGSM's);
* ``pgdl2``: the L2 PGD step (per-sample gradient and delta norms);
* ``mifgsm``: the MI-FGSM step (per-sample L1 mean, momentum update), steady
  state (the momentum is read).

On CPU (without ``--full``) the batch is ``8x3x32x32``, so the run takes seconds.

Implementations:

* ``reference``: torchattacks' lines for one step, op by op (PGD: ``sign``,
  ``mul``, ``add``, ``sub``, ``clamp``, ``add``, ``clamp``), returning a new tensor;
* ``compiled``: ``torch.compile`` of those lines;
* ``torch`` / ``triton`` / ``cuda``: ``fastadv.ops.attacks.<kind>_step_``, in place
  (one launch for PGD, two for PGD-L2 and MI-FGSM).

Check before timing: the step from the case's inputs against the reference's
step computed in fp32 and rounded once (PGD: bit-exact in fp32, within one ulp
of bf16; PGD-L2 and MI-FGSM: ``rtol=1e-5, atol=1e-6`` in fp32, one ulp of bf16).
The reference and compiled rows in bf16 round after every op: they are held
to four ulps plus ``2 * alpha`` (a sign that flips).

Bytes: what the implementation moves per step (aten ops counted one by one;
fastadv kernels: :func:`fastadv.ops.attacks.design_bytes`), so ``GB/s`` and
``%copy`` say how close each gets to the copy bandwidth (PGD: 16 bytes per
fp32 element is the floor: read adv, x, g, write adv).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .case import CaseCache, Impl, Prepared, Skip, real_sizes
from .check import SHORT, interpreted, skip_unsupported, usable_backends

KINDS = ("pgd", "pgdl2", "mifgsm")
SHAPE_FULL = (256, 3, 224, 224)
SHAPE_SMALL = (8, 3, 32, 32)
DTYPES = (torch.float32, torch.bfloat16)
EPS = {"pgd": 8 / 255, "pgdl2": 1.0, "mifgsm": 8 / 255}
ALPHA = {"pgd": 2 / 255, "pgdl2": 0.2, "mifgsm": 2 / 255}
DECAY = 1.0
EPS_FOR_DIVISION = 1e-10
TOLERANCES = {  # (rtol, atol) of the check
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2**-7, 1e-6),  # one ulp of bf16
    torch.float16: (2**-10, 1e-6),
}


@dataclass(frozen=True)
class Case:
    kind: str
    shape: tuple
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.kind} step {'x'.join(map(str, self.shape))} {SHORT[self.dtype]}"

    @property
    def size(self) -> tuple:
        return self.shape

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def cases(device, full: bool | None = None) -> list[Case]:
    """Real sizes on CUDA or with ``full``; small ones on CPU."""
    shape = SHAPE_FULL if real_sizes(device, full) else SHAPE_SMALL
    return [Case(k, shape, dt) for k in KINDS for dt in DTYPES]


# ---- torchattacks' lines for one step (the reference) ------------------------------------------------

def reference_step(kind: str, adv, images, grad, momentum=None):
    """One step as torchattacks writes it; returns the new adversarial images
    (and, for MI-FGSM, the new momentum)."""
    eps, alpha = EPS[kind], ALPHA[kind]
    if kind == "pgd":
        adv = adv + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        return torch.clamp(images + delta, min=0, max=1)
    if kind == "pgdl2":
        b = adv.shape[0]
        grad_norms = torch.norm(grad.view(b, -1), p=2, dim=1) + EPS_FOR_DIVISION
        grad = grad / grad_norms.view(b, 1, 1, 1)
        adv = adv + alpha * grad
        delta = adv - images
        delta_norms = torch.norm(delta.view(b, -1), p=2, dim=1)
        factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
        delta = delta * factor.view(-1, 1, 1, 1)
        return torch.clamp(images + delta, min=0, max=1)
    if kind == "mifgsm":
        grad = grad / torch.mean(torch.abs(grad), dim=(1, 2, 3), keepdim=True)
        grad = grad + momentum * DECAY
        adv = adv + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        return torch.clamp(images + delta, min=0, max=1), grad
    raise KeyError(kind)


class CaseData:
    """Inputs of one case (clean images, adversarial images inside the ball,
    gradient, momentum) and the expected step, shared by every implementation."""

    def __init__(self, case: Case, device, seed: int = 0):
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        shape, dt = case.shape, case.dtype
        self.case = case
        x = torch.rand(shape, generator=gen, device=device)
        eps = EPS[case.kind] if case.kind != "pgdl2" else 0.002  # inside the L2 ball, per element
        noise = torch.rand(shape, generator=gen, device=device).mul_(2 * eps).sub_(eps)
        self.x = x.to(dt)
        self.adv0 = (x + noise).clamp_(0, 1).to(dt)
        del noise
        self.g = torch.randn(shape, generator=gen, device=device).to(dt)
        self.mom0 = torch.randn(shape, generator=gen, device=device) if case.kind == "mifgsm" else None
        out = reference_step(case.kind, self.adv0.float(), self.x.float(), self.g.float(), self.mom0)
        self.expected = (out[0] if isinstance(out, tuple) else out).to(dt)
        del out

    def compare(self, got: torch.Tensor, op_by_op: bool = False) -> str | None:
        """None if ``got`` is the expected step.  ``op_by_op``: ``got`` comes from
        torchattacks' lines run in the case's dtype, rounded after every op; in
        bf16 / fp16 they may also flip a sign (one more ``2 * alpha``)."""
        rtol, atol = TOLERANCES[self.case.dtype]
        if self.case.kind == "pgd" and self.case.dtype == torch.float32:
            rtol = atol = 0.0  # no reduction: bit-exact
        if op_by_op and self.case.dtype != torch.float32:
            rtol, atol = 4 * rtol, atol + 2 * ALPHA[self.case.kind]
        err = (got.float() - self.expected.float()).abs()
        ok = bool((err <= atol + rtol * self.expected.float().abs()).all())
        return None if ok else f"differs from the reference step: max abs error {float(err.max()):.3g}"


_data = CaseCache(CaseData)


def _reference_like(case: Case, device, name: str, compile_it: bool) -> Impl:
    def setup() -> Prepared:
        data = _data(case, device)
        fn = lambda adv, x, g, m: reference_step(case.kind, adv, x, g, m)  # noqa: E731
        extra = {}
        if compile_it:
            try:
                import torch._dynamo

                torch._dynamo.reset()
                fn = torch.compile(fn)
                fn(data.adv0, data.x, data.g, data.mom0)  # compile now: a failure is a skip
            except Exception as exc:
                raise Skip(f"torch.compile failed here: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc

        def step():
            return fn(data.adv0, data.x, data.g, data.mom0)

        def check():
            out = step()
            return data.compare(out[0] if isinstance(out, tuple) else out, op_by_op=True)

        def teardown():
            if compile_it:
                torch._dynamo.reset()

        return Prepared(step=step, check=check, counting="compiled" if compile_it else "dispatch",
                        extra=extra, teardown=teardown)

    return Impl(name, setup)


def _fastadv_impl(case: Case, device, backend: str) -> Impl:
    def setup() -> Prepared:
        from fastadv.ops import attacks as ops

        skip_unsupported(backend, device, case.dtype)
        slow = interpreted(backend, device)
        data = _data(case, device)
        adv = data.adv0.clone()
        mom = None if data.mom0 is None else data.mom0.clone()
        kind, eps, alpha = case.kind, EPS[case.kind], ALPHA[case.kind]

        def step():
            if kind == "pgd":
                ops.pgd_step_(adv, data.x, data.g, alpha, eps, backend=backend)
            elif kind == "pgdl2":
                ops.pgdl2_step_(adv, data.x, data.g, alpha, eps, EPS_FOR_DIVISION, backend=backend)
            else:
                ops.mifgsm_step_(adv, data.x, data.g, mom, alpha, eps, DECAY, backend=backend)

        def check():
            adv.copy_(data.adv0)
            if mom is not None:
                mom.copy_(data.mom0)
            ptr = adv.data_ptr()
            step()
            if adv.data_ptr() != ptr:
                return "the step did not run in place"
            return data.compare(adv)

        nbytes = ops.design_bytes(kind, case.numel, data.x.element_size())
        extra = {"interpreted": True} if slow else {}
        return Prepared(step=step, check=check, design_bytes=nbytes, extra=extra, timed=not slow)

    return Impl(backend, setup)


def impls(case: Case, device) -> list[Impl]:
    """reference, compiled, then every fastadv backend usable on ``device``."""
    out = [_reference_like(case, device, "reference", False), _reference_like(case, device, "compiled", True)]
    return out + [_fastadv_impl(case, device, b) for b in usable_backends(device)]


def release() -> None:
    """Free the cached case data (call after the last case)."""
    _data.clear()
