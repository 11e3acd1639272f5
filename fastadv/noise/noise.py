"""Noise injection on fused kernels: input, activation and weight noise, NEFTune,
and the seed's token-id noise (the wrappers of ``fastadv.ops.noise`` and
``fastadv.ops.neftune``; ``fastadv.noise`` re-exports them).

Drop-in for ``fastadv.reference.noise`` (same names, arguments and behaviour;
keyword-only extras ``generator=`` and ``backend=``)::

    from fastadv.noise import GaussianNoise, add_gaussian_noise, weight_noise, neftune

    x = add_gaussian_noise(x, 0.1)           # x + N(0, 0.1^2), one pass
    layer = GaussianNoise(0.1)               # activation noise; identity in eval mode
    with weight_noise(model, 0.01):          # weights perturbed in place ...
        loss = model(batch).loss             # ... and restored bit-exactly on exit
    embeds = neftune(embeds, 5.0, attention_mask)

The noise is drawn inside the kernels from Philox, keyed from the PyTorch
generator (``torch.manual_seed`` reproduces a run; no host sync; a new key per
call).  See docs/noise.md.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .._backend import check_name
from ..ops import neftune as _neftune
from ..ops import noise as _ops
from ..ops import _dist
from ..ops._live import StorageMoved

__all__ = ["GaussianNoise", "add_gaussian_noise", "add_gaussian_noise_", "weight_noise", "neftune",
           "noisy_token_ids"]


def add_gaussian_noise(x: torch.Tensor, std: float, *, generator: torch.Generator | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """``x + N(0, std^2)`` as a new tensor (the reference's ``x + randn_like(x) * std``):
    one read of ``x``, one write; differentiable w.r.t. ``x``."""
    return _ops.add_gaussian_noise(x, std, generator=generator, backend=backend)


def add_gaussian_noise_(x: torch.Tensor, std: float, *, generator: torch.Generator | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """In-place ``x += N(0, std^2)``; returns ``x``."""
    return _ops.add_gaussian_noise_(x, std, generator=generator, backend=backend)


def neftune(embeds: torch.Tensor, alpha: float, attention_mask: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, backend: str | None = None) -> torch.Tensor:
    """NEFTune (Jain et al., 2023): ``embeds + U[-1, 1) * alpha / sqrt(L * d)``.

    ``embeds`` is ``[B, L, d]`` (or ``[L, d]``).  Without ``attention_mask``,
    ``L`` is the padded length; with it (``[B, L]``), ``L`` is each sequence's
    unpadded length and padded positions get no noise, as in NEFTune's training
    code.  Apply it in training only (it does not look at any module's mode)."""
    return _neftune.neftune(embeds, alpha, attention_mask, generator=generator, backend=backend)


def noisy_token_ids(input_ids: torch.Tensor, noise_factor: float, vocab_size: int, *,
                    generator: torch.Generator | None = None, backend: str | None = None) -> torch.Tensor:
    """The seed's token-id noise, ``clamp(long(float(ids) + noise_factor * z), 0, V - 1)``.

    What it does: ``long`` truncates toward zero, so for a small factor each
    id ``> 0`` becomes ``id - 1`` when its draw is negative (about half of the
    tokens) and stays otherwise: a random swap to the neighbouring vocabulary
    id, unrelated to the token's meaning.  Provided for the seed's loop;
    prefer :func:`neftune` or :func:`add_gaussian_noise` on embeddings."""
    return _ops.noisy_token_ids(input_ids, noise_factor, vocab_size, generator=generator, backend=backend)


class GaussianNoise(nn.Module):
    """Activation noise: ``x + N(0, std^2)`` in training mode; in eval mode (or
    with ``std == 0``) exactly the identity (returns ``x`` itself)."""

    def __init__(self, std: float, *, backend: str | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.std = _ops.number(std, "std")
        self.backend = check_name(backend.lower()) if backend else None
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.std == 0:
            return x
        return _ops.add_gaussian_noise(x, self.std, generator=self.generator, backend=self.backend)

    def extra_repr(self) -> str:
        return f"std={self.std}"


def _selected(model: nn.Module, adv_param: str, param_filter) -> list[tuple[str, nn.Parameter]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if param_filter is None:
        if not isinstance(adv_param, str):
            raise TypeError(f"adv_param must be a string, got {type(adv_param).__name__}")
        return [(n, p) for n, p in _dist.named_parameters(model) if adv_param in n]
    if not callable(param_filter):
        raise TypeError("param_filter must be a callable (name, param) -> bool")
    return [(n, p) for n, p in _dist.named_parameters(model) if param_filter(n, p)]


def _restore_by_name(model: nn.Module, state) -> None:
    """Restore into the model's parameters of the perturbed names *now*: user
    code in the block may have replaced them (``load_state_dict(assign=True)``)
    or given them new storage (``model.double().float()``, ``.to()``)."""
    live = dict(_dist.named_parameters(model))
    try:
        _ops.weight_noise_restore_(state, [live.get(n) for n in state.names])
    except StorageMoved as exc:
        exc.retry = lambda: _restore_by_name(model, state)
        raise


@contextlib.contextmanager
def weight_noise(model: nn.Module, std: float, adv_param: str = "weight", *,
                 param_filter: Callable[[str, nn.Parameter], bool] | None = None,
                 generator: torch.Generator | None = None, backend: str | None = None):
    """Perturb the selected weights in place by ``N(0, std^2)`` for the block and
    restore them bit-exactly on exit, also when an exception leaves the block.

    Selection: parameters whose name contains ``adv_param`` (the reference's
    rule), or, when given, those for which ``param_filter(name, param)`` is
    true.  Kernel backends perturb all of them in one launch per (device,
    dtype) group, writing the backup in the same pass, and restore them in one
    launch per group; ``data_ptr`` never changes.

    The restore writes into the model's parameters of those names as they are
    on exit: if code in the block reallocated them (``model.double().float()``,
    ``.to()``, ``load_state_dict(assign=True)``), their new storage gets the
    original bits.  A parameter whose shape or dtype changed (``model.half()``)
    or that left the model cannot be restored exactly: the exit raises
    :class:`~fastadv.ops._live.StorageMoved` naming it, leaves every weight as
    it is, and the error carries ``backups`` (name -> original values) and
    ``retry()`` (convert the model back, then call it).

    Memory: a backup of the selected weights (1x).  Regenerating the noise and
    subtracting it would need no backup, but ``(w + n) - n`` is not ``w`` in
    floating point, and the restore must be bit-exact.  Changes made to the
    weights inside the block (an optimizer step) are overwritten on exit, as in
    the reference.  Yields ``model``.
    """
    std = _ops.number(std, "std")
    selected = _selected(model, adv_param, param_filter)
    state = None
    if std:
        state = _ops.weight_noise_([p for _, p in selected], std, generator=generator, backend=backend,
                                   names=[n for n, _ in selected])
    try:
        yield model
    finally:
        if state is not None:
            _restore_by_name(model, state)
