"""fastadv.attacks (torchattacks' API) and fastadv.ops.attacks against the
reference math of fastadv.reference.mifgsm, on every backend available here."""
import pytest
import torch
from torch import nn

from fastadv import attacks
from fastadv import kernels
from fastadv.ops import attacks as ops
from fastadv.reference import mifgsm as R

from conftest import DEVICE, launches_total, record_guards

FP32 = dict(rtol=1e-5, atol=1e-6)


def conv_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(DEVICE)


def linear_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 5)).to(DEVICE)


MODELS = {"conv": conv_model, "linear": linear_model}


def batch(n=4):
    return torch.rand(n, 3, 8, 8, device=DEVICE), torch.randint(0, 5, (n,), device=DEVICE)


def eval_model(kind="conv"):
    return MODELS[kind]().eval()


# (our attack, the reference with the same hyper-parameters), random_start=False
CASES = {
    "FGSM": (lambda m, b: attacks.FGSM(m, eps=0.05, backend=b),
             lambda m, x, y, **t: R.fgsm(m, x, y, eps=0.05, **t)),
    "PGD": (lambda m, b: attacks.PGD(m, eps=0.05, alpha=0.02, steps=4, random_start=False, backend=b),
            lambda m, x, y, **t: R.pgd(m, x, y, 0.05, 0.02, 4, False, **t)),
    "PGDL2": (lambda m, b: attacks.PGDL2(m, eps=0.3, alpha=0.2, steps=4, random_start=False, backend=b),
              lambda m, x, y, **t: R.pgdl2(m, x, y, 0.3, 0.2, 4, False, **t)),
    "MIFGSM": (lambda m, b: attacks.MIFGSM(m, eps=0.05, alpha=0.02, steps=4, decay=0.9, backend=b),
               lambda m, x, y, **t: R.mifgsm_torchattacks(m, x, y, 0.05, 0.02, 4, 0.9, **t)),
}


# ---- against the reference ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(backend, name, kind):
    model = eval_model(kind)
    x, y = batch()
    ours, ref = CASES[name]
    adv = ours(model, backend)(x, y)
    torch.testing.assert_close(adv, ref(model, x, y), **FP32)
    assert adv.shape == x.shape and adv.dtype == x.dtype


def test_seed_variant_of_mifgsm(backend):
    """Seed 002's MI-FGSM is MIFGSM with alpha = eps / steps."""
    model, (x, y) = eval_model(), batch()
    adv = attacks.MIFGSM(model, eps=0.06, alpha=0.06 / 5, steps=5, backend=backend)(x, y)
    torch.testing.assert_close(adv, R.mifgsm(model, x, y, 0.06, steps=5), **FP32)


@pytest.mark.parametrize("name", ["PGD", "PGDL2", "FFGSM"])
def test_seeded_random_start_matches_reference(backend, name):
    model, (x, y) = eval_model(), batch()
    ours = {"PGD": lambda: attacks.PGD(model, eps=0.05, alpha=0.02, steps=3, backend=backend),
            "PGDL2": lambda: attacks.PGDL2(model, eps=0.3, alpha=0.2, steps=3, backend=backend),
            "FFGSM": lambda: attacks.FFGSM(model, eps=0.05, alpha=0.06, backend=backend)}[name]()
    ref = {"PGD": lambda: R.pgd(model, x, y, 0.05, 0.02, 3, True),
           "PGDL2": lambda: R.pgdl2(model, x, y, 0.3, 0.2, 3, True),
           "FFGSM": lambda: R.ffgsm(model, x, y, 0.05, 0.06)}[name]
    torch.manual_seed(123)
    adv = ours(x, y)
    torch.manual_seed(123)
    torch.testing.assert_close(adv, ref(), **FP32)


def test_linf_steps_are_bit_exact(backend):
    """The L-inf step has no reduction: every backend gives the reference's bits."""
    model, (x, y) = eval_model(), batch()
    for name in ("FGSM", "PGD"):
        ours, ref = CASES[name]
        assert torch.equal(ours(model, backend)(x, y), ref(model, x, y)), name


# ---- properties -------------------------------------------------------------------------------------

def _all_attacks(model, backend):
    return [attacks.FGSM(model, eps=0.05, backend=backend),
            attacks.PGD(model, eps=0.05, alpha=0.03, steps=5, backend=backend),
            attacks.PGDL2(model, eps=0.2, alpha=0.15, steps=5, backend=backend),
            attacks.MIFGSM(model, eps=0.05, alpha=0.03, steps=5, backend=backend),
            attacks.FFGSM(model, eps=0.05, alpha=0.08, backend=backend)]


def test_outputs_in_box_and_ball(backend):
    model = eval_model()
    x = torch.rand(6, 3, 8, 8, device=DEVICE)
    x[0] = 0.0  # at the edges of the box: the clip is active
    x[1] = 1.0
    y = torch.randint(0, 5, (6,), device=DEVICE)
    for atk in _all_attacks(model, backend):
        adv = atk(x, y)
        assert adv.min() >= 0 and adv.max() <= 1, atk.attack
        delta = (adv - x).flatten(1)
        if atk.attack == "PGDL2":
            assert (delta.norm(dim=1) <= atk.eps * (1 + 1e-5)).all()
            assert (delta.norm(dim=1) > atk.eps * 0.99).any()  # the projection was active
        else:
            assert delta.abs().max() <= atk.eps + 1e-6, atk.attack
            assert delta.abs().max() >= atk.eps - 1e-6, atk.attack  # the ball's edge is reached


def test_model_mode_restored_and_eval_during_attack(backend):
    model = conv_model()
    model.train()
    model[3].eval()  # a mixed state comes back exactly
    before = [m.training for m in model.modules()]
    seen = []
    model.register_forward_pre_hook(lambda mod, inp: seen.append([m.training for m in mod.modules()]))
    x, y = batch()
    for atk in _all_attacks(model, backend):
        seen.clear()
        atk(x, y)
        assert seen and all(not any(s) for s in seen), f"{atk.attack}: not in eval mode during the attack"
        assert [m.training for m in model.modules()] == before, atk.attack


def test_model_mode_restored_when_the_attack_raises():
    model = conv_model().train()

    def fail(module, inputs):
        raise RuntimeError("boom")

    model[2].register_forward_pre_hook(fail)
    atk = attacks.PGD(model, steps=2)
    with pytest.raises(RuntimeError, match="boom"):
        atk(*batch())
    assert all(m.training for m in model.modules())


def test_set_model_training_mode(backend):
    model = conv_model()
    model.eval()
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen.setdefault(name, module.training)
        return hook

    for i, name in ((0, "conv"), (1, "bn"), (3, "drop")):
        model[i].register_forward_pre_hook(record(name))
    atk = attacks.FGSM(model, backend=backend)
    atk.set_model_training_mode(model_training=True, batchnorm_training=False, dropout_training=True)
    atk(*batch())
    assert seen == {"conv": True, "bn": False, "drop": True}
    assert not any(m.training for m in model.modules())  # eval before, eval after


def test_model_grad_untouched(backend):
    model = eval_model()
    sentinel = {}
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.grad = torch.full_like(p, 3.0)
            sentinel[i] = p.grad
    x, y = batch()
    for atk in _all_attacks(model, backend):
        atk(x, y)
    for i, p in enumerate(model.parameters()):
        if i in sentinel:
            assert p.grad is sentinel[i] and bool((p.grad == 3.0).all())
        else:
            assert p.grad is None


def test_inputs_not_modified_and_work_under_no_grad(backend):
    model, (x, y) = eval_model(), batch()
    x0 = x.clone()
    with torch.no_grad():
        adv = attacks.PGD(model, steps=2, backend=backend)(x, y)
    assert torch.equal(x, x0) and not torch.equal(adv, x)
    assert not adv.requires_grad and not x.requires_grad


# ---- targeted modes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_targeted_by_label(backend, name):
    model, (x, y) = eval_model(), batch()
    ours, ref = CASES[name]
    atk = ours(model, backend)
    atk.set_mode_targeted_by_label(quiet=True)
    assert atk.get_mode() == "targeted(label)" and atk.targeted
    target = (y + 1) % 5
    torch.testing.assert_close(atk(x, target), ref(model, x, y, targeted=True, target_labels=target), **FP32)
    atk.set_mode_default()
    assert atk.get_mode() == "default" and not atk.targeted
    torch.testing.assert_close(atk(x, y), ref(model, x, y), **FP32)


def _least_likely_loop(logits, labels, k):
    """torchattacks' per-sample loop, for comparison."""
    out = []
    for row, label in zip(logits, labels.tolist()):
        others = [c for c in range(logits.shape[1]) if c != label]
        out.append(others[int(torch.kthvalue(row[others], k).indices)])
    return torch.tensor(out, device=labels.device)


@pytest.mark.parametrize("k", [1, 2])
def test_targeted_least_likely(backend, k):
    model, (x, y) = eval_model(), batch(8)
    atk = attacks.PGD(model, eps=0.05, alpha=0.02, steps=3, random_start=False, backend=backend)
    atk.set_mode_targeted_least_likely(kth_min=k, quiet=True)
    target = atk.get_least_likely_label(x, y)
    with torch.no_grad():
        assert torch.equal(target, _least_likely_loop(model(x), y, k))
    assert (target != y).all()
    torch.testing.assert_close(atk(x, y), R.pgd(model, x, y, 0.05, 0.02, 3, False, targeted=True,
                                                target_labels=target), **FP32)


def test_targeted_random(backend):
    model = eval_model()
    x, y = torch.rand(64, 3, 8, 8, device=DEVICE), torch.randint(0, 5, (64,), device=DEVICE)
    atk = attacks.MIFGSM(model, eps=0.05, alpha=0.02, steps=2, backend=backend)
    atk.set_mode_targeted_random(quiet=True)
    torch.manual_seed(5)
    target = atk.get_random_target_label(x, y)
    assert (target != y).all() and target.min() >= 0 and target.max() < 5
    assert len(set(target.tolist())) == 5  # every class can be drawn
    torch.manual_seed(5)
    adv = atk(x, y)
    torch.testing.assert_close(adv, R.mifgsm_torchattacks(model, x, y, 0.05, 0.02, 2, targeted=True,
                                                          target_labels=target), **FP32)


def test_targeted_by_function(backend):
    model, (x, y) = eval_model(), batch()
    atk = attacks.FGSM(model, eps=0.05, backend=backend)
    atk.set_mode_targeted_by_function(lambda images, labels: (labels + 2) % 5, quiet=True)
    assert atk.get_mode() == "targeted(custom)"
    torch.testing.assert_close(atk(x, y), R.fgsm(model, x, y, 0.05, targeted=True, target_labels=(y + 2) % 5),
                               **FP32)


def test_mode_messages_and_errors(capsys):
    atk = attacks.PGD(eval_model())
    atk.set_mode_targeted_random()
    assert "targeted(random)" in capsys.readouterr().out
    atk.set_mode_default()
    assert "default" in capsys.readouterr().out
    atk.supported_mode = ["default"]
    with pytest.raises(ValueError, match="Targeted mode is not supported"):
        atk.set_mode_targeted_by_label()
    atk = attacks.PGD(eval_model())
    with pytest.raises(ValueError, match="kth_min"):
        atk.set_mode_targeted_least_likely(kth_min=0)
    atk.set_mode_targeted_least_likely(kth_min=5, quiet=True)  # 5 classes: only 4 others
    with pytest.raises(ValueError, match="kth_min=5"):
        atk(*batch())


# ---- normalisation --------------------------------------------------------------------------------------

class Normalized(nn.Module):
    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


@pytest.mark.parametrize("name", ["PGD", "PGDL2"])
def test_set_normalization_used(backend, name):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model, (x, y) = eval_model(), batch()
    wrapped = Normalized(model, mean, std).to(DEVICE)
    ours, ref = CASES[name]
    atk = ours(model, backend)  # the model takes normalised images
    atk.set_normalization_used(mean=mean, std=std)
    xn = (x - wrapped.mean) / wrapped.std
    adv_n = atk(xn, y)  # normalised in, normalised out
    expected = ref(wrapped, x, y)  # the attack in pixel space
    torch.testing.assert_close(adv_n, (expected - wrapped.mean) / wrapped.std, rtol=1e-5, atol=1e-5)
    assert "normalization_used=True" in repr(atk)


def test_normalization_range_is_checked_in_pixel_space():
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    atk = attacks.FGSM(eval_model())
    atk.set_normalization_used(mean, std)
    x, y = batch()
    atk((x - 0.5) / 0.25, y)  # fine: in [0, 1] after inverse_normalize
    with pytest.raises(ValueError, match=r"range \[0, 1\] after inverse_normalize"):
        atk(x * 2 + 1, y)  # 1.25 .. 1.5 in pixel space: out of range


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_hyper_parameters():
    model = eval_model()
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.PGD(model, eps=-0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.FGSM(model, eps=float("nan"))
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        attacks.MIFGSM(model, alpha=-1.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        attacks.PGD(model, steps=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        attacks.PGDL2(model, steps=-3)
    with pytest.raises(TypeError, match="steps must be an int"):
        attacks.MIFGSM(model, steps=2.5)
    with pytest.raises(TypeError, match="eps must be a number"):
        attacks.FFGSM(model, eps="8/255")
    with pytest.raises(ValueError, match="unknown fastadv backend"):
        attacks.PGD(model, backend="fast")
    with pytest.raises(TypeError, match="nn.Module"):
        attacks.PGD(lambda x: x)
    atk = attacks.PGD(model)
    atk.eps = -1  # set after construction: checked at the call
    with pytest.raises(ValueError, match="eps must be >= 0"):
        atk(*batch())


def test_bad_images_and_labels():
    atk = attacks.PGD(eval_model(), steps=1)
    x, y = batch()
    with pytest.raises(ValueError, match=r"range \[0, 1\] \(min: 1.0.*, max: 1.4"):
        atk(x * 0.5 + 1.0, y)
    with pytest.raises(ValueError, match=r"range \[0, 1\] \(min: -0.4"):
        atk(x - 0.5, y)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="range"):
        atk(bad, y)
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        atk(x, y[:3])
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        atk(x, y.view(4, 1))
    with pytest.raises(TypeError, match="labels must be integer"):
        atk(x, y.float())
    with pytest.raises(TypeError, match="labels must be a tensor"):
        atk(x)
    with pytest.raises(TypeError, match="floating-point"):
        atk((x * 255).to(torch.uint8), y)
    atk.check_inputs = False  # the range check off: no error, no sync
    atk(x * 0.5 + 1.0, y)


def test_ops_reject_bad_arguments():
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ops.pgd_step_(x.clone(), x, x, 0.1, -1.0)
    with pytest.raises(ValueError, match="shape"):
        ops.pgd_step_(x.clone(), x, torch.rand(2, 4), 0.1, 0.1)
    with pytest.raises(TypeError, match="momentum must be a tensor"):
        ops.mifgsm_step_(x.clone(), x, x, None, 0.1, 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        ops.fgsm_step_(x.clone(), x.long(), 0.1)


# ---- the functional steps ---------------------------------------------------------------------------------

def _step_inputs(shape=(3, 2, 41, 43), dtype=torch.float32, layout=torch.contiguous_format):
    """per-sample 3526 elements: one chunk; (3, 3, 40, 40): two chunks of the triton kernels."""
    x = torch.rand(shape, device=DEVICE)
    adv = (x + 0.05 * torch.randn(shape, device=DEVICE)).clamp(0, 1)
    g = torch.randn(shape, device=DEVICE)
    g.view(shape[0], -1)[0, :5] = 0.0  # sign(0) = 0
    ts = [t.to(dtype).contiguous(memory_format=layout) for t in (x, adv, g)]
    return ts


STEPS = {
    "fgsm": lambda adv, x, g, m, b: ops.fgsm_step_(adv, g, 0.03, backend=b),
    "pgd": lambda adv, x, g, m, b: ops.pgd_step_(adv, x, g, 0.03, 0.04, backend=b),
    "pgdl2": lambda adv, x, g, m, b: ops.pgdl2_step_(adv, x, g, 0.5, 1.0, 1e-10, backend=b),
    "mifgsm_first": lambda adv, x, g, m, b: ops.mifgsm_step_(adv, x, g, m, 0.03, 0.04, 0.9, first=True,
                                                             backend=b),
    "mifgsm": lambda adv, x, g, m, b: ops.mifgsm_step_(adv, x, g, m, 0.03, 0.04, 0.9, backend=b),
}
LAUNCHES = {"fgsm": 1, "pgd": 1, "pgdl2": 2, "mifgsm_first": 2, "mifgsm": 2}


@pytest.mark.parametrize("shape", [(3, 2, 41, 43), (3, 3, 40, 40), (1, 9000), (5, 1)])
@pytest.mark.parametrize("step", list(STEPS))
def test_step_against_torch_backend(backend, step, shape, no_host_sync):
    x, adv, g = _step_inputs(shape)
    mom = torch.randn(shape, device=DEVICE)
    adv_ref, mom_ref = adv.clone(), mom.clone()
    STEPS[step](adv_ref, x, g, mom_ref, "torch")
    ptr = adv.data_ptr()
    before = sum(kernels.LAUNCHES.values())
    with no_host_sync():
        out = STEPS[step](adv, x, g, mom, backend)
    assert out is adv and adv.data_ptr() == ptr  # in place
    if backend != "torch":
        assert sum(kernels.LAUNCHES.values()) - before == LAUNCHES[step]
    torch.testing.assert_close(adv, adv_ref, **FP32)
    if step.startswith("mifgsm"):
        torch.testing.assert_close(mom, mom_ref, **FP32, equal_nan=True)  # (5, 1): a zero sample


def test_step_out_argument_and_channels_last(backend):
    x, adv, g = _step_inputs((2, 3, 8, 8), layout=torch.channels_last)
    adv0 = adv.clone()
    out = torch.empty_like(adv)
    ops.pgdl2_step_(adv, x, g.contiguous(), 0.5, 0.3, out=out, backend=backend)
    assert torch.equal(adv, adv0)  # adv untouched when out is given
    expected = ops.pgdl2_step_(adv.contiguous(), x.contiguous(), g.contiguous(), 0.5, 0.3, backend="torch")
    torch.testing.assert_close(out, expected, **FP32)
    assert out.stride() == adv.stride()


def test_step_is_deterministic(backend):
    x, adv, g = _step_inputs((3, 3, 40, 40))
    a1, a2 = adv.clone(), adv.clone()
    ops.pgdl2_step_(a1, x, g, 0.5, 0.3, backend=backend)
    ops.pgdl2_step_(a2, x, g, 0.5, 0.3, backend=backend)
    assert torch.equal(a1, a2)


def test_l2_step_edge_cases(backend):
    """A zero gradient (norm eps_for_division), a zero delta and eps = 0 give the reference's values."""
    x, adv, g = _step_inputs((4, 50))
    g[1] = 0.0
    adv[2] = x[2]
    cases = [(0.5, 0.3), (0.0, 0.3), (0.5, 0.0)]
    for alpha, eps in cases:
        a, r = adv.clone(), adv.clone()
        ops.pgdl2_step_(a, x, g, alpha, eps, backend=backend)
        ops.pgdl2_step_(r, x, g, alpha, eps, backend="torch")
        torch.testing.assert_close(a, r, **FP32, equal_nan=True)


def test_mifgsm_zero_gradient_sample(backend):
    """An all-zero gradient gives a NaN momentum (0/0) as in torchattacks; sign(NaN) = 0 leaves the sample."""
    x, adv, g = _step_inputs((3, 20))
    g[1] = 0.0
    mom = torch.empty_like(x)
    a = adv.clone()
    ops.mifgsm_step_(a, x, g, mom, 0.03, 0.04, 1.0, first=True, backend=backend)
    unmoved = torch.clamp(x[1] + torch.clamp(adv[1] - x[1], -0.04, 0.04), 0, 1)  # the projection only
    assert torch.isnan(mom[1]).all() and torch.equal(a[1], unmoved)
    assert not torch.isnan(mom[0]).any()


def test_fp16_step(backend):
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("no fp16 arithmetic in the Triton interpreter")
    x, adv, g = _step_inputs((3, 3, 40, 40), dtype=torch.float16)
    expected = ops.pgd_step_(adv.float(), x.float(), g.float(), 0.03, 0.04, backend="torch").half()
    assert torch.equal(ops.pgd_step_(adv, x, g, 0.03, 0.04, backend=backend), expected)


def test_forced_kernel_backend_explains_what_it_cannot_do():
    if not _kernel_backends():
        pytest.skip("no kernel backend here")
    kernel = _kernel_backends()[0]
    x = torch.rand(2, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        ops.pgd_step_(x.clone(), x, x, 0.1, 0.1, backend=kernel)
    expected = ops.pgd_step_(x.clone(), x, x, 0.1, 0.1, backend="torch")
    assert torch.equal(ops.pgd_step_(x.clone(), x, x, 0.1, 0.1, backend="auto"), expected)  # auto: torch
    y = torch.rand(4, 6, device=DEVICE)[:, ::2]  # not dense
    with pytest.raises(ValueError, match="dense"):
        ops.pgd_step_(y, y.clone(), y.clone(), 0.1, 0.1, backend=kernel)


def test_channels_last_images_keep_their_layout(backend):
    model = eval_model().to(memory_format=torch.channels_last)
    x, y = batch()
    xc = x.contiguous(memory_format=torch.channels_last)
    ours, ref = CASES["PGDL2"]
    adv = ours(model, backend)(xc, y)
    assert adv.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(adv, ref(model, x, y), **FP32)


def test_design_bytes():
    n = 256 * 3 * 224 * 224
    assert ops.design_bytes("pgd", n, 4) == 16 * n
    assert ops.design_bytes("pgdl2", n, 4) == 28 * n
    assert ops.design_bytes("mifgsm", n, 4) == 28 * n
    with pytest.raises(KeyError):
        ops.design_bytes("cw", n, 4)


# ---- no host sync ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["FGSM", "PGD", "PGDL2", "MIFGSM", "FFGSM"])
def test_attack_call_makes_no_host_sync(backend, name, no_host_sync):
    model, (x, y) = eval_model(), batch()
    atk = {"FGSM": attacks.FGSM, "PGD": attacks.PGD, "PGDL2": attacks.PGDL2, "MIFGSM": attacks.MIFGSM,
           "FFGSM": attacks.FFGSM}[name](model, backend=backend)
    atk.set_mode_targeted_random(quiet=True)
    atk.check_inputs = False
    if name in ("PGD", "PGDL2", "MIFGSM"):
        atk.steps = 2
    with no_host_sync():
        atk(x, y)
    atk.check_inputs = True  # the range check is the one sync of a checked call
    with pytest.raises((AssertionError, RuntimeError), match="sync"):  # the fixture sees it
        with no_host_sync():
            atk(x, y)


# ---- API surface ----------------------------------------------------------------------------------------

def test_torchattacks_signatures_and_defaults():
    import inspect

    want = {
        "FGSM": {"eps": 8 / 255},
        "PGD": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "random_start": True},
        "PGDL2": {"eps": 1.0, "alpha": 0.2, "steps": 10, "random_start": True, "eps_for_division": 1e-10},
        "MIFGSM": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "decay": 1.0},
        "FFGSM": {"eps": 8 / 255, "alpha": 10 / 255},
    }
    for name, defaults in want.items():
        params = inspect.signature(getattr(attacks, name)).parameters
        positional = [p for p in params if params[p].kind == params[p].POSITIONAL_OR_KEYWORD]
        assert positional == ["model", *defaults], name
        assert {k: params[k].default for k in defaults} == defaults, name
        atk = getattr(attacks, name)(eval_model())
        assert atk.attack == name and atk.supported_mode == ["default", "targeted"]
        assert all(getattr(atk, k) == v for k, v in defaults.items())
        assert repr(atk).startswith(name + "(")


# ---- the CUDA library: argument checks (no GPU needed) -----------------------------------------------

def _cuda_lib():
    from fastadv.kernels import cuda

    if cuda.load_error() is not None:
        pytest.skip(f"CUDA library unavailable: {cuda.load_error()}")
    from fastadv.kernels.cuda import attacks as _declares  # noqa: F401  (types the functions)
    return cuda.lib()


def test_cuda_library_checks_arguments():
    lib = _cuda_lib()
    ws = lib.fastadv_attack_workspace_floats
    assert ws(256, 3 * 224 * 224, 0) == 3 * 256 * 19 and ws(256, 3 * 224 * 224, 1) == 256 * 19
    assert ws(0, 5, 0) == 0 and ws(3, 0, 1) == 0 and ws(2, 8193, 1) == 4
    assert lib.fastadv_attack_linf_step(None, None, None, None, 7, 0, 0.1, 0.1, None) == 1
    assert b"unsupported dtype code 7" in lib.fastadv_last_error()
    assert lib.fastadv_attack_linf_step(None, None, None, None, 0, -1, 0.1, 0.1, None) == 1
    assert b"negative size" in lib.fastadv_last_error()
    assert lib.fastadv_attack_linf_step(None, None, None, None, 0, 4, 0.1, 0.1, None) == 1
    assert b"must not be NULL" in lib.fastadv_last_error()
    assert lib.fastadv_attack_linf_step(None, None, None, None, 1, 0, 0.1, 0.1, None) == 0  # nothing to do
    assert lib.fastadv_attack_l2_step(None, None, None, None, 0, -1, 5, 0.1, 0.1, 1e-10, None, None) == 1
    assert b"negative size" in lib.fastadv_last_error()
    assert lib.fastadv_attack_l2_step(None, None, None, None, 0, 2, 5, 0.1, 0.1, 1e-10, None, None) == 1
    assert b"must not be NULL" in lib.fastadv_last_error()
    assert lib.fastadv_attack_l2_step(None, None, None, None, 9, 0, 5, 0.1, 0.1, 1e-10, None, None) == 1
    assert b"dtype code 9" in lib.fastadv_last_error()
    assert lib.fastadv_attack_l2_step(None, None, None, None, 2, 0, 5, 0.1, 0.1, 1e-10, None, None) == 0
    args = (0, 0.1, 0.1, 1.0, None, None)
    assert lib.fastadv_attack_momentum_step(None, None, None, None, None, 1, 0, 3, 5, *args[1:]) == 1
    assert b"must not be NULL" in lib.fastadv_last_error()
    assert lib.fastadv_attack_momentum_step(None, None, None, None, None, 1, 0, 3, -5, *args[1:]) == 1
    assert lib.fastadv_attack_momentum_step(None, None, None, None, None, 0, 1, 0, 5, *args[1:]) == 0


# ---- GPU: the kernels on real sizes, every dtype -----------------------------------------------------------

def _kernel_backends():
    from conftest import usable_backends

    return [b for b in usable_backends() if b != "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 3, 224, 224), (5, 3, 33, 35)])
@pytest.mark.parametrize("step", list(STEPS))
def test_gpu_steps_against_torch(step, shape, dtype, no_host_sync):
    """Each kernel backend against the torch backend run on the same inputs (fp32
    math, rounded once): L-inf steps bit-exact; L2 and momentum steps to fp32
    rounding (the per-sample sums run in another order), i.e. one ulp of dtype."""
    x, adv, g = _step_inputs(shape, dtype=dtype)
    mom = torch.randn(shape, device=DEVICE)
    ref_adv, ref_mom = adv.clone(), mom.clone()
    STEPS[step](ref_adv, x, g, ref_mom, "torch")
    for backend in _kernel_backends():
        a, m = adv.clone(), mom.clone()
        with no_host_sync():
            STEPS[step](a, x, g, m, backend)
        if step in ("fgsm", "pgd"):
            assert torch.equal(a, ref_adv), backend
        elif step == "pgdl2":
            ulp = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
            torch.testing.assert_close(a, ref_adv, rtol=ulp, atol=1e-5, msg=backend)
        else:
            torch.testing.assert_close(m, ref_mom, **FP32, msg=backend)
            # given the momentum, the update is exact
            expect = ops.pgd_step_(adv.float().clone(), x.float(), m, 0.03, 0.04, backend="torch").to(dtype)
            assert torch.equal(a, expect), backend


@pytest.mark.gpu
def test_gpu_attacks_agree_across_backends():
    model = conv_model().eval()
    x, y = batch(32)
    for name, (ours, _) in CASES.items():
        results = {b: ours(model, b)(x, y) for b in ["torch", *_kernel_backends()]}
        for b, adv in results.items():
            torch.testing.assert_close(adv, results["torch"], **FP32, msg=f"{name} {b}")


# -- device guard, rounding ------------------------------------------------------


@pytest.mark.parametrize("step", list(STEPS))
def test_kernel_launches_run_under_the_device_guard(backend, step, monkeypatch):
    if backend == "torch":
        pytest.skip("kernel backends only")
    seen = record_guards(monkeypatch, ops)
    x, adv, g = _step_inputs((2, 3, 5, 5))
    before = launches_total()
    STEPS[step](adv, x, g, torch.randn(adv.shape, device=DEVICE), backend)
    total = launches_total() - before
    assert total == LAUNCHES[step] and seen["inside"] == total
    assert seen["devices"] == [adv.device]


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


def test_update_launches_disable_fp_fusion(monkeypatch):
    # a + b * c must round twice on the GPU too (no FMA), as in the reference order, the
    # interpreter and the CUDA twin (__fmul_rn / __fadd_rn); the interpreter cannot show an
    # FMA, so check the launch option itself.
    if ops._backend.why_not("triton", DEVICE):
        pytest.skip("triton cannot run here")
    from fastadv.kernels.triton import attacks as tk
    spies = {n: LaunchSpy(getattr(tk, n)) for n in ("_linf_step_kernel", "_l2_update_kernel",
                                                     "_momentum_update_kernel")}
    for n, spy in spies.items():
        monkeypatch.setattr(tk, n, spy)
    x, adv, g = _step_inputs((2, 7))
    for step in STEPS.values():
        step(adv, x, g, torch.randn(adv.shape, device=DEVICE), "triton")
    for n, spy in spies.items():
        assert spy.kwargs and all(kw.get("enable_fp_fusion") is False for kw in spy.kwargs), n
