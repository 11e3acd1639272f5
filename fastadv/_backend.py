"""Backend selection: ``triton`` | ``cuda`` | ``torch`` | ``auto``.

Every op asks :func:`resolve` which backend runs it for a given device.  The
``FASTADV_BACKEND`` environment variable overrides the global default, a
``backend=`` argument overrides it per object or call.  Forcing a backend that
cannot run on the tensors' device raises :class:`BackendUnavailable` with the
reason and the fix, never a silent fallback.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "cuda", "torch")
CHOICES = BACKENDS + ("auto",)


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


def triton_interpreter() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERROR: list = []  # filled once: [None] or [reason] (a plain cache that Dynamo traces)


def _triton_import_error() -> str | None:
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_ERROR.append(None)
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_ERROR.append(f"triton cannot be imported ({exc}); install it with `pip install triton`")
    return _TRITON_ERROR[0]


def why_not(backend: str, device: torch.device) -> str | None:
    """Return None when ``backend`` can run on ``device``, else the reason."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter():
            return None
        return (f"the triton backend runs on CUDA tensors, or on CPU tensors when "
                f"TRITON_INTERPRET=1 is set before triton is imported; got a {device.type} tensor")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors; got a {device.type} tensor"
        from .kernels import cuda as _cuda
        return _cuda.load_error()
    return f"unknown backend {backend!r}; choose one of {', '.join(CHOICES)}"


def default() -> str:
    """The global choice: ``FASTADV_BACKEND`` or ``auto``."""
    name = os.environ.get("FASTADV_BACKEND", "auto").strip().lower() or "auto"
    check_name(name)
    return name


def check_name(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown fastadv backend {name!r}; choose one of {', '.join(CHOICES)} "
                         f"(argument backend= or environment variable FASTADV_BACKEND)")
    return name


def resolve(backend: str | None, device: torch.device) -> str:
    """Pick the backend that runs an op on ``device``.

    ``auto`` takes the fastest usable one: triton, then cuda, on CUDA devices;
    torch elsewhere (the Triton interpreter is for testing, never automatic).
    """
    name = check_name((backend or default()).lower())
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if why_not(candidate, device) is None:
                    return candidate
        return "torch"
    reason = why_not(name, device)
    if reason is not None:
        raise BackendUnavailable(f"fastadv backend {name!r} cannot run here: {reason}")
    return name


def usable(device: torch.device) -> dict[str, str | None]:
    """Each backend mapped to None (usable on ``device``) or the reason it is not."""
    return {b: why_not(b, device) for b in BACKENDS}
