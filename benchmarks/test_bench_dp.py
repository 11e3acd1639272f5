"""DP-SGD under pytest-benchmark: fastadv's fused clip + noise against Opacus.

Cases (see :mod:`fastadv.bench.dp`): the privacy work of one step
(``DPOptimizer.pre_step`` on given per-sample gradients) for ResNet-18 and
BERT-last-layers shapes at B = 32 and 64, and a whole DP-SGD step of a
ResNet-18 (non-private, Opacus, Opacus hooks + fastadv optimizer); small
sizes on CPU.

    pytest benchmarks/test_bench_dp.py --benchmark-only
    python -m fastadv bench --ops dp      # the same cases, table + results JSON
"""
import pytest
import torch

from fastadv.bench import dp

pytest.importorskip("opacus")

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
    else torch.device("cpu")

PARAMS = [(case, impl.name) for case in dp.cases(DEVICE) for impl in dp.impls(case, DEVICE)]


@pytest.fixture(scope="module", autouse=True)
def _free_case_data():
    yield
    dp.release()


@pytest.mark.parametrize("case,impl", PARAMS,
                         ids=[f"{c.name.replace(' ', '-')}-{i}" for c, i in PARAMS])
def test_dp(run_benchmark, case, impl):
    chosen = {i.name: i for i in dp.impls(case, DEVICE)}[impl]
    run_benchmark("dp", case.name, chosen)
