"""Benchmark machinery shared by every op (FGM now; PGD, AWP, DP later).

* :func:`count` -- launches, host syncs and bytes moved by one call, counted
  exactly on any machine (aten ops through a ``TorchDispatchMode``, fastadv
  kernels through :data:`fastadv.kernels.LAUNCHES` and the op's stated design).
* :func:`time_ms` -- median wall time of a call (CUDA events on GPU).
* :func:`measure_copy_bandwidth` -- the device's ``copy_`` bandwidth, the
  yardstick for the "% of copy bandwidth" column.
* :class:`Impl` / :func:`run_op` -- check every implementation against the
  reference, time it and count it, one result row per (op, case, impl).
* :func:`write_results`, :func:`format_table`, :func:`plot` -- the JSON file in
  ``benchmarks/results/<device>.json``, the printed table and the PNG.

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
    from fastadv.kernels import LAUNCHES

    return collections.Counter({k: v - before.get(k, 0) for k, v in LAUNCHES.items()
                                if v - before.get(k, 0) > 0})


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
            flush_cache: bool = True, return_all: bool = False):
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs.

    CUDA: one pair of CUDA events around each run, the L2 cache flushed before
    each (outside the events), one synchronize at the end.  CPU:
    ``time.perf_counter`` around each run.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
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
    into the result row.
    """
    step: Callable[[], Any]
    check: Callable[[], str | None] | None = None
    design_bytes: int | Callable[[collections.Counter], int] | None = None
    counting: str = "dispatch"
    timed: bool = True
    extra: dict = field(default_factory=dict)
    teardown: Callable[[], None] | None = None


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


def run_impls(op: str, case: str, impls: Iterable[Impl], device, *, warmup: int, iters: int,
              log: Callable[[str], None] = print, extra: dict | None = None) -> list[dict]:
    """Check, time and count each implementation on one case; one row each."""
    device = torch.device(device)
    rows = []
    for impl in impls:
        row: dict[str, Any] = {"op": op, "case": case, "impl": impl.name, "ms": None, "gbps": None}
        row.update(extra or {})
        prep = None
        try:
            prep = impl.setup()
            row.update(prep.extra)
            failure = prep.check() if prep.check is not None else None
            row["check"] = "ok" if failure is None else "FAIL"
            if failure is not None:
                row["check_detail"] = str(failure)
                log(f"  CHECK FAILED {op} {case} {impl.name}: {failure}")
            if prep.timed:
                row["ms"] = _sig(time_ms(prep.step, device, warmup=warmup, iters=iters))
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
            row["skipped"] = str(exc)
        except Exception as exc:  # record, do not crash the whole run
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  ERROR {op} {case} {impl.name}: {row['error']}")
            log("".join(traceback.format_exception(exc)).rstrip())
        finally:
            if prep is not None and prep.teardown is not None:
                try:
                    prep.teardown()
                except Exception as exc:  # pragma: no cover
                    log(f"  teardown of {impl.name} failed: {exc}")
            del prep
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def add_derived(rows: list[dict], copy_gbps: float | None) -> list[dict]:
    """Fill ``speedup`` (reference ms / ms, same op and case), ``gbps`` (bytes
    / time) and ``pct_copy_bw`` (gbps / copy_gbps * 100) where defined."""
    ref = {(r["op"], r["case"]): r["ms"] for r in rows if r.get("impl") == "reference" and r.get("ms")}
    for r in rows:
        ms = r.get("ms")
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


def format_table(rows: list[dict]) -> str:
    """Plain-text table: op, case, impl, ms, speedup vs reference, GB/s, % of
    copy bandwidth, launches, syncs, MB moved, check; notes for skipped rows."""
    body = []
    notes = []
    for r in rows:
        if r.get("skipped") or r.get("error"):
            why = r.get("skipped") or r.get("error")
            status = "skipped" if r.get("skipped") else "ERROR"
            body.append((r["op"], r["case"], r["impl"], status) + ("",) * (len(COLUMNS) - 4))
            notes.append(f"{r['op']} {r['case']} {r['impl']}: {status}: {why}")
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
    if notes:
        out += [""] + notes
    return "\n".join(out)


def plot(results_json: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Bar chart of the speedup over the reference of every timed (case, impl)
    in a results file, one panel per op; writes and returns ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    doc = json.loads(Path(results_json).read_text())
    rows = [r for r in doc["rows"] if r.get("ms")]
    ref = {(r["op"], r["case"]): r["ms"] for r in rows if r["impl"] == "reference"}
    ops = list(dict.fromkeys(r["op"] for r in rows)) or ["(no timed rows)"]
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 4.5 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op and r["impl"] != "reference"
                   and (op, r["case"]) in ref]
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
                    ys.append(ref[(op, case)] / r["ms"])
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
        if impls:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no timed rows", transform=ax.transAxes, ha="center")
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


def run_op(op: str, module, device, *, full: bool = False, quick: bool = False,
           impls: Iterable[str] | None = None, warmup: int | None = None, iters: int | None = None,
           log: Callable[[str], None] = print) -> list[dict]:
    """Run every case of one op module (``cases(device, full)`` and
    ``impls(case, device)``), returning its rows.  ``quick``: only the cases of
    the first (smallest) size."""
    device = torch.device(device)
    if warmup is None:
        warmup = 5 if device.type == "cuda" else 2
    if iters is None:
        iters = 50 if device.type == "cuda" else 5
    only = set(impls) if impls else None
    rows = []
    all_cases = list(module.cases(device, full))
    if quick and all_cases:
        first = getattr(all_cases[0], "size", None)
        all_cases = [c for c in all_cases if getattr(c, "size", None) == first] if first else all_cases[:1]
    for case in all_cases:
        log(f"[{op}] {case.name}")
        chosen = [i for i in module.impls(case, device) if only is None or i.name in only]
        rows += run_impls(op, case.name, chosen, device, warmup=warmup, iters=iters, log=log,
                          extra=getattr(case, "row_extra", lambda: {})())
    return rows
