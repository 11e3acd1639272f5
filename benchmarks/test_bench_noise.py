"""Noise injection and SiFT under pytest-benchmark.

Cases (real sizes when CUDA is available, small stand-ins on CPU): Gaussian
noise out of place and in place on 16x512x768 activations and 30522x768 /
250002x1024 tables, NEFTune with a mask on 16x512x768 and 8x2048x4096, the
seed's token-id noise, weight_noise enter + exit over BERT-base and
BERT-large parameter shapes, one SiFT step; fp32 and bf16.  Implementations:
the seed reference, ``torch.compile`` of it (element-wise ops), and fastadv on
every backend usable on the device.

    pytest benchmarks/test_bench_noise.py --benchmark-only
    pytest benchmarks/test_bench_noise.py --benchmark-only -k "weight_noise and bf16"
"""
import pytest
import torch

from fastadv.bench import noise

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
    else torch.device("cpu")

PARAMS = [(case, impl.name) for case in noise.cases(DEVICE) for impl in noise.impls(case, DEVICE)]


@pytest.fixture(scope="module", autouse=True)
def _free_case_data():
    yield
    noise.release()


@pytest.mark.parametrize("case,impl", PARAMS,
                         ids=[f"{c.name.replace(' ', '-')}-{i}" for c, i in PARAMS])
def test_noise(run_benchmark, case, impl):
    chosen = {i.name: i for i in noise.impls(case, DEVICE)}[impl]
    run_benchmark("noise", case.name, chosen)
