"""PGD's step split for FSDP2 shards, without a process group: each "rank"
reduces its row range of every tensor into its own buffer (``_shard_sums_all``:
the kernels' ``pgd_sums_many``), the buffers are added (what the all_reduce
does), and each shard is stepped from the sum (``_shard_apply_all``:
``pgd_apply_many``).
The shards put together equal the seed's PGD (fastadv.reference) on the
whole tensors, fp32 tolerance, and restore gives ``w0`` back bitwise.  Dense
and row mode, uneven and empty shards, rows without gradient, a step with a
zero gradient (skipped on the device).  tests/test_distributed.py runs the
same path on real FSDP2 shards (gloo, 2 processes).  The multi-tensor
section: one call per step over many odd tensors on each kernel backend
(triton; cuda with ``-m gpu``), in a constant number of launches, equals the
torch path and, bitwise, ``pgd_attack_`` of every tensor on that backend."""
import pytest
import torch

from fastadv.ops import pgd as ops
from fastadv.reference import PGD as RefPGD

from conftest import DEVICE
from test_fgm import FP32
# FGM's groups, plus (the same for every tensor of a call) first; the kernel backends as parameters
from test_fgm_shards import GROUPS, KERNEL_BACKENDS, _groups, _launched

ALPHA, EPS, STEPS = 0.3, 0.5, 4
# (shape, row_sparse, row cuts into 3 ranks): row mode with an empty shard, dense 1-D, dense 2-D
TENSORS = [((37, 12), True, [0, 20, 20, 37]), ((1000,), True, [0, 1, 600, 1000]),
           ((9, 5), False, [0, 4, 8, 9])]


def _grads(step):
    gen = torch.Generator().manual_seed(step)
    out = []
    for shape, _, _ in TENSORS:
        g = torch.randn(shape, generator=gen)
        if len(shape) == 2:
            g[::3] = 0  # rows without gradient: row mode must leave them alone
        if step == 2 and shape == (9, 5):
            g.zero_()  # norm 0: the step is skipped
        out.append(g.to(DEVICE))
    return out


def _reference(weights):
    model = torch.nn.Module()
    for i, w in enumerate(weights):
        model.register_parameter(f"t{i}", torch.nn.Parameter(w.clone()))
    ref = RefPGD(model, emb_name="t", epsilon=EPS, alpha=ALPHA)
    for step in range(STEPS):
        for p, g in zip(model.parameters(), _grads(step)):
            p.grad = g.clone()
        ref.attack(is_first_attack=step == 0)
    return [p.detach() for p in model.parameters()]


def test_shards_equal_the_unsharded_reference(backend):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen).to(DEVICE) for shape, _, _ in TENSORS]
    # shards[rank][i]: rank's rows of tensor i (clones: each rank owns its storage)
    shards = [[w[c[r]:c[r + 1]].clone() for w, (_, _, c) in zip(weights, TENSORS)] for r in range(3)]
    states = [[None] * len(TENSORS) for _ in range(3)]
    for step in range(STEPS):
        g_full = _grads(step)
        gs = [[g[c[r]:c[r + 1]].contiguous() for g, (_, _, c) in zip(g_full, TENSORS)] for r in range(3)]
        first = step == 0
        bufs, planned = [], []
        for r in range(3):
            states[r] = [ops._shard_state(w, w, g, s, rs, f"t{i}", backend)
                         for i, (w, g, s, (_, rs, _)) in enumerate(zip(shards[r], gs[r], states[r], TENSORS))]
            buf = torch.empty(3 * len(TENSORS), dtype=torch.float32, device=DEVICE)
            planned.append(ops._shard_sums_all(states[r], shards[r], gs[r], [first] * len(TENSORS), buf))
            bufs.append(buf)
        total = sum(bufs)  # the all_reduce
        for r in range(3):
            bufs[r].copy_(total)
            ops._shard_apply_all(planned[r], states[r], shards[r], gs[r], bufs[r], ALPHA, EPS)
    for i, (expected, (_, rs, _)) in enumerate(zip(_reference(weights), TENSORS)):
        got = torch.cat([shards[r][i] for r in range(3)])
        torch.testing.assert_close(got, expected, **FP32, msg=f"tensor {i}")
        assert not torch.equal(got, weights[i]), i  # it really moved
        if backend != "torch":  # the row / dense mode asked for
            assert (states[0][i].mask is not None) == (rs and len(TENSORS[i][0]) == 2), i
    for r in range(3):
        for i, state in enumerate(states[r]):
            ops.pgd_restore_(state, shards[r][i])
            c = TENSORS[i][2]
            assert torch.equal(shards[r][i], weights[i][c[r]:c[r + 1]]), (r, i)


@pytest.mark.launch_free
def test_many_refuses_mismatched_lists():
    w = torch.zeros(3, device=DEVICE)
    with pytest.raises(ValueError, match="one grad, state and name per parameter"):
        ops.pgd_attack_many_([w], [], ALPHA, EPS, [None])


# ---------------------------------------------------------------- the multi-tensor kernels

# (shape, dtype, row_sparse, gradient kind): every tensor of one call.  Row mode: uneven rows, rows
# without gradient, a single row; dense: an empty tensor (1-D and 0-row 2-D: the sum launch alone
# gives their zeros), a single element, two dense blocks (DENSE_BLOCK = 4096), a dense 2-D, fp16
# (a second dtype group); gradients: zero (step skipped), NaN (skipped), inf (NaN written, as the
# torch path does).  Row widths in two row blocks (8, 4); "mixed" adds a 40-wide row (block 64),
# a 2100-wide one (block 2048: two column iterations) and a 1-wide one (block 1).  Groups are
# (dtype, mode, dense first step, row block), so every tensor's sums and steps are bitwise those
# of the per-tensor kernels (pgd_step).
MULTI = [((7, 5), torch.float32, True, "rows"), ((3, 7), torch.float32, True, "rows"),
         ((1, 6), torch.float32, True, "randn"), ((4, 5), torch.float32, True, "nan"),
         ((0,), torch.float32, True, "randn"), ((0, 4), torch.float32, True, "randn"),
         ((1,), torch.float32, True, "randn"), ((5000,), torch.float32, True, "randn"),
         ((9, 5), torch.float32, False, "zero"), ((6, 3), torch.float32, True, "inf"),
         ((33,), torch.float16, True, "randn"), ((2, 8), torch.float16, True, "rows")]
MIXED = MULTI + [((6, 40), torch.float32, True, "rows"), ((2, 2100), torch.float32, True, "randn"),
                 ((3, 1), torch.float32, True, "randn")]


def _multi_grads(tensors, step):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for shape, dtype, _, kind in tensors:
        g = torch.randn(shape, generator=gen)
        if kind == "rows" and g.numel():
            g[::2] = 0
        if kind == "zero" and step == 1:
            g.zero_()
        if kind == "nan" and step == 1:
            g[-1, 0] = float("nan")
        if kind == "inf" and step == 2:
            g[1, 1] = float("inf")
        out.append(g.to(dtype).to(DEVICE))
    return out


def _multi_steps(tensors, weights, backend, steps=3):
    """``steps`` shard steps of all tensors in one call each (one rank: no reduce needed)."""
    import fastadv.kernels as kernels
    ws = [w.clone() for w in weights]
    states, launches = [None] * len(ws), []
    for step in range(steps):
        gs = _multi_grads(tensors, step)
        firsts = [s is None for s in states]
        states = [ops._shard_state(w, w, g, s, rs, f"t{i}", backend)
                  for i, (w, g, s, (_, _, rs, _)) in enumerate(zip(ws, gs, states, tensors))]
        before = dict(kernels.LAUNCHES)
        sums = torch.empty(3 * len(ws), dtype=torch.float32, device=DEVICE)
        planned = ops._shard_sums_all(states, ws, gs, firsts, sums)
        ops._shard_apply_all(planned, states, ws, gs, sums, ALPHA, EPS)
        launches.append(_launched(before, backend))
    return ws, states, launches


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("tensors", [MULTI, MIXED], ids=["equal", "mixed"])
def test_multi_tensor_step_equals_per_tensor_and_torch(tensors, name):
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(sh, generator=gen).to(dt).to(DEVICE) for sh, dt, _, _ in tensors]
    got, states, launches = _multi_steps(tensors, weights, name)
    # the multi-tensor path ran, in 2 launches per group + 1, whatever the number of tensors
    # (triton: fp32 rows in blocks 8, 4 (+ 64, 2048, 1 in MIXED), fp32 dense, fp16 rows, fp16
    # dense; cuda: fp32 rows, fp32 dense, fp16 rows, fp16 dense)
    assert _groups(tensors, name) == {"triton": (5, 8), "cuda": GROUPS["cuda"]}[name][tensors is MIXED]
    assert launches == [2 * _groups(tensors, name) + 1] * 3, launches
    assert any(s.mask is not None for s in states) and any(s.mask is None for s in states)
    torch_ws, _, _ = _multi_steps(tensors, weights, "torch")
    for i, ((sh, dt, _, kind), w, ref) in enumerate(zip(tensors, got, torch_ws)):
        tol = FP32 if dt == torch.float32 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(w, ref, equal_nan=True, **tol, msg=f"tensor {i} {sh} {kind}")
        # the cases happened: inf wrote NaN, NaN and zero skipped a step, the others moved
        assert w.isnan().any() == (kind == "inf"), (i, kind)
        if w.numel() and kind not in ("inf",):
            assert not torch.equal(w, weights[i]), (i, kind)
    for i, (w0, w, (sh, _, rs, kind)) in enumerate(zip(weights, got, tensors)):  # bitwise per tensor
        alone, state = w0.clone(), None
        for step in range(3):
            state = ops.pgd_attack_(alone, _multi_grads(tensors, step)[i], ALPHA, EPS, state,
                                    row_sparse=rs, backend=name)
        torch.testing.assert_close(w, alone, rtol=0, atol=0, equal_nan=True, msg=f"tensor {i} {sh} {kind}")
    for i, (state, w, w0) in enumerate(zip(states, got, weights)):  # restore: w0 bit for bit
        ops.pgd_restore_(state, w)
        assert torch.equal(w, w0), i
