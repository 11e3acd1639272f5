"""Backups that outlive user code: checked against the live parameter.

Between an attack and its restore (or two PGD steps) user code may reallocate
a parameter: ``model.double().float()``, ``.to()``, ``load_state_dict(assign=True)``.
The ops never keep a raw address across that code: every restore looks the
parameter up again and goes through :func:`retarget`, which writes into the
parameter's current storage when that is still exact (same shape and dtype;
a device move carries the backup along) and raises, keeping the backup,
otherwise.
"""
from __future__ import annotations

import torch


class StorageMoved(RuntimeError):
    """A parameter changed shape or dtype between attack and restore; the
    backup is kept, so converting it back and calling restore again works."""


def retarget(name: str, saved: torch.Tensor, live: torch.Tensor, between: str) -> None:
    """Raise :class:`StorageMoved` unless ``saved`` (a backup taken from the
    parameter ``name``) can be written back exactly into ``live``."""
    if live.shape != saved.shape:
        raise StorageMoved(f"{name} changed shape from {tuple(saved.shape)} to {tuple(live.shape)} "
                           f"between {between}; its original values are kept in the backup: put the "
                           f"parameter back to that shape and call restore() again")
    if live.dtype != saved.dtype:
        raise StorageMoved(f"{name} changed dtype from {saved.dtype} to {live.dtype} between {between} "
                           f"(e.g. model.half()); a bit-exact restore is impossible in {live.dtype}. "
                           f"The original {saved.dtype} values are kept in the backup: convert the "
                           f"model back to {saved.dtype} and call restore() again")


def follow(t: torch.Tensor | None, live: torch.Tensor) -> torch.Tensor | None:
    """``t`` on ``live``'s device (a model moved between attack and restore)."""
    return t if t is None or t.device == live.device else t.to(live.device)
