"""DP-SGD: fused per-sample clip + noise, the Opacus drop-in, seed 000's
optimizer and DP-Logits.  Every backend against Opacus 1.6 / the references;
the noise against the normal distribution and the Philox contract of rng.py.
"""
from __future__ import annotations

import ctypes
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from fastadv import dp
from fastadv.ops import dp as ops
from fastadv.reference import dp as ref
from conftest import launches_total, record_guards  # noqa: E402

opacus = pytest.importorskip("opacus")
from opacus.optimizers import DPOptimizer as OpacusDPOptimizer  # noqa: E402

KERNEL_BACKENDS = ("triton", "cuda")
FP32 = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(5, 4), (4,), (3, 4), (3,), (7, 3, 2), (1,)]   # odd sizes, a conv-like weight
SCALES = [0.01, 0.1, 1.0, 3.0, 10.0, 0.0, 1e15]         # unclipped, clipped, zero, huge


def grad_samples(batch, shapes=SHAPES, scales=SCALES, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([scales[i % len(scales)] for i in range(batch)])
    return [(torch.randn(batch, *s, generator=gen) * scale.view(-1, *[1] * len(s))).to(device, dtype)
            for s in shapes]


def opacus_grads(gs, sigma, C, reduction, ebs=None, seed=123):
    """What Opacus 1.6's pre_step leaves in p.grad for per-sample gradients gs."""
    params = [nn.Parameter(torch.zeros(g.shape[1:], dtype=torch.float32, device=g.device)) for g in gs]
    for p, g in zip(params, gs):
        p.grad_sample = g.clone()
    opt = OpacusDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, max_grad_norm=C,
                            expected_batch_size=ebs or len(gs[0]), loss_reduction=reduction,
                            generator=torch.Generator(device=gs[0].device).manual_seed(seed))
    opt.pre_step()
    return [p.grad.clone() for p in params]


def zeros_grads(numels, device, batch=1):
    return [torch.zeros(batch, n, device=device) for n in numels]


# ------------------------------------------------------------------ sigma = 0: Opacus's math

@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_clip_matches_opacus(backend, device, reduction):
    gs = grad_samples(9, device=device)
    expect = opacus_grads(gs, 0.0, 1.0, reduction)
    got = dp.clip_and_noise(gs, 1.0, 0.0, expected_batch_size=9 if reduction == "mean" else None,
                            backend=backend)
    for e, g, s in zip(expect, got, SHAPES):
        assert g.shape == s and g.dtype == torch.float32
        torch.testing.assert_close(g, e, **FP32)
    # and the reference (bitwise for fp32 on the torch path: the same ops)
    for e, g in zip(ref.clip_and_noise(gs, 1.0, 0.0), dp.clip_and_noise(gs, 1.0, 0.0, backend=backend)):
        torch.testing.assert_close(g, e, **FP32)


def test_clip_factor_and_norm_across_tensors(backend, device):
    gs = [torch.tensor([[3.0, 0.0], [0.3, 0.0]], device=device), torch.tensor([[4.0], [0.4]], device=device)]
    out = dp.clip_and_noise(gs, 1.0, 0.0, backend=backend)
    f = (1.0 / torch.tensor(5.0 + 1e-6)).item()  # Opacus: reciprocal(norm + 1e-6) * C, fp32
    torch.testing.assert_close(out[0], torch.tensor([3.0 * f + 0.3, 0.0], device=device), **FP32)
    torch.testing.assert_close(out[1], torch.tensor([4.0 * f + 0.4], device=device), **FP32)


@pytest.mark.parametrize("case", ["B=1", "zeros", "empty batch", "empty tensor", "one huge"])
def test_edge_cases_match_opacus(backend, device, case):
    if case == "B=1":
        gs = grad_samples(1, scales=[7.0], device=device)
    elif case == "zeros":
        gs = [torch.zeros(4, *s, device=device) for s in SHAPES]
    elif case == "empty batch":  # an empty Poisson batch
        gs = [torch.zeros(0, *s, device=device) for s in SHAPES]
    elif case == "empty tensor":
        gs = grad_samples(3, shapes=[(0,), (3, 2), (0, 4)], device=device)
    else:
        gs = grad_samples(3, scales=[1e15, 1e-3, 2.0], device=device)
    expect = opacus_grads(gs, 0.0, 0.7, "mean", ebs=5)
    got = dp.clip_and_noise(gs, 0.7, 0.0, expected_batch_size=5, backend=backend)
    for e, g in zip(expect, got):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, **FP32)


def test_deterministic(backend, device):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("the kernels' fixed-order reductions")
    gs = grad_samples(16, shapes=[(3000,), (5000,), (7,)], device=device)
    a = dp.clip_and_noise(gs, 1.0, 0.0, backend=backend)
    b = dp.clip_and_noise(gs, 1.0, 0.0, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_fp16_grad_samples_fp32_math(backend, device):
    gs = grad_samples(6, device=device, scales=[0.01, 0.1, 1.0, 3.0, 10.0, 0.0])
    gs16 = [g.half() for g in gs]
    expect = ref.clip_and_noise([g.float() for g in gs16], 1.0, 0.0)   # fp32 reference on the fp16 values
    out = [torch.empty(g.shape[1:], device=device) for g in gs]        # fp32 results (Opacus: p.dtype)
    got = dp.clip_and_noise(gs16, 1.0, 0.0, out=out, backend=backend)
    for e, g in zip(expect, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, **FP32)
    got16 = dp.clip_and_noise(gs16, 1.0, 0.0, backend=backend)         # results in the input dtype
    for e, g in zip(expect, got16):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), e, rtol=2 * 2**-10, atol=1e-5)


def test_summed_and_scaling_follow_opacus(backend, device):
    gs1, gs2 = grad_samples(5, device=device, seed=1), grad_samples(3, device=device, seed=2)
    summed = dp.clip_and_accumulate(gs1, 1.0, backend=backend)
    first = [s.clone() for s in summed]
    ptrs = [s.data_ptr() for s in summed]
    out = dp.clip_and_noise(gs2, 1.0, 0.0, summed=summed, expected_batch_size=4, backend=backend)
    assert [s.data_ptr() for s in summed] == ptrs  # updated in place
    for f, s, o, e in zip(first, summed, out, ref.clip_and_noise(gs2, 1.0, 0.0)):
        torch.testing.assert_close(s, f + e, **FP32)      # summed += clipped sum (no noise)
        torch.testing.assert_close(o, s / 4, **FP32)      # out = (summed + noise) / expected batch
    noisy = dp.add_noise(summed, 0.0, expected_batch_size=2, backend=backend)
    for s, n in zip(summed, noisy):
        torch.testing.assert_close(n, s / 2, **FP32)


# ------------------------------------------------------------------ noise

def _ks(x: torch.Tensor, std: float):
    from scipy import stats
    return stats.kstest((x.double() / std).cpu().numpy(), "norm")


def _check_normal(x: torch.Tensor, std: float, *, rel: float = 0.01, cdf_se: float = 5.0):
    n = x.numel()
    x = x.double()
    assert abs(x.mean().item()) < 5 * std / math.sqrt(n)
    assert x.std().item() == pytest.approx(std, rel=rel)
    for t in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0):  # CDF points
        p = 0.5 * math.erfc(-t / math.sqrt(2))
        emp = (x <= t * std).double().mean().item()
        assert abs(emp - p) < cdf_se * math.sqrt(p * (1 - p) / n) + 1e-12, t
    assert _ks(x, std).pvalue > 1e-3


def test_noise_statistics_torch(device):
    """10^6 draws: mean, std within 1% of sigma * C, CDF points, KS."""
    out = dp.clip_and_noise(zeros_grads([10**6], device), 0.5, 3.0, backend="torch",
                            generator=torch.Generator(device=device).manual_seed(1))[0]
    _check_normal(out, 1.5)


def test_noise_statistics_kernel(backend, device):
    """The kernels' in-kernel Philox noise: 2^20 draws (about 10^6) through the
    fused op, mean, std within 1%, CDF points and KS (a few seconds under the
    Triton interpreter: 256 programs)."""
    if backend not in KERNEL_BACKENDS:
        pytest.skip("the torch path is torch.normal (test_noise_statistics_torch)")
    out = dp.clip_and_noise(zeros_grads([2**20], device), 0.5, 3.0, backend=backend,
                            generator=torch.Generator(device=device).manual_seed(2))[0]
    _check_normal(out, 1.5)
    assert out.abs().max().item() <= 6.8 * 1.5  # Box-Muller with u1 >= 2^-33


def test_noise_layout_is_rngs(backend, device):
    """Tensor t's noise is chunk (first chunk of t + c) of the key drawn from the
    generator, in rng.py's element layout: tensors never share counters."""
    if backend not in KERNEL_BACKENDS:
        pytest.skip("kernel backends only")
    from fastadv.kernels.triton import rng
    n1, n2 = 5000, 3000                      # 2 chunks, then 1 chunk
    out = dp.clip_and_noise(zeros_grads([n1, n2], device, batch=2), 1.0, 1.0, backend=backend,
                            generator=torch.Generator(device=device).manual_seed(7))
    key = ops.new_key(device, torch.Generator(device=device).manual_seed(7))
    normals = rng.probe(key, 3)[1]
    # the CUDA kernels' logf / sinf may differ from Triton's in the last bits
    tol = dict(rtol=1e-5, atol=1e-5) if backend == "cuda" else dict(rtol=0, atol=0)
    torch.testing.assert_close(out[0], normals[:n1], **tol)
    torch.testing.assert_close(out[1], normals[2 * 4096: 2 * 4096 + n2], **tol)


def test_noise_layout_across_dtype_groups(backend, device):
    """Per-sample gradients of two dtypes: two launches of the fused pass, one key,
    the second group's chunks numbered after the first's (no counter reused)."""
    if backend not in KERNEL_BACKENDS:
        pytest.skip("kernel backends only")
    from fastadv.kernels.triton import rng
    gs = [torch.zeros(1, 5000, device=device), torch.zeros(1, 3000, device=device, dtype=torch.float16)]
    out = [torch.empty(5000, device=device), torch.empty(3000, device=device)]
    dp.clip_and_noise(gs, 1.0, 1.0, out=out, backend=backend,
                      generator=torch.Generator(device=device).manual_seed(8))
    normals = rng.probe(ops.new_key(device, torch.Generator(device=device).manual_seed(8)), 3)[1]
    tol = dict(rtol=1e-5, atol=1e-5) if backend == "cuda" else dict(rtol=0, atol=0)
    torch.testing.assert_close(out[0], normals[:5000], **tol)
    torch.testing.assert_close(out[1], normals[2 * 4096: 2 * 4096 + 3000], **tol)


def test_noise_independent_across_calls_and_tensors(backend, device):
    n = 2 * 4096
    outs = dp.clip_and_noise(zeros_grads([n, n], device), 1.0, 1.0, backend=backend)
    again = dp.clip_and_noise(zeros_grads([n, n], device), 1.0, 1.0, backend=backend)
    pairs = [(outs[0], outs[1]), (outs[0], again[0]), (outs[1], again[1])]
    for a, b in pairs:
        assert not torch.equal(a, b)
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(n)
    lag = torch.corrcoef(torch.stack([outs[0][:-1], outs[0][1:]]))[0, 1].item()  # neighbours
    assert abs(lag) < 5 / math.sqrt(n)


def opacus_noisy(gs, sigma, C, seed, dtype=None):
    """Opacus 1.6's p.grad (loss_reduction="sum") under torch.manual_seed(seed), the default generator."""
    params = [nn.Parameter(torch.zeros(g.shape[1:], dtype=dtype or g.dtype, device=g.device)) for g in gs]
    for p, g in zip(params, gs):
        p.grad_sample = g.clone()
    opt = OpacusDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, max_grad_norm=C,
                            expected_batch_size=len(gs[0]), loss_reduction="sum")
    torch.manual_seed(seed)
    opt.pre_step()
    return [p.grad.clone() for p in params]


def test_noise_reproducible_under_manual_seed(backend, device):
    """Seeded runs repeat; the torch backend draws Opacus's noise (bitwise)."""
    gs = grad_samples(4, device=device)

    def run(seed):
        torch.manual_seed(seed)
        return dp.clip_and_noise(gs, 1.0, 0.8, backend=backend)

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    if backend == "torch":
        assert all(torch.equal(x, y) for x, y in zip(a, opacus_noisy(gs, 0.8, 1.0, 5)))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    g1 = torch.Generator(device=device).manual_seed(3)
    g2 = torch.Generator(device=device).manual_seed(3)
    x = dp.clip_and_noise(gs, 1.0, 0.8, generator=g1, backend=backend)
    y = dp.clip_and_noise(gs, 1.0, 0.8, generator=g2, backend=backend)
    assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_secure_mode(backend, device):
    """Key from os.urandom on every call (manual_seed and the generator do not
    repeat it), four streams summed / 2: still N(0, (sigma C)^2), wider support."""
    n = 2**17 if backend != "torch" else 2**20
    gs = zeros_grads([n], device)

    def run():
        torch.manual_seed(0)
        return dp.clip_and_noise(gs, 2.0, 0.5, secure_mode=True, backend=backend,
                                 generator=torch.Generator(device=device).manual_seed(0))[0]

    a, b = run(), run()
    assert not torch.equal(a, b)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(n)
    _check_normal(a, 1.0, rel=0.015, cdf_se=6.0)


def test_secure_key_comes_from_os_urandom(monkeypatch):
    calls = []
    real = os.urandom
    monkeypatch.setattr(ops.os, "urandom", lambda k: calls.append(k) or real(k))
    key = ops.new_key("cpu", torch.Generator().manual_seed(0), secure=True)
    assert calls == [8, 8] and key.dtype == torch.int64 and (key >= 0).all() and (key < 2**61).all()


# ------------------------------------------------------------------ errors, NaN policy

def test_argument_errors(device):
    gs = grad_samples(3, device=device)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        dp.clip_and_noise(gs, 0.0, 1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        dp.clip_and_noise(gs, -1.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        dp.clip_and_noise(gs, 1.0, -0.1)
    with pytest.raises(ValueError, match="finite"):
        dp.clip_and_noise(gs, float("nan"), 1.0)
    with pytest.raises(TypeError, match="number"):
        dp.clip_and_noise(gs, "1", 1.0)
    bad = gs[:2] + [torch.zeros(4, 3, device=device)]
    with pytest.raises(ValueError, match="share their batch size"):
        dp.clip_and_noise(bad, 1.0, 1.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dp.clip_and_noise(gs, 1.0, 1.0, expected_batch_size=0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        dp.clip_and_noise(gs, 1.0, 1.0, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="out"):
        dp.clip_and_noise(gs, 1.0, 1.0, out=[torch.empty(2, device=device)] * len(gs))
    with pytest.raises(TypeError, match="list of tensors"):
        dp.clip_and_noise(gs[0], 1.0, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        dp.clip_and_noise([torch.ones(2, 3, dtype=torch.int64, device=device)], 1.0, 1.0)


@pytest.mark.launch_free
def test_forced_kernel_backend_rejects_float64(backend, device):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("the torch backend computes float64")
    gs = [g.double() for g in grad_samples(2, device=device)]
    with pytest.raises(TypeError, match="float32, float16 and bfloat16.*backend='torch'"):
        dp.clip_and_noise(gs, 1.0, 0.0, backend=backend)


@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_float64_matches_opacus(device, choice):
    """float64 per-sample gradients and parameters: float64 math and float64
    noise draws (Opacus draws in the parameter's dtype), Opacus's bits."""
    gs = [g.double() for g in grad_samples(5, device=device)]
    got = opacus_noisy(gs, 0.6, 0.7, seed=9)
    torch.manual_seed(9)
    ours = dp.clip_and_noise(gs, 0.7, 0.6, backend=choice)
    assert all(o.dtype == torch.float64 and torch.equal(o, e) for o, e in zip(ours, got))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_samples_are_dropped_and_counted(backend, device, bad):
    gs = grad_samples(5, device=device)
    poisoned = [g.clone() for g in gs]
    poisoned[2][3].view(-1)[0] = bad          # sample 3, one element of one tensor
    count = torch.zeros(1, dtype=torch.int64, device=device)
    got = dp.clip_and_noise(poisoned, 1.0, 0.0, nonfinite_count=count, backend=backend)
    keep = [g[[0, 1, 2, 4]] for g in gs]      # the same batch without sample 3
    for e, g in zip(ref.clip_and_noise(keep, 1.0, 0.0), got):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, **FP32)
    assert count.tolist() == [1]
    dp.clip_and_noise(poisoned, 1.0, 0.0, nonfinite_count=count, backend=backend)
    assert count.tolist() == [2]              # accumulates


def test_nonfinite_raise(backend, device):
    gs = grad_samples(4, device=device)
    gs[0][1, 0, 0] = float("nan")
    out = [torch.full(g.shape[1:], 7.0, device=device) for g in gs]
    with pytest.raises(FloatingPointError, match="1 per-sample gradient"):
        dp.clip_and_noise(gs, 1.0, 1.0, out=out, on_nonfinite="raise", backend=backend)
    assert all((o == 7.0).all() for o in out)  # nothing written


# ------------------------------------------------------------------ no sync, constant launches

def test_no_host_sync(backend, device, no_host_sync):
    gs = grad_samples(6, device=device)
    summed = [torch.zeros(g.shape[1:], device=device) for g in gs]
    count = torch.zeros(1, dtype=torch.int64, device=device)
    dp.clip_and_noise(gs, 1.0, 1.0, backend=backend)  # tables built, kernels compiled
    with no_host_sync():
        dp.clip_and_accumulate(gs, 1.0, summed, nonfinite_count=count, backend=backend)
        dp.clip_and_noise(gs, 1.0, 1.0, summed=summed, expected_batch_size=6, nonfinite_count=count,
                          backend=backend)
        dp.clip_and_noise(gs, 1.0, 1.0, secure_mode=True, backend=backend)
        dp.add_noise(summed, 0.5, backend=backend)


def _launches(n_tensors, backend, device):
    from fastadv.bench.count import count
    shapes = [(7 + i % 5, 3) for i in range(n_tensors)]
    gs = grad_samples(3, shapes=shapes, device=device)
    dp.clip_and_noise(gs, 1.0, 1.0, backend=backend)   # table built
    fresh = grad_samples(3, shapes=shapes, device=device, seed=1)  # new pointers: one table refresh
    return count(lambda: dp.clip_and_noise(fresh, 1.0, 1.0, backend=backend))


def test_launches_constant_in_tensor_count(backend, device):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("the torch fallback launches per tensor")
    few, many = _launches(12, backend, device), _launches(48, backend, device)
    if device.type == "cpu":
        # the Triton interpreter: the key's generator is advanced by Opacus's torch.normal
        # draws, one per tensor (noise_key; on CUDA the key is one randint)
        assert (few["ops"].pop("normal"), many["ops"].pop("normal")) == (12, 48)
        few["launches"] -= 12
        many["launches"] -= 48
    assert few["launches"] == many["launches"] and "normal" not in many["ops"]
    assert few["kernels"] == many["kernels"] == {f"{backend}.dp_norm_partials": 1,
                                                 f"{backend}.dp_clip_factors": 1, f"{backend}.dp_clip_sum": 1}
    assert few["syncs"] == many["syncs"] == 0


# ------------------------------------------------------------------ DPOptimizer vs Opacus

def _model():
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


STEPS = [("plain", 5), ("skip", 3), ("skip", 0), ("last", 4), ("accumulated", 3), ("plain", 0), ("plain", 1)]


def _train(make_opt, steps, device):
    model = _model().to(device)
    opt = make_opt(model)
    hooks = []
    opt.attach_step_hook(lambda o: hooks.append(o.accumulated_iterations))
    history = []
    for i, (kind, batch) in enumerate(steps):
        gen = torch.Generator().manual_seed(100 + i)
        for p in model.parameters():
            def one():
                return (torch.randn(batch, *p.shape, generator=gen) * 3).to(device)
            p.grad_sample = [one(), one()] if kind == "accumulated" else one()
            p.grad = torch.full_like(p, 99.0)   # the non-private gradient autograd leaves there
        if kind == "skip":
            opt.signal_skip_step(True)
        elif kind in ("last", "accumulated"):
            opt.signal_skip_step(False)
        took = opt.step()
        history.append((took is not None, opt._is_last_step_skipped,
                        [None if p.summed_grad is None else p.summed_grad.clone() for p in model.parameters()],
                        [p.detach().clone() for p in model.parameters()]))
        opt.zero_grad()
    return history, hooks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_optimizer_matches_opacus(backend, device, reduction):
    def opacus_opt(model):
        return OpacusDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, loss_reduction=reduction)

    def fastadv_opt(model):
        return dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), noise_multiplier=0.0,
                              max_grad_norm=1.0, expected_batch_size=4, loss_reduction=reduction, backend=backend)

    expect, expect_hooks = _train(opacus_opt, STEPS, device)
    got, got_hooks = _train(fastadv_opt, STEPS, device)
    assert got_hooks == expect_hooks == [1, 1, 2, 1, 1]
    for (e_took, e_skip, e_summed, e_params), (g_took, g_skip, g_summed, g_params) in zip(expect, got):
        assert (g_took, g_skip) == (e_took, e_skip)
        for a, b in zip(g_summed, e_summed):
            torch.testing.assert_close(a, b, **FP32)
        for a, b in zip(g_params, e_params):
            torch.testing.assert_close(a, b, **FP32)


def test_optimizer_protocol(backend, device):
    model = _model().to(device)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=4, backend=backend)
    assert isinstance(opt, OpacusDPOptimizer)
    for p in model.parameters():
        p.grad_sample = torch.randn(4, *p.shape, device=device)
        p.grad = torch.zeros_like(p)
    ptrs = [p.grad.data_ptr() for p in model.parameters()]
    assert opt.pre_step() is True
    assert [p.grad.data_ptr() for p in model.parameters()] == ptrs   # written in place
    assert all(torch.isfinite(p.grad).all() and (p.grad != 0).any() for p in model.parameters())
    with pytest.raises(ValueError, match="zero_grad"):                # processed flags, as Opacus
        opt.pre_step()
    opt.zero_grad()
    for p in model.parameters():
        p.grad_sample = torch.randn(4, *p.shape, device=device)
        p.grad = None
    opt.step()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    with pytest.raises(ValueError, match="Per sample gradient is not initialized"):
        opt.step()
    list(model.parameters())[0].grad_sample = torch.randn(3, 4, 5, device=device)
    for p in list(model.parameters())[1:]:
        p.grad_sample = torch.randn(4, *p.shape, device=device)
    with pytest.raises(ValueError, match="share their batch size"):
        opt.step()
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=0.0,
                       expected_batch_size=4)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=-1.0, max_grad_norm=1.0,
                       expected_batch_size=4)
    opt.noise_multiplier = -2.0   # e.g. a broken scheduler
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        opt.step()


def test_optimizer_nonfinite(backend, device):
    model = _model().to(device)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                         expected_batch_size=4, backend=backend)
    for p in model.parameters():
        p.grad_sample = torch.randn(4, *p.shape, device=device)
    list(model.parameters())[0].grad_sample[2, 0, 0] = float("nan")
    opt.step()
    assert opt.nonfinite_samples.tolist() == [1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.zero_grad()
    opt.on_nonfinite = "raise"
    for p in model.parameters():
        p.grad_sample = torch.full((2, *p.shape), float("inf"), device=device)
    with pytest.raises(FloatingPointError, match="2 per-sample"):
        opt.step()


def test_optimizer_no_host_sync(backend, device, no_host_sync):
    model = _model().to(device)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=4, backend=backend)
    for _ in range(2):
        for p in model.parameters():
            p.grad_sample = torch.randn(4, *p.shape, device=device)
            p.grad = torch.zeros_like(p)
        with no_host_sync():
            opt.step()
        opt.zero_grad()


def test_clip_and_accumulate_add_noise_scale_grad_by_hand(backend, device):
    """Opacus's three methods, called one by one, still work (fused halves)."""
    def run(cls, **kw):
        model = _model().to(device)
        opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.5,
                  expected_batch_size=3, **kw)
        for p in model.parameters():
            p.grad_sample = torch.randn(3, *p.shape, generator=torch.Generator().manual_seed(p.numel())).to(device)
        opt.clip_and_accumulate()
        opt.add_noise()
        opt.scale_grad()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(run(dp.DPOptimizer, backend=backend), run(OpacusDPOptimizer)):
        torch.testing.assert_close(a, b, **FP32)


def test_distributed_optimizer_noise_on_rank0_only(backend, device, tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = _model().to(device)
        opt = dp.DistributedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0,
                                        max_grad_norm=1.0, expected_batch_size=4, backend=backend)
        assert isinstance(opt, opacus.optimizers.DistributedDPOptimizer)
        gs = [torch.randn(4, *p.shape, device=device) for p in model.parameters()]
        clean = ref.clip_and_noise(gs, 1.0, 0.0, expected_batch_size=4)
        grads = {}
        for rank in (0, 1):
            opt.rank = rank          # pretend to be another rank of a larger job
            for p, g in zip(model.parameters(), gs):
                p.grad_sample = g.clone()
            opt.step()              # pre_step + all_reduce (world of 1)
            grads[rank] = [p.grad.clone() for p in model.parameters()]
            opt.zero_grad()
        for a, c in zip(grads[1], clean):
            torch.testing.assert_close(a, c, **FP32)   # no noise off rank 0
        assert all((a - c).abs().max() > 0.05 for a, c in zip(grads[0], clean))  # noise, std 1/4
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ PrivacyEngine: one import

class _Data(torch.utils.data.Dataset):
    def __init__(self, n=64):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=gen)
        self.y = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _private_run(engine_cls, sigma, backend=None, physical=None, accountant="rdp", epochs=2, max_grad_norm=0.5,
                 batches=None, device="cpu"):
    """Two epochs of Poisson-sampled DP-SGD; ``batches`` (a list) receives each batch's inputs."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(_Data(), batch_size=16)
    kw = {"backend": backend} if backend else {}
    engine = engine_cls(accountant=accountant, **kw)
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=sigma, max_grad_norm=max_grad_norm)
    torch.manual_seed(1)  # Poisson sampling draws from the default generator
    for _ in range(epochs):
        if physical:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                    optimizer=optimizer) as small:
                _epoch(model, optimizer, small, batches, device)
        else:
            _epoch(model, optimizer, loader, batches, device)
    return engine, optimizer, [p.detach().clone() for p in model.parameters()]


def _epoch(model, optimizer, loader, batches=None, device="cpu"):
    for x, y in loader:
        if batches is not None:
            batches.append(x.clone())
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("physical", [None, 5])
def test_make_private_training_matches_opacus(backend, physical):
    if backend == "cuda":
        pytest.skip("CPU training run (the cuda backend is covered by the optimizer tests on GPU)")
    e_engine, e_opt, expect = _private_run(opacus.PrivacyEngine, 0.0, physical=physical)
    g_engine, g_opt, got = _private_run(dp.PrivacyEngine, 0.0, backend=backend, physical=physical)
    assert type(g_opt) is dp.DPOptimizer and type(e_opt) is OpacusDPOptimizer
    assert len(g_engine.accountant) == len(e_engine.accountant) > 0
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_get_epsilon_equals_opacus(accountant):
    e_engine, _, _ = _private_run(opacus.PrivacyEngine, 1.1, accountant=accountant)
    g_engine, _, params = _private_run(dp.PrivacyEngine, 1.1, backend="torch", accountant=accountant)
    assert all(torch.isfinite(p).all() for p in params)
    assert g_engine.get_epsilon(1e-5) == e_engine.get_epsilon(1e-5) > 0
    assert g_engine.accountant.history == e_engine.accountant.history


def _same_batches(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("physical", [None, 5])
def test_poisson_batches_follow_opacus_with_noise(backend, physical):
    """With noise, under one seed, the Poisson sampler draws Opacus's batches on
    every backend (the noise moves the generators as Opacus's does) and the
    default generator ends where Opacus leaves it; the torch backend also draws
    Opacus's noise: the same parameters."""
    if backend == "cuda":
        pytest.skip("CPU training run (test_gpu_poisson_batches_follow_opacus on GPU)")
    seen, mine = [], []
    _, _, expect = _private_run(opacus.PrivacyEngine, 1.1, physical=physical, batches=seen, epochs=1)
    state = torch.get_rng_state()
    _, _, got = _private_run(dp.PrivacyEngine, 1.1, backend=backend, physical=physical, batches=mine, epochs=1)
    assert len({len(x) for x in seen}) > 1 and _same_batches(mine, seen)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(got, expect):
        if backend == "torch":
            torch.testing.assert_close(a, b, **FP32)
        else:
            assert torch.isfinite(a).all() and not torch.equal(a, b)  # other noise numbers


HYPER = {  # (noise_multiplier, max_grad_norm) as schedulers and configs hand them over
    "np.float32 sigma": (np.float32(1.1), 0.5),
    "np.float64 both": (np.float64(1.1), np.float64(0.5)),
    "np.float32 both": (np.float32(1.1), np.float32(0.5)),
    "tensor C": (1.1, torch.tensor(0.5)),
    "tensor sigma": (torch.tensor(1.1), 0.5),
    "tensors": (torch.tensor(1.1), torch.tensor(0.5, dtype=torch.float64)),
    "np.int64 C": (1.1, np.int64(1)),
}


@pytest.mark.parametrize("kind", list(HYPER))
def test_hyperparameters_as_numpy_scalars_and_tensors(backend, device, kind):
    """fastadv.dp.DPOptimizer takes what Opacus's takes, at construction and set
    between steps; the torch backend gives Opacus's bits (noise included)."""
    sigma, C = HYPER[kind]

    def train(cls, **kw):
        model = _model().to(device)
        opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                  expected_batch_size=4, **kw)
        out = []
        for step in range(2):
            if step == 1:  # a scheduler sets them mid-training
                opt.noise_multiplier, opt.max_grad_norm = sigma, C
            gen = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad_sample = (torch.randn(4, *p.shape, generator=gen) * 2).to(device)
            torch.manual_seed(30 + step)
            opt.step()
            out.append([p.grad.clone() for p in model.parameters()])
            opt.zero_grad()
        return out

    expect, got = train(OpacusDPOptimizer), train(dp.DPOptimizer, backend=backend)
    for e_step, g_step in zip(expect, got):
        for e, g in zip(e_step, g_step):
            assert e.dtype == g.dtype and torch.isfinite(g).all()
            if backend == "torch":
                assert torch.equal(g, e)
    opt = dp.DPOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), noise_multiplier=sigma,
                         max_grad_norm=C, expected_batch_size=4, backend=backend)
    assert opt.noise_multiplier is sigma and opt.max_grad_norm is C  # kept as given, as Opacus keeps them


@pytest.mark.parametrize("kind", list(HYPER))
def test_clip_and_noise_takes_numpy_scalars_and_tensors(backend, device, kind):
    """The functional op: the noise std is Opacus's ``noise_multiplier * max_grad_norm``
    (computed on the objects given) and the clip factor Opacus's formula."""
    sigma, C = HYPER[kind]
    gs = grad_samples(5, device=device)
    clean = dp.clip_and_noise(gs, C, 0.0, backend=backend)
    for e, g in zip(opacus_noisy(gs, 0.0, C, seed=0), clean):
        torch.testing.assert_close(g, e, **FP32)
        if backend == "torch":
            assert torch.equal(g, e)
    torch.manual_seed(4)
    noisy = dp.clip_and_noise(gs, C, sigma, backend=backend)
    if backend == "torch":
        assert all(torch.equal(g, e) for g, e in zip(noisy, opacus_noisy(gs, sigma, C, seed=4)))
    else:  # the in-kernel noise, scaled by float(sigma * C)
        from fastadv.kernels.triton import rng
        torch.manual_seed(4)
        z = rng.probe(ops.new_key(device), 1)[1]
        std = float(sigma * C)
        torch.testing.assert_close(noisy[0] - clean[0], (z[:20] * std).view(5, 4), rtol=1e-5, atol=1e-5)


def test_make_private_takes_numpy_scalars_and_tensors(backend):
    if backend == "cuda":
        pytest.skip("CPU training run")
    sigma, C = np.float32(1.1), torch.tensor(0.5)
    e_engine, _, expect = _private_run(opacus.PrivacyEngine, sigma, max_grad_norm=C, epochs=1)
    g_engine, g_opt, got = _private_run(dp.PrivacyEngine, sigma, backend=backend, max_grad_norm=C, epochs=1)
    assert type(g_opt) is dp.DPOptimizer
    assert g_engine.accountant.history == e_engine.accountant.history
    assert g_engine.get_epsilon(1e-5) == e_engine.get_epsilon(1e-5) > 0
    if backend == "torch":
        assert all(torch.equal(a, b) for a, b in zip(got, expect))
    if backend != "torch":
        return  # a tensor noise multiplier on the kernels: test_hyperparameters_as_numpy_scalars_and_tensors
    # a 0-d tensor noise multiplier (Opacus's accountant is slow with it: no epsilon here)
    _, _, expect = _private_run(opacus.PrivacyEngine, torch.tensor(1.1), max_grad_norm=np.float64(0.5), epochs=1)
    _, _, got = _private_run(dp.PrivacyEngine, torch.tensor(1.1), backend=backend, max_grad_norm=np.float64(0.5),
                             epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(got, expect))


def test_bad_hyperparameter_types(device):
    gs = grad_samples(3, device=device)
    with pytest.raises(TypeError, match="0-d real tensor"):
        dp.clip_and_noise(gs, torch.tensor([1.0]), 1.0)
    with pytest.raises(TypeError, match="number"):
        dp.clip_and_noise(gs, 1.0, True)
    with pytest.raises(TypeError, match="0-d real tensor"):
        dp.clip_and_noise(gs, torch.tensor(True), 1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        dp.clip_and_noise(gs, np.float32(0.0), 1.0)
    model = _model()
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=4)
    opt.max_grad_norm = [1.0, 2.0]  # per-layer clipping values belong to Opacus's DPPerLayerOptimizer
    for p in model.parameters():
        p.grad_sample = torch.randn(4, *p.shape)
    with pytest.raises(TypeError, match="max_grad_norm must be a number"):
        opt.step()


def test_noise_key_moves_the_cpu_generator_like_opacus():
    """On the CPU the DP key is read from a snapshot of the generator, which then
    advances by Opacus's own torch.normal draws (shape and dtype of each tensor)."""
    draws = [((5, 4), torch.float32), ((3,), torch.float64), ((17,), torch.float32), ((2, 9), torch.float16)]
    gen = torch.Generator().manual_seed(3)
    key = ops.noise_key("cpu", gen, False, draws)
    assert torch.equal(key, ops.new_key("cpu", torch.Generator().manual_seed(3)))
    twin = torch.Generator().manual_seed(3)
    for shape, dtype in draws:
        torch.normal(0.0, 1.0, shape, generator=twin, dtype=dtype)
    assert torch.equal(gen.get_state(), twin.get_state())
    again = ops.noise_key("cpu", gen, False, draws)
    assert not torch.equal(again, key)  # a new key per call
    before = gen.get_state()
    ops.noise_key("cpu", gen, True, draws)  # secure: os.urandom, the generator is left alone
    assert torch.equal(gen.get_state(), before)


def test_engine_keeps_opacus_optimizers_it_does_not_replace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    loader = torch.utils.data.DataLoader(_Data(), batch_size=16)
    engine = dp.PrivacyEngine(accountant="rdp")
    _, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                    data_loader=loader, noise_multiplier=1.0, max_grad_norm=[1.0, 1.0],
                                    clipping="per_layer")
    assert type(opt) is opacus.optimizers.DPPerLayerOptimizer


# ------------------------------------------------------------------ seed 000's optimizer

def _seed_pair(backend, device, sigma, C, dtype=torch.float32):
    torch.manual_seed(13)
    lin = nn.Linear(37, 29).to(device, dtype)
    other = nn.Linear(37, 29).to(device, dtype)
    other.load_state_dict(lin.state_dict())
    grads = [torch.randn_like(p) * 10 for p in lin.parameters()]
    for p, q, g in zip(lin.parameters(), other.parameters(), grads):
        p.grad, q.grad = g.clone(), g.clone()
    return lin, other


@pytest.mark.parametrize("C", [0.5, 1e6])
def test_seed_optimizer_matches_reference(backend, device, C):
    lin, other = _seed_pair(backend, device, 0.0, C)
    w0 = [p.detach().clone() for p in other.parameters()]
    assert ref.DPOptimizer(lin.parameters(), noise_multiplier=0.0, max_grad_norm=C).step() is None
    opt = dp.seed.DPOptimizer(other.parameters(), noise_multiplier=0.0, max_grad_norm=C, backend=backend)
    assert opt.step() is None
    for p, q, w in zip(lin.parameters(), other.parameters(), w0):
        torch.testing.assert_close(q.grad, p.grad, **FP32)
        assert torch.equal(q.detach(), w)   # never updates the parameters, like the seed
    if C == 1e6:                            # no clipping: multiplied by exactly 1
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(lin.parameters(), other.parameters()))


def test_seed_optimizer_noise(backend, device):
    p = nn.Parameter(torch.zeros(4 * 4096, device=device))
    p.grad = torch.zeros_like(p)
    dp.seed.DPOptimizer([p], noise_multiplier=0.7, max_grad_norm=1e9, backend=backend).step()
    assert p.grad.mean().abs() < 5 * 0.7 / 128 and p.grad.std().item() == pytest.approx(0.7, rel=0.03)
    lin, other = _seed_pair(backend, device, 0.3, 0.5)
    torch.manual_seed(5)
    ref.DPOptimizer(lin.parameters(), noise_multiplier=0.3, max_grad_norm=0.5).step()
    torch.manual_seed(5)
    dp.seed.DPOptimizer(other.parameters(), noise_multiplier=0.3, max_grad_norm=0.5, backend=backend).step()
    if backend == "torch":                  # same draws as the seed: bitwise
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(lin.parameters(), other.parameters()))
    torch.manual_seed(5)
    again = _seed_pair(backend, device, 0.3, 0.5)[1]
    torch.manual_seed(5)
    dp.seed.DPOptimizer(again.parameters(), noise_multiplier=0.3, max_grad_norm=0.5, backend=backend).step()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(again.parameters(), other.parameters()))


def test_seed_optimizer_semantics(backend, device):
    a, b = nn.Linear(3, 2).to(device), nn.Linear(2, 2).to(device)
    for p in list(a.parameters()) + list(b.parameters()):
        p.grad = torch.full_like(p, 5.0)
    opt = dp.seed.DPOptimizer([{"params": a.parameters()}, {"params": b.parameters()}],
                              noise_multiplier=0.0, max_grad_norm=1.0, backend=backend)
    opt.step()
    total = torch.cat([p.grad.flatten() for p in a.parameters()]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)                  # first group clipped
    assert all((p.grad == 5.0).all() for p in b.parameters())            # other groups untouched
    a.bias.grad = None
    before = a.weight.grad.clone()
    with pytest.raises(TypeError, match="no gradient"):
        opt.step()
    assert torch.equal(a.weight.grad, before)                             # nothing modified


def test_seed_optimizer_launches_and_sync(backend, device, no_host_sync):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("kernel backends only")
    from fastadv.bench.count import count

    def launches(n):
        ps = [nn.Parameter(torch.randn(5 + i, device=device)) for i in range(n)]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = dp.seed.DPOptimizer(ps, noise_multiplier=0.1, max_grad_norm=1.0, backend=backend)
        opt.step()
        with no_host_sync():
            return count(opt.step)["launches"]

    assert launches(12) == launches(48)


# ------------------------------------------------------------------ DP-Logits

def test_gaussian_sigma():
    s = dp.gaussian_sigma(1.0, 1e-5)
    assert s == pytest.approx(3.7306, rel=1e-3)            # analytic Gaussian mechanism
    assert s < math.sqrt(2 * math.log(1.25 / 1e-5))         # below the classical bound
    assert dp.gaussian_sigma(1.0, 1e-5, sensitivity=4.0) == pytest.approx(4 * s, rel=1e-9)
    assert dp.gaussian_sigma(0.5, 1e-5) > s
    with pytest.raises(ValueError):
        dp.gaussian_sigma(0.0, 1e-5)
    with pytest.raises(ValueError):
        dp.gaussian_sigma(1.0, 1.5)


def test_dp_logits(backend, device):
    logits = torch.randn(512, 16, device=device, requires_grad=True)
    torch.manual_seed(3)
    noisy = dp.dp_logits(logits, 0.5, backend=backend)
    assert noisy.shape == logits.shape and noisy.requires_grad
    diff = (noisy - logits).detach()
    assert diff.std().item() == pytest.approx(0.5, rel=0.05) and abs(diff.mean().item()) < 0.02
    noisy.sum().backward()
    assert torch.equal(logits.grad, torch.ones_like(logits))   # identity gradient
    torch.manual_seed(3)
    assert torch.equal(dp.dp_logits(logits.detach(), 0.5, backend=backend), noisy.detach())
    clipped = dp.dp_logits(logits.detach() * 100, 0.0, clip_norm=2.0, backend=backend)
    assert (clipped.norm(dim=-1) <= 2.0 + 1e-5).all()
    with pytest.raises(ValueError):
        dp.dp_logits(logits, -1.0)


def test_dp_logits_module(backend, device):
    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return type("Out", (), {"logits": self.lin(x)})()

    model = nn.Linear(4, 3).to(device)
    served = dp.DPLogits(model, epsilon=1.0, delta=1e-5, clip_norm=1.0, backend=backend)
    assert served.sigma == pytest.approx(dp.gaussian_sigma(1.0, 1e-5, 2.0))
    x = torch.randn(8, 4, device=device)
    assert served(x).shape == (8, 3)
    out = dp.DPLogits(HF().to(device), 0.1, backend=backend)(x)
    assert out.logits.shape == (8, 3)
    with pytest.raises(ValueError, match="calibrate"):
        dp.DPLogits(model, epsilon=1.0)


# ------------------------------------------------------------------ CUDA library, no GPU needed

def test_cuda_library_exports_and_checks_arguments():
    import fastadv.kernels.cuda as fcuda
    if fcuda.load_error() is not None:
        pytest.skip(f"CUDA library not usable: {fcuda.load_error()}")
    from fastadv.kernels.cuda import dp as cdp  # noqa: F401  (declares the signatures)
    lib = fcuda.lib()
    for name in ("fastadv_dp_norm_partials", "fastadv_dp_clip_factors", "fastadv_dp_clip_sum",
                 "fastadv_dp_seed_sumsq", "fastadv_dp_global_norm", "fastadv_dp_seed_update"):
        assert hasattr(lib, name) and name in fcuda._SIGNATURES, name
    out = ctypes.c_float()
    assert lib.fastadv_dp_clip_sum(None, 0, 0, 1024, 1, 0, 0, None, None, 0.0, 1.0, 0, 0, None) == 1
    assert b"chunks of 4096" in lib.fastadv_last_error()
    assert lib.fastadv_dp_clip_sum(None, 1, 1, 4096, 1, 0, 0, None, None, 0.0, 1.0, 0, 0, None) == 1
    assert b"table is NULL" in lib.fastadv_last_error()
    assert lib.fastadv_dp_norm_partials(None, 0, 0, 4096, -1, 0, None, 1, 0, None) == 1
    assert b"negative size" in lib.fastadv_last_error()
    assert lib.fastadv_dp_clip_factors(None, 3, 2, None, None, 1.0, None) == 1
    assert b"partials is NULL" in lib.fastadv_last_error()
    assert lib.fastadv_dp_seed_update(None, 0, 0, 4096, 0, None, None, 1.0, 0.0, 0, None) == 0  # no work
    assert lib.fastadv_dp_clip_sum(None, 0, 0, 4096, 3, 9, 9, None, None, 0.0, 1.0, 0, 0, None) == 0
    assert lib.fastadv_dp_global_norm(None, 0, None, None) == 1
    assert b"out is NULL" in lib.fastadv_last_error()
    del out


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_agree(dtype, no_host_sync):
    """triton, cuda and torch on BERT-like shapes, fp32 / fp16 / bf16 per-sample
    gradients, fp32 results; under sync debug mode."""
    from fastadv._backend import why_not
    shapes = [(768, 768), (768,), (3072, 768), (768, 3072), (3072,), (2, 768), (7, 5, 3)]
    gs = grad_samples(32, shapes=shapes, device="cuda", dtype=dtype,
                      scales=[0.001, 0.01, 0.1, 1.0, 0.0, 1e3])
    expect = ref.clip_and_noise([g.float() for g in gs], 1.0, 0.0, expected_batch_size=32)
    for backend in ("torch", "triton", "cuda"):
        if why_not(backend, torch.device("cuda")) is not None:
            continue
        out = [torch.empty(s, device="cuda") for s in shapes]
        dp.clip_and_noise(gs, 1.0, 0.0, expected_batch_size=32, out=out, backend=backend)
        with no_host_sync():
            dp.clip_and_noise(gs, 1.0, 0.0, expected_batch_size=32, out=out, backend=backend)
        for e, o in zip(expect, out):
            torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_triton_and_cuda_draw_the_same_noise():
    from fastadv._backend import why_not
    if why_not("cuda", torch.device("cuda")) or why_not("triton", torch.device("cuda")):
        pytest.skip("needs both kernel backends")
    gs = zeros_grads([5000, 3, 70000], "cuda")
    for secure in (False,):
        a = dp.clip_and_noise(gs, 1.0, 1.0, backend="triton", generator=torch.Generator("cuda").manual_seed(4))
        b = dp.clip_and_noise(gs, 1.0, 1.0, backend="cuda", generator=torch.Generator("cuda").manual_seed(4))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_optimizer_under_sync_debug(no_host_sync):
    from fastadv._backend import usable
    for backend, why in usable(torch.device("cuda")).items():
        if why is not None:
            continue
        model = _model().cuda()
        opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=4, backend=backend)
        for _ in range(3):
            for p in model.parameters():
                p.grad_sample = torch.randn(4, *p.shape, device="cuda")
                p.grad = torch.zeros_like(p)
            with no_host_sync():
                opt.step()
            opt.zero_grad()


@pytest.mark.gpu
def test_gpu_poisson_batches_follow_opacus():
    """On CUDA Opacus's noise draws from the device generator and its Poisson
    sampler from the CPU one: with fastadv's key (drawn from the device
    generator) the batches are Opacus's on every backend."""
    from fastadv._backend import usable
    seen = []
    _private_run(opacus.PrivacyEngine, 1.1, batches=seen, device="cuda")
    for backend, why in usable(torch.device("cuda")).items():
        if why is None:
            mine = []
            _private_run(dp.PrivacyEngine, 1.1, backend=backend, batches=mine, device="cuda")
            assert _same_batches(mine, seen), backend


# ------------------------------------------------------------------ device guard, vector access


def odd_or_aligned(shape, odd, device, dtype=torch.float32):
    """random ``shape``; ``odd``: at an address that is not a multiple of 16 bytes."""
    if odd:
        t = torch.randn(math.prod(shape) + 1, device=device, dtype=dtype)[1:].view(shape)
    else:
        t = torch.randn(shape, device=device, dtype=dtype)
    assert (t.data_ptr() % 16 != 0) == odd
    return t


def test_kernel_launches_run_under_the_device_guard(backend, device, monkeypatch):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("kernel backends only")
    seen = record_guards(monkeypatch, ops)
    gs = grad_samples(3, device=device)
    before = launches_total()
    dp.clip_and_noise(gs, 1.0, 1.0, backend=backend)
    ops.clip_grad_norm_and_noise_([torch.randn(5, device=device)], 1.0, 1.0, backend=backend)
    total = launches_total() - before
    assert total > 0 and seen["inside"] == total
    assert seen["devices"] and all(d == gs[0].device for d in seen["devices"])


@pytest.mark.parametrize("case", ["aligned", "odd-rows", "odd-address"])
def test_blocks_tails_and_alignment(backend, device, case):
    # per-sample sizes of 2 whole chunks + whole blocks + a tail; rows aligned (n * 4 % 16 == 0)
    # or not, base addresses aligned or not: the kernels' vector and scalar paths agree with torch
    if backend not in KERNEL_BACKENDS:
        pytest.skip("kernel backends only")
    from fastadv.kernels.triton import dp as tdp
    from fastadv.kernels.triton.multi_tensor import TableCache
    n = 4096 * 2 + 1024 * 2 + (5 if case == "odd-rows" else 4)
    small = 7 if case == "odd-rows" else 8
    gs = [odd_or_aligned((3, n), case == "odd-address", device), odd_or_aligned((3, small), False, device)]
    gs[0][1] *= 100.0  # one sample clipped
    got = dp.clip_and_noise(gs, 1.0, 0.0, expected_batch_size=3, backend=backend)
    expect = ref.clip_and_noise(gs, 1.0, 0.0, expected_batch_size=3)  # Opacus's ops
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, **FP32)
    table = TableCache().get("dp", [[torch.empty(g.shape[1:], device=device) for g in gs]] * 2 + [gs],
                             chunk=tdp.CHUNK)
    assert tdp._rows_aligned(table, torch.float32) == (case == "aligned")
    # with noise: the same key draws the same noise on the vector and the scalar paths
    twins = [g.clone() for g in gs]  # fresh (aligned) copies
    a = dp.clip_and_noise(gs, 1.0, 1.0, generator=torch.Generator(device).manual_seed(5), backend=backend)
    b = dp.clip_and_noise(twins, 1.0, 1.0, generator=torch.Generator(device).manual_seed(5), backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **FP32)
    seed = [odd_or_aligned((n,), case == "odd-address", device)]
    p = nn.Parameter(torch.zeros(n, device=device))
    p.grad = seed[0].clone()
    ref.DPOptimizer([p], noise_multiplier=0.0, max_grad_norm=1.0).step()  # seed 000: clip_grad_norm_
    ops.clip_grad_norm_and_noise_(seed, 1.0, 0.0, backend=backend)
    torch.testing.assert_close(seed[0], p.grad, **FP32)


# ------------------------------------------------------------------ torch.library ops, torch.compile

DP_OPS = ("dp_clip_and_noise", "dp_clip_and_accumulate", "dp_add_noise", "dp_seed_clip_noise_",
          "dp_noise_key", "dp_normal")


def test_every_dp_op_is_registered():
    from fastadv.ops import _registry
    assert set(DP_OPS) <= set(_registry.registered())


def _op_cases(backend, device):
    """(name, op, args) for each compute op: per-sample gradients of odd sizes,
    a carried sum, a non-finite counter, noise as the backend takes it."""
    gs = grad_samples(4, shapes=[(5, 3), (7,)], device=device)
    summed = [torch.randn(5, 3, device=device), torch.randn(7, device=device)]
    out = [torch.empty(5, 3, device=device), torch.empty(7, device=device)]
    count = torch.zeros(1, dtype=torch.int64, device=device)
    kernel = backend in KERNEL_BACKENDS
    key = ops.new_key(device) if kernel else None
    noise = [] if kernel else [torch.randn(15, device=device), torch.randn(7, device=device)]
    grads = [torch.randn(5, 3, device=device), torch.randn(7, device=device)]
    return [
        ("noise", ops.clip_and_noise_op, (gs, summed, out, count, key, noise, 1.0, 0.5, 4.0, True, True,
                                          False, False, False, backend)),
        ("noise, no summed", ops.clip_and_noise_op, (gs, [], out, None, None, [], 1.0, 0.0, None, False,
                                                     False, False, True, False, backend)),
        ("accumulate", ops.clip_and_accumulate_op, (gs, summed, count, 1.0, True, False, False, backend)),
        ("add_noise", ops.add_noise_op, (summed, out, key, noise, 0.5, 2.0, False, backend)),
        ("seed", ops.seed_clip_noise_op, (grads, key, noise, 1.0, 0.1, backend)),
    ]


def test_opcheck(backend, device):
    """torch.library.opcheck (schema and declared mutation, fake tensors, autograd
    registration, AOT dispatch) on every DP compute op; the triton backend runs
    its kernels under the interpreter inside the checks."""
    for what, op, args in _op_cases(backend, device):
        try:
            torch.library.opcheck(op.overload, args)
        except Exception as exc:
            raise AssertionError(f"opcheck of {op.name} ({what}) failed") from exc


@pytest.mark.parametrize("secure", [False, True])
def test_opcheck_random_draws(device, secure):
    """The two draw ops: the key (a device int64 [seed, base]) and the torch
    backend's noise (each tensor's numel, dtype and device; float32 when secure).
    opcheck compares an eager and an AOT run under one generator state: secure
    draws come from os.urandom, so for them that comparison is left out (by
    design no two secure calls agree) and the others run."""
    like = [torch.empty(5, 3, device=device), torch.empty(7, device=device, dtype=torch.float64)]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if secure else \
        torch.library._OPCHECK_DEFAULT_UTILS
    torch.library.opcheck(ops.noise_key_op.overload, (like, secure, True), test_utils=utils)
    torch.library.opcheck(ops.noise_key_op.overload, (like, secure, False), test_utils=utils)
    torch.library.opcheck(ops.normal_op.overload, (like, 0.5, secure), test_utils=utils)
    key = ops.noise_key_op(like, secure, True)
    assert key.shape == (2,) and key.dtype == torch.int64 and key.device == like[0].device
    z = ops.normal_op(like, 0.5, secure)
    assert [t.shape for t in z] == [(15,), (7,)]
    assert [t.dtype for t in z] == ([torch.float32] * 2 if secure else [torch.float32, torch.float64])


def test_op_without_generator_draws_what_the_generator_does(backend, device):
    """generator=None goes through the draw ops (dp_noise_key / dp_normal, the form
    torch.compile traces); an explicit generator of the same state draws the same."""
    gs = grad_samples(4, device=device)
    torch.manual_seed(21)
    a = dp.clip_and_noise(gs, 1.0, 0.7, backend=backend)
    b = dp.clip_and_noise(gs, 1.0, 0.7, backend=backend,
                          generator=torch.Generator(device=device).manual_seed(21))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _dp_step(backend):
    def step(w, x, y):
        # per-sample gradients of 0.5 (x.w + b - y)^2 for a linear model, in the graph
        r = x @ w["w"] + w["b"] - y
        gs = [r[:, None] * x, r]
        gw, gb = dp.clip_and_noise(gs, 1.0, 0.5, expected_batch_size=x.shape[0], backend=backend)
        return {"w": w["w"] - 0.1 * gw, "b": w["b"] - 0.1 * gb}
    return step


def test_compiled_dp_step_has_no_graph_break(backend, device):
    """A DP step calling fastadv.dp.clip_and_noise on per-sample gradients under
    torch.compile(fullgraph=True): no graph break, no warning from fastadv's
    wrapper code, and under one torch.manual_seed the same numbers as eager
    (noise included: the key / noise are drawn by the registered draw ops; a
    different draw would be off by the noise's std, 0.5 / 8, not by rounding)."""
    import warnings
    torch._dynamo.reset()
    w = {"w": torch.randn(6, device=device), "b": torch.zeros((), device=device)}
    x, y = torch.randn(8, 6, device=device), torch.randn(8, device=device)
    step = _dp_step(backend)
    compiled = torch.compile(step, fullgraph=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for seed in (5, 6):
            torch.manual_seed(seed)
            got = compiled(w, x, y)
            torch.manual_seed(seed)
            expect = step(w, x, y)
            for k in w:  # the graph's matmul / pointwise code is Inductor's: fp32 rounding apart
                torch.testing.assert_close(got[k], expect[k], **FP32)
    # _backend.why_not's lru_cache (the registry's backend rule, not this op's code) is the one
    # warning Dynamo gives on the triton path; anything else from fastadv fails the test
    ours = [str(m.message) for m in seen if ("fastadv" in str(m.filename) or "/fastadv/" in str(m.message))
            and "_backend.py" not in str(m.message)]
    assert not ours, ours


def test_compiled_call_with_a_generator_says_what_to_do():
    """A torch.Generator cannot enter a graph: under torch.compile the wrapper
    refuses it with the fix (generator=None, torch.manual_seed)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)

    def step(g):
        return dp.clip_and_noise([g], 1.0, 0.5, generator=gen, backend="torch")[0]

    with pytest.raises(Exception, match=r"(?s)generator=None.*manual_seed"):
        torch.compile(step, fullgraph=True)(torch.randn(4, 3))


# ------------------------------------------------------------------ seed 000's name

def test_seed_optimizer_names_cannot_be_confused():
    """fastadv.DPOptimizer (seed 000: total-norm clip + noise) is SeedDPOptimizer,
    warns once on first use, and is unrelated to fastadv.dp.DPOptimizer (Opacus's)."""
    import warnings

    import fastadv
    from fastadv.dp import seed
    assert seed.DPOptimizer is seed.SeedDPOptimizer
    assert issubclass(fastadv.DPOptimizer, seed.SeedDPOptimizer) and fastadv.DPOptimizer.__name__ == "DPOptimizer"
    assert not issubclass(dp.DPOptimizer, seed.SeedDPOptimizer)
    assert issubclass(dp.DPOptimizer, OpacusDPOptimizer)
    assert "seed 000" in fastadv.DPOptimizer.__doc__ and "NOT" in seed.__doc__
    p = nn.Parameter(torch.zeros(3))
    before = seed._warned
    try:
        seed._warned = False
        with pytest.warns(seed.SeedDPOptimizerWarning) as caught:
            fastadv.DPOptimizer([p], noise_multiplier=0.1)
        message = str(caught[0].message)
        assert caught[0].filename == __file__  # points at the user's line
        for words in ("seed 000", "TOTAL gradient norm", "NOT per-sample differential privacy",
                      "fastadv.dp.DPOptimizer", "fastadv.dp.PrivacyEngine", "SeedDPOptimizer"):
            assert words in message, words
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fastadv.DPOptimizer([p], noise_multiplier=0.1)      # once per process
            seed.SeedDPOptimizer([p], noise_multiplier=0.1)     # the explicit name never warns
            seed.DPOptimizer([p], noise_multiplier=0.1)
    finally:
        seed._warned = before


def test_docs_say_which_dp_optimizer_is_which():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "dp.md")).read()
    head = "\n".join(text.splitlines()[:12])
    assert "fastadv.DPOptimizer" in head and "fastadv.dp.DPOptimizer" in head and "not" in head.lower()


# --- the registry's device and layout rules, as ops/dp.py applies them -------

META = torch.device("meta")


@pytest.mark.launch_free
def test_summed_and_out_on_another_device_refused_on_every_backend(backend):
    gs = [torch.rand(3, 4), torch.rand(3, 2)]
    with pytest.raises(ValueError, match=r"summed\[1\] is on meta, expected cpu \(grad_samples\[0\] on cpu, "
                                         r"summed\[1\] on meta\); move them to one device"):
        dp.clip_and_noise(gs, 1.0, 1.0, summed=[torch.zeros(4), torch.zeros(2, device=META)], backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] is on meta, expected cpu"):
        dp.clip_and_noise(gs, 1.0, 1.0, out=[torch.zeros(4, device=META), torch.zeros(2)], backend=backend)
    with pytest.raises(ValueError, match=r"out\[1\] is on meta, expected cpu \(out\[0\] on cpu, out\[1\] on meta\)"):
        dp.add_noise([torch.zeros(4), torch.zeros(2)], 1.0,
                     out=[torch.zeros(4), torch.zeros(2, device=META)], backend=backend)


@pytest.mark.launch_free
def test_kernel_limits_refused_by_a_forced_kernel_backend(backend):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("kernel limits: the torch backend takes these inputs")
    with pytest.raises(ValueError, match=rf"the {backend} backend needs every tensor on one device, "
                                         r"got \['cpu', 'meta'\]; use backend='torch'"):
        dp.clip_and_noise([torch.rand(3, 4), torch.rand(3, 2, device=META)], 1.0, 1.0, backend=backend)
    with pytest.raises(ValueError, match=rf"the {backend} backend needs every tensor on one device"):
        ops.clip_grad_norm_and_noise_([torch.rand(4), torch.rand(2, device=META)], 1.0, 1.0, backend=backend)
    for sparse, layout in [(torch.rand(4, 4).to_sparse(), "sparse_coo"), (torch.rand(4, 4).to_sparse_csr(), "sparse_csr")]:
        with pytest.raises(ValueError, match=rf"the {backend} backend needs dense gradients, got a "
                                             rf"torch.{layout} tensor; use backend='torch'"):
            ops.clip_grad_norm_and_noise_([sparse], 1.0, 0.0, backend=backend)
    with pytest.raises(TypeError, match=r"summed tensor in the output's dtype|output in the summed tensor's dtype"):
        dp.clip_and_noise([torch.rand(3, 4), torch.rand(3, 2)], 1.0, 1.0,
                          summed=[torch.zeros(4), torch.zeros(2)], out=[torch.zeros(4), torch.zeros(2).half()],
                          backend=backend)
