"""Every Triton kernel of the package compiles for real GPU targets (no GPU needed).

The other tests run the Triton kernels under the interpreter (TRITON_INTERPRET=1), which
executes the Python source with NumPy and hides the errors only the compiler sees (a
value that is int32 in one branch and int64 in the other, a constexpr misuse, a type
that only exists on the device...). This test compiles the kernels for sm_90 and sm_80
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which needs
Triton's bundled LLVM and ptxas but no GPU.

Nothing here is written per kernel, so it cannot silently go stale:

1. record (WITH TRITON_INTERPRET=1, on CPU): ``InterpretedFunction.run``
   (every ``kernel[grid](...)`` launch under the interpreter) is wrapped to record the
   kernel (module + qualified name), the launch's specialisation exactly as the JIT would
   compute it on a GPU (Triton's own binder: tensor -> "*fp32"/"*bf16"/"*u8"/..., int ->
   "i32"/"i64"/"u64" by value, 1 -> constexpr, float -> "fp32", bool -> "u1", plus the
   16-divisibility attributes), the constexpr values and the launch's compile options
   (num_warps, enable_fp_fusion, ...). ``InterpretedFunction.__call__`` (a @triton.jit
   helper called from a kernel) is wrapped to record which helpers the launches reach.
   The launches are driven by the existing test files (tests/test_*.py). When this test
   runs at the end of a whole-suite session (CI, or ``--triton-compile``), the recorder was
   installed in-process at the start of the session (tests/conftest.py), so the suite's own
   launches are used and nothing is run twice; run alone or with a partial selection, it
   re-runs the driving tests (Triton parametrisations and backend-free tests) in
   subprocesses.
2. compile (subprocesses WITHOUT TRITON_INTERPRET): the same kernel objects, now real
   JITFunctions, are compiled for every unique recorded specialisation for sm_90 and
   sm_80, and once more for sm_90 with the data pointers switched to *bf16 (the
   interpreter has no bf16 arithmetic, so the tests launch fp32/fp16, while GPU users run
   bf16). The data pointers are those some test launched with fp16 tensors; for a kernel
   no test launches in fp16, the fp32 pointers except the buffers fastadv allocates as
   float32 whatever the data (``dtype=torch.float32`` spelled at the allocation, or
   ``.float()``), which the recorder tracks. Each failure names the pointers it kept fp32.
3. coverage: every @triton.jit function defined in fastadv/kernels/triton/*.py must be
   launched (and so compiled) or called from a launched kernel (so compiled inlined into
   it); a kernel no test launches is reported.

It is slow (minutes on 2 cores), so it runs in CI (``CI=true``) or when asked:
              python -m pytest --triton-compile          (the whole suite, recorded in-process)
              python -m pytest tests/test_triton_compile.py --triton-compile   (re-runs drivers)
Env knobs:    FASTADV_COMPILE_JOBS (processes per phase, default: CPU count, at most 4),
              FASTADV_COMPILE_ARCHS (default "90,80").
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
_CHILD_ENV = "FASTADV_TRITON_COMPILE_CHILD"

# Test files that cannot drive in-process Triton launches: the references (pure torch),
# the benchmark CLI (launches happen in subprocesses the recorder cannot see) and this file.
_NOT_DRIVERS = {"test_reference.py", "test_bench.py", THIS.name}

# @triton.jit functions allowed to be neither launched nor called from a launched kernel,
# name -> reason. Keep empty: a kernel no test launches is an untested kernel.
UNLAUNCHED_OK: dict[str, str] = {}

ARCHS = [int(a) for a in os.environ.get("FASTADV_COMPILE_ARCHS", "90,80").split(",") if a.strip()]
BF16_ARCH = 90
_FLOAT_PTRS = ("*fp32", "*fp16")


def _jobs() -> int:
    env = os.environ.get("FASTADV_COMPILE_JOBS")
    if env:
        return max(1, int(env))
    return max(1, min(4, os.cpu_count() or 1))


# =============================================================================================
# phase 1: record launches under the interpreter (runs in a child process)


def _encode(v):
    """JSON form of a constexpr value / compile option; raises on what cannot be rebuilt."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    import triton.language as tl

    if isinstance(v, tl.constexpr):
        return _encode(v.value)
    if isinstance(v, tl.dtype):
        return {"tl.dtype": str(v)}
    if isinstance(v, (tuple, list)):
        return {"tuple": [_encode(x) for x in v]}
    raise TypeError(f"cannot record a value of type {type(v).__name__}: {v!r}")


def _decode(v):
    if isinstance(v, dict):
        if "tl.dtype" in v:
            import triton.language as tl

            return getattr(tl, v["tl.dtype"])
        if "tuple" in v:
            return tuple(_decode(x) for x in v["tuple"])
    return v


_SOURCES: dict = {}


def _call_source(frame) -> str:
    """The source text of the call ``frame`` is executing (the whole line before 3.11)."""
    import itertools
    import linecache

    code, at = frame.f_code, frame.f_lasti
    if (code, at) not in _SOURCES:
        try:
            l0, l1, c0, c1 = next(itertools.islice(code.co_positions(), at // 2, None))
            lines = [linecache.getline(code.co_filename, i) for i in range(l0, l1 + 1)]
            lines[-1] = lines[-1][:c1]
            lines[0] = lines[0][c0:]
            _SOURCES[code, at] = "".join(lines)
        except Exception:  # noqa: BLE001 - no positions: the line
            _SOURCES[code, at] = linecache.getline(code.co_filename, frame.f_lineno)
    return _SOURCES[code, at]


def _track_fp32_buffers(fixed: dict) -> None:
    """Remember the tensors fastadv itself creates as float32 whatever the data's dtype
    (partials, norms, coefficient buffers, fp32 master copies): a factory call or ``.to``
    from fastadv code spelling ``float32`` (``dtype=torch.float32``, not ``dtype=x.dtype``), or
    ``.float()``. Those stay float32 on a GPU when the data is bf16; every other float
    pointer follows the data."""
    import weakref

    import torch

    def mark(t, literal: bool):
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32):
            return t
        frame = sys._getframe(2)  # the caller of the wrapped torch function
        mod = frame.f_globals.get("__name__", "")
        if not mod.startswith("fastadv.") or mod.startswith(("fastadv.bench", "fastadv.reference")):
            return t  # test, benchmark or reference data: follows the data
        if literal and "float32" not in _call_source(frame):
            return t  # dtype=x.dtype and the like: follows the data
        try:
            fixed[t.untyped_storage().data_ptr()] = weakref.ref(t)
        except Exception:  # noqa: BLE001 - tracking is best effort
            pass
        return t

    def factory(f):
        def wrapped(*args, **kwargs):
            return mark(f(*args, **kwargs), True)
        return wrapped

    def to_float(f):
        def wrapped(self, *args, **kwargs):
            return mark(f(self, *args, **kwargs), False)
        return wrapped

    for name in ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like",
                 "full_like", "tensor", "randn", "rand", "empty_strided", "arange"):
        setattr(torch, name, factory(getattr(torch, name)))
    for name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "to"):
        setattr(torch.Tensor, name, factory(getattr(torch.Tensor, name)))
    torch.Tensor.float = to_float(torch.Tensor.float)


def _install_recorder(records: dict, helpers: set, data32: dict, errors: set):
    import inspect
    import threading

    import torch
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import interpreter
    from triton.runtime.jit import KernelParam, create_function_from_signature

    fixed: dict = {}
    _track_fp32_buffers(fixed)
    binders = {}
    state = threading.local()
    orig_run = interpreter.InterpretedFunction.run
    orig_call = interpreter.InterpretedFunction.__call__

    def fp32_by_design(t) -> bool:
        key = t.untyped_storage().data_ptr()
        ref = fixed.get(key)
        alive = ref() if ref is not None else None
        return alive is not None and alive.untyped_storage().data_ptr() == key

    def binder_of(self):
        fn = self.fn
        if fn not in binders:
            sig = inspect.signature(fn)
            dns = self.kwargs.get("do_not_specialize") or []
            dna = self.kwargs.get("do_not_specialize_on_alignment") or []
            params = [KernelParam(i, p, i in dns or p.name in dns, i in dna or p.name in dna)
                      for i, p in enumerate(sig.parameters.values())]
            # the JIT's own binder, with the CUDA backend's specialisation rules
            binders[fn] = (create_function_from_signature(sig, params, CUDABackend),
                           [p.name for p in params])
        return binders[fn]

    def record(self, args, kwargs):
        fn = self.fn
        name = f"{fn.__module__}.{fn.__qualname__}"
        binder, names = binder_of(self)
        bound, spec, extra = binder(*args, **kwargs)
        sig, attrs, constexprs = [], [], {}
        seen32 = data32.setdefault(name, {"fp32": set(), "fixed": set()})
        for pname, s in zip(names, spec):
            ty, attr = s[0], s[1]
            if not isinstance(ty, str):
                raise TypeError(f"{name}: tuple argument {pname!r} is not supported by the recorder")
            sig.append(ty)
            if ty == "constexpr":
                constexprs[pname] = _encode(bound[pname])
                attrs.append(None)
            else:
                attrs.append(attr if isinstance(attr, str) else None)
                v = bound[pname]
                if ty == "*fp32" and isinstance(v, torch.Tensor):
                    seen32["fixed" if fp32_by_design(v) else "fp32"].add(pname)
        options = {}
        if self.kwargs.get("debug") is not None:
            options["debug"] = bool(self.kwargs["debug"])
        for k, v in extra.items():  # launch kwargs that are not kernel parameters
            options[k] = _encode(v)
        rec = {"kernel": name, "module": fn.__module__, "qualname": fn.__qualname__,
               "params": names, "signature": sig, "attrs": attrs, "constexprs": constexprs,
               "options": options}
        key = json.dumps(rec, sort_keys=True)
        if key not in records:
            rec["test"] = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
            records[key] = rec
        return name

    def run(self, *args, grid, warmup, **kwargs):
        try:
            state.launch = record(self, args, kwargs)
        except Exception as e:  # noqa: BLE001 - reported by the test; the launch still runs
            state.launch = f"{self.fn.__module__}.{self.fn.__qualname__}"
            errors.add(f"{state.launch}: {type(e).__name__}: {e}")
        try:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            state.launch = None

    def call(self, *args, **kwargs):  # a @triton.jit helper called from a kernel
        if getattr(state, "launch", None) is not None:
            helpers.add(f"{self.fn.__module__}.{self.fn.__qualname__}")
        return orig_call(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    interpreter.InterpretedFunction.__call__ = call


class SessionRecorder:
    """The recorder installed in the main pytest session (see tests/conftest.py): the
    suite's own Triton launches, usable by the test when the session ran every driver."""

    def __init__(self):
        self.records: dict = {}
        self.helpers: set = set()
        self.data32: dict = {}
        self.errors: set = set()
        self.files: set[str] = set()   # test files collected in this session
        self.partial = False           # some items deselected (-k, -m, --lf ...)
        _install_recorder(self.records, self.helpers, self.data32, self.errors)

    def covers(self, files: list[str]) -> bool:
        return not self.partial and set(files) <= self.files

    def dump(self) -> dict:
        # fastadv's kernels only: a test may define a @triton.jit of its own (test_bench.py
        # does), which cannot be re-imported by name for compilation
        return {"records": [r for r in self.records.values() if r["module"].startswith("fastadv.")],
                "helpers": sorted(h for h in self.helpers if h.startswith("fastadv.")),
                "data32": {k: {a: sorted(b) for a, b in v.items()} for k, v in self.data32.items()},
                "errors": sorted(e for e in self.errors if e.startswith("fastadv.")), "pytest_rc": 0}


def enabled(config) -> bool:
    """The AOT compile check runs in CI (CI=true) or with --triton-compile."""
    return bool(config.getoption("--triton-compile")) or os.environ.get("CI", "").lower() == "true"


def _record_main(out: str, shard: int, nshards: int, files: list[str]) -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    records: dict = {}
    helpers: set = set()
    data32: dict = {}
    errors: set = set()
    _install_recorder(records, helpers, data32, errors)

    class _Select:
        """Triton parametrisations and backend-free tests; every nshards-th of them."""

        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(self, config, items):
            keep, drop = [], []
            for item in items:
                cs = getattr(item, "callspec", None)
                be = cs.params.get("backend") if cs is not None else None
                (keep if be in (None, "triton") else drop).append(item)
            mine = keep[shard::nshards]
            ids = {id(it) for it in mine}
            drop += [it for it in keep if id(it) not in ids]
            items[:] = mine
            config.hook.pytest_deselected(items=drop)

    rc = pytest.main([*files, "-q", "--no-header", "-p", "no:cacheprovider", "-W", "ignore",
                      "-o", "addopts=", "--tb=line"], plugins=[_Select()])
    with open(out, "w") as f:
        json.dump({"records": list(records.values()), "helpers": sorted(helpers),
                   "data32": {k: {a: sorted(b) for a, b in v.items()} for k, v in data32.items()},
                   "errors": sorted(errors), "pytest_rc": int(rc)}, f)
    return 0


# =============================================================================================
# phase 2: compile for real targets (runs in a child process, no interpreter)


def _compile_main(inp: str, out: str, shard: int, nshards: int) -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    jobs = json.load(open(inp))[shard::nshards]
    results = []
    for job in jobs:
        t0 = time.perf_counter()
        err = None
        try:
            fn = _unwrap(getattr(importlib.import_module(job["module"]), job["qualname"]))
            if not isinstance(fn, JITFunction):
                raise TypeError(f"{job['kernel']} is a {type(fn).__name__}, not a JITFunction")
            target = GPUTarget("cuda", job["arch"], 32)
            backend = make_backend(target)
            signature = dict(zip(job["params"], job["signature"]))
            constexprs = {(job["params"].index(k),): _decode(v) for k, v in job["constexprs"].items()}
            attrs = {(i,): backend.parse_attr(a) for i, a in enumerate(job["attrs"]) if a}
            options = {k: _decode(v) for k, v in job["options"].items()}
            triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
        except Exception as e:  # noqa: BLE001 - every failure is reported with its kernel
            err = _error_text(e)
        results.append({"id": job["id"], "error": err, "seconds": time.perf_counter() - t0})
        print(f"compiled {len(results)}/{len(jobs)}", flush=True)  # read by the parent for progress
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


def _unwrap(obj):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def _error_text(e: BaseException) -> str:
    """The error and its causes (a CompilationError at a call site wraps the callee's)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}".rstrip())
        e = e.__cause__ or e.__context__
    return "\n  caused by ".join(parts)


def _defined_kernels() -> dict[str, str]:
    """module.qualname -> file:line of every @triton.jit function of fastadv/kernels/triton."""
    import inspect
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fastadv.kernels.triton as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for attr in map(_unwrap, vars(mod).values()):
            if isinstance(attr, JITFunction) and attr.fn.__module__ == mod.__name__:
                line = inspect.getsourcelines(attr.fn)[1]
                found[f"{mod.__name__}.{attr.fn.__qualname__}"] = f"{Path(mod.__file__).name}:{line}"
    return found


def _kernels_main(out: str) -> int:
    with open(out, "w") as f:
        json.dump(_defined_kernels(), f)
    return 0


# =============================================================================================
# the test


def _child_env(interpret: bool) -> dict:
    env = dict(os.environ)
    env[_CHILD_ENV] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton < 3.10's default, said explicitly
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the drivers run on CPU tensors, GPU machine or not
    return env


def _spawn(args: list[str], interpret: bool, log: Path):
    fh = open(log, "w")
    p = subprocess.Popen([sys.executable, str(THIS), *args], cwd=ROOT, env=_child_env(interpret),
                         stdout=fh, stderr=subprocess.STDOUT)
    return p, fh


def _say(msg: str) -> None:
    """Progress on the terminal, past pytest's capture."""
    print(f"[triton AOT compile] {msg}", file=sys.__stderr__, flush=True)


def _progress(procs, what: str, total: int | None, timeout: float) -> None:
    """Print how far the children are every 20 s while they run."""
    deadline, t0, last = time.monotonic() + timeout, time.monotonic(), 0.0
    while any(p.poll() is None for (p, _), _ in procs) and time.monotonic() < deadline:
        time.sleep(1.0)
        if total and time.monotonic() - last >= 20:
            last = time.monotonic()
            done = sum(log.read_text().count("compiled ") for _, log in procs if log.exists())
            rate = done / max(last - t0, 1e-9)
            eta = f", ~{(total - done) / rate:.0f} s left" if done else ""
            _say(f"{what}: {done}/{total} after {last - t0:.0f} s{eta}")


def _wait(procs, what: str, timeout: float, total: int | None = None):
    _progress(procs, what, total, timeout)
    deadline = time.monotonic() + timeout
    for (p, fh), log in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for (q, _), _ in procs:
                if q.poll() is None:
                    q.kill()
            pytest.fail(f"{what} timed out after {timeout:.0f} s; log:\n{log.read_text()[-4000:]}")
        finally:
            fh.close()
        if p.returncode != 0:
            pytest.fail(f"{what} failed (rc={p.returncode}); log:\n{log.read_text()[-6000:]}")


def _half_evidence(records: list[dict]) -> dict[str, set[int]]:
    """kernel -> argument positions some test launched with a half-precision tensor."""
    ev: dict[str, set[int]] = {}
    for r in records:
        ev.setdefault(r["kernel"], set()).update(
            i for i, t in enumerate(r["signature"]) if t in ("*fp16", "*bf16"))
    return ev


def _bf16_variant(rec: dict, evidence: set[int], data32: set[str]):
    """The launch as a bf16 model runs it. The data pointers are the positions some test
    launched with a half-precision tensor when there is such a launch; otherwise the fp32
    pointers that were never a buffer fastadv allocates as float32 by design."""
    sig = list(rec["signature"])
    for i, (name, t) in enumerate(zip(rec["params"], sig)):
        if t in _FLOAT_PTRS and (i in evidence if evidence else name in data32):
            sig[i] = "*bf16"
    if sig == rec["signature"]:
        return None, ""
    kept = [n for n, t in zip(rec["params"], sig) if t in _FLOAT_PTRS]
    how = "the fp16 launches' data pointers" if evidence else "data pointers by allocation"
    return sig, f" with *bf16 data ({how}; kept float32: {', '.join(kept) or 'none'})"


def _fmt(rec: dict, sig: list[str]) -> str:
    args = ", ".join(f"{n}: {t}" + (f"[{a}]" if a else "")
                     for n, t, a in zip(rec["params"], sig, rec["attrs"]) if t != "constexpr")
    return (f"({args}) constexprs={rec['constexprs']} options={rec['options']}"
            f"\n      launched by {rec['test']}")


@pytest.mark.skipif(os.environ.get(_CHILD_ENV) == "1", reason="inside the recorder")
def test_every_triton_kernel_compiles_for_sm90_and_sm80(tmp_path, request):
    if not enabled(request.config):
        pytest.skip("the AOT compile check runs in CI (CI=true) or with --triton-compile")
    pytest.importorskip("triton")
    try:  # the APIs the recorder and the compiler use (Triton >= 3.3)
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import KernelParam, create_function_from_signature  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton lacks an API the AOT compile check needs: {e}")

    t_start = time.monotonic()
    n = _jobs()
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if p.name not in _NOT_DRIVERS)

    # ---- phase 1: record (plus, alongside, the list of defined kernels)
    session = getattr(request.config, "_triton_recorder", None)
    procs = []
    if session is not None and session.covers(files):
        _say(f"using the {len(session.records)} launch specialisations this session recorded")
        (tmp_path / "rec0.json").write_text(json.dumps(session.dump()))
        shards = 1
    else:
        why = "no session recorder" if session is None else "this session ran only part of the suite"
        _say(f"recording launches by re-running {len(files)} test files in {n} processes ({why})")
        shards = n
        for i in range(n):
            log = tmp_path / f"record{i}.log"
            procs.append((_spawn(["record", str(tmp_path / f"rec{i}.json"), str(i), str(n), *files],
                                 True, log), log))
    log = tmp_path / "kernels.log"
    procs.append((_spawn(["kernels", str(tmp_path / "kernels.json")], False, log), log))
    _wait(procs, "recording Triton launches", 900)
    t_record = time.monotonic() - t_start

    records, helpers, pytest_rcs, data32, rec_errors = {}, set(), [], {}, set()
    for i in range(shards):
        d = json.load(open(tmp_path / f"rec{i}.json"))
        pytest_rcs.append(d["pytest_rc"])
        rec_errors.update(d["errors"])
        helpers.update(d["helpers"])
        for k, v in d["data32"].items():
            seen32 = data32.setdefault(k, {"fp32": set(), "fixed": set()})
            seen32["fp32"].update(v["fp32"])
            seen32["fixed"].update(v["fixed"])
        for r in d["records"]:
            key = json.dumps({k: v for k, v in r.items() if k != "test"}, sort_keys=True)
            records.setdefault(key, r)
    records = list(records.values())
    defined = json.load(open(tmp_path / "kernels.json"))
    # pytest rc 0 (passed) or 1 (some tests failed: other tests report those) only
    assert all(rc in (0, 1) for rc in pytest_rcs), \
        f"the driving test run did not complete (pytest rc {pytest_rcs}); see {tmp_path}"
    assert not rec_errors, "launches the recorder could not describe:\n" + "\n".join(sorted(rec_errors))
    assert records, "no Triton launch was recorded"

    # ---- phase 2: compile each unique specialisation for sm_90 as recorded; for the other
    # archs and the bf16 variant, one per kernel/types/constexprs/options (the divisibility
    # attributes only change vectorisation)
    evidence = _half_evidence(records)
    jobs, seen = [], set()
    for r in records:
        variants = [(arch, r["signature"], "") for arch in ARCHS]
        if BF16_ARCH in ARCHS:
            seen32 = data32[r["kernel"]]  # fp32 pointers fastadv never allocated as float32 itself
            bf, note = _bf16_variant(r, evidence[r["kernel"]], seen32["fp32"] - seen32["fixed"])
            if bf is not None:
                variants.append((BF16_ARCH, bf, note))
        for arch, sig, note in variants:
            exact = arch == ARCHS[0] and not note
            key = json.dumps([r["kernel"], arch, sig, r["attrs"] if exact else None,
                              r["constexprs"], r["options"]], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            jobs.append({**{k: r[k] for k in ("kernel", "module", "qualname", "params", "attrs",
                                               "constexprs", "options")},
                         "signature": sig, "arch": arch, "note": note, "id": len(jobs),
                         "desc": _fmt(r, sig)})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    _say(f"compiling {len(jobs)} specialisations in {n} processes")
    procs = []
    for i in range(n):
        log = tmp_path / f"compile{i}.log"
        procs.append((_spawn(["compile", str(tmp_path / "jobs.json"), str(tmp_path / f"res{i}.json"),
                              str(i), str(n)], False, log), log))
    _wait(procs, "compiling Triton kernels", 900, total=len(jobs))
    results = {}
    for i in range(n):
        for r in json.load(open(tmp_path / f"res{i}.json")):
            results[r["id"]] = r
    assert len(results) == len(jobs)

    # ---- report
    groups: dict[tuple[str, str], list[dict]] = {}  # one entry per kernel and error text
    for job in jobs:
        err = results[job["id"]]["error"]
        if err is not None:
            groups.setdefault((job["kernel"], err), []).append(job)
    failures = []
    for (kernel, err), failed in groups.items():
        shown = "\n".join(f"    sm_{j['arch']}{j['note']}\n      {j['desc']}" for j in failed[:4])
        more = f"\n    ... and {len(failed) - 4} more" if len(failed) > 4 else ""
        failures.append(f"{kernel}: {len(failed)} specialisation(s) fail to compile, e.g.\n"
                        f"{shown}{more}\n  Triton says:\n{_indent(err[:3000])}")
    launched = {r["kernel"] for r in records}
    missing = {k: where for k, where in defined.items()
               if k not in launched and k not in helpers and k not in UNLAUNCHED_OK}
    unknown = sorted(k for k in launched if k.startswith("fastadv.") and k not in defined)

    elapsed = time.monotonic() - t_start
    summary = (f"{len(records)} launch specialisations of {len(launched)} kernels "
               f"({len(helpers)} helpers reached), {len(jobs)} compilations for sm_"
               f"{', sm_'.join(map(str, ARCHS))} (+bf16 on sm_{BF16_ARCH}); record {t_record:.0f} s, "
               f"total {elapsed:.0f} s, {n} processes; details in {tmp_path}")
    print(summary)
    msgs = []
    if failures:
        n_failed = sum(len(v) for v in groups.values())
        msgs.append(f"{n_failed} of {len(jobs)} compilations FAILED in "
                    f"{len({k for k, _ in groups})} kernel(s):\n\n" + "\n\n".join(failures))
    if missing:
        msgs.append("@triton.jit functions never launched by a test nor called from a launched kernel "
                    "(add a test that launches them):\n"
                    + "\n".join(f"  {k} ({where})" for k, where in sorted(missing.items())))
    if unknown:
        msgs.append(f"launched kernels not found in fastadv/kernels/triton: {unknown}")
    assert not msgs, summary + "\n\n" + "\n\n".join(msgs)


def _indent(s: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in s.splitlines())


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "record":
        sys.exit(_record_main(rest[0], int(rest[1]), int(rest[2]), rest[3:]))
    if mode == "compile":
        sys.exit(_compile_main(rest[0], rest[1], int(rest[2]), int(rest[3])))
    if mode == "kernels":
        sys.exit(_kernels_main(rest[0]))
    raise SystemExit(f"unknown mode {mode!r}")
