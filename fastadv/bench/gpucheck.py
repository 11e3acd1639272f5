"""The GPU check: ``python -m fastadv gpucheck --out DIR [--budget SECONDS] [--dry-run]``.

Meant to be the first thing run on a freshly lent GPU machine, in one device
call that fits well under 10 minutes (default budget: 420 s in all):

1. **smoke tier** -- every fastadv backend (``triton``, ``cuda``, ``torch``) x
   dtype (fp32, fp16, bf16) once on the small cases of every bench op (the CPU
   stand-in sizes, here on the GPU): set up, checked against the reference,
   then one step under ``torch.cuda.set_sync_debug_mode("error")`` (a host sync
   in a fastadv step fails the row) and the backend under test must have
   launched its kernels (no silent fallback).  Rows in ``DIR/smoke.json``.
2. **``python -m pytest -m gpu``** (the GPU-only tests, bounded by a timeout),
   output in ``DIR/pytest-gpu.log``.
3. **the bench** at the sizes users meet, under what is left of the budget:
   every op and implementation except ``torch.compile`` first, then the
   ``compiled`` rows round-robin over the ops; a row that would overrun the
   budget is not started and says so (``not run``).  ``DIR/<device>.json`` and
   ``DIR/<device>.png`` as ``python -m fastadv bench`` writes them.

The smoke tier and the bench run in worker processes that append each row to
``DIR/smoke.jsonl`` / ``DIR/bench.jsonl`` as it finishes: nothing in fastadv has
run on a GPU before, so a kernel that faults (a sticky CUDA error poisons the
process) or hangs must not take the rest down.  After a fault the worker
stops, after a hang past the phase's deadline it is killed; the row in flight
is recorded as an error and a fresh worker goes on with the rows left.

Everything printed also goes to ``DIR/gpucheck.log``; ``DIR/summary.json``
says what passed, what failed and how long each phase took.  The exit status
is 0 when the smoke tier, the tests and every bench check passed.

``--dry-run`` rehearses it without a GPU (the CI runs it): the smoke tier on
CPU tensors with the torch backend (every dtype) and the Triton interpreter
(fp32; it has no bf16 / fp16), a host sync counted as
``aten::_local_scalar_dense`` & co. instead of the sync debug mode; the pytest
step is only printed; the bench at the CPU sizes, checked and counted, not
timed, under the budget.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .case import Skip, Unit, interleave, missing_dependency, plan, real_sizes, select_cases
from .count import SYNC_ONLY, count
from .run import Budget, Progress, run_unit
from .report import NothingToPlot, add_derived, environment, format_table, plot, write_results
from .timing import measure_copy_bandwidth

DEFAULT_BUDGET = 420.0      # seconds, the whole check on a GPU
DEFAULT_BUDGET_DRY = 90.0   # seconds, --dry-run
SMOKE_SHARE, SMOKE_MAX = 0.3, 120.0
PYTEST_SHARE, PYTEST_MAX = 0.35, 180.0
BENCH_MIN = 60.0            # seconds kept for the bench whatever the tests take
RESERVE = 15.0              # seconds kept for the table, the files and the plot
TIMING_CAP = 5.0            # seconds of timed runs per bench row at most
FIRST_GUESS = {"compiled": 45.0}  # seconds a first row of this impl is assumed to take on a GPU
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("triton", "cuda", "torch")


class Log:
    """Print and append to ``DIR/gpucheck.log``, each line stamped with the
    seconds since ``t0`` (``time.time()`` of the check's start: the workers
    write to the same log)."""

    def __init__(self, path: Path, t0: float):
        self.path, self.t0 = path, t0
        self.fh = open(path, "a", buffering=1)

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file(text)

    def file(self, text: str) -> None:
        stamp = f"[{time.time() - self.t0:7.1f}s] "
        for line in str(text).splitlines() or [""]:
            self.fh.write(stamp + line + "\n")

    def close(self) -> None:
        self.fh.close()


class _TeeStream:
    """Progress output: to stdout, and to the log when stdout is no terminal."""

    def __init__(self, log: Log):
        self.log = log
        self.out = sys.stdout

    def isatty(self) -> bool:
        return bool(getattr(self.out, "isatty", lambda: False)())

    def write(self, s: str) -> None:
        self.out.write(s)
        if not self.isatty() and s.strip():
            self.log.file(s.rstrip("\n"))

    def flush(self) -> None:
        self.out.flush()


# --------------------------------------------------------------------------
# smoke tier


def _dtype_variants(module, cases: list, dtypes) -> list:
    """Each case in every dtype of ``dtypes`` when the op benchmarks it in
    more than one float dtype (a case without a ``dtype`` field, or one listed
    in a single dtype such as token ids, stays as it is)."""
    all_cases = list(module.cases("cpu", False))

    def family(c):
        return dataclasses.replace(c, dtype=torch.float32)

    multi = set()
    seen: dict = {}
    for c in all_cases:
        if dataclasses.is_dataclass(c) and isinstance(getattr(c, "dtype", None), torch.dtype):
            seen.setdefault(family(c), set()).add(c.dtype)
    multi = {f for f, dts in seen.items() if len(dts) > 1}
    out, names = [], set()
    for c in cases:
        variants = [c]
        if dataclasses.is_dataclass(c) and isinstance(getattr(c, "dtype", None), torch.dtype) \
                and family(c) in multi:
            variants = [dataclasses.replace(c, dtype=dt) for dt in dtypes]
        for v in variants:
            if v.name not in names:
                names.add(v.name)
                out.append(v)
    return out


def smoke_units(ops, device, backends=BACKENDS, dtypes=DTYPES) -> list[Unit]:
    """The smoke tier's units: the small cases of every op (the first size),
    in every dtype, for every fastadv backend usable on ``device``;
    round-robin over the ops (under the budget every op gets its first rows)."""
    from fastadv import bench

    units: list[Unit] = []
    for op in ops:
        module = bench.load(op)
        cases = select_cases(module, device, full=False, quick=True)
        for case in _dtype_variants(module, cases, dtypes):
            for impl in module.impls(case, device):
                if impl.name in backends:
                    units.append(Unit(op, module, case, impl, len(units)))
    return interleave(units)


def _sync_message(exc: BaseException) -> str | None:
    text = str(exc)
    return text.splitlines()[0] if "synchroniz" in text.lower() else None


def smoke_unit(unit: Unit, device, *, budget: Budget | None = None) -> dict:
    """Set up, check against the reference, then run one step watching for
    host syncs and for the kernels of the backend under test; one row."""
    from fastadv import kernels

    device = torch.device(device)
    row = {"op": unit.op, "case": unit.case.name, "impl": unit.impl.name}
    if budget is not None:
        why = budget.refuse(unit.key)
        if why:
            row.update(status="not run", why=why, budget=True)
            return row
    t0 = time.monotonic()
    b0 = budget.clock() if budget is not None else 0.0
    prep = None
    try:
        prep = unit.impl.setup()
        failure = prep.check() if prep.check is not None else None
        row["check"] = "ok" if failure is None else f"FAIL: {failure}"
        asserted = prep.sync_free if prep.sync_free is not None else unit.impl.name in BACKENDS
        before = dict(kernels.LAUNCHES)
        sync = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                prep.step()
            except RuntimeError as exc:
                sync = _sync_message(exc)
                if sync is None:
                    raise
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            torch.cuda.synchronize(device)
        else:
            counts = count(prep.step, prep.design_bytes)
            if counts["syncs"]:
                sync = f"{counts['syncs']} host syncs ({', '.join(sorted(k for k in counts['ops'] if k in SYNC_ONLY)) or 'data-dependent ops'})"
        ran = sorted({k.split(".")[0] for k, v in kernels.LAUNCHES.items() if v > before.get(k, 0)})
        row["launched"] = ran
        row["sync"] = "none" if sync is None else sync
        row["sync_asserted"] = bool(asserted)
        problems = []
        if failure is not None:
            problems.append(f"check: {failure}")
        if sync is not None and asserted:
            problems.append(f"host sync in the step: {sync}")
        if unit.impl.name not in ran:
            problems.append(f"the {unit.impl.name} backend launched nothing (launches seen: {ran or 'none'})")
        elif set(ran) - {unit.impl.name}:
            problems.append(f"other backends launched too: {sorted(set(ran) - {unit.impl.name})}")
        row["status"] = "ok" if not problems else "FAIL"
        if problems:
            row["why"] = "; ".join(problems)
    except Skip as exc:
        row.update(status="skipped", why=str(exc))
    except Exception as exc:
        missing = missing_dependency(exc)
        if missing:
            row.update(status="skipped", why=missing)
        else:
            import traceback

            row.update(status="ERROR", why=f"{type(exc).__name__}: {exc}".splitlines()[0],
                       traceback="".join(traceback.format_exception(exc)).rstrip())
    finally:
        if prep is not None and prep.teardown is not None:
            try:
                prep.teardown()
            except Exception:  # pragma: no cover
                pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    row["wall_s"] = round(time.monotonic() - t0, 3)
    if budget is not None:
        budget.record(unit.key, budget.clock() - b0)
    return row


def smoke_table(rows: list[dict]) -> str:
    cols = ("op", "case", "impl", "status", "check", "sync", "launched")
    body = [(r["op"], r["case"], r["impl"], r["status"], (r.get("check") or "-").split(":")[0],
             r.get("sync", "-") if r.get("sync") in (None, "none", "-") else "SYNC",
             ",".join(r.get("launched", [])) or "-") for r in rows]
    widths = [max(len(c), *(len(str(b[i])) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    reasons: dict = {}
    for r in rows:
        if r["status"] != "ok":
            group = (r["status"], "over the budget" if r.get("budget") else r.get("why"))
            reasons.setdefault(group, []).append(f"{r['op']} {r['case']} {r['impl']}")
    if reasons:
        lines.append("")
        for (status, why), names in reasons.items():
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            lines.append(f"{status}, {len(names)} rows: {why}  [{'; '.join(names[:3])}{more}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# pytest -m gpu


def pytest_command() -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "--maxfail=10", "-p", "no:cacheprovider", "tests"]


def source_root() -> Path | None:
    """The checkout holding ``tests/`` next to the imported package, or None."""
    from fastadv import _env

    root = _env.package_dir().parent
    return root if (root / "tests").is_dir() and (root / "pyproject.toml").is_file() else None


def run_pytest(out_dir: Path, timeout: float, log, *, dry: bool) -> dict:
    cmd = pytest_command()
    shown = " ".join(["python"] + cmd[1:])
    root = source_root()
    if root is None:
        log("pytest   skipped: no tests/ next to the imported package (an installed wheel); "
            "run gpucheck from a checkout installed with `pip install --no-build-isolation --no-deps -e .`")
        return {"status": "skipped", "why": "no tests/ folder"}
    if dry:
        log(f"pytest   (dry run) would run `{shown}` in {root} with a {timeout:.0f} s timeout")
        return {"status": "dry-run", "command": shown, "timeout_s": round(timeout)}
    if timeout < 10:
        log(f"pytest   not run: {timeout:.0f} s of the budget left for it")
        return {"status": "not run", "why": "budget"}
    log(f"pytest   `{shown}` in {root}, timeout {timeout:.0f} s, output in {out_dir / 'pytest-gpu.log'}")
    t0 = time.monotonic()
    with open(out_dir / "pytest-gpu.log", "w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=root, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
            rc, status = proc.returncode, ("ok" if proc.returncode == 0 else "FAIL")
        except subprocess.TimeoutExpired:
            rc, status = None, "timed out"
    seconds = time.monotonic() - t0
    tail = (out_dir / "pytest-gpu.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
    log(f"pytest   {status} (rc {rc}) in {seconds:.0f} s: {tail[0]}")
    return {"status": status, "rc": rc, "seconds": round(seconds, 1), "last_line": tail[0], "command": shown}


# --------------------------------------------------------------------------
# the bench under a budget


def bench_units(ops, device, *, dry: bool) -> list[Unit]:
    """Every row of the bench, round-robin over the ops case by case (so a
    short budget still gives every op its first cases), the ``compiled`` rows
    after all the others.  On CPU (a dry run): the CPU main job's rows
    (smallest sizes, no compiled)."""
    if dry:
        return interleave(plan(ops, device, quick=True, exclude=("compiled",)))
    units = plan(ops, device)
    return interleave([u for u in units if u.impl.name != "compiled"]) + \
        interleave([u for u in units if u.impl.name == "compiled"])


# --------------------------------------------------------------------------
# workers: one phase's rows in a child process, appended to DIR/<phase>.jsonl


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by a dying process
    return out


def _row_key(row: dict) -> tuple:
    return (row["op"], row["case"], row["impl"])


def _cuda_fault(device) -> str | None:
    """None when the CUDA context still works, else the (sticky) error."""
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).cpu()
        return None
    except Exception as exc:  # an illegal address and its kind poison the process
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def worker(args) -> int:
    """``python -m fastadv _gpucheck_worker``: run the rows of one phase not yet
    in ``DIR/<phase>.jsonl`` until ``--deadline`` (``time.time()``), appending
    ``{"start": key}`` before and ``{"row": row, "index": i}`` after each;
    ``{"end": true}`` when every row has one.  Exit status 3 after a CUDA fault."""
    out_dir = Path(args.out)
    log = Log(out_dir / "gpucheck.log", args.t0)
    stream = _TeeStream(log)
    device = torch.device("cpu") if args.dry_run else torch.device(args.device)
    ops = [o for o in args.ops.split(",") if o]
    path = out_dir / f"{args.phase}.jsonl"
    records = _read_jsonl(path)
    done = {_row_key(r["row"]) for r in records if "row" in r}
    budget = Budget(max(0.0, args.deadline - time.time()))
    for r in records:  # what the rows took before a restart tells how long they take
        row = r.get("row")
        if row and row.get("wall_s") and not row.get("budget"):
            budget.record((row["op"], row["impl"]), row["wall_s"])
    if args.phase == "bench" and not args.dry_run:
        for impl, guess in FIRST_GUESS.items():
            for op in ops:
                budget.last.setdefault((op, impl), guess)
    smoke = args.phase == "smoke"
    units = smoke_units(ops, device) if smoke else bench_units(ops, device, dry=args.dry_run)
    todo = [u for u in units if (u.op, u.case.name, u.impl.name) not in done]
    cpu = device.type == "cpu"
    with open(path, "a", buffering=1) as fh:
        def put(rec):
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

        if not smoke and not any("copy_gbps" in r for r in records):
            put({"copy_gbps": measure_copy_bandwidth(device)})
        if len(todo) < len(units):
            log(f"{args.phase}: a fresh worker goes on with {len(todo)} of {len(units)} rows")
        progress = Progress([u.key for u in todo], stream=stream)
        last = {u.op: i for i, u in enumerate(todo)}
        for i, u in enumerate(todo):
            progress.start(u.key, u.label)
            put({"start": [u.op, u.case.name, u.impl.name]})
            if os.environ.get("FASTADV_GPUCHECK_CRASH_AT") == f"{args.phase}:{u.op}:{u.impl.name}:{u.case.name}":
                os._exit(86)  # a rehearsed crash (tests): the parent must record it and go on
            if smoke:
                row = smoke_unit(u, device, budget=budget)
                bad = row["status"] in ("FAIL", "ERROR")
                if bad:
                    progress.message(f"  {row['status']} {u.label}: {row.get('why')}")
            else:
                extra = getattr(u.case, "row_extra", lambda: {})()
                row = run_unit(u.op, u.case.name, u.impl, device, warmup=5 if not cpu else 2,
                                    iters=50 if not cpu else 5, timed=not cpu, log=progress.message,
                                    extra=extra, trace=log.file, budget=budget, timing_cap_s=TIMING_CAP)
                bad = bool(row.get("error"))
            if row.get("traceback"):
                log.file(row["traceback"])
            fault = _cuda_fault(device) if bad and device.type == "cuda" else None
            if fault:
                row["cuda_fault"] = fault
            put({"row": row, "index": u.index})
            progress.finish(u.key, None if row.get("budget") else row.get("wall_s"))
            if fault:
                progress.close()
                log(f"  CUDA fault after {u.label}: {fault}; this worker stops, a fresh one goes on")
                return 3
            if last[u.op] == i and hasattr(u.module, "release"):
                u.module.release()
        progress.close()
        put({"end": True})
    return 0


def run_phase(phase: str, ops, args, out_dir: Path, deadline: float, t0: float, log, *,
              max_workers: int = 8) -> tuple[list[dict], dict]:
    """Run a phase in worker processes until every row is recorded or the
    deadline passed (a worker still running 30 s after it is killed); the row
    a dead or killed worker had in flight becomes an error row.  Returns the
    rows in the natural order and the phase's other records."""
    path = out_dir / f"{phase}.jsonl"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fastadv", "_gpucheck_worker", "--phase", phase, "--out", str(out_dir),
           "--ops", ",".join(ops), "--deadline", repr(deadline), "--t0", repr(t0)]
    cmd += ["--dry-run"] if args.dry_run else ["--device", str(args.device_resolved)]
    info: dict = {"workers": 0, "faults": []}
    for _ in range(max_workers):
        if time.time() > deadline - 1 and info["workers"]:
            break
        info["workers"] += 1
        try:
            rc = subprocess.run(cmd, timeout=max(5.0, deadline - time.time()) + 30).returncode
            why = None if rc == 0 else ("a CUDA fault" if rc == 3 else f"exit status {rc}")
        except subprocess.TimeoutExpired:
            rc, why = None, "killed: still running 30 s past the phase's deadline (a hung kernel?)"
        records = _read_jsonl(path)
        if any(r.get("end") for r in records):
            break
        finished = {tuple(r["row"][k] for k in ("op", "case", "impl")) for r in records if "row" in r}
        starts = [tuple(r["start"]) for r in records if "start" in r]
        if starts and starts[-1] not in finished:  # the worker died with this row in flight
            op, case, impl = starts[-1]
            row = {"op": op, "case": case, "impl": impl, "ms": None, "gbps": None,
                   "status": "ERROR", "error": f"the worker process died running it ({why})",
                   "why": f"the worker process died running it ({why})"}
            with open(path, "a") as fh:
                fh.write(json.dumps({"row": row, "index": -1}) + "\n")
            log(f"  {phase}: worker {why} while running {op} {case} {impl}")
        info["faults"].append(why or "worker stopped")
        if rc is None:
            break  # killed at the deadline: the phase's time is up
    records = _read_jsonl(path)
    rows = [r for r in records if "row" in r]
    rows.sort(key=lambda r: r.get("index", -1) if r.get("index", -1) >= 0 else 10**9)
    info["copy_gbps"] = next((r["copy_gbps"] for r in records if "copy_gbps" in r), None)
    info["complete"] = any(r.get("end") for r in records)
    return [r["row"] for r in rows], info


def finish_bench(rows: list[dict], info: dict, device, out_dir: Path, budget_s: float, log, *,
                 dry: bool) -> dict:
    cpu = torch.device(device).type == "cpu"
    copy_gbps = info.get("copy_gbps")
    add_derived(rows, copy_gbps, speedups=not cpu)
    log(format_table(rows))
    header = environment(device)
    header["run"] = {"sizes": "real" if real_sizes(device) else "small", "timed": not cpu,
                     "budget_s": budget_s, "by": "gpucheck"}
    path = write_results(rows, out_dir, device, copy_gbps, header=header).resolve()
    log(f"results  {path}")
    png = None
    try:
        png = str(Path(plot(path, path.with_suffix(".png"))).resolve())
        log(f"plot     {png}")
    except NothingToPlot as exc:
        log(f"plot     not drawn: {exc}")
    except ImportError as exc:
        log(f"plot     not drawn: {exc} (pip install matplotlib)")
    failed = [f"{r['op']} {r['case']} {r['impl']}" for r in rows if r.get("check") == "FAIL" or r.get("error")]
    return {"rows": len(rows), "checked_ok": sum(1 for r in rows if r.get("check") == "ok"),
            "failed": failed, "not_run_budget": sum(1 for r in rows if r.get("budget")),
            "skipped": sum(1 for r in rows if r.get("skipped") and not r.get("budget")),
            "complete": info["complete"], "workers": info["workers"], "faults": info["faults"],
            "json": str(path), "png": png}


# --------------------------------------------------------------------------
# the command


def main(args) -> int:
    from fastadv import _env

    dry = bool(args.dry_run)
    if dry:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("gpucheck needs a CUDA device (torch.cuda.is_available() is False); "
                  "rehearse it on CPU with --dry-run", file=sys.stderr)
            return 2
        device = torch.device(args.device) if args.device else torch.device("cuda", torch.cuda.current_device())
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    args.device_resolved = device
    from fastadv import bench

    ops = list(bench.OPS) if args.ops in ("all", "") else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in bench.OPS]
    if unknown:
        print(f"unknown op {unknown[0]!r}; known: {', '.join(bench.OPS)}", file=sys.stderr)
        return 2
    total = args.budget if args.budget is not None else (DEFAULT_BUDGET_DRY if dry else DEFAULT_BUDGET)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    end = t0 + total
    log = Log(out_dir / "gpucheck.log", t0)
    summary: dict = {"dry_run": dry, "budget_s": total, "ops": ops}
    try:
        header = environment(device)
        summary.update({k: header[k] for k in ("device", "commit", "date", "versions")})
        log(f"gpucheck{' (dry run on CPU)' if dry else ''}: budget {total:.0f} s, out {out_dir}")
        log(_env.report())
        if header["commit"] == "unknown":
            log("note: commit unknown (no .git here): pass FASTADV_COMMIT=$(git rev-parse HEAD) from the checkout")
        if dry:
            from fastadv import _backend

            log("note: dry run: CPU tensors, torch backend in every dtype, triton under the interpreter "
                f"(TRITON_INTERPRET={'1' if _backend.triton_interpreter() else 'unset: no triton rows'}); "
                "host syncs counted instead of the sync debug mode; nothing timed")

        # 1. smoke tier
        t = time.time()
        cap = min(SMOKE_MAX, SMOKE_SHARE * total)
        log(f"\n== smoke tier: every backend x dtype x small case, at most {cap:.0f} s")
        rows, info = run_phase("smoke", ops, args, out_dir, t + cap, t0, log)
        (out_dir / "smoke.json").write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
        log(smoke_table(rows))
        bad = [f"{r['op']} {r['case']} {r['impl']}: {r.get('why')}" for r in rows if r["status"] in ("FAIL", "ERROR")]
        summary["smoke"] = {"rows": len(rows), "ok": sum(1 for r in rows if r["status"] == "ok"),
                            "failed": bad, "skipped": sum(1 for r in rows if r["status"] == "skipped"),
                            "not_run_budget": sum(1 for r in rows if r.get("budget")),
                            "complete": info["complete"], "workers": info["workers"], "faults": info["faults"],
                            "seconds": round(time.time() - t, 1)}
        log(f"smoke    {summary['smoke']['ok']} ok, {len(bad)} failed, {summary['smoke']['skipped']} skipped, "
            f"{summary['smoke']['not_run_budget']} not run (budget) in {summary['smoke']['seconds']:.0f} s"
            + ("" if info["complete"] else " (stopped at its deadline)"))

        # 2. pytest -m gpu
        log("\n== pytest -m gpu")
        if args.no_pytest:
            summary["pytest"] = {"status": "skipped", "why": "--no-pytest"}
            log("pytest   skipped (--no-pytest)")
        else:
            share = args.pytest_timeout if args.pytest_timeout is not None else min(PYTEST_MAX, PYTEST_SHARE * total)
            timeout = max(0.0, min(share, end - time.time() - BENCH_MIN - RESERVE))
            summary["pytest"] = run_pytest(out_dir, timeout, log, dry=dry)

        # 3. the bench under what is left
        t = time.time()
        log(f"\n== bench: {end - RESERVE - t:.0f} s left for it")
        rows, info = run_phase("bench", ops, args, out_dir, end - RESERVE, t0, log)
        summary["bench"] = finish_bench(rows, info, device, out_dir, total, log, dry=dry)
        summary["bench"]["seconds"] = round(time.time() - t, 1)
    except Exception as exc:  # still write what we have
        import traceback

        log(f"gpucheck stopped: {type(exc).__name__}: {exc}")
        log.file(traceback.format_exc())
        summary["stopped"] = f"{type(exc).__name__}: {exc}"
    summary["seconds"] = round(time.time() - t0, 1)
    ok = ("stopped" not in summary and not summary.get("smoke", {}).get("failed")
          and summary.get("pytest", {}).get("status") in ("ok", "skipped", "dry-run")
          and not summary.get("bench", {}).get("failed"))
    summary["ok"] = bool(ok)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"\ngpucheck {'ok' if ok else 'FAILED'} in {summary['seconds']:.0f} s (budget {total:.0f} s): "
        f"summary {out_dir / 'summary.json'}, log {out_dir / 'gpucheck.log'}")
    log.close()
    return 0 if ok else 1
