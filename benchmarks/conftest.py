"""pytest-benchmark setup: ``pytest benchmarks --benchmark-only``.

The cases and implementations are those of ``python -m fastadv bench``
(:mod:`fastadv.bench`): real sizes when CUDA is available, small ones on CPU.
Every result's ``extra_info`` records the device, torch / Triton / CUDA
versions, the git commit, and the counted launches, syncs and bytes.
"""
import os
import sys

import pytest

# Run from a source checkout without installing.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from fastadv.bench import core  # noqa: E402

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
    else torch.device("cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def bench_env():
    """device, date, commit and versions, flattened for ``extra_info``."""
    env = core.environment(DEVICE)
    versions = env.pop("versions")
    env.update({k: versions[k] for k in ("torch", "triton", "cuda")})
    return env


@pytest.fixture
def run_benchmark(benchmark, bench_env, device):
    """``run_benchmark(op, case_name, impl)``: set up a :class:`core.Impl`,
    check it against the reference, count it, then time its step
    (synchronised on GPU, L2 flushed before each round)."""
    return lambda op, case_name, impl: _run(benchmark, bench_env, op, case_name, impl, device)


def _run(benchmark, bench_env, op: str, case_name: str, impl: core.Impl, device):
    try:
        prep = impl.setup()
    except core.Skip as exc:
        pytest.skip(str(exc))
    try:
        if prep.check is not None:
            failure = prep.check()
            assert failure is None, f"{op} {case_name} {impl.name}: {failure}"
        if not prep.timed:
            pytest.skip("not timed here (Triton interpreter); `python -m fastadv bench` checks and counts it")
        counts = core.count(prep.step, prep.design_bytes)
        benchmark.extra_info.update(bench_env)
        benchmark.extra_info.update(op=op, case=case_name, impl=impl.name, **prep.extra,
                                    **{k: counts[k] for k in ("launches", "syncs", "bytes")})

        def timed():
            prep.step()
            core.synchronize(device)

        cuda = device.type == "cuda"
        benchmark.pedantic(timed, setup=lambda: core.flush_l2(device), rounds=30 if cuda else 5,
                           warmup_rounds=5 if cuda else 1, iterations=1)
        stats = getattr(benchmark, "stats", None)
        median = getattr(getattr(stats, "stats", None), "median", None)
        if median and counts["bytes"]:
            benchmark.extra_info["gbps"] = counts["bytes"] / median / 1e9
    finally:
        if prep.teardown is not None:
            prep.teardown()
