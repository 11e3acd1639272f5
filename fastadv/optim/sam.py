"""``fastadv.SAM``: davda54's SAM / ASAM optimizer (same arguments, methods
and protocol) on fused multi-tensor kernels.

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)      # w <- w + e(w), w backed up
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)     # w restored, base optimizer step

First step: one global gradient norm over every parameter with a gradient
(``|w| * g`` for adaptive groups), then ``w += (w^2 if adaptive) * g * rho /
(norm + 1e-12)`` with the backup written in the same pass; a handful of
launches for any number of parameters and no host sync.  Second step: a
bit-exact in-place copy back (``data_ptr`` never changes), then
``base_optimizer.step()``.

With a GradScaler (the direction ``e(w)`` does not depend on the loss
scale, so the first step may use scaled gradients)::

    scaler.scale(loss).backward()
    optimizer.first_step(zero_grad=True)
    scaler.scale(loss_fn(model(x), y)).backward()
    optimizer.restore()                       # w back, no optimizer step
    scaler.step(optimizer.base_optimizer)     # unscale, skip on inf / NaN, step
    scaler.update()
    optimizer.zero_grad()

Differences from davda54, on the side of keeping weights safe: the second
step restores exactly the parameters the first step perturbed (davda54:
those that have a gradient at the second step), into their current storage
(a parameter reallocated in between, e.g. by ``model.double().float()``, is
restored where it now lives; one whose shape or dtype changed raises
``StorageMoved`` and keeps its backup); ``first_step`` twice without a
restore raises instead of backing up perturbed weights; ``state[p]['old_p']``
is a view of one flat backup buffer.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..ops import _dist
from ..ops.multi_tensor import BackupBuffers, restore_live_
from ..ops.sam import sam_perturb_


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around ``base_optimizer`` (a class; it is
    built on this optimizer's parameter groups with ``**kwargs``).

    Args:
        params: parameters or parameter groups (groups may set ``rho`` and
            ``adaptive``).
        base_optimizer: e.g. ``torch.optim.SGD``.
        rho: neighbourhood size (>= 0).
        adaptive: ASAM (scale-invariant ``e(w)``).
        backend: ``'auto'`` (default, or ``FASTADV_BACKEND``), ``'triton'``,
            ``'cuda'`` or ``'torch'``.
        **kwargs: the base optimizer's arguments.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 backend: str | None = None, **kwargs):
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.backend = _backend.check_name(backend.lower()) if backend else None
        self._buffers = BackupBuffers()
        self._perturbed: tuple[list, list] | None = None
        self.last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """``w <- w + e(w)`` for every parameter with a gradient (backed up)."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.first_step() called again before second_step() / restore(): the "
                               "weights are still perturbed (the original weights are kept)")
        params, rhos, adaptives, names = [], [], [], []
        for g, pg in enumerate(self.param_groups):
            for i, p in enumerate(pg["params"]):
                if p.grad is None:
                    continue
                params.append(p)
                rhos.append(pg["rho"])
                adaptives.append(pg["adaptive"])
                names.append(f"param_groups[{g}]['params'][{i}]")
        weights = [p.data for p in params]
        grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params]
        backups = self._buffers.views([_dist.local(w) for w in weights])  # FSDP2: the local shards
        if len({w.device for w in weights}) > 1:
            raise ValueError("SAM needs every parameter with a gradient on one device (one global "
                             "gradient norm)")
        self.last_grad_norm = sam_perturb_(weights, grads, backups, rhos, adaptives, backend=self.backend)
        for p, b in zip(params, backups):
            self.state[p]["old_p"] = b
        self._perturbed = (params, backups, names)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights of the last ``first_step`` (bit-exact, in place).

        The weights are written into each parameter's *current* storage: if
        user code reallocated a parameter since ``first_step``
        (``model.double().float()``, ``.to()``), its new storage is restored
        when that is exact (same shape and dtype); otherwise
        :class:`~fastadv.ops._live.StorageMoved` names it, nothing is
        written, and the backups (``state[p]['old_p']``) are kept, so
        converting the model back and calling ``restore()`` again works."""
        if self._perturbed is None:
            raise RuntimeError("SAM.restore() / second_step() called without a preceding first_step()")
        params, backups, names = self._perturbed
        restore_live_(names, [p.data for p in params], backups, between="first_step() and restore()",
                      backend=self.backend)
        self._perturbed = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights, then ``base_optimizer.step()``."""
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """``first_step(zero_grad=True)``, ``closure()`` (a full forward-backward),
        ``second_step()``."""
        if closure is None:
            raise ValueError("Sharpness Aware Minimization requires closure, but it was not provided")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
