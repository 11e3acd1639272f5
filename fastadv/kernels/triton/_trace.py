"""How the Triton launchers become visible to ``torch.compile``.

A launcher writes ``wrap_triton(kernel)[grid](...)``.  In eager mode that is
the kernel itself (one thread-local read: eager launches cost what they did).
While a ``torch.library.triton_op`` twin of an op is traced
(:func:`tracing_impl`, registered by :mod:`fastadv.ops._registry`), it is
:func:`torch.library.wrap_triton`'s traceable wrapper, so the FX graph gets a
``triton_kernel_wrapper_mutation`` / ``_functional`` node for the launch.

The name is torch's on purpose: torch finds the kernels of a triton_op by
reading its code for ``wrap_triton(<name>)`` calls.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tests)
``@triton.jit`` gives an ``InterpretedFunction``, which torch's wrap_triton
hands back unwrapped (it cannot be traced).  The launch is then traced
through a ``JITFunction`` made from the same Python function whose ``run``
is the interpreter's, so the traced graph runs the very kernel the eager
launch runs.  Inductor cannot compile such a graph on CPU (it needs a GPU
driver): run it with ``backend="aot_eager"``.

No Triton import at module import (the host layer must work without it).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import torch

class _State(threading.local):
    tracing = False  # a class default: the eager check is one attribute read


_STATE = _State()
_SHIMS: dict = {}  # InterpretedFunction -> its traceable JITFunction (one per kernel)


def wrap_triton(kernel):
    """``kernel`` in eager mode; a traceable launch while a triton_op twin is traced."""
    return _traceable(kernel) if _STATE.tracing else kernel


@contextlib.contextmanager
def _tracing():
    before = _STATE.tracing
    _STATE.tracing = True
    try:
        yield
    finally:
        _STATE.tracing = before


def tracing_impl(impl):
    """``impl`` (an op's implementation, dispatching on its ``backend``
    argument) with its launches made traceable: the function of the
    ``torch.library.triton_op`` twin.  The twin is only called with
    ``backend="triton"``."""
    @functools.wraps(impl)
    def traced(*args, **kwargs):
        with _tracing():
            return impl(*args, **kwargs)
    # the schema is read from the signature: its annotations resolved in impl's module
    traced.__signature__ = inspect.signature(impl, eval_str=True)
    return traced


def _traceable(kernel):
    from torch._library import triton as torch_triton
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(kernel, InterpretedFunction):
        return torch.library.wrap_triton(kernel)
    # The twin running on real tensors (torch turns wrapping off there): the kernel itself.
    if not getattr(torch_triton, "is_wrap_triton_enabled", lambda: True)():
        return kernel
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
    shim = _SHIMS.get(kernel)
    if shim is None:
        shim = _SHIMS[kernel] = _interpreted_jit(kernel)
    return TraceableTritonKernelWrapper(shim, None, None)


def _interpreted_jit(kernel):
    """A ``JITFunction`` of ``kernel``'s Python function (what torch's tracing
    reads: argument names, source) whose launch runs the interpreter."""
    from triton.runtime.jit import JITFunction

    class InterpretedJIT(JITFunction):
        # JITFunction hashes the source of the @triton.jit helpers it calls,
        # which are interpreted functions here: this one is keyed by identity.
        __hash__ = object.__hash__

        @property
        def cache_key(self):
            return f"interpreted:{self.fn.__module__}.{self.fn.__qualname__}"

        def run(self, *args, grid, warmup, **kwargs):
            return kernel.run(*args, grid=grid, warmup=warmup, **kwargs)

    return InterpretedJIT(kernel.fn)


def list_kernels(qualname: str, module) -> None:
    """Record ``module``'s compiled kernels as those of the triton_op
    ``qualname`` (torch's list, read for the AOTAutograd cache key, which must
    change when a kernel's source changes).  Interpreted kernels have no
    compiled form to list."""
    from triton.runtime.jit import JITFunction
    from torch._library import triton as torch_triton
    table = getattr(torch_triton, "triton_ops_to_kernels", None)
    if table is not None:
        found = [k for k in vars(module).values() if isinstance(k, JITFunction)]
        table[qualname] = list({id(k): k for k in [*table.get(qualname, []), *found]}.values())
