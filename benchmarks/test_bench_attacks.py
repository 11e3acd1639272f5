"""One input-attack step (PGD, PGD-L2, MI-FGSM) under pytest-benchmark.

Cases: a 256x3x224x224 batch in fp32 and bf16 (8x3x32x32 on CPU).
Implementations: torchattacks' lines for one step (``reference``),
``torch.compile`` of them, and fastadv.ops.attacks on every backend usable on
the device.

    pytest benchmarks/test_bench_attacks.py --benchmark-only
    pytest benchmarks/test_bench_attacks.py --benchmark-only -k "pgd and fp32" --benchmark-json out.json
"""
import pytest
from conftest import DEVICE

from fastadv.bench import attacks

PARAMS = [(case, impl.name) for case in attacks.cases(DEVICE) for impl in attacks.impls(case, DEVICE)]


@pytest.fixture(scope="module", autouse=True)
def _free_case_data():
    yield
    attacks.release()


@pytest.mark.parametrize("case,impl", PARAMS,
                         ids=[f"{c.name.replace(' ', '-')}-{i}" for c, i in PARAMS])
def test_attack_step(run_benchmark, case, impl):
    chosen = {i.name: i for i in attacks.impls(case, DEVICE)}[impl]
    run_benchmark("attacks", case.name, chosen)
