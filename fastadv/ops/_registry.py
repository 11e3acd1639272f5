"""The one op registry: every fastadv op is a ``torch.library`` op in the
``fastadv`` namespace, and one rule picks the backend that runs it.

Backend rule (:func:`pick`): tensors on another device than the op's are
refused on every backend (``ValueError`` naming them and their devices);
``auto`` takes the fastest usable backend for the tensors (triton, then cuda,
on CUDA tensors; torch elsewhere, and torch when a kernel backend cannot take
these tensors: a dtype it lacks, a layout it cannot walk); a forced backend
(``backend=`` or ``FASTADV_BACKEND``) runs its kernels or raises --
:class:`~fastadv.BackendUnavailable` when it cannot run on the device,
``TypeError`` / ``ValueError`` naming the tensor it cannot take.  Never a
silent fallback.

Registration (:func:`op`): the function given is the op's implementation for
every device (it dispatches on its ``backend`` argument to the torch code or
the kernel launchers).  Under ``torch.compile`` the wrapper code calls
``torch.ops.fastadv.<name>`` (an opaque node: no graph break, ``mutates_args``
declared, a fake implementation for shapes), or, for an op registered with
``triton=True`` on the triton backend, its ``torch.library.triton_op`` twin
``<name>_triton``, which the compiler traces into down to the Triton kernels;
in eager mode it calls the implementation directly, which skips the
dispatcher's per-call cost.
"""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable, Iterable

import torch

from .. import _backend

NAMESPACE = "fastadv"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def forced(backend: str | None) -> bool:
    """True when the user asked for one backend (argument or environment)."""
    return _backend.check_name((backend or _backend.default()).lower()) != "auto"


Pairs = Iterable[tuple]  # (what, tensor) pairs; a None tensor is skipped


def pick(backend: str | None, device, *, same_device: Pairs = (), where: str | None = None, **limits) -> str:
    """The backend that runs an op on ``device``: the one backend rule.

    Misuse, refused on every backend (``ValueError``): ``same_device``, pairs
    that must all be on ``device``.  Kernel limits (``auto`` takes torch,
    a forced kernel backend raises ``TypeError`` / ``ValueError`` naming the
    tensor): ``dtypes``, pairs whose dtype must be in ``allowed`` (a pair may
    carry its own: ``(what, tensor, allowed)``); ``same_dtype``, pairs in the
    first pair's dtype; ``contiguous``; ``batch_major``, pairs whose samples
    are each one dense block, batch outermost (contiguous, channels_last, ...:
    the kernels walk them as raw ``[batch, per_sample]`` memory);
    ``same_layout``, pairs with the first pair's strides; ``strided``, pairs
    that must not be sparse (checked first: a sparse tensor has no strides;
    a sparse tensor in ``contiguous`` is refused the same way); ``one_device``,
    pairs that a kernel launch needs on one device (the torch backend takes
    them spread over several).  ``where``: said at the end of a kernel limit's
    message, e.g. ``"index 3"`` for the multi-tensor ops (one call per group)."""
    check_devices(device, same_device)
    name = _backend.resolve(backend, device)
    if name == "torch":
        return name
    reason = _kernel_limit(name, **limits)
    if reason is None:
        return name
    if forced(backend):
        if where:
            reason = type(reason)(f"{reason} ({where})")  # TypeError / ValueError, built here
        raise reason
    return "torch"


def require(name: str, **limits) -> None:
    """The kernel limits of :func:`pick` for a backend chosen earlier (a PGD
    step after the first): the backend cannot change now, so a limit raises."""
    if name != "torch":
        reason = _kernel_limit(name, **limits)
        if reason is not None:
            raise reason


def check_devices(device, pairs: Pairs) -> None:
    """``ValueError`` naming the first tensor of ``pairs`` that is not on ``device``."""
    device = torch.device(device)
    for what, t in pairs:
        if t is not None and t.device != device and not _same_device(t.device, device):
            others = ", ".join(f"{w} on {u.device}" for w, u in pairs if u is not None)
            raise ValueError(f"{what} is on {t.device}, expected {device} ({others}); "
                             f"move them to one device")


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when 0 is the current one
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else None
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def _dtype_names(allowed) -> str:
    words = [str(d).replace("torch.", "") for d in allowed]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _kernel_limit(name, *, dtypes: Pairs = (), allowed=KERNEL_DTYPES, contiguous: Pairs = (),
                  same_dtype: Pairs = (), batch_major: Pairs = (), same_layout: Pairs = (),
                  strided: Pairs = (), one_device: Pairs = ()) -> Exception | None:
    """The first kernel limit of :func:`pick` that the tensors break, as the
    exception a forced backend raises; None when the kernels take them.
    (Each rule is skipped when not asked for: this runs on every call.)"""
    for what, t in strided:
        if t is not None and t.layout != torch.strided:
            return _not_dense(name, what, t)
    for pair in dtypes:
        t, ok = pair[1], (pair[2] if len(pair) > 2 else allowed)
        if t is not None and t.dtype not in ok:
            return TypeError(f"the {name} backend supports {_dtype_names(ok)} {pair[0]}, got {t.dtype}; "
                             f"use backend='torch'")
    if same_dtype:
        (first_what, first), *rest = [(w, t) for w, t in same_dtype if t is not None]
        for what, t in rest:
            if t.dtype != first.dtype:
                return TypeError(f"the {name} backend needs the {what} in the {first_what}'s dtype "
                                 f"({first.dtype}), got {t.dtype}; use backend='torch'")
    for what, t in contiguous:
        if t is not None and t.layout != torch.strided:
            return _not_dense(name, what, t)  # sparse: no is_contiguous() to ask
        if t is not None and not t.is_contiguous():
            return ValueError(f"the {name} backend needs a contiguous {what}; use backend='torch'")
    return _layout_limit(name, batch_major, same_layout, one_device) \
        if (batch_major or same_layout or one_device) else None


def _not_dense(name: str, what: str, t: torch.Tensor) -> ValueError:
    return ValueError(f"the {name} backend needs dense {what}, got a {t.layout} tensor; use backend='torch'")


def _layout_limit(name, batch_major, same_layout, one_device) -> Exception | None:
    devices = {t.device for _, t in one_device if t is not None}
    if len(devices) > 1:
        return ValueError(f"the {name} backend needs every tensor on one device, got "
                          f"{sorted(str(d) for d in devices)}; use backend='torch'")
    for what, t in batch_major:
        if t is not None and not dense_batch_major(t):
            return ValueError(f"the {name} backend needs {what} dense with the batch dimension outermost "
                              f"(e.g. contiguous), got strides {t.stride()} for shape {tuple(t.shape)}; "
                              f"use backend='torch'")
    same_layout = [(w, t) for w, t in same_layout if t is not None]
    for what, t in same_layout[1:]:
        first_what, first = same_layout[0]
        if t.stride() != first.stride() and t.numel() > 1:
            return ValueError(f"the {name} backend needs {what} in the {first_what}'s memory layout "
                              f"(strides {first.stride()}), got {t.stride()}; use backend='torch'")
    return None


def dense_batch_major(t: torch.Tensor) -> bool:
    """True when each sample (index of dim 0) of ``t`` is one dense block of
    memory, samples one after the other (contiguous, channels_last, ...)."""
    inner = sorted(((st, sz) for sz, st in zip(t.shape[1:], t.stride()[1:]) if sz != 1), reverse=True)
    expected = 1
    for st, sz in reversed(inner):
        if st != expected:
            return False
        expected *= sz
    return t.shape[0] <= 1 or t.stride(0) == expected


def unusable(backend: str, t: torch.Tensor) -> bool:
    """True when ``backend`` cannot run on ``t``'s device now."""
    return backend != "torch" and _backend.why_not(backend, t.device) is not None


def kernels(op_name: str, backend: str):
    """The launcher module of ``op_name`` for a kernel backend:
    ``fastadv.kernels.triton.<op>`` or ``fastadv.kernels.cuda.<op>``."""
    if backend not in ("triton", "cuda"):
        raise ValueError(f"no kernels for backend {backend!r}")
    return importlib.import_module(f"fastadv.kernels.{backend}.{op_name}")


# Under torch.compile, ops registered with ``triton=True`` run their triton
# backend through a ``torch.library.triton_op`` twin (``<name>_triton``) that
# Dynamo / AOTAutograd trace into: the graph holds the Triton kernels
# themselves (``triton_kernel_wrapper_*`` nodes), so Inductor can schedule and
# fuse around them.  Off under the Triton interpreter: Inductor cannot compile
# a user Triton kernel for a CPU tensor (the tests switch it on with
# ``backend="aot_eager"``, which runs the traced graph as it is).
# ``FASTADV_TRACE_TRITON=0`` / ``=1`` overrides the default.
TRACE_TRITON = os.environ.get("FASTADV_TRACE_TRITON", "").strip() == "1" or (
    os.environ.get("FASTADV_TRACE_TRITON", "").strip() != "0" and not _backend.triton_interpreter())

_OPS: dict[str, "Op"] = {}


class Op:
    """A registered op: ``op(*args)`` runs it (directly in eager mode, through
    ``torch.ops.fastadv`` while compiling); ``op.register_fake`` and
    ``op.register_autograd`` as for :func:`torch.library.custom_op`."""

    def __init__(self, name: str, fn: Callable, mutates_args, triton: bool = False):
        self.name = name
        self.impl = fn
        self.mutates_args = mutates_args
        self.custom = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args)
        self.differentiable = False
        self.triton = triton          # the triton path can be traced (see TRACE_TRITON)
        self._traced = None           # its triton_op twin, registered on first use
        self._autograd = None
        # where the backend argument is (a traceable op dispatches on it)
        self._backend_at = list(inspect.signature(fn).parameters).index("backend") if triton else None
        _OPS[name] = self

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            name = self.name
            if self.triton and TRACE_TRITON and self._backend_arg(args, kwargs) == "triton":
                name = _traced_name(self.name)  # the triton_op twin: Dynamo traces into its kernels
            return getattr(getattr(torch.ops, NAMESPACE), name)(*args, **kwargs)
        if self.differentiable and _needs_grad(args, kwargs):
            return getattr(getattr(torch.ops, NAMESPACE), self.name)(*args, **kwargs)
        return self.impl(*args, **kwargs)  # eager: no dispatcher on the hot path

    def _backend_arg(self, args, kwargs):
        return args[self._backend_at] if len(args) > self._backend_at else kwargs.get("backend")

    def register_fake(self, fn):
        self.custom.register_fake(fn)
        return fn

    def register_autograd(self, backward, setup_context=None):
        self.custom.register_autograd(backward, setup_context=setup_context)
        self._autograd = (backward, setup_context)
        self.differentiable = True
        if self._traced is not None:
            self._traced.register_autograd(backward, setup_context=setup_context)

    @property
    def overload(self):
        """``torch.ops.fastadv.<name>.default`` (for opcheck)."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    def traced(self):
        """The ``torch.library.triton_op`` twin ``fastadv::<name>_triton`` (same
        schema; its implementation is this op's, called with backend
        ``"triton"``), registered on first use: registering a triton_op imports
        Triton and parts of Inductor, which ``import fastadv`` must not pay."""
        if not self.triton:
            raise ValueError(f"fastadv::{self.name} has no traceable triton path")
        if self._traced is None:
            self._traced = _register_traced(self)
        return self._traced

    @property
    def traced_overload(self):
        """``torch.ops.fastadv.<name>_triton.default`` (for opcheck)."""
        self.traced()
        return getattr(getattr(torch.ops, NAMESPACE), self.name + "_triton").default


def _register_traced(op: Op):
    from ..kernels.triton import _trace
    fn = _trace.tracing_impl(op.impl)
    traced = torch.library.triton_op(f"{NAMESPACE}::{op.name}_triton", fn, mutates_args=op.mutates_args)
    if op._autograd is not None:
        traced.register_autograd(op._autograd[0], setup_context=op._autograd[1])
    # torch lists the kernels of a triton_op (the AOTAutograd cache key hashes
    # their source) by reading the function's code for wrap_triton(<name>)
    # calls; it cannot see through the backend dispatch of op.impl, so the
    # kernel module's kernels are listed here.
    _trace.list_kernels(f"{NAMESPACE}::{op.name}_triton", kernels(op.impl.__module__.rsplit(".", 1)[-1],
                                                                      "triton"))
    return traced


def _traced_name(name: str) -> str:
    """The triton_op twin's name; Dynamo runs this once while tracing (so the
    twin is registered outside the traced code) and keeps the result."""
    _OPS[name].traced()
    return name + "_triton"


# torch.compiler.assume_constant_result(_traced_name) sets exactly this mark,
# but calling it imports torch._dynamo (and Triton) at `import fastadv`;
# tests/test_triton_op.py checks that the mark is still torch's.
_traced_name._dynamo_marked_constant = True


def _needs_grad(args, kwargs) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def op(name: str, *, mutates_args=(), triton: bool = False) -> Callable[[Callable], Op]:
    """Register ``fn`` as ``torch.ops.fastadv.<name>``; its type hints are the
    schema.  ``triton=True``: its triton path launches only kernels of
    ``fastadv.kernels.triton.<module of fn>`` through
    :func:`fastadv.kernels.triton._trace.wrap_triton`, builds no raw-address
    table and caches nothing by address, and its result does not depend on
    FMA contraction (Inductor compiles a user kernel with its default
    ``enable_fp_fusion``): torch.compile then traces into its kernels."""
    def wrap(fn: Callable) -> Op:
        return Op(name, fn, mutates_args, triton)
    return wrap


def registered() -> list[str]:
    """Names of every fastadv op registered so far."""
    ns = getattr(torch.ops, NAMESPACE)
    return sorted(n for n in dir(ns) if not n.startswith("_") and isinstance(getattr(ns, n, None),
                                                                           torch._ops.OpOverloadPacket))
