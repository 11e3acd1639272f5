"""Triton kernels visible to torch.compile (issue 10, point 1).

The ops registered with ``triton=True`` (embedding FGSM, the L-inf input
attack steps, FGM attack / restore, PGD step / restore) have a
``torch.library.triton_op`` twin ``fastadv::<name>_triton``: under
torch.compile their triton backend is traced into, and the graph holds the
Triton kernels themselves (``triton_kernel_wrapper_*`` nodes) instead of an
opaque ``fastadv::<name>`` call.  On CPU the kernels run under the Triton
interpreter; Inductor cannot compile a user Triton kernel for a CPU tensor,
so these tests run the traced graph with AOTAutograd as it is (``aot_eager``
with a graph inspector) and compare with eager and with the reference.  The
Inductor run of the same steps needs a GPU (``-m gpu``).
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import fastadv
import fastadv.ops.fgsm
import fastadv.kernels as kernels
from fastadv.ops import _registry
from fastadv.ops import attacks as A
from fastadv.ops import fgm as F
from fastadv.ops import pgd as P
from fastadv.reference import FGM as RefFGM
from fastadv.reference import PGD as RefPGD
from fastadv.reference import fgsm_perturb as ref_perturb

from conftest import DEVICE

FP32 = dict(rtol=1e-5, atol=1e-6)
WRAPPERS = ("triton_kernel_wrapper_functional", "triton_kernel_wrapper_mutation")

needs_triton = pytest.mark.skipif(_registry.unusable("triton", torch.empty(0, device=DEVICE)),
                                  reason="the triton backend cannot run here")
pytestmark = needs_triton


@pytest.fixture
def traced(monkeypatch):
    """Route the triton backend through the triton_op twins while compiling
    (the default on a GPU; off under the interpreter, see _registry.TRACE_TRITON)."""
    monkeypatch.setattr(_registry, "TRACE_TRITON", True)
    # Without a GPU driver torch cannot read which arguments a kernel writes
    # and logs that it takes every tensor argument as written (correct, more
    # copies); that is the expected CPU case, not news.
    log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    monkeypatch.setattr(log, "level", logging.ERROR)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_and_capture(fn):
    """``fn`` compiled with fullgraph=True through AOTAutograd, the graphs run
    as traced (no Inductor); returns (compiled, the captured forward graphs)."""
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def keep(gm, example_inputs):
        from functorch.compile import make_boxed_func
        graphs.append(gm)
        return make_boxed_func(gm)

    return torch.compile(fn, backend=aot_autograd(fw_compiler=keep), fullgraph=True), graphs


def kernels_in(graphs) -> list[str]:
    """Names of the Triton kernels launched by the captured graphs, in order."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    names = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "__name__", "") in WRAPPERS:
                k = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                while not hasattr(k, "arg_names") or hasattr(k, "configs"):  # an Autotuner around it
                    k = k.fn
                names.append(k.fn.__name__)
    return names


def opaque_fastadv_calls(graphs) -> list[str]:
    """The fastadv custom ops called by the graphs (a mutating one appears
    wrapped in auto_functionalized)."""
    calls = []
    for gm in graphs:
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            target = n.target
            if "auto_functionalized" in str(target):
                target = n.args[0] if n.args else n.kwargs.get("_mutable_op")
            if str(target).startswith("fastadv."):
                calls.append(str(target))
    return calls


def launches(prefix="triton."):
    return sum(v for k, v in kernels.LAUNCHES.items() if k.startswith(prefix))


# -- the traced graph holds the kernels, and gives eager's and the reference's results ------------

def test_fgsm_perturb_graph_holds_the_kernel(traced):
    e = torch.randn(4, 6, device=DEVICE)
    g = torch.randn(4, 6, device=DEVICE)
    g.view(-1)[:3] = torch.tensor([0.0, float("nan"), -0.0])
    compiled, graphs = compile_and_capture(lambda e, g: fastadv.fgsm_perturb(e * 2, g, 0.1, backend="triton") + 1)
    got = compiled(e, g)
    assert kernels_in(graphs) == ["_fgsm"]
    assert not opaque_fastadv_calls(graphs)
    eager = fastadv.fgsm_perturb(e * 2, g, 0.1, backend="triton") + 1
    assert torch.equal(got, eager)
    assert torch.equal(got, ref_perturb(e * 2, g, 0.1) + 1)


def test_fgsm_perturb_backward_through_the_traced_op(traced):
    """The twin carries the op's autograd formula (identity in embeds)."""
    e = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    g = torch.randn(4, 6, device=DEVICE)
    compiled, graphs = compile_and_capture(lambda e, g: (fastadv.fgsm_perturb(e, g, 0.1, backend="triton") * 3).sum())
    out = compiled(e, g)
    out.backward()
    assert kernels_in(graphs) == ["_fgsm"]
    torch.testing.assert_close(out, (ref_perturb(e.detach(), g, 0.1) * 3).sum(), **FP32)
    assert torch.equal(e.grad, torch.full_like(e, 3.0))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attack_pgd_step_graph_holds_the_kernel(traced, layout):
    """The in-place L-inf step (adv mutated through a [batch, per_sample] view)
    traced into its kernel; two steps, as an attack loop runs them."""
    x = torch.rand(2, 3, 5, 7, device=DEVICE).contiguous(memory_format=layout)
    w = torch.randn_like(x)

    def two_steps(adv):
        for _ in range(2):
            A.pgd_step_(adv, x, (adv - 0.5 * x) * w, 0.03, 0.05, backend="triton")
        return adv.sum()

    compiled, graphs = compile_and_capture(two_steps)
    adv_c, adv_e = x.clone(), x.clone()
    s = compiled(adv_c)
    assert kernels_in(graphs) == ["_linf_step_kernel"] * 2
    assert not opaque_fastadv_calls(graphs)
    two_steps(adv_e)
    assert torch.equal(adv_c, adv_e)
    ref = x.clone()
    for _ in range(2):  # torchattacks' step (fastadv.reference.attacks)
        a = ref + 0.03 * ((ref - 0.5 * x) * w).sign()
        ref = torch.clamp(x + torch.clamp(a - x, min=-0.05, max=0.05), min=0, max=1)
    torch.testing.assert_close(adv_c, ref, **FP32)
    torch.testing.assert_close(s, ref.sum(), **FP32)


def test_attack_fgsm_step_into_out(traced):
    x = torch.rand(3, 8, device=DEVICE)
    g = torch.randn_like(x)
    compiled, graphs = compile_and_capture(
        lambda x, g, out: A.fgsm_step_(x, g, 0.1, out=out, backend="triton").sum())
    out = torch.empty_like(x)
    compiled(x, g, out)
    assert kernels_in(graphs) == ["_linf_step_kernel"]
    assert torch.equal(out, torch.clamp(x + 0.1 * g.sign(), min=0, max=1))


class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.word_embeddings(ids).mean(1))


def _grads(model, ids):
    model.zero_grad()
    model(ids).sum().backward()


def _model_and_reference():
    """An Emb, a copy of it for the seed reference and a batch; both hold its gradients."""
    model, ref_model = Emb().to(DEVICE), Emb().to(DEVICE)
    ref_model.load_state_dict(model.state_dict())
    ids = torch.tensor([[1, 2, 2], [5, 1, 0]], device=DEVICE)
    _grads(model, ids)
    _grads(ref_model, ids)
    return model, ref_model, ids


@pytest.mark.parametrize("row_sparse", [True, False])
def test_fgm_attack_restore_graph_holds_the_kernels(traced, row_sparse):
    """FGM attack, a forward on the perturbed table, restore: compiled, the
    graph launches the norm, update and (row mode) restore kernels; the loss
    equals eager's and the seed FGM's, the restore is bit-exact."""
    model, ref_model, ids = _model_and_reference()
    w = model.word_embeddings.weight
    before = w.detach().clone()

    def step(ids):
        state = F.fgm_attack_(w, w.grad, 0.5, row_sparse=row_sparse, backend="triton")
        loss = model(ids).sum()
        F.fgm_restore_(state)
        return loss

    compiled, graphs = compile_and_capture(step)
    with torch.no_grad():
        loss = compiled(ids)
    expected = ["_partial_rows", "_finalize", "_update_rows", "_restore_rows"] if row_sparse else \
        ["_partial_dense", "_finalize", "_update_dense"]  # dense restore: a copy
    assert kernels_in(graphs) == expected
    assert not opaque_fastadv_calls(graphs)
    assert torch.equal(w.detach(), before)
    ref = RefFGM(ref_model, epsilon=0.5)
    ref.attack()
    with torch.no_grad():
        ref_loss = ref_model(ids).sum()
    ref.restore()
    torch.testing.assert_close(loss, ref_loss, **FP32)
    with torch.no_grad():
        eager = step(ids)
    assert torch.equal(loss, eager)


@pytest.mark.parametrize("row_sparse", [True, False])
def test_pgd_steps_graph_holds_the_kernels(traced, row_sparse):
    """Three PGD steps and the restore, compiled: the kernels are in the
    graph; the perturbed table equals eager's and the seed PGD's."""
    model, ref_model, ids = _model_and_reference()
    w = model.word_embeddings.weight
    w0 = w.detach().clone()
    g = w.grad.detach().clone()

    def attack(w, g):
        state = None
        for k in range(3):
            state = P.pgd_attack_(w, g * (k + 1), 0.3, 0.4, state, row_sparse=row_sparse, backend="triton")
        return state

    def step(g):
        state = attack(w, g)
        perturbed = w * 1.0  # the table as the attack left it (a copy, in the graph)
        P.pgd_restore_(state)
        return perturbed

    compiled, graphs = compile_and_capture(step)
    with torch.no_grad():
        got = compiled(g)
    names = kernels_in(graphs)
    mode = "rows" if row_sparse else "dense"
    assert names == [f"_partial_{mode}", "_finalize", f"_update_{mode}"] * 3 + (["_restore_rows"] if row_sparse else [])
    assert not opaque_fastadv_calls(graphs)
    assert torch.equal(w.detach(), w0)
    ref = RefPGD(ref_model, epsilon=0.4, alpha=0.3)
    rw = ref_model.word_embeddings.weight
    for k in range(3):
        rw.grad = g * (k + 1)
        ref.attack(is_first_attack=k == 0)
    torch.testing.assert_close(got, rw.detach(), **FP32)
    ref.restore()
    with torch.no_grad():
        eager = step(g)
    assert torch.equal(got, eager)


def test_ops_without_a_traceable_path_stay_opaque(traced):
    """PGD-L2 (its update depends on FMA contraction, which Inductor does not
    turn off for a user kernel) stays one opaque fastadv op in the graph."""
    x = torch.rand(2, 12, device=DEVICE)
    g = torch.randn_like(x)
    compiled, graphs = compile_and_capture(
        lambda adv: A.pgdl2_step_(adv, x, g, 0.2, 0.5, backend="triton").sum())
    compiled(x.clone())
    assert kernels_in(graphs) == []
    assert opaque_fastadv_calls(graphs) == ["fastadv.attack_pgdl2_step_.default"]


def test_interpreter_default_keeps_ops_opaque():
    """Under the interpreter the default is the opaque op (Inductor cannot
    compile a user Triton kernel on CPU): the existing CPU compile tests run."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the twins are the default")
    assert _registry.TRACE_TRITON is False
    torch._dynamo.reset()
    e, g = torch.randn(4, 6), torch.randn(4, 6)
    compiled, graphs = compile_and_capture(lambda e, g: fastadv.fgsm_perturb(e, g, 0.1, backend="triton"))
    compiled(e, g)
    assert kernels_in(graphs) == [] and opaque_fastadv_calls(graphs) == ["fastadv.fgsm_perturb.default"]


# -- the twins as registered ops ------------------------------------------------------------------

def test_opcheck_of_the_twins():
    """torch.library.opcheck on each triton_op twin (schema and declared
    mutation, fake tensors, autograd registration, AOT dispatch, which
    decomposes into the kernels)."""
    x = torch.rand(2, 3, 4, device=DEVICE)
    g = torch.randn_like(x)
    w = torch.randn(5, 4, device=DEVICE)
    gw = torch.randn_like(w)
    gw[1] = 0
    u8 = dict(dtype=torch.uint8, device=DEVICE)
    cases = [
        (fastadv.ops.fgsm.fgsm_perturb_op, (torch.randn(4, 6, device=DEVICE, requires_grad=True),
                                            torch.randn(4, 6, device=DEVICE), 0.1, "triton")),
        (A.fgsm_step_op, (x.clone(), g, None, 0.03, "triton")),
        (A.pgd_step_op, (x.clone(), x, g, torch.empty_like(x), 0.03, 0.04, "triton")),
        (F.fgm_attack_op, (w.clone(), gw, torch.empty_like(w), 0.5, True, "triton")),
        (F.fgm_restore_op, (w.clone(), w.clone(), torch.tensor([1, 0, 1, 0, 0], **u8), "triton")),
        (P.pgd_step_op, (w.clone(), gw, torch.empty_like(w), torch.zeros(5, **u8), torch.empty(5, **u8),
                         0.3, 0.4, True, "triton")),
        (P.pgd_restore_op, (w.clone(), w.clone(), torch.tensor([0, 1, 0, 0, 1], **u8), "triton")),
    ]
    for op, args in cases:
        try:
            torch.library.opcheck(op.traced_overload, args)
        except Exception as exc:
            raise AssertionError(f"opcheck of {op.name}_triton failed") from exc


def test_twin_list_holds_every_traceable_op():
    traceable = sorted(n for n, op in _registry._OPS.items() if op.triton)
    assert traceable == ["attack_fgsm_step_", "attack_pgd_step_", "fgm_attack_", "fgm_restore_",
                         "fgsm_perturb", "pgd_restore_", "pgd_step_"]
    with pytest.raises(ValueError, match="no traceable triton path"):
        _registry._OPS["attack_pgdl2_step_"].traced()


# -- eager calls the kernel directly ----------------------------------------------------------------

def test_eager_launches_the_kernel_directly(monkeypatch):
    """In eager mode no launch is wrapped for tracing and no fastadv op goes
    through the dispatcher: the launcher calls the @triton.jit kernel itself."""
    from fastadv.kernels.triton import _trace

    def refuse(kernel):
        raise AssertionError(f"an eager launch of {kernel} was wrapped for tracing")

    monkeypatch.setattr(_trace, "_traceable", refuse)
    e, g = torch.randn(4, 6, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    x = torch.rand(2, 8, device=DEVICE)
    w, gw = torch.randn(5, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    n = launches()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fastadv.fgsm_perturb(e, g, 0.1, backend="triton")
        A.pgd_step_(x.clone(), x, torch.randn_like(x), 0.03, 0.04, backend="triton")
        F.fgm_restore_(F.fgm_attack_(w, gw, 0.1, backend="triton"))
        P.pgd_restore_(P.pgd_attack_(w, gw, 0.1, 0.2, backend="triton"))
    assert launches() > n
    assert torch.equal(out, ref_perturb(e, g, 0.1))
    ours = [ev.name for ev in prof.events() if ev.name.startswith("fastadv::")]
    assert not ours, ours


# -- Inductor on a GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
def test_inductor_compiles_the_traced_kernels():
    """On a GPU the twins are the default: Inductor compiles the Triton
    kernels inside the step; results equal eager's (bitwise for the FGSM and
    L-inf steps, whose math has no multiply-add to contract)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert _registry.TRACE_TRITON
    torch._dynamo.reset()
    dev = torch.device("cuda")
    e, g = torch.randn(64, 96, device=dev), torch.randn(64, 96, device=dev)
    f = torch.compile(lambda e, g: fastadv.fgsm_perturb(e * 2, g, 0.1, backend="triton") + 1, fullgraph=True)
    assert torch.equal(f(e, g), fastadv.fgsm_perturb(e * 2, g, 0.1, backend="triton") + 1)
    x = torch.rand(4, 3, 8, 8, device=dev)
    gx = torch.randn_like(x)
    step = torch.compile(lambda adv: A.pgd_step_(adv, x, gx, 0.03, 0.05, backend="triton"), fullgraph=True)
    a, b = x.clone(), x.clone()
    step(a)
    A.pgd_step_(b, x, gx, 0.03, 0.05, backend="triton")
    assert torch.equal(a, b)
    model = Emb().to(dev)
    ids = torch.tensor([[1, 2, 2], [5, 1, 0]], device=dev)
    _grads(model, ids)
    wt = model.word_embeddings.weight
    eager_model = copy.deepcopy(model)
    st = F.fgm_attack_(eager_model.word_embeddings.weight, eager_model.word_embeddings.weight.grad, 0.5,
                       backend="triton")
    expected = eager_model.word_embeddings.weight.detach().clone()
    F.fgm_restore_(st)
    fgm = torch.compile(lambda: (F.fgm_attack_(wt, wt.grad, 0.5, backend="triton"), wt * 1.0), fullgraph=True)
    state, got = fgm()
    torch.testing.assert_close(got, expected, **FP32)
    F.fgm_restore_(state)
    assert torch.equal(wt, eager_model.word_embeddings.weight)


def test_import_fastadv_loads_neither_dynamo_nor_triton():
    """The twins are registered lazily: importing fastadv stays light."""
    import subprocess
    import sys
    code = ("import sys, fastadv; "
            "print(sorted(m for m in ('triton', 'torch._dynamo', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_constant_result_mark_is_torchs():
    """_registry marks _traced_name as torch.compiler.assume_constant_result
    does, without importing Dynamo; this fails if torch changes the mark."""
    def f():
        return 1
    torch.compiler.assume_constant_result(f)
    marks = [k for k in vars(f) if k.startswith("_dynamo")]
    assert marks == ["_dynamo_marked_constant"]
    assert getattr(_registry._traced_name, marks[0]) is True
