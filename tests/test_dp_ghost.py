"""Ghost clipping and book-keeping DP-SGD (fastadv.dp.ghost) against Opacus 1.6's
vanilla per-sample mode (``grad_sample_mode="hooks"``), the reference.

Every exactness test runs Opacus's own ``PrivacyEngine.make_private`` on one
copy of a model and fastadv's ``make_private(grad_sample_mode=...)`` on
another, feeds both the same batch and compares the private gradients
(``p.grad`` after ``pre_step``: clipped, summed, noised, scaled).
"""
import copy

import opacus
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.dp import PrivacyEngine
from fastadv.bench.dp_ghost import peak_bytes
from fastadv.dp import ghost
from fastadv.reference import dp_ghost as ref

MODES = ["ghost", "bk"]
TOL = dict(rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- models

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, stride=2)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv1d(4, 3, 2, dilation=2)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):                       # x [B, 2, 6, 6]
        h = torch.tanh(self.gn(self.c1(x)))     # [B, 4, 3, 3]
        h = torch.tanh(self.c2(h.flatten(2)))   # [B, 3, 7]
        return self.fc(h.mean(2))


class TinyLM(nn.Module):
    """Token + position embeddings, one attention block, a head tied to the embedding."""

    def __init__(self, vocab=11, d=8, rms=False):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(16, d)
        self.ln1 = nn.RMSNorm(d) if rms else nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight      # tied

    def forward(self, ids):
        b, t = ids.shape
        h = self.emb(ids) + self.pos(torch.arange(t).expand(b, t))
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(self.ln2(h))


def bert_tiny():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def gpt2_tiny():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


class HFWrap(nn.Module):
    """Logits of an HF model, with position ids of shape [B, T] (a [1, T] buffer
    has no batch dimension: neither Opacus nor fastadv can split it by sample)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        b, t = ids.shape
        return self.model(input_ids=ids, position_ids=torch.arange(t).expand(b, t)).logits


def _data(kind, b):
    if kind == "mlp":
        return torch.randn(b, 6), torch.randint(0, 3, (b,))
    if kind == "cnn":
        return torch.randn(b, 2, 6, 6), torch.randint(0, 3, (b,))
    if kind == "bert":
        return torch.randint(0, 30, (b, 5)), torch.randint(0, 3, (b,))
    vocab = 30 if kind == "gpt2" else 11
    return torch.randint(0, vocab, (b, 5)), torch.randint(0, vocab, (b, 5))


MODELS = {"mlp": MLP, "cnn": CNN, "lm": TinyLM, "bert": lambda: HFWrap(bert_tiny()),
          "gpt2": lambda: HFWrap(gpt2_tiny())}


def _loss_vanilla(out, y):
    if y.dim() == 2:  # token level: the mean over all tokens (Opacus's per-sample unit is the sequence)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def _loss_dp(criterion, out, y):
    if y.dim() == 2:
        return criterion(out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=out.shape)
    return criterion(out, y)


def _loader(x, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


# ---------------------------------------------------------------- runners

def opacus_grads(model, batches, C, sigma=0.0, seed=None, reduction="mean"):
    """Opacus vanilla: ``p.grad`` after one (accumulated) step, by parameter name."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    m, opt, _ = opacus.PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=_loader(x, y, len(batches[0][0])), noise_multiplier=sigma,
        max_grad_norm=C, poisson_sampling=False, noise_generator=gen, loss_reduction=reduction)
    opt.zero_grad()
    for xb, yb in batches:
        loss = _loss_vanilla(m(xb), yb)
        (loss * len(xb) if reduction == "sum" else loss).backward()
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def fast_grads(model, batches, C, mode, sigma=0.0, seed=None, reduction="mean", backend=None, **kw):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    crit = nn.CrossEntropyLoss(reduction=reduction)
    m, opt, crit, _ = PrivacyEngine(backend=backend).make_private(
        module=model, optimizer=opt, criterion=crit, data_loader=_loader(x, y, len(batches[0][0])),
        noise_multiplier=sigma, max_grad_norm=C, poisson_sampling=False, noise_generator=gen,
        grad_sample_mode=mode, loss_reduction=reduction, **kw)
    opt.zero_grad()
    for xb, yb in batches:
        _loss_dp(crit, m(xb), yb).backward()
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, m


def _assert_same(got, want, **tol):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **(tol or TOL), msg=lambda s: f"{n}: {s}")


# ---------------------------------------------------------------- exactness against Opacus vanilla

@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", MODES)
def test_update_equals_opacus_vanilla(kind, mode):
    torch.manual_seed(1)
    model = MODELS[kind]()
    batch = _data(kind, 6)
    want = opacus_grads(copy.deepcopy(model), [batch], C=0.3)
    got, m = fast_grads(model, [batch], C=0.3, mode=mode)
    norms = m.per_sample_gradient_norms
    assert (norms > 0.3).any(), "the test should clip some samples"
    _assert_same(got, want)


class Fanout(nn.Module):
    """Layer outputs used twice (an embedding feeding a residual, a first
    Linear without bias): still one use of each weight."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.mix = nn.Embedding(9, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 3)

    def forward(self, ids):
        e = self.emb(ids)
        h = e + torch.tanh(self.fc(e))
        return self.mix(h * h.sum(-1, keepdim=True)).mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_fanout_of_layer_outputs(mode):
    torch.manual_seed(20)
    model = Fanout()
    batch = (torch.randint(0, 9, (5, 6)), torch.randint(0, 3, (5,)))
    want = opacus_grads(copy.deepcopy(model), [batch], C=0.3)
    got, _ = fast_grads(model, [batch], C=0.3, mode=mode)
    _assert_same(got, want)


@pytest.mark.parametrize("strategy", ["gram", "per_sample"])
def test_both_norm_strategies_equal_opacus(strategy):
    """Also RMSNorm (the model's first norm layer)."""
    torch.manual_seed(2)
    model = TinyLM(rms=True)
    batch = _data("lm", 5)
    want = opacus_grads(copy.deepcopy(model), [batch], C=0.5)
    got, _ = fast_grads(model, [batch], C=0.5, mode="bk", strategy=strategy)
    _assert_same(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_sum_reduction_and_accumulation_equal_opacus(mode):
    """Two micro-batches accumulated before one step, loss_reduction "sum" and "mean"."""
    torch.manual_seed(3)
    model = TinyLM()
    batches = [_data("lm", 4), _data("lm", 4)]
    for reduction in ("mean", "sum"):
        want = opacus_grads(copy.deepcopy(model), batches, C=0.5, reduction=reduction)
        got, _ = fast_grads(copy.deepcopy(model), batches, C=0.5, mode=mode, reduction=reduction)
        _assert_same(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_accumulation_equals_one_batch(mode):
    """Two micro-batches of 4 give the clipped sum of the batch of 8 (the mean
    divides by expected_batch_size * 2, as Opacus's vanilla accumulation)."""
    torch.manual_seed(4)
    model = MLP()
    x, y = _data("mlp", 8)
    one, _ = fast_grads(copy.deepcopy(model), [(x, y)], C=0.2, mode=mode, reduction="sum")
    two, _ = fast_grads(copy.deepcopy(model), [(x[:4], y[:4]), (x[4:], y[4:])], C=0.2, mode=mode, reduction="sum")
    _assert_same(two, one)


@pytest.mark.parametrize("mode", MODES)
def test_zero_grad_discards_a_backward(mode):
    """A backward cleared by zero_grad is not counted in the mean's divisor."""
    torch.manual_seed(18)
    model = MLP()
    x, y = _data("mlp", 6)
    want, _ = fast_grads(copy.deepcopy(model), [(x, y)], C=0.3, mode=mode)
    m0 = copy.deepcopy(model)
    m, opt, crit, _ = PrivacyEngine().make_private(
        module=m0, optimizer=torch.optim.SGD(m0.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
        data_loader=_loader(x, y, 6), noise_multiplier=0.0, max_grad_norm=0.3, poisson_sampling=False,
        grad_sample_mode=mode)
    crit(m(x[:3]), y[:3]).backward()
    opt.zero_grad()
    crit(m(x), y).backward()
    opt.step()
    _assert_same({n: p.grad for n, p in m0.named_parameters()}, want)


@pytest.mark.parametrize("mode", MODES)
def test_virtual_batches_equal_opacus(mode):
    """BatchMemoryManager-style skipped steps: signal_skip_step, then step."""
    torch.manual_seed(5)
    model = MLP()
    x, y = _data("mlp", 8)

    def run(engine_mode):
        m0 = copy.deepcopy(model)
        opt = torch.optim.SGD(m0.parameters(), lr=0.0)
        if engine_mode == "hooks":
            m, opt, _ = opacus.PrivacyEngine().make_private(module=m0, optimizer=opt, data_loader=_loader(x, y, 8),
                                                            noise_multiplier=0.0, max_grad_norm=0.2,
                                                            poisson_sampling=False)
            crit = None
        else:
            m, opt, crit, _ = PrivacyEngine().make_private(module=m0, optimizer=opt, data_loader=_loader(x, y, 8),
                                                           criterion=nn.CrossEntropyLoss(), noise_multiplier=0.0,
                                                           max_grad_norm=0.2, poisson_sampling=False,
                                                           grad_sample_mode=engine_mode)
        for i, sl in enumerate((slice(0, 4), slice(4, 8))):
            opt.zero_grad()
            out = m(x[sl])
            (F.cross_entropy(out, y[sl]) if crit is None else crit(out, y[sl])).backward()
            if i == 0:
                opt.signal_skip_step(do_skip=True)
                assert opt.step() is None
        opt.step()
        return {n: p.grad.clone() for n, p in m0.named_parameters()}

    _assert_same(run(mode), run("hooks"))


@pytest.mark.parametrize("mode", MODES)
def test_step_does_not_copy_the_clipped_sum(mode):
    """A step that is not skipped takes ``p.grad`` (the clipped sum) as
    ``p.summed_grad`` without a copy -- the noised gradient replaces ``p.grad``
    -- so the step holds one gradient-sized tensor less; the sum it keeps is
    still the noise-free one (noise 1 here).  Skipped steps copy
    (test_virtual_batches_equal_opacus zeroes ``p.grad`` in place after one)."""
    torch.manual_seed(6)
    model = MLP()
    x, y = _data("mlp", 4)
    m, opt, crit, _ = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                                   data_loader=_loader(x, y, 4), criterion=nn.CrossEntropyLoss(),
                                                   noise_multiplier=1.0, max_grad_norm=0.5, poisson_sampling=False,
                                                   grad_sample_mode=mode)
    crit(m(x), y).backward()
    clipped = {n: p.grad for n, p in model.named_parameters()}
    values = {n: g.clone() for n, g in clipped.items()}
    opt.step()
    for n, p in model.named_parameters():
        assert p.summed_grad is clipped[n] or p.summed_grad.data_ptr() == clipped[n].data_ptr()
        assert torch.equal(p.summed_grad, values[n]) and not torch.equal(p.grad, values[n] / 4)


@pytest.mark.parametrize("mode", MODES)
def test_poisson_sampling_and_accounting(mode):
    """Poisson batches (Opacus's DPDataLoader), an empty batch, the accountant."""
    torch.manual_seed(6)
    x, y = _data("mlp", 40)
    model = MLP()
    engine = PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m, opt, crit, loader = engine.make_private(module=model, optimizer=opt, data_loader=_loader(x, y, 8),
                                               criterion=nn.CrossEntropyLoss(), noise_multiplier=1.0,
                                               max_grad_norm=1.0, grad_sample_mode=mode)
    assert isinstance(loader, torch.utils.data.DataLoader) and type(loader).__name__ == "DPDataLoader"
    for xb, yb in loader:
        opt.zero_grad()
        crit(m(xb), yb).backward()
        opt.step()
    opt.zero_grad()
    crit(m(x[:0]), y[:0]).backward()   # an empty Poisson batch
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the peer's own accounting: Opacus's make_private on the same data, as many steps
    ref_engine = opacus.PrivacyEngine()
    ref_model = MLP()
    ref_m, ref_opt, ref_loader = ref_engine.make_private(
        module=ref_model, optimizer=torch.optim.SGD(ref_model.parameters(), lr=0.1), data_loader=_loader(x, y, 8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    for _ in range(len(loader) + 1):
        ref_opt.zero_grad()
        F.cross_entropy(ref_m(x[:4]), y[:4]).backward()
        ref_opt.step()
    assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == len(loader) + 1
    assert engine.accountant.history == ref_engine.accountant.history
    assert engine.get_epsilon(1e-5) == ref_engine.get_epsilon(1e-5) > 0
    opt.zero_grad()
    crit(m(x[:4]), y[:4]).backward()
    with pytest.raises(ValueError, match="Poisson sampling is not compatible with grad accumulation"):
        crit(m(x[:4]), y[:4]).backward()


# ---------------------------------------------------------------- noise

@pytest.mark.parametrize("mode", MODES)
def test_noise_is_opacus_draws_on_torch_backend(mode):
    """The same generator seed gives Opacus vanilla's private gradient, noise included."""
    torch.manual_seed(7)
    model = TinyLM()
    batch = _data("lm", 5)
    want = opacus_grads(copy.deepcopy(model), [batch], C=0.5, sigma=1.3, seed=11)
    got, _ = fast_grads(model, [batch], C=0.5, mode=mode, sigma=1.3, seed=11, backend="torch")
    _assert_same(got, want)


def test_noise_equals_fastadv_vanilla(backend):
    """Every backend: the ghost optimizer draws fastadv vanilla's noise numbers
    (the same op and key), so the private gradients agree under one seed."""
    torch.manual_seed(8)
    model = MLP()
    batch = _data("mlp", 6)
    x, y = batch

    def vanilla():
        m0 = copy.deepcopy(model)
        opt = torch.optim.SGD(m0.parameters(), lr=0.0)
        m, opt, _ = PrivacyEngine(backend=backend).make_private(
            module=m0, optimizer=opt, data_loader=_loader(x, y, 6), noise_multiplier=2.0, max_grad_norm=0.4,
            poisson_sampling=False, noise_generator=torch.Generator().manual_seed(3))
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        return {n: p.grad.clone() for n, p in m0.named_parameters()}

    got, _ = fast_grads(copy.deepcopy(model), [batch], C=0.4, mode="bk", sigma=2.0, seed=3, backend=backend)
    _assert_same(got, vanilla())


# ---------------------------------------------------------------- tied weights, misuse, errors

def test_tied_head_norm_is_norm_of_sum():
    """The tied parameter's per-sample gradient is the sum over its two uses:
    the norms equal functorch's per-sample gradients of the whole model."""
    torch.manual_seed(9)
    model = TinyLM()
    ids, y = _data("lm", 4)
    m = ghost.GhostClippingModule(model, mode="bk")
    loss = F.cross_entropy(m(ids).transpose(1, 2), y, reduction="none").mean(1)
    m.dp_backward(loss, 1.0)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, i, t):
        out = torch.func.functional_call(model, p, (i[None],))
        return F.cross_entropy(out.transpose(1, 2), t[None], reduction="none").mean()

    gs = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, ids, y)
    want = torch.stack([g.flatten(1).square().sum(1) for g in gs.values()]).sum(0).sqrt()
    torch.testing.assert_close(m.per_sample_gradient_norms, want, **TOL)


def test_use_outside_the_layer_raises():
    """A tied head written as h @ W.t() is a use no hook sees: refused, not wrong."""
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)

        def forward(self, ids):
            return self.emb(ids) @ self.emb.weight.t()

    m = ghost.GhostClippingModule(Bad(), mode="bk")
    ids = torch.randint(0, 7, (3, 5))
    loss = m(ids).sum((1, 2))
    with pytest.raises(RuntimeError, match="'emb.weight' enters the autograd graph 2 times"):
        m.dp_backward(loss, 1.0)


def test_unsupported_layer_raises_with_its_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.PReLU()))
    with pytest.raises(ghost.UnsupportedLayerError, match=r"layer '1.0' \(torch.nn.modules.activation.PReLU\)"):
        ghost.GhostClippingModule(model)
    model[1][0].weight.requires_grad_(False)   # frozen: skipped
    ghost.GhostClippingModule(model)
    with pytest.raises(ghost.UnsupportedLayerError, match="max_norm"):
        ghost.GhostClippingModule(nn.Embedding(4, 2, max_norm=1.0))


@pytest.mark.parametrize("mode", MODES)
def test_inplace_on_layer_output_is_exact(mode):
    """ReLU(inplace=True) on a Linear output: the gradient of the value the layer
    produced is read from its output's autograd edge (Opacus: the same model
    with an out-of-place ReLU)."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    plain = copy.deepcopy(model)
    plain[1] = nn.ReLU()
    want = opacus_grads(plain, [batch], C=0.2)
    got, _ = fast_grads(model, [batch], C=0.2, mode=mode)
    _assert_same(got, want)


def test_inplace_on_layer_input_raises():
    """The data a layer saw changed after it ran: refused (bk reads it after
    the backward; autograd's own check does not see it when no parameter
    gradient is computed)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    m = ghost.GhostClippingModule(model, mode="bk")
    x = torch.randn(3, 4)
    loss = m(x).sum(1)
    x.mul_(2)
    with pytest.raises(RuntimeError, match=r"input of layer '0'.*modified in place"):
        m.dp_backward(loss, 1.0)


def test_batch_dim_missing_raises():
    """A position embedding fed [1, T] ids cannot be split by sample."""
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(8, 4)

        def forward(self, x):
            return x + self.pos(torch.arange(x.shape[1])[None])

    m = ghost.GhostClippingModule(Pos())
    loss = m(torch.randn(3, 5, 4)).sum((1, 2))
    with pytest.raises(ValueError, match="layer 'pos'.*position_ids"):
        m.dp_backward(loss, 1.0)


def test_frozen_layers_are_skipped():
    torch.manual_seed(10)
    model = TinyLM()
    model.ln1.requires_grad_(False)
    model.qkv.weight.requires_grad_(False)
    batch = _data("lm", 5)
    want = opacus_grads(copy.deepcopy(model), [batch], C=0.5)
    got, _ = fast_grads(model, [batch], C=0.5, mode="ghost")
    _assert_same(got, want)


def test_nonfinite_sample_dropped_in_bk():
    torch.manual_seed(11)
    model = MLP()
    x, y = _data("mlp", 5)
    x[2, 0] = float("nan")
    got, _ = fast_grads(copy.deepcopy(model), [(x, y)], C=0.3, mode="bk", reduction="sum")
    keep = torch.tensor([0, 1, 3, 4])
    want, _ = fast_grads(copy.deepcopy(model), [(x[keep], y[keep])], C=0.3, mode="bk", reduction="sum")
    _assert_same(got, want)


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        layer = lambda t: torch.tanh(self.fc2(t))  # noqa: E731
        h = layer(h) if self.reentrant is None else torch.utils.checkpoint.checkpoint(
            layer, h, use_reentrant=self.reentrant)
        return self.fc3(h)


@pytest.mark.parametrize("mode", MODES)
def test_activation_checkpointing(mode):
    """Non-reentrant checkpointing: the norms are every layer's (functorch's
    per-sample gradients).  Reentrant checkpointing runs the layer under
    no_grad and hides its weight from the graph (its norm would be left out,
    the clipping bound broken, silently): refused, naming use_reentrant=False."""
    torch.manual_seed(23)
    x = torch.randn(4, 6)
    model = Checkpointed(reentrant=False)
    m = ghost.GhostClippingModule(model, mode=mode, backend="torch")
    m.dp_backward(m(x).square().sum(1), 1.0)
    plain = Checkpointed(reentrant=None)  # the same weights, not checkpointed (functorch cannot run checkpoint)
    params = {n: p.detach() for n, p in model.named_parameters()}
    one = lambda p, xb: torch.func.functional_call(plain, p, (xb[None],)).square().sum()  # noqa: E731
    gs = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0))(params, x)
    want = torch.stack([g.flatten(1).square().sum(1) for g in gs.values()]).sum(0).sqrt()
    torch.testing.assert_close(m.per_sample_gradient_norms, want, **TOL)
    m = ghost.GhostClippingModule(Checkpointed(reentrant=True), mode=mode, backend="torch")
    with pytest.raises(NotImplementedError, match="use_reentrant=False"):
        m.dp_backward(m(x.requires_grad_()).square().sum(1), 1.0)


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_samples_counted_or_raised(mode):
    """A sample with a NaN input has a non-finite norm: counted in the
    optimizer's device counter (``nonfinite_samples``, no host sync) with
    ``on_nonfinite="drop"``; ``on_nonfinite="raise"`` raises in the backward
    that finds it, naming how many samples."""
    torch.manual_seed(11)
    x, y = _data("mlp", 5)
    x[2, 0] = float("nan")
    for on_nonfinite in ("drop", "raise"):
        model = MLP()
        m, opt, crit, _ = PrivacyEngine(on_nonfinite=on_nonfinite).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
            data_loader=_loader(x, y, 5), noise_multiplier=0.0, max_grad_norm=0.3, poisson_sampling=False,
            grad_sample_mode=mode)
        opt.zero_grad()
        if on_nonfinite == "raise":
            with pytest.raises(FloatingPointError, match="1 sample"):
                crit(m(x), y).backward()
        else:
            crit(m(x), y).backward()
            assert opt.nonfinite_samples.tolist() == [1]
            assert m.per_sample_gradient_norms.isnan().tolist() == [False, False, True, False, False]


# ---------------------------------------------------------------- low precision

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_accumulates_in_fp32(dtype):
    """Under CPU bf16 / fp16 autocast the layers' inputs and output gradients
    are bf16 / fp16; norms and clipped sums are computed in fp32 from them.
    Reference: the same low-precision ``a`` and ``g``, per-sample gradients
    materialised in fp64."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = _data("mlp", 6)
    m = ghost.GhostClippingModule(model, mode="bk")
    with torch.autocast("cpu", dtype=dtype):
        out = m(x)
    assert out.dtype == dtype
    loss = F.cross_entropy(out.float(), y, reduction="none")
    records = list(m._records)
    factors, finite, mats, vecs = m.dp_backward(loss, 0.3)
    assert {u.p.dtype for us in mats.values() for u in us} == {dtype}   # output gradients
    assert {u.q.dtype for us in mats.values() for u in us} == {torch.float32, dtype}  # x, then low precision
    want = torch.zeros(6, dtype=torch.float64)
    for us in mats.values():
        for u in us:
            gs = torch.bmm(u.p.double().transpose(1, 2), u.q.double())
            want += gs.flatten(1).square().sum(1)
    for vs in vecs.values():
        want += vs[0].double().square().sum(1)
    assert len(records) == 2
    torch.testing.assert_close(m.per_sample_gradient_norms.double(), want.sqrt(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_low_precision_bias_sums_in_fp32(dtype, layer):
    """A bias's per-sample gradient sums the output gradient over the sequence
    (Linear on ``[B, T, d]``) or the output positions (Conv): in fp32 from the
    low-precision ``g``, not in ``g``'s dtype (64 terms in bf16 lose ~8 bits)."""
    torch.manual_seed(21)
    if layer == "linear":
        model, x = nn.Sequential(nn.Linear(5, 4)), torch.randn(3, 64, 5)
    else:
        model, x = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1)), torch.randn(3, 2, 8, 8)
    m = ghost.GhostClippingModule(model, mode="bk")
    with torch.autocast("cpu", dtype=dtype):
        out = m(x)
    _, _, mats, vecs = m.dp_backward(out.float().flatten(1).square().sum(1), 1.0)
    (g,) = [ghost._LazyUse.resolve(us)[0].p for us in mats.values()]  # the output gradient, [B, T or L, out]
    (bias,) = [vs[0] for vs in vecs.values()]
    assert g.dtype == dtype and bias.dtype == torch.float32
    torch.testing.assert_close(bias.double(), g.double().sum(1), rtol=1e-6, atol=1e-6)


def _private_grads(mode, backend, dtype, C=1.0):
    """TinyLM (token / position embeddings, LayerNorm, attention, tied head):
    one DP step's private gradient (noise 0) and per-sample norms, the forward
    under CPU autocast to ``dtype`` (None: fp32)."""
    torch.manual_seed(22)
    model = TinyLM()
    x, y = _data("lm", 6)
    m, opt, crit, _ = PrivacyEngine(backend=backend).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
        data_loader=_loader(x, y, 6), noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=False,
        grad_sample_mode=mode)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = m(x)
    assert out.dtype == (dtype or torch.float32)
    _loss_dp(crit, out.float(), y).backward()
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, m.per_sample_gradient_norms.clone()


@pytest.mark.parametrize("mode", MODES)
def test_low_precision_tied_transformer_close_to_fp32(backend, mode):
    """Both modes under bf16 autocast on a transformer with embeddings,
    LayerNorm and a tied head (the layers the MLP test above does not reach):
    per-sample norms and the private gradient within bf16 rounding of the fp32
    step's (norms accumulate in fp32, so the gap is the bf16 forward's), and
    clipping active on some samples (C between the norms)."""
    grads32, norms32 = _private_grads(mode, backend, None)
    C = float(norms32.median())
    grads32, norms32 = _private_grads(mode, backend, None, C)
    grads16, norms16 = _private_grads(mode, backend, torch.bfloat16, C)
    assert (norms32 > C).any() and (norms32 < C).any()
    torch.testing.assert_close(norms16, norms32, rtol=1e-2, atol=1e-4)  # measured 2.0e-3
    for n, g in grads32.items():
        torch.testing.assert_close(grads16[n], g, rtol=5e-2, atol=5e-3, msg=lambda m: f"{mode} {n}: {m}")


# ---------------------------------------------------------------- the reference math

def test_reference_gram_equals_materialised():
    torch.manual_seed(13)
    b, t, o, i, v = 3, 4, 5, 6, 7
    uses = [ref.MatUse(p=torch.randn(b, t, o), q=torch.randn(b, t, i)),
            ref.MatUse(p=torch.randn(b, 1, o), q=torch.randn(b, 1, i))]
    torch.testing.assert_close(ref.gram_sq_norms(uses), ref.per_sample_grads(uses, o).flatten(1).square().sum(1), **TOL)
    emb = [ref.MatUse(ids=torch.randint(0, v, (b, t)), q=torch.randn(b, t, i)),
           ref.MatUse(p=torch.randn(b, 2, v), q=torch.randn(b, 2, i))]
    torch.testing.assert_close(ref.gram_sq_norms(emb), ref.per_sample_grads(emb, v).flatten(1).square().sum(1), **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_reused_layer_norms_equal_functorch(mode, backend):
    """One Linear and one LayerNorm called twice (each per-sample gradient is
    the sum of two uses: the weight's cross terms, the bias / LayerNorm
    vectors summed before their norm); on a kernel backend every vector term
    is one dp_ghost_vector_sq_norms launch and the weight's terms run
    dp_ghost_cross_gram."""
    import fastadv.kernels as kernels

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.ln, self.out = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.ln(self.fc(torch.tanh(self.fc(self.ln(x))))))

    torch.manual_seed(15)
    model = Twice()
    with torch.no_grad():  # away from LayerNorm's default (1, 0), so its terms matter
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 3, 4)
    m = ghost.GhostClippingModule(model, mode=mode, backend=backend, strategy="gram")  # out: the Gram op
    key, cross = f"{backend}.dp_ghost_vector_sq_norms", f"{backend}.dp_ghost_cross_gram"
    before, before_cross = kernels.LAUNCHES.get(key, 0), kernels.LAUNCHES.get(cross, 0)
    m.dp_backward(m(x).square().sum((1, 2)), 1.0)
    assert kernels.LAUNCHES.get(key, 0) - before == (0 if backend == "torch" else 1)
    # fc's two uses: its terms (u, u), (u, v), (v, v) are three cross-Gram calls (two launches each)
    assert kernels.LAUNCHES.get(cross, 0) - before_cross == (0 if backend == "torch" else 6)
    params = {n: p.detach() for n, p in model.named_parameters()}
    one = lambda p, xb: torch.func.functional_call(model, p, (xb[None],)).square().sum()  # noqa: E731
    gs = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0))(params, x)
    want = torch.stack([g.flatten(1).square().sum(1) for g in gs.values()]).sum(0).sqrt()
    torch.testing.assert_close(m.per_sample_gradient_norms, want, **TOL)


# ---------------------------------------------------------------- memory

def _peak_bytes(fn) -> int:
    """Peak of the CPU bytes allocated while ``fn`` runs, above what was live
    before (:func:`fastadv.bench.dp_ghost.peak_bytes`: the profiler's
    allocation events, frees matched by address to blocks allocated inside
    the session, so the result does not depend on what the process profiled
    before)."""
    return peak_bytes(fn, "cpu")[0]


def _lm_step(mode, batch, vocab=1000, length=16):
    """One training step of TinyLM (tied head) at ``batch``: ``mode`` None is the
    non-private step (mean cross-entropy, SGD), else fastadv's DP step."""
    torch.manual_seed(16)
    model = TinyLM(vocab=vocab, d=64)
    ids, y = torch.randint(0, vocab, (batch, length)), torch.randint(0, vocab, (batch, length))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode is None:
        def step():
            opt.zero_grad(set_to_none=True)
            _loss_vanilla(model(ids), y).backward()
            opt.step()
    else:
        m, opt, crit, _ = PrivacyEngine().make_private(
            module=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), data_loader=_loader(ids, y, batch),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)

        def step():
            opt.zero_grad(set_to_none=True)
            _loss_dp(crit, m(ids), y).backward()
            opt.step()
    step()  # warm-up: lazily created state is not part of a step's peak
    return step


def test_peak_bytes_does_not_depend_on_earlier_sessions():
    """The same step measured before and after other profiled steps gives the
    same peak (the raw memory events also counted frees of blocks an earlier
    session had seen allocated: one CI run measured the non-private step 300
    KB, 8%, lower after the rest of the suite)."""
    plain = _lm_step(None, 64, vocab=100)
    first = _peak_bytes(plain)
    _peak_bytes(_lm_step("bk", 64, vocab=100))
    _peak_bytes(plain)
    assert _peak_bytes(plain) == first


@pytest.mark.parametrize("mode", MODES)
def test_peak_memory_close_to_non_private(mode):
    """Peak memory of a DP step (forward, DP backward, noise, SGD) on a small
    transformer with a tied head (d=64, 16 tokens, vocabulary 1000): within 1.2x
    of the non-private step at batch 64, and growing with the batch (16 -> 64)
    at most 1.2x as fast as the non-private step does, i.e. nothing per sample
    beyond the activations a normal step keeps.  Measured with the profiler's
    CPU memory events (see :func:`_peak_bytes`)."""
    peaks = {b: (_peak_bytes(_lm_step(None, b)), _peak_bytes(_lm_step(mode, b))) for b in (16, 64)}
    plain, dp = peaks[64]
    assert dp <= 1.2 * plain, f"{mode}: {dp} bytes against {plain} non-private ({dp / plain:.2f}x)"
    growth_plain, growth_dp = peaks[64][0] - peaks[16][0], peaks[64][1] - peaks[16][1]
    assert growth_dp <= 1.2 * growth_plain, (f"{mode}: +{growth_dp} bytes from batch 16 to 64, "
                                             f"non-private +{growth_plain}")


class UntiedLM(TinyLM):
    """TinyLM with its own head matrix and contiguous position ids: the model
    Opacus's ghost mode accepts (it refuses tied weights and ``.view``s the
    ids of every embedding)."""

    def __init__(self, vocab, d):
        super().__init__(vocab=vocab, d=d)
        self.head.weight = nn.Parameter(self.emb.weight.detach().clone())

    def forward(self, ids):
        b, t = ids.shape
        h = self.emb(ids) + self.pos(torch.arange(t).expand(b, t).contiguous())
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(self.ln2(h))


def _two_backward_step(batch, vocab, length=16):
    """The floor of any ghost clipping on TinyLM, in plain PyTorch: the
    per-sample losses' sum differentiated once with the graph kept
    (``autograd.grad(..., retain_graph=True)``: what the norms need), then a
    second backward of a reweighted sum and SGD, no hooks and no norms."""
    torch.manual_seed(16)
    model = TinyLM(vocab=vocab, d=64)
    ids, y = torch.randint(0, vocab, (batch, length)), torch.randint(0, vocab, (batch, length))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        per_sample = F.cross_entropy(model(ids).reshape(-1, vocab), y.reshape(-1), reduction="none")
        per_sample = per_sample.view(batch, length).mean(1)
        torch.autograd.grad(per_sample.sum(), list(model.parameters()), retain_graph=True)
        (0.5 * per_sample).sum().backward()
        opt.step()
    step()
    return step


@pytest.mark.parametrize("mode", MODES)
def test_peak_memory_when_activations_dominate(mode):
    """The same step with a vocabulary of 100, where the activations (not the
    logits) dominate the non-private peak.  bk (one backward; each layer's
    output gradient held until the norms are known): within the issue's 1.2x
    (measured 1.16x).  Ghost cannot be: its first backward must keep the whole
    graph for the second, and that alone, in plain PyTorch with no norms
    (:func:`_two_backward_step`), peaks at 1.26x the non-private step here.
    Ghost is held to that floor (within 3%; measured 1.26x): the norms, hooks
    and clipping add nothing on top (docs/dp.md, "Memory")."""
    plain, dp = _peak_bytes(_lm_step(None, 64, vocab=100)), _peak_bytes(_lm_step(mode, 64, vocab=100))
    if mode == "bk":
        assert dp <= 1.2 * plain, f"bk: {dp / plain:.3f}x the non-private peak"
    else:
        floor = _peak_bytes(_two_backward_step(64, vocab=100))
        assert dp <= 1.03 * floor, (f"ghost: {dp / plain:.3f}x the non-private peak, the two-backward floor "
                                    f"{floor / plain:.3f}x")


def _untied_lm_step(engine, mode, batch=64, vocab=100, length=16):
    """One DP step of :class:`UntiedLM` made private by ``engine`` (Opacus's or
    fastadv's PrivacyEngine class) in ``mode``."""
    torch.manual_seed(16)
    model = UntiedLM(vocab, 64)
    ids, y = torch.randint(0, vocab, (batch, length)), torch.randint(0, vocab, (batch, length))
    m, opt, crit, _ = engine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=_loader(ids, y, batch), noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
        grad_sample_mode=mode)

    def step():
        opt.zero_grad(set_to_none=True)
        _loss_dp(crit, m(ids), y).backward()
        opt.step()
    step()
    return step


def test_ghost_peak_memory_below_opacus_ghost():
    """Where activations dominate (vocabulary 100), fastadv's ghost mode peaks
    below Opacus's own ghost mode on the same untied model (measured: 1.26x
    and 1.40x the non-private step), and bk below both."""
    ours = _peak_bytes(_untied_lm_step(PrivacyEngine, "ghost"))
    theirs = _peak_bytes(_untied_lm_step(opacus.PrivacyEngine, "ghost"))
    bk = _peak_bytes(_untied_lm_step(PrivacyEngine, "bk"))
    assert ours < theirs, f"fastadv ghost {ours} bytes, Opacus ghost {theirs}"
    assert bk < ours, f"fastadv bk {bk} bytes, fastadv ghost {ours}"


def test_bk_keeps_conv_input_not_patches():
    """Book-keeping keeps a conv's input and output gradient until the norms
    are known, not its unfolded patches (``k^2`` times the input): the kept
    use is lazy, built for the norm and again for the clipped gradient, and
    the update still equals Opacus vanilla (the CNN exactness tests).  On a
    small ResNet-18 (GroupNorm, width 16, 32x32, batch 64) this took bk's peak
    from 5.4x to 3.9x the non-private step's (docs/dp.md, "Memory")."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    m = ghost.GhostClippingModule(nn.Sequential(conv), mode="bk")
    _, _, mats, _ = m.dp_backward(m(torch.randn(2, 3, 6, 6)).square().flatten(1).sum(1), 1.0)
    (uses,) = mats.values()
    assert isinstance(uses[0], ghost._LazyUse)
    (use,) = ghost._LazyUse.resolve(uses)
    assert use.q.shape == (2, 36, 27) and use.p.shape == (2, 36, 4)  # the patches exist only now


def _resnet_step(mode, batch=64):
    """One step of a small ResNet-18 with GroupNorm (width 16, 32x32 images):
    ``mode`` None is the non-private step, else fastadv's DP step."""
    from fastadv.bench.dp import ResNet18GN
    torch.manual_seed(0)
    model = ResNet18GN(16)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    if mode is not None:
        model, opt, crit, _ = PrivacyEngine().make_private(
            module=model, optimizer=opt, criterion=crit, data_loader=_loader(x, y, batch), noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)

    def step():
        opt.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        opt.step()
    step()
    return step


@pytest.mark.parametrize("mode,bound", [("bk", 4.2), ("ghost", 2.2)])
def test_cnn_peak_memory_regression_guard(mode, bound):
    """Not the issue's 1.2x (a conv's per-sample norm still unfolds its input,
    ``k^2`` times its size: docs/dp.md, "Memory"), a guard on what this
    session measured on a small ResNet-18-GN at batch 64: bk 3.9x (5.4x when
    it kept every conv's patches until the end), ghost 2.0x the non-private
    step's peak."""
    plain, dp = _peak_bytes(_resnet_step(None)), _peak_bytes(_resnet_step(mode))
    assert dp <= bound * plain, f"{mode}: {dp / plain:.2f}x the non-private peak"


class _MatmulShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """The output shapes of every matrix product dispatched."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm"):
            self.shapes.append(tuple(out.shape))
        return out


def test_ghost_norm_backward_computes_no_parameter_gradient():
    """Ghost's first backward asks for the deepest layers' output gradients,
    not the parameters': no weight gradient is computed (and dropped) there,
    which cost a GEMM per Linear and a weight-sized buffer per parameter."""
    class Wide(nn.Module):  # weight shapes no activation product shares
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(7, 11), nn.Linear(11, 13), nn.Linear(13, 5)

        def forward(self, x):
            return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    torch.manual_seed(18)
    model = Wide()
    m = ghost.GhostClippingModule(model, mode="ghost", backend="torch")
    loss = m(torch.randn(4, 7)).square().sum(1)
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    weights |= {w[::-1] for w in weights}
    with _MatmulShapes() as seen:
        m.dp_backward(loss, 1.0)
    assert not weights & set(seen.shapes), seen.shapes
    assert m.per_sample_gradient_norms.shape == (4,)


# ---------------------------------------------------------------- the fused norm kernel

@pytest.mark.parametrize("shape", [(3, 1, 5, 7), (2, 20, 33, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_sq_norms_op(backend, shape, dtype):
    """``||g_b^T a_b||^2`` of every backend against the per-sample gradients
    materialised in fp64 from the same (rounded) inputs."""
    from fastadv.ops.dp_ghost import linear_sq_norms
    b, t, i, o = shape
    a, g = torch.randn(b, t, i).to(dtype), torch.randn(b, t, o).to(dtype)
    got = linear_sq_norms(a, g, backend=backend)
    want = torch.bmm(g.double().transpose(1, 2), a.double()).flatten(1).square().sum(1)
    assert got.dtype == torch.float32 and got.shape == (b,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.launch_free
def test_linear_sq_norms_empty_batch(backend):
    from fastadv.ops.dp_ghost import linear_sq_norms
    assert linear_sq_norms(torch.randn(0, 4, 3), torch.randn(0, 4, 2), backend=backend).shape == (0,)


def test_ghost_module_on_each_backend(backend):
    """The module's Gram norms through the op on each backend equal the
    reference's materialised per-sample gradients (strategy "per_sample")."""
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(4, 5, 6)
    norms = {}
    for strategy, be in (("per_sample", None), ("gram", backend)):
        m = ghost.GhostClippingModule(copy.deepcopy(model), mode="ghost", strategy=strategy, backend=be)
        m.dp_backward(m(x).square().sum((1, 2)), 1.0)
        norms[strategy] = m.per_sample_gradient_norms
    torch.testing.assert_close(norms["gram"], norms["per_sample"], rtol=1e-5, atol=1e-6)


@pytest.mark.launch_free
def test_linear_sq_norms_refusals():
    from fastadv.ops.dp_ghost import linear_sq_norms
    with pytest.raises(ValueError, match="same B and T"):
        linear_sq_norms(torch.randn(2, 3, 4), torch.randn(2, 4, 4))
    with pytest.raises(TypeError, match="floating point"):
        linear_sq_norms(torch.ones(2, 3, 4, dtype=torch.int64), torch.randn(2, 3, 4))


# ---------------------------------------------------------------- Opacus's ghost API

def test_same_api_and_update_as_opacus_ghost():
    """Opacus's own grad_sample_mode="ghost" and fastadv's return the same kinds
    of objects and the same private gradient (MLP, no tied weights: Opacus's
    ghost mode refuses tied parameters)."""
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    torch.manual_seed(19)
    model = MLP()
    x, y = _data("mlp", 6)
    out = {}
    for name, engine in (("opacus", opacus.PrivacyEngine()), ("fastadv", PrivacyEngine())):
        m0 = copy.deepcopy(model)
        res = engine.make_private(module=m0, optimizer=torch.optim.SGD(m0.parameters(), lr=0.0),
                                  criterion=nn.CrossEntropyLoss(), data_loader=_loader(x, y, 6),
                                  noise_multiplier=0.0, max_grad_norm=0.3, poisson_sampling=False,
                                  grad_sample_mode="ghost")
        assert len(res) == 4 and isinstance(res[2], DPLossFastGradientClipping)
        m, opt, crit, _ = res
        opt.zero_grad()
        logits = m(x)
        loss = crit(logits, y)
        assert abs(loss.item() - F.cross_entropy(logits.detach(), y).item()) < 1e-6
        loss.backward()
        opt.step()
        out[name] = {n: p.grad.clone() for n, p in m0.named_parameters()}
    _assert_same(out["fastadv"], out["opacus"])


def test_make_private_with_epsilon_ghost():
    x, y = _data("mlp", 32)
    model = MLP()
    engine = PrivacyEngine(accountant="rdp")  # the PRV accountant's search takes seconds
    m, opt, crit, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=_loader(x, y, 8), target_epsilon=2.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0,
        grad_sample_mode="bk")
    assert isinstance(opt, ghost.GhostDPOptimizer) and opt.noise_multiplier > 0


# ---------------------------------------------------------------- nn.Embedding(padding_idx=...)
#
# A deliberate difference from Opacus 1.6 (docs/dp.md, "Differences from
# Opacus"): its vanilla per-sample gradient of an embedding is a scatter_add
# that ignores padding_idx, so the padding row gets a per-sample gradient, is
# updated, and enters every norm.  fastadv's ghost / bk follow autograd: the
# per-sample gradient is what autograd gives for that sample alone, so the
# peer here is torch.func (vmap of grad), clipped with Opacus's formula.

PAD, PAD_VOCAB = 0, 7


class PadLM(nn.Module):
    """A padded token embedding, a sequence Linear (so the Gram kernel runs) and
    a head over the vocabulary, tied to the embedding or not."""

    def __init__(self, tied=True, d=6):
        super().__init__()
        self.emb = nn.Embedding(PAD_VOCAB, d, padding_idx=PAD)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, PAD_VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + torch.tanh(self.fc(h)))


def _padded_batch(b=5, t=6, pads=True):
    """Token ids with padding at the end of some sequences (or none at all)."""
    gen = torch.Generator().manual_seed(20)
    ids = torch.randint(1, PAD_VOCAB, (b, t), generator=gen)
    if pads:
        ids[0, 3:] = PAD
        ids[2, 1:] = PAD
        ids[3, 5] = PAD
    return ids, torch.randint(0, PAD_VOCAB, (b, t), generator=gen)


def functorch_clipped_grads(model, ids, y, C):
    """The peer: per-sample gradients by torch.func (autograd for one sample:
    padding_idx honoured, tied uses summed), Opacus's clip factor
    ``min(1, C / (||g_b|| + 1e-6))``, summed, divided by the batch size (mean
    reduction, noise 0).  The per-sample loss is the mean over the sample's
    tokens (Opacus's unit for a token-level mean loss)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xb, yb):
        out = torch.func.functional_call(model, p, (xb[None],))
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), yb)

    gs = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, ids, y)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in gs.values()]).sum(0).sqrt()
    f = (C / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", f, g) / len(ids) for n, g in gs.items()}, norms


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_padding_idx_equals_functorch_reference(mode, tied, backend):
    """With padding tokens in the batch: the private gradient equals the
    functorch per-sample reference (fp32 tolerance), norms included; the
    Gram form is forced so the backend's kernels run on the Linear uses and
    (untied) on the embedding, whose padding rows of g are zeroed before."""
    import fastadv.kernels as kernels
    torch.manual_seed(21)
    model = PadLM(tied=tied)
    ids, y = _padded_batch()
    want, want_norms = functorch_clipped_grads(model, ids, y, C=0.2)
    if tied:  # the head's use of the tied weight does reach the padding row (autograd agrees)
        assert want["emb.weight"][PAD].abs().max() > 0
    before = kernels.LAUNCHES.get(f"{backend}.dp_ghost_embedding_sq_norms", 0)
    before_cross = kernels.LAUNCHES.get(f"{backend}.dp_ghost_cross_gram", 0)
    got, m = fast_grads(model, [(ids, y)], C=0.2, mode=mode, backend=backend, strategy="gram")
    # one DP backward: the untied embedding's norm is one op call; the tied one's three terms (the
    # table's, the head's, their cross term) are cross-Gram calls on a kernel backend (two launches
    # each), the reference's math on the torch backend
    assert kernels.LAUNCHES.get(f"{backend}.dp_ghost_embedding_sq_norms", 0) - before == (0 if tied else 1)
    assert kernels.LAUNCHES.get(f"{backend}.dp_ghost_cross_gram", 0) - before_cross == \
        (6 if tied and backend != "torch" else 0)
    assert (want_norms > 0.2).any(), "the test should clip some samples"
    torch.testing.assert_close(m.per_sample_gradient_norms, want_norms, **TOL)
    _assert_same(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_padding_row_stays_frozen(mode):
    """Untied: the padding row's private gradient is exactly zero and an SGD
    step (noise 0) leaves its weights bit for bit unchanged, as autograd does."""
    torch.manual_seed(22)
    model = PadLM(tied=False)
    ids, y = _padded_batch()
    before = model.emb.weight[PAD].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    m, opt, crit, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), data_loader=_loader(ids, y, len(ids)),
        noise_multiplier=0.0, max_grad_norm=0.2, poisson_sampling=False, grad_sample_mode=mode)
    opt.zero_grad()
    _loss_dp(crit, m(ids), y).backward()
    opt.step()
    assert torch.equal(model.emb.weight.grad[PAD], torch.zeros_like(before))
    assert torch.equal(model.emb.weight[PAD].detach(), before)
    assert model.emb.weight.grad[1:].abs().max() > 0  # the other rows are trained


def test_opacus_vanilla_updates_the_padding_row():
    """Documents the difference (if Opacus changes, this fails and docs/dp.md
    must change): Opacus 1.6's vanilla mode gives the padding row a gradient
    and its norms include that row, so it differs from the functorch
    reference; fastadv's ghost / bk equal the reference (test above)."""
    torch.manual_seed(23)
    model = PadLM(tied=False)
    ids, y = _padded_batch()
    want, _ = functorch_clipped_grads(model, ids, y, C=0.2)
    got = opacus_grads(copy.deepcopy(model), [(ids, y)], C=0.2)
    assert got["emb.weight"][PAD].abs().max() > 1e-4, "Opacus vanilla no longer updates the padding row"
    assert not torch.allclose(got["fc.weight"], want["fc.weight"], **TOL), \
        "Opacus vanilla's clip factors no longer include the padding row"


def test_opacus_ghost_norms_include_the_padding_row():
    """Opacus 1.6's ghost mode: its second backward is autograd's (the padding
    row gets no gradient) but its embedding norms ignore padding_idx, so its
    clip factors (and update) differ from the reference. Documents the
    difference, as above."""
    torch.manual_seed(24)
    model = PadLM(tied=False)  # Opacus's ghost mode refuses tied parameters
    ids, y = _padded_batch()
    want, _ = functorch_clipped_grads(model, ids, y, C=0.2)
    m0 = copy.deepcopy(model)
    m, opt, crit, _ = opacus.PrivacyEngine().make_private(
        module=m0, optimizer=torch.optim.SGD(m0.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
        data_loader=_loader(ids, y, len(ids)), noise_multiplier=0.0, max_grad_norm=0.2,
        poisson_sampling=False, grad_sample_mode="ghost")
    opt.zero_grad()
    out = m(ids)
    crit(out.reshape(-1, PAD_VOCAB), y.reshape(-1), shape=out.shape).backward()
    opt.step()
    assert torch.equal(m0.emb.weight.grad[PAD], torch.zeros(m0.emb.weight.shape[1]))
    assert not torch.allclose(m0.fc.weight.grad, want["fc.weight"], **TOL), \
        "Opacus ghost's norms no longer include the padding row"


@pytest.mark.parametrize("mode", MODES)
def test_padded_embedding_without_pads_equals_opacus_vanilla(mode):
    """A padded embedding (tied head) with no padding id in the batch: no
    difference, the update equals Opacus vanilla's."""
    torch.manual_seed(25)
    model = PadLM(tied=True)
    ids, y = _padded_batch(pads=False)
    assert (ids != PAD).all()
    want = opacus_grads(copy.deepcopy(model), [(ids, y)], C=0.2)
    got, m = fast_grads(model, [(ids, y)], C=0.2, mode=mode)
    assert (m.per_sample_gradient_norms > 0.2).any(), "the test should clip some samples"
    _assert_same(got, want)


def _opacus_ghost_step(model, batches, C):
    """Opacus 1.6's own ghost mode: ``p.grad`` after one (accumulated) step."""
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    m, opt, crit, _ = opacus.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
        data_loader=_loader(x, y, len(batches[0][0])), noise_multiplier=0.0, max_grad_norm=C,
        poisson_sampling=False, grad_sample_mode="ghost")
    opt.zero_grad()
    for xb, yb in batches:
        crit(m(xb), yb).backward()
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_opacus_ghost_accumulation_keeps_the_last_micro_batch():
    """Documents a difference (docs/dp.md): Opacus 1.6's ghost backward calls
    ``optimizer.zero_grad()`` between its two backwards, which also clears the
    earlier micro-batches' gradients, and its optimizer counts
    ``accumulated_iterations = 1``: two accumulated micro-batches give the
    last one's private gradient alone. fastadv's ghost / bk sum them, as
    Opacus vanilla does (test_sum_reduction_and_accumulation_equal_opacus)."""
    torch.manual_seed(26)
    model = MLP()
    batches = [_data("mlp", 4), _data("mlp", 4)]
    last = opacus_grads(copy.deepcopy(model), batches[1:], C=0.3)
    got = _opacus_ghost_step(copy.deepcopy(model), batches, C=0.3)
    _assert_same(got, last)


def test_opacus_ghost_nonfinite_sample_poisons_the_update():
    """Documents a difference: in Opacus's ghost mode one inf sample makes the
    whole update non-finite; fastadv's bk drops it (test_nonfinite_sample_dropped_in_bk)."""
    torch.manual_seed(27)
    x, y = _data("mlp", 4)
    x[1, 0] = float("inf")
    got = _opacus_ghost_step(MLP(), [(x, y)], C=0.3)
    assert not all(torch.isfinite(g).all() for g in got.values())


def test_opacus_ghost_refuses_tied_parameters():
    """Documents a difference: Opacus 1.6's ghost mode refuses a tied head (in
    the forward); fastadv's ghost / bk sum the uses (test_padding_idx_equals_functorch_reference)."""
    torch.manual_seed(28)
    model = PadLM(tied=True)
    ids, y = _padded_batch(pads=False)
    m, opt, crit, _ = opacus.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
        data_loader=_loader(ids, y, len(ids)), noise_multiplier=0.0, max_grad_norm=0.2,
        poisson_sampling=False, grad_sample_mode="ghost")
    with pytest.raises(NotImplementedError, match="Parameter tying"):
        m(ids)  # the forward hook sees the tied weight's second use


def test_fastadv_hooks_mode_follows_opacus_on_padding():
    """fastadv's vanilla mode (Opacus's hooks) keeps Opacus's padding
    behaviour: the same private gradient, padding row included (docs/dp.md)."""
    torch.manual_seed(23)
    model = PadLM(tied=False)
    ids, y = _padded_batch()
    want = opacus_grads(copy.deepcopy(model), [(ids, y)], C=0.2)
    m0 = copy.deepcopy(model)
    m, opt, _ = PrivacyEngine().make_private(
        module=m0, optimizer=torch.optim.SGD(m0.parameters(), lr=0.0), data_loader=_loader(ids, y, len(ids)),
        noise_multiplier=0.0, max_grad_norm=0.2, poisson_sampling=False)
    opt.zero_grad()
    _loss_vanilla(m(ids), y).backward()
    opt.step()
    assert m0.emb.weight.grad[PAD].abs().max() > 1e-4
    _assert_same({n: p.grad for n, p in m0.named_parameters()}, want)


# ---------------------------------------------------------------- the example

def test_example_runs():
    """examples/dp_ghost.py, the example docs/dp.md points to, runs to the end in
    a fresh interpreter against this checkout and reports its privacy budget."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(root / "examples" / "dp_ghost.py")], capture_output=True, text=True,
                       timeout=600, env=env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epsilon" in r.stdout and "bk:" in r.stdout, r.stdout[-2000:]


# ---------------------------------------------------------------- transformers' RMSNorm family

class LlamaLogits(nn.Module):
    """A one-layer HF Llama (LlamaRMSNorm, rotary attention with grouped KV
    heads, gated MLP, untied head) from a config, fed position ids of shape [B, T]."""

    def __init__(self, model_cls="llama"):
        super().__init__()
        import transformers
        cfg_cls, lm_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                           "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM)}[model_cls]
        extra = {"head_dim": 8} if model_cls == "gemma" else {}
        cfg = cfg_cls(vocab_size=PAD_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, **extra)
        self.model = lm_cls(cfg)

    def forward(self, ids):
        b, t = ids.shape
        return self.model(input_ids=ids, position_ids=torch.arange(t).expand(b, t).contiguous()).logits


@pytest.mark.parametrize("model_cls", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("mode", MODES)
def test_hf_rms_norm_models_equal_functorch_reference(mode, model_cls):
    """HF Llama and Qwen2 (their RMSNorm classes share LlamaRMSNorm's forward,
    which fastadv recognises by its code) and Gemma (GemmaRMSNorm's ``1 +
    weight``; its head tied to the token table): the private gradient and
    the per-sample norms equal the torch.func per-sample reference (noise 0)."""
    torch.manual_seed(9)
    model = LlamaLogits(model_cls)
    ids, y = torch.randint(1, PAD_VOCAB, (4, 6)), torch.randint(1, PAD_VOCAB, (4, 6))
    want, want_norms = functorch_clipped_grads(copy.deepcopy(model), ids, y, C=0.5)
    got, m = fast_grads(model, [(ids, y)], C=0.5, mode=mode)
    _assert_same(got, want)
    torch.testing.assert_close(m.per_sample_gradient_norms, want_norms, rtol=1e-4, atol=1e-6)


def test_hf_rms_norm_variants_that_change_forward_are_refused():
    """T5LayerNorm and OLMo-2's RMSNorm have their own forwards: not
    recognised, refused with the layer named; LlamaRMSNorm and GemmaRMSNorm
    subclasses that override forward are refused too; Gemma 2's RMSNorm
    (generated from Gemma's) is taken."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    class Scaled(LlamaRMSNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    class Shifted(GemmaRMSNorm):
        def _norm(self, x):
            return super()._norm(x) + 1

    for layer in (T5LayerNorm(4), Olmo2RMSNorm(4), Scaled(4), Shifted(4)):
        with pytest.raises(ghost.UnsupportedLayerError, match=type(layer).__name__):
            ghost.GhostClippingModule(nn.Sequential(nn.Linear(4, 4), layer), mode="bk")
    for layer in (LlamaRMSNorm(4), GemmaRMSNorm(4), Gemma2RMSNorm(4)):
        ghost.GhostClippingModule(nn.Sequential(nn.Linear(4, 4), layer), mode="bk")


def test_hf_rms_norm_low_precision_rounds_xhat_as_the_forward():
    """A bf16 input: the per-sample weight gradient equals the module's own
    autograd gradient, one sample at a time (LlamaRMSNorm rounds ``xhat`` to
    bf16 before its fp32 weight multiplies; an fp32 ``xhat`` would differ by
    that rounding)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(10)
    norm = LlamaRMSNorm(8)
    a, g = torch.randn(3, 5, 8).bfloat16(), torch.randn(3, 5, 8)
    (p, w), = ghost._hf_rms_norm(norm, a, g).vecs
    assert p is norm.weight
    for b in range(3):
        norm.weight.grad = None
        out = norm(a[b:b + 1])
        assert out.dtype == torch.float32
        out.backward(g[b:b + 1])
        torch.testing.assert_close(w[b], norm.weight.grad, rtol=1e-6, atol=1e-6)
    unrounded = (g * F.rms_norm(a.float(), (8,), eps=norm.variance_epsilon)).sum(1)
    assert not torch.allclose(w, unrounded, rtol=1e-6, atol=1e-6)  # the rounding is visible here
