"""Opacus-compatible DP optimizers whose clipping and noise are fastadv's fused op.

:class:`DPOptimizer` subclasses ``opacus.optimizers.DPOptimizer`` and keeps its
protocol: ``step`` / ``pre_step`` (``False`` on a skipped step, the signal
``BatchMemoryManager`` relies on), ``signal_skip_step``, ``zero_grad``
(``p.summed_grad`` survives a skipped step), ``grad_sample`` as a tensor or as
a list of accumulated batches, empty Poisson batches, ``loss_reduction`` sum
and mean (``expected_batch_size * accumulated_iterations``), the step hook the
privacy accountant attaches, the processed-gradient checks, ``state_dict``.

What changes is the work: ``pre_step`` clips, sums, noises and scales every
parameter in one fused call (three kernel launches for any number of
parameters on the triton / cuda backends, no host sync), writing the
noise-free clipped sum into ``p.summed_grad`` (as Opacus leaves it) and the
private gradient into ``p.grad`` (in place when ``p.grad`` is a contiguous
tensor of the right shape and dtype, so its address is stable).  Accumulated
``grad_sample`` lists are clipped batch by batch (the clip factor of a sample
only involves its own batch): no ``torch.cat``.

Differences from Opacus, on purpose:

* the norms and the clip factors are fp32 even for fp16 / bf16 per-sample
  gradients (Opacus computes them in the gradients' dtype);
* a sample whose norm is not finite is dropped (``on_nonfinite="drop"``,
  counted in :attr:`DPOptimizer.nonfinite_samples`) or raises
  (``"raise"``, one host sync) instead of turning the gradient into NaN;
* ``max_grad_norm <= 0`` and ``noise_multiplier < 0`` raise ``ValueError``
  (numbers, numpy scalars and 0-d tensors are taken, as Opacus takes them;
  anything else raises ``TypeError``);
* the noise comes from Philox inside the kernel, keyed from ``generator`` (or
  from ``os.urandom`` in ``secure_mode``): the same distribution as Opacus's
  ``torch.normal``, other numbers.
"""
from __future__ import annotations

import torch
from opacus.optimizers import DistributedDPOptimizer as _OpacusDistributedDPOptimizer
from opacus.optimizers import DPOptimizer as _OpacusDPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from ..ops import _dist
from ..ops import dp as _ops


def _refuse_shards(params) -> None:
    """FSDP2 shards: the per-sample norms would be norms of the shard only
    (docs/distributed.md, "DP-SGD"), so refuse instead of clipping wrongly."""
    if any(_dist.is_sharded(p) for p in params):
        raise NotImplementedError("per-sample-gradient DP clip + noise on FSDP2 (fully_shard) parameters "
                                  "is not supported: per-sample norms would cover the local shard only; on "
                                  "FSDP2 use PrivacyEngine.make_private(..., grad_sample_mode=\"ghost\") or "
                                  "grad_sample_mode=\"bk\" (norms from the full activations), or DDP with "
                                  "DistributedDPOptimizer (docs/distributed.md)")


class DPOptimizer(_OpacusDPOptimizer):
    """``opacus.optimizers.DPOptimizer`` with fused per-sample clipping and noise.

    Same arguments as Opacus's, plus ``backend`` (``"auto"``, ``"triton"``,
    ``"cuda"``, ``"torch"``) and ``on_nonfinite`` (``"drop"`` or ``"raise"``).

    Example::

        optimizer = fastadv.dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                           noise_multiplier=1.0, max_grad_norm=1.0,
                                           expected_batch_size=64)
    """

    # it clips per-sample gradients, which on FSDP2 shards would be a shard's: refused.  A subclass
    # that clips nothing itself (the ghost optimizer on FSDP2, norms taken on full activations)
    # turns this off
    _refuses_shards = True

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int | None, loss_reduction: str = "mean", generator=None,
                 secure_mode: bool = False, backend: str | None = None, on_nonfinite: str = "drop",
                 **kwargs):
        _ops.check_hyperparameters(max_grad_norm, noise_multiplier)
        if on_nonfinite not in _ops.NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ops.NONFINITE}, got {on_nonfinite!r}")
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                         generator=generator, secure_mode=secure_mode, **kwargs)
        self.backend = backend
        self.on_nonfinite = on_nonfinite
        self.nonfinite_samples: torch.Tensor | None = None  # int64 device counter, made on first use
        if self._refuses_shards:
            _refuse_shards(self.params)

    # ---- helpers

    def _noise_std(self) -> float:
        """``noise_multiplier * max_grad_norm`` as Opacus computes it (numpy
        scalars and 0-d tensors taken, also when set on the optimizer between
        steps); the distributed subclass adds noise on rank 0 only."""
        return _ops.noise_std(self.noise_multiplier, self.max_grad_norm)

    def _batches(self) -> list[list[torch.Tensor]]:
        """The per-sample gradients of every accumulated batch: ``batches[m][i]``
        for parameter ``i`` (Opacus's errors for missing or inconsistent ones)."""
        per_param = []
        for p in self.params:
            if not hasattr(p, "grad_sample"):
                raise ValueError("Per sample gradient not found. Are you using GradSampleModule?")
            gs = p.grad_sample
            if gs is None:
                raise ValueError("Per sample gradient is not initialized. Not updated in backward pass?")
            if isinstance(gs, torch.Tensor):
                per_param.append([gs])
            elif isinstance(gs, list):
                per_param.append(gs)
            else:
                raise ValueError(f"Unexpected grad_sample type: {type(gs)}")
        if len({len(x) for x in per_param}) > 1:
            raise ValueError("Number of accumulated steps is inconsistent across parameters")
        if per_param and not per_param[0]:
            raise ValueError("grad_sample is an empty list: no accumulated batch to clip")
        return [list(batch) for batch in zip(*per_param)]

    def _counter(self, device) -> torch.Tensor:
        if self.nonfinite_samples is None or self.nonfinite_samples.device != torch.device(device):
            self.nonfinite_samples = torch.zeros(1, dtype=torch.int64, device=device)
        return self.nonfinite_samples

    @staticmethod
    def _grad_buffer(p: torch.Tensor, avoid: torch.Tensor | None) -> torch.Tensor | None:
        """``p.grad`` when it can be overwritten in place, else None (a new one is made)."""
        g = p.grad
        if (g is None or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device
                or not g.is_contiguous() or g.is_sparse or (avoid is not None and g.data_ptr() == avoid.data_ptr())):
            return None
        return g

    def _clip(self, *, final: bool) -> None:
        """Clip + accumulate every batch into ``p.summed_grad``; with ``final``
        the last batch's call also adds the noise, scales and writes ``p.grad``."""
        params = self.params
        _ops.check_hyperparameters(self.max_grad_norm, self.noise_multiplier)
        C = self.max_grad_norm  # as given: a 0-d tensor makes Opacus's clip factor a true division
        for p in params:
            _check_processed_flag(p.grad_sample)
        batches = self._batches()
        counter = self._counter(batches[0][0].device)
        summed = [p.summed_grad for p in params]
        have_summed = all(s is not None for s in summed)
        if not have_summed:
            summed = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
        divisor = None
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * len(batches)
        for m, batch in enumerate(batches):
            read = have_summed or m > 0
            if final and m == len(batches) - 1:
                outs = [self._grad_buffer(p, s) for p, s in zip(params, summed)]
                new = [o is None for o in outs]
                outs = [torch.empty(p.shape, dtype=p.dtype, device=p.device) if o is None else o
                        for p, o in zip(params, outs)]
                _ops.fused_clip_noise(batch, max_grad_norm=C, std=self._noise_std(), summed=summed,
                                      read_summed=read, write_summed=True, out=outs,
                                      expected_batch_size=divisor, generator=self.generator,
                                      secure_mode=self.secure_mode, on_nonfinite=self.on_nonfinite,
                                      nonfinite_count=counter, backend=self.backend)
                for p, o, is_new in zip(params, outs, new):
                    if is_new:
                        p.grad = o
            else:
                _ops.fused_clip_noise(batch, max_grad_norm=C, std=0.0, summed=summed, read_summed=read,
                                      write_summed=True, write_out=False, on_nonfinite=self.on_nonfinite,
                                      nonfinite_count=counter, backend=self.backend)
        for p, s in zip(params, summed):
            p.summed_grad = s
            _mark_as_processed(p.grad_sample)

    # ---- Opacus's methods, fused

    def clip_and_accumulate(self):
        """Clip the per-sample gradients and add their sum to ``p.summed_grad`` (no noise)."""
        if self.params:
            self._clip(final=False)

    def add_noise(self):
        """``p.grad = p.summed_grad + N(0, (noise_multiplier * max_grad_norm)^2)``, one launch."""
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        if params:
            grads = _ops.add_noise([p.summed_grad for p in params], self._noise_std(),
                                   generator=self.generator, secure_mode=self.secure_mode,
                                   backend=self.backend)
            for p, g in zip(params, grads):
                p.grad = g.view_as(p)
        for p in params:
            _mark_as_processed(p.summed_grad)

    def pre_step(self, closure=None) -> bool:
        """Clip, accumulate and (unless this step is skipped) noise and scale, fused.
        Returns False on a skipped step (virtual batch), True otherwise."""
        if not self.params:
            return True  # no trainable parameter: a plain optimizer step
        skip = self._check_skip_next_step(pop_next=False)
        self._clip(final=not skip)
        self._check_skip_next_step()  # consume the signal, as Opacus does after clipping
        if skip:
            self._is_last_step_skipped = True
            return False
        for p in self.params:
            _mark_as_processed(p.summed_grad)
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True


class DistributedDPOptimizer(DPOptimizer, _OpacusDistributedDPOptimizer):
    """``opacus.optimizers.DistributedDPOptimizer`` with the fused op: every rank
    clips its own samples, only rank 0 adds noise; ``step`` then all-reduces
    ``p.grad`` and, for ``"mean"``, divides by ``world_size`` (Opacus's
    ``reduce_gradients``) -- with one ``all_reduce`` per (dtype, device) group
    instead of Opacus's one per parameter: the fused op writes the private
    gradients into views of one flat buffer per group, which is reduced
    whole (no copy)."""

    def pre_step(self, closure=None) -> bool:
        self._flat = []
        if self.params and not self._check_skip_next_step(pop_next=False):
            self._flat = _flat_grads(self.params)  # p.grad := views the fused op writes in place
        return super().pre_step(closure)

    def reduce_gradients(self):
        flats, self._flat = getattr(self, "_flat", []), []
        for flat, group in flats or [(None, g) for g in _groups([p for p in self.params if p.requires_grad])]:
            views = None if flat is None else _views(flat, group)
            if views is None or any(p.grad is None or p.grad.data_ptr() != v.data_ptr() for p, v in zip(group, views)):
                flat, views = None, None  # no flat buffer, or p.grad replaced since: reduce a copy
            buf = torch.cat([p.grad.reshape(-1) for p in group]) if flat is None else flat
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            if self.loss_reduction == "mean":
                buf /= self.world_size
            if flat is None:
                for p, v in zip(group, _views(buf, group)):
                    p.grad.copy_(v)

    def _noise_std(self) -> float:
        return super()._noise_std() if self.rank == 0 else 0.0

    def add_noise(self):
        if self.rank == 0:
            DPOptimizer.add_noise(self)
        else:
            for p in self.params:
                p.grad = p.summed_grad.view_as(p)


def _groups(params) -> list[list[torch.Tensor]]:
    """The parameters grouped by (dtype, device), in order."""
    groups: dict = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    return list(groups.values())


def _flat_grads(params) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """One flat buffer per (dtype, device) group of the trainable ``params``,
    each ``p.grad`` set to its view (contiguous, the parameter's shape: the
    fused op overwrites it in place); ``[(flat, group)]``."""
    out = []
    for group in _groups([p for p in params if p.requires_grad]):
        flat = torch.empty(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
        for p, v in zip(group, _views(flat, group)):
            p.grad = v
        out.append((flat, group))
    return out


def _views(flat: torch.Tensor, group) -> list[torch.Tensor]:
    """``flat`` cut into views shaped like the tensors of ``group``."""
    return [v.view_as(p) for p, v in zip(group, flat.split([p.numel() for p in group]))]
