"""Tests of the plain-PyTorch references (fastadv/reference) on tiny CPU models."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.reference import (AWP, PGD, DPOptimizer, GaussianNoise, add_gaussian_noise,
                               adversarial_train_step, clip_and_noise, ffgsm, fgsm_perturb,
                               mifgsm_torchattacks, noisy_token_ids, pgdl2, weight_noise)
from fastadv.reference.attacks import fgsm, pgd
from fastadv.reference.mifgsm import mifgsm

V, D, C, B, L = 11, 6, 3, 4, 5


class TinyLM(nn.Module):
    """HF-like: get_input_embeddings, input_ids / inputs_embeds / attention_mask /
    labels keywords; returns an object with .logits (and .loss), or the tuple
    (loss, logits) when tuple_out (the AWP seed's protocol)."""

    def __init__(self, tuple_out=False):
        super().__init__()
        self.word_embeddings = nn.Embedding(V, D)
        self.dense = nn.Linear(D, D)
        self.head = nn.Linear(D, C)
        self.tuple_out = tuple_out

    def get_input_embeddings(self):
        return self.word_embeddings

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None):
        e = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.dense(e))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        logits = self.head(h.mean(1))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        if self.tuple_out:
            return loss, logits
        return SimpleNamespace(logits=logits, loss=loss)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L)
    mask[0, -2:] = 0
    return ids, mask, torch.randint(0, C, (B,), generator=g)


def clean_backward(model, ids, mask, y):
    out = model(input_ids=ids, attention_mask=mask, labels=y)
    (out[0] if isinstance(out, tuple) else out.loss).backward()


def grads_at(model, state, ids, mask, y):
    """Gradients of the loss of a copy of ``model`` loaded with ``state``."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.zero_grad()
    clean_backward(m, ids, mask, y)
    return {n: p.grad.clone() for n, p in m.named_parameters()}


# ---------------------------------------------------------------- PGD

def test_pgd_projection_restore_and_grad_protocol():
    torch.manual_seed(0)
    model, (ids, mask, y) = TinyLM(), batch()
    clean_backward(model, ids, mask, y)
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    pgd_ = PGD(model, emb_name="word_embeddings.", epsilon=0.5, alpha=0.3)
    pgd_.backup_grad()
    assert all(pgd_.grad_backup[n] is not p.grad for n, p in model.named_parameters())
    emb = model.word_embeddings.weight
    K = 4
    for t in range(K):
        pgd_.attack(is_first_attack=(t == 0))
        r = emb.detach() - w0["word_embeddings.weight"]
        assert r.norm() <= 0.5 * (1 + 1e-5)
        if t != K - 1:
            model.zero_grad()
        else:
            pgd_.restore_grad()
            assert all(p.grad is pgd_.grad_backup[n] for n, p in model.named_parameters())
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        clean_backward(model, ids, mask, y)
    assert r.norm() == pytest.approx(0.5, rel=1e-5)  # 4 * 0.3 > 0.5: projection active
    pgd_.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), w0[n])
    adv = grads_at(model, state, ids, mask, y)  # last backward ran at the final perturbation
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clean[n] + adv[n], rtol=1e-5, atol=1e-6)


def test_pgd_first_step_is_normalised_gradient():
    torch.manual_seed(1)
    model, (ids, mask, y) = TinyLM(), batch(1)
    clean_backward(model, ids, mask, y)
    emb = model.word_embeddings.weight
    w0, g = emb.detach().clone(), emb.grad.clone()
    dense0 = model.dense.weight.detach().clone()
    PGD(model, epsilon=1.0, alpha=0.3).attack(is_first_attack=True)
    torch.testing.assert_close(emb.detach(), w0 + 0.3 * g / g.norm(), rtol=1e-6, atol=1e-6)
    assert torch.equal(model.dense.weight.detach(), dense0)  # only emb_name params move


def test_pgd_attack_without_grad_fails_like_the_seed():
    pgd_ = PGD(TinyLM())
    with pytest.raises(AttributeError):
        pgd_.attack(is_first_attack=True)


# ---------------------------------------------------------------- AWP

def test_awp_clamped_step_stays_in_bounds_and_restores():
    torch.manual_seed(2)
    model, (ids, mask, y) = TinyLM(tuple_out=True), batch(2)
    clean_backward(model, ids, mask, y)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp = AWP(model, torch.optim.SGD(model.parameters(), lr=0.1), adv_lr=10.0, adv_eps=0.05)
    awp._save()
    awp._attack_step()
    at_bound = 0
    for n, p in model.named_parameters():
        w, lo, hi = p.detach(), w0[n] - 0.05 * w0[n].abs(), w0[n] + 0.05 * w0[n].abs()
        if "weight" in n:
            assert torch.all(w >= lo) and torch.all(w <= hi)
            at_bound += int(((w == lo) | (w == hi)).sum())
        else:
            assert torch.equal(w, w0[n])
    assert at_bound > 0
    awp._restore()
    assert awp.backup == {} and awp.backup_eps == {}
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), w0[n])


def test_awp_unclamped_step_math():
    torch.manual_seed(3)
    model, (ids, mask, y) = TinyLM(tuple_out=True), batch(3)
    clean_backward(model, ids, mask, y)
    w, g = model.dense.weight.detach().clone(), model.dense.weight.grad.clone()
    awp = AWP(model, None, adv_lr=1e-3, adv_eps=10.0)
    awp._save()
    awp._attack_step()
    expect = w + 1e-3 * g / (g.norm() + 1e-6) * (w.norm() + 1e-6)
    torch.testing.assert_close(model.dense.weight.detach(), expect, rtol=1e-6, atol=1e-7)


def test_awp_attack_backward_protocol():
    torch.manual_seed(4)
    model, (ids, mask, y) = TinyLM(tuple_out=True), batch(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    clean_backward(model, ids, mask, y)
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}

    assert AWP(model, opt, start_epoch=2).attack_backward(ids, y, mask, epoch=1) is None
    assert AWP(model, opt, adv_lr=0).attack_backward(ids, y, mask, epoch=5) is None
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, clean[n]) and torch.equal(p.detach(), w0[n])

    # expected: one clamped step from w0 with the clean grads, then the grads there
    state = {}
    for n, p in model.named_parameters():
        w, g = w0[n], clean[n]
        if "weight" in n:
            w = w + 0.5 * g / (g.norm() + 1e-6) * (w.norm() + 1e-6)
            w = torch.min(torch.max(w, w0[n] - 0.2 * w0[n].abs()), w0[n] + 0.2 * w0[n].abs())
        state[n] = w
    adv = grads_at(model, state, ids, mask, y)

    class Scaler:
        def scale(self, loss):
            return loss * 4.0

    for scaler, k in ((None, 1.0), (Scaler(), 4.0)):
        model.zero_grad()
        for n, p in model.named_parameters():
            p.grad = clean[n].clone()
        assert AWP(model, opt, adv_lr=0.5, scaler=scaler).attack_backward(ids, y, mask, 0) is None
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), w0[n])
            torch.testing.assert_close(p.grad, k * adv[n], rtol=1e-5, atol=1e-6)


def test_awp_multi_step_restores_exactly():
    torch.manual_seed(5)
    model, (ids, mask, y) = TinyLM(tuple_out=True), batch(5)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    clean_backward(model, ids, mask, y)
    AWP(model, torch.optim.SGD(model.parameters(), lr=0.1), adv_step=3).attack_backward(
        ids, y, mask, 0)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), w0[n])


# ---------------------------------------------------------------- FGSM step

def test_fgsm_perturb_sign_of_zero_is_zero():
    e = torch.randn(2, 3, 4)
    g = torch.randn(2, 3, 4)
    g[0, 1] = 0.0
    out = fgsm_perturb(e, g, 0.25)
    assert torch.equal(out[0, 1], e[0, 1])
    torch.testing.assert_close((out - e).abs()[g != 0], torch.full_like(e[g != 0], 0.25))


def test_adversarial_train_step():
    torch.manual_seed(6)
    model, (ids, mask, y) = TinyLM(), batch(6)
    inputs = {"input_ids": ids, "attention_mask": mask}
    loss = adversarial_train_step(model, inputs, y, epsilon=0.1)
    assert all(p.grad is None for p in model.parameters())  # nothing touched inside the step

    # independent route: embeddings as a leaf
    e = model.word_embeddings(ids).detach().requires_grad_()
    clean = F.cross_entropy(model(inputs_embeds=e, attention_mask=mask).logits, y)
    (g,) = torch.autograd.grad(clean, e)
    adv_logits = model(inputs_embeds=e.detach() + 0.1 * g.sign(), attention_mask=mask).logits
    torch.testing.assert_close(loss, 0.5 * (clean + F.cross_entropy(adv_logits, y)))

    loss.backward()  # the caller's backward works (the seed's literal code would fail)
    rows = model.word_embeddings.weight.grad.abs().sum(1) != 0
    used = torch.zeros(V, dtype=torch.bool)
    used[ids.unique()] = True
    assert torch.equal(rows, used)
    assert model.head.weight.grad.abs().sum() > 0


def test_adversarial_train_step_frozen_embeddings():
    model, (ids, _, y) = TinyLM(), batch(7)
    model.word_embeddings.weight.requires_grad_(False)
    adversarial_train_step(model, {"input_ids": ids}, y).backward()
    assert model.word_embeddings.weight.grad is None and model.head.weight.grad is not None


# ---------------------------------------------------------------- image attacks

def image_setup(seed=8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 5))
    x = torch.rand(6, 3, 4, 4)
    y = torch.randint(0, 5, (6,))
    return model, x, y


def linf_ok(adv, x, eps):
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= eps + 1e-6
    assert not adv.requires_grad


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd0", "mifgsm", "mifgsm_ta", "ffgsm"])
def test_linf_attacks_stay_in_ball_and_box(name):
    model, x, y = image_setup()
    x[0] = 0.0
    x[1] = 1.0  # saturated samples exercise the [0, 1] clip
    eps = 0.1
    adv = {
        "fgsm": lambda: fgsm(model, x, y, eps=eps),
        "pgd": lambda: pgd(model, x, y, eps=eps, alpha=0.04, steps=5),
        "pgd0": lambda: pgd(model, x, y, eps=eps, alpha=0.04, steps=5, random_start=False),
        "mifgsm": lambda: mifgsm(model, x, y, eps, steps=5),
        "mifgsm_ta": lambda: mifgsm_torchattacks(model, x, y, eps=eps, alpha=0.04, steps=5),
        "ffgsm": lambda: ffgsm(model, x, y, eps=eps, alpha=0.125),
    }[name]()
    linf_ok(adv, x, eps)
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_pgdl2_stays_in_l2_ball_and_box():
    model, x, y = image_setup(9)
    for rs in (True, False):
        adv = pgdl2(model, x, y, eps=0.3, alpha=0.2, steps=4, random_start=rs)
        assert adv.min() >= 0 and adv.max() <= 1
        assert torch.all((adv - x).flatten(1).norm(dim=1) <= 0.3 * (1 + 1e-5))
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_single_step_attacks_agree_with_fgsm():
    model, x, y = image_setup(10)
    ref = fgsm(model, x, y, eps=0.05)
    torch.testing.assert_close(mifgsm(model, x, y, 0.05, steps=1), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(pgd(model, x, y, eps=0.05, alpha=0.05, steps=1,
                                   random_start=False), ref, rtol=0, atol=1e-6)


def test_mifgsm_without_momentum_is_pgd_and_with_momentum_matches_manual():
    model, x, y = image_setup(11)
    eps, T = 0.06, 3
    torch.testing.assert_close(
        mifgsm(model, x, y, eps, steps=T, decay=0.0),
        pgd(model, x, y, eps=eps, alpha=eps / T, steps=T, random_start=False), rtol=0, atol=0)
    assert torch.equal(mifgsm(model, x, y, eps, steps=T),
                       mifgsm_torchattacks(model, x, y, eps=eps, alpha=eps / T, steps=T))
    # manual two steps with momentum 0.9
    adv, m = x.clone(), torch.zeros_like(x)
    for _ in range(2):
        a = adv.clone().requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(model(a), y), a)
        m = 0.9 * m + g / g.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
        adv = (x + (adv + eps / 2 * m.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    torch.testing.assert_close(mifgsm(model, x, y, eps, steps=2, decay=0.9), adv,
                               rtol=0, atol=1e-6)


def test_targeted_attacks():
    model, x, y = image_setup(12)
    x = 0.4 + 0.2 * x  # away from the box edges
    t = (y + 1) % 5
    adv = fgsm(model, x, y, eps=0.01, targeted=True, target_labels=t)
    assert F.cross_entropy(model(adv), t) < F.cross_entropy(model(x), t)
    adv = pgd(model, x, y, eps=0.05, alpha=0.01, steps=5, targeted=True, target_labels=t)
    assert F.cross_entropy(model(adv), t) < F.cross_entropy(model(x), t)
    with pytest.raises(ValueError):
        fgsm(model, x, y, targeted=True)


# ---------------------------------------------------------------- DP

def test_seed_dpoptimizer_clips_total_norm_and_never_updates():
    torch.manual_seed(13)
    lin = nn.Linear(5, 3)
    w0 = [p.detach().clone() for p in lin.parameters()]
    opt = DPOptimizer(lin.parameters(), noise_multiplier=0.0, max_grad_norm=0.5)
    grads = [torch.randn_like(p) * 10 for p in lin.parameters()]
    for p, g in zip(lin.parameters(), grads):
        p.grad = g.clone()
    assert opt.step() is None
    total = torch.cat([p.grad.flatten() for p in lin.parameters()]).norm()
    assert total == pytest.approx(0.5, rel=1e-5)
    ratio = torch.cat([g.flatten() for g in grads]).norm() / 0.5
    for p, g, w in zip(lin.parameters(), grads, w0):
        torch.testing.assert_close(p.grad * ratio, g)  # same direction, scaled down
        assert torch.equal(p.detach(), w)  # no parameter update, as in the seed
    small = [torch.full_like(p, 1e-3) for p in lin.parameters()]
    for p, g in zip(lin.parameters(), small):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(lin.parameters(), small))


def test_seed_dpoptimizer_noise_std_is_noise_multiplier():
    p = nn.Parameter(torch.zeros(200_000))
    p.grad = torch.zeros_like(p)
    DPOptimizer([p], noise_multiplier=0.7, max_grad_norm=1e9).step()
    assert p.grad.mean().abs() < 0.01 and p.grad.std() == pytest.approx(0.7, rel=0.02)


def opacus_grads(params, grad_samples, sigma, C, reduction, seed):
    from opacus.optimizers import DPOptimizer as OpacusDPOptimizer
    for p, gs in zip(params, grad_samples):
        p.grad_sample = gs.clone()
        p.grad = None
    opt = OpacusDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma,
                            max_grad_norm=C, expected_batch_size=len(grad_samples[0]),
                            loss_reduction=reduction,
                            generator=torch.Generator().manual_seed(seed))
    opt.pre_step()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("sigma,reduction", [(0.0, "sum"), (0.0, "mean"), (1.3, "sum"),
                                             (1.3, "mean")])
def test_clip_and_noise_matches_opacus(sigma, reduction):
    pytest.importorskip("opacus")
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    params = list(model.parameters())
    n = 7
    gs = [torch.randn(n, *p.shape) for p in params]
    scale = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.0, 0.3])  # some clipped, some not
    gs = [g * scale.view(-1, *([1] * (g.dim() - 1))) for g in gs]
    C = 1.0
    expect = opacus_grads(params, gs, sigma, C, reduction, seed=123)
    got = clip_and_noise(gs, C, sigma, generator=torch.Generator().manual_seed(123),
                         expected_batch_size=n if reduction == "mean" else None)
    for e, g, p in zip(expect, got, params):
        assert g.shape == p.shape
        assert torch.equal(g, e)  # same ops, same generator stream: bitwise


def test_clip_and_noise_clip_factor():
    gs = [torch.tensor([[3.0, 0.0], [0.3, 0.0]]), torch.tensor([[4.0], [0.4]])]
    out = clip_and_noise(gs, 1.0, 0.0)
    # sample 0 has norm 5 -> scaled by ~1/5; sample 1 (norm 0.5) is untouched
    torch.testing.assert_close(out[0], torch.tensor([3 / (5 + 1e-6) + 0.3, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([4 / (5 + 1e-6) + 0.4]))
    empty = clip_and_noise([torch.zeros(0, 3, 2)], 1.0, 0.0)
    assert torch.equal(empty[0], torch.zeros(3, 2))


def test_clip_and_noise_noise_moments():
    gs = [torch.zeros(2, 300, 400)]
    out = clip_and_noise(gs, 0.5, 2.0, generator=torch.Generator().manual_seed(0))[0]
    assert out.mean().abs() < 0.01 and out.std() == pytest.approx(1.0, rel=0.02)
    out = clip_and_noise(gs, 0.5, 2.0, generator=torch.Generator().manual_seed(0),
                         expected_batch_size=4)[0]
    assert out.std() == pytest.approx(0.25, rel=0.02)


# ---------------------------------------------------------------- noise injection

def test_add_gaussian_noise():
    x = torch.randn(400, 500)
    assert torch.equal(add_gaussian_noise(x, 0.0), x)
    d = add_gaussian_noise(x, 0.3) - x
    assert d.mean().abs() < 0.005 and d.std() == pytest.approx(0.3, rel=0.02)


def test_noisy_token_ids():
    ids = torch.randint(1, 50, (64, 64))
    assert torch.equal(noisy_token_ids(ids, 0.0, 50), ids)
    out = noisy_token_ids(ids, 1e-3, 50)
    # float -> long truncates toward zero: any negative noise drops the id by one
    assert out.dtype == torch.long and torch.all((out == ids) | (out == ids - 1))
    assert 0.4 < (out == ids - 1).float().mean() < 0.6
    zeros = noisy_token_ids(torch.zeros(1000, dtype=torch.long), 1e-3, 50)
    assert torch.equal(zeros, torch.zeros_like(zeros))
    big = noisy_token_ids(ids, 100.0, 50)
    assert big.min() >= 0 and big.max() <= 49


def test_gaussian_noise_module():
    m = GaussianNoise(0.5)
    x = torch.randn(300, 400)
    d = m(x) - x
    assert d.std() == pytest.approx(0.5, rel=0.02)
    m.eval()
    assert m(x) is x
    assert GaussianNoise(0.0).train()(x) is x


def test_weight_noise_restores_exactly():
    torch.manual_seed(15)
    model = TinyLM()
    w0 = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError):
        with weight_noise(model, 0.1):
            for n, p in model.named_parameters():
                assert torch.equal(p.detach(), w0[n][0]) != ("weight" in n)
            raise RuntimeError("inside")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), w0[n][0]) and p.data_ptr() == w0[n][1]
