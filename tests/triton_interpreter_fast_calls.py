"""Faster calls of ``@triton.jit`` helpers under the Triton interpreter (tests only).

Under ``TRITON_INTERPRET=1`` a kernel launch patches ``triton.language`` once
(``_patch_lang``), runs every program of the grid in Python, then restores it.
But each call of a jit *helper* from inside a program (``_stepped(...)`` in the
PGD update, the Philox helpers, ...) calls ``_patch_lang`` again, which walks
every member of ``tl``, ``tl.core``, ``tl.math`` and ``tl.tensor`` with
``inspect.getmembers`` (~10 ms on 2 cores) to re-install the very same
patches.  ``tl.sum``, ``tl.zeros``, ``tl.max`` are such helpers too, so with one
program per row or per block it is thousands of walks per test.  Measured (CPU
seconds, 2-core machine, Triton 3.9): two seed-loop steps of row-mode PGD 13.3
-> 7.2; ``test_dp.py::test_noise_statistics_kernel[triton]`` 19.2 -> 8.8;
``test_make_private_training_matches_opacus[triton-5]`` 19.7 -> 10.4.

This skips that second walk when, and only when, the launch that is running
already patched every ``triton.language`` module the helper can see (the same
function, the same modules: nothing would change).  Anything else (a helper
that sees a module the kernel did not, a Triton whose interpreter does not
look like this one) goes through the interpreter's own code unchanged.  A
wrong skip could not pass silently: an unpatched Triton builtin raises when
called outside a compiled kernel.

``install()`` is meant to be called once by tests/conftest.py when the
interpreter is on (before any kernel runs).
"""
from __future__ import annotations

import functools


class _NothingToRestore:
    def restore(self) -> None:
        pass


def install() -> bool:
    """Wrap the interpreter's launch and ``_patch_lang``; False when this Triton
    is not the interpreter this was written for (then nothing is changed)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        executor, real_patch = interpreter.GridExecutor, interpreter._patch_lang
    except (ImportError, AttributeError):
        return False
    if getattr(real_patch, "_fastadv_fast_calls", False):
        return True
    running = []  # per launch in progress: the ids of the modules patched so far (None: none yet)

    def langs(fn):  # the modules the interpreter's _patch_lang patches for fn (tl, tl.core or both)
        present = {id(v) for v in fn.__globals__.values()}
        return frozenset(i for i in (id(tl), id(tl.core)) if i in present)

    @functools.wraps(real_patch)
    def patch_lang(fn):
        needed = langs(fn)
        if running and running[-1] is not None and needed <= running[-1]:
            return _NothingToRestore()  # a helper call: its modules are patched already
        scope = real_patch(fn)
        if running:  # the launch's own patch, or a helper's (never undone before the launch ends)
            running[-1] = (running[-1] or frozenset()) | needed
        return scope

    real_call = executor.__call__

    @functools.wraps(real_call)
    def call(self, *args, **kwargs):
        running.append(None)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            running.pop()

    patch_lang._fastadv_fast_calls = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = call
    return True
