"""PGD's step split for FSDP2 shards, without a process group: each "rank"
reduces its row range of every tensor into its own buffer (``_shard_sums``:
the kernels' ``pgd_sums``), the buffers are added (what the all_reduce does),
and each shard is stepped from the sum (``_shard_apply``: ``pgd_apply``).
The shards put together equal the seed's PGD (fastadv.reference) on the
whole tensors, fp32 tolerance, and restore gives ``w0`` back bitwise.  Dense
and row mode, uneven and empty shards, rows without gradient, a step with a
zero gradient (skipped on the device).  tests/test_distributed.py runs the
same path on real FSDP2 shards (gloo, 2 processes)."""
import pytest
import torch

from fastadv.ops import pgd as ops
from fastadv.reference import PGD as RefPGD

from conftest import DEVICE
from test_fgm import FP32

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
            ops._shard_apply_all(planned[r], states[r], shards[r], gs[r], [first] * len(TENSORS), bufs[r],
                                 ALPHA, EPS)
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
