"""AWP save + attack step + restore and EMA update under pytest-benchmark.

Cases: BERT-base and DeBERTa-v3-large parameter shapes in fp32 and bf16 (tiny
models of the same structure on CPU).  Implementations: the seed reference,
``torch.compile`` of it (AWP), and fastadv on every backend usable on the
device (``torch`` is the ``torch._foreach_*`` version).  ``extra_info``
carries launches, syncs, bytes, the perturbed tensors / elements and, on
CUDA, ``peak_extra_mb`` (memory held above the model during the first call).

    pytest benchmarks/test_bench_awp.py --benchmark-only
    pytest benchmarks/test_bench_awp.py --benchmark-only -k "deberta and fp32" --benchmark-json out.json
"""
import pytest
from conftest import DEVICE

from fastadv.bench import awp

PARAMS = [(case, impl.name) for case in awp.cases(DEVICE) for impl in awp.impls(case, DEVICE)]


@pytest.fixture(scope="module", autouse=True)
def _free_case_data():
    yield
    awp.release()


@pytest.mark.parametrize("case,impl", PARAMS,
                         ids=[f"{c.name.replace(' ', '-')}-{i}" for c, i in PARAMS])
def test_awp_and_ema(run_benchmark, case, impl):
    chosen = {i.name: i for i in awp.impls(case, DEVICE)}[impl]
    run_benchmark("awp", case.name, chosen)
