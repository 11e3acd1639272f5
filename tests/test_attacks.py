"""fastadv.attacks (torchattacks' API) and fastadv.ops.attacks, on every backend
available here, against torchattacks 3.5.1 itself (installed without its
dependencies: ``python3 -m pip install --no-deps torchattacks==3.5.1``).

The peer runs the same model on the same inputs under the same seed: the torch
backend gives its bits; the kernel backends its bits for the L-inf steps and
fp32 rounding for the per-sample reductions (PGD-L2, MI-FGSM).  The step ops
are checked through torchattacks too, with a model whose input gradient is
scripted (any gradient field, zeros and all).  Seed 002's MI-FGSM has no
installable peer: it is checked against fastadv.reference.mifgsm.
"""
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from fastadv import attacks
from fastadv import kernels
from fastadv.ops import attacks as ops
from fastadv.reference import mifgsm as R

from conftest import DEVICE, launches_total, record_guards

FP32 = dict(rtol=1e-5, atol=1e-6)
NAMES = ("FGSM", "PGD", "PGDL2", "MIFGSM", "FFGSM")
TORCHATTACKS = "3.5.1"
INSTALL = f"python3 -m pip install --no-deps torchattacks=={TORCHATTACKS}"


# ---- the peer -------------------------------------------------------------------------------------

def load_torchattacks():
    """``({name: torchattacks class}, None)`` for the five attacks, or ``(None, why)``.

    torchattacks' ``__init__`` imports all its attacks, and a few of those need
    scipy (OnePixel, Pixle) -- a dependency this project does not install.  The
    five compared here need only torch: when the package import fails on a
    missing dependency, the package and its ``attacks`` subpackage are put in
    ``sys.modules`` as bare namespaces (their ``__init__`` not run) and only
    ``attack.py`` and the five attack modules are imported from the installed
    files."""
    try:
        version = importlib.metadata.version("torchattacks")
    except importlib.metadata.PackageNotFoundError:
        return None, f"torchattacks is not installed ({INSTALL})"
    if version != TORCHATTACKS:
        return None, f"torchattacks {version} is installed; these tests compare with {TORCHATTACKS} ({INSTALL})"
    try:
        import torchattacks
        return {n: getattr(torchattacks, n) for n in NAMES}, None
    except ImportError:
        pass
    spec = importlib.util.find_spec("torchattacks")  # locates the package without running it
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("torchattacks", root), ("torchattacks.attacks", os.path.join(root, "attacks"))):
        if not isinstance(sys.modules.get(name), types.ModuleType):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    return {n: importlib.import_module(f"torchattacks.attacks.{n.lower()}").__dict__[n] for n in NAMES}, None


@pytest.fixture(scope="module")
def ta():
    classes, why = load_torchattacks()
    if classes is None:
        pytest.skip(why)
    return classes


def test_torchattacks_loads_without_its_dependencies():
    """With scipy, requests, tqdm and torchvision unimportable, the five attacks
    still load (the fallback of load_torchattacks)."""
    if load_torchattacks()[0] is None:
        pytest.skip(load_torchattacks()[1])
    code = ("import sys\n"
            "for m in ('scipy', 'requests', 'tqdm', 'torchvision'): sys.modules[m] = None\n"
            f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "import test_attacks\n"
            "classes, why = test_attacks.load_torchattacks()\n"
            "assert why is None, why\n"
            "print(sorted(c.__module__ for c in classes.values()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torchattacks.attacks.pgdl2" in res.stdout


# ---- models and data ------------------------------------------------------------------------------

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


# hyper-parameters of each attack in these tests
KW = {"FGSM": dict(eps=0.05),
      "PGD": dict(eps=0.05, alpha=0.02, steps=3),
      "PGDL2": dict(eps=0.3, alpha=0.2, steps=3),
      "MIFGSM": dict(eps=0.05, alpha=0.02, steps=3, decay=0.9),
      "FFGSM": dict(eps=0.05, alpha=0.06)}
REDUCES = ("PGDL2", "MIFGSM")  # per-sample sums: kernel backends agree to fp32 rounding


def run_both(ta, name, model, x, y, backend, seed=7, setup=None, **kw):
    """(torchattacks' result, fastadv's) for the same attack, model, inputs and seed."""
    kw = {**KW[name], **kw}
    peer, ours = ta[name](model, **kw), getattr(attacks, name)(model, backend=backend, **kw)
    if setup is not None:
        setup(peer)
        setup(ours)
    torch.manual_seed(seed)
    expect = peer(x, y)
    torch.manual_seed(seed)
    got = ours(x, y)
    return expect, got


def assert_matches(got, expect, name, backend):
    assert got.shape == expect.shape and got.dtype == expect.dtype
    if backend == "torch" or name not in REDUCES:
        assert torch.equal(got, expect), (f"{name} on {backend}: max diff {(got - expect).abs().max().item()}")
    else:
        torch.testing.assert_close(got, expect, **FP32)


# ---- against torchattacks ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_torchattacks(ta, backend, name, kind):
    """Default mode, random starts (PGD, PGD-L2, FFGSM) under the same seed."""
    model, (x, y) = eval_model(kind), batch()
    expect, got = run_both(ta, name, model, x, y, backend)
    assert_matches(got, expect, name, backend)


@pytest.mark.parametrize("name", ["PGD", "PGDL2"])
def test_without_random_start_matches_torchattacks(ta, backend, name):
    model, (x, y) = eval_model(), batch()
    expect, got = run_both(ta, name, model, x, y, backend, random_start=False)
    assert_matches(got, expect, name, backend)


def test_ffgsm_draws_its_start_like_torchattacks(ta, backend):
    """torchattacks draws FFGSM's start as randn_like(x).uniform_(-eps, eps): the
    same start, and the generator left where torchattacks leaves it."""
    model, (x, y) = eval_model(), batch()
    expect, got = run_both(ta, "FFGSM", model, x, y, backend, eps=0.1, alpha=0.03)
    after = []
    for atk in (ta["FFGSM"](model, eps=0.1), attacks.FFGSM(model, eps=0.1, backend=backend)):
        torch.manual_seed(3)
        atk(x, y)
        after.append(torch.rand(8, device=DEVICE))
    assert torch.equal(got, expect) and torch.equal(after[0], after[1])


def _mode(mode):
    def setup(atk):
        if mode == "label":
            atk.set_mode_targeted_by_label(quiet=True)
        elif mode == "random":
            atk.set_mode_targeted_random(quiet=True)
        elif mode.startswith("least"):
            atk.set_mode_targeted_least_likely(kth_min=int(mode[-1]), quiet=True)
        else:
            atk.set_mode_targeted_by_function(lambda images, labels: (labels + 2) % 5, quiet=True)
    return setup


@pytest.mark.parametrize("mode", ["label", "random", "least1", "least2", "function"])
@pytest.mark.parametrize("name", NAMES)
def test_targeted_modes_match_torchattacks(ta, backend, name, mode):
    model, (x, y) = eval_model(), batch(6)
    expect, got = run_both(ta, name, model, x, y, backend, setup=_mode(mode))
    assert_matches(got, expect, name, backend)


def test_target_labels_match_torchattacks(ta):
    """The random (same draws from the CPU generator) and least-likely targets
    are torchattacks' own, for the whole batch at once."""
    model = eval_model()
    x, y = torch.rand(64, 3, 8, 8, device=DEVICE), torch.randint(0, 5, (64,), device=DEVICE)
    peer, ours = ta["PGD"](model), attacks.PGD(model)
    for k in (1, 2, 4):
        for atk in (peer, ours):
            atk.set_mode_targeted_least_likely(kth_min=k, quiet=True)
        assert torch.equal(ours.get_least_likely_label(x, y), peer.get_least_likely_label(x, y))
    torch.manual_seed(5)
    expect = peer.get_random_target_label(x, y)
    torch.manual_seed(5)
    got = ours.get_random_target_label(x, y)
    assert torch.equal(got, expect) and (got != y).all() and len(set(got.tolist())) == 5


@pytest.mark.parametrize("name", NAMES)
def test_set_normalization_used_matches_torchattacks(ta, backend, name):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model, (x, y) = eval_model(), batch()
    xn = (x - torch.tensor(mean, device=DEVICE).view(1, 3, 1, 1)) / torch.tensor(std, device=DEVICE).view(1, 3, 1, 1)
    expect, got = run_both(ta, name, model, xn, y, backend,
                           setup=lambda atk: atk.set_normalization_used(mean=mean, std=std))
    assert_matches(got, expect, name, backend)


def test_robmodel_normalization_like_torchattacks(ta):
    class RobModel(nn.Module):  # MAIR's model class: torchattacks reads its mean / std
        def __init__(self):
            super().__init__()
            self.net = eval_model()
            self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]))
            self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]))

        def forward(self, x):
            return self.net(x)

    model, (x, y) = RobModel().to(DEVICE).eval(), batch()
    expect, got = run_both(ta, "PGD", model, x, y, "torch")
    assert torch.equal(got, expect)
    assert attacks.PGD(model).normalization_used is not None


@pytest.mark.parametrize("name", NAMES)
def test_inputs_outside_the_unit_box_match_torchattacks(ta, backend, name):
    """A bicubic resize overshoots [0, 1] (here -0.02 .. 1.026): taken, as torchattacks takes it."""
    model = eval_model()
    x = torch.rand(4, 3, 4, 4, device=DEVICE)
    x = nn.functional.interpolate(x, size=(8, 8), mode="bicubic", align_corners=False) * 1.02
    x[0, 0, 0, 0], x[1, 1, 1, 1] = 1.026, -0.02
    y = torch.randint(0, 5, (4,), device=DEVICE)
    expect, got = run_both(ta, name, model, x, y, backend)
    assert_matches(got, expect, name, backend)


@pytest.mark.parametrize("labels", ["one-hot", "soft"])
@pytest.mark.parametrize("name", NAMES)
def test_one_hot_and_soft_labels_match_torchattacks(ta, backend, name, labels):
    model, (x, y) = eval_model(), batch()
    if labels == "one-hot":
        target = nn.functional.one_hot(y, 5).float()
    else:
        target = torch.softmax(torch.randn(4, 5, device=DEVICE), dim=1)
    expect, got = run_both(ta, name, model, x, target, backend)
    assert_matches(got, expect, name, backend)
    expect, got = run_both(ta, name, model, x, target, backend, setup=_mode("label"))  # soft targets
    assert_matches(got, expect, name, backend)


@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("name", ["PGD", "PGDL2", "MIFGSM"])
def test_zero_steps_match_torchattacks(ta, name, random_start):
    model, (x, y) = eval_model(), batch()
    kw = {} if name == "MIFGSM" else {"random_start": random_start}
    expect, got = run_both(ta, name, model, x, y, None, steps=0, **kw)
    assert torch.equal(got, expect)
    assert got.data_ptr() != x.data_ptr()  # a new tensor, as torchattacks returns


@pytest.mark.parametrize("name", NAMES)
def test_float64_matches_torchattacks(ta, name):
    """float64 images and model: computed in float64 (auto picks the torch backend), torchattacks' bits."""
    model, (x, y) = eval_model().double(), batch()
    for backend in ("torch", "auto"):
        expect, got = run_both(ta, name, model, x.double(), y, backend)
        assert got.dtype == torch.float64 and torch.equal(got, expect), backend


@pytest.mark.launch_free
def test_forced_kernel_backend_refuses_float64(backend):
    if backend == "torch":
        pytest.skip("the torch backend computes float64")
    model, (x, y) = eval_model().double(), batch()
    for name in NAMES:
        with pytest.raises(TypeError, match="float32, float16 and bfloat16.*float64"):
            getattr(attacks, name)(model, backend=backend)(x.double(), y)


def test_hyper_parameters_as_numpy_and_tensors_match_torchattacks(ta):
    model, (x, y) = eval_model(), batch()
    for eps in (np.float32(0.05), np.float64(0.05), torch.tensor(0.05)):
        expect, got = run_both(ta, "PGD", model, x, y, "torch", eps=eps, alpha=np.float32(0.02),
                               steps=np.int64(2))
        assert torch.equal(got, expect), type(eps)


@pytest.mark.parametrize("name", ["PGD", "FFGSM"])
def test_layouts_draw_the_start_like_torchattacks(ta, backend, name):
    """channels_last and a permuted batch (batch not outermost): torchattacks'
    working copy keeps the layout and its random start fills it in memory
    order; fastadv draws into the same layout, so the starts agree."""
    model = eval_model()
    x, y = batch()
    for images in (x.contiguous(memory_format=torch.channels_last),
                   x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)):
        expect, got = run_both(ta, name, model, images, y, backend)
        torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_channels_last_images_keep_their_layout(ta, backend):
    import copy

    plain = eval_model()
    model = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x, y = batch()
    kw = {**KW["PGDL2"], "random_start": False}  # a start drawn into another layout takes other numbers
    got = attacks.PGDL2(model, backend=backend, **kw)(x.contiguous(memory_format=torch.channels_last), y)
    expect = ta["PGDL2"](plain, **kw)(x, y)  # torchattacks' PGDL2 views: contiguous only
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expect, **FP32)


def test_signatures_and_defaults_are_torchattacks(ta):
    for name in NAMES:
        theirs = inspect.signature(ta[name]).parameters
        ours = inspect.signature(getattr(attacks, name)).parameters
        positional = [p for p in ours if ours[p].kind == ours[p].POSITIONAL_OR_KEYWORD]
        assert positional == list(theirs), name
        assert {k: ours[k].default for k in theirs} == {k: theirs[k].default for k in theirs}, name
        model = eval_model()
        a, b = getattr(attacks, name)(model), ta[name](model)
        assert a.attack == b.attack == name and a.supported_mode == b.supported_mode
        assert repr(a).startswith(name + "(")
        for mode in ("set_mode_targeted_random", "set_mode_targeted_by_label"):
            getattr(a, mode)(quiet=True)
            getattr(b, mode)(quiet=True)
            assert a.get_mode() == b.get_mode() and a.targeted == b.targeted


# ---- the steps, with a scripted input gradient -------------------------------------------------------

class _Inject(torch.autograd.Function):
    """Zero logits whose backward hands ``grad`` to the input, whatever the loss."""

    @staticmethod
    def forward(ctx, x, grad, classes):
        ctx.save_for_backward(grad)
        return x.new_zeros(x.shape[0], classes)

    @staticmethod
    def backward(ctx, grad_out):
        grad, = ctx.saved_tensors
        return grad, None, None


class Scripted(nn.Module):
    """A model whose input gradient at its k-th forward is ``grads[k]``: both
    attacks step along exactly the same gradients, so the steps themselves are
    compared with torchattacks' lines on any gradient field (zeros, a zero
    sample, many chunks)."""

    def __init__(self, grads, classes=5):
        super().__init__()
        self.grads, self.calls, self.classes = list(grads), 0, classes
        self.anchor = nn.Parameter(torch.zeros(1, device=DEVICE))  # the attacks read the device from it

    def forward(self, x):
        grad = self.grads[self.calls]
        self.calls += 1
        return _Inject.apply(x, grad, self.classes)


SHAPES = [(3, 2, 41, 43), (3, 3, 40, 40), (1, 1, 1, 9000), (5, 1, 1, 1)]  # one chunk, two, one wide, tiny


def scripted_grads(shape, n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(sum(shape) + n)
    gs = []
    for k in range(n):
        g = torch.randn(shape, generator=gen)
        g.view(shape[0], -1)[0, :5] = 0.0          # sign(0) = 0
        if shape[0] > 2 and k == 0:
            g[1] = 0.0                             # a zero sample: L2 norm 0, MI-FGSM 0/0
        gs.append(g.to(DEVICE, dtype))
    return gs


def run_scripted(ta, name, x, grads, backend, seed=11, **kw):
    kw = {**KW[name], "steps": len(grads), **kw} if name not in ("FGSM", "FFGSM") else {**KW[name], **kw}
    torch.manual_seed(seed)
    expect = ta[name](Scripted(grads), **kw)(x, torch.zeros(x.shape[0], dtype=torch.long, device=DEVICE))
    torch.manual_seed(seed)
    got = getattr(attacks, name)(Scripted(grads), backend=backend, **kw)(
        x, torch.zeros(x.shape[0], dtype=torch.long, device=DEVICE))
    return expect, got


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0, x/0 in the interpreter's numpy
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_steps_on_scripted_gradients_match_torchattacks(ta, backend, name, shape, no_host_sync):
    x = torch.rand(shape, device=DEVICE)
    grads = scripted_grads(shape, 1 if name in ("FGSM", "FFGSM") else 3)
    expect, got = run_scripted(ta, name, x, grads, backend)
    torch.testing.assert_close(got, expect, **(FP32 if backend != "torch" and name in REDUCES else
                                               dict(rtol=0, atol=0)), equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0, x/0 in the interpreter's numpy
def test_l2_edge_cases_match_torchattacks(ta, backend):
    """A zero gradient (norm eps_for_division), a zero delta, alpha = 0 and eps = 0 (0/0: NaN)."""
    shape = (4, 1, 5, 10)
    x = torch.rand(shape, device=DEVICE)
    for alpha, eps in ((0.5, 0.3), (0.0, 0.3), (0.5, 0.0)):
        grads = scripted_grads(shape, 2)
        expect, got = run_scripted(ta, "PGDL2", x, grads, backend, alpha=alpha, eps=eps, random_start=False)
        torch.testing.assert_close(got, expect, **FP32, equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0, x/0 in the interpreter's numpy
def test_mifgsm_zero_gradient_sample(backend):
    """An all-zero gradient gives a NaN momentum (0/0) as in torchattacks; sign(NaN) = 0 leaves the sample."""
    x = torch.rand(3, 20, device=DEVICE)
    adv = (x + 0.05 * torch.randn(3, 20, device=DEVICE)).clamp(0, 1)
    g = torch.randn(3, 20, device=DEVICE)
    g[1] = 0.0
    mom = torch.empty_like(x)
    a = adv.clone()
    ops.mifgsm_step_(a, x, g, mom, 0.03, 0.04, 1.0, first=True, backend=backend)
    unmoved = torch.clamp(x[1] + torch.clamp(adv[1] - x[1], -0.04, 0.04), 0, 1)  # the projection only
    assert torch.isnan(mom[1]).all() and torch.equal(a[1], unmoved)
    assert not torch.isnan(mom[0]).any()


def test_fp16_steps_are_fp32_math_rounded_once(ta, backend):
    """fp16 images: torchattacks run in fp32 on the same fp16 values, rounded once."""
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("no fp16 arithmetic in the Triton interpreter")
    shape = (3, 3, 40, 40)
    x = torch.rand(shape, device=DEVICE).half()
    grads = scripted_grads(shape, 2, torch.float16)
    expect, _ = run_scripted(ta, "PGD", x.float(), [g.float() for g in grads], "torch", random_start=False)
    got = attacks.PGD(Scripted(grads), backend=backend, **{**KW["PGD"], "steps": 2, "random_start": False})(
        x, torch.zeros(3, dtype=torch.long, device=DEVICE))
    # step 2 starts from the rounded step 1 in fastadv, from fp32 in the peer: compare one step exactly
    one = attacks.PGD(Scripted(grads[:1]), backend=backend, **{**KW["PGD"], "steps": 1, "random_start": False})(
        x, torch.zeros(3, dtype=torch.long, device=DEVICE))
    expect1, _ = run_scripted(ta, "PGD", x.float(), [grads[0].float()], "torch", random_start=False)
    assert got.dtype == torch.float16 and torch.equal(one, expect1.half())
    torch.testing.assert_close(got.float(), expect, rtol=0, atol=2 ** -10)


# ---- the functional ops ----------------------------------------------------------------------------------

def _step_inputs(shape=(3, 2, 41, 43), dtype=torch.float32, layout=torch.contiguous_format):
    x = torch.rand(shape, device=DEVICE)
    adv = (x + 0.05 * torch.randn(shape, device=DEVICE)).clamp(0, 1)
    g = torch.randn(shape, device=DEVICE)
    g.view(shape[0], -1)[0, :5] = 0.0  # sign(0) = 0
    return [t.to(dtype).contiguous(memory_format=layout) for t in (x, adv, g)]


STEPS = {
    "fgsm": lambda adv, x, g, m, b: ops.fgsm_step_(adv, g, 0.03, backend=b),
    "pgd": lambda adv, x, g, m, b: ops.pgd_step_(adv, x, g, 0.03, 0.04, backend=b),
    "pgdl2": lambda adv, x, g, m, b: ops.pgdl2_step_(adv, x, g, 0.5, 1.0, 1e-10, backend=b),
    "mifgsm_first": lambda adv, x, g, m, b: ops.mifgsm_step_(adv, x, g, m, 0.03, 0.04, 0.9, first=True,
                                                             backend=b),
    "mifgsm": lambda adv, x, g, m, b: ops.mifgsm_step_(adv, x, g, m, 0.03, 0.04, 0.9, backend=b),
}
LAUNCHES = {"fgsm": 1, "pgd": 1, "pgdl2": 2, "mifgsm_first": 2, "mifgsm": 2}


def torchattacks_step(step, adv, x, g, m):
    """torchattacks 3.5.1's lines of one step (from its forward loops, any rank)."""
    b = (x.shape[0],) + (1,) * (x.dim() - 1)
    if step == "fgsm":
        return torch.clamp(adv + 0.03 * g.sign(), min=0, max=1), None
    if step == "pgdl2":
        gn = torch.norm(g.reshape(x.shape[0], -1), p=2, dim=1) + 1e-10
        a = adv + 0.5 * (g / gn.view(b))
        delta = a - x
        dn = torch.norm(delta.reshape(x.shape[0], -1), p=2, dim=1)
        factor = torch.min(1.0 / dn, torch.ones_like(dn))
        return torch.clamp(x + delta * factor.view(b), min=0, max=1), None
    if step.startswith("mifgsm"):
        g = g / torch.mean(torch.abs(g), dim=tuple(range(1, x.dim())), keepdim=True)
        g = g + (torch.zeros_like(m) if step == "mifgsm_first" else m) * 0.9
        m = g
    a = adv + 0.03 * g.sign()
    delta = torch.clamp(a - x, min=-0.04, max=0.04)
    return torch.clamp(x + delta, min=0, max=1), m


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0 in the interpreter's numpy
@pytest.mark.parametrize("shape", [(3, 2, 41, 43), (3, 3, 40, 40), (1, 9000), (5, 1)])
@pytest.mark.parametrize("step", list(STEPS))
def test_step_in_place_launches_no_sync(backend, step, shape, no_host_sync):
    x, adv, g = _step_inputs(shape)
    mom = torch.randn(shape, device=DEVICE)
    expect, expect_m = torchattacks_step(step, adv, x, g, mom)
    ptr = adv.data_ptr()
    before = sum(kernels.LAUNCHES.values())
    with no_host_sync():
        out = STEPS[step](adv, x, g, mom, backend)
    assert out is adv and adv.data_ptr() == ptr  # in place
    assert sum(kernels.LAUNCHES.values()) - before == (1 if backend == "torch" else LAUNCHES[step])
    tol = FP32 if backend != "torch" else dict(rtol=0, atol=0)
    torch.testing.assert_close(adv, expect, **tol)
    if expect_m is not None:
        torch.testing.assert_close(mom, expect_m, **tol, equal_nan=True)  # (5, 1): a zero sample


def test_step_out_argument_and_channels_last(backend):
    x, adv, g = _step_inputs((2, 3, 8, 8), layout=torch.channels_last)
    adv0 = adv.clone()
    out = torch.empty_like(adv)
    ops.pgd_step_(adv, x, g.contiguous(), 0.03, 0.04, out=out, backend=backend)
    assert torch.equal(adv, adv0)  # adv untouched when out is given
    assert out.stride() == adv.stride()
    assert torch.equal(out, torchattacks_step("pgd", adv, x, g, None)[0])


def test_step_is_deterministic(backend):
    if backend == "torch":
        pytest.skip("the kernels' fixed-order per-sample sums")
    x, adv, g = _step_inputs((3, 3, 40, 40))
    a1, a2 = adv.clone(), adv.clone()
    ops.pgdl2_step_(a1, x, g, 0.5, 0.3, backend=backend)
    ops.pgdl2_step_(a2, x, g, 0.5, 0.3, backend=backend)
    assert torch.equal(a1, a2)


def test_ops_take_float64_on_torch_only():
    x = torch.rand(2, 5, dtype=torch.float64, device=DEVICE)
    g = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    got = ops.pgd_step_(x.clone(), x, g, 0.1, 0.1, backend="auto")  # auto: torch, in float64
    a = x + 0.1 * g.sign()  # torchattacks' PGD step, float64
    assert torch.equal(got, torch.clamp(x + torch.clamp(a - x, min=-0.1, max=0.1), min=0, max=1))
    kernels_here = _kernel_backends()
    for kernel in kernels_here:
        with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
            ops.pgd_step_(x.clone(), x, g, 0.1, 0.1, backend=kernel)
        y = torch.rand(4, 6, device=DEVICE)[:, ::2]  # not dense
        with pytest.raises(ValueError, match="dense"):
            ops.pgd_step_(y, y.clone(), y.clone(), 0.1, 0.1, backend=kernel)


def test_design_bytes():
    n = 256 * 3 * 224 * 224
    assert ops.design_bytes("pgd", n, 4) == 16 * n
    assert ops.design_bytes("pgdl2", n, 4) == 28 * n
    assert ops.design_bytes("mifgsm", n, 4) == 28 * n
    with pytest.raises(KeyError):
        ops.design_bytes("cw", n, 4)


# ---- seed 002 (no installable peer) ----------------------------------------------------------------------

def test_seed_variant_of_mifgsm(backend):
    """Seed 002's MI-FGSM is MIFGSM with alpha = eps / steps."""
    model, (x, y) = eval_model(), batch()
    adv = attacks.MIFGSM(model, eps=0.06, alpha=0.06 / 5, steps=5, backend=backend)(x, y)
    torch.testing.assert_close(adv, R.mifgsm(model, x, y, 0.06, steps=5), **FP32)


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


def test_set_model_training_mode_like_torchattacks(ta, backend):
    model = conv_model()
    model.eval()
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen.setdefault(name, module.training)
        return hook

    for i, name in ((0, "conv"), (1, "bn"), (3, "drop")):
        model[i].register_forward_pre_hook(record(name))
    x, y = batch()
    results = []
    for atk in (ta["PGD"](model, **KW["PGD"]), attacks.PGD(model, backend=backend, **KW["PGD"])):
        atk.set_model_training_mode(model_training=True, batchnorm_training=False, dropout_training=True)
        seen.clear()
        torch.manual_seed(2)
        results.append(atk(x, y))
        assert seen == {"conv": True, "bn": False, "drop": True}
        model.eval()  # torchattacks leaves a model that was in eval mode in training mode
    assert torch.equal(results[1], results[0])  # the same dropout masks under the same seed
    atk = attacks.PGD(model, backend=backend, **KW["PGD"])
    atk.set_model_training_mode(model_training=True)
    atk(x, y)
    assert not any(m.training for m in model.modules())  # fastadv: eval before, eval after


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


# ---- errors ---------------------------------------------------------------------------------------------

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
    x, y = batch()
    for mode in ("set_mode_targeted_random", "set_mode_targeted_least_likely"):
        getattr(atk, mode)(quiet=True)
        with pytest.raises(TypeError, match="needs labels of class indices"):
            atk(x, nn.functional.one_hot(y, 5).float())  # torchattacks fails here too


def test_bad_hyper_parameters():
    model = eval_model()
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.PGD(model, eps=-0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.FGSM(model, eps=float("nan"))
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        attacks.MIFGSM(model, alpha=-1.0)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        attacks.PGDL2(model, steps=-3)
    with pytest.raises(TypeError, match="steps must be an int"):
        attacks.MIFGSM(model, steps=2.5)
    with pytest.raises(TypeError, match="eps must be a number"):
        attacks.FFGSM(model, eps="8/255")
    with pytest.raises(TypeError, match="0-d real tensor"):
        attacks.FFGSM(model, eps=torch.tensor([0.1, 0.2]))
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
    with pytest.raises(ValueError, match=r"batch size 4"):
        atk(x, y[:3])
    with pytest.raises(TypeError, match="integer class indices or floating-point"):
        atk(x, y.bool())
    with pytest.raises(TypeError, match="labels must be a tensor"):
        atk(x)
    with pytest.raises(TypeError, match="floating-point"):
        atk((x * 255).to(torch.uint8), y)
    atk(x * 0.5 + 1.0, y)  # out of [0, 1]: taken, as torchattacks takes it
    atk.check_inputs = True  # the opt-in range check (one host sync)
    with pytest.raises(ValueError, match=r"range \[0, 1\] \(min: 1.0.*, max: 1.4"):
        atk(x * 0.5 + 1.0, y)
    with pytest.raises(ValueError, match=r"range \[0, 1\] \(min: -0.4"):
        atk(x - 0.5, y)
    atk.set_normalization_used([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    atk((x - 0.5) / 0.25, y)  # in [0, 1] after inverse_normalize
    with pytest.raises(ValueError, match=r"range \[0, 1\] after inverse_normalize"):
        atk(x * 2 + 1, y)


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


# ---- no host sync ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_attack_call_makes_no_host_sync(backend, name, no_host_sync):
    model, (x, y) = eval_model(), batch()
    atk = getattr(attacks, name)(model, backend=backend)
    atk.set_mode_targeted_random(quiet=True)
    if name in ("PGD", "PGDL2", "MIFGSM"):
        atk.steps = 2
    with no_host_sync():
        atk(x, y)
    atk.check_inputs = True  # the opt-in range check is the one sync of a checked call
    with pytest.raises((AssertionError, RuntimeError), match="sync"):  # the fixture sees it
        with no_host_sync():
            atk(x, y)


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


# ---- GPU: the kernels on real sizes, every dtype, against torchattacks -------------------------------------

def _kernel_backends():
    from conftest import usable_backends

    return [b for b in usable_backends() if b != "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 3, 224, 224), (5, 3, 33, 35)])
@pytest.mark.parametrize("step", list(STEPS))
def test_gpu_steps_against_torchattacks(step, shape, dtype, no_host_sync):
    """Each backend against torchattacks' lines run in fp32 on the same values,
    rounded once: L-inf steps bit-exact; L2 and momentum steps to fp32 rounding
    (the per-sample sums run in another order), i.e. one ulp of dtype."""
    x, adv, g = _step_inputs(shape, dtype=dtype)
    mom = torch.randn(shape, device=DEVICE)
    ref_adv, ref_mom = torchattacks_step(step, adv.float(), x.float(), g.float(), mom)
    ref_adv = ref_adv.to(dtype)
    for backend in ["torch", *_kernel_backends()]:
        a, m = adv.clone(), mom.clone()
        with no_host_sync():
            STEPS[step](a, x, g, m, backend)
        if step in ("fgsm", "pgd") or (backend == "torch" and dtype == torch.float32):
            assert torch.equal(a, ref_adv), backend
        elif step == "pgdl2":
            ulp = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
            torch.testing.assert_close(a, ref_adv, rtol=ulp, atol=1e-5, msg=backend)
        else:
            torch.testing.assert_close(m, ref_mom, **FP32, msg=backend)
            # given the momentum, the update is exact
            expect = torchattacks_step("pgd", adv.float(), x.float(), m, None)[0].to(dtype)
            assert torch.equal(a, expect), backend


@pytest.mark.gpu
def test_gpu_attacks_match_torchattacks(ta):
    model = conv_model().eval()
    x, y = batch(32)
    for name in NAMES:
        for backend in ["torch", *_kernel_backends()]:
            expect, got = run_both(ta, name, model, x, y, backend)
            assert_matches(got, expect, name, backend)


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
    from fastadv import _backend
    if _backend.why_not("triton", DEVICE):
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


# -- torch.library ops, torch.compile ------------------------------------------------


ATTACK_OPS = ("attack_fgsm_step_", "attack_pgd_step_", "attack_pgdl2_step_", "attack_mifgsm_step_")


def test_every_attack_op_is_registered():
    from fastadv.ops import _registry
    assert set(ATTACK_OPS) <= set(_registry.registered())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_opcheck(backend, layout):
    """torch.library.opcheck (schema and declared mutation, fake tensors, autograd
    registration, AOT dispatch) on every step op, in place and into ``out``; the
    triton backend runs its kernels under the interpreter inside the checks."""
    x, adv, g = _step_inputs((2, 3, 5, 7), layout=layout)
    mom = torch.randn_like(adv)
    out = torch.empty_like(adv)
    cases = [(ops.fgsm_step_op, (adv.clone(), g, None, 0.03, backend)),
             (ops.fgsm_step_op, (adv.clone(), g, out, 0.03, backend)),
             (ops.pgd_step_op, (adv.clone(), x, g, None, 0.03, 0.04, backend)),
             (ops.pgd_step_op, (adv.clone(), x, g, out, 0.03, 0.04, backend)),
             (ops.pgdl2_step_op, (adv.clone(), x, g, None, 0.5, 1.0, 1e-10, backend)),
             (ops.mifgsm_step_op, (adv.clone(), x, g, mom.clone(), None, 0.03, 0.04, 0.9, False, backend)),
             (ops.mifgsm_step_op, (adv.clone(), x, g, mom.clone(), out, 0.03, 0.04, 0.9, True, backend))]
    for op, args in cases:
        try:
            torch.library.opcheck(op.overload, args)
        except Exception as exc:
            raise AssertionError(f"opcheck of {op.name} failed") from exc


def test_out_equal_to_adv_is_the_in_place_step(backend):
    x, adv, g = _step_inputs((2, 3, 5, 7))
    a, b = adv.clone(), adv.clone()
    assert ops.pgd_step_(a, x, g, 0.03, 0.04, out=a, backend=backend) is a
    ops.pgd_step_(b, x, g, 0.03, 0.04, backend=backend)
    assert torch.equal(a, b)


def test_compiled_attack_step_has_no_graph_break(backend):
    """An MI-FGSM step (the op that mutates the most: adv and the momentum, in
    place) inside a function compiled with torch.compile(fullgraph=True): no
    graph break, no warning from fastadv's wrapper code, eager's bits."""
    import warnings
    torch._dynamo.reset()
    x, adv, _ = _step_inputs((2, 3, 5, 7))
    w = torch.randn_like(x)

    def step(adv, momentum, first):
        g = (adv - 0.5 * x) * w              # a gradient computed in the graph
        ops.mifgsm_step_(adv, x, g, momentum, 0.03, 0.04, 0.9, first=first, backend=backend)
        return adv.sum()

    compiled = torch.compile(step, fullgraph=True)
    a1, m1 = adv.clone(), torch.empty_like(adv)
    a2, m2 = adv.clone(), torch.empty_like(adv)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for first in (True, False):
            s1 = compiled(a1, m1, first)
            s2 = step(a2, m2, first)
            assert torch.equal(a1, a2) and torch.equal(m1, m2), first   # the op: eager's bits
            torch.testing.assert_close(s1, s2, **FP32)                   # Inductor's own sum order
    # _backend.why_not's lru_cache (the registry's backend rule) is the one warning Dynamo gives
    # on the triton path; anything else from fastadv fails the test
    ours = [str(m.message) for m in seen if ("fastadv" in str(m.filename) or "/fastadv/" in str(m.message))
            and "_backend.py" not in str(m.message)]
    assert not ours, ours
