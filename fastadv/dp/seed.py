"""Seed 000's ``DPOptimizer``, fused: clip the *total* gradient norm, add noise.

Names: :class:`SeedDPOptimizer` (also ``fastadv.dp.seed.DPOptimizer``, the
seed's own name in the seed's module) and ``fastadv.DPOptimizer``, the seed's
import, a subclass that warns (:class:`SeedDPOptimizerWarning`, once per
process) on its first instantiation that it is this optimizer and not
:class:`fastadv.dp.DPOptimizer` (Opacus's, per-sample DP).

NOT per-sample differential privacy.  This optimizer clips the gradient of
the whole batch (``torch.nn.utils.clip_grad_norm_``) and adds ``N(0,
noise_multiplier^2)`` to it.  Clipping the sum bounds the batch gradient's
norm, so one sample can change it by up to ``2 * max_grad_norm`` (the whole
gradient, not a 1/B share); the noise is not calibrated to that (its std is
``noise_multiplier``, not ``noise_multiplier * max_grad_norm``) and no
accountant tracks the steps: there is no (epsilon, delta) guarantee.
For DP-SGD use
:class:`fastadv.dp.DPOptimizer` (Opacus-compatible, per-sample clipping,
accounting through :class:`fastadv.dp.PrivacyEngine`).

What it is: the seed's class with the seed's semantics, made fast.  ``step()``
rewrites ``p.grad`` of the first parameter group only, never updates the
parameters (the seed wraps no inner optimizer), ignores ``closure`` and
returns None; a parameter without a gradient raises ``TypeError`` (the seed
fails there too) before anything is modified.  The clip coefficient is
``clamp(max_grad_norm * (1 / (||g||_total + 1e-6)), max=1)`` exactly as
``clip_grad_norm_`` computes it; the kernel backends do the norm and the
clip + noise for every gradient in two passes (one reduction launch and one
update launch per dtype, a one-program finalize), with the noise drawn in the
kernel from Philox keyed by ``generator`` (default: the device's generator, so
``torch.manual_seed`` reproduces a run).
"""
from __future__ import annotations

import warnings

import torch

from ..ops import dp as _ops

__all__ = ["SeedDPOptimizer", "DPOptimizer", "SeedDPOptimizerWarning"]


class SeedDPOptimizerWarning(UserWarning):
    """``fastadv.DPOptimizer`` was used: seed 000's total-norm optimizer, not per-sample DP."""


class SeedDPOptimizer(torch.optim.Optimizer):
    """``SeedDPOptimizer(params, noise_multiplier=1.0, max_grad_norm=1.0)``, seed
    000's ``DPOptimizer`` API: total-norm clip + noise, NOT per-sample DP.

    Example::

        opt = fastadv.dp.seed.SeedDPOptimizer(model.parameters(), noise_multiplier=0.01,
                                              max_grad_norm=1.0)
        loss.backward()
        opt.step()            # p.grad <- clip(p.grad) + noise; parameters unchanged
        inner_optimizer.step()
    """

    def __init__(self, params, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, *,
                 generator: torch.Generator | None = None, backend: str | None = None):
        super().__init__(params, {})
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.generator = generator
        self.backend = backend

    @torch.no_grad()
    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        for i, p in enumerate(params):
            if p.grad is None:
                raise TypeError(f"parameter {i} of the first group has no gradient (p.grad is None); "
                                f"DPOptimizer.step() clips and noises every gradient of that group")
        _ops.clip_grad_norm_and_noise_([p.grad for p in params], self.max_grad_norm, self.noise_multiplier,
                                       generator=self.generator, backend=self.backend)
        return None


DPOptimizer = SeedDPOptimizer  # the seed's name, in the seed's module (no warning: the path says it)

WARNING = ("fastadv.DPOptimizer is seed 000's optimizer: it clips the TOTAL gradient norm of the batch "
           "and adds N(0, noise_multiplier^2) noise -- NOT per-sample differential privacy, no "
           "(epsilon, delta) guarantee.  For DP-SGD use fastadv.dp.DPOptimizer or "
           "fastadv.dp.PrivacyEngine (Opacus's, per-sample clipping and accounting).  To keep the seed's "
           "optimizer without this warning import fastadv.dp.seed.SeedDPOptimizer.")
_warned = False


class _TopLevelDPOptimizer(SeedDPOptimizer):
    """``fastadv.DPOptimizer``: :class:`SeedDPOptimizer` (seed 000's import
    keeps working) that warns on its first instantiation in the process, so
    that it cannot be taken for :class:`fastadv.dp.DPOptimizer`."""

    def __init__(self, *args, **kwargs):
        global _warned
        if not _warned:
            _warned = True
            warnings.warn(WARNING, SeedDPOptimizerWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


_TopLevelDPOptimizer.__name__ = _TopLevelDPOptimizer.__qualname__ = "DPOptimizer"
_TopLevelDPOptimizer.__module__ = "fastadv"
