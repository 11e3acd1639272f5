"""NEFTune (fastadv.noise.neftune, fastadv.ops.neftune) on every backend: the
noise bounds and distribution with and without an attention mask, the
reference's formula on the torch backend, autograd, no host sync, the
registered op (opcheck) and a compiled training step.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastadv.noise import neftune
from fastadv.ops import neftune as ops
from fastadv.ops import noise as ops_noise
from fastadv.reference.neftune import neftune as ref_neftune

from conftest import DEVICE, launches_total, record_guards
from test_noise import ks_critical, ks_statistic, uniform_cdf  # one home for the KS helpers



def test_neftune_without_mask(backend):
    b, seq, d, alpha = 4, 64, 256, 5.0
    e = torch.randn(b, seq, d, device=DEVICE)
    out = neftune(e, alpha, backend=backend)
    mag = alpha / math.sqrt(seq * d)
    noise = (out - e).double()
    assert float(noise.abs().max()) <= mag * (1 + 1e-5)
    assert float(noise.abs().max()) > 0.99 * mag
    assert ks_statistic(noise / mag, uniform_cdf(-1, 1)) < ks_critical(noise.numel())
    assert abs(float(noise.var()) / (mag * mag / 3) - 1) < 0.02


def test_neftune_with_mask(backend):
    b, seq, d, alpha = 4, 64, 256, 10.0
    e = torch.randn(b, seq, d, device=DEVICE)
    lengths = [64, 40, 1, 0]
    mask = torch.zeros(b, seq, dtype=torch.int64, device=DEVICE)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    noise = (neftune(e, alpha, mask, backend=backend) - e).double()
    scaled = []
    for i, n in enumerate(lengths):
        if n < seq:  # padding: no noise
            assert float(noise[i, n:].abs().max()) == 0
        if n == 0:
            continue
        mag = alpha / math.sqrt(n * d)
        assert float(noise[i, :n].abs().max()) <= mag * (1 + 1e-5)
        scaled.append((noise[i, :n] / mag).flatten())
    u = torch.cat(scaled)
    assert ks_statistic(u, uniform_cdf(-1, 1)) < ks_critical(u.numel())
    # bool and float masks give the same scale; a 2-D [L, d] input is one sequence
    torch.manual_seed(9)
    a = neftune(e, alpha, mask.bool(), backend=backend)
    torch.manual_seed(9)
    assert torch.equal(a, neftune(e, alpha, mask.float(), backend=backend))
    one = neftune(e[1], alpha, mask[1], backend=backend) - e[1]
    assert float(one[40:].abs().max()) == 0
    assert float(one.abs().max()) <= alpha / math.sqrt(40 * d) * (1 + 1e-5)


def test_neftune_matches_reference_scale():
    # same uniform draw (torch backend, same seed): the reference's formula exactly
    e = torch.randn(3, 17, 8, device=DEVICE)
    mask = (torch.rand(3, 17, device=DEVICE) > 0.3).long()
    torch.manual_seed(4)
    expect = ref_neftune(e, 5.0, mask)
    torch.manual_seed(4)
    got = neftune(e, 5.0, mask, backend="torch")
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    torch.manual_seed(4)
    expect = ref_neftune(e, 5.0)
    torch.manual_seed(4)
    torch.testing.assert_close(neftune(e, 5.0, backend="torch"), expect, rtol=1e-5, atol=1e-6)


def test_neftune_autograd_and_errors(backend):
    e = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    neftune(e, 5.0, backend=backend).sum().backward()
    assert torch.equal(e.grad, torch.ones_like(e))
    with pytest.raises(ValueError, match="attention_mask shape"):
        neftune(e, 5.0, torch.ones(2, 4, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"\[B, L, d\]"):
        neftune(torch.zeros(8, device=DEVICE), 5.0, backend=backend)


def test_no_host_sync(backend, no_host_sync):
    x = torch.randn(4, 16, 32, device=DEVICE)
    mask = torch.ones(4, 16, dtype=torch.int64, device=DEVICE)
    mask[1, 9:] = 0
    neftune(x, 5.0, mask, backend=backend)  # warm up (kernel compilation)
    with no_host_sync():
        neftune(x, 5.0, backend=backend)
        neftune(x, 5.0, mask, backend=backend)
        neftune(x, 5.0, mask.bool(), backend=backend)


def test_kernel_launches_run_under_the_device_guard(backend, monkeypatch):
    if backend == "torch":
        pytest.skip("kernel backends only")
    seen = record_guards(monkeypatch, ops)
    x = torch.randn(2, 3, 8, device=DEVICE)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], device=DEVICE)
    before = launches_total()
    ops.neftune(x, 5.0, backend=backend)
    ops.neftune(x, 5.0, mask, backend=backend)
    total = launches_total() - before
    assert total == 3 and seen["inside"] == total  # noise; scale + noise
    assert seen["devices"] and all(d == x.device for d in seen["devices"])


def test_noise_launch_disables_fp_fusion(backend, monkeypatch):
    # x + u * s must round twice on the GPU too (no FMA), as under the interpreter.
    if backend != "triton":
        pytest.skip("checks the Triton launch options")
    from fastadv.kernels.triton import noise as tk
    calls = []
    real = tk._add_noise_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                calls.append(kw)
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(tk, "_add_noise_kernel", Spy())
    x = torch.randn(3, 8, device=DEVICE)
    ops.neftune(x, 5.0, backend=backend)
    ops.neftune(x, 5.0, torch.ones(3, device=DEVICE), backend=backend)
    assert len(calls) == 2 and all(kw.get("enable_fp_fusion") is False for kw in calls)


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
        outs[b] = (neftune(x, 5.0, mask, backend=b), neftune(x, 5.0, backend=b))
    for a, c in zip(outs["triton"], outs["cuda"]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# ---- torch.library registration and torch.compile -------------------------------------------------

@pytest.mark.parametrize("mask", [None, "int", "bool"])
def test_opcheck(backend, mask):
    """Schema, fake tensor, autograd registration and AOT dispatch of ``fastadv::neftune``."""
    e = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    m = None if mask is None else torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=DEVICE)
    if mask == "bool":
        m = m.bool()
    rand = ops_noise.draw(backend, e.shape, torch.float32, e.device, None, "uniform")
    torch.library.opcheck(ops.neftune_op.overload, (e, rand, m, 5.0, backend))
    one = torch.randn(5, 8, device=DEVICE)  # one sequence [L, d]
    rand = ops_noise.draw(backend, one.shape, torch.float32, one.device, None, "uniform")
    torch.library.opcheck(ops.neftune_op.overload, (one, rand, None if m is None else m[:1], 5.0, backend))


def test_registered():
    assert "neftune" in dir(torch.ops.fastadv)


class EmbedNet(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.emb, self.head, self.backend = nn.Embedding(20, 8), nn.Linear(8, 3), backend

    def forward(self, ids, mask, labels):
        e = neftune(self.emb(ids), 5.0, mask, backend=self.backend)
        return nn.functional.cross_entropy(self.head(torch.tanh(e)).mean(1), labels)


def test_compiled_training_step_has_no_graph_break(backend):
    """A forward with NEFTune + backward under torch.compile(fullgraph=True)
    equals eager (Inductor draws with eager's RNG: fallback_random)."""
    torch._dynamo.reset()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(EmbedNet(backend).to(DEVICE))
    model, ref_model = models

    def step_of(m):
        def step(ids, mask, labels):
            loss = m(ids, mask, labels)
            loss.backward()
            return loss.detach()
        return step

    ids, labels = torch.randint(0, 20, (4, 5), device=DEVICE), torch.randint(0, 3, (4,), device=DEVICE)
    mask = torch.ones(4, 5, dtype=torch.int64, device=DEVICE)
    mask[1, 3:] = 0
    with torch._dynamo.config.patch(trace_autograd_ops=True), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(step_of(model), fullgraph=True)
        for i in range(2):
            torch.manual_seed(10 + i)
            got = compiled(ids, mask, labels)
            torch.manual_seed(10 + i)
            torch.testing.assert_close(got, step_of(ref_model)(ids, mask, labels), rtol=1e-5, atol=1e-6)
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
