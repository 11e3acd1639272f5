"""pytest-benchmark setup: ``pytest benchmarks --benchmark-only``.

The cases and implementations are those of ``python -m fastadv bench``
(:mod:`fastadv.bench`): real sizes when CUDA is available; on CPU the
smallest size of each op, without ``torch.compile`` (as the CPU main job),
with the Triton kernels under the interpreter (checked, not timed).  Every
result's ``extra_info`` records the device, torch / Triton / CUDA versions,
the git commit, and the counted launches, syncs and bytes.
"""
import collections
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Run from a source checkout without installing.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from fastadv import _backend, kernels  # noqa: E402
from fastadv.bench.case import Impl, Skip  # noqa: E402
from fastadv.bench.count import count  # noqa: E402
from fastadv.bench.report import environment  # noqa: E402
from fastadv.bench.timing import flush_l2, synchronize  # noqa: E402

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
    else torch.device("cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def bench_env():
    """device, date, commit and versions, flattened for ``extra_info``."""
    env = environment(DEVICE)
    versions = env.pop("versions")
    env.update({k: versions[k] for k in ("torch", "triton", "cuda")})
    return env


@pytest.fixture
def run_benchmark(benchmark, bench_env, device):
    """``run_benchmark(op, case_name, impl)``: set up an :class:`Impl`, check
    it against the reference, assert that a fastadv backend ran its own
    kernels, count it, then time its step (synchronised on GPU, L2 flushed
    before each round)."""
    return lambda op, case_name, impl: _run(benchmark, bench_env, op, case_name, impl, device)


def _ran(before: collections.Counter) -> set:
    return {name.split(".")[0] for name, n in kernels.LAUNCHES.items() if n > before[name]}


def _check_and_count(prep, label: str, impl: Impl) -> dict:
    """The check against the reference, then the counts of one step; a
    fastadv backend must have launched its own kernels and no other
    backend's (no silent fallback)."""
    before = collections.Counter(kernels.LAUNCHES)
    if prep.check is not None:
        failure = prep.check()
        assert failure is None, f"{label}: {failure}"
    counts = count(prep.step, prep.design_bytes)
    if impl.name in _backend.BACKENDS:
        ran = _ran(before)
        assert ran == {impl.name}, f"{label}: backend {impl.name} under test, launches seen: {sorted(ran) or 'none'}"
    return counts


def _time(benchmark, prep, counts: dict, device) -> None:
    def timed():
        prep.step()
        synchronize(device)

    cuda = device.type == "cuda"
    benchmark.pedantic(timed, setup=lambda: flush_l2(device), rounds=30 if cuda else 5,
                       warmup_rounds=5 if cuda else 1, iterations=1)
    median = getattr(getattr(getattr(benchmark, "stats", None), "stats", None), "median", None)
    if median and counts["bytes"]:
        benchmark.extra_info["gbps"] = counts["bytes"] / median / 1e9


def _run(benchmark, bench_env, op: str, case_name: str, impl: Impl, device):
    try:
        prep = impl.setup()
    except Skip as exc:
        pytest.skip(str(exc))
    label = f"{op} {case_name} {impl.name}"
    try:
        counts = _check_and_count(prep, label, impl)
        benchmark.extra_info.update(bench_env)
        benchmark.extra_info.update(op=op, case=case_name, impl=impl.name, **prep.extra,
                                    **{k: counts[k] for k in ("launches", "syncs", "bytes")})
        if not prep.timed:
            pytest.skip("checked and counted, not timed here (Triton interpreter)")
        _time(benchmark, prep, counts, device)
    finally:
        if prep.teardown is not None:
            prep.teardown()
