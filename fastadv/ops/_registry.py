"""The one op registry: every fastadv op is a ``torch.library`` op in the
``fastadv`` namespace, and one rule picks the backend that runs it.

Backend rule (:func:`pick`): ``auto`` takes the fastest usable backend for the
tensors (triton, then cuda, on CUDA tensors; torch elsewhere, and torch when a
kernel backend cannot take these tensors: a dtype it lacks, a non-contiguous
layout); a forced backend (``backend=`` or ``FASTADV_BACKEND``) runs its
kernels or raises -- :class:`~fastadv.BackendUnavailable` when it cannot run
on the device, ``TypeError`` / ``ValueError`` naming the tensor it cannot
take.  Never a silent fallback.

Registration (:func:`op`): the function given is the op's implementation for
every device (it dispatches on its ``backend`` argument to the torch code or
the kernel launchers).  Under ``torch.compile`` the wrapper code calls
``torch.ops.fastadv.<name>`` (an opaque node: no graph break, ``mutates_args``
declared, a fake implementation for shapes); in eager mode it calls the
implementation directly, which skips the dispatcher's per-call cost.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable

import torch

from .. import _backend

NAMESPACE = "fastadv"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def forced(backend: str | None) -> bool:
    """True when the user asked for one backend (argument or environment)."""
    return _backend.check_name((backend or _backend.default()).lower()) != "auto"


def pick(backend: str | None, device, *, dtypes: Iterable[tuple[str, torch.Tensor]] = (),
         allowed=KERNEL_DTYPES, contiguous: Iterable[tuple[str, torch.Tensor]] = (),
         same_dtype: Iterable[tuple[str, torch.Tensor]] = ()) -> str:
    """The backend that runs an op on ``device``.

    ``dtypes``: ``(what, tensor)`` pairs whose dtype must be in ``allowed`` for
    a kernel backend; ``contiguous``: pairs that must be contiguous;
    ``same_dtype``: pairs that must share the first pair's dtype."""
    name = _backend.resolve(backend, device)
    if name == "torch":
        return name
    reason = _kernel_limit(name, list(dtypes), allowed, list(contiguous), list(same_dtype))
    if reason is None:
        return name
    if forced(backend):
        raise reason
    return "torch"


def _kernel_limit(name, dtypes, allowed, contiguous, same_dtype) -> Exception | None:
    words = [str(d).replace("torch.", "") for d in allowed]
    names = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    for what, t in dtypes:
        if t.dtype not in allowed:
            return TypeError(f"the {name} backend supports {names} {what}, got {t.dtype}; "
                             f"use backend='torch'")
    if same_dtype:
        first_what, first = same_dtype[0]
        for what, t in same_dtype[1:]:
            if t.dtype != first.dtype:
                return TypeError(f"the {name} backend needs the {what} in the {first_what}'s dtype "
                                 f"({first.dtype}), got {t.dtype}; use backend='torch'")
    for what, t in contiguous:
        if not t.is_contiguous():
            return ValueError(f"the {name} backend needs a contiguous {what}; use backend='torch'")
    return None


def unusable(backend: str, t: torch.Tensor) -> bool:
    """True when ``backend`` cannot run on ``t``'s device now."""
    return backend != "torch" and _backend.why_not(backend, t.device) is not None


def kernels(op_name: str, backend: str):
    """The launcher module of ``op_name`` for a kernel backend:
    ``fastadv.kernels.triton.<op>`` or ``fastadv.kernels.cuda.<op>``."""
    if backend not in ("triton", "cuda"):
        raise ValueError(f"no kernels for backend {backend!r}")
    return importlib.import_module(f"fastadv.kernels.{backend}.{op_name}")


class Op:
    """A registered op: ``op(*args)`` runs it (directly in eager mode, through
    ``torch.ops.fastadv`` while compiling); ``op.register_fake`` and
    ``op.register_autograd`` as for :func:`torch.library.custom_op`."""

    def __init__(self, name: str, fn: Callable, mutates_args):
        self.name = name
        self.impl = fn
        self.custom = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args)
        self.differentiable = False

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or (self.differentiable and _needs_grad(args, kwargs)):
            return getattr(getattr(torch.ops, NAMESPACE), self.name)(*args, **kwargs)
        return self.impl(*args, **kwargs)  # eager: no dispatcher on the hot path

    def register_fake(self, fn):
        self.custom.register_fake(fn)
        return fn

    def register_autograd(self, backward, setup_context=None):
        self.custom.register_autograd(backward, setup_context=setup_context)
        self.differentiable = True

    @property
    def overload(self):
        """``torch.ops.fastadv.<name>.default`` (for opcheck)."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default


def _needs_grad(args, kwargs) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def op(name: str, *, mutates_args=()) -> Callable[[Callable], Op]:
    """Register ``fn`` as ``torch.ops.fastadv.<name>``; its type hints are the schema."""
    def wrap(fn: Callable) -> Op:
        return Op(name, fn, mutates_args)
    return wrap


def registered() -> list[str]:
    """Names of every fastadv op registered so far."""
    ns = getattr(torch.ops, NAMESPACE)
    return sorted(n for n in dir(ns) if not n.startswith("_") and isinstance(getattr(ns, n, None),
                                                                           torch._ops.OpOverloadPacket))
