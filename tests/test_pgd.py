"""fastadv.PGD against the seed reference through the seed's K-step loop."""
import copy

import pytest
import torch
from torch import nn

import fastadv
from fastadv import _backend
from fastadv.ops.pgd import pgd_attack_, pgd_attack_many_, pgd_restore_
from fastadv.reference import PGD as RefPGD

import odd_models
from conftest import DEVICE
from fastadv.ops._live import StorageMoved
from test_fgm import (FP32, REALLOCS, ManyTables, Table, TinyLM, assert_params, assert_weights, batch,
                      needs_triton, zero_missing_grads)

K = 3


def seed_loop(model, pgd, ids, labels, set_to_none=True, record=None):
    """The seed's PGD loop, verbatim; records the embedding after every attack."""
    model(ids, labels).backward()
    pgd.backup_grad()
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        if record is not None:
            record.append(model.word_embeddings.weight.detach().clone())
        if t != K - 1:
            model.zero_grad(set_to_none=set_to_none)
        else:
            pgd.restore_grad()
        model(ids, labels).backward()
    pgd.restore()


BALL = {1.0: "ball-inactive", 0.05: "ball-active"}

# Under the Triton interpreter a row-mode case runs one Python program per row
# per kernel (seconds each), so the interpreted triton backend gets a covering
# subset of the seed-loop grid instead of all 16 cases: every kernel path
# (row / dense x projection on / off) and, in row mode, every pair of
# (projection, tied head, set_to_none) values (an L4 orthogonal array).  The
# torch and cuda backends, and compiled Triton on a GPU, keep all 16.
TRITON_INTERPRETED_SEED_CASES = [  # (epsilon, row_sparse, tied, set_to_none)
    (0.05, "auto", False, True), (0.05, "auto", True, False),
    (1.0, "auto", False, False), (1.0, "auto", True, True),
    (0.05, False, True, False), (1.0, False, False, True),
]


def seed_loop_cases():
    grid = [(e, r, t, s) for e in BALL for r in ("auto", False) for t in (False, True) for s in (True, False)]
    for b in _backend.BACKENDS:
        interpreted = b == "triton" and _backend.triton_interpreter()
        for case in (TRITON_INTERPRETED_SEED_CASES if interpreted else grid):
            e, r, t, s = case
            yield pytest.param(b, *case, id=f"{b}-{s}-{t}-{r}-{BALL[e]}")


@pytest.mark.parametrize("backend,epsilon,row_sparse,tied,set_to_none", seed_loop_cases(), indirect=["backend"])
def test_seed_loop_matches_reference(backend, epsilon, row_sparse, tied, set_to_none):
    model = TinyLM(tied=tied).to(DEVICE)
    ref_model = copy.deepcopy(model)
    pgd = fastadv.PGD(model, "word_embeddings.", epsilon, 0.3, backend=backend, row_sparse=row_sparse)
    ref = RefPGD(ref_model, "word_embeddings.", epsilon, 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(2):
        ids, labels = batch()
        steps, ref_steps = [], []
        seed_loop(model, pgd, ids, labels, set_to_none, steps)
        seed_loop(ref_model, ref, ids, labels, set_to_none, ref_steps)
        for fast, slow in zip(steps, ref_steps):
            torch.testing.assert_close(fast, slow, **FP32)
        w0 = ref_model.word_embeddings.weight
        r = steps[-1] - w0
        if epsilon < 1:  # the projection was active: ||r|| == epsilon
            assert torch.linalg.vector_norm(r).item() == pytest.approx(epsilon, rel=1e-4)
        else:
            assert torch.linalg.vector_norm(r).item() < epsilon
        assert_params(model, ref_model)
        opt.step()
        ref_opt.step()
        model.zero_grad(set_to_none=set_to_none)
        ref_model.zero_grad(set_to_none=set_to_none)


def test_restore_bit_exact_in_place_and_grads_not_copied(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    p = model.word_embeddings.weight
    before, ptr = p.detach().clone(), p.data_ptr()
    grads = {n: q.grad for n, q in model.named_parameters()}
    pgd = fastadv.PGD(model, backend=backend)
    pgd.backup_grad()
    pgd.attack(is_first_attack=True)
    assert all(q.grad is None for q in model.parameters())  # fresh grads for the next backward
    model(ids, labels).backward()
    pgd.attack()
    assert not torch.equal(p, before)
    pgd.restore_grad()
    assert all(q.grad is grads[n] for n, q in model.named_parameters())  # the originals, no copy
    pgd.restore()
    assert torch.equal(p, before) and p.data_ptr() == ptr


def test_none_grads_are_skipped(backend):
    model = TinyLM().to(DEVICE)
    model.unused_word_embeddings = nn.Embedding(3, 12).to(DEVICE)  # matches, never gets a grad
    ids, labels = batch()
    pgd = fastadv.PGD(model, "word_embeddings", backend=backend)
    seed_loop(model, pgd, ids, labels)
    assert model.unused_word_embeddings.weight.grad is None


def test_attack_makes_no_host_sync(backend, no_host_sync):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    pgd = fastadv.PGD(model, epsilon=0.05, backend=backend)
    with no_host_sync():
        pgd.attack(is_first_attack=True)
    model(ids, labels).backward()
    with no_host_sync():
        pgd.attack()
        pgd.restore()


@pytest.mark.launch_free
def test_protocol_misuse(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    before = model.word_embeddings.weight.detach().clone()
    pgd = fastadv.PGD(model, backend=backend)
    with pytest.raises(RuntimeError, match="without a preceding attack"):
        pgd.restore()
    with pytest.raises(RuntimeError, match="no attack in progress"):
        pgd.attack()
    with pytest.raises(RuntimeError, match="without backup_grad"):
        pgd.restore_grad()
    pgd.attack(is_first_attack=True)
    with pytest.raises(RuntimeError, match="restore\\(\\) first"):
        pgd.attack(is_first_attack=True)
    pgd.restore()
    assert torch.equal(model.word_embeddings.weight, before)
    with pytest.raises(ValueError, match="epsilon"):
        fastadv.PGD(model, epsilon=-1)
    with pytest.raises(ValueError, match="close candidates"):
        fastadv.PGD(model, emb_name="no_such_table")


def test_context_manager_restores_on_exception(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    before = model.word_embeddings.weight.detach().clone()
    pgd = fastadv.PGD(model, backend=backend)
    with pytest.raises(KeyError):
        with pgd.attacked():
            pgd.attack(is_first_attack=True)
            raise KeyError("boom")
    assert torch.equal(model.word_embeddings.weight, before)


def test_project_compat(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    pgd = fastadv.PGD(model, epsilon=0.01, backend=backend, row_sparse=False)
    pgd.attack(is_first_attack=True)
    w = model.word_embeddings.weight.detach()
    far = w + 1.0
    out = pgd.project("word_embeddings.weight", far, 0.01)
    w0 = pgd.emb_backup["word_embeddings.weight"].backup
    assert torch.linalg.vector_norm(out - w0).item() == pytest.approx(0.01, rel=1e-4)


def reference_steps(w, grads, alpha, eps):
    """The seed PGD's weights after each step, on a bare table."""
    table = Table(w.clone().float())
    ref = RefPGD(table, "word_embeddings", eps, alpha)
    out = []
    for t, g in enumerate(grads):
        table.word_embeddings.grad = g.clone().float()
        ref.attack(is_first_attack=(t == 0))
        out.append(table.word_embeddings.detach().clone())
    return out


@pytest.mark.parametrize("shape", [(1,), (7, 3), (3, 4100), (0, 4)])
@pytest.mark.parametrize("kind", ["normal", "zero", "nan"])
def test_functional_steps_against_reference(backend, shape, kind):
    w = torch.randn(shape, device=DEVICE)
    grads = [torch.randn(shape, device=DEVICE) for _ in range(3)]
    if kind == "zero":
        grads[1].zero_()
    elif kind == "nan" and w.numel():
        grads[1].view(-1)[0] = float("nan")
    fast = w.clone()
    state = None
    for g, expected in zip(grads, reference_steps(w, grads, 0.3, 0.4)):
        state = pgd_attack_(fast, g, 0.3, 0.4, state, backend=backend)
        torch.testing.assert_close(fast, expected, **FP32)
    pgd_restore_(state)
    assert torch.equal(fast, w)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_low_precision(backend, dtype):
    w = torch.randn(9, 16, device=DEVICE).to(dtype)
    grads = [torch.randn(9, 16, device=DEVICE).to(dtype) for _ in range(3)]
    fast = w.clone()
    state = None
    for g in grads:
        state = pgd_attack_(fast, g, 0.3, 0.5, state, backend=backend)
    # fp32 math, rounded once per step: within a few ulps of the fp32 reference.
    expected = reference_steps(w, grads, 0.3, 0.5)[-1]
    torch.testing.assert_close(fast.float(), expected, rtol=4e-3, atol=4e-3)
    pgd_restore_(state)
    assert torch.equal(fast, w)


# -- row mode: rows found from the gradient, for every way a table is read ---
def zoo_cases():
    """Every odd model x both sides of the ball; under the Triton interpreter
    one side per model, alternating (what the zoo adds is how the table is
    read, i.e. which rows carry gradient: the projection on / off paths of
    the kernels are covered by the seed-loop cases)."""
    for b in _backend.BACKENDS:
        interpreted = b == "triton" and _backend.triton_interpreter()
        for i, zoo in enumerate(odd_models.ZOO):
            for e in ([list(BALL)[i % 2]] if interpreted else BALL):
                yield pytest.param(b, zoo, e, id=f"{b}-{zoo.__name__}-{BALL[e]}")


@pytest.mark.parametrize("backend,zoo,epsilon", zoo_cases(), indirect=["backend"])
def test_tables_read_outside_their_module(backend, zoo, epsilon):
    model = zoo().to(DEVICE)
    ref_model = copy.deepcopy(model)
    pgd = fastadv.PGD(model, model.emb_name, epsilon, 0.3, backend=backend)
    ref = RefPGD(ref_model, ref_model.emb_name, epsilon, 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(2):
        ids, labels = odd_models.batch()
        seed_loop(model, pgd, ids, labels)
        seed_loop(ref_model, ref, ids, labels)
        assert_params(model, ref_model)
        opt.step()
        ref_opt.step()
        model.zero_grad()
        ref_model.zero_grad()


def accumulation_step(model, pgd, micro_batches):
    """Gradient accumulation: the PGD K-loop on each micro-batch, one optimizer step."""
    for ids, labels in micro_batches:
        loss = model(ids, labels) / len(micro_batches)
        loss.backward()
        pgd.backup_grad()
        for t in range(K):
            pgd.attack(is_first_attack=(t == 0))
            if t != K - 1:
                model.zero_grad()
            else:
                pgd.restore_grad()
            (model(ids, labels) / len(micro_batches)).backward()
        pgd.restore()


def test_gradient_accumulation_three_micro_batches(backend):
    model, ref_model = TinyLM().to(DEVICE), None
    ref_model = copy.deepcopy(model)
    pgd = fastadv.PGD(model, epsilon=0.05, backend=backend)
    ref = RefPGD(ref_model, epsilon=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(2):
        micro = [batch() for _ in range(3)]
        accumulation_step(model, pgd, micro)
        accumulation_step(ref_model, ref, micro)
        assert_params(model, ref_model)
        opt.step()
        ref_opt.step()
        model.zero_grad()
        ref_model.zero_grad()
    assert_params(model, ref_model)


def test_forward_before_zero_grad(backend):
    model = TinyLM().to(DEVICE)
    ref_model = copy.deepcopy(model)
    pgd, ref = fastadv.PGD(model, backend=backend), RefPGD(ref_model)
    ids, labels = batch()
    for m, p in ((model, pgd), (ref_model, ref)):
        loss = m(ids, labels)
        m.zero_grad()
        loss.backward()
        p.attack(is_first_attack=True)
        m(ids, labels).backward()
        p.attack()
    assert_params(model, ref_model)
    pgd.restore()


def test_no_hooks_on_user_modules():
    model = TinyLM()
    for _ in range(5):
        fastadv.PGD(model)
    assert odd_models.hook_count(model) == 0


@pytest.mark.parametrize("realloc", REALLOCS, ids=lambda f: f.__name__[9:])
@pytest.mark.parametrize("when", ["between_steps", "before_restore"])
def test_storage_moved(backend, realloc, when):
    model = TinyLM().to(DEVICE)
    ref_model = copy.deepcopy(model)
    ids, labels = batch()
    pgd, ref = fastadv.PGD(model, epsilon=0.05, backend=backend), RefPGD(ref_model, epsilon=0.05)
    before = model.word_embeddings.weight.detach().clone()
    keep = []
    for m, p in ((model, pgd), (ref_model, ref)):
        m(ids, labels).backward()
        p.attack(is_first_attack=True)
        if m is model and when == "between_steps":
            keep.append(model.word_embeddings.weight.data)  # the old storage stays alive
            realloc(model)
        m.zero_grad()
        m(ids, labels).backward()
        p.attack()
    assert_params(model, ref_model)
    if when == "before_restore":
        keep.append(model.word_embeddings.weight.data)
        realloc(model)
    assert model.word_embeddings.weight.data_ptr() != keep[0].data_ptr()
    pgd.restore()
    assert torch.equal(model.word_embeddings.weight.detach(), before)


def test_dtype_change_raises_and_keeps_the_backup(backend):
    model = TinyLM().to(DEVICE)
    ids, labels = batch()
    model(ids, labels).backward()
    pgd = fastadv.PGD(model, backend=backend)
    pgd.attack(is_first_attack=True)
    model.half()
    with pytest.raises(StorageMoved, match="changed dtype"):
        pgd.restore()
    assert pgd.emb_backup  # kept
    model.float()
    pgd.restore()


def test_first_step_without_gradient_still_counts(backend):
    """No gradient (or a frozen table) at the first step: the next steps and
    restore() work, with messages that say what happened."""
    model = TinyLM().to(DEVICE)
    pgd = fastadv.PGD(model, backend=backend)
    pgd.attack(is_first_attack=True)  # nothing to perturb yet
    pgd.attack()                      # no complaint about is_first_attack
    pgd.restore()
    with pytest.raises(RuntimeError, match="no attack in progress"):
        pgd.attack()
    ids, labels = batch()
    seed_loop(model, pgd, ids, labels)  # a real attack afterwards


def test_frozen_table(backend):
    model = TinyLM().to(DEVICE)
    model.word_embeddings.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="only frozen parameters"):
        pgd = fastadv.PGD(model, backend=backend)
    ids, labels = batch()
    before = model.word_embeddings.weight.detach().clone()
    seed_loop(model, pgd, ids, labels)
    assert torch.equal(model.word_embeddings.weight, before)
    model.word_embeddings.weight.requires_grad_(True)
    model.zero_grad()
    seed_loop(model, pgd, ids, labels)
    assert torch.equal(model.word_embeddings.weight, before)


# -- torch.library registration and torch.compile -----------------------------
@pytest.mark.parametrize("rows", [True, False])
def test_opcheck(backend, rows):
    from fastadv.ops.pgd import pgd_restore_op, pgd_step_op
    if rows and backend == "torch":
        pytest.skip("the torch backend is dense by design")
    w, g = torch.randn(6, 5, device=DEVICE), torch.randn(6, 5, device=DEVICE)
    g[2] = 0
    backup = torch.full_like(w, 7.0)
    n = 6 if rows else 0
    saved, mask = (torch.zeros(n, dtype=torch.uint8, device=DEVICE),
                   torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(3))
    for first in (True, False):
        torch.library.opcheck(pgd_step_op.overload, (w.clone(), g, backup.clone(), saved.clone(),
                                                     mask.clone(), 0.3, 0.5, first, backend))
    pgd_step_op(w, g, backup, saved, mask, 0.3, 0.5, True, backend)
    torch.library.opcheck(pgd_restore_op.overload, (w.clone(), backup, saved.clone(), backend))


def _pgd_setup(backend):
    model = TinyLM().to(DEVICE)
    pgd = fastadv.PGD(model, epsilon=0.05, backend=backend)

    def step(ids, labels):
        loss = model(ids, labels)
        loss.backward()
        pgd.backup_grad()
        for t in range(K):
            pgd.attack(is_first_attack=(t == 0))
            if t != K - 1:
                model.zero_grad()
            else:
                pgd.restore_grad()
            model(ids, labels).backward()
        pgd.restore()
        return loss.detach()
    return model, step


def test_compiled_k_step_loop_has_no_graph_break(backend):
    torch._dynamo.reset()
    torch._dynamo.config.trace_autograd_ops = True
    model, step = _pgd_setup(backend)
    ref_model, ref_step = _pgd_setup(backend)
    ref_model.load_state_dict(model.state_dict())
    compiled = torch.compile(step, fullgraph=True)
    ids, labels = batch()
    torch.testing.assert_close(compiled(ids, labels), ref_step(ids, labels), **FP32)
    assert_params(model, ref_model)


# -- several tables: one multi-tensor step per attack on triton, bitwise the per-table steps --------
def many_tables_loop(model, pgd, ids, labels, ref=False):
    """The seed's K-step loop on a ManyTables model; returns the tables after every attack.  The
    seed reads every matching table's gradient: ``ref`` gives its None ones zeros (skipped)."""
    record = []
    model(ids, labels).backward()
    if ref:
        zero_missing_grads(model)
    pgd.backup_grad()
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        record.append([p.detach().clone() for p in model.word_embeddings.parameters()])
        if t != K - 1:
            model.zero_grad()
        else:
            pgd.restore_grad()
        model(ids, labels).backward()
        if ref:
            zero_missing_grads(model)
    pgd.restore()
    return record


@pytest.mark.parametrize("epsilon", list(BALL), ids=list(BALL.values()))
def test_several_tables_against_the_seed(backend, epsilon):
    torch.manual_seed(3)
    model = ManyTables().to(DEVICE)
    ref_model = copy.deepcopy(model)
    pgd = fastadv.PGD(model, "word_embeddings", epsilon, 0.3, backend=backend)
    ref = RefPGD(ref_model, "word_embeddings", epsilon, 0.3)
    before = copy.deepcopy(model)
    for _ in range(2):
        ids, labels = batch(vocab=23)
        fast = many_tables_loop(model, pgd, ids, labels)
        slow = many_tables_loop(ref_model, ref, ids, labels, ref=True)
        for step, (a, b) in enumerate(zip(fast, slow)):
            for i, (x, y) in enumerate(zip(a, b)):
                torch.testing.assert_close(x, y, **FP32, msg=f"step {step} table {i}")
        assert not torch.equal(fast[-1][2], before.word_embeddings[2].weight)  # it moved
        assert_weights(model, ref_model)  # restored (the frozen and unused tables never moved)
        for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            if p.grad is None:  # the frozen table; the unused one: None here, the seed's zeros there
                assert q.grad is None or not q.grad.any(), n
            else:  # restore_grad: the first backward's plus the last attack's
                torch.testing.assert_close(p.grad, q.grad, **FP32, msg=n)
        model.zero_grad()
        ref_model.zero_grad()


def _pgd_launches(model, ids, labels, **kw):
    """The K-step loop with fastadv.PGD on triton: the tables after each step, the launches of each attack."""
    import fastadv.kernels as kernels
    pgd = fastadv.PGD(model, "word_embeddings", backend="triton", **kw)
    launches, real_attack = [], pgd.attack

    def counted(**a):
        before = sum(kernels.LAUNCHES.values())
        real_attack(**a)
        launches.append(sum(kernels.LAUNCHES.values()) - before)
    pgd.attack = counted
    return many_tables_loop(model, pgd, ids, labels), launches


@needs_triton
@pytest.mark.parametrize("row_sparse", ["auto", False])
def test_several_tables_bitwise_the_per_table_steps(monkeypatch, row_sparse):
    """The class with the multi-tensor step against the class with it switched off (every table
    its own pgd_step, as before): bitwise after every step, the restore bit-exact."""
    import fastadv.ops.pgd as pgd_ops
    model = ManyTables().to(DEVICE)
    alone, original = copy.deepcopy(model), copy.deepcopy(model)
    ids, labels = batch(vocab=23)
    together, launched = _pgd_launches(model, ids, labels, epsilon=0.05, row_sparse=row_sparse)
    with monkeypatch.context() as m:
        m.setattr(pgd_ops, "multi_tensor_ok", lambda params, names: [])
        per_table, launched_alone = _pgd_launches(alone, ids, labels, epsilon=0.05, row_sparse=row_sparse)
    for step, (a, b) in enumerate(zip(together, per_table)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), (step, i)
    assert not torch.equal(together[-1][1], original.word_embeddings[1].weight)
    # widths 12, 5, 40, 3: four row blocks in row mode (2 x 4 + 1), one dense group (2 + 1); per table 3 each
    assert launched == [2 * 4 + 1 if row_sparse else 3] * K, launched
    assert launched_alone == [3 * 4] * K, launched_alone
    assert_weights(model, original, exact=True)
    assert_weights(alone, original, exact=True)


@needs_triton
def test_several_tables_storage_moved_between_steps_and_restore():
    """The multi-tensor step's states follow the live parameters: ``model.double().float()``
    between two steps and again before restore (new storages each time) still restores
    bit-exactly; equal to the same loop without the moves."""
    model = ManyTables().to(DEVICE)
    still, original = copy.deepcopy(model), copy.deepcopy(model)
    ids, labels = batch(vocab=23)
    out = []
    for m, move in ((model, True), (still, False)):
        m(ids, labels).backward()
        pgd = fastadv.PGD(m, "word_embeddings", epsilon=0.05, backend="triton")
        pgd.attack(is_first_attack=True)
        if move:
            m.double().float()
        pgd.attack()
        out.append([t.weight.detach().clone() for t in m.word_embeddings])
        if move:
            m.double().float()
        pgd.restore()
        assert_weights(m, original, exact=True)
    for a, b in zip(*out):
        assert torch.equal(a, b)
    assert not torch.equal(out[0][1], original.word_embeddings[1].weight)


@needs_triton
def test_several_tables_launches_do_not_grow_with_the_tables():
    """Two and four tables in one row block (widths 9..16): 3 launches per attack for both
    (per table it was 3 each); no process group needed (no collective)."""
    counts = {}
    for widths in [(12, 10), (12, 10, 16, 9)]:
        model = ManyTables(widths).to(DEVICE)
        ids, labels = batch(vocab=23)
        _, counts[len(widths)] = _pgd_launches(model, ids, labels)
    assert counts == {2: [3] * K, 4: [3] * K}, counts


@needs_triton
def test_pgd_attack_many_on_plain_tensors_equals_pgd_attack_():
    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 5), (3, 40), (5000,), (0, 4), (1,), (4, 2100)]
    ws = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    many, alone = [w.clone() for w in ws], [w.clone() for w in ws]
    states, states_alone = [None] * len(ws), [None] * len(ws)
    for step in range(3):
        gs = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
        gs[0][::2] = 0  # rows without gradient
        states = pgd_attack_many_(many, gs, 0.3, 0.5, states, backend="triton")
        states_alone = [pgd_attack_(w, g, 0.3, 0.5, s, backend="triton")
                        for w, g, s in zip(alone, gs, states_alone)]
        for i, (a, b) in enumerate(zip(many, alone)):
            assert torch.equal(a, b), (step, i, shapes[i])
    for state, w, w0 in zip(states, many, ws):
        pgd_restore_(state, w)
        assert torch.equal(w, w0)
