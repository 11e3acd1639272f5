"""Running the bench: check, time and count each (op, case, impl), one row each.

* :func:`run_unit` -- one implementation on one case: set up, check against
  the reference, time (unless untimed), count; a missing optional dependency
  is a ``skipped`` row, any other exception an ``error`` row (never a crash);
* :func:`run_plan` -- the units of a plan in order, with a :class:`Progress`
  line (done / total, ETA) and an optional :class:`Budget` (a unit that would
  overrun it is not started and says so in its row);
* :func:`main` -- ``python -m fastadv bench``: header, plan, run, table, JSON, PNG.
"""
from __future__ import annotations

import collections
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import report
from .case import Impl, Prepared, Skip, Unit, missing_dependency, plan, real_sizes, units_of
from .count import count, count_profiled
from .report import sig
from .timing import measure_copy_bandwidth, synchronize, time_ms


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


def _measure(prep: Prepared, row: dict, device, *, warmup: int, iters: int, timed: bool,
             cap: Callable[[], float | None], log, label: str) -> None:
    """Check, time and count a prepared implementation into ``row``
    (``cap()``: the seconds its timed runs may take, asked after the check)."""
    row.update(prep.extra)
    failure = prep.check() if prep.check is not None else None
    row["check"] = "ok" if failure is None else "FAIL"
    if failure is not None:
        row["check_detail"] = str(failure)
        log(f"  CHECK FAILED {label}: {failure}")
    if prep.timed and timed:
        row["ms"] = sig(time_ms(prep.step, device, warmup=warmup, iters=iters, max_seconds=cap()))
    synchronize(device)
    counts = count(prep.step, prep.design_bytes)
    if prep.counting == "compiled" and device.type == "cuda":
        synchronize(device)  # compiled code bypasses the dispatcher: the profiler sees its kernels
        counts.update({k: v for k, v in count_profiled(prep.step, device).items() if k in ("launches", "syncs")})
    synchronize(device)
    row.update({k: counts[k] for k in ("launches", "syncs", "bytes")})
    if counts.get("kernels"):
        row["kernels"] = counts["kernels"]


def _failed(exc: Exception, row: dict, log, trace, label: str) -> None:
    """A skipped row for a missing optional dependency, else an error row:
    one line logged, the traceback kept in the row and passed to ``trace``."""
    missing = missing_dependency(exc)
    if missing is not None:
        row.pop("check", None)
        row["skipped"] = missing
        return
    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    tb = "".join(traceback.format_exception(exc)).rstrip()
    row["traceback"] = tb
    log(f"  ERROR {label}: {row['error']}")
    if trace is not None:
        trace(f"ERROR {label}:\n{tb}")


def _teardown(prep: Prepared | None, log, name: str) -> None:
    if prep is not None and prep.teardown is not None:
        try:
            prep.teardown()
        except Exception as exc:  # pragma: no cover
            log(f"  teardown of {name} failed: {exc}")


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
    why = budget.refuse(key) if budget is not None else None
    if why:
        row.update(skipped=why, budget=True)
        return row
    t0 = time.monotonic()
    b0 = budget.clock() if budget is not None else 0.0
    def cap():
        return budget.timing_cap(timing_cap_s) if budget is not None else timing_cap_s

    label = f"{op} {case} {impl.name}"
    prep = None
    try:
        prep = impl.setup()
        _measure(prep, row, device, warmup=warmup, iters=iters, timed=timed, cap=cap, log=log, label=label)
    except Skip as exc:
        row.pop("check", None)
        row["skipped"] = str(exc)
    except Exception as exc:  # record, do not crash the whole run
        _failed(exc, row, log, trace, label)
    finally:
        _teardown(prep, log, impl.name)
        del prep  # free the implementation's tensors before the next unit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["wall_s"] = sig(time.monotonic() - t0, 3)
    if budget is not None:
        budget.record(key, budget.clock() - b0)
    return row


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
    units = units_of(op, module, device, full=full, quick=quick, impls=impls)
    return run_plan(units, device, warmup=warmup, iters=iters, log=log, **kw)


# --------------------------------------------------------------------------
# python -m fastadv bench


def print_header(device, header: dict, out=print) -> None:
    from fastadv import _env

    out(f"device   {header['device']}")
    out(f"commit   {header['commit']}   date {header['date']}")
    out("versions " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    for line in _env.where():
        out(line)
    for name, why in _env.backends(device).items():
        if why is not None:
            out(f"backend {name}: not usable here: {why}")


def _print_cpu_notes(quick: bool, full: bool, timed: bool) -> None:
    from fastadv import _backend

    if _backend.triton_interpreter():
        print("note: TRITON_INTERPRET=1: triton rows run in the Triton interpreter (checked and counted, "
              "never timed; no bf16/fp16 there)")
    what = ("every op at its smallest size, without torch.compile (--full: every case and "
            "implementation)" if quick and not full else "the full CPU sweep")
    print(f"note: CPU run, {what}: CPU timings are not GPU speed, so the speedup, GB/s and %copy "
          f"columns stay blank" + ("; ms are CPU wall times" if timed else " and nothing is timed"))


def _write_outputs(rows: list[dict], args, device, copy_gbps: float, header: dict) -> None:
    path = report.write_results(rows, args.out, device, copy_gbps, header=header).resolve()
    print(f"results  {path}")
    if args.no_plot:
        return
    try:
        png = report.plot(path, path.with_suffix(".png"))
        print(f"plot     {Path(png).resolve()}")
    except report.NothingToPlot as exc:
        print(f"plot     not drawn: {exc}")
    except ImportError as exc:
        print(f"plot     not drawn: {exc} (pip install matplotlib)")


def _summary(rows: list[dict], seconds: float) -> int:
    """Print the last line; the exit status (1 when a check failed or a row errored)."""
    failed = [r for r in rows if r.get("check") == "FAIL" or r.get("error")]
    skipped = sum(1 for r in rows if r.get("skipped"))
    checked = sum(1 for r in rows if r.get("check") == "ok")
    print(f"{len(rows)} rows in {seconds:.1f} s: {checked} checked ok, {skipped} skipped, "
          + (f"{len(failed)} FAILED: " + ", ".join(f"{r['op']} {r['case']} {r['impl']}" for r in failed)
             if failed else "0 failed"))
    return 1 if failed else 0


def main(args, device, ops: list[str]) -> int:
    """``python -m fastadv bench`` with the parsed ``args`` on ``device``."""
    impls = [i.strip() for i in args.impls.split(",") if i.strip()] if args.impls else None
    cpu = device.type == "cpu"
    quick = args.quick or (cpu and not args.full)
    timed = not cpu or args.full or args.iters is not None
    # torch.compile is a GPU timing baseline: the CPU main job (untimed) leaves it out
    exclude = ("compiled",) if cpu and not args.full and impls is None else ()

    header = report.environment(device)
    print_header(device, header)
    if cpu:
        _print_cpu_notes(quick, args.full, timed)
    copy_gbps = measure_copy_bandwidth(device)
    print(f"copy bandwidth {copy_gbps:.1f} GB/s (dst.copy_(src), bytes read + written)")

    t0 = time.perf_counter()
    full = True if args.real_sizes else None
    units = plan(ops, device, full=full, quick=quick, impls=impls, exclude=exclude)
    print(f"{len(units)} rows to run ({len(ops)} ops){'' if args.budget is None else f', budget {args.budget:.0f} s'}")
    print()
    progress = Progress([u.key for u in units])
    budget = Budget(args.budget, reserve=5.0) if args.budget else None
    trace = progress.message if args.verbose else None
    rows = run_plan(units, device, warmup=args.warmup, iters=args.iters, timed=timed,
                    progress=progress, budget=budget, trace=trace)
    progress.close()
    report.add_derived(rows, copy_gbps, speedups=not cpu)
    print()
    print(report.format_table(rows))
    print()
    header["run"] = {"sizes": "real" if real_sizes(device, full) else "small", "quick": quick,
                     "timed": timed, "budget_s": args.budget}
    _write_outputs(rows, args, device, copy_gbps, header)
    return _summary(rows, time.perf_counter() - t0)
