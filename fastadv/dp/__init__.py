"""Differentially private training with fused kernels.

* :func:`clip_and_noise` -- per-sample clipping across all tensors, the
  clipped sum and Gaussian noise in one fused op (also :func:`clip_and_accumulate`
  and :func:`add_noise`, its two halves);
* :class:`DPOptimizer`, :class:`DistributedDPOptimizer` -- Opacus's optimizers
  (subclasses) doing their work with that op;
* :class:`PrivacyEngine` -- Opacus's engine handing out those optimizers (one
  changed import; accounting, Poisson sampling and hooks stay Opacus's);
* :class:`GhostClippingModule`, :class:`GhostDPOptimizer`, :class:`DPLossGhost`
  -- ``make_private(grad_sample_mode="ghost" | "bk")``: per-sample norms
  without per-sample gradients (ghost clipping, book-keeping);
  :class:`DistributedGhostClippingModule`, :class:`DistributedGhostDPOptimizer`
  -- the same under DDP (a DDP model given to ``make_private``);
  :class:`FSDPGhostClippingModule`, :class:`FSDPGhostDPOptimizer` -- ghost
  mode under FSDP2 (a ``fully_shard``-ed model);
* :func:`dp_logits`, :class:`DPLogits`, :func:`gaussian_sigma` -- noise on
  output logits (seed 004);
* :class:`fastadv.dp.seed.SeedDPOptimizer` -- seed 000's batch-level (NOT
  per-sample) optimizer, fused; the seed's import ``fastadv.DPOptimizer`` is
  that class too, and warns on first use that it is not this package's
  :class:`DPOptimizer`.

The optimizer and the engine need ``opacus`` (imported on first use).
See docs/dp.md.
"""
from ..ops.dp import add_noise, clip_and_accumulate, clip_and_noise  # noqa: F401
from . import seed  # noqa: F401  (seed 000's optimizer: fastadv.dp.seed.SeedDPOptimizer)
from .logits import DPLogits, dp_logits, gaussian_sigma  # noqa: F401

_OPACUS_NAMES = {"DPOptimizer": "optimizer", "DistributedDPOptimizer": "optimizer",
                 "PrivacyEngine": "engine", "GhostClippingModule": "ghost", "GhostDPOptimizer": "ghost",
                 "DPLossGhost": "ghost", "UnsupportedLayerError": "ghost",
                 "DistributedGhostClippingModule": "ghost_dist", "DistributedGhostDPOptimizer": "ghost_dist",
                 "FSDPGhostClippingModule": "ghost_dist", "FSDPGhostDPOptimizer": "ghost_dist"}

__all__ = ["clip_and_noise", "clip_and_accumulate", "add_noise", "DPOptimizer", "DistributedDPOptimizer",
           "PrivacyEngine", "GhostClippingModule", "GhostDPOptimizer", "DPLossGhost", "UnsupportedLayerError",
           "DistributedGhostClippingModule", "DistributedGhostDPOptimizer", "FSDPGhostClippingModule",
           "FSDPGhostDPOptimizer",
           "dp_logits", "DPLogits", "gaussian_sigma"]


def __getattr__(name):
    if name in _OPACUS_NAMES:
        import importlib

        try:
            module = importlib.import_module(f".{_OPACUS_NAMES[name]}", __name__)
        except ImportError as exc:
            raise ImportError(f"fastadv.dp.{name} builds on Opacus, which cannot be imported ({exc}); "
                              f"install it with `pip install opacus`") from exc
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
