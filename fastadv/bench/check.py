"""Checks against the reference shared by the bench op modules: dtype names,
tolerances, the Triton interpreter's limits, the backends to list.

Tolerances (the project's rule, also in ``benchmarks/README.md``, "checks"):
fp32 against the fp32 reference ``rtol=1e-5, atol=1e-6``; bf16 / fp16
against the reference run in fp32 and rounded once, within two ulps of the
result plus two ulps of the step (low-precision seeds round intermediate
values in their own dtype).
"""
from __future__ import annotations

import math

import torch

from .case import Skip

SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TOLERANCES = {  # (rtol, atol)
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2 * 2**-7, 1e-5),  # two ulps of bf16 (at the bottom of a binade)
    torch.float16: (2 * 2**-10, 1e-5),  # two ulps of fp16
}


def close(got: torch.Tensor, expected: torch.Tensor, step: torch.Tensor | None = None) -> tuple[bool, float]:
    """(within tolerance, max abs error) of ``got`` against ``expected`` (in
    ``got``'s dtype): ``|got - exp| <= atol + rtol (|exp| + |step|)``, the
    step term only for low-precision dtypes."""
    rtol, atol = TOLERANCES[got.dtype]
    exp = expected.float()
    err = (got.float() - exp).abs()
    allowed = exp.abs().mul_(rtol).add_(atol)
    if step is not None and got.dtype != torch.float32:
        allowed.add_(step.float().abs(), alpha=rtol)
    return bool((err <= allowed).all()), float(err.max()) if err.numel() else 0.0


def not_restored(named, originals: dict, ptrs: list[int] | None) -> str | None:
    """None if every ``(name, tensor)`` of ``named`` equals ``originals[name]``
    bit for bit and, when ``ptrs`` is given, the tensors still have the
    ``data_ptr`` values recorded before the perturbation; else what is wrong."""
    named = list(named)
    for n, t in named:
        if not torch.equal(t.detach(), originals[n]):
            return f"restore of {n} is not bit-exact"
    if ptrs is not None and [t.data_ptr() for _, t in named] != ptrs:
        return "a parameter's data_ptr changed"
    return None


def interpreted(backend: str, device) -> bool:
    """Whether ``backend`` runs in the Triton interpreter here (checked and
    counted, never timed: its times are numpy's)."""
    from fastadv import _backend

    return backend == "triton" and _backend.triton_interpreter() and torch.device(device).type == "cpu"


def skip_unsupported(backend: str, device, dtype: torch.dtype) -> None:
    """:class:`Skip` for a low-precision case under the interpreter (it has no
    bf16 / fp16 arithmetic)."""
    if interpreted(backend, device) and dtype in (torch.bfloat16, torch.float16):
        raise Skip("the Triton interpreter has no bf16/fp16 arithmetic (GPU only)")


def usable_backends(device) -> list[str]:
    """The fastadv backends that get a row on ``device`` (``python -m fastadv
    env`` says why the others do not)."""
    from fastadv import _env

    return [b for b, why in _env.backends(device).items() if why is None]


def noise_spread(out: torch.Tensor, x: torch.Tensor, scale: float, dtype: torch.dtype,
                 uniform: bool = False) -> str | None:
    """None if ``(out - x) / scale`` has mean ~0 and the spread of a standard
    normal (``uniform``: of U(-1, 1), within its bound) within 6 sigma of the
    sampling error, plus rounding slack for a ``dtype`` below fp32; else what
    is wrong."""
    noise = ((out.float() - x.float()) / scale).flatten()
    if noise.numel() > 1 << 24:
        noise = noise[: 1 << 24]
    n = max(noise.numel(), 1)
    mean, std = float(noise.mean()), float(noise.std())
    want = 1 / math.sqrt(3) if uniform else 1.0
    slack = 0.0 if dtype == torch.float32 else 0.05
    if abs(mean) > 6 * want / math.sqrt(n) + slack or abs(std / want - 1) > 6 * math.sqrt(0.5 / n) + slack:
        return f"noise mean {mean:.4f}, std {std:.4f} (want 0, {want:.4f}; n = {n})"
    if uniform and float(noise.abs().max()) > 1 + 1e-3 + 2 * slack:
        return f"uniform noise beyond its bound: {float(noise.abs().max()):.4f}"
    return None


def compile_or_skip(fn):
    """``torch.compile(fn)``, compiled now by one call (Dynamo reset first): a
    failure to compile is a :class:`Skip` of the row, not a crash."""
    try:
        import torch._dynamo

        torch._dynamo.reset()
        compiled = torch.compile(fn)
        compiled()
    except Exception as exc:
        raise Skip(f"torch.compile failed here: {type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return compiled
