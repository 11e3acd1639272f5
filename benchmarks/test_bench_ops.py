"""Every case of ``python -m fastadv bench`` under pytest-benchmark, one test
per (op, case, implementation) of the ops registered in
:data:`fastadv.bench.OPS` (a new op module is picked up without a file here).

On a GPU: every case at the sizes users meet and every implementation
(``torch.compile`` included).  On CPU: the smallest size of each op, without
``torch.compile``, so ``pytest benchmarks -q --benchmark-disable`` is a quick
correctness run (every implementation checked against the reference).

    pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only -k "fgm and 250002 and fp32" --benchmark-json out.json
"""
import pytest
from conftest import DEVICE

from fastadv import bench
from fastadv.bench.case import units_of

CPU = DEVICE.type == "cpu"


def _units() -> list:
    units = []
    for op in bench.OPS:
        units += units_of(op, bench.load(op), DEVICE, quick=CPU, exclude=("compiled",) if CPU else ())
    return units


UNITS = _units()


@pytest.fixture(scope="module", autouse=True)
def _free_case_data():
    yield
    for op in bench.OPS:
        release = getattr(bench.load(op), "release", None)
        if release:
            release()


@pytest.mark.parametrize("unit", UNITS, ids=[f"{u.op}-{u.case.name}-{u.impl.name}".replace(" ", "-")
                                             for u in UNITS])
def test_op(run_benchmark, unit):
    run_benchmark(unit.op, unit.case.name, unit.impl)
