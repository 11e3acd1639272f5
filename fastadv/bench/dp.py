"""DP-SGD: cases and implementations for the benchmark.

Two kinds of case.

``clip`` -- the privacy work of one step on given per-sample gradients:
clip every sample across all tensors, sum, add noise (sigma = 1), scale by
the expected batch size, i.e. Opacus's ``DPOptimizer.pre_step`` after the
backward.  Per-sample gradient shapes of a ResNet-18 (GroupNorm, 62 tensors,
11.2M parameters) and of the last two layers of BERT-base plus pooler and
classifier (36 tensors, 14.8M parameters), B = 32 and 64, fp32 (small widths
on CPU).  Implementations: ``reference`` (``opacus.optimizers.DPOptimizer.pre_step``),
``compiled`` (``torch.compile`` of the reference math,
``fastadv.reference.dp.clip_and_noise``), and ``fastadv.dp.DPOptimizer.pre_step``
on each usable backend.  Check (sigma = 0): ``p.grad`` against Opacus's,
rtol 1e-5, atol 1e-6.  Bytes: Opacus's counted aten traffic; fastadv's
design: the per-sample gradients read twice (norms, then the fused sum) plus
``p.summed_grad`` and ``p.grad`` written once -- the "% copy" column is the
fraction of copy bandwidth achieved on that traffic.

``step`` -- a whole DP-SGD step of a ResNet-18 (GroupNorm) on 32x32 images:
forward, backward with Opacus's grad-sample hooks, optimizer step.
Implementations: ``nonprivate`` (the plain model and SGD), ``reference``
(``opacus.PrivacyEngine``), and ``fastadv.dp.PrivacyEngine`` on each usable
backend (Opacus's hooks, fastadv's optimizer).  Check (sigma = 0): the
parameters after one step against Opacus's.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .case import CaseCache, Impl, Prepared, Skip, real_sizes, require
from .check import usable_backends

# Opacus's notes on every engine and hook: true, and not the bench's business
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

SIGMA = 1.0          # noise multiplier of the timed steps
C = 1.0              # max_grad_norm
BATCHES = (32, 64)
TOL = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- models and shapes

def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c), c)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = _gn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _gn(cout))

    def forward(self, x):
        out = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18GN(nn.Module):
    """ResNet-18 with GroupNorm (what Opacus trains: BatchNorm mixes samples)."""

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.gn1 = _gn(w)
        blocks, cin = [], w
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)):
            blocks += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.gn1(self.conv1(x))), 3, 2, 1)
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18_shapes(width: int = 64) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in ResNet18GN(width).parameters()]


def bert_last_layers_shapes(dim: int = 768, layers: int = 2, classes: int = 2) -> list[tuple[int, ...]]:
    """The trainable tail of a BERT classifier: ``layers`` encoder layers, pooler, classifier."""
    d, f = dim, 4 * dim
    layer = [(d, d), (d,), (d, d), (d,), (d, d), (d,), (d, d), (d,), (d,), (d,),   # q k v o, LayerNorm
             (f, d), (f,), (d, f), (d,), (d,), (d,)]                               # FFN, LayerNorm
    return layer * layers + [(d, d), (d,), (classes, d), (classes,)]


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    kind: str            # "clip" or "step"
    model: str           # "resnet18" or "bert-last2"
    batch: int
    width: int           # ResNet width / BERT hidden size
    tier: int = 0        # --quick (and the CPU default) runs tier 0

    @property
    def name(self) -> str:
        what = "clip+noise" if self.kind == "clip" else "DP-SGD step"
        return f"{what} {self.model}(w={self.width}) B={self.batch}"

    @property
    def size(self):
        return self.tier + 1

    def shapes(self) -> list[tuple[int, ...]]:
        if self.model == "resnet18":
            return resnet18_shapes(self.width)
        return bert_last_layers_shapes(self.width)

    def row_extra(self) -> dict:
        shapes = self.shapes()
        return {"tensors": len(shapes), "params": sum(math.prod(s) for s in shapes), "batch": self.batch}


def cases(device, full: bool | None = None) -> list[Case]:
    """Real sizes on CUDA or with ``full`` (tier 0: B = 32, tier 1: B = 64);
    small widths and B = 4 on CPU, where tier 0 is the clip of the BERT tail
    (36 tensors) and the ResNet-18 step, tier 1 the ResNet-18 clip (62
    tensors: the Triton interpreter runs a program per tensor and sample)."""
    if real_sizes(device, full):
        out = [Case("clip", m, b, w, tier) for m, w in (("resnet18", 64), ("bert-last2", 768))
               for tier, b in enumerate(BATCHES)]
        return out + [Case("step", "resnet18", b, 64, tier) for tier, b in enumerate(BATCHES)]
    return [Case("clip", "bert-last2", 4, 32, 0), Case("clip", "resnet18", 4, 4, 1),
            Case("step", "resnet18", 4, 4, 0)]


# ---------------------------------------------------------------- clip cases

class ClipData:
    """Per-sample gradients (some samples clipped, some not, one zero) and the
    parameters they belong to."""

    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        shapes = case.shapes()
        n = sum(math.prod(s) for s in shapes)
        b = case.batch
        # per-sample norm about C * 4^u, u uniform in [-1, 1]: half the samples clipped
        scale = (4.0 ** (torch.rand(b, generator=gen, device=device) * 2 - 1)) * C / math.sqrt(n)
        scale[0] = 0.0
        self.grad_samples = [torch.randn((b, *s), generator=gen, device=device) * scale.view(-1, *[1] * len(s))
                             for s in shapes]
        self.params = [nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        self.case = case
        self.numel = n
        self._expected = None

    def expected(self):
        """Opacus's p.grad with sigma = 0."""
        if self._expected is None:
            opt = _opacus_optimizer(self, 0.0)
            self.reset(opt)
            opt.pre_step()
            self._expected = [p.grad.clone() for p in self.params]
            for p in self.params:
                p.grad = None
        return self._expected

    def reset(self, opt=None) -> None:
        """Back to right after a backward: fresh grad_sample, no summed_grad."""
        for p, g in zip(self.params, self.grad_samples):
            if hasattr(g, "_processed"):
                del g._processed
            p.grad_sample = g
            p.summed_grad = None
        if opt is not None:
            opt._step_skip_queue.clear()

    def check(self, opt) -> str | None:
        expected = self.expected()
        self.reset(opt)
        opt.pre_step()
        worst = 0.0
        for p, e in zip(self.params, expected):
            if not torch.allclose(p.grad, e, **TOL):
                worst = max(worst, float((p.grad - e).abs().max()))
        return None if worst == 0.0 else f"p.grad differs from Opacus's: max abs error {worst:.3g}"

    def design_bytes(self) -> int:
        b, n = self.case.batch, self.numel
        per_sample = 4 * b * n                      # fp32 per-sample gradients
        return 2 * per_sample + 4 * n + 4 * n       # norms read, fused read, summed + grad written


def _opacus_optimizer(data: ClipData, sigma: float):
    from opacus.optimizers import DPOptimizer
    return DPOptimizer(torch.optim.SGD(data.params, lr=0.0), noise_multiplier=sigma, max_grad_norm=C,
                       expected_batch_size=data.case.batch)


def _fastadv_optimizer(data: ClipData, sigma: float, backend: str):
    from fastadv.dp import DPOptimizer
    return DPOptimizer(torch.optim.SGD(data.params, lr=0.0), noise_multiplier=sigma, max_grad_norm=C,
                       expected_batch_size=data.case.batch, backend=backend)


def _clip_impl(case: Case, device, name: str) -> Impl:
    def setup() -> Prepared:
        require("opacus")
        data = _data(case, device)
        interpreted = False
        if name == "reference":
            make = lambda sigma: _opacus_optimizer(data, sigma)  # noqa: E731
        else:
            from fastadv import _backend
            interpreted = (name == "triton" and _backend.triton_interpreter()
                           and torch.device(device).type == "cpu")
            make = lambda sigma: _fastadv_optimizer(data, sigma, name)  # noqa: E731
        check_opt, opt = make(0.0), make(SIGMA)

        def step():
            data.reset(opt)
            opt.pre_step()

        def teardown():
            for p in data.params:
                p.grad = None
                p.summed_grad = None

        return Prepared(step=step, check=lambda: data.check(check_opt),
                        design_bytes=None if name == "reference" else data.design_bytes(),
                        timed=not interpreted, teardown=teardown,
                        extra={"interpreted": True} if interpreted else {})

    return Impl(name, setup)


def _compiled_clip_impl(case: Case, device) -> Impl:
    def setup() -> Prepared:
        from fastadv.reference.dp import clip_and_noise

        require("opacus")  # the check compares with Opacus's p.grad
        data = _data(case, device)
        try:
            import torch._dynamo
            torch._dynamo.reset()
            fn = torch.compile(clip_and_noise)
            fn(data.grad_samples, C, 0.0, expected_batch_size=case.batch)
        except Exception as exc:
            raise Skip(f"torch.compile failed here: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc

        def check():
            got = fn(data.grad_samples, C, 0.0, expected_batch_size=case.batch)
            bad = [i for i, (g, e) in enumerate(zip(got, data.expected())) if not torch.allclose(g, e, **TOL)]
            return None if not bad else f"differs from Opacus's p.grad at tensors {bad[:5]}"

        return Prepared(step=lambda: fn(data.grad_samples, C, SIGMA, expected_batch_size=case.batch),
                        check=check, counting="compiled", teardown=torch._dynamo.reset)

    return Impl("compiled", setup)


# ---------------------------------------------------------------- step cases

class StepData:
    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        n = 4 * case.batch
        self.x = torch.randn((n, 3, 32, 32), generator=gen, device=device)
        self.y = torch.randint(0, 10, (n,), generator=gen, device=device)
        torch.manual_seed(0)
        self.state = ResNet18GN(case.width).to(device).state_dict()
        self.case = case
        self.device = device
        self._expected = None

    def model(self) -> nn.Module:
        m = ResNet18GN(self.case.width).to(self.device)
        m.load_state_dict(self.state)
        return m

    def loader(self):
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=self.case.batch)

    def private(self, engine_cls, sigma, **kw):
        engine = engine_cls(accountant="rdp", **kw)
        model = self.model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=self.loader(),
                                            noise_multiplier=sigma, max_grad_norm=C, poisson_sampling=False)
        return model, opt

    def batch(self):
        b = self.case.batch
        return self.x[:b], self.y[:b]

    def expected(self):
        if self._expected is None:
            import opacus
            model, opt = self.private(opacus.PrivacyEngine, 0.0)
            train_step(model, opt, *self.batch())
            self._expected = [p.detach().clone() for p in model.parameters()]
        return self._expected

    def check(self, engine_cls, **kw) -> str | None:
        model, opt = self.private(engine_cls, 0.0, **kw)
        train_step(model, opt, *self.batch())
        worst = max(float((p.detach() - e).abs().max()) for p, e in zip(model.parameters(), self.expected()))
        ok = all(torch.allclose(p.detach(), e, rtol=1e-4, atol=1e-5)
                 for p, e in zip(model.parameters(), self.expected()))
        return None if ok else f"parameters after one step differ from Opacus's: max abs error {worst:.3g}"


def train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _step_impl(case: Case, device, name: str) -> Impl:
    def setup() -> Prepared:
        opacus = require("opacus")
        data = _data(case, device)
        x, y = data.batch()
        interpreted = False
        if name == "nonprivate":
            model = data.model()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            check = None
        elif name == "reference":
            model, opt = data.private(opacus.PrivacyEngine, SIGMA)
            check = lambda: data.check(opacus.PrivacyEngine)  # noqa: E731
        else:
            from fastadv import _backend
            from fastadv.dp import PrivacyEngine
            interpreted = (name == "triton" and _backend.triton_interpreter()
                           and torch.device(device).type == "cpu")
            model, opt = data.private(PrivacyEngine, SIGMA, backend=name)
            check = lambda: data.check(PrivacyEngine, backend=name)  # noqa: E731
        # the step runs the model and Opacus's grad-sample hooks: syncs there are not fastadv's
        return Prepared(step=lambda: train_step(model, opt, x, y), check=check, timed=not interpreted,
                        extra={"interpreted": True} if interpreted else {}, sync_free=False)

    return Impl(name, setup)


# ---------------------------------------------------------------- registry

_data = CaseCache(lambda case, device: (ClipData if case.kind == "clip" else StepData)(case, device))


def impls(case: Case, device) -> list[Impl]:
    """clip: reference (Opacus), compiled, fastadv backends; step: nonprivate,
    reference (Opacus), fastadv backends."""
    backends = usable_backends(device)
    if case.kind == "clip":
        return ([_clip_impl(case, device, "reference"), _compiled_clip_impl(case, device)]
                + [_clip_impl(case, device, b) for b in backends])
    return [_step_impl(case, device, n) for n in ("nonprivate", "reference", *backends)]


def release() -> None:
    _data.clear()
