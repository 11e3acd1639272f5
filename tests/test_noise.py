"""Noise injection (fastadv.noise, fastadv.ops.noise) on every backend: the
Philox stream, the statistics of every op, bounds, eval-mode identity,
bit-exact weight restore, independence, reproducibility, no host syncs, the
registered ops (opcheck) and a compiled training step.  NEFTune is
tests/test_neftune.py, SiFT tests/test_sift.py.

Sample sizes are 2^16..2^18: large enough for tight moments and a
Kolmogorov-Smirnov test, small enough for the Triton interpreter on CPU.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastadv.kernels as kernels
from fastadv import BackendUnavailable, _backend
from fastadv.kernels.host import shared_tables
from fastadv.noise import GaussianNoise, add_gaussian_noise, add_gaussian_noise_, noisy_token_ids, weight_noise
from fastadv.ops import noise as ops
from fastadv.reference import noise as ref

from conftest import DEVICE, launches_total, odd_or_aligned, record_guards

N = 1 << 18  # samples for moments and KS (64 chunks)


# ---- statistics helpers ------------------------------------------------------------------------

def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the samples and ``cdf``."""
    x, _ = torch.sort(samples.double().flatten().cpu())
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def ks_critical(n: int) -> float:
    return 1.95 / math.sqrt(n)  # p = 0.001


def normal_cdf(x):
    return torch.special.ndtr(x)


def uniform_cdf(lo, hi):
    return lambda x: ((x - lo) / (hi - lo)).clamp(0, 1)


def assert_standard_normal(z: torch.Tensor):
    z = z.double().flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n), float(z.mean())
    assert abs(float(z.std()) - 1) < 5 * math.sqrt(0.5 / n), float(z.std())
    assert ks_statistic(z, normal_cdf) < ks_critical(n)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def zeros(n=N, dtype=torch.float32):
    return torch.zeros(n, dtype=dtype, device=DEVICE)


# ---- the Philox stream --------------------------------------------------------------------------

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox_numpy(seed: int, counters: np.ndarray) -> np.ndarray:
    """Philox-4x32-10 of counters (lo, hi, 0, 0) under key (seed lo, seed hi): [4, n] uint32."""
    mask = np.uint64(0xFFFFFFFF)
    c = np.asarray(counters, dtype=np.uint64)
    c0, c1 = c & mask, c >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(_M0) * c0, np.uint64(_M1) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0) & mask, p1 & mask, \
            ((p0 >> np.uint64(32)) ^ c3 ^ k1) & mask, p0 & mask
        k0, k1 = (k0 + np.uint64(_W0)) & mask, (k1 + np.uint64(_W1)) & mask
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def _randint4x_before_3_4():
    """``tl.randint4x`` as Triton < 3.4 had it: an int64 offset runs 64-bit Philox."""
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x(seed, offset, n_rounds: tl.constexpr = 10):
        _0 = offset * 0
        return tl.philox(seed, offset, _0, _0, _0, n_rounds)

    randint4x.fn.__globals__.setdefault("tl", tl)  # the interpreter looks for triton.language there
    return randint4x


@pytest.fixture
def rng():
    pytest.importorskip("triton")
    from fastadv.kernels.triton import rng as rng_mod
    if _backend.why_not("triton", DEVICE):
        pytest.skip("triton cannot run here")
    return rng_mod


def test_philox_known_answer(rng):
    # Random123's known-answer vector for philox4x32-10, key 0, counter 0.
    words, _, _ = rng.probe(torch.zeros(2, dtype=torch.int64, device=DEVICE))
    got = [int(words[q * rng.QUARTER]) for q in range(4)]
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_stream_layout_and_conversions(rng):
    seed, base = 0x1234_5678_9ABC, 987_654_321_000
    key = torch.tensor([seed, base], dtype=torch.int64, device=DEVICE)
    words, normals, uniforms = rng.probe(key, n_chunks=2)
    q_ = rng.QUARTER
    # element c*4Q + q*Q + j holds word q of counter base + c*Q + j
    counters = base + np.arange(2 * q_)
    expect = philox_numpy(seed, counters).reshape(4, 2, q_).transpose(1, 0, 2).reshape(-1)
    assert np.array_equal(words.cpu().numpy().astype(np.uint32), expect)
    w = words.cpu().numpy().astype(np.float64).reshape(2, 4, q_)
    u = np.floor(w / 256) * 2.0 ** -24
    assert np.array_equal(uniforms.cpu().numpy().reshape(2, 4, q_), u.astype(np.float32))
    r = np.sqrt(-2 * np.log(w[:, 0::2] * 2.0 ** -32 + 2.0 ** -33))
    theta = 2 * np.pi * u[:, 1::2]
    z = np.empty_like(w)
    z[:, 0::2], z[:, 1::2] = r * np.cos(theta), r * np.sin(theta)
    np.testing.assert_allclose(normals.cpu().numpy().reshape(2, 4, q_), z, rtol=1e-5, atol=1e-5)
    assert float(uniforms.min()) >= 0 and float(uniforms.max()) < 1


def test_stream_does_not_depend_on_randint4x(rng, monkeypatch):
    # Before Triton 3.4, tl.randint4x ran 64-bit Philox on an int64 offset (uint64
    # words: uniforms > 1, NaN normals).  Counters are int64, so the kernels split
    # them into 32-bit words themselves: with randint4x replaced by the old
    # behaviour the stream (counters above 2^32 included) must not change.
    import triton.language as tl
    monkeypatch.setattr(tl, "randint4x", _randint4x_before_3_4())
    seed, base = 0x0BAD_5EED_0001, 2 ** 33 - 5  # the counters cross 2^33
    words, normals, uniforms = rng.probe(torch.tensor([seed, base], dtype=torch.int64, device=DEVICE))
    expect = philox_numpy(seed, base + np.arange(rng.QUARTER)).reshape(-1)
    assert np.array_equal(words.cpu().numpy().astype(np.uint32), expect)
    assert bool(torch.isfinite(normals).all())
    assert float(uniforms.min()) >= 0 and float(uniforms.max()) < 1


def test_cuda_library_draws_the_same_stream(rng):
    from fastadv.kernels import cuda as fcuda
    if fcuda.load_error() is not None:
        pytest.skip(f"CUDA library not loadable: {fcuda.load_error()}")
    from fastadv.kernels.cuda import noise as cnoise
    key = (0x0DDB_A11C_AFE5, 123_456_789)
    for chunk in (0, 3):
        words, normals, uniforms = cnoise.host_chunk(key, chunk)
        kt = torch.tensor([key[0], key[1] + chunk * rng.QUARTER], dtype=torch.int64, device=DEVICE)
        tw, tn, tu = rng.probe(kt)
        assert torch.equal(words, tw.cpu())
        assert torch.equal(uniforms, tu.cpu())
        torch.testing.assert_close(normals, tn.cpu(), rtol=1e-5, atol=1e-5)


def test_cuda_argument_errors_need_no_gpu():
    from fastadv.kernels import cuda as fcuda
    import fastadv.kernels.cuda.noise  # noqa: F401  (types the C functions)
    if fcuda.load_error() is not None:
        pytest.skip(f"CUDA library not loadable: {fcuda.load_error()}")
    lib = fcuda.lib()
    key = torch.zeros(2, dtype=torch.int64)
    assert lib.fastadv_noise_add(None, None, 7, 5, key.data_ptr(), 1.0, None, 1, 0, None) != 0
    assert b"unsupported dtype code 7" in lib.fastadv_last_error()
    assert lib.fastadv_noise_add(None, None, 0, 5, None, 1.0, None, 1, 0, None) != 0
    assert b"key is NULL" in lib.fastadv_last_error()
    assert lib.fastadv_noise_token_ids(None, None, 3, key.data_ptr(), 1.0, 0, None) != 0
    assert b"vocab_size" in lib.fastadv_last_error()
    assert lib.fastadv_mt_weight_noise(None, 1, 1, 0, key.data_ptr(), 1.0, None) != 0
    assert b"table is NULL" in lib.fastadv_last_error()
    assert lib.fastadv_rng_host_chunk(None, 0, None, None, None) != 0
    # nothing to do: success without a launch (no GPU needed)
    assert lib.fastadv_noise_add(None, None, 0, 0, None, 1.0, None, 1, 0, None) == 0
    assert lib.fastadv_mt_weight_noise(None, 0, 0, 0, None, 1.0, None) == 0


def test_constants_agree(rng):
    from fastadv.kernels import host
    from fastadv.kernels.cuda import noise as cnoise
    assert ops.QUARTER == rng.QUARTER == host.RNG_QUARTER and ops.CHUNK == rng.CHUNK == cnoise.CHUNK
    assert rng.KEY_HIGH == host.KEY_HIGH and rng.new_key is host.new_key
    key = host.new_key(DEVICE)
    assert key.dtype == torch.int64 and key.shape == (2,)
    assert int(key.max()) < rng.KEY_HIGH
    from fastadv.kernels import cuda as fcuda
    if fcuda.load_error() is None:
        assert fcuda.lib().fastadv_rng_quarter() == ops.QUARTER


def test_key_follows_the_generator():
    from fastadv.kernels.host import new_key
    torch.manual_seed(7)
    a, b = new_key(DEVICE), new_key(DEVICE)
    torch.manual_seed(7)
    assert torch.equal(a, new_key(DEVICE))
    assert not torch.equal(a, b)  # every call advances the generator


# ---- Gaussian noise -----------------------------------------------------------------------------

def test_gaussian_statistics(backend):
    std = 0.37
    out = add_gaussian_noise(zeros(), std, backend=backend)
    assert_standard_normal(out / std)


def test_gaussian_inplace(backend):
    x = torch.randn(N, device=DEVICE)
    x0, ptr = x.clone(), x.data_ptr()
    assert add_gaussian_noise_(x, 2.0, backend=backend) is x
    assert x.data_ptr() == ptr
    assert_standard_normal((x - x0) / 2.0)


def test_gaussian_keeps_x_and_its_shape(backend):
    x = torch.randn(3, 5, 4097, device=DEVICE)  # a ragged last chunk
    x0 = x.clone()
    out = add_gaussian_noise(x, 0.5, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, x0)
    assert_standard_normal((out - x) / 0.5)
    for n in (0, 1, 3):
        y = add_gaussian_noise(torch.ones(n, device=DEVICE), 1.0, backend=backend)
        assert y.shape == (n,) and bool(torch.isfinite(y).all())


def test_gaussian_noncontiguous(backend):
    x = torch.randn(256, 512, device=DEVICE).t()  # 2^17 elements, transposed
    out = add_gaussian_noise(x, 1.0, backend=backend)
    assert_standard_normal(out - x)
    y = x.clone().t().contiguous().t()
    y0 = y.clone()
    add_gaussian_noise_(y, 1.0, backend=backend)
    assert_standard_normal(y - y0)


def test_std_zero_is_exact(backend):
    x = torch.randn(1000, device=DEVICE)
    assert torch.equal(add_gaussian_noise(x, 0.0, backend=backend), x)


def test_gaussian_autograd_is_identity(backend):
    x = torch.randn(64, 33, device=DEVICE, requires_grad=True)
    y = add_gaussian_noise(x, 0.1, backend=backend)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        add_gaussian_noise_(x, 0.1, backend=backend)
    h = x * 2  # non-leaf: in place is fine, gradient still the identity
    add_gaussian_noise_(h, 0.1, backend=backend)
    x.grad = None
    h.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_gaussian_module_train_and_eval(backend):
    layer = GaussianNoise(0.5, backend=backend)
    assert "std=0.5" in repr(layer)
    x = torch.randn(N // 4, device=DEVICE)
    layer.train()
    assert_standard_normal((layer(x) - x) / 0.5)
    layer.eval()
    assert layer(x) is x  # exactly the identity
    assert GaussianNoise(0.0, backend=backend).train()(x) is x
    ref_layer = ref.GaussianNoise(0.5).eval()
    assert ref_layer(x) is x


def test_independent_across_calls_and_positions(backend):
    a = add_gaussian_noise(zeros(), 1.0, backend=backend)
    b = add_gaussian_noise(zeros(), 1.0, backend=backend)
    bound = 5 / math.sqrt(N)
    assert abs(corr(a, b)) < bound
    q = ops.QUARTER
    for lag in (1, q, 2 * q, 4 * q):  # neighbours, the 4 words of one counter, next chunk
        assert abs(corr(a[:-lag], a[lag:])) < 5 / math.sqrt(N - lag), lag


def test_reproducible_under_manual_seed(backend):
    x = torch.randn(10_000, device=DEVICE)
    torch.manual_seed(123)
    a = add_gaussian_noise(x, 1.0, backend=backend)
    b = add_gaussian_noise(x, 1.0, backend=backend)
    torch.manual_seed(123)
    assert torch.equal(add_gaussian_noise(x, 1.0, backend=backend), a)
    assert torch.equal(add_gaussian_noise(x, 1.0, backend=backend), b)
    g1 = torch.Generator(device=DEVICE).manual_seed(5)
    g2 = torch.Generator(device=DEVICE).manual_seed(5)
    c = add_gaussian_noise(x, 1.0, generator=g1, backend=backend)
    assert torch.equal(c, add_gaussian_noise(x, 1.0, generator=g2, backend=backend))
    assert not torch.equal(c, a)


def test_torch_backend_is_the_reference_draw():
    x = torch.randn(1000, device=DEVICE)
    torch.manual_seed(3)
    expect = ref.add_gaussian_noise(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(add_gaussian_noise(x, 0.2, backend="torch"), expect)


@pytest.mark.launch_free
def test_argument_errors(backend):
    x = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(x, -1.0, backend=backend)
    with pytest.raises(TypeError, match="std"):
        add_gaussian_noise(x, "0.1", backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        add_gaussian_noise(torch.zeros(4, dtype=torch.int64, device=DEVICE), 0.1, backend=backend)
    with pytest.raises(ValueError, match="unknown fastadv backend"):
        add_gaussian_noise(x, 0.1, backend="nope")


def test_float64_runs_on_torch_under_auto():
    x = torch.zeros(N // 4, dtype=torch.float64, device=DEVICE)
    out = add_gaussian_noise(x, 1.0)
    assert out.dtype == torch.float64
    assert_standard_normal(out)


def test_forced_kernel_backend_rejects_float64():
    if _backend.why_not("triton", DEVICE):
        pytest.skip("triton cannot run here")
    with pytest.raises(TypeError, match="backend='torch'"):
        add_gaussian_noise(torch.zeros(4, dtype=torch.float64, device=DEVICE), 1.0, backend="triton")


def test_cuda_backend_on_cpu_says_why():
    if DEVICE.type == "cuda":
        pytest.skip("CPU-only check")
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        add_gaussian_noise(torch.zeros(4), 1.0, backend="cuda")


# ---- the seed's token-id noise ------------------------------------------------------------------

def test_token_ids_torch_is_the_seed():
    ids = torch.randint(0, 1000, (8, 64), device=DEVICE)
    torch.manual_seed(11)
    expect = ref.noisy_token_ids(ids, 0.01, 1000)
    torch.manual_seed(11)
    assert torch.equal(noisy_token_ids(ids, 0.01, 1000, backend="torch"), expect)


def test_token_ids_distribution(backend):
    vocab = 1000
    ids = torch.full((N // 4,), 500, dtype=torch.int64, device=DEVICE)
    out = noisy_token_ids(ids, 3.0, vocab, backend=backend)
    # 500 + 3 z > 0, so truncation is floor: P(500) = P(0 <= z < 1/3), P(501) = P(1/3 <= z < 2/3)
    p0 = float((out == 500).double().mean())
    p1 = float((out == 501).double().mean())
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    assert abs(p0 - (phi(1 / 3) - phi(0))) < 0.01
    assert abs(p1 - (phi(2 / 3) - phi(1 / 3))) < 0.01
    # small factor: ids > 0 go down by one about half the time; 0 stays 0
    ids = torch.randint(0, vocab, (N // 4,), device=DEVICE)
    out = noisy_token_ids(ids, 0.01, vocab, backend=backend)
    down = float((out[ids > 0] == ids[ids > 0] - 1).double().mean())
    assert abs(down - 0.5) < 0.01
    assert bool(((out == ids) | (out == ids - 1)).all())
    assert bool((out[ids == 0] == 0).all())
    # a huge factor clamps to the vocabulary
    out = noisy_token_ids(ids, 1e6, vocab, backend=backend)
    assert int(out.min()) == 0 and int(out.max()) == vocab - 1
    assert out.dtype == torch.int64 and out.shape == ids.shape


@pytest.mark.launch_free
def test_token_ids_errors(backend):
    with pytest.raises(TypeError, match="int64"):
        noisy_token_ids(torch.zeros(3, device=DEVICE), 0.1, 10, backend=backend)
    with pytest.raises(ValueError, match="vocab_size"):
        noisy_token_ids(torch.zeros(3, dtype=torch.int64, device=DEVICE), 0.1, 0, backend=backend)


# ---- weight noise ----------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self, n_layers=3, width=64, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(300, width, dtype=dtype)
        self.layers = nn.ModuleList(nn.Linear(width, width, dtype=dtype) for _ in range(n_layers))
        self.norm = nn.LayerNorm(width, dtype=dtype)

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.norm(h).sum()


def snapshot(model):
    return {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}


def assert_restored(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), snap[n][0]), n
        assert p.data_ptr() == snap[n][1], n


def test_weight_noise_perturbs_and_restores(backend):
    model = Net().to(DEVICE)
    snap = snapshot(model)
    std = 0.05
    with weight_noise(model, std, backend=backend) as m:
        assert m is model
        noise = []
        for n, p in model.named_parameters():
            if "weight" in n:
                noise.append(((p.detach() - snap[n][0]) / std).flatten())
                assert p.data_ptr() == snap[n][1]
            else:
                assert torch.equal(p.detach(), snap[n][0]), n  # biases untouched
        model(torch.randint(0, 300, (2, 5), device=DEVICE))
    assert_restored(model, snap)
    z = torch.cat(noise)
    assert z.numel() > 30_000
    assert_standard_normal(z)


def test_weight_noise_restores_after_an_exception(backend):
    model = Net().to(DEVICE)
    snap = snapshot(model)
    with pytest.raises(KeyError):
        with weight_noise(model, 1.0, backend=backend):
            assert not torch.equal(model.emb.weight.detach(), snap["emb.weight"][0])
            raise KeyError("boom")
    assert_restored(model, snap)


def test_backward_after_exit_fails_like_the_reference(backend):
    # the restore changes the weights in place: a graph built inside the block must
    # be differentiated inside it; outside, autograd says so (as with the reference)
    for ctx in (lambda m: ref.weight_noise(m, 0.1), lambda m: weight_noise(m, 0.1, backend=backend)):
        model = nn.Linear(8, 4).to(DEVICE)
        x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
        with ctx(model):
            loss = model(x).sum()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        with ctx(model):
            model(x).sum().backward()  # inside the block: fine


def test_weight_noise_selection(backend):
    model = Net().to(DEVICE)
    snap = snapshot(model)
    with weight_noise(model, 0.1, param_filter=lambda n, p: n.startswith("layers.1."), backend=backend):
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), snap[n][0])}
    assert changed == {"layers.1.weight", "layers.1.bias"}
    with weight_noise(model, 0.1, "bias", backend=backend):
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), snap[n][0])}
    assert changed == {n for n in snap if "bias" in n}
    assert_restored(model, snap)
    with pytest.raises(TypeError, match="param_filter"):
        with weight_noise(model, 0.1, param_filter="layers", backend=backend):
            pass
    with pytest.raises(ValueError, match="std"):
        with weight_noise(model, -0.1, backend=backend):
            pass


def test_weight_noise_is_independent_across_tensors(backend):
    model = nn.Sequential(*[nn.Linear(128, 128, bias=False) for _ in range(4)]).to(DEVICE)
    for p in model.parameters():
        nn.init.zeros_(p)
    with weight_noise(model, 1.0, backend=backend):
        ws = [p.detach().clone() for p in model.parameters()]
    bound = 5 / math.sqrt(ws[0].numel())
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(corr(ws[i], ws[j])) < bound, (i, j)
    with weight_noise(model, 1.0, backend=backend):  # and across calls
        again = [p.detach().clone() for p in model.parameters()]
    assert abs(corr(ws[0], again[0])) < bound


def test_weight_noise_launches_do_not_grow_with_tensors(backend):
    if backend == "torch":
        pytest.skip("the torch backend launches per tensor")
    for n_layers in (2, 12):
        model = Net(n_layers=n_layers).to(DEVICE)
        before = dict(kernels.LAUNCHES)
        with weight_noise(model, 0.01, backend=backend):
            pass
        fired = {k: v - before.get(k, 0) for k, v in kernels.LAUNCHES.items() if v != before.get(k, 0)}
        assert fired == {f"{backend}.weight_noise": 1, f"{backend}.mt_copy": 1}, fired


def test_weight_noise_mixed_dtypes(backend):
    # fp32 and fp16 groups: one launch each on kernel backends, both restored bit for bit
    model = Net().to(DEVICE)
    model.norm.half()
    snap = snapshot(model)
    before = dict(kernels.LAUNCHES)
    with weight_noise(model, 0.1, backend=backend):
        assert not torch.equal(model.norm.weight.detach(), snap["norm.weight"][0])
        assert not torch.equal(model.emb.weight.detach(), snap["emb.weight"][0])
    assert_restored(model, snap)
    if backend != "torch":
        assert kernels.LAUNCHES[f"{backend}.weight_noise"] - before.get(f"{backend}.weight_noise", 0) == 2


def test_weight_noise_float64_goes_to_torch_under_auto():
    model = Net().to(DEVICE)
    model.norm.double()
    snap = snapshot(model)
    with weight_noise(model, 0.1):
        assert not torch.equal(model.norm.weight.detach(), snap["norm.weight"][0])
        assert not torch.equal(model.emb.weight.detach(), snap["emb.weight"][0])
    assert_restored(model, snap)


@pytest.mark.launch_free
def test_weight_noise_forced_float64_raises(backend):
    if backend == "torch":
        pytest.skip("torch runs any dtype")
    model = Net().to(DEVICE)
    model.norm.double()
    snap = snapshot(model)
    with pytest.raises(TypeError, match="backend='torch'"):
        with weight_noise(model, 0.1, backend=backend):
            pass
    assert_restored(model, snap)


@pytest.mark.launch_free
def test_weight_noise_std_zero_launches_nothing(backend):
    model = Net().to(DEVICE)
    snap = snapshot(model)
    before = sum(kernels.LAUNCHES.values())
    with weight_noise(model, 0.0, backend=backend):
        assert_restored(model, snap)
    assert sum(kernels.LAUNCHES.values()) == before


def test_weight_noise_torch_matches_reference():
    model = Net().to(DEVICE)
    twin = copy.deepcopy(model)
    torch.manual_seed(21)
    with ref.weight_noise(twin, 0.1):
        expect = {n: p.detach().clone() for n, p in twin.named_parameters()}
    torch.manual_seed(21)
    with weight_noise(model, 0.1, backend="torch"):
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), expect[n]), n


def test_weight_noise_reproducible(backend):
    model = Net().to(DEVICE)
    outs = []
    for _ in range(2):
        torch.manual_seed(8)
        with weight_noise(model, 0.1, backend=backend):
            outs.append(model.emb.weight.detach().clone())
    assert torch.equal(outs[0], outs[1])


# ---- no host sync ---------------------------------------------------------------------------------

def test_no_host_sync(backend, no_host_sync):
    x = torch.randn(4, 16, 32, device=DEVICE)
    ids = torch.randint(0, 100, (4, 16), device=DEVICE)
    model = Net().to(DEVICE)
    layer = GaussianNoise(0.1, backend=backend).train()
    add_gaussian_noise(x, 0.1, backend=backend)  # warm up (kernel compilation, tables)
    with weight_noise(model, 0.1, backend=backend):
        pass
    with no_host_sync():
        add_gaussian_noise(x, 0.1, backend=backend)
        add_gaussian_noise_(x, 0.1, backend=backend)
        layer(x)
        noisy_token_ids(ids, 0.5, 100, backend=backend)
        with weight_noise(model, 0.1, backend=backend):
            pass


def test_sync_detector_catches_the_seed(no_host_sync):
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_sync():
            float(ref.add_gaussian_noise(torch.zeros(3, device=DEVICE), 1.0).sum())


# ---- the benchmark module -------------------------------------------------------------------------

def test_benchmark_cases_check_and_count():
    from fastadv.bench import noise as bench
    from fastadv.bench import run

    impls = ["reference", "torch"] + (["triton"] if not _backend.why_not("triton", DEVICE) else [])
    rows = run.run_op("noise", bench, DEVICE, quick=True, impls=impls, warmup=0, iters=1, log=lambda s: None)
    bench.release()
    # NEFTune and SiFT have their own bench modules (fastadv.bench.neftune / .sift)
    assert {r["case"].split()[0] for r in rows} == {"gaussian", "gaussian_", "token_ids", "weight_noise"}
    for r in rows:
        assert r.get("check") == "ok" or r.get("skipped"), r
        if r.get("check") == "ok" and r["impl"] != "reference":
            assert r["syncs"] == 0, r
    wn = {r["impl"]: r for r in rows if r["case"].startswith("weight_noise") and "fp32" in r["case"]}
    assert wn["reference"]["launches"] > 50
    if "triton" in wn:  # key draw + noise + restore, whatever the number of tensors
        assert wn["triton"]["kernels"] == {"triton.weight_noise": 1, "triton.mt_copy": 1}
        # The backups are fresh buffers at each entry: the work tables are found again when
        # the allocator hands back the same addresses (PyTorch's caching allocator on CUDA);
        # CPU malloc may not, and then a table is built again (one cat + one copy: 2 launches).
        assert wn["triton"]["launches"] == 3 if DEVICE.type == "cuda" else wn["triton"]["launches"] in (3, 5, 7)


# ---- GPU: low precision and the CUDA backend against Triton -------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_statistics(backend, dtype):
    std = 0.25
    out = add_gaussian_noise(zeros(dtype=dtype), std, backend=backend)
    assert out.dtype == dtype
    assert_standard_normal(out.float() / std)  # rounded once: the moments stay
    model = Net(dtype=dtype).to(DEVICE)
    snap = snapshot(model)
    with weight_noise(model, 0.1, backend=backend):
        pass
    assert_restored(model, snap)


@pytest.mark.gpu
def test_gpu_cuda_and_triton_draw_the_same_noise():
    from conftest import usable_backends
    if not {"cuda", "triton"} <= set(usable_backends()):
        pytest.skip("needs both kernel backends")
    x = torch.randn(3, 1000, 77, device=DEVICE)
    mask = (torch.rand(3, 1000, device=DEVICE) > 0.2).long()
    outs = {}
    for b in ("triton", "cuda"):
        torch.manual_seed(42)
        outs[b] = (add_gaussian_noise(x, 0.5, backend=b), noisy_token_ids(mask * 7, 0.3, 9, backend=b))
    for a, c in zip(outs["triton"], outs["cuda"]):
        if a.dtype == torch.int64:
            assert float((a != c).double().mean()) < 1e-4  # a rounding flip at a truncation boundary, rarely
        else:
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# ---- device guard, rounding, vector access ---------------------------------------------------------


def test_kernel_launches_run_under_the_device_guard(backend, monkeypatch):
    if backend == "torch":
        pytest.skip("kernel backends only")
    seen = record_guards(monkeypatch, ops)
    x = torch.randn(2, 3, 8, device=DEVICE)
    ws = [torch.randn(n, device=DEVICE) for n in (5, 4100)]
    before = launches_total()
    ops.add_gaussian_noise(x, 0.1, backend=backend)
    ops.add_gaussian_noise_(x.clone(), 0.1, backend=backend)
    ops.noisy_token_ids(torch.randint(0, 50, (3, 4), device=DEVICE), 0.5, 50, backend=backend)
    ops.weight_noise_restore_(ops.weight_noise_(ws, 0.1, backend=backend))
    total = launches_total() - before
    assert total >= 5 and seen["inside"] == total  # the restore's copy runs under the noise op's guard too
    assert seen["devices"] and all(d == x.device for d in seen["devices"])


class LaunchSpy:
    """Stands in for a Triton kernel: records the keyword arguments of each launch."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.kwargs.append(kw)
            return launch(*args, **kw)
        return run


def test_noise_launches_disable_fp_fusion(rng, monkeypatch):
    # x + r * s must round twice on the GPU too (no FMA): as under the interpreter and in the
    # torch order.  The interpreter cannot show an FMA, so check the launch option itself.
    from fastadv.kernels.triton import noise as tk
    names = ("_add_noise_kernel", "_token_ids_kernel", "_weight_noise_kernel")
    spies = {n: LaunchSpy(getattr(tk, n)) for n in names}
    for n, spy in spies.items():
        monkeypatch.setattr(tk, n, spy)
    x = torch.randn(3, 8, device=DEVICE)
    ops.add_gaussian_noise(x, 0.1, backend="triton")
    ops.add_gaussian_noise_(x.clone(), 0.1, backend="triton")
    ops.noisy_token_ids(torch.randint(0, 50, (3, 4), device=DEVICE), 0.5, 50, backend="triton")
    ops.weight_noise_restore_(ops.weight_noise_([x.clone()], 0.1, backend="triton"))
    for n, spy in spies.items():
        assert len(spy.kwargs) >= 1 and all(kw.get("enable_fp_fusion") is False for kw in spy.kwargs), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_noise_vector_and_scalar_paths_agree(backend, dtype):
    # Tensors at odd addresses (a view one element into a buffer) run the scalar path,
    # fresh tensors the vector path; sizes cover whole chunks and tails.  The same key
    # must give the same values, and the restore must be bit-exact on both.
    if backend == "torch":
        pytest.skip("kernel backends only")
    sizes = (ops.CHUNK, 2 * ops.CHUNK + 7, 5)
    odd = [odd_or_aligned(n, True, dtype) for n in sizes]
    aligned = [t.clone() for t in odd]
    before = [t.clone() for t in odd]
    states = []
    for ts in (odd, aligned):
        states.append(ops.weight_noise_(ts, 0.5, generator=torch.Generator(DEVICE).manual_seed(3),
                                        backend=backend))
        table = next(t for t in reversed(shared_tables()._tables.values()) if t.ptrs[0] == ts[0].data_ptr())
        assert table.n_lists == 2 and table.chunk == ops.CHUNK and table.aligned == (ts is aligned)
    flat = states[1].backups
    offsets = [(b.data_ptr() - flat[0].data_ptr()) // b.element_size() for b in flat]
    assert offsets == [0, ops.CHUNK, 3 * ops.CHUNK + 16]  # views on 16-element boundaries
    for a, b, w in zip(odd, aligned, before):
        assert torch.equal(a, b) and not torch.equal(a, w)
    for s in states:
        ops.weight_noise_restore_(s)
    for ts in (odd, aligned):
        for t, w in zip(ts, before):
            assert torch.equal(t.view(torch.int16 if dtype == torch.float16 else torch.int32),
                               w.view(torch.int16 if dtype == torch.float16 else torch.int32))


# ---- storage moved inside the block (issue 14) ---------------------------------------------------

MOVES = {
    "double-float": lambda m: m.double().float(),
    "to-with-copy": lambda m: m.to(torch.float64).to(torch.float32),
    "assign": lambda m: m.load_state_dict(copy.deepcopy(m.state_dict()), assign=True),
}


@pytest.mark.parametrize("move", MOVES)
def test_weight_noise_follows_storage_moved_inside_the_block(backend, move):
    """A reallocation inside the block (the old storage is freed): the exit
    writes the original bits into the parameters where they live now, never
    through the old addresses."""
    model = Net().to(DEVICE)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    with weight_noise(model, 0.5, backend=backend):
        noisy = {n: p.detach().clone() for n, p in model.named_parameters()}
        old_ptrs = [p.data_ptr() for p in model.parameters()]
        MOVES[move](model)
        new_ptrs = [p.data_ptr() for p in model.parameters()]
        assert new_ptrs != old_ptrs  # really moved
        for n, p in model.named_parameters():
            assert torch.equal(p, noisy[n]), n
        torch.randn(sum(p.numel() for p in model.parameters()), device=DEVICE)  # reuse the freed memory
    for n, p in model.named_parameters():
        assert torch.equal(p, originals[n]), n
    assert [p.data_ptr() for p in model.parameters()] == new_ptrs


def test_weight_noise_refuses_a_dtype_change_and_keeps_the_backup(backend):
    from fastadv.ops._live import StorageMoved
    model = Net().to(DEVICE)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(StorageMoved, match="emb.weight changed dtype from torch.float32 to torch.float16") as info:
        with weight_noise(model, 0.5, backend=backend):
            model.half()
            seen = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.equal(p, seen[n]), n  # nothing written
    assert set(info.value.backups) == {n for n in originals if "weight" in n}
    assert torch.equal(info.value.backups["emb.weight"], originals["emb.weight"])
    model.float()
    info.value.retry()
    for n, p in model.named_parameters():  # the perturbed weights exactly (the rest went through fp16)
        assert torch.equal(p, originals[n] if "weight" in n else originals[n].half().float()), n


def test_weight_noise_restore_into_given_live_tensors(backend):
    from fastadv.ops._live import StorageMoved
    ws = [torch.randn(n, device=DEVICE) for n in (5, 4100)]
    w0 = [w.clone() for w in ws]
    state = ops.weight_noise_(ws, 0.5, backend=backend, names=["a", "b"])
    assert state.names == ["a", "b"]
    moved = [w.clone() for w in ws]
    with pytest.raises(StorageMoved, match="b is no longer a parameter"):
        ops.weight_noise_restore_(state, [moved[0], None])
    assert not torch.equal(moved[0], w0[0])  # nothing written
    ops.weight_noise_restore_(state, moved)
    assert all(torch.equal(m, w) for m, w in zip(moved, w0))
    assert not state and state.backups == []


# ---- torch.library registration and torch.compile -------------------------------------------------

def test_opcheck(backend):
    """Schema, fake tensor, autograd registration (``noise_add``) and AOT dispatch of
    every registered noise op; the randomness is an argument (a Philox key, or the
    torch backend's draw), so each op is a function of its inputs."""
    x = torch.randn(3, 5, 7, device=DEVICE, requires_grad=True)
    t = torch.randn(7, 5, device=DEVICE).t()  # non-contiguous
    for inp in (x, t):
        rand = ops.draw(backend, inp.shape, torch.float32, inp.device, None)
        torch.library.opcheck(ops.noise_add_op.overload, (inp, rand, 0.3, False, backend))
        torch.library.opcheck(ops.noise_add_inplace_op.overload, (inp.detach().clone(), rand, 0.3, False, backend))
    ids = torch.randint(0, 50, (3, 4), device=DEVICE)
    rand = ops.draw(backend, ids.shape, torch.float32, ids.device, None)
    torch.library.opcheck(ops.noise_token_ids_op.overload, (ids, rand, 0.5, 50, backend))
    ws = [torch.randn(5, device=DEVICE), torch.randn(3, 3, device=DEVICE)]
    rand = ([torch.randn(w.shape, device=DEVICE) for w in ws] if backend == "torch"
            else [ops.draw(backend, (), torch.float32, DEVICE, None)])
    torch.library.opcheck(ops.weight_noise_op.overload, (ws, [torch.empty_like(w) for w in ws], rand, 0.1, backend))


def test_registered():
    assert {"noise_add", "noise_add_", "noise_token_ids", "weight_noise_"} <= set(dir(torch.ops.fastadv))


class NoisyNet(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 3)
        self.noise = GaussianNoise(0.1, backend=backend)
        self.backend = backend

    def forward(self, ids, labels):
        h = add_gaussian_noise(self.emb(ids), 0.05, backend=self.backend)  # input noise ...
        h = self.noise(torch.tanh(h))                                     # ... and activation noise
        return nn.functional.cross_entropy(self.head(h).mean(1), labels)


def test_compiled_training_step_has_no_graph_break(backend):
    """A forward with input and activation noise + backward under
    torch.compile(fullgraph=True) equals eager (Inductor draws with eager's
    RNG: fallback_random)."""
    torch._dynamo.reset()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(NoisyNet(backend).to(DEVICE).train())
    model, ref_model = models

    def step_of(m):
        def step(ids, labels):
            loss = m(ids, labels)
            loss.backward()
            return loss.detach()
        return step

    ids, labels = torch.randint(0, 20, (4, 5), device=DEVICE), torch.randint(0, 3, (4,), device=DEVICE)
    with torch._dynamo.config.patch(trace_autograd_ops=True), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(step_of(model), fullgraph=True)
        for i in range(2):
            torch.manual_seed(10 + i)
            got = compiled(ids, labels)
            torch.manual_seed(10 + i)
            torch.testing.assert_close(got, step_of(ref_model)(ids, labels), rtol=1e-5, atol=1e-6)
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
