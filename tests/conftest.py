"""Test setup: the Triton kernels run on CPU under the interpreter when there is
no GPU (TRITON_INTERPRET must be set before triton is imported)."""
import collections
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # The interpreter re-patches triton.language on every jit-helper call (~10 ms
    # each); skip the repeats that would change nothing (see the module's docstring).
    import triton_interpreter_fast_calls  # noqa: E402  (tests/ is on sys.path)
    triton_interpreter_fast_calls.install()  # False (nothing changed) on another Triton

from fastadv import _backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def usable_backends(device=DEVICE):
    return [b for b, why in _backend.usable(device).items() if why is None]


@pytest.fixture(params=_backend.BACKENDS)
def backend(request):
    """Every backend; the ones that cannot run here are skipped with the reason.

    After the test it checks that the backend under test really ran: at least
    one launch counted under its name (``triton.*``, ``cuda.*`` or ``torch.*``
    in :data:`fastadv.kernels.LAUNCHES`) and none under another backend's, so
    a silent fallback fails the test.  A test that only checks a refusal (so
    nothing launches) is marked ``@pytest.mark.launch_free``."""
    why = _backend.why_not(request.param, DEVICE)
    if why is not None:
        pytest.skip(f"{request.param} backend unavailable: {why}")
    import fastadv.kernels as kernels
    before = collections.Counter(kernels.LAUNCHES)
    yield request.param
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.passed or request.node.get_closest_marker("launch_free"):
        return
    ran = {name.split(".")[0] for name, n in kernels.LAUNCHES.items() if n > before[name]}
    assert request.param in ran, (f"backend {request.param!r} was under test but launched nothing "
                                  f"(launches seen: {sorted(ran) or 'none'}): a silent fallback?")
    assert ran <= {request.param}, (f"backend {request.param!r} was under test but "
                                    f"{sorted(ran - {request.param})} also ran")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (the backend fixture reads rep_call)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--triton-compile", action="store_true",
                     help="also AOT-compile every Triton kernel for sm_90 / sm_80 "
                          "(tests/test_triton_compile.py; on by default in CI, CI=true)")


def pytest_configure(config):
    """With the AOT compile check on, record this session's Triton launches from
    the start, so that the check reuses them instead of running the suite again."""
    import test_triton_compile as tc
    config._triton_recorder = None
    if (tc.enabled(config) and _backend.triton_interpreter() and os.environ.get(tc._CHILD_ENV) != "1"
            and _backend.why_not("triton", torch.device("cpu")) is None):
        config._triton_recorder = tc.SessionRecorder()


def pytest_collection_modifyitems(config, items):
    recorder = getattr(config, "_triton_recorder", None)
    if recorder is not None:  # the compile check runs last, after every launch was recorded
        recorder.files = {str(item.path.relative_to(item.config.rootpath)) for item in items}
        items.sort(key=lambda item: item.path.name == "test_triton_compile.py")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (mark gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_deselected(items):
    recorder = getattr(items[0].config, "_triton_recorder", None) if items else None
    if recorder is not None:
        recorder.partial = True


def pytest_terminal_summary(terminalreporter):
    """Skips grouped by reason, one line each (``-rs`` would print one per test location)."""
    reasons = collections.Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped, by reason")
        for reason, n in reasons.most_common():
            terminalreporter.write_line(f"{n:5d}  {reason}")


# aten ops that read device data back to the host.
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero",
    "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
    "repeat_interleave", "bincount", "histc",
})


@pytest.fixture
def no_host_sync():
    """Context manager factory failing if the block makes a host sync: on any
    device a scalar read (aten::_local_scalar_dense) or an op whose output size
    depends on the data (nonzero, masked_select, unique, ...); on CUDA also
    whatever torch.cuda.set_sync_debug_mode("error") catches."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in SYNCING_OPS:
                self.syncs.append(func)
            return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def watch():
        mode = _Watch()
        prev = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else None
        if prev is not None:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with mode:
                yield mode
        finally:
            if prev is not None:
                torch.cuda.set_sync_debug_mode(prev)
        assert not mode.syncs, f"{len(mode.syncs)} host sync(s): {sorted({str(f) for f in mode.syncs})}"

    return watch


# -- shared by the kernel tests ------------------------------------------------


def launches_total() -> int:
    """fastadv kernel launches so far (Triton and CUDA)."""
    import fastadv.kernels as kernels
    return sum(kernels.LAUNCHES.values())


def record_guards(monkeypatch, module):
    """Replace ``module.device_guard`` by a recorder of the devices it is entered
    for and the kernel launches made inside it (Triton launches on the current
    device: every launch must run under the guard of its tensors' device)."""
    import contextlib
    seen = {"devices": [], "inside": 0}
    real = module.device_guard

    @contextlib.contextmanager
    def guard(t):
        seen["devices"].append(t.device)
        before = launches_total()
        with real(t):
            yield
        seen["inside"] += launches_total() - before

    monkeypatch.setattr(module, "device_guard", guard)
    return seen


def odd_or_aligned(n, odd, dtype=torch.float32):
    """``n`` random elements; ``odd``: at an address that is not a multiple of 16 bytes."""
    t = torch.randn(n + 1, device=DEVICE, dtype=dtype)[1:] if odd else torch.randn(n, device=DEVICE, dtype=dtype)
    assert (t.data_ptr() % 16 != 0) == odd
    return t
