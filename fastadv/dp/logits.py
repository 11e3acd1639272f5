"""DP-Logits (seed 004): calibrated Gaussian noise on a model's output logits.

The defence of "Sampling Attacks: Amplification of Membership Inference
Attacks by Repeated Queries" (Rahimian et al., 2020): the served logits are
``logits + N(0, sigma^2)``, fresh noise on every query, so that the exact
scores, which membership-inference attacks exploit, are never released.

What it guarantees.  The Gaussian mechanism makes *one release* of a vector
``f(x)`` (epsilon, delta)-DP with respect to any change of ``f(x)`` of L2 size
at most ``sensitivity``.  Raw logits have no bound, so pass ``clip_norm=c``:
each row (the last dimension) is first scaled to L2 norm at most ``c``, any
two rows then differ by at most ``2 c``, and ``sigma = gaussian_sigma(eps,
delta, sensitivity=2 * c)`` makes each served row (eps, delta)-DP in that
sense.  Repeated queries compose (that is the paper's point): budget them.
This protects the outputs; it is not DP training (use :class:`DPOptimizer`).

The noise is fastadv's in-kernel Philox noise on CUDA (one launch), the same
``secure_mode`` as DP-SGD, and its gradient is the identity (so the helper can
sit inside a training graph).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import dp as _ops


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest noise std for which the Gaussian mechanism with L2
    ``sensitivity`` is (``epsilon``, ``delta``)-DP: the exact condition of the
    analytic Gaussian mechanism (Balle and Wang, ICML 2018, Theorem 8),

        Phi(D / (2 s) - e s / D) - exp(e) Phi(-D / (2 s) - e s / D) <= delta,

    solved by bisection (below the classical ``D sqrt(2 ln(1.25 / delta)) / e``)."""
    eps = _ops._number(epsilon, "epsilon")
    dlt = _ops._number(delta, "delta")
    sens = _ops._number(sensitivity, "sensitivity")
    if eps <= 0 or not 0 < dlt < 1 or sens <= 0:
        raise ValueError(f"need epsilon > 0, 0 < delta < 1 and sensitivity > 0; got epsilon={eps}, "
                         f"delta={dlt}, sensitivity={sens}")

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    def excess(s: float) -> float:  # the privacy profile's delta at sigma = s, minus delta
        a, b = sens / (2.0 * s), eps * s / sens
        return phi(a - b) - math.exp(eps) * phi(-a - b) - dlt

    hi = sens
    while excess(hi) > 0:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid == lo or mid == hi:
            break
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi


class _AddNoise(torch.autograd.Function):
    """``x + noise`` with the identity as gradient (the noise does not depend on ``x``)."""

    @staticmethod
    def forward(ctx, x, sigma, generator, secure_mode, backend):
        return _ops.add_noise([x], sigma, generator=generator, secure_mode=secure_mode,
                              backend=backend)[0].view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def clip_rows(logits: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each row (last dimension) scaled to L2 norm at most ``clip_norm``:
    ``x * min(1, c / (||x|| + 1e-6))`` (differentiable, no host sync)."""
    c = _ops._number(clip_norm, "clip_norm")
    if c <= 0:
        raise ValueError(f"clip_norm must be > 0, got {c}")
    norm = torch.linalg.vector_norm(logits, dim=-1, keepdim=True, dtype=torch.float32)
    factor = ((norm + 1e-6).reciprocal() * c).clamp(max=1.0)
    return logits * factor.to(logits.dtype)


def dp_logits(logits: torch.Tensor, sigma: float, *, clip_norm: float | None = None,
              generator: torch.Generator | None = None, secure_mode: bool = False,
              backend: str | None = None) -> torch.Tensor:
    """``logits`` (rows clipped to ``clip_norm`` first, if given) plus
    ``N(0, sigma^2)`` noise on every element, out of place.

    ``sigma``: the noise std, e.g. ``gaussian_sigma(epsilon, delta, 2 * clip_norm)``.
    ``generator`` keys the noise (reproducible under ``torch.manual_seed``);
    ``secure_mode`` keys it from ``os.urandom`` on every call and sums four
    draws (see docs/dp.md)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    sigma = _ops._number(sigma, "sigma")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    x = clip_rows(logits, clip_norm) if clip_norm is not None else logits
    if x.requires_grad and torch.is_grad_enabled():
        return _AddNoise.apply(x, sigma, generator, secure_mode, backend)
    with torch.no_grad():
        return _AddNoise.forward(None, x, sigma, generator, secure_mode, backend)


class DPLogits(nn.Module):
    """Wraps ``model`` so that its logits are served through :func:`dp_logits`.

    The output may be a tensor, or an object with a ``logits`` attribute
    (Hugging Face model outputs), whose ``logits`` is replaced.  ``sigma=None``
    computes it from ``epsilon`` and ``delta`` with sensitivity ``2 * clip_norm``
    (``clip_norm`` is then required).

    Example::

        served = DPLogits(model, epsilon=1.0, delta=1e-5, clip_norm=10.0).eval()
        scores = served(x)
    """

    def __init__(self, model: nn.Module, sigma: float | None = None, *, epsilon: float | None = None,
                 delta: float | None = None, clip_norm: float | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False,
                 backend: str | None = None):
        super().__init__()
        if sigma is None:
            if epsilon is None or delta is None or clip_norm is None:
                raise ValueError("give sigma, or epsilon, delta and clip_norm to calibrate it")
            sigma = gaussian_sigma(epsilon, delta, 2.0 * clip_norm)
        self.model = model
        self.sigma = float(sigma)
        self.clip_norm = clip_norm
        self.generator = generator
        self.secure_mode = secure_mode
        self.backend = backend

    def _noisy(self, logits: torch.Tensor) -> torch.Tensor:
        return dp_logits(logits, self.sigma, clip_norm=self.clip_norm, generator=self.generator,
                         secure_mode=self.secure_mode, backend=self.backend)

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self._noisy(out)
        if getattr(out, "logits", None) is not None:
            out.logits = self._noisy(out.logits)
            return out
        raise TypeError(f"DPLogits needs the model to return a tensor or an object with .logits, "
                        f"got {type(out).__name__}")
