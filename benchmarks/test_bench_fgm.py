"""FGM attack + restore under pytest-benchmark.

Cases: 30522x768, 128100x1024, 250002x1024 in fp32 and bf16, each with the
row-sparse gradient of a 16x512 token batch and a dense gradient (small tables
on CPU).  Implementations: the seed reference, ``torch.compile`` of it, and
fastadv.FGM on every backend usable on the device.

    pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only -k "250002 and fp32" --benchmark-json out.json
"""
import pytest
import torch

from fastadv.bench import fgm

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
    else torch.device("cpu")

PARAMS = [(case, impl.name) for case in fgm.cases(DEVICE) for impl in fgm.impls(case, DEVICE)]


@pytest.fixture(scope="module", autouse=True)
def _free_case_data():
    yield
    fgm.release()


@pytest.mark.parametrize("case,impl", PARAMS,
                         ids=[f"{c.name.replace(' ', '-')}-{i}" for c, i in PARAMS])
def test_fgm_attack_restore(run_benchmark, case, impl):
    chosen = {i.name: i for i in fgm.impls(case, DEVICE)}[impl]
    run_benchmark("fgm", case.name, chosen)
