"""``fastadv.dp.PrivacyEngine``: Opacus's engine, handing out fastadv's optimizers.

Everything but the optimizer is Opacus's own: the grad-sample hooks
(``GradSampleModule``), Poisson sampling (``DPDataLoader``), the accountant and
``get_epsilon``, checkpoints, ``make_private_with_epsilon``.  Only
``_prepare_optimizer`` is overridden: Opacus builds its optimizer as usual and,
when it is the flat-clipping ``DPOptimizer`` or ``DistributedDPOptimizer``, it
is rebuilt as fastadv's class with the same arguments (generator, secure mode,
expected batch size, loss reduction).  Other clipping modes (``per_layer``,
``adaptive``, ghost clipping) keep Opacus's optimizer.
"""
from __future__ import annotations

import opacus
from opacus.optimizers import DistributedDPOptimizer as _OpacusDistributed
from opacus.optimizers import DPOptimizer as _OpacusDP

from .optimizer import DistributedDPOptimizer, DPOptimizer

_SWAP = {_OpacusDP: DPOptimizer, _OpacusDistributed: DistributedDPOptimizer}


def to_fastadv(optimizer: _OpacusDP, *, backend: str | None = None, on_nonfinite: str = "drop"):
    """fastadv's version of an Opacus flat-clipping optimizer (the same one when
    fastadv has none for its class)."""
    cls = _SWAP.get(type(optimizer))
    if cls is None:
        return optimizer
    new = cls(optimizer.original_optimizer, noise_multiplier=optimizer.noise_multiplier,
              max_grad_norm=optimizer.max_grad_norm, expected_batch_size=optimizer.expected_batch_size,
              loss_reduction=optimizer.loss_reduction, generator=optimizer.generator,
              secure_mode=optimizer.secure_mode, backend=backend, on_nonfinite=on_nonfinite)
    if optimizer.step_hook is not None:
        new.attach_step_hook(optimizer.step_hook)
    return new


class PrivacyEngine(opacus.PrivacyEngine):
    """``opacus.PrivacyEngine`` whose ``make_private`` returns
    :class:`fastadv.dp.DPOptimizer` (one import changes)::

        from fastadv.dp import PrivacyEngine      # was: from opacus import PrivacyEngine

        privacy_engine = PrivacyEngine()
        model, optimizer, data_loader = privacy_engine.make_private(
            module=model, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=1.1, max_grad_norm=1.0)
        ...
        privacy_engine.get_epsilon(delta=1e-5)

    ``backend`` and ``on_nonfinite`` go to the optimizer (see
    :class:`fastadv.dp.DPOptimizer`).
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False, backend: str | None = None,
                 on_nonfinite: str = "drop"):
        super().__init__(accountant=accountant, secure_mode=secure_mode)
        self.backend = backend
        self.on_nonfinite = on_nonfinite

    def _prepare_optimizer(self, *args, **kwargs):
        optimizer = super()._prepare_optimizer(*args, **kwargs)
        return to_fastadv(optimizer, backend=self.backend, on_nonfinite=self.on_nonfinite)
