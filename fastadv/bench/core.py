"""Benchmark machinery shared by every op (FGM now; PGD, AWP, DP later).

* :func:`count` -- launches, host syncs and bytes moved by one call, counted
  exactly on any machine (aten ops through a ``TorchDispatchMode``, fastadv
  kernels through :data:`fastadv.kernels.LAUNCHES` and the op's stated design).
* :func:`time_ms` -- median wall time of a call (CUDA events on GPU).
* :func:`measure_copy_bandwidth` -- the device's ``copy_`` bandwidth, the
  yardstick for the "% of copy bandwidth" column.
* :class:`Impl` / :func:`plan` / :func:`run_plan` (:func:`run_op` for one op)
  -- check every implementation against the reference, time it and count it,
  one result row per (op, case, impl), with a :class:`Progress` line (done /
  total, ETA) and an optional :class:`Budget` (units that would overrun it are
  not started and say so in their row).
* :func:`write_results`, :func:`format_table`, :func:`plot` -- the JSON file
  ``<out>/<device>.json``, the printed table and the PNG.

Units: ``ms`` milliseconds, ``bytes`` bytes, ``gbps`` 1e9 bytes per second,
the table's ``MB`` 1e6 bytes.
"""
from __future__ import annotations

import collections
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# --------------------------------------------------------------------------
# counting


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes spanned by the elements of ``t``: numel * element_size, with
    broadcast (stride 0) dimensions counted once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


# Ops that launch nothing: allocation, metadata, aliasing.
_NO_KERNEL = frozenset({
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "empty_permuted",
    "resize_", "resize_as_", "set_", "lift_fresh", "detach", "detach_", "alias", "record_stream",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "numel", "dim",
    "is_same_size", "_has_compatible_shallow_copy_type", "is_pinned", "_version",
    "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "_reshape_alias",
})
# Host syncs that launch no kernel (a device-to-host read of a scalar).
_SYNC_ONLY = frozenset({"_local_scalar_dense", "item", "is_nonzero"})
# Ops that launch a kernel and then read its result on the host.
_SYNC_AND_LAUNCH = frozenset({"equal"})
# In-place ops whose mutated argument is only written, never read.
_WRITE_ONLY = frozenset({
    "copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
    "geometric_", "cauchy_", "log_normal_",
})
# Gathers: the source (first tensor argument) is read only where indexed.
_GATHER = frozenset({"index_select", "index", "embedding", "gather", "take", "_unsafe_index"})
# Scatters: self is written (and read when accumulating) only where indexed.
_SCATTER = frozenset({
    "index_put_", "_index_put_impl_", "index_add_", "index_copy_", "index_fill_", "scatter_",
    "scatter_add_", "scatter_reduce_", "index_reduce_", "masked_scatter_", "put_",
})
_SCATTER_ACCUMULATES = frozenset({"index_add_", "scatter_add_", "scatter_reduce_", "index_reduce_"})

_INTERPRETER_FILE = os.path.join("triton", "runtime", "interpreter.py")
_interp_codes: dict = {}


def _inside_triton_interpreter() -> bool:
    """True when the current aten op is issued by the Triton interpreter (it
    moves kernel arguments to and from host copies with aten ops; those are not
    the kernel's work and are not counted)."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        hit = _interp_codes.get(code)
        if hit is None:
            hit = _interp_codes[code] = code.co_filename.endswith(_INTERPRETER_FILE)
        if hit:
            return True
        frame = frame.f_back
    return False


def _is_view(func) -> bool:
    if getattr(func, "is_view", False):
        return True
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _bound_args(func, args, kwargs):
    """(schema argument, value) pairs."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            out.append((arg, args[i]))
        elif arg.name in kwargs:
            out.append((arg, kwargs[arg.name]))
    return out


def _index_put_elements(self_t: torch.Tensor, indices) -> int:
    shapes, covered = [], 0
    rest = 1
    for d, idx in enumerate(indices):
        covered = d + 1
        if idx is None:
            rest *= self_t.shape[d]
        elif idx.dtype in (torch.bool, torch.uint8):
            shapes.append((int(idx.count_nonzero()),))
            covered = d + idx.dim()
        else:
            shapes.append(tuple(idx.shape))
    n = math.prod(torch.broadcast_shapes(*shapes)) if shapes else 1
    return n * rest * math.prod(self_t.shape[covered:])


def _scatter_elements(name: str, bound: dict, self_t: torch.Tensor) -> int:
    if name in ("index_put_", "_index_put_impl_"):
        return _index_put_elements(self_t, bound.get("indices") or [])
    if name == "index_fill_":
        dim = bound.get("dim", 0)
        return bound["index"].numel() * (self_t.numel() // max(1, self_t.size(dim)))
    if name == "masked_scatter_":
        return int(bound["mask"].expand_as(self_t).count_nonzero())
    for key in ("source", "src"):
        if isinstance(bound.get(key), torch.Tensor):
            return bound[key].numel()
    return bound["index"].numel()


class _CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = 0
        self.syncs = 0
        self.bytes = 0
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _inside_triton_interpreter():
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        name = func._overloadpacket.__name__
        if name in _SYNC_ONLY:
            self.syncs += 1
            self.ops[name] += 1
            return
        if name in _NO_KERNEL or _is_view(func) or torch.Tag.inplace_view in func.tags:
            return
        bound_pairs = _bound_args(func, args, kwargs)
        bound = {a.name: v for a, v in bound_pairs}
        sync = name in _SYNC_AND_LAUNCH
        if torch.Tag.dynamic_output_shape in func.tags:
            if name == "index":  # only boolean masks need the size on the host
                sync = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                           for i in (bound.get("indices") or []))
            elif name == "repeat_interleave":
                sync = bound.get("output_size") is None
            else:
                sync = True
        if name in ("index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (bound.get("indices") or [])):
            sync = True  # boolean indices are turned into positions on the host
        inputs = [v for _, v in bound_pairs]
        src_dev = {t.device.type for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
        if name in ("_to_copy", "copy_") and "cuda" in src_dev:
            dst = out if isinstance(out, torch.Tensor) else None
            if dst is not None and dst.device.type == "cpu" and not bound.get("non_blocking", False):
                sync = True  # device-to-host copy
        self.launches += 1
        self.syncs += int(sync)
        self.ops[name] += 1
        self.bytes += self._bytes(name, bound_pairs, bound, out)

    @staticmethod
    def _bytes(name, bound_pairs, bound, out) -> int:
        seen: set = set()
        total = 0

        def key(t):
            return (t.device, t.data_ptr() if t.numel() else id(t), tuple(t.shape), tuple(t.stride()),
                    t.dtype)

        mutated = []
        for arg, value in bound_pairs:
            if arg.alias_info is not None and arg.alias_info.is_write:
                mutated += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        mutated_keys = {key(t) for t in mutated}

        # reads
        first_tensor = next((v for _, v in bound_pairs if isinstance(v, torch.Tensor)), None)
        for _, value in bound_pairs:
            for t in tree_leaves(value):
                if not isinstance(t, torch.Tensor):
                    continue
                k = key(t)
                if k in seen:
                    continue
                seen.add(k)
                if k in mutated_keys:
                    continue  # handled with the writes
                if name in _GATHER and t is first_tensor and isinstance(out, torch.Tensor):
                    total += min(tensor_bytes(t), out.numel() * t.element_size())
                else:
                    total += tensor_bytes(t)
        # writes (in-place and out= arguments once; read too unless write-only)
        for t in mutated:
            if name in _SCATTER and t is bound.get("self"):
                touched = _scatter_elements(name, bound, t) * t.element_size()
                accumulate = name in _SCATTER_ACCUMULATES or bool(bound.get("accumulate", False))
                total += touched * (2 if accumulate else 1)
                continue
            arg_is_out = any(a.kwarg_only and v is t for a, v in bound_pairs)
            read = name not in _WRITE_ONLY and not arg_is_out
            total += tensor_bytes(t) * (2 if read else 1)
        # fresh results
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and key(t) not in mutated_keys:
                total += tensor_bytes(t)
        return total


def _launch_diff(before: collections.Counter) -> collections.Counter:
    """fastadv kernel launches since ``before``.  ``torch.*`` entries are
    markers of the torch backend (which ran aten ops, counted as such), not
    kernels, and are left out."""
    from fastadv.kernels import LAUNCHES

    return collections.Counter({k: v - before.get(k, 0) for k, v in LAUNCHES.items()
                                if v - before.get(k, 0) > 0 and not k.startswith("torch.")})


def count(fn: Callable[[], Any], design_bytes: int | Callable[[collections.Counter], int] | None = None
          ) -> dict:
    """Run ``fn()`` once and count what it costs.

    Returns

    * ``launches``: aten ops that launch a kernel (views, metadata and
      allocation ops excluded) + fastadv kernel launches
      (:data:`fastadv.kernels.LAUNCHES`);
    * ``syncs``: host syncs: ``aten::_local_scalar_dense`` (``.item()``,
      ``bool(t)``, ...) and ops that need a device result on the host
      (``nonzero``, boolean indexing, ``equal``, a device-to-host copy);
    * ``bytes``: for aten ops, bytes of tensor operands read + results written
      (an in-place result is written once, and read too unless the op only
      writes it, like ``copy_``; gathers and scatters count the indexed part).
      When fastadv kernels ran, ``bytes`` is ``design_bytes`` instead: the bytes
      the op's design moves per call, kernels and the op's helper aten ops
      together (an int, or a function of the launch counter); None if not given;
    * the breakdown ``aten_launches``, ``kernel_launches``, ``aten_bytes``,
      ``design_bytes``, ``ops`` (aten op -> calls), ``kernels`` (kernel -> launches).

    Aten ops the Triton interpreter issues to stage kernel arguments
    (``TRITON_INTERPRET=1``) are not counted: they are not the kernel's work.
    """
    from fastadv.kernels import LAUNCHES

    before = collections.Counter(LAUNCHES)
    mode = _CountingMode()
    with mode:
        fn()
    kernels = _launch_diff(before)
    n_kernels = sum(kernels.values())
    if callable(design_bytes):
        design_bytes = design_bytes(kernels)
    if n_kernels == 0:
        total = mode.bytes
    else:
        total = None if design_bytes is None else int(design_bytes)
    return {
        "launches": mode.launches + n_kernels,
        "syncs": mode.syncs,
        "bytes": total,
        "aten_launches": mode.launches,
        "kernel_launches": n_kernels,
        "aten_bytes": mode.bytes,
        "design_bytes": design_bytes,
        "ops": dict(mode.ops),
        "kernels": dict(kernels),
    }


def count_profiled(fn: Callable[[], Any], device) -> dict:
    """Launches and syncs of ``fn()`` seen by the PyTorch profiler, for code the
    dispatch mode cannot see into (``torch.compile`` output).  On CUDA: device
    kernels and memsets are launches; ``cudaStreamSynchronize`` /
    ``cudaDeviceSynchronize`` / ``cudaEventSynchronize`` calls are syncs.  On
    CPU launches are not defined (None) and syncs are ``_local_scalar_dense``
    calls.  Bytes are not counted (None).  Device-to-device copies (``clone``)
    count as launches; device-to-host / host-to-device copies do not."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=acts) as prof:
        fn()
    events = prof.events()
    if device.type == "cuda":
        launches = sum(1 for e in events if e.device_type == DeviceType.CUDA
                       and not e.name.startswith(("Memcpy DtoH", "Memcpy HtoD")))
        syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                    "cudaEventSynchronize"))
    else:
        launches = None
        syncs = sum(1 for e in events if e.name == "aten::_local_scalar_dense")
    return {"launches": launches, "syncs": syncs, "bytes": None}


# --------------------------------------------------------------------------
# timing


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_l2_flush: dict = {}


def flush_l2(device) -> None:
    """Evict the GPU's L2 cache (zero a 256 MiB buffer); nothing on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    buf = _l2_flush.get(device)
    if buf is None:
        # larger than any current L2 (H100: 50 MB, H200: 60 MB, B200: 126 MB)
        buf = _l2_flush[device] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    buf.zero_()


def time_ms(fn: Callable[[], Any], device, warmup: int = 3, iters: int = 10, *,
            flush_cache: bool = True, return_all: bool = False, max_seconds: float | None = None):
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs.

    CUDA: one pair of CUDA events around each run, the L2 cache flushed before
    each (outside the events), one synchronize at the end.  CPU:
    ``time.perf_counter`` around each run.  ``max_seconds``: fewer runs (at
    least 3) when ``iters`` of them would take longer than that, judged from
    the slowest warmup run.
    """
    device = torch.device(device)
    slowest = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        if max_seconds is not None:
            synchronize(device)
            slowest = max(slowest, time.perf_counter() - t0)
    if max_seconds is not None and slowest > 0:
        iters = max(min(iters, 3), min(iters, int(max_seconds / slowest)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(iters):
            if flush_cache:
                flush_l2(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times if return_all else statistics.median(times)


def measure_copy_bandwidth(device, nbytes: int | None = None, iters: int | None = None) -> float:
    """GB/s (1e9 B/s) of ``dst.copy_(src)``: bytes read + written over the median time.

    CUDA: 1 GiB buffers (less when memory is short); CPU: 64 MiB."""
    device = torch.device(device)
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(2**30, max(2**24, free // 4))
        else:
            nbytes = 64 * 2**20
    if iters is None:
        iters = 20 if device.type == "cuda" else 5
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=iters, flush_cache=False)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------
# implementations, cases, rows


class CaseCache:
    """The data of one case, built by ``factory(case, device)`` on first use and
    kept only while that case runs (every implementation shares it; the previous
    case's tensors are freed first, so big cases never coexist)."""

    def __init__(self, factory: Callable[[Any, Any], Any]):
        self.factory = factory
        self.key = self.value = None

    def __call__(self, case, device):
        key = (case, str(device))
        if key != self.key:
            self.clear()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            self.value, self.key = self.factory(case, device), key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


# pip names of the optional dependencies a bench case may need
PIP_NAMES = {"opacus": "opacus (or fastadv[dp])", "matplotlib": "matplotlib", "triton": "triton"}


def missing_dependency(exc: BaseException) -> str | None:
    """The one-line reason for a row whose optional dependency is not installed
    (a ``ModuleNotFoundError`` of a module outside fastadv), else None."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None
    top = name.split(".")[0]
    if top == "fastadv":
        return None  # a missing fastadv module is a bug, not a missing dependency
    return f"needs {top}, not installed here (pip install {PIP_NAMES.get(top, top)})"


def require(module: str):
    """Import ``module`` or raise :class:`Skip` saying it is not installed."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(missing_dependency(exc) or f"{module} cannot be imported ({exc})") from exc


def real_sizes(device, full: bool | None = None) -> bool:
    """Whether a bench module uses the sizes users meet (True) or its small CPU
    stand-ins: ``full`` when given, else real sizes on CUDA, small on CPU."""
    if full is not None:
        return bool(full)
    return torch.device(device).type == "cuda"


@dataclass
class Prepared:
    """One implementation ready to run on one case.

    ``step`` is the timed call (e.g. FGM attack + restore).  ``check`` returns
    None when the implementation matches the reference, else what differs; it
    runs before timing.  ``design_bytes`` is what the op moves per ``step`` by
    design when fastadv kernels run (see :func:`count`).  ``counting`` is
    ``"dispatch"`` (exact, :func:`count`) or ``"compiled"`` (for
    ``torch.compile`` output, which the dispatch mode sees only as the eager
    ops it replaces: on CUDA launches and syncs come from the profiler
    (:func:`count_profiled`), bytes stay the eager-equivalent count, an upper
    bound).  ``timed=False`` leaves ``ms``
    empty (the Triton interpreter: its times mean nothing).  ``extra`` keys go
    into the result row.  ``sync_free``: whether ``step`` must issue no host
    sync (the GPU check runs it under ``torch.cuda.set_sync_debug_mode("error")``);
    None: yes for the fastadv backends, not asserted for the others.  A step
    that also runs a model or Opacus's hooks says False.
    """
    step: Callable[[], Any]
    check: Callable[[], str | None] | None = None
    design_bytes: int | Callable[[collections.Counter], int] | None = None
    counting: str = "dispatch"
    timed: bool = True
    extra: dict = field(default_factory=dict)
    teardown: Callable[[], None] | None = None
    sync_free: bool | None = None


@dataclass
class Impl:
    """A named implementation; ``setup()`` builds its state for one case and
    returns a :class:`Prepared` (or raises :class:`Skip`)."""
    name: str
    setup: Callable[[], Prepared]


def _sig(x: float | None, digits: int = 6):
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Budget:
    """A wall-clock budget for a run.

    Before a unit (one implementation on one case) starts, :meth:`refuse` says
    why it must not: the budget is spent, or the previous unit with the same
    key (op, impl) took longer than what is left.  A refused unit gets a row
    saying so (``skipped``, ``budget: true``) instead of being cut half-way.
    ``reserve`` seconds are kept for what comes after (the table, the file, the plot).
    """

    def __init__(self, seconds: float | None, *, reserve: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.reserve = reserve
        self.clock = clock
        self.start = clock()
        self.last: dict = {}
        self.refused = 0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - self.reserve - self.elapsed()

    def refuse(self, key) -> str | None:
        if self.seconds is None:
            return None
        left = self.left()
        why = None
        if left <= 0:
            why = f"the {self.seconds:.0f} s budget was spent"
        else:
            est = self.last.get(key)
            if est is not None and est > left:
                what = " ".join(map(str, key)) if isinstance(key, tuple) else str(key)
                why = (f"would take about {est:.0f} s (as the previous {what} did), "
                       f"{left:.0f} s of the {self.seconds:.0f} s budget left")
        if why:
            self.refused += 1
        return why

    def record(self, key, seconds: float) -> None:
        self.last[key] = seconds

    def timing_cap(self, cap: float | None) -> float | None:
        """Seconds the timed runs of one unit may take: ``cap``, and at most a
        quarter of what is left."""
        if self.seconds is None:
            return cap
        quarter = max(0.5, self.left() / 4)
        return quarter if cap is None else min(cap, quarter)


class Progress:
    """One progress line: units done / total, elapsed, ETA, the current unit.

    On a terminal the line is rewritten in place (``\\r``); otherwise (a log, a
    pipe, CI) a plain line is printed at most every ``interval`` seconds and
    at the end.  The ETA adds, for every unit left, the mean time of the units
    done with the same (op, impl), else with the same impl, else of all.
    Messages (:meth:`message`) go above the line.
    """

    def __init__(self, keys: list, stream=None, *, interval: float = 15.0, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.keys = list(keys)
        self.total = len(self.keys)
        self.done = 0
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.interval = interval
        self.clock = clock
        self.t0 = clock()
        self._last_print = -math.inf
        self._drawn = False
        self.current = ""
        self._by_key: dict = collections.defaultdict(list)
        self._by_impl: dict = collections.defaultdict(list)
        self._all: list = []

    def _mean(self, values):
        return sum(values) / len(values) if values else None

    def eta(self) -> float | None:
        if not self._all:
            return None
        overall = self._mean(self._all)
        total = 0.0
        for key in self.keys[self.done:]:
            impl = key[-1] if isinstance(key, tuple) else key
            est = self._mean(self._by_key.get(key, ())) or self._mean(self._by_impl.get(impl, ()))
            total += overall if est is None else est
        return total

    def text(self) -> str:
        width = len(str(self.total))
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        left = "ETA --:--" if eta is None else f"ETA {_clock(eta)}"
        if self.done >= self.total:
            left = "done"
        head = f"[{self.done:>{width}}/{self.total} {pct:3.0f}%] {_clock(self.clock() - self.t0)} elapsed, {left}"
        return head + (f"  {self.current}" if self.current and self.done < self.total else "")

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream: progress is optional
            pass

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if self.tty:
            import shutil

            cols = shutil.get_terminal_size((100, 20)).columns
            self._write("\r" + self.text()[: max(10, cols - 1)] + "\x1b[K")
            self._drawn = True
        elif force or now - self._last_print >= self.interval:
            self._write(self.text() + "\n")
            self._last_print = now

    def start(self, key, label: str) -> None:
        self.current = label
        if self.tty:
            self._draw()

    def finish(self, key, seconds: float | None = None) -> None:
        """One unit done; ``seconds`` (None: not measured, e.g. refused) feeds the ETA."""
        self.done += 1
        if seconds is not None:
            impl = key[-1] if isinstance(key, tuple) else key
            self._by_key[key].append(seconds)
            self._by_impl[impl].append(seconds)
            self._all.append(seconds)
        self._draw(force=self.done >= self.total)

    def message(self, text: str) -> None:
        if self.tty and self._drawn:
            self._write("\r\x1b[K" + text + "\n")
            self._draw()
        else:
            self._write(text + "\n")

    def close(self) -> None:
        if self.tty and self._drawn:
            self._write("\r" + self.text() + "\x1b[K\n")
            self._drawn = False


def run_unit(op: str, case: str, impl: Impl, device, *, warmup: int, iters: int, timed: bool = True,
             log: Callable[[str], None] = print, extra: dict | None = None,
             trace: Callable[[str], None] | None = None, budget: Budget | None = None,
             timing_cap_s: float | None = None) -> dict:
    """Check, time (unless ``timed`` is False) and count one implementation on
    one case; its row.  A missing optional dependency makes a ``skipped`` row
    with one line of reason; any other exception an ``error`` row (one line
    logged, the traceback in the row's ``traceback`` and passed to ``trace``)."""
    device = torch.device(device)
    row: dict[str, Any] = {"op": op, "case": case, "impl": impl.name, "ms": None, "gbps": None}
    row.update(extra or {})
    key = (op, impl.name)
    if budget is not None:
        why = budget.refuse(key)
        if why:
            row.update(skipped=why, budget=True)
            return row
    t0 = time.monotonic()
    b0 = budget.clock() if budget is not None else 0.0
    prep = None
    try:
        prep = impl.setup()
        row.update(prep.extra)
        failure = prep.check() if prep.check is not None else None
        row["check"] = "ok" if failure is None else "FAIL"
        if failure is not None:
            row["check_detail"] = str(failure)
            log(f"  CHECK FAILED {op} {case} {impl.name}: {failure}")
        if prep.timed and timed:
            cap = budget.timing_cap(timing_cap_s) if budget is not None else timing_cap_s
            row["ms"] = _sig(time_ms(prep.step, device, warmup=warmup, iters=iters, max_seconds=cap))
        synchronize(device)
        counts = count(prep.step, prep.design_bytes)
        if prep.counting == "compiled" and device.type == "cuda":
            synchronize(device)
            counts.update({k: v for k, v in count_profiled(prep.step, device).items()
                           if k in ("launches", "syncs")})
        synchronize(device)
        row.update({k: counts[k] for k in ("launches", "syncs", "bytes")})
        if counts.get("kernels"):
            row["kernels"] = counts["kernels"]
    except Skip as exc:
        row.pop("check", None)
        row["skipped"] = str(exc)
    except Exception as exc:  # record, do not crash the whole run
        missing = missing_dependency(exc)
        if missing is not None:
            row.pop("check", None)
            row["skipped"] = missing
        else:
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            tb = "".join(traceback.format_exception(exc)).rstrip()
            row["traceback"] = tb
            log(f"  ERROR {op} {case} {impl.name}: {row['error']}")
            if trace is not None:
                trace(f"ERROR {op} {case} {impl.name}:\n{tb}")
    finally:
        if prep is not None and prep.teardown is not None:
            try:
                prep.teardown()
            except Exception as exc:  # pragma: no cover
                log(f"  teardown of {impl.name} failed: {exc}")
        del prep
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["wall_s"] = _sig(time.monotonic() - t0, 3)
    if budget is not None:
        budget.record(key, budget.clock() - b0)
    return row


def run_impls(op: str, case: str, impls: Iterable[Impl], device, *, warmup: int, iters: int,
              log: Callable[[str], None] = print, extra: dict | None = None, **kw) -> list[dict]:
    """Check, time and count each implementation on one case; one row each
    (keywords as :func:`run_unit`)."""
    return [run_unit(op, case, impl, device, warmup=warmup, iters=iters, log=log, extra=extra, **kw)
            for impl in impls]


def add_derived(rows: list[dict], copy_gbps: float | None, *, speedups: bool = True) -> list[dict]:
    """Fill ``speedup`` (reference ms / ms, same op and case), ``gbps`` (bytes
    / time) and ``pct_copy_bw`` (gbps / copy_gbps * 100) where defined.
    ``speedups=False`` (a CPU run: its times say nothing about GPU speed)
    leaves all three empty."""
    ref = {(r["op"], r["case"]): r["ms"] for r in rows if r.get("impl") == "reference" and r.get("ms")}
    for r in rows:
        ms = r.get("ms") if speedups else None
        base = ref.get((r["op"], r["case"]))
        r["speedup"] = _sig(base / ms, 4) if ms and base else None
        nbytes = r.get("bytes")
        r["gbps"] = _sig(nbytes / (ms * 1e-3) / 1e9, 5) if ms and nbytes else None
        r["pct_copy_bw"] = _sig(100 * r["gbps"] / copy_gbps, 4) if r["gbps"] and copy_gbps else None
    return rows


# --------------------------------------------------------------------------
# results file


def environment(device) -> dict:
    """device / date / commit / versions, the header of a results file (and
    ``extra_info`` of a pytest-benchmark run)."""
    from fastadv import _env

    v = _env.versions()
    return {
        "device": _env.device_name(device),
        "date": datetime.date.today().isoformat(),
        "commit": _env.git_commit(),
        "versions": {"torch": v["torch"], "triton": v["triton"], "cuda": v["cuda"]},
    }


ROW_KEY = ("op", "case", "impl")
REQUIRED_TOP = ("device", "date", "commit", "versions", "copy_gbps", "rows")
REQUIRED_ROW = ("op", "case", "impl", "ms", "gbps")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every row whose (op, case, impl) is in ``new`` replaced in
    place; rows only in ``new`` appended in their order."""
    fresh = {tuple(r[k] for k in ROW_KEY): r for r in new}
    out, used = [], set()
    for r in old:
        k = tuple(r.get(x) for x in ROW_KEY)
        if k in fresh:
            out.append(fresh[k])
            used.add(k)
        else:
            out.append(r)
    out += [r for r in new if tuple(r[k] for k in ROW_KEY) not in used]
    return out


def results_path(out_dir: str | os.PathLike, device) -> Path:
    from fastadv import _env

    return Path(out_dir) / f"{_env.device_slug(device)}.json"


def write_results(rows: list[dict], out_dir: str | os.PathLike, device, copy_gbps: float | None,
                  header: dict | None = None, path: str | os.PathLike | None = None) -> Path:
    """Write (merge into) ``<out_dir>/<device-slug>.json`` and return its path.

    The header (device, date, commit, versions, copy_gbps) is the newest run's;
    rows with the same (op, case, impl) are replaced, others kept."""
    path = Path(path) if path is not None else results_path(out_dir, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows: list[dict] = []
    if path.exists():
        try:
            old_rows = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError):
            old_rows = []
    doc = dict(header or environment(device))
    doc["copy_gbps"] = _sig(copy_gbps, 5) if copy_gbps else 0.0
    doc["rows"] = merge_rows(old_rows, rows)
    doc = {k: doc[k] for k in REQUIRED_TOP} | {k: v for k, v in doc.items() if k not in REQUIRED_TOP}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------
# table and plot

COLUMNS = ("op", "case", "impl", "ms", "speedup", "GB/s", "%copy", "launches", "syncs", "MB", "check")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _status(r: dict) -> str | None:
    if r.get("error"):
        return "ERROR"
    if r.get("budget"):
        return "not run"
    if r.get("skipped"):
        return "skipped"
    return None


def format_table(rows: list[dict], *, notes_per_reason: int = 3) -> str:
    """Plain-text table: op, case, impl, ms, speedup vs reference, GB/s, % of
    copy bandwidth, launches, syncs, MB moved, check; then one note per reason
    a row was skipped, not run or failed (naming up to ``notes_per_reason`` rows)."""
    body = []
    reasons: dict = {}
    for r in rows:
        status = _status(r)
        if status:
            why = r.get("error") or r.get("skipped")
            body.append((r["op"], r["case"], r["impl"], status) + ("",) * (len(COLUMNS) - 4))
            group = (status, f"over the budget (first: {why})" if r.get("budget") else why)
            group = next((g for g in reasons if r.get("budget") and g[1].startswith("over the budget")), group)
            reasons.setdefault(group, []).append(f"{r['op']} {r['case']} {r['impl']}")
            continue
        mb = None if r.get("bytes") is None else r["bytes"] / 1e6
        body.append((r["op"], r["case"], r["impl"], _fmt(r.get("ms"), ".3f"),
                     _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
                     _fmt(r.get("gbps"), ".1f"), _fmt(r.get("pct_copy_bw"), ".0f"),
                     _fmt(r.get("launches"), "d"), _fmt(r.get("syncs"), "d"), _fmt(mb, ".1f"),
                     r.get("check", "-")))
    widths = [max(len(c), *(len(str(b[i])) for b in body)) if body else len(c)
              for i, c in enumerate(COLUMNS)]
    left = {0, 1, 2, 10}

    def line(cells):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])] + [line(b) for b in body]
    if reasons:
        out.append("")
        for (status, why), names in reasons.items():
            shown = "; ".join(names[:notes_per_reason])
            more = f" (+{len(names) - notes_per_reason} more)" if len(names) > notes_per_reason else ""
            count_ = f"{len(names)} rows" if len(names) > 1 else "1 row"
            out.append(f"{status}, {count_}: {why}  [{shown}{more}]")
    return "\n".join(out)


class NothingToPlot(Exception):
    """A results file without speedups (e.g. a CPU run): no plot is drawn."""


def plot(results_json: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Bar chart of the speedup over the reference of every (case, impl) that
    has one in a results file, one panel per op (bars for every impl: compiled,
    torch, triton, cuda, ...); writes and returns ``png_path``.  Raises
    :class:`NothingToPlot` when no row has a speedup (a CPU run leaves them empty)."""
    doc = json.loads(Path(results_json).read_text())
    rows = [r for r in doc["rows"] if r.get("speedup") and r.get("impl") != "reference"]
    if not rows:
        raise NothingToPlot("no speedups in the results (a CPU run leaves them empty: they need GPU timings)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 4.5 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(r["case"] for r in op_rows))
        impls = list(dict.fromkeys(r["impl"] for r in op_rows))
        width = 0.8 / max(1, len(impls))
        lo, hi = 1.0, 1.0
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(cases):
                r = next((r for r in op_rows if r["case"] == case and r["impl"] == impl), None)
                if r is not None:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r["speedup"])
            # bars grow from 1x: up when faster than the reference, down when slower
            bars = ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=impl)
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.2g}x", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom" if y >= 1 else "top", fontsize=7)
            lo, hi = min([lo] + ys), max([hi] + ys)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.6, hi * 1.6)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup over reference")
        ax.set_title(f"{op}: {doc.get('device', '?')}  ({doc.get('date', '?')}, "
                     f"{str(doc.get('commit', '?'))[:12]}, torch {doc.get('versions', {}).get('torch')})",
                     fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------
# running ops


def enable_triton_interpreter_on_cpu(device) -> bool:
    """On a machine without a GPU, turn the Triton interpreter on (before Triton
    is imported) so the triton rows are checked and counted.  Returns whether
    it is on."""
    from fastadv import _backend

    if torch.device(device).type != "cpu":
        return False
    if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    return _backend.triton_interpreter()


@dataclass
class Unit:
    """One implementation of one case of one op: a row to come."""
    op: str
    module: Any
    case: Any
    impl: Impl
    index: int = 0  # place in the natural order (op, case, impl)

    @property
    def key(self) -> tuple[str, str]:
        return (self.op, self.impl.name)

    @property
    def label(self) -> str:
        return f"{self.op} {self.case.name}: {self.impl.name}"


def select_cases(module, device, *, full: bool | None = None, quick: bool = False) -> list:
    """The cases of a bench module; ``quick``: those of its first (smallest) size."""
    all_cases = list(module.cases(device, full))
    if quick and all_cases:
        first = getattr(all_cases[0], "size", None)
        all_cases = [c for c in all_cases if getattr(c, "size", None) == first] if first else all_cases[:1]
    return all_cases


def plan(ops: Iterable[str], device, *, full: bool | None = None, quick: bool = False,
         impls: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[Unit]:
    """Every (op, case, impl) to run, in order: ``impls`` keeps only those
    names, ``exclude`` drops these (``full`` and ``quick`` as in :func:`select_cases`)."""
    from fastadv import bench

    only = set(impls) if impls else None
    drop = set(exclude)
    units: list[Unit] = []
    for op in ops:
        module = bench.load(op)
        for case in select_cases(module, device, full=full, quick=quick):
            for impl in module.impls(case, device):
                if (only is None or impl.name in only) and impl.name not in drop:
                    units.append(Unit(op, module, case, impl, len(units)))
    return units


def interleave(units: list[Unit]) -> list[Unit]:
    """The units round-robin over ops, case by case (the first case of every
    op, then the second, ...): under a budget every op gets its first rows."""
    by_op: dict = {}
    for u in units:
        by_op.setdefault(u.op, {}).setdefault(u.case, []).append(u)
    queues = [list(cases.values()) for cases in by_op.values()]
    out: list[Unit] = []
    while any(queues):
        for q in queues:
            if q:
                out += q.pop(0)
    return out


def run_plan(units: list[Unit], device, *, warmup: int | None = None, iters: int | None = None,
             timed: bool = True, log: Callable[[str], None] | None = None, progress: Progress | None = None,
             budget: Budget | None = None, trace: Callable[[str], None] | None = None,
             timing_cap_s: float | None = None) -> list[dict]:
    """Run the units (see :func:`run_unit`), releasing each op's cached case
    data after its last unit; rows in the units' order."""
    device = torch.device(device)
    if warmup is None:
        warmup = 5 if device.type == "cuda" else 2
    if iters is None:
        iters = 50 if device.type == "cuda" else 5
    if log is None:
        log = progress.message if progress is not None else print
    last = {u.op: i for i, u in enumerate(units)}
    rows = []
    for i, u in enumerate(units):
        if progress is not None:
            progress.start(u.key, u.label)
        extra = getattr(u.case, "row_extra", lambda: {})()
        row = run_unit(u.op, u.case.name, u.impl, device, warmup=warmup, iters=iters, timed=timed, log=log,
                       extra=extra, trace=trace, budget=budget, timing_cap_s=timing_cap_s)
        rows.append(row)
        if progress is not None:
            progress.finish(u.key, None if row.get("budget") else row.get("wall_s"))
        if last[u.op] == i:
            release = getattr(u.module, "release", None)
            if release:
                release()
    return rows


def run_op(op: str, module, device, *, full: bool | None = None, quick: bool = False,
           impls: Iterable[str] | None = None, warmup: int | None = None, iters: int | None = None,
           log: Callable[[str], None] = print, **kw) -> list[dict]:
    """Run every case of one op module (``cases(device, full)`` and
    ``impls(case, device)``), returning its rows.  ``quick``: only the cases of
    the first (smallest) size; other keywords as :func:`run_plan`."""
    only = set(impls) if impls else None
    units = [Unit(op, module, case, impl)
             for case in select_cases(module, device, full=full, quick=quick)
             for impl in module.impls(case, device) if only is None or impl.name in only]
    return run_plan(units, device, warmup=warmup, iters=iters, log=log, **kw)
