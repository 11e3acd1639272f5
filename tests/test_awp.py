"""fastadv.AWP against the seed reference, on every backend available here,
and the multi-tensor machinery it runs on."""
import copy
import ctypes

import pytest
import torch
from torch import nn

import fastadv.kernels as kernels
from fastadv.adversarial.awp import AWP
from fastadv.bench.count import count
from fastadv.kernels.host import TableCache, TensorTable
from fastadv.ops._live import StorageMoved
from fastadv.ops.awp import awp_step_, design_bytes
from fastadv.ops.multi_tensor import copy_tensors_
from fastadv.reference import AWP as RefAWP

from conftest import DEVICE, record_guards

FP32 = dict(rtol=1e-5, atol=1e-6)
KERNEL_BACKENDS = ("triton", "cuda")


class TinyHF(nn.Module):
    """HF-style: ``model(input_ids=, attention_mask=, labels=)`` returns
    ``(per-sample loss, logits)``; matching ``*weight*``: embeddings, linears,
    LayerNorms."""

    def __init__(self, vocab=61, dim=12, classes=4, layers=2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask, labels):
        h = self.word_embeddings(input_ids) * attention_mask.unsqueeze(-1)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        logits = self.classifier(self.norm(h).mean(1))
        return nn.functional.cross_entropy(logits, labels, reduction="none"), logits


def batch(vocab=61, b=3, t=5):
    ids = torch.randint(0, vocab, (b, t), device=DEVICE)
    mask = torch.ones(b, t, device=DEVICE)
    mask[0, -2:] = 0
    return ids, torch.randint(0, 4, (b,), device=DEVICE), mask


def twins(**kw):
    model = TinyHF(**kw).to(DEVICE)
    return model, copy.deepcopy(model)


def clean_backward(model, ids, labels, mask):
    model(input_ids=ids, attention_mask=mask, labels=labels)[0].mean().backward()


def assert_models(a, b, exact=False, grads=True):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        if exact:
            assert torch.equal(pa, pb), na
        else:
            torch.testing.assert_close(pa, pb, **FP32, msg=na)
        if grads and (pa.grad is not None or pb.grad is not None):
            torch.testing.assert_close(pa.grad, pb.grad, **FP32, msg=f"grad {na}")


def ptrs(model):
    return [p.data_ptr() for p in model.parameters()]


# -- the seed's protocol ------------------------------------------------------
@pytest.mark.parametrize("adv_step", [1, 2])
@pytest.mark.parametrize("adv_eps", [1e-3, 10.0], ids=["clamp-active", "clamp-inactive"])
def test_attack_backward_matches_seed(backend, adv_step, adv_eps):
    model, ref_model = twins()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    awp = AWP(model, opt, adv_lr=0.5, adv_eps=adv_eps, adv_step=adv_step, backend=backend)
    ref = RefAWP(ref_model, ref_opt, adv_lr=0.5, adv_eps=adv_eps, adv_step=adv_step)
    before = ptrs(model)
    for _ in range(2):  # two training steps: the backup buffer and tables are reused
        ids, labels, mask = batch()
        snapshot = [p.detach().clone() for p in model.parameters()]
        for m, a in ((model, awp), (ref_model, ref)):
            clean_backward(m, ids, labels, mask)
            assert a.attack_backward(ids, labels, mask, 0) is None
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), snapshot))  # restored bit for bit
        assert_models(model, ref_model)  # adversarial gradients of the same perturbation
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert ptrs(model) == before
    assert awp.backup == {} and awp.backup_eps == {}


def test_start_epoch_and_zero_lr_skip(backend):
    model = TinyHF().to(DEVICE)
    ids, labels, mask = batch()
    clean_backward(model, ids, labels, mask)
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    calls = []

    class Opt:
        def zero_grad(self):
            calls.append(1)

    AWP(model, Opt(), start_epoch=2, backend=backend).attack_backward(ids, labels, mask, 1)
    AWP(model, Opt(), adv_lr=0, backend=backend).attack_backward(ids, labels, mask, 5)
    assert not calls
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    AWP(model, Opt(), start_epoch=2, backend=backend).attack_backward(ids, labels, mask, 2)
    assert calls == [1]


def give_grads(*models, scale=1.0):
    gen = torch.Generator().manual_seed(len(list(models[0].parameters())))
    for ps in zip(*(m.parameters() for m in models)):
        g = torch.randn(ps[0].shape, generator=gen).mul_(scale).to(DEVICE, ps[0].dtype)
        for p in ps:
            p.grad = g.clone().to(p.dtype)


@pytest.mark.parametrize("adv_eps", [1e-3, 100.0], ids=["clamp-active", "clamp-inactive"])
def test_step_math_over_two_steps(backend, adv_eps):
    """_save, two _attack_steps with new gradients, _restore: the weights after
    each step are the seed's, the clamp really (not) binding."""
    model, ref_model = twins()
    awp = AWP(model, None, adv_lr=0.7, adv_eps=adv_eps, backend=backend)
    ref = RefAWP(ref_model, None, adv_lr=0.7, adv_eps=adv_eps)
    w0 = [p.detach().clone() for p in model.parameters()]
    give_grads(model, ref_model)
    awp._save()
    ref._save()
    for step in range(2):
        if step:
            give_grads(model, ref_model, scale=3.0)
        awp._attack_step()
        ref._attack_step()
        assert_models(model, ref_model, grads=False)
        w, w0_ = model.layers[0].weight.detach(), w0[1]
        at_bound = ((w == w0_ - adv_eps * w0_.abs()) | (w == w0_ + adv_eps * w0_.abs())).float().mean()
        assert at_bound == 1 if adv_eps < 1 else at_bound < 0.1  # the clamp binds everywhere / hardly
    assert set(awp.backup) == set(ref.backup)
    awp._restore()
    ref._restore()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    assert_models(model, ref_model, exact=True, grads=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf / inf
@pytest.mark.parametrize("kind", ["zero", "nan", "inf"])
def test_special_gradients(backend, kind):
    """A tensor whose ||g|| is 0 or NaN is left untouched (decided on the
    device); an inf norm is applied as the seed does."""
    model, ref_model = twins()
    give_grads(model, ref_model)
    special = {"zero": 0.0, "nan": float("nan"), "inf": float("inf")}[kind]
    for m in (model, ref_model):
        with torch.no_grad():
            m.layers[1].weight[0, 1] = -0.0  # w + 0 would turn it into +0.0: the skip is visible
        m.layers[1].weight.grad[0, 0] = special
        if kind == "zero":
            m.layers[1].weight.grad.zero_()
    w_before = model.layers[1].weight.detach().clone()
    other_before = model.layers[0].weight.detach().clone()
    awp = AWP(model, None, adv_eps=0.05, backend=backend)
    ref = RefAWP(ref_model, None, adv_eps=0.05)
    awp._save(), ref._save()
    awp._attack_step(), ref._attack_step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, **FP32, equal_nan=True, msg=n)
    if kind != "inf":
        assert torch.equal(model.layers[1].weight.view(torch.int32), w_before.view(torch.int32))
    assert not torch.equal(model.layers[0].weight, other_before)  # the others are perturbed
    awp._restore()
    assert torch.equal(model.layers[1].weight, w_before)


def test_none_grads_are_skipped(backend):
    model, ref_model = twins()
    give_grads(model, ref_model)
    for m in (model, ref_model):
        m.layers[0].weight.grad = None
        m.norm.weight.grad = None
    untouched = model.layers[0].weight.detach().clone()
    awp, ref = AWP(model, None, adv_eps=0.1, backend=backend), RefAWP(ref_model, None, adv_eps=0.1)
    awp._save(), ref._save()
    awp._attack_step(), ref._attack_step()
    assert_models(model, ref_model, grads=False)
    assert torch.equal(model.layers[0].weight, untouched)
    assert "layers.0.weight" not in awp.backup and "norm.weight" not in awp.backup
    awp._restore()


def test_resave_and_gradients_that_come_and_go(backend):
    """The seed's _save only adds names not yet saved; a saved tensor without a
    gradient at a step is skipped; everything comes back on _restore."""
    model, ref_model = twins()
    give_grads(model, ref_model)
    before = [p.detach().clone() for p in model.parameters()]
    for m in (model, ref_model):
        m.layers[1].weight.grad = None
    awp, ref = AWP(model, None, adv_eps=0.1, backend=backend), RefAWP(ref_model, None, adv_eps=0.1)
    for a in (awp, ref):
        a._save()
    for m in (model, ref_model):  # a saved tensor loses its gradient before the first step
        m.layers[0].weight.grad = None
    for a in (awp, ref):
        a._attack_step()
    assert_models(model, ref_model, grads=False)
    give_grads(model, ref_model, scale=2.0)  # now every tensor has one: save the new name, step again
    for a in (awp, ref):
        a._save()
        a._attack_step()
    assert_models(model, ref_model, grads=False)
    assert set(awp.backup) == set(ref.backup)
    awp._restore()
    ref._restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert_models(model, ref_model, exact=True, grads=False)


@pytest.mark.launch_free
def test_gaining_a_gradient_after_save_is_an_error(backend):
    model = TinyHF().to(DEVICE)
    give_grads(model)
    model.layers[0].weight.grad = None
    awp = AWP(model, None, backend=backend)
    awp._save()
    model.layers[0].weight.grad = torch.ones_like(model.layers[0].weight)
    with pytest.raises(RuntimeError, match="layers.0.weight"):
        awp._attack_step()


def _fp32_twin(model):
    ref = copy.deepcopy(model).float()
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.float()
    return ref


@pytest.mark.parametrize("low", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_mixed_dtypes(backend, low):
    """fp32 and low-precision tensors in one model: one launch per dtype group;
    low precision matches the fp32 reference rounded once (within an ulp or two)."""
    model = TinyHF().to(DEVICE)
    model.layers.to(low)
    model.word_embeddings.to(low)
    give_grads(model)
    ref_model = _fp32_twin(model)
    w0 = [p.detach().clone() for p in model.parameters()]
    awp = AWP(model, None, adv_lr=0.3, adv_eps=0.02, backend=backend)
    ref = RefAWP(ref_model, None, adv_lr=0.3, adv_eps=0.02)
    before = dict(kernels.LAUNCHES)
    awp._save(), ref._save()
    awp._attack_step(), ref._attack_step()
    launched = {k: v - before.get(k, 0) for k, v in kernels.LAUNCHES.items() if v - before.get(k, 0)}
    if backend in KERNEL_BACKENDS:
        assert launched[f"{backend}.awp_update"] == 2  # one per dtype group
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[low]
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if p.dtype == torch.float32:
            torch.testing.assert_close(p, q, **FP32, msg=n)
        else:
            torch.testing.assert_close(p.float(), q, rtol=2 * ulp, atol=1e-5, msg=n)
    awp._restore()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


class ManyTensors(nn.Module):
    """> 100 matching tensors of odd sizes, one empty, one spanning several chunks."""

    def __init__(self):
        super().__init__()
        sizes = [(i % 7 + 1, i % 5 + 2) for i in range(110)] + [(0,), (70001,), (3, 1, 5)]
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s)) for s in sizes)


def test_many_tensors(backend):
    model = ManyTensors().to(DEVICE)
    give_grads(model)
    ref_model = copy.deepcopy(model)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        q.grad = p.grad.clone()
    awp = AWP(model, None, adv_param="weights", adv_eps=0.01, backend=backend)
    ref = RefAWP(ref_model, None, adv_param="weights", adv_eps=0.01)
    for a in (awp, ref):
        a._save()
        a._attack_step()
    assert_models(model, ref_model, grads=False)
    w0 = [p.detach() for p in copy.deepcopy(ref_model).parameters()]
    ref._restore()
    awp._restore()
    assert_models(model, ref_model, exact=True, grads=False)
    assert len(w0) > 100


def test_restore_is_bit_exact_in_place(backend):
    model = TinyHF().to(DEVICE)
    with torch.no_grad():
        model.layers[0].weight[0, :3] = torch.tensor([-0.0, 1e-40, -1e15])
    give_grads(model)
    before = [p.detach().clone() for p in model.parameters()]
    addresses = ptrs(model)
    awp = AWP(model, None, adv_eps=0.5, backend=backend)
    with awp.perturbed():
        assert not torch.equal(model.layers[0].weight, before[1])
    assert ptrs(model) == addresses
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.view(torch.int32 if p.dtype == torch.float32 else torch.int16),
                           b.view(torch.int32 if b.dtype == torch.float32 else torch.int16))


# -- the model-agnostic form -----------------------------------------------------
def test_closure_form_matches_seed_form(backend):
    """The closure form gives the seed's seed-form result."""
    model, ref_model = twins()
    ids, labels, mask = batch()
    clean_backward(model, ids, labels, mask)
    clean_backward(ref_model, ids, labels, mask)
    opt, opt2 = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref_model.parameters(), lr=0.1)
    loss = AWP(model, opt, adv_step=2, backend=backend).attack_backward(
        closure=lambda: model(input_ids=ids, attention_mask=mask, labels=labels)[0], epoch=0)
    RefAWP(ref_model, opt2, adv_step=2).attack_backward(ids, labels, mask, 0)
    assert loss.shape == () and not loss.requires_grad
    assert_models(model, ref_model)


def test_perturb_restore_by_hand_and_on_exception(backend):
    model, ref_model = twins()
    ids, labels, mask = batch()
    for m in (model, ref_model):
        clean_backward(m, ids, labels, mask)
    before = [p.detach().clone() for p in model.parameters()]
    awp = AWP(model, None, adv_eps=0.1, backend=backend)
    ref = RefAWP(ref_model, None, adv_eps=0.1)
    awp.perturb()
    ref._save()
    ref._attack_step()
    assert_models(model, ref_model, grads=False)
    awp.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="without a preceding perturb"):
        awp.restore()
    with pytest.raises(ZeroDivisionError):
        with awp.perturbed():
            1 / 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    def failing_closure():
        raise ValueError("forward failed")

    with pytest.raises(ValueError, match="forward failed"):
        awp.attack_backward(closure=failing_closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_scaler_scales_the_adversarial_loss(backend):
    class TimesFour:
        def scale(self, loss):
            return loss * 4

    model, ref_model = twins()
    ids, labels, mask = batch()
    for m in (model, ref_model):
        clean_backward(m, ids, labels, mask)
    AWP(model, torch.optim.SGD(model.parameters(), lr=1), scaler=TimesFour(),
        backend=backend).attack_backward(ids, labels, mask, 0)
    RefAWP(ref_model, torch.optim.SGD(ref_model.parameters(), lr=1),
           scaler=TimesFour()).attack_backward(ids, labels, mask, 0)
    assert_models(model, ref_model)


def test_arguments_are_checked():
    model = TinyHF()
    with pytest.raises(TypeError, match="nn.Module"):
        AWP(object(), None)
    with pytest.raises(ValueError, match="adv_eps"):
        AWP(model, None, adv_eps=-1)
    with pytest.raises(ValueError, match="adv_step"):
        AWP(model, None, adv_step=-1)
    with pytest.raises(ValueError, match="unknown fastadv backend"):
        AWP(model, None, backend="fastest")
    with pytest.raises(TypeError, match="closure"):
        AWP(model, None).attack_backward()


@pytest.mark.launch_free
def test_forced_kernel_backend_rejects_float64(backend):
    if backend == "torch":
        pytest.skip("the torch backend takes any float dtype")
    w = [torch.randn(5, dtype=torch.float64, device=DEVICE)]
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        awp_step_(w, [torch.randn_like(w[0])], [torch.empty_like(w[0])], adv_lr=1, adv_eps=0.1,
                  write_backup=True, backend=backend)


def test_auto_backend_takes_float64_on_the_torch_path():
    model, ref_model = twins()
    model.double(), ref_model.double()
    give_grads(model, ref_model)
    awp, ref = AWP(model, None, backend="auto"), RefAWP(ref_model, None)
    awp._save(), ref._save()
    awp._attack_step(), ref._attack_step()
    assert_models(model, ref_model, grads=False)


# -- structure: syncs, launches, tables ---------------------------------------------
def test_attack_step_makes_no_host_sync(backend, no_host_sync):
    model = TinyHF().to(DEVICE)
    give_grads(model)
    awp = AWP(model, None, backend=backend)
    with no_host_sync():
        for _ in range(2):
            awp._save()
            awp._attack_step()
            awp._attack_step()
            awp._restore()


def test_sync_detector_sees_the_seed(no_host_sync):
    model = TinyHF().to(DEVICE)
    give_grads(model)
    ref = RefAWP(model, None)
    ref._save()
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_sync():
            ref._attack_step()


def _launches(layers, backend):
    model = TinyHF(layers=layers).to(DEVICE)
    give_grads(model)
    awp = AWP(model, None, adv_eps=0.1, backend=backend)

    def attack():
        awp._save()
        awp._attack_step()
        awp._attack_step()
        awp._restore()

    attack()  # tables built, backup buffer allocated
    return count(attack)


def test_launches_do_not_grow_with_depth(backend):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("the torch fallback launches per tensor")
    shallow, deep = _launches(2, backend), _launches(24, backend)
    assert shallow["launches"] == deep["launches"] == 7  # 2 x (sumsq + norms + update) + restore
    assert shallow["aten_launches"] == deep["aten_launches"] == 0
    assert shallow["syncs"] == deep["syncs"] == 0


def test_tables_are_immutable_and_keyed_by_the_live_addresses():
    cache = TableCache()
    a = [torch.randn(5), torch.randn(40)]
    b = [torch.randn(5), torch.randn(40)]
    t1 = cache.get("x", [a, b], chunk=16)
    assert (t1.n_tensors, t1.n_chunks, t1.n_lists) == (2, 4, 2)
    layout = t1.data.tolist()
    assert layout[:4] == [a[0].data_ptr(), a[1].data_ptr(), b[0].data_ptr(), b[1].data_ptr()]
    assert layout[4:] == [5, 40] + [0, 1, 4] + [0, 1, 1, 1]
    stats = count(lambda: cache.get("x", [a, b], chunk=16))
    assert stats["launches"] == 0 and stats["ops"] == {}  # the same tensors: the same table, nothing sent
    c = [torch.randn(5), torch.randn(40)]
    t2 = cache.get("x", [a, c], chunk=16)  # other addresses: another table ...
    assert t2 is not t1 and t2.data.tolist()[2:4] == [c[0].data_ptr(), c[1].data_ptr()]
    assert t1.data.tolist() == layout      # ... and the first one is never rewritten
    assert cache.get("x", [a, b], chunk=16) is t1
    assert cache.get("x", [a, c]) is not t2  # another chunk size: another table
    assert TensorTable.of([a, c], chunk=16).data.tolist() == t2.data.tolist()
    assert t2.matches([a, c]) and not t2.matches([a, b])
    with pytest.raises(ValueError, match="multiple of 16"):
        TensorTable([3], 1, "cpu", chunk=10)
    with pytest.raises(ValueError, match="one tensor per table entry"):
        cache.get("x", [a, b[:1]])


def test_equal_sizes_never_share_a_table():
    """Two buckets of equal sizes in one call get two tables, both valid until
    their kernels ran (the SAM bug of issue 14: one table re-pointed)."""
    cache = TableCache()
    x = [[torch.randn(7), torch.randn(33)] for _ in range(4)]
    tables = [cache.get("b", [lst]) for lst in x]
    assert len({id(t) for t in tables}) == 4
    for t, lst in zip(tables, x):
        assert t.data.tolist()[:2] == [u.data_ptr() for u in lst]
    small = TableCache(maxsize=2)
    kept = small.get("b", [x[0]])
    small.get("b", [x[1]]), small.get("b", [x[2]])  # evicts kept from the cache, not from its holder
    assert len(small) == 2 and kept.data.tolist()[:2] == [u.data_ptr() for u in x[0]]


def test_fresh_gradients_after_zero_grad(backend):
    """zero_grad(set_to_none=True) frees the gradients: the next step uses the new ones."""
    model, ref_model = twins()
    awp, ref = AWP(model, None, adv_eps=0.1, backend=backend), RefAWP(ref_model, None, adv_eps=0.1)
    for _ in range(3):
        ids, labels, mask = batch()
        for m, a in ((model, awp), (ref_model, ref)):
            m.zero_grad(set_to_none=True)
            clean_backward(m, ids, labels, mask)
            a._save()
            a._attack_step()
        assert_models(model, ref_model, grads=False)
        awp._restore(), ref._restore()


def test_functional_copy_and_design_bytes(backend):
    src = [torch.randn(n, device=DEVICE) for n in (3, 0, 33)]
    dst = [torch.empty_like(s) for s in src]
    copy_tensors_(dst, src, backend=backend)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    assert design_bytes({4: 1000}) == 8 * 4000
    assert design_bytes({4: 1000, 2: 10}, steps=2) == 14 * 4000 + 14 * 20


def test_one_backup_copy_only(backend):
    model = TinyHF().to(DEVICE)
    give_grads(model)
    awp = AWP(model, None, backend=backend)
    awp._save()
    awp._attack_step()
    matching = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "weight" in n)
    assert matching <= awp._buffers.nbytes() <= matching + 16 * 4 * 10
    awp._restore()
    awp.release()
    assert awp._buffers.nbytes() == 0


# -- the CUDA library -------------------------------------------------------------
def _cuda_lib():
    import fastadv.kernels.cuda as fcuda
    import fastadv.kernels.cuda.awp  # noqa: F401  (declares the signatures)

    if fcuda.load_error() is not None:
        pytest.skip(f"CUDA library not usable: {fcuda.load_error()}")
    return fcuda.lib()


def test_cuda_library_exports_and_checks_arguments():
    lib = _cuda_lib()
    out = ctypes.c_float()
    for name in ("fastadv_mt_sumsq", "fastadv_mt_norms", "fastadv_mt_global_norm", "fastadv_awp_update",
                 "fastadv_sam_update", "fastadv_mt_lerp", "fastadv_mt_copy"):
        assert hasattr(lib, name), name
    assert lib.fastadv_mt_sumsq(None, 3, 1, 1, 10, 0, 0, None, None) == 1
    assert b"multiple of 16" in lib.fastadv_last_error()
    assert lib.fastadv_mt_sumsq(None, 3, 1, 1, 16, 0, 0, None, None) == 1
    assert b"table is NULL" in lib.fastadv_last_error()
    assert lib.fastadv_awp_update(None, 0, 0, 16, 0, None, 1.0, 0.1, 1, None) == 1
    assert b"norms is NULL" in lib.fastadv_last_error()
    assert lib.fastadv_mt_copy(None, 2, 0, 0, 16, 0, 0, 2, 0, None) == 1
    assert b"out of range" in lib.fastadv_last_error()
    # nothing to do: success without a launch
    assert lib.fastadv_awp_update(None, 0, 0, 16, 0, ctypes.addressof(out), 1.0, 0.1, 1, None) == 0
    assert lib.fastadv_mt_lerp(None, 0, 0, 16, 0, 2, 0.5, None, None) == 0
    assert lib.fastadv_mt_sumsq(None, 3, 0, 0, 16, 1, 0, None, None) == 0
    assert lib.fastadv_mt_sumsq(None, 3, 0, 0, 16, 7, 0, None, None) == 0  # no work: no dtype check


# -- GPU ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("steps", [1, 2])
def test_gpu_kernels_match_the_seed_under_sync_debug(backend, steps, no_host_sync):
    """bf16 + fp32 model of BERT-like shapes against the seed run in fp32 on
    the same values (bf16: two ulps); no sync at all
    (torch.cuda.set_sync_debug_mode('error'))."""
    torch.manual_seed(1)
    model = TinyHF(vocab=30522, dim=256, layers=4).cuda()
    model.layers.to(torch.bfloat16)
    give_grads(model)
    ref_model = _fp32_twin(model)
    awp = AWP(model, None, adv_lr=0.5, adv_eps=0.01, backend=backend)
    ref = RefAWP(ref_model, None, adv_lr=0.5, adv_eps=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    awp._save(), ref._save()
    for s in range(steps):
        with no_host_sync():
            awp._attack_step()
        ref._attack_step()
        for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            tol = FP32 if p.dtype == torch.float32 else dict(rtol=2 * 2**-7, atol=1e-5)
            torch.testing.assert_close(p.float(), q, **tol, msg=n)
    with no_host_sync():
        awp._restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- device guard, vector access -------------------------------------------------


def test_kernel_launches_run_under_the_device_guard(backend, monkeypatch):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("kernel backends only")
    import fastadv.ops.awp as ops_awp
    import fastadv.ops.multi_tensor as ops_mt
    seen = [record_guards(monkeypatch, m) for m in (ops_awp, ops_mt)]
    ws = [torch.randn(n, device=DEVICE) for n in (3, 50)]
    gs, bs = [torch.randn_like(w) for w in ws], [torch.empty_like(w) for w in ws]
    before = sum(kernels.LAUNCHES.values())
    awp_step_(ws, gs, bs, adv_lr=0.1, adv_eps=0.01, write_backup=True, backend=backend)
    copy_tensors_(ws, bs, backend=backend)
    total = sum(kernels.LAUNCHES.values()) - before
    assert total > 0 and sum(s["inside"] for s in seen) == total
    assert all(s["devices"] and all(d == ws[0].device for d in s["devices"]) for s in seen)


SIZES = (2048, 4101, 32768 + 2048 + 3, 1)  # whole blocks only; blocks + tail; two chunks; tail only


def _tensors(n, odd, dtype=torch.float32):
    """A tensor of ``n`` elements; ``odd``: at an address that is not a multiple of 16 bytes."""
    if odd:
        t = torch.randn(n + 1, device=DEVICE, dtype=dtype)[1:]
    else:
        t = torch.randn(n, device=DEVICE, dtype=dtype)
    assert (t.data_ptr() % 16 != 0) == odd
    return t


def awp_formula(w, g, w0, lr, eps):
    """The seed's step on one bare tensor (fp32 torch)."""
    gn, wn = torch.norm(g), torch.norm(w)
    if gn != 0 and not torch.isnan(gn):
        w = w + lr * g / (gn + 1e-6) * (wn + 1e-6)
        w = torch.min(torch.max(w, w0 - eps * w0.abs()), w0 + eps * w0.abs())
    return w


@pytest.mark.parametrize("odd", [False, True], ids=["aligned", "odd-address"])
def test_blocks_tails_and_alignment_match_the_seed_math(backend, odd):
    from fastadv.kernels.host import shared_tables
    ws = [_tensors(n, odd) for n in SIZES]
    gs = [_tensors(n, odd) for n in SIZES]
    bs = [_tensors(n, odd) for n in SIZES]
    w0 = [w.clone() for w in ws]
    expect = [w.clone() for w in ws]
    cache = shared_tables()
    cache.clear()
    for first in (True, False):
        awp_step_(ws, gs, bs, adv_lr=0.3, adv_eps=0.05, write_backup=first, backend=backend)
        expect = [awp_formula(e, g, b, 0.3, 0.05) for e, g, b in zip(expect, gs, w0)]
        for a, b in zip(ws, expect):
            torch.testing.assert_close(a, b, **FP32)
    assert all(torch.equal(b, w) for b, w in zip(bs, w0))
    if backend != "torch":
        tables = list(cache._tables.values())
        assert tables and all(t.aligned == (not odd) for t in tables)
    copy_tensors_(ws, bs, backend=backend)
    assert all(torch.equal(w, b) for w, b in zip(ws, w0))


# -- storage moved between attack and restore (issue 14) --------------------------------------

MOVES = {
    "double-float": lambda m: m.double().float(),
    "to-with-copy": lambda m: m.to(torch.float64).to(torch.float32),
    "assign": lambda m: m.load_state_dict(copy.deepcopy(m.state_dict()), assign=True),
}


@pytest.mark.parametrize("move", MOVES)
def test_restore_follows_storage_moved_since_the_attack(backend, move):
    """User code reallocates the weights between attack and restore: the
    model's parameters of those names, where they live now, get the original
    bits back (as the seed's _restore, which rebinds by name)."""
    model, ref_model = twins()
    give_grads(model, ref_model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_ptrs = ptrs(model)
    awp = AWP(model, None, adv_eps=0.1, backend=backend)
    awp.perturb()
    MOVES[move](model)
    assert ptrs(model) != old_ptrs  # really moved
    new_ptrs = ptrs(model)
    awp.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, originals[n]), n
    assert ptrs(model) == new_ptrs  # written in place, where the parameters live now


def test_attack_steps_follow_storage_moved_between_them(backend):
    model, ref_model = twins()
    give_grads(model, ref_model)
    w0 = [p.detach().clone() for p in model.parameters()]
    awp = AWP(model, None, adv_lr=0.7, adv_eps=0.01, backend=backend)
    ref = RefAWP(ref_model, None, adv_lr=0.7, adv_eps=0.01)
    awp._save(), ref._save()
    awp._attack_step(), ref._attack_step()
    for m in (model, ref_model):
        m.double().float()  # new storage, same values; the gradients go along
    awp._attack_step(), ref._attack_step()
    assert_models(model, ref_model, grads=False)
    awp._restore(), ref._restore()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_restore_refuses_a_dtype_change_and_keeps_the_backup(backend):
    model = TinyHF().to(DEVICE)
    give_grads(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp = AWP(model, None, adv_eps=0.1, backend=backend)
    awp.perturb()
    model.half()
    seen = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(StorageMoved, match="word_embeddings.weight changed dtype from torch.float32 to "
                                           "torch.float16"):
        awp.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, seen[n]), n  # nothing written
    assert set(awp.backup) == {n for n in originals if "weight" in n}  # kept
    model.float()
    awp.restore()
    for n, p in model.named_parameters():  # the backed-up weights exactly (the rest went through fp16)
        assert torch.equal(p, originals[n] if "weight" in n else originals[n].half().float()), n
    with pytest.raises(RuntimeError, match="without a preceding perturb"):
        awp.restore()


def test_a_perturb_without_gradients_still_counts(backend):
    """perturb() finding no gradient perturbs nothing; its restore() is a no-op."""
    model = TinyHF().to(DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    awp = AWP(model, None, backend=backend)
    awp.perturb()
    awp.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    give_grads(model)
    with awp.perturbed():  # and the kernels run once there is one
        assert not torch.equal(model.layers[0].weight, before[1])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- torch.library registration and torch.compile ---------------------------------------------

def test_opcheck(backend):
    """Schema (mutations declared), fake tensor and AOT dispatch of ``fastadv::awp_step_``
    and of the multi-tensor copy every restore uses, on mixed sizes and dtypes."""
    from fastadv.ops.awp import awp_step_op
    from fastadv.ops.multi_tensor import mt_copy_op
    dtypes = (torch.float32, torch.float64) if backend == "torch" else (torch.float32,)
    for dtype in dtypes:
        ws = [torch.randn(5, 3, device=DEVICE, dtype=dtype), torch.randn(7, device=DEVICE, dtype=dtype)]
        gs = [torch.randn_like(w) for w in ws]
        gs[1].zero_()  # a tensor the step skips
        for first in (True, False):
            bs = [w.clone() for w in ws]
            torch.library.opcheck(awp_step_op.overload, ([w.clone() for w in ws], gs, bs, 0.3, 0.05, first,
                                                         backend))
        torch.library.opcheck(mt_copy_op.overload, ([torch.empty_like(w) for w in ws], ws, backend))


def test_registered():
    assert {"awp_step_", "mt_copy_"} <= set(dir(torch.ops.fastadv))


def _compiled_awp_step(model, awp):
    def loss_of(ids, labels, mask):
        return model(input_ids=ids, attention_mask=mask, labels=labels)[0]

    def step(ids, labels, mask):
        loss = loss_of(ids, labels, mask).mean()
        loss.backward()
        awp.perturb()                                    # by hand ...
        model.zero_grad()
        loss_of(ids, labels, mask).mean().backward()
        awp.restore()
        adv = awp.attack_backward(closure=lambda: loss_of(ids, labels, mask))  # ... and the closure form
        return loss.detach(), adv
    return step


def test_compiled_training_step_has_no_graph_break(backend):
    """perturb / restore and attack_backward under torch.compile(fullgraph=True)
    equal eager.  The AWP's ``optimizer`` is the model: attack_backward calls
    its ``zero_grad()``, and dynamo refuses to trace ``torch.optim.Optimizer.zero_grad``."""
    torch._dynamo.reset()
    model, ref_model = twins()
    awp = AWP(model, model, adv_lr=0.5, adv_eps=0.01, backend=backend)
    ref = AWP(ref_model, ref_model, adv_lr=0.5, adv_eps=0.01, backend=backend)
    step, ref_step = _compiled_awp_step(model, awp), _compiled_awp_step(ref_model, ref)
    ids, labels, mask = batch()
    for s in (step, ref_step):  # the backup buffer is made on the first call (eager, once)
        s(ids, labels, mask)
    model.zero_grad(), ref_model.zero_grad()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True)
        for _ in range(2):
            ids, labels, mask = batch()
            got = compiled(ids, labels, mask)
            expect = ref_step(ids, labels, mask)
            for a, b in zip(got, expect):
                torch.testing.assert_close(a, b, **FP32)
            assert_models(model, ref_model)
            model.zero_grad(), ref_model.zero_grad()
