"""``fastadv.dp.PrivacyEngine``: Opacus's engine, handing out fastadv's optimizers.

Everything but the optimizer is Opacus's own: the grad-sample hooks
(``GradSampleModule``), Poisson sampling (``DPDataLoader``), the accountant and
``get_epsilon``, checkpoints, ``make_private_with_epsilon``.  Only
``_prepare_optimizer`` is overridden: Opacus builds its optimizer as usual and,
when it is the flat-clipping ``DPOptimizer`` or ``DistributedDPOptimizer``, it
is rebuilt as fastadv's class with the same arguments (generator, secure mode,
expected batch size, loss reduction).  Other clipping modes (``per_layer``,
``adaptive``) keep Opacus's optimizer.

``grad_sample_mode="ghost"`` and ``"bk"`` are fastadv's own
(:mod:`fastadv.dp.ghost`): per-sample norms without per-sample gradients;
``make_private`` then returns ``(module, optimizer, criterion, data_loader)``
as Opacus's ghost mode does.  Opacus's data loader, validation and
accountant are used there too.  A ``DistributedDataParallel`` model gets the
distributed twins (:mod:`fastadv.dp.ghost_dist`: DDP never reduces, the
optimizer adds rank 0's noise and sums the ranks with one all_reduce per
step); a ``fully_shard``-ed model (FSDP2) gets the FSDP twins (Opacus's
``DPDDP`` and a process group without DDP raise).
"""
from __future__ import annotations

import opacus
import torch
from torch import nn
from opacus.optimizers import DistributedDPOptimizer as _OpacusDistributed
from opacus.optimizers import DPOptimizer as _OpacusDP

from . import ghost as _ghost
from . import ghost_dist as _ghost_dist
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

    def make_private(self, *, module, optimizer, criterion=nn.CrossEntropyLoss(), data_loader,
                     noise_multiplier, max_grad_norm, grad_sample_mode: str = "hooks", **kwargs):
        """Opacus's ``make_private``; with ``grad_sample_mode="ghost"`` or
        ``"bk"`` fastadv's ghost / book-keeping clipping, returning
        ``(module, optimizer, criterion, data_loader)`` (Opacus's ghost API)."""
        if grad_sample_mode not in _ghost.GHOST_MODES:
            return super().make_private(module=module, optimizer=optimizer, criterion=criterion,
                                        data_loader=data_loader, noise_multiplier=noise_multiplier,
                                        max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode,
                                        **kwargs)
        return self._make_private_ghost(module=module, optimizer=optimizer, criterion=criterion,
                                        data_loader=data_loader, noise_multiplier=noise_multiplier,
                                        max_grad_norm=max_grad_norm, mode=grad_sample_mode, **kwargs)

    def _make_private_ghost(self, *, module, optimizer, criterion, data_loader, noise_multiplier, max_grad_norm,
                            mode, batch_first: bool = True, loss_reduction: str = "mean",
                            poisson_sampling: bool = True, clipping: str = "flat", noise_generator=None,
                            wrap_model: bool = True, rand_on_empty: bool = False, strategy: str = "auto"):
        """Opacus 1.6's ``make_private`` steps for ghost mode, with fastadv's
        module wrapper, optimizer and criterion."""
        from itertools import chain

        if noise_generator and self.secure_mode:
            raise ValueError("Passing seed is prohibited in secure mode")
        if clipping != "flat":
            raise NotImplementedError(f"grad_sample_mode={mode!r} supports clipping='flat' only, got {clipping!r}")
        if not wrap_model:
            raise NotImplementedError(f"grad_sample_mode={mode!r} needs wrap_model=True")
        kind = self._ghost_distributed(module, mode)  # None, "ddp" or "fsdp"
        distributed = kind is not None
        model_parameters = set(module.parameters())
        for p in chain.from_iterable(g["params"] for g in optimizer.param_groups):
            if p not in model_parameters:
                raise ValueError("Module parameters are different than optimizer Parameters")
        self.validate(module=module, optimizer=None, data_loader=None)
        wrapper = {None: _ghost.GhostClippingModule, "ddp": _ghost_dist.DistributedGhostClippingModule,
                   "fsdp": _ghost_dist.FSDPGhostClippingModule}[kind]
        module = wrapper(module, mode=mode, batch_first=batch_first, loss_reduction=loss_reduction,
                         max_grad_norm=max_grad_norm, strategy=strategy, backend=self.backend)
        if poisson_sampling:
            module.forbid_grad_accumulation()
        data_loader = self._prepare_data_loader(data_loader, distributed=distributed,
                                                poisson_sampling=poisson_sampling, batch_first=batch_first,
                                                rand_on_empty=rand_on_empty)
        sample_rate = 1 / len(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        if distributed:  # the per-rank batch, as Opacus passes it (a true division, as there)
            expected_batch_size /= torch.distributed.get_world_size()
        if isinstance(optimizer, _OpacusDP):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        cls, extra = _ghost.GhostDPOptimizer, {}
        if kind == "ddp":
            cls, extra = _ghost_dist.DistributedGhostDPOptimizer, {"process_group": module.ddp.process_group}
        elif kind == "fsdp":
            cls = _ghost_dist.FSDPGhostDPOptimizer
        optimizer = cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                        expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                        generator=generator, secure_mode=self.secure_mode, backend=self.backend,
                        on_nonfinite=self.on_nonfinite, **extra)
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        criterion = _ghost.DPLossGhost(module, optimizer, criterion, loss_reduction)
        return module, optimizer, criterion, data_loader

    @staticmethod
    def _ghost_distributed(module, mode) -> str | None:
        """``"ddp"`` for a DDP model, ``"fsdp"`` for a ``fully_shard``-ed one,
        None for one process (fastadv.dp.ghost_dist);
        raises on what the ghost / bk modes do not support across processes."""
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        from ..ops import _dist

        if isinstance(module, FSDPModule):
            return "fsdp"
        if any(_dist.is_sharded(p) for p in module.parameters()):
            raise NotImplementedError(f"grad_sample_mode={mode!r} on DTensor-sharded parameters needs the "
                                      f"root module fully_shard-ed (FSDP2; docs/distributed.md)")
        if isinstance(module, DPDDP):
            raise NotImplementedError(f"grad_sample_mode={mode!r} takes a torch DistributedDataParallel model, "
                                      f"not Opacus's DifferentiallyPrivateDistributedDataParallel")
        if isinstance(module, DistributedDataParallel):
            if module.static_graph:
                raise NotImplementedError(f"grad_sample_mode={mode!r} under DDP(static_graph=True) is not "
                                          f"supported (the forward runs under no_sync; untested there)")
            return "ddp"
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise NotImplementedError(f"grad_sample_mode={mode!r} with a process group of "
                                      f"{torch.distributed.get_world_size()} ranks needs the model wrapped in "
                                      f"torch.nn.parallel.DistributedDataParallel (no other wrapper is "
                                      f"supported: the gradients would not be summed over the ranks)")
        return None
