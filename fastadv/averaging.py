"""Weight averaging on fused multi-tensor kernels: ``ModelEMA`` and averaging
functions for ``torch.optim.swa_utils.AveragedModel``.

    ema = ModelEMA(model, decay=0.999)
    for batch in data:
        train_step(batch)
        ema.update()                  # one fused pass over every weight
    with ema.applied():               # evaluate with the averaged weights
        evaluate(model)

    swa_model = AveragedModel(model, multi_avg_fn=swa_multi_avg_fn())
    swa_model.update_parameters(model)   # no host sync (torch's own syncs)

Update: ``shadow <- shadow + (1 - decay) * (w - shadow)`` (= ``decay * shadow +
(1 - decay) * w``) in fp32, rounded once: per dtype pair one launch that reads
each weight and shadow once and writes the shadow once.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import _backend
from .ops import _dist
from .ops.multi_tensor import BackupBuffers, copy_tensors_, restore_live_
from .ops.ema import lerp_


class ModelEMA:
    """Exponential moving average of a model's trainable parameters.

    Args:
        model: the model whose trainable parameters are averaged (buffers,
            e.g. BatchNorm statistics, are not; use ``AveragedModel`` with
            :func:`ema_multi_avg_fn` and ``use_buffers=True`` for those).
        decay: weight of the old average (``0 <= decay <= 1``).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at the n-th update
            (n = 0, 1, ...), so early averages follow the model closely.
        dtype: dtype of the shadow weights (default: each parameter's); e.g.
            ``torch.float32`` for a bf16 model.
        backend: ``'auto'`` (default, or ``FASTADV_BACKEND``), ``'triton'``,
            ``'cuda'`` or ``'torch'``.

    Also accepts the Kaggle ``EMA`` protocol: ``register()``, ``update()``,
    ``apply_shadow()``, ``restore()``.

    Parameters are matched by name, and every call works on the parameters
    that are trainable *now*, as the Kaggle EMA does: a layer frozen after
    ``register()`` keeps its average (not updated, not applied) while the
    others go on being averaged; unfrozen again, it is averaged again from
    where it stopped.  A parameter that was frozen at ``register()`` and is
    trainable now has no average: ``register(missing_only=True)`` starts one
    from its current weights, keeping all the others.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False,
                 dtype: torch.dtype | None = None, backend: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.model = model
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.dtype = dtype
        self.backend = _backend.check_name(backend.lower()) if backend else None
        self.num_updates = 0
        self._backups = BackupBuffers()
        self._applied: tuple | None = None   # (model, names, backups) while the average is applied
        self.shadow: dict[str, torch.Tensor] = {}
        self.register()

    @staticmethod
    def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in _dist.named_parameters(model) if p.requires_grad]

    def _params(self, model: nn.Module | None = None) -> list[tuple[str, torch.Tensor]]:
        """The trainable parameters of ``model`` now, each with an average of
        its shape (frozen ones are left out: they keep their average)."""
        model = self.model if model is None else model
        params = self._trainable(model)
        missing = [n for n, _ in params if n not in self.shadow]
        if missing:
            raise ValueError(
                f"{len(missing)} trainable parameter(s) of the model have no average: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}. The EMA tracks the trainable parameters it was "
                f"registered with (a parameter frozen at register() has none, as does one of another "
                f"model); register(missing_only=True) starts an average for each from its current weights "
                f"and keeps the others, register() restarts every average")
        for n, p in params:
            s = self.shadow[n]
            if p.shape != s.shape:
                raise ValueError(f"parameter {n} has shape {tuple(p.shape)}, its average {tuple(s.shape)}")
        return params

    @torch.no_grad()
    def register(self, *, missing_only: bool = False) -> None:
        """(Re)start the average from the model's current trainable weights.
        ``missing_only``: only for trainable parameters that have no average
        yet, keeping every existing average and the update count."""
        if self._applied is not None:
            raise RuntimeError("ModelEMA.register() while the EMA weights are applied; restore() first")
        fresh = {n: p.detach().to(self.dtype or p.dtype, copy=True) for n, p in self._trainable(self.model)
                 if not (missing_only and n in self.shadow)}
        if missing_only:
            self.shadow.update(fresh)
        else:
            self.shadow = fresh
            self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next ``update()`` uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """Move the average of every trainable parameter towards ``model``
        (default: the tracked model), matched by name; frozen parameters keep
        their average."""
        if self._applied is not None:
            raise RuntimeError("ModelEMA.update() while the EMA weights are applied; restore() first")
        params = self._params(model)
        if params:
            lerp_([self.shadow[n] for n, _ in params], [p.detach() for _, p in params],
                  1.0 - self.current_decay(), backend=self.backend)
        self.num_updates += 1

    @torch.no_grad()
    def apply_to(self, model: nn.Module | None = None) -> None:
        """Copy the averaged weights into the trainable parameters of ``model``
        (in place), keeping its own weights for :meth:`restore`."""
        if self._applied is not None:
            raise RuntimeError("ModelEMA.apply_to() called twice without restore()")
        model = self.model if model is None else model
        params = self._params(model)
        names = [n for n, _ in params]
        live = [_dist.local(p.data) for _, p in params]  # FSDP2: the local shards
        backups = self._backups.views(live)
        if live:
            copy_tensors_(backups, live, backend=self.backend)
            copy_tensors_(live, [self.shadow[n] for n in names], backend=self.backend)
        self._applied = (model, names, backups)

    @torch.no_grad()
    def restore(self, model: nn.Module | None = None) -> None:
        """Put back the weights ``apply_to`` replaced (bit-exact, in place).

        They are written into the parameters of those names as they are now
        (default: the model given to ``apply_to``): a parameter reallocated in
        between (``model.double().float()``, a device round trip,
        ``load_state_dict(assign=True)``) is restored in its new storage when
        that is exact (same shape and dtype); otherwise (``model.half()``)
        :class:`~fastadv.ops._live.StorageMoved` names it, nothing is written,
        and the backups are kept: convert the model back and call
        ``restore()`` again."""
        if self._applied is None:
            raise RuntimeError("ModelEMA.restore() called without a preceding apply_to()")
        applied_model, names, backups = self._applied
        live = dict(_dist.named_parameters(model if model is not None else applied_model))
        restore_live_(names, [live[n].data if n in live else None for n in names], backups,
                      between="apply_to() and restore()", backend=self.backend)
        self._applied = None

    apply_shadow = apply_to  # the Kaggle EMA's name

    @contextlib.contextmanager
    def applied(self, model: nn.Module | None = None):
        """``with ema.applied(): evaluate(model)``; restores even on exceptions."""
        self.apply_to(model)
        try:
            yield self
        finally:
            self.restore(model)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("the state's shadow parameters do not match this EMA's")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])


def _multi_avg_fn(weight_of, integer_update, backend):
    @torch.no_grad()
    def update(averaged_param_list, current_param_list, num_averaged) -> None:
        if not averaged_param_list:
            return
        if not averaged_param_list[0].is_floating_point():  # integer buffers: per tensor, as torch
            for a, c in zip(averaged_param_list, current_param_list):
                a.copy_(integer_update(a, c, num_averaged))
            return
        weight, count = weight_of(num_averaged)
        lerp_(averaged_param_list, current_param_list, weight, count=count, backend=backend)

    return update


def swa_multi_avg_fn(backend: str | None = None):
    """SWA's running mean for ``AveragedModel(model, multi_avg_fn=...)``:
    ``avg += (w - avg) / (n_averaged + 1)``, with ``n_averaged`` read on the
    device (torch's own SWA function reads it on the host)."""
    def weight_of(n):
        if isinstance(n, torch.Tensor):
            return None, n
        return 1.0 / (n + 1), None
    return _multi_avg_fn(weight_of, lambda a, c, n: a + (c - a) / (n + 1), backend)


def ema_multi_avg_fn(decay: float = 0.999, backend: str | None = None):
    """EMA for ``AveragedModel(model, multi_avg_fn=...)``, like
    ``torch.optim.swa_utils.get_ema_multi_avg_fn(decay)`` on fused kernels."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")
    return _multi_avg_fn(lambda n: (1.0 - decay, None), lambda a, c, n: a * decay + c * (1 - decay), backend)
