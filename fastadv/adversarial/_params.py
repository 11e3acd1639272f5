"""What FGM and PGD share: argument checks and finding the parameters an
attack perturbs (by the seeds' rule: trainable, name contains ``emb_name``).

No hooks are installed on the user's modules: which embedding rows carry a
gradient is read from the gradient by the kernels (see ``fastadv.ops.fgm``).
"""
from __future__ import annotations

import difflib
import warnings

import torch
from torch import nn

from .. import _backend
from ..ops import _dist


def check_size(value, what: str = "epsilon") -> float:
    """A perturbation size: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{what} must be finite and >= 0, got {value}")
    return float(value)


def matching_parameters(model: nn.Module, emb_name: str) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` for every trainable parameter whose name contains
    ``emb_name`` (the seeds' rule: frozen ones are skipped, so the list may be
    empty while a table is frozen); a clear error naming close candidates if
    no parameter at all, trainable or frozen, matches (a typo)."""
    if not isinstance(emb_name, str) or not emb_name:
        raise TypeError(f"emb_name must be a non-empty string, got {emb_name!r}")
    named = _dist.named_parameters(model)
    if any(emb_name in n for n, _ in named):
        return [(n, p) for n, p in named if p.requires_grad and emb_name in n]
    names = [n for n, _ in named]
    close = difflib.get_close_matches(emb_name, names, n=5, cutoff=0.3)
    embeddings = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    hint = close or embeddings or names[:5]
    raise ValueError(f"emb_name={emb_name!r} matches no parameter of "
                     f"{type(model).__name__}; close candidates: {hint}")


def frozen_matches(model: nn.Module, emb_name: str) -> list[str]:
    return [n for n, p in _dist.named_parameters(model) if not p.requires_grad and emb_name in n]


def live_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters by name as they are now (``load_state_dict(assign=True)``
    replaces the objects; a restore writes into the current ones)."""
    return dict(_dist.named_parameters(model))


def live_parameter(params: dict, name: str, cls: str) -> nn.Parameter:
    param = params.get(name)
    if param is None:
        raise RuntimeError(f"{cls}.restore(): the attacked parameter {name} is no longer in the model "
                           f"(parameters now: {list(params)[:5]}...); its original values are kept in "
                           f"the backup")
    return param


def distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EmbeddingAttack:
    """What FGM and PGD share: argument checks and the matching parameters."""

    def __init__(self, model: nn.Module, emb_name: str, backend: str | None, row_sparse):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if row_sparse not in (True, False, "auto"):
            raise ValueError(f"row_sparse must be True, False or 'auto', got {row_sparse!r}")
        self.model = model
        self.emb_name = emb_name
        self.backend = _backend.check_name(backend.lower()) if backend else None
        self.row_sparse = row_sparse is not False
        if not matching_parameters(model, emb_name):
            warnings.warn(f"{type(self).__name__}: emb_name={emb_name!r} matches only frozen parameters "
                          f"{frozen_matches(model, emb_name)}; attack() skips them while they do not "
                          f"require grad (as the seed does) and perturbs them once they do",
                          stacklevel=3)
