"""fastadv.sift (and its ops, fastadv.ops.sift) against a reference written
from DeBERTa's SiFT math (fastadv.reference.sift), on a tiny model, on every
backend; the registered ops (opcheck), the CUDA entry points' argument checks.

The initial perturbation is drawn inside the kernel (Philox), so the reference
is given the very same initial delta; from there on everything (the layer
norm, the max-norm step, the symmetric KL, the gradients) must agree.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastadv.reference.sift as ref
from fastadv import sift
from fastadv.ops import noise as ops_noise
from fastadv.ops import sift as ops

from conftest import DEVICE, launches_total, record_guards

FP32 = dict(rtol=1e-5, atol=1e-6)
HIDDEN = 16


class Embeddings(nn.Module):
    def __init__(self, vocab=50, hidden=HIDDEN):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, ids):
        return self.LayerNorm(self.word_embeddings(ids))


class Tiny(nn.Module):
    """embeddings (with the SiFT target ``embeddings.LayerNorm``) -> tanh -> head."""

    def __init__(self, classes=5):
        super().__init__()
        self.embeddings = Embeddings()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, classes)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.proj(self.embeddings(input_ids)))).mean(1)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return logits, loss


def logits_fn(model, *args, **kwargs):
    return model(*args, **kwargs)[0]


class Recorder:
    """Wraps logits_fn to record the layer's delta and perturbed input at each call."""

    def __init__(self, layer):
        self.layer, self.deltas, self.perts = layer, [], []

    def __call__(self, model, *args, **kwargs):
        out = logits_fn(model, *args, **kwargs)
        self.deltas.append(self.layer.delta.detach().clone())
        self.perts.append(self.layer.perturbated_input.detach().clone())
        return out


def run_step(model, learner, layer, data, loss_fn="symmetric-kl"):
    """One training step with SiFT; returns (adv loss, recorder)."""
    rec = Recorder(layer)
    logits, loss = model(**data)
    adv_loss = learner.loss(logits, rec, loss_fn, **data)
    (loss + adv_loss).backward()
    return adv_loss, rec


def pair(backend, lr=0.1, ip=0.02):
    torch.manual_seed(0)
    model = Tiny().to(DEVICE)
    twin = copy.deepcopy(model)
    layers = sift.hook_sift_layer(model, HIDDEN, learning_rate=lr, init_perturbation=ip, backend=backend)
    ref_layers = ref.hook_sift_layer(twin, HIDDEN, learning_rate=lr, init_perturbation=ip)
    return (model, sift.AdversarialLearner(model, layers), layers), \
        (twin, ref.AdversarialLearner(twin, ref_layers), ref_layers)


def data():
    return {"input_ids": torch.randint(0, 50, (3, 7), device=DEVICE),
            "labels": torch.randint(0, 5, (3,), device=DEVICE)}


@pytest.mark.parametrize("loss_fn", ["symmetric-kl", "kl", "mse", ref.symmetric_kl])
def test_matches_reference(backend, loss_fn):
    (model, learner, layers), (twin, ref_learner, ref_layers) = pair(backend)
    assert len(layers) == len(ref_layers) == 1
    for _ in range(2):  # two steps: the layers reset between them
        batch = data()
        loss, rec = run_step(model, learner, layers[0], batch, loss_fn)
        ref_layers[0].initial_delta = lambda d=rec.deltas[0]: d.clone()  # the same draw
        ref_loss, ref_rec = run_step(twin, ref_learner, ref_layers[0], batch, loss_fn)
        torch.testing.assert_close(loss, ref_loss, **FP32)
        for a, b in zip(rec.deltas + rec.perts, ref_rec.deltas + ref_rec.perts):
            torch.testing.assert_close(a, b, **FP32)
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, **FP32, msg=n)
        # the step moved delta by lr * g / (1e-6 + max|g|) per token: below lr, not zero
        step = (rec.deltas[1] - rec.deltas[0]).abs().amax(-1)
        assert float(step.max()) <= 0.1 * (1 + 1e-5) and float(step.min()) > 0
        assert layers[0].delta is None and not layers[0].adversarial_mode
        assert all(p.requires_grad for p in model.parameters())


def test_initial_perturbation_statistics(backend):
    ip = 0.05
    x = torch.zeros(1 << 17, device=DEVICE)
    delta, pert = ops.sift_init(x, ip, backend=backend)
    assert delta.dtype == torch.float32 and torch.equal(pert, x + delta)
    bound = torch.tensor(2 * ip, dtype=torch.float32)  # 2 ip as fp32 computes it
    assert float(delta.abs().max()) == float(bound)
    at_bound = float((delta.abs() == bound).double().mean())
    tail = math.erfc(2 / math.sqrt(2))  # P(|z| >= 2) = 0.0455
    assert abs(at_bound - tail) < 5 * math.sqrt(tail / delta.numel())
    inside = delta[delta.abs() < bound].double() / ip
    # N(0, 1) conditioned on |z| < 2: its KS distance to the truncated normal
    lo = torch.special.ndtr(torch.tensor(-2.0, dtype=torch.float64))
    cdf = lambda v: (torch.special.ndtr(v) - lo) / (1 - 2 * lo)  # noqa: E731
    v, _ = torch.sort(inside.cpu())
    i = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    f = cdf(v)
    d = float(torch.maximum(i / v.numel() - f, f - (i - 1) / v.numel()).max())
    assert d < 1.95 / math.sqrt(v.numel())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter squares 3e38
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step(backend, bad, no_host_sync):
    x = torch.randn(6, 40, device=DEVICE)
    delta, _ = ops.sift_init(x, 0.01, backend=backend)
    before = delta.clone()
    grad = torch.randn(6, 40, device=DEVICE)
    grad[2, 3] = bad
    with no_host_sync():
        pert, ok = ops.sift_update_(x, delta, grad, 1e-3, backend=backend)
    assert not bool(ok)
    assert torch.equal(delta, before)
    torch.testing.assert_close(pert, x + before, **FP32)
    big = torch.full((6, 40), 3e38, device=DEVICE)  # ||g|| overflows to inf: skipped too (DeBERTa's norm test)
    pert, ok = ops.sift_update_(x, delta, big, 1e-3, backend=backend)
    assert not bool(ok) and torch.equal(delta, before)
    pert, ok = ops.sift_update_(x, delta, torch.where(torch.isfinite(grad), grad, 0.0), 1e-3, backend=backend)
    assert bool(ok) and not torch.equal(delta, before)


def test_update_is_bit_exact_in_fp32(backend):
    # lr * g / (1e-6 + max|g|) in DeBERTa's order, IEEE division: bit-equal to PyTorch
    x = torch.randn(9, 33, device=DEVICE)
    delta = torch.randn(9, 33, device=DEVICE) * 0.01
    grad = torch.randn(9, 33, device=DEVICE)
    expect = delta + 3e-4 * grad / (1e-6 + grad.abs().max(-1, keepdim=True)[0])
    got = delta.clone()
    pert, ok = ops.sift_update_(x, got, grad, 3e-4, backend=backend)
    assert bool(ok)
    assert torch.equal(got, expect)
    assert torch.equal(pert, x + expect)


def test_adversarial_loss_makes_no_host_sync(backend, no_host_sync):
    (model, learner, layers), _ = pair(backend)
    batch = data()
    run_step(model, learner, layers[0], batch)  # warm up
    logits, loss = model(**batch)
    with no_host_sync():
        adv = learner.loss(logits, logits_fn, **batch)
        (loss + adv).backward()


def test_reference_syncs_the_host(no_host_sync):
    _, (twin, ref_learner, ref_layers) = pair("torch")
    batch = data()
    logits, _ = twin(**batch)
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_sync():
            ref_learner.loss(logits, logits_fn, **batch)


@pytest.mark.launch_free  # normal mode is PyTorch's layer norm on every backend: no fastadv kernel
def test_normal_mode_is_the_layer_norm(backend):
    (model, _, layers), _ = pair(backend)
    emb = model.embeddings
    ids = torch.randint(0, 50, (2, 5), device=DEVICE)
    raw = emb.word_embeddings(ids)
    expect = emb.LayerNorm(nn.functional.layer_norm(raw, (HIDDEN,), eps=1e-7))
    torch.testing.assert_close(emb(ids), expect, **FP32)
    assert layers[0].update_delta() is True  # not adversarial: nothing to do


@pytest.mark.launch_free  # hooks and normal mode only: no fastadv kernel on any backend
def test_hooks_are_replaced_and_bound_per_module(backend):
    model = nn.Sequential(nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)).to(DEVICE)
    first = sift.hook_sift_layer(model, HIDDEN, target_module="0", backend=backend)
    again = sift.hook_sift_layer(model, HIDDEN, target_module="0", backend=backend)
    assert len(first) == len(again) == 1
    assert len(model[0]._forward_pre_hooks) == 1  # re-hooking replaced the SiFT hook
    both = sift.hook_sift_layer(model, HIDDEN, target_module=model[1], backend=backend)
    assert len(model[1]._forward_pre_hooks) == 1 and len(both) == 1
    model(torch.randn(2, HIDDEN, device=DEVICE))
    assert again[0].input.shape == (2, HIDDEN) and both[0].input.shape == (2, HIDDEN)
    with pytest.raises(TypeError, match="nn.Module"):
        sift.hook_sift_layer(model, HIDDEN, target_module=3)


@pytest.mark.launch_free  # logits_fn raises before the perturbed forward runs
def test_exception_in_logits_fn_cleans_up(backend):
    (model, learner, layers), _ = pair(backend)
    batch = data()
    logits, _ = model(**batch)

    def failing(model, **kw):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        learner.loss(logits, failing, **batch)
    assert all(p.requires_grad for p in model.parameters())
    assert not layers[0].adversarial_mode and layers[0].delta is None


def test_missing_gradient_returns_false(backend):
    layer = sift.PerturbationLayer(HIDDEN, backend=backend).to(DEVICE)
    layer(torch.randn(3, HIDDEN, device=DEVICE))
    layer.adversarial_(True)
    layer(torch.randn(3, HIDDEN, device=DEVICE))  # draws the initial delta
    assert layer.update_delta(True) is False  # nothing reached delta
    assert layer.delta is not None


def test_loss_functions_match_reference():
    a = torch.randn(4, 3, 7, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 3, 7, device=DEVICE, requires_grad=True)
    for name in ("symmetric-kl", "kl", "mse"):
        got = sift.perturbation_loss_fns[name](a, b)
        expect = ref.perturbation_loss_fns[name](a, b)
        torch.testing.assert_close(got, expect, **FP32)
        ga = torch.autograd.grad(got.sum(), (a, b), allow_unused=True)
        ea = torch.autograd.grad(expect.sum(), (a, b), allow_unused=True)
        for x, y in zip(ga, ea):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, **FP32)


def test_reproducible_under_manual_seed(backend):
    x = torch.randn(5, 64, device=DEVICE)
    torch.manual_seed(1)
    a, _ = ops.sift_init(x, 0.01, backend=backend)
    torch.manual_seed(1)
    b, _ = ops.sift_init(x, 0.01, backend=backend)
    c, _ = ops.sift_init(x, 0.01, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_input(backend, dtype):
    x = torch.randn(64, 768, device=DEVICE).to(dtype)
    delta, pert = ops.sift_init(x, 0.02, backend=backend)
    assert pert.dtype == dtype and delta.dtype == torch.float32
    torch.testing.assert_close(pert, (x.float() + delta).to(dtype), rtol=0, atol=0)
    grad = torch.randn(64, 768, device=DEVICE)
    expect = delta + 1e-3 * grad / (1e-6 + grad.abs().amax(-1, keepdim=True))
    pert, ok = ops.sift_update_(x, delta, grad, 1e-3, backend=backend)
    assert bool(ok)
    torch.testing.assert_close(delta, expect, **FP32)
    torch.testing.assert_close(pert, (x.float() + expect).to(dtype), rtol=0, atol=0)


# ---- device guard -----------------------------------------------------------------------------------


def test_kernel_launches_run_under_the_device_guard(backend, monkeypatch):
    if backend == "torch":
        pytest.skip("kernel backends only")
    seen = record_guards(monkeypatch, ops)
    x = torch.randn(4, 6, device=DEVICE)
    before = launches_total()
    delta, _ = ops.sift_init(x, 0.01, backend=backend)
    ops.sift_update_(x, delta, torch.randn_like(x), 0.1, backend=backend)
    total = launches_total() - before
    assert total >= 4 and seen["inside"] == total
    assert seen["devices"] and all(d == x.device for d in seen["devices"])


def test_launches_disable_fp_fusion(backend, monkeypatch):
    # x + delta must round once per op on the GPU too (no FMA), as under the interpreter.
    if backend != "triton":
        pytest.skip("checks the Triton launch options")
    from fastadv.kernels.triton import sift as tk
    calls = {}
    for name in ("_sift_init_kernel", "_sift_update_kernel"):
        real = getattr(tk, name)

        class Spy:
            def __init__(self, real, name):
                self.real, self.name = real, name

            def __getitem__(self, grid):
                def run(*args, **kw):
                    calls.setdefault(self.name, []).append(kw)
                    return self.real[grid](*args, **kw)
                return run
        monkeypatch.setattr(tk, name, Spy(real, name))
    x = torch.randn(3, 8, device=DEVICE)
    delta, _ = ops.sift_init(x, 0.01, backend=backend)
    ops.sift_update_(x, delta, torch.randn_like(x), 0.1, backend=backend)
    assert set(calls) == {"_sift_init_kernel", "_sift_update_kernel"}
    assert all(kw.get("enable_fp_fusion") is False for kws in calls.values() for kw in kws)


def test_cuda_argument_errors_need_no_gpu():
    from fastadv.kernels import cuda as fcuda
    import fastadv.kernels.cuda.sift  # noqa: F401  (types the C functions)
    if fcuda.load_error() is not None:
        pytest.skip(f"CUDA library not loadable: {fcuda.load_error()}")
    lib = fcuda.lib()
    assert lib.fastadv_sift_update(None, None, None, None, 9, 2, 2, None, None, 1.0, None) != 0
    assert b"dtype" in lib.fastadv_last_error()
    assert lib.fastadv_sift_init(None, None, None, 0, 5, None, 0.1, None) != 0
    assert b"key is NULL" in lib.fastadv_last_error()
    assert lib.fastadv_sift_init(None, None, None, 0, 0, None, 0.1, None) == 0  # nothing to do
    assert lib.fastadv_sift_workspace_floats(10) == 21


# ---- torch.library registration ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5, 8), (4, 8)])
def test_opcheck(backend, shape):
    """Schema (``delta`` declared mutated), fake tensor and AOT dispatch of
    ``fastadv::sift_init_`` and ``fastadv::sift_update_`` (a step taken, and one
    skipped for an inf gradient).  They carry no autograd formula: torch.library
    refuses one on an op that mutates an input; the layer's autograd link is a
    ``torch.autograd.Function`` (``fastadv/sift/sift.py``)."""
    x = torch.randn(*shape, device=DEVICE)
    rand = ops_noise.draw(backend, x.shape, torch.float32, x.device, None)
    torch.library.opcheck(ops.sift_init_op.overload, (x, torch.empty(shape, device=DEVICE), rand, 0.02, backend))
    grad = torch.randn(shape, device=DEVICE)
    torch.library.opcheck(ops.sift_update_op.overload, (x, torch.randn(shape, device=DEVICE), grad, 1e-3, backend))
    grad[0].view(-1)[0] = float("inf")
    torch.library.opcheck(ops.sift_update_op.overload, (x, torch.randn(shape, device=DEVICE), grad, 1e-3, backend))


def test_registered():
    assert {"sift_init_", "sift_update_"} <= set(dir(torch.ops.fastadv))
