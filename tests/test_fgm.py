"""fastadv.FGM against the seed reference, on every backend available here."""
import collections
import copy

import pytest
import torch
from torch import nn

import fastadv
from fastadv import BackendUnavailable, _backend
from fastadv.ops._live import StorageMoved
from fastadv.ops.fgm import design_bytes, fgm_attack_, fgm_restore_
from fastadv.reference import FGM as RefFGM

import odd_models
from conftest import DEVICE

FP32 = dict(rtol=1e-5, atol=1e-6)


class TinyLM(nn.Module):
    """word_embeddings -> tanh -> linear head; optionally a tied LM head."""

    def __init__(self, vocab=97, dim=12, classes=5, tied=False, extra_table=False):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)
        self.lm_head = nn.Linear(dim, vocab, bias=False) if tied else None
        if tied:
            self.lm_head.weight = self.word_embeddings.weight
        self.pos_word_embeddings = nn.Embedding(16, dim) if extra_table else None

    def forward(self, ids, labels):
        h = torch.tanh(self.proj(self.word_embeddings(ids)))
        if self.pos_word_embeddings is not None:
            h = h + self.pos_word_embeddings(torch.arange(ids.shape[1], device=ids.device))
        loss = nn.functional.cross_entropy(self.head(h.mean(1)), labels)
        if self.lm_head is not None:
            loss = loss + nn.functional.cross_entropy(self.lm_head(h).flatten(0, 1), ids.flatten())
        return loss


def twins(**kw):
    model = TinyLM(**kw).to(DEVICE)
    return model, copy.deepcopy(model)


def batch(vocab=97, b=3, t=7):
    return (torch.randint(0, vocab, (b, t), device=DEVICE),
            torch.randint(0, 5, (b,), device=DEVICE))


def assert_weights(a, b, exact=False):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        if exact:
            assert torch.equal(pa, pb), na
        else:
            torch.testing.assert_close(pa, pb, **FP32, msg=na)


def assert_params(a, b, exact=False):
    """The weights and the gradients of ``a`` and ``b``."""
    assert_weights(a, b, exact)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None or pb.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, **FP32, msg=f"grad {na}")


# -- the seed's training loop, verbatim ------------------------------------
@pytest.mark.parametrize("row_sparse", ["auto", False])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("extra_table", [False, True])
def test_seed_training_loop(backend, row_sparse, tied, extra_table):
    model, ref_model = twins(tied=tied, extra_table=extra_table)
    fgm = fastadv.FGM(model, emb_name="word_embeddings.", epsilon=0.7, backend=backend,
                      row_sparse=row_sparse)
    ref = RefFGM(ref_model, emb_name="word_embeddings.", epsilon=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(3):
        ids, labels = batch()
        for m, f, o in ((model, fgm, opt), (ref_model, ref, ref_opt)):
            m(ids, labels).backward()
            f.attack()
            m(ids, labels).backward()
            f.restore()
        assert_params(model, ref_model)
        opt.step()
        ref_opt.step()
        model.zero_grad()
        ref_model.zero_grad()
        assert_params(model, ref_model)


def test_zero_grad_in_place_and_accumulation(backend):
    """set_to_none=False and two micro-batches per step: the grad holds rows
    of both batches, and stale marked rows must not break anything."""
    model, ref_model = twins()
    fgm = fastadv.FGM(model, epsilon=1.0, backend=backend)
    ref = RefFGM(ref_model, epsilon=1.0)
    for _ in range(3):
        for _micro in range(2):
            ids, labels = batch()
            for m, f in ((model, fgm), (ref_model, ref)):
                m(ids, labels).backward()
                f.attack()
                m(ids, labels).backward()
                f.restore()
        assert_params(model, ref_model)
        model.zero_grad(set_to_none=False)
        ref_model.zero_grad(set_to_none=False)


def test_constructed_after_backward(backend):
    """Rows looked up before FGM existed are unknown: the whole table counts."""
    model, ref_model = twins()
    ids, labels = batch()
    model(ids, labels).backward()
    ref_model(ids, labels).backward()
    fgm, ref = fastadv.FGM(model, backend=backend), RefFGM(ref_model)
    fgm.attack()
    ref.attack()
    assert_params(model, ref_model)


def test_constructed_between_forward_and_backward(backend):
    """The forward ran before tracking started: its rows are unknown too."""
    model, ref_model = twins()
    ids, labels = batch()
    loss, ref_loss = model(ids, labels), ref_model(ids, labels)
    fgm, ref = fastadv.FGM(model, backend=backend), RefFGM(ref_model)
    loss.backward()
    ref_loss.backward()
    fgm.attack()
    ref.attack()
    assert_params(model, ref_model)


class TwoLookups(nn.Module):
    """One table read twice before the backward (shared encoder/decoder
    embeddings, sentence pairs), the second time with a keyword argument."""

    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, a, b):
        left = self.head(self.word_embeddings(a)).sum()
        right = self.head(self.word_embeddings(input=b)).sum()
        return (left + right) ** 2


def test_table_looked_up_twice_before_backward(backend):
    model = TwoLookups().to(DEVICE)
    ref_model = copy.deepcopy(model)
    fgm, ref = fastadv.FGM(model, backend=backend), RefFGM(ref_model)
    a = torch.tensor([[1, 2, 3]], device=DEVICE)
    b = torch.tensor([[10, 11, 12]], device=DEVICE)
    for _ in range(2):
        for m, f in ((model, fgm), (ref_model, ref)):
            m.zero_grad()
            m(a, b).backward()
            f.attack()
        assert_params(model, ref_model)
        fgm.restore()
        ref.restore()


# -- per-op results against the reference ----------------------------------
class Table(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.word_embeddings = nn.Parameter(w)


def attack_pair(w, g, backend, eps=1.0, **kw):
    """Attack a copy with fastadv and the reference in fp32; return both."""
    fast = Table(w.clone())
    fast.word_embeddings.grad = g.clone()
    ref = Table(w.clone().float())
    ref.word_embeddings.grad = g.clone().float()
    fgm = fastadv.FGM(fast, "word_embeddings", eps, backend=backend, **kw)
    fgm.attack()
    RefFGM(ref, "word_embeddings", eps).attack()
    return fgm, fast.word_embeddings.detach(), ref.word_embeddings.detach()


@pytest.mark.parametrize("shape", [(1,), (1, 1), (7, 3), (3, 4100), (5000,), (2, 3, 5), (0, 4)])
def test_odd_shapes(backend, shape):
    w = torch.randn(shape, device=DEVICE)
    g = torch.randn(shape, device=DEVICE)
    fgm, fast, ref = attack_pair(w, g, backend, eps=0.3)
    torch.testing.assert_close(fast, ref, **FP32)
    fgm.restore()
    assert torch.equal(fast, w)


@pytest.mark.parametrize("kind", ["zero", "nan", "inf", "neg_inf_and_nan"])
def test_special_gradients(backend, kind):
    w = torch.randn(6, 5, device=DEVICE)
    g = torch.randn(6, 5, device=DEVICE)
    if kind == "zero":
        g.zero_()
    elif kind == "nan":
        g[2, 3] = float("nan")
    elif kind == "inf":
        g[1, 1] = float("inf")
    else:
        g[0, 0], g[4, 4] = float("-inf"), float("nan")
    fgm, fast, ref = attack_pair(w, g, backend)
    torch.testing.assert_close(fast, ref, equal_nan=True, **FP32)
    if kind in ("zero", "nan", "neg_inf_and_nan"):  # norm 0 or NaN: untouched
        assert torch.equal(fast, w)
    fgm.restore()
    assert torch.equal(fast, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    if dtype is torch.bfloat16 and DEVICE.type == "cpu" and backend == "triton":
        pytest.skip("the Triton interpreter has no bf16 arithmetic (GPU test)")
    w = torch.randn(33, 17, device=DEVICE).to(dtype)
    g = torch.randn(33, 17, device=DEVICE).to(dtype)
    fgm, fast, ref = attack_pair(w, g, backend, eps=0.5)
    # fp32 math rounded once: within one ulp of the fp32 reference rounded once.
    assert fast.dtype == dtype
    expected = ref.to(dtype).float()
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((fast.float() - expected).abs() <= ulp).all()
    fgm.restore()
    assert torch.equal(fast, w)


def test_non_contiguous_grad(backend):
    w = torch.randn(8, 6, device=DEVICE)
    g = torch.randn(6, 8, device=DEVICE).t()
    assert not g.is_contiguous()
    fgm, fast, ref = attack_pair(w, g, backend)
    torch.testing.assert_close(fast, ref, **FP32)


def test_several_matching_tables_and_none_grad(backend):
    model = TinyLM(extra_table=True).to(DEVICE)
    model.frozen_word_embeddings = nn.Embedding(4, 12).to(DEVICE)  # matches, never used: grad None
    ref_model = copy.deepcopy(model)
    ids, labels = batch()
    model(ids, labels).backward()
    ref_model(ids, labels).backward()
    fgm = fastadv.FGM(model, "word_embeddings", 1.0, backend=backend)
    fgm.attack()
    assert set(fgm.backup) == {"word_embeddings.weight", "pos_word_embeddings.weight"}
    ref = RefFGM(ref_model, "word_embeddings", 1.0)
    for name, p in ref_model.named_parameters():  # the seed crashes on None grads
        if "word_embeddings" in name and p.grad is not None:
            norm = torch.norm(p.grad)
            ref.backup[name] = p.data.clone()
            p.data.add_(1.0 * p.grad / norm)
    assert_params(model, ref_model)


# -- row mode: rows found from the gradient, for every way a table is read ---
def seed_fgm_loop(model, fgm, ids, labels):
    model(ids, labels).backward()
    fgm.attack()
    model(ids, labels).backward()
    fgm.restore()


@pytest.mark.parametrize("row_sparse", ["auto", False])
@pytest.mark.parametrize("zoo", odd_models.ZOO, ids=lambda c: c.__name__)
def test_tables_read_outside_their_module(backend, zoo, row_sparse):
    """Tied head ``h @ W.t()``, ``F.embedding``, ``W[ids]``, DeBERTa's relative
    table read through ``.weight``, BART / OPT position subclasses: the seed's
    result after three training steps, weights and gradients."""
    model = zoo().to(DEVICE)
    ref_model = copy.deepcopy(model)
    fgm = fastadv.FGM(model, model.emb_name, 0.7, backend=backend, row_sparse=row_sparse)
    ref = RefFGM(ref_model, ref_model.emb_name, 0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(3):
        ids, labels = odd_models.batch()
        seed_fgm_loop(model, fgm, ids, labels)
        seed_fgm_loop(ref_model, ref, ids, labels)
        assert_params(model, ref_model)
        opt.step()
        ref_opt.step()
        model.zero_grad()
        ref_model.zero_grad()
    assert_params(model, ref_model)


def test_forward_before_zero_grad(backend):
    """A forward made before ``zero_grad()`` whose loss is backpropagated after it."""
    model, ref_model = twins()
    fgm, ref = fastadv.FGM(model, backend=backend), RefFGM(ref_model)
    for _ in range(2):
        ids, labels = batch()
        for m, f in ((model, fgm), (ref_model, ref)):
            loss = m(ids, labels)
            m.zero_grad()
            loss.backward()
            f.attack()
            m(ids, labels).backward()
            f.restore()
        assert_params(model, ref_model)


def test_no_hooks_on_user_modules():
    model = TinyLM()
    before = odd_models.hook_count(model)
    for _ in range(5):
        fastadv.FGM(model)
    assert odd_models.hook_count(model) == before == 0


def test_row_mode_touches_exactly_the_rows_with_gradient(backend):
    """The flags are the rows whose gradient holds a non-zero (or NaN) entry,
    whoever made it; other rows are neither perturbed nor backed up."""
    if backend == "torch":
        pytest.skip("the torch backend is dense by design")
    w = torch.randn(40, 6, device=DEVICE)
    g = torch.zeros(40, 6, device=DEVICE)
    g[3, 1], g[17] = 2.0, torch.randn(6, device=DEVICE)
    g[29, 5] = -1e-30  # tiny, square underflows: still a gradient row
    model = Table(w.clone())
    model.word_embeddings.grad = g
    fgm = fastadv.FGM(model, "word_embeddings", 1.0, backend=backend)
    fgm.attack()
    state = fgm.backup["word_embeddings"]
    assert state.rows.nonzero().flatten().tolist() == [3, 17, 29]
    changed = (model.word_embeddings.detach() != w).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {3, 17, 29} and {3, 17} <= set(changed)
    fgm.restore()
    assert torch.equal(model.word_embeddings.detach(), w)


# -- storage moved between attack and restore ----------------------------------
def _realloc_double_float(model):
    model.double().float()


def _realloc_to(model):
    model.to(torch.float64).to(torch.float32)


def _realloc_assign(model):
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)


REALLOCS = [_realloc_double_float, _realloc_to, _realloc_assign]


@pytest.mark.parametrize("realloc", REALLOCS, ids=lambda f: f.__name__[9:])
def test_restore_after_storage_moved(backend, realloc):
    """The restore goes into the parameters the model holds now, exactly."""
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    before = model.word_embeddings.weight.detach().clone()
    fgm = fastadv.FGM(model, backend=backend)
    fgm.attack()
    old = model.word_embeddings.weight.data  # kept alive: the new storage is elsewhere
    realloc(model)
    assert model.word_embeddings.weight.data_ptr() != old.data_ptr()
    fgm.restore()
    assert torch.equal(model.word_embeddings.weight.detach(), before)


def test_restore_after_dtype_change_raises_and_keeps_the_backup(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    before = model.word_embeddings.weight.detach().clone()
    fgm = fastadv.FGM(model, backend=backend)
    fgm.attack()
    model.half()
    with pytest.raises(StorageMoved, match=r"word_embeddings\.weight changed dtype from torch.float32 "
                                           r"to torch.float16"):
        fgm.restore()
    model.float()  # the round trip rounded every row; restore puts back what attack changed
    rows = fgm.backup["word_embeddings.weight"].rows
    fgm.restore()
    expected = before if rows is None else torch.where(rows.bool()[:, None], before, before.half().float())
    assert torch.equal(model.word_embeddings.weight.detach(), expected)


# -- frozen tables and attacks that perturb nothing --------------------------
def test_frozen_table_is_skipped_as_in_the_seed(backend):
    model = TinyLM().to(DEVICE)
    model.word_embeddings.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"only frozen parameters \['word_embeddings.weight'\]"):
        fgm = fastadv.FGM(model, backend=backend)
    ids, labels = batch()
    model(ids, labels).backward()
    before = model.word_embeddings.weight.detach().clone()
    with fgm.attacked():  # perturbs nothing, still an attack
        assert torch.equal(model.word_embeddings.weight, before)
    model.word_embeddings.weight.requires_grad_(True)  # unfrozen later: attacked from now on
    model.zero_grad()
    model(ids, labels).backward()
    fgm.attack()
    assert not torch.equal(model.word_embeddings.weight, before)
    fgm.restore()
    assert torch.equal(model.word_embeddings.weight, before)


def test_attack_without_gradient_counts_as_an_attack(backend):
    model = TinyLM().to(DEVICE)
    fgm = fastadv.FGM(model, backend=backend)
    fgm.attack()  # no backward yet: nothing to perturb
    with pytest.raises(RuntimeError, match="before restore"):
        fgm.attack()
    fgm.restore()
    with fgm.attacked():
        pass
    ids, labels = batch()
    model(ids, labels).backward()  # and a real attack afterwards
    seed_fgm_loop(model, fgm, ids, labels)


# -- protocol and data safety ------------------------------------------------
def test_restore_is_bit_exact_in_place(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    fgm = fastadv.FGM(model, backend=backend)
    p = model.word_embeddings.weight
    before, ptr = p.detach().clone(), p.data_ptr()
    fgm.attack()
    assert not torch.equal(p, before)
    assert p.data_ptr() == ptr
    fgm.restore()
    assert torch.equal(p, before) and p.data_ptr() == ptr


def test_attack_twice_refuses_and_keeps_original(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    before = model.word_embeddings.weight.detach().clone()
    fgm = fastadv.FGM(model, backend=backend)
    fgm.attack()
    with pytest.raises(RuntimeError, match="before restore"):
        fgm.attack()
    fgm.restore()
    assert torch.equal(model.word_embeddings.weight, before)


def test_restore_without_attack():
    fgm = fastadv.FGM(TinyLM())
    with pytest.raises(RuntimeError, match="without a preceding attack"):
        fgm.restore()


def test_unknown_emb_name_names_candidates():
    with pytest.raises(ValueError, match=r"word_embeddings\.weight"):
        fastadv.FGM(TinyLM(), emb_name="word_embedding_")


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_bad_epsilon(eps):
    with pytest.raises(ValueError, match="epsilon"):
        fastadv.FGM(TinyLM(), epsilon=eps)


def test_context_manager_restores_on_exception(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    before = model.word_embeddings.weight.detach().clone()
    fgm = fastadv.FGM(model, backend=backend)
    with pytest.raises(KeyError):
        with fgm.attacked():
            assert not torch.equal(model.word_embeddings.weight, before)
            raise KeyError("boom")
    assert torch.equal(model.word_embeddings.weight, before)
    assert not fgm.backup


def test_attack_variant_arguments(backend):
    model, ref_model = twins(extra_table=True)
    ids, labels = batch()
    model(ids, labels).backward()
    ref_model(ids, labels).backward()
    fgm = fastadv.FGM(model, "word_embeddings.", backend=backend)
    ref = RefFGM(ref_model, "word_embeddings.")
    fgm.attack(epsilon=0.25, emb_name="pos_word")
    ref.attack(epsilon=0.25, emb_name="pos_word")
    assert_params(model, ref_model)
    fgm.restore(emb_name="pos_word")
    ref.restore(emb_name="pos_word")
    assert_params(model, ref_model, exact=True)


def test_attack_makes_no_host_sync(backend, no_host_sync):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    fgm = fastadv.FGM(model, backend=backend)
    with no_host_sync():
        fgm.attack()
        fgm.restore()


def test_sync_detector_can_fail(no_host_sync):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_sync():
            RefFGM(model).attack()


# -- backends ----------------------------------------------------------------
def test_forcing_an_unusable_backend_is_a_clear_error():
    w = torch.randn(4, 4)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA tensors"):
            fgm_attack_(w, torch.randn(4, 4), 1.0, backend="cuda")
    with pytest.raises(ValueError, match="unknown fastadv backend"):
        fastadv.FGM(TinyLM(), backend="fastest")


def test_env_override(monkeypatch):
    monkeypatch.setenv("FASTADV_BACKEND", "torch")
    state = fgm_attack_(torch.randn(3, 3), torch.randn(3, 3), 1.0)
    assert state.backend == "torch"
    monkeypatch.setenv("FASTADV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTADV_BACKEND"):
        fgm_attack_(torch.randn(3, 3), torch.randn(3, 3), 1.0)


@pytest.mark.launch_free
def test_kernel_backend_rejects_float64_when_forced(backend):
    if backend == "torch":
        pytest.skip("the torch backend takes any float dtype")
    w = torch.randn(3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        fgm_attack_(w, torch.randn_like(w), 1.0, backend=backend)


def test_functional_dense_multi_block(backend):
    w = torch.randn(3 * 4096 + 5, device=DEVICE)
    g = torch.randn_like(w)
    ref = w + 0.3 * g / torch.norm(g)
    state = fgm_attack_(w, g, 0.3, backend=backend)
    torch.testing.assert_close(w, ref, **FP32)
    fgm_restore_(state)
    assert torch.equal(w, state.data)


def test_design_bytes():
    assert design_bytes(30522 * 768, 4) == 7 * 30522 * 768 * 4  # 656 MB vs the seed's 938
    sparse = design_bytes(30522 * 768, 4, touched_rows=100, cols=768)
    g_pass = 30522 * 768 * 4  # the norm reads all of g, then 6 passes over the touched rows
    assert sparse == g_pass + 6 * 100 * 768 * 4 + 3 * 30522


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_training_loop_under_sync_debug(backend, dtype, no_host_sync):
    """On a GPU: bf16 and fp32 tables, row-sparse and dense, no sync at all in
    attack + restore (torch.cuda.set_sync_debug_mode('error'))."""
    for row_sparse in ("auto", False):
        model = TinyLM(vocab=30522, dim=64).cuda().to(dtype)
        ref_model = copy.deepcopy(model).float()
        ids = torch.randint(0, 30522, (16, 32), device="cuda")
        labels = torch.randint(0, 5, (16,), device="cuda")
        model(ids, labels).backward()
        ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        for (_, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            q.grad = p.grad.float()
        fgm = fastadv.FGM(model, backend=backend, row_sparse=row_sparse)
        before = model.word_embeddings.weight.detach().clone()
        with no_host_sync():
            fgm.attack()
        RefFGM(ref_model).attack()
        got, exp = model.word_embeddings.weight.float(), ref_model.word_embeddings.weight
        if dtype is torch.float32:
            torch.testing.assert_close(got, exp, **FP32)
        else:  # fp32 math rounded once: within one bf16 ulp of the fp32 reference
            ulp = torch.finfo(dtype).eps * exp.abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((got - exp).abs() <= ulp).all()
        with no_host_sync():
            fgm.restore()
        assert torch.equal(model.word_embeddings.weight, before)


# -- torch.library registration and torch.compile -----------------------------
@pytest.mark.parametrize("row_sparse", [True, False])
def test_opcheck(backend, row_sparse):
    from fastadv.ops.fgm import fgm_attack_op, fgm_restore_op
    w, g = torch.randn(6, 5, device=DEVICE), torch.randn(6, 5, device=DEVICE)
    g[2] = 0
    backup = torch.full_like(w, 7.0)
    torch.library.opcheck(fgm_attack_op.overload, (w.clone(), g, backup.clone(), 0.5, row_sparse, backend))
    rows = fgm_attack_op(w.clone(), g, backup, 0.5, row_sparse, backend)
    torch.library.opcheck(fgm_restore_op.overload, (w.clone(), backup, rows, backend))


def test_every_op_is_registered():
    import fastadv.ops.fgm  # noqa: F401
    assert {"fgm_attack_", "fgm_restore_"} <= set(dir(torch.ops.fastadv))


def _compiled_fgm_step(backend):
    torch._dynamo.config.trace_autograd_ops = True
    model = TinyLM(tied=True).to(DEVICE)
    fgm = fastadv.FGM(model, epsilon=0.7, backend=backend)

    def step(ids, labels):
        loss = model(ids, labels)
        loss.backward()
        fgm.attack()
        model(ids, labels).backward()
        fgm.restore()
        return loss.detach()
    return model, step


def test_compiled_training_step_has_no_graph_break(backend):
    """The seed loop under torch.compile(fullgraph=True) equals eager."""
    torch._dynamo.reset()
    model, step = _compiled_fgm_step(backend)
    ref_model, ref_step = _compiled_fgm_step(backend)
    ref_model.load_state_dict(model.state_dict())
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        ids, labels = batch()
        torch.testing.assert_close(compiled(ids, labels), ref_step(ids, labels), **FP32)
        assert_params(model, ref_model)
        model.zero_grad()
        ref_model.zero_grad()


# -- several tables: one multi-tensor call on triton, bitwise the per-table calls ---------
class ManyTables(nn.Module):
    """Embedding tables of odd widths (``widths``; the first is tied to an LM head), plus a
    frozen table the forward reads and an unused one (its gradient stays None).  Every table's
    name contains "word_embeddings"."""

    def __init__(self, widths=(12, 5, 40, 3), vocab=23):
        super().__init__()
        self.word_embeddings = nn.ModuleList(nn.Embedding(vocab - 2 * i, w) for i, w in enumerate(widths))
        self.sizes = [vocab - 2 * i for i in range(len(widths))]
        self.frozen_word_embeddings = nn.Embedding(6, widths[0])
        self.frozen_word_embeddings.weight.requires_grad_(False)
        self.unused_word_embeddings = nn.Embedding(4, 7)
        self.proj = nn.Linear(sum(widths), widths[0])
        self.head = nn.Linear(widths[0], 5)
        self.lm_head = nn.Linear(widths[0], vocab, bias=False)
        self.lm_head.weight = self.word_embeddings[0].weight

    def forward(self, ids, labels):
        x = torch.cat([t(ids % n) for t, n in zip(self.word_embeddings, self.sizes)], -1)
        h = torch.tanh(self.proj(x)) + self.frozen_word_embeddings(ids % 6)
        loss = nn.functional.cross_entropy(self.head(h.mean(1)), labels)
        return loss + nn.functional.cross_entropy(self.lm_head(h).flatten(0, 1), ids.flatten())


def zero_missing_grads(model, emb_name="word_embeddings"):
    """The seeds read every matching trainable table's gradient: a zero one (norm 0, skipped)
    stands for the fast classes' None (skipped)."""
    for name, p in model.named_parameters():
        if p.requires_grad and emb_name in name and p.grad is None:
            p.grad = torch.zeros_like(p)


def test_several_tables_against_the_seed(backend):
    torch.manual_seed(3)
    model = ManyTables().to(DEVICE)
    ref_model = copy.deepcopy(model)
    fgm = fastadv.FGM(model, "word_embeddings", 0.7, backend=backend)
    ref = RefFGM(ref_model, "word_embeddings", 0.7)
    for _ in range(2):
        ids, labels = batch(vocab=23)
        model(ids, labels).backward()
        ref_model(ids, labels).backward()
        zero_missing_grads(ref_model)
        fgm.attack()
        ref.attack()
        # the four tables (the tied one once); the frozen and the unused tables untouched
        assert sorted(fgm.backup) == [f"word_embeddings.{i}.weight" for i in range(4)]
        assert_weights(model, ref_model)
        model(ids, labels).backward()
        ref_model(ids, labels).backward()
        fgm.restore()
        ref.restore()
        assert_weights(model, ref_model)
        model.zero_grad()
        ref_model.zero_grad()


_NO_TRITON = _backend.why_not("triton", DEVICE)
needs_triton = pytest.mark.skipif(_NO_TRITON is not None, reason=f"triton backend unavailable: {_NO_TRITON}")


def _launches(fn):
    import fastadv.kernels as kernels
    before = collections.Counter(kernels.LAUNCHES)
    out = fn()
    return out, collections.Counter(kernels.LAUNCHES) - before


@needs_triton
@pytest.mark.parametrize("row_sparse", ["auto", False])
def test_several_tables_bitwise_the_per_table_calls(row_sparse):
    model = ManyTables().to(DEVICE)
    alone, original = copy.deepcopy(model), copy.deepcopy(model)
    ids, labels = batch(vocab=23)
    model(ids, labels).backward()
    alone(ids, labels).backward()
    fgm = fastadv.FGM(model, "word_embeddings", 0.7, backend="triton", row_sparse=row_sparse)
    _, launched = _launches(fgm.attack)
    with torch.no_grad():
        _, launched_alone = _launches(lambda: {n: fgm_attack_(p, p.grad, 0.7, row_sparse=row_sparse is not False,
                                                              backend="triton")
                                               for n, p in alone.named_parameters()
                                               if p.requires_grad and "word_embeddings" in n
                                               and p.grad is not None})
    assert_weights(model, alone, exact=True)
    assert not torch.equal(model.word_embeddings[2].weight, original.word_embeddings[2].weight)
    # the multi-tensor kernels ran (one call), the per-table ones did not; per table they did
    assert launched["triton.fgm"] > 0 and not launched["triton.fgm_update"], launched
    assert launched_alone["triton.fgm_update"] == 4 and not launched_alone["triton.fgm"], launched_alone
    # widths 12, 5, 40, 3: four row blocks (16, 8, 64, 4) in row mode, one dense group otherwise
    assert sum(launched.values()) == (2 * 4 + 1 if row_sparse else 2 * 1 + 1), launched
    fgm.restore()
    assert_weights(model, original, exact=True)


@needs_triton
def test_several_tables_storage_moved_between_attack_and_restore():
    """The multi-tensor attack's backups follow the live parameters: restore after
    ``model.double().float()`` (new storages) is bit-exact, into the new storages;
    after ``model.half()`` it raises StorageMoved and keeps the backups."""
    model = ManyTables().to(DEVICE)
    original = copy.deepcopy(model)
    ids, labels = batch(vocab=23)
    model(ids, labels).backward()
    fgm = fastadv.FGM(model, "word_embeddings", 0.7, backend="triton")
    _, launched = _launches(fgm.attack)
    assert launched["triton.fgm"] > 0 and not launched["triton.fgm_update"], launched  # the multi path ran
    model.double().float()
    ptrs = [p.data_ptr() for p in model.parameters()]
    fgm.restore()
    assert_weights(model, original, exact=True)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    fgm.attack()
    model.half()
    with pytest.raises(StorageMoved):
        fgm.restore()
    model.float()
    fgm.restore()  # the attacked rows from the backups, exactly; the others went through half()
    restored = 0
    for t, o in zip(model.word_embeddings, original.word_embeddings):
        exact, rounded = (t.weight == o.weight).all(1), (t.weight == o.weight.half().float()).all(1)
        assert (exact | rounded).all()
        restored += int((exact & ~rounded).sum())
    assert restored > 0  # rows that half() would have changed came back bit-exact


@needs_triton
def test_several_tables_launches_do_not_grow_with_the_tables():
    """Two and four tables of widths in one row block (9..16: 16): the same 3 launches (per
    table it was 3 each); the multi-tensor call needs no process group (no collective)."""
    counts = {}
    for widths in [(12, 10), (12, 10, 16, 9)]:
        model = ManyTables(widths).to(DEVICE)
        ids, labels = batch(vocab=23)
        model(ids, labels).backward()
        fgm = fastadv.FGM(model, "word_embeddings", 0.7, backend="triton")
        _, launched = _launches(fgm.attack)
        assert set(launched) == {"triton.fgm"}, launched
        counts[len(widths)] = sum(launched.values())
        fgm.restore()
    assert counts == {2: 3, 4: 3}, counts


@needs_triton
def test_fgm_attack_many_on_plain_tensors_equals_fgm_attack_():
    from fastadv.ops.fgm import fgm_attack_many_
    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 5), (3, 40), (5000,), (0, 4), (1,), (4, 2100)]
    ws = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    gs[0][::2] = 0  # rows without gradient
    many = [w.clone() for w in ws]
    (states, launched) = _launches(lambda: fgm_attack_many_(many, gs, 0.7, backend="triton"))
    assert set(launched) == {"triton.fgm"}, launched  # one multi-tensor call, not six fgm_attack_
    for i, (w, g, got) in enumerate(zip(ws, gs, many)):
        alone = w.clone()
        fgm_attack_(alone, g, 0.7, backend="triton")
        assert torch.equal(got, alone), (i, shapes[i])
    for state, got, w in zip(states, many, ws):
        fgm_restore_(state, got)
        assert torch.equal(got, w)


@needs_triton
def test_several_tables_sharing_a_storage_take_the_per_table_calls():
    """Two parameters viewing one storage: the per-table calls (each sees the other's write), in order."""
    base = torch.randn(2, 6, 4, device=DEVICE)
    a, b = nn.Parameter(base[0]), nn.Parameter(base[1])
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    from fastadv.ops.fgm import fgm_attack_many_, multi_tensor_ok
    assert multi_tensor_ok([a, b], ["triton", "triton"]) == []
    assert multi_tensor_ok([a, nn.Parameter(base[1].clone())], ["triton", "triton"]) == [0, 1]
    g = [torch.randn(6, 4, device=DEVICE), torch.randn(6, 4, device=DEVICE)]
    _, launched = _launches(lambda: fgm_attack_many_([a, b], g, 0.5, backend="triton"))
    assert launched["triton.fgm_update"] == 2 and not launched["triton.fgm"], launched
