"""fastadv without Triton: every op runs on the torch backend, and the CUDA
binding imports and reports itself (issue 14, item 3).

Each check runs in a fresh interpreter whose import system refuses ``triton``
(a ``sys.meta_path`` finder installed before fastadv is imported), so a stray
``import triton`` anywhere on a torch-backend or CUDA-binding path fails here.
The ops are checked against the references where the result is
deterministic, and each must count its torch-backend launch
(``fastadv.kernels.LAUNCHES["torch.*"]``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TRITON = textwrap.dedent('''
    import importlib.abc
    import sys

    class _NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"triton is blocked in this test (import of {name!r})")
            return None

    sys.meta_path.insert(0, _NoTriton())
    for _m in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[_m]
''')

OPS = textwrap.dedent('''
    import collections
    import copy
    import types

    import torch
    from torch import nn

    import fastadv
    import fastadv.kernels as kernels
    from fastadv import reference as ref
    from fastadv.reference import noise as ref_noise

    torch.manual_seed(0)
    FP32 = dict(rtol=1e-5, atol=1e-6)
    ran = []


    def check(name, *prefixes):
        """Run the block below as op ``name``; it must count a torch launch under each prefix."""
        def deco(fn):
            before = collections.Counter(kernels.LAUNCHES)
            fn()
            fired = {k for k, v in kernels.LAUNCHES.items() if v > before[k]}
            assert fired, f"{name}: no launch counted"
            assert all(k.startswith("torch.") for k in fired), (name, fired)
            for p in prefixes:
                assert any(k.startswith("torch." + p) for k in fired), (name, p, fired)
            ran.append(name)
        return deco


    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(40, 8)
            self.norm = nn.LayerNorm(8)  # the SiFT target
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None):
            h = self.norm(self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds)
            logits = self.head(torch.tanh(self.proj(h))).mean(1)
            return nn.functional.cross_entropy(logits, labels, reduction="none"), logits

        def get_input_embeddings(self):
            return self.word_embeddings


    ids, labels = torch.randint(0, 40, (4, 6)), torch.randint(0, 3, (4,))


    def backward(m):
        m.zero_grad()
        m(input_ids=ids, labels=labels)[0].mean().backward()


    # ---- the backend machinery ---------------------------------------------------------------
    from fastadv import _backend
    assert _backend.resolve(None, torch.device("cpu")) == "torch"
    assert "triton cannot be imported" in _backend.why_not("triton", torch.device("cpu"))
    try:
        fastadv.noise.add_gaussian_noise(torch.zeros(3), 0.1, backend="triton")
    except fastadv.BackendUnavailable as exc:
        assert "triton" in str(exc)
    else:
        raise AssertionError("a forced triton backend ran without triton")
    import fastadv.kernels.cuda as fcuda
    why = fcuda.load_error()
    # a reason, not an exception, where no library is built; None where one is (cudart is
    # static: it loads without a GPU or a driver)
    assert why is None or (isinstance(why, str) and why), why
    assert "fastadv_mt_weight_noise" in fcuda.EXPORTS and "fastadv_awp_update" in fcuda.EXPORTS
    from fastadv.kernels import host
    table = host.TableCache().get("x", [[torch.zeros(5), torch.zeros(40)]], chunk=16)
    assert table.data.tolist() == [table.ptrs[0], table.ptrs[1], 5, 40, 0, 1, 4, 0, 1, 1, 1]
    assert host.new_key("cpu").shape == (2,)


    # ---- embedding attacks ----------------------------------------------------------------
    @check("FGM", "fgm")
    def _():
        model = TinyLM()
        twin = copy.deepcopy(model)
        fgm, rfgm = fastadv.FGM(model, backend="torch"), ref.FGM(twin)
        w0 = model.word_embeddings.weight.detach().clone()
        for m in (model, twin):
            backward(m)
        fgm.attack(), rfgm.attack()
        torch.testing.assert_close(model.word_embeddings.weight, twin.word_embeddings.weight, **FP32)
        fgm.restore()
        assert torch.equal(model.word_embeddings.weight, w0)


    @check("PGD", "pgd")
    def _():
        model = TinyLM()
        twin = copy.deepcopy(model)
        pgd, rpgd = fastadv.PGD(model, backend="torch"), ref.PGD(twin)
        w0 = model.word_embeddings.weight.detach().clone()
        for m in (model, twin):
            backward(m)
        for p in (pgd, rpgd):
            p.backup_grad()
        for k in range(2):
            pgd.attack(is_first_attack=k == 0)
            rpgd.attack(is_first_attack=k == 0)
            torch.testing.assert_close(model.word_embeddings.weight, twin.word_embeddings.weight, **FP32)
            for m in (model, twin):
                backward(m)
        pgd.restore(), rpgd.restore()
        pgd.restore_grad(), rpgd.restore_grad()
        assert torch.equal(model.word_embeddings.weight, w0)


    @check("fgsm_perturb")
    def _():
        e, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        torch.testing.assert_close(fastadv.fgsm_perturb(e, g, 0.1, backend="torch"),
                                   ref.fgsm_perturb(e, g, 0.1), **FP32)


    class HFish(nn.Module):
        """``model(inputs_embeds=...).logits``, ``get_input_embeddings()``."""

        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(40, 8), nn.Linear(8, 3)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, inputs_embeds):
            return types.SimpleNamespace(logits=self.head(inputs_embeds).mean(1))


    @check("adversarial_train_step")
    def _():
        fastadv.adversarial_train_step(HFish(), {"input_ids": ids}, labels, 0.1, backend="torch")


    # ---- input attacks -------------------------------------------------------------------
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    images, targets = torch.rand(6, 3, 4, 4), torch.randint(0, 5, (6,))
    for cls, kw in ((fastadv.attacks.FGSM, {}), (fastadv.attacks.PGD, {"steps": 2}),
                    (fastadv.attacks.PGDL2, {"steps": 2}), (fastadv.attacks.MIFGSM, {"steps": 2}),
                    (fastadv.attacks.FFGSM, {})):
        @check(f"attacks.{cls.__name__}")
        def _():
            adv = cls(net, backend="torch", **kw)(images, targets)
            assert adv.shape == images.shape and bool(((adv >= 0) & (adv <= 1)).all())

    @check("attacks.FGSM = x + eps sign(g)")
    def _():
        x = images.clone().requires_grad_(True)
        nn.functional.cross_entropy(net(x), targets).backward()
        expect = (images + 8 / 255 * x.grad.sign()).clamp(0, 1)
        torch.testing.assert_close(fastadv.attacks.FGSM(net, backend="torch")(images, targets), expect,
                                   **FP32)


    # ---- weight attacks and averaging -------------------------------------------------------
    @check("AWP", "awp", "copy")
    def _():
        model = TinyLM()
        twin = copy.deepcopy(model)
        awp, rawp = fastadv.AWP(model, None, adv_eps=0.1, backend="torch"), ref.AWP(twin, None, adv_eps=0.1)
        w0 = [p.detach().clone() for p in model.parameters()]
        for m in (model, twin):
            backward(m)
        awp._save(), rawp._save()
        awp._attack_step(), rawp._attack_step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **FP32)
        awp._restore()
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


    @check("SAM", "sam", "copy")
    def _():
        model = TinyLM()
        twin = copy.deepcopy(model)
        opt = fastadv.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, backend="torch")
        ropt = ref.SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
        for m, o in ((model, opt), (twin, ropt)):
            backward(m)
            o.first_step(zero_grad=True)
            backward(m)
            o.second_step(zero_grad=True)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **FP32)


    @check("ModelEMA", "lerp", "copy")
    def _():
        model = TinyLM()
        twin = copy.deepcopy(model)
        ema, rema = fastadv.ModelEMA(model, 0.9, backend="torch"), ref.EMA(twin, 0.9)
        rema.register()
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                d = torch.randn_like(p)
                p.add_(d), q.add_(d)
        ema.update(), rema.update()
        for n, s in ema.shadow.items():
            torch.testing.assert_close(s, rema.shadow[n], **FP32)
        live = [p.detach().clone() for p in model.parameters()]
        with ema.applied():
            pass
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), live))


    @check("swa_multi_avg_fn", "lerp")
    def _():
        avg, cur = [torch.randn(7)], [torch.randn(7)]
        expect = [avg[0].clone()]
        ref.swa_average(expect, cur, 3)
        fastadv.swa_multi_avg_fn("torch")(avg, cur, torch.tensor(3))
        torch.testing.assert_close(avg[0], expect[0], **FP32)


    # ---- noise ----------------------------------------------------------------------------
    x = torch.randn(4, 6, 8)

    @check("add_gaussian_noise", "noise_add")
    def _():
        torch.manual_seed(3)
        expect = ref_noise.add_gaussian_noise(x, 0.2)
        torch.manual_seed(3)
        assert torch.equal(fastadv.noise.add_gaussian_noise(x, 0.2, backend="torch"), expect)
        fastadv.noise.add_gaussian_noise_(x.clone(), 0.2, backend="torch")
        fastadv.noise.GaussianNoise(0.2, backend="torch").train()(x)


    @check("neftune", "neftune")
    def _():
        from fastadv.reference.neftune import neftune as ref_neftune
        mask = torch.ones(4, 6, dtype=torch.int64)
        mask[1, 3:] = 0
        torch.manual_seed(4)
        expect = ref_neftune(x, 5.0, mask)
        torch.manual_seed(4)
        torch.testing.assert_close(fastadv.noise.neftune(x, 5.0, mask, backend="torch"), expect, **FP32)


    @check("noisy_token_ids", "noise_token_ids")
    def _():
        torch.manual_seed(5)
        expect = ref_noise.noisy_token_ids(ids, 0.5, 40)
        torch.manual_seed(5)
        assert torch.equal(fastadv.noise.noisy_token_ids(ids, 0.5, 40, backend="torch"), expect)


    @check("weight_noise", "weight_noise", "copy")
    def _():
        model = TinyLM()
        w0 = [p.detach().clone() for p in model.parameters()]
        with fastadv.noise.weight_noise(model, 0.1, backend="torch"):
            assert not torch.equal(model.proj.weight, w0[3])
            model.double().float()  # storage moved inside the block
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


    @check("sift", "sift_init", "sift_update")
    def _():
        model = TinyLM()
        layers = fastadv.sift.hook_sift_layer(model, 8, target_module="norm", backend="torch")
        learner = fastadv.sift.AdversarialLearner(model, layers)
        loss, logits = model(input_ids=ids, labels=labels)

        def logits_fn(m, **kw):
            return m(**kw)[1]

        adv = learner.loss(logits, logits_fn, input_ids=ids, labels=labels)
        assert bool(torch.isfinite(adv))
        (loss.mean() + adv).backward()


    # ---- DP ---------------------------------------------------------------------------------
    @check("dp.clip_and_noise")
    def _():
        gs = [torch.randn(5, 3, 4), torch.randn(5, 7)]
        got = fastadv.dp.clip_and_noise(gs, 1.0, 0.0, backend="torch")
        expect = ref.clip_and_noise(gs, 1.0, 0.0)
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, **FP32)


    @check("DPOptimizer (seed 000)")
    def _():
        model = TinyLM()
        backward(model)
        fastadv.DPOptimizer(model.parameters(), noise_multiplier=0.1, max_grad_norm=1.0, backend="torch").step()


    # ---- and Triton was never imported ----------------------------------------------------------
    assert not [m for m in sys.modules if m == "triton" or m.startswith("triton.")]
    print("RAN", len(ran), "|".join(ran))
''')


def _run(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTADV_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_blocker_blocks():
    res = _run(BLOCK_TRITON + "\nimport triton\n")
    assert res.returncode != 0 and "triton is blocked in this test" in res.stderr


CUDA_BINDING = textwrap.dedent('''
    import fastadv.kernels.cuda as fcuda
    import fastadv.kernels.cuda.awp, fastadv.kernels.cuda.noise, fastadv.kernels.cuda.dp  # noqa: F401
    import fastadv.kernels.cuda.multi_tensor, fastadv.kernels.cuda.sam, fastadv.kernels.cuda.ema  # noqa: F401
    import fastadv.kernels.cuda.neftune, fastadv.kernels.cuda.sift  # noqa: F401
    print("LOAD_ERROR", fcuda.load_error())
    assert "triton" not in sys.modules
    import runpy
    sys.argv = ["fastadv", "env"]
    runpy.run_module("fastadv", run_name="__main__", alter_sys=True)
''')

FORCED_CUDA = textwrap.dedent('''
    import torch
    import fastadv
    from fastadv.ops.awp import awp_step_
    w = [torch.randn(4)]
    try:
        awp_step_(w, [torch.randn(4)], [torch.empty(4)], adv_lr=1, adv_eps=0.1, write_backup=True,
                  backend="cuda")
    except fastadv.BackendUnavailable as exc:
        print("REFUSED", exc)
    assert "triton" not in sys.modules
''')

# The three checks share one interpreter with Triton blocked (one torch import
# instead of three, ~10 s each on 2 cores); each part runs in its own namespace
# and reports on its own, so a failure is the failing part's test only.  The
# light parts run first, on a freshly started interpreter; the blocker makes any
# import of triton fail whatever ran before.
PARTS = {"cuda_binding": CUDA_BINDING, "forced_cuda": FORCED_CUDA, "ops": OPS}

RUN_PARTS = textwrap.dedent('''
    import sys
    import traceback

    for name, code in PARTS.items():
        print(f"=== {name}", flush=True)
        try:
            exec(compile(code, f"<{name}>", "exec"), {"__name__": "__main__", "sys": sys})
        except SystemExit as exc:  # `python -m fastadv env` ends with sys.exit(main())
            ok = exc.code in (0, None)
        except BaseException:
            traceback.print_exc(file=sys.stdout)
            ok = False
        else:
            ok = True
        print(f"=== {name} {'ok' if ok else 'FAILED'}", flush=True)
''')


@pytest.fixture(scope="module")
def parts():
    """Each part's stdout, from one run of all three with Triton blocked."""
    res = _run(BLOCK_TRITON + f"\nPARTS = {PARTS!r}\n" + RUN_PARTS)
    out, name, found = {}, None, []
    for line in res.stdout.splitlines():
        if line.startswith("=== "):
            name, _, status = line[4:].partition(" ")
            if status:
                found.append((name, status))
            else:
                out[name] = []
        elif name is not None:
            out[name].append(line)
    return {"res": res, "out": {k: "\n".join(v) for k, v in out.items()}, "status": dict(found)}


def _part(parts, name) -> str:
    res, out = parts["res"], parts["out"].get(name, "")
    assert parts["status"].get(name) == "ok", (
        f"part {name}: {parts['status'].get(name, 'did not finish')} (exit {res.returncode})\n"
        f"stdout:\n{out[-4000:]}\nstderr:\n{res.stderr[-8000:]}")
    return out


def test_every_op_runs_on_the_torch_backend_without_triton(parts):
    out = _part(parts, "ops")
    line = next(ln for ln in out.splitlines() if ln.startswith("RAN "))
    ran = line.split(" ", 2)[2].split("|")
    for op in ("FGM", "PGD", "fgsm_perturb", "attacks.FGSM", "attacks.PGD", "attacks.PGDL2",
               "attacks.MIFGSM", "attacks.FFGSM", "AWP", "SAM", "ModelEMA", "add_gaussian_noise", "neftune",
               "noisy_token_ids", "weight_noise", "sift", "dp.clip_and_noise"):
        assert op in ran, (op, ran)


def test_the_cuda_binding_and_env_report_without_triton(parts):
    out = _part(parts, "cuda_binding")
    reason = next(ln for ln in out.splitlines() if ln.startswith("LOAD_ERROR"))
    assert reason != "LOAD_ERROR None" or "cuda lib" in out  # a reason where no library is built
    assert "triton" in out and "torch" in out
    assert "cannot be imported" in out  # env says why the triton backend is not usable


def test_a_forced_cuda_backend_without_triton_says_why(parts):
    out = _part(parts, "forced_cuda")
    assert "REFUSED" in out and "CUDA tensors" in out
