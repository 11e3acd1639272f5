"""CUDA graphs: a step with FGM, PGD, AWP, weight_noise and DP clip + noise is
captured once and replayed, and gives the eager results (GPU only).

Why it can work: every op works in place on the parameters (``data_ptr``
never changes), nothing syncs the host, and the Philox key of the noise ops is
drawn by ``torch.randint`` on the device generator, which CUDA-graph capture
registers: each replay draws a fresh key (a fresh offset), as PyTorch's own
graph-safe random ops do."""
import copy

import pytest
import torch
from torch import nn

import fastadv
from fastadv.reference import FGM as RefFGM
from fastadv.reference import PGD as RefPGD

pytestmark = pytest.mark.gpu

FP32 = dict(rtol=1e-5, atol=1e-6)
KERNEL_BACKENDS = ["triton", "cuda"]


def _usable(backend):
    from fastadv import _backend
    why = _backend.why_not(backend, torch.device("cuda"))
    if why:
        pytest.skip(f"{backend} backend unavailable: {why}")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(300, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.word_embeddings(ids))).mean(1))


def _net_with_grads():
    torch.manual_seed(0)
    net = Net().cuda()
    ids = torch.randint(0, 300, (8, 16), device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    nn.functional.cross_entropy(net(ids), y).backward()
    return net


def _capture(fn, warmup=2):
    """Run ``fn`` eagerly on a side stream (warm-up), capture it, return the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fgm_attack_restore_replays(backend):
    _usable(backend)
    net = _net_with_grads()
    ref = copy.deepcopy(net)
    RefFGM(ref, "word_embeddings.", 0.5).attack()
    w = net.word_embeddings.weight
    before = w.detach().clone()
    seen = torch.empty_like(w)
    fgm = fastadv.FGM(net, epsilon=0.5, backend=backend)

    def step():
        fgm.attack()
        seen.copy_(w.detach())
        fgm.restore()

    graph = _capture(step)
    for _ in range(3):
        seen.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(seen, ref.word_embeddings.weight.detach(), **FP32)
        assert torch.equal(w, before)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_pgd_steps_replay(backend):
    _usable(backend)
    net = _net_with_grads()
    ref = copy.deepcopy(net)
    rpgd = RefPGD(ref, "word_embeddings.", 0.05, 0.3)
    for t in range(3):
        rpgd.attack(is_first_attack=(t == 0))
    w = net.word_embeddings.weight
    before = w.detach().clone()
    seen = torch.empty_like(w)
    pgd = fastadv.PGD(net, epsilon=0.05, alpha=0.3, backend=backend)

    def step():
        for t in range(3):
            pgd.attack(is_first_attack=(t == 0))
        seen.copy_(w.detach())
        pgd.restore()

    graph = _capture(step)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(seen, ref.word_embeddings.weight.detach(), **FP32)
        assert torch.equal(w, before)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_awp_perturb_restore_replays(backend):
    _usable(backend)
    net = _net_with_grads()
    eager_net = copy.deepcopy(net)
    eager = fastadv.AWP(eager_net, None, adv_lr=0.1, adv_eps=0.05, backend=backend)
    eager.perturb()
    expected = {n: p.detach().clone() for n, p in eager_net.named_parameters()}
    eager.restore()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    seen = {n: torch.empty_like(p) for n, p in net.named_parameters()}
    awp = fastadv.AWP(net, None, adv_lr=0.1, adv_eps=0.05, backend=backend)

    def step():
        awp.perturb()
        for n, p in net.named_parameters():
            seen[n].copy_(p.detach())
        awp.restore()

    graph = _capture(step)
    graph.replay()
    torch.cuda.synchronize()
    for n, p in net.named_parameters():
        torch.testing.assert_close(seen[n], expected[n], **FP32, msg=n)
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_weight_noise_fresh_noise_per_replay_and_exact_restore(backend):
    _usable(backend)
    net = _net_with_grads()
    w = net.body.weight
    before = w.detach().clone()
    seen = torch.empty_like(w)

    def step():
        with fastadv.noise.weight_noise(net, 0.1, backend=backend):
            seen.copy_(w.detach())

    graph = _capture(step)
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append(seen - before)
        assert torch.equal(w, before)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    for d in draws:
        assert abs(d.std().item() - 0.1) < 0.02


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dp_clip_and_noise_replays(backend):
    _usable(backend)
    torch.manual_seed(0)
    gs = [torch.randn(16, 64, 32, device="cuda"), torch.randn(16, 32, device="cuda")]
    exact = fastadv.dp.clip_and_noise(gs, 1.0, 0.0, backend=backend)
    outs = [torch.empty_like(e) for e in exact]
    noisy = [torch.empty_like(e) for e in exact]

    def step():
        for o, e in zip(outs, fastadv.dp.clip_and_noise(gs, 1.0, 0.0, backend=backend)):
            o.copy_(e)
        for o, e in zip(noisy, fastadv.dp.clip_and_noise(gs, 1.0, 1.0, backend=backend)):
            o.copy_(e)

    graph = _capture(step)
    draws = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for o, e in zip(outs, exact):
            torch.testing.assert_close(o, e, **FP32)
        draws.append([n.clone() for n in noisy])
    assert not torch.equal(draws[0][0], draws[1][0])  # a fresh key on every replay
