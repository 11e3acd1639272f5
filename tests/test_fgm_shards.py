"""FGM's shard path without a process group: each "rank" writes its row
range's ``||g||^2`` of every tensor into its own buffer
(``_shard_square_norms_all``: one multi-tensor plan per kernel backend, per
tensor on torch), the buffers are added (what the one all_reduce of
``fgm_attack_many_`` does), and each shard is perturbed along the global
``g / ||g||`` (``_shard_update_all``).  The shards put together equal the seed's
FGM (fastadv.reference) on the whole tensors, fp32 tolerance; restore is
bit-exact.  Dense and row mode, uneven and empty shards, rows without
gradient, a zero gradient (skipped on the device).  The multi-tensor section:
one call over many odd tensors of two dtypes on each kernel backend (triton;
cuda with ``-m gpu``), in a constant number of launches, equals the torch path
and, bitwise, the unsharded ``fgm_attack_`` of every tensor on that backend
(mixed row widths included); tests/test_cuda_multi_tensor.py adds the CUDA
cases (alignments, large tensors, many tensors).  tests/test_distributed.py
runs the same path on real FSDP2 shards (gloo, 2 processes)."""
import pytest
import torch

from fastadv import _backend
from fastadv.ops import fgm as ops
from fastadv.ops.fgm import fgm_attack_
from fastadv.reference import FGM as RefFGM

from conftest import DEVICE
from test_fgm import FP32

EPS = 0.7
# (shape, row_sparse, row cuts into 3 ranks, zero gradient?)
TENSORS = [((37, 12), True, [0, 20, 20, 37], False), ((1000,), True, [0, 1, 600, 1000], False),
           ((9, 5), False, [0, 4, 8, 9], False), ((6, 4), True, [0, 3, 5, 6], True)]


def test_shards_equal_the_unsharded_reference(backend):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen).to(DEVICE) for shape, *_ in TENSORS]
    grads = []
    for shape, _, _, zero in TENSORS:
        g = torch.randn(shape, generator=gen)
        if len(shape) == 2:
            g[::3] = 0  # rows without gradient: row mode leaves them alone
        grads.append((g * (not zero)).to(DEVICE))
    shards = [[w[c[r]:c[r + 1]].clone() for w, (_, _, c, _) in zip(weights, TENSORS)] for r in range(3)]
    gs = [[g[c[r]:c[r + 1]].contiguous() for g, (_, _, c, _) in zip(grads, TENSORS)] for r in range(3)]
    rows = [[ops._shard_rows(w, rs, backend) for w, (_, rs, _, _) in zip(shards[r], TENSORS)] for r in range(3)]
    backups = [[torch.empty_like(w) for w in shards[r]] for r in range(3)]
    names = [backend] * len(TENSORS)
    bufs, planned = [], []
    for r in range(3):
        buf = torch.empty(len(TENSORS), dtype=torch.float32, device=DEVICE)
        planned.append(ops._shard_square_norms_all(shards[r], gs[r], rows[r], backups[r], names, buf))
        bufs.append(buf)
    norms = ops._sqrt_rn(sum(bufs))  # the all_reduce, then the sqrt (as fgm_attack_many_ takes it)
    for r in range(3):
        ops._shard_update_all(planned[r], shards[r], gs[r], backups[r], names, norms, EPS)

    model = torch.nn.Module()
    for i, (w, g) in enumerate(zip(weights, grads)):
        model.register_parameter(f"t{i}", torch.nn.Parameter(w.clone()))
        getattr(model, f"t{i}").grad = g.clone()
    RefFGM(model, emb_name="t", epsilon=EPS).attack()
    for i, expected in enumerate(model.parameters()):
        got = torch.cat([shards[r][i] for r in range(3)])
        torch.testing.assert_close(got, expected.detach(), **FP32, msg=f"tensor {i}")
        assert torch.equal(got, weights[i]) == TENSORS[i][3], i  # moved unless the gradient is zero
    for r in range(3):
        for i, w in enumerate(shards[r]):
            state = ops.FGMBackup(w, backups[r][i], rows[r][i], backend)
            ops.fgm_restore_(state, w)
            c = TENSORS[i][2]
            assert torch.equal(w, weights[i][c[r]:c[r + 1]]), (r, i)


def test_the_norms_sqrt_is_correctly_rounded():
    """``fgm_attack_many_`` takes the sqrt of the all-reduced squares outside the kernels: it must be
    the kernels' correctly rounded one (numpy's fp32 sqrt is; torch 2.13's CPU one is not always)."""
    import numpy as np
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 1e4
    x[:4] = torch.tensor([0.0, 4947.337890625, float("inf"), float("nan")])
    want = torch.from_numpy(np.sqrt(x.numpy()))
    torch.testing.assert_close(ops._sqrt_rn(x.to(DEVICE)).cpu(), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.launch_free
def test_many_refuses_mismatched_lists():
    w = torch.zeros(3, device=DEVICE)
    with pytest.raises(ValueError, match="one grad per parameter"):
        ops.fgm_attack_many_([w], [], EPS)


# ---------------------------------------------------------------- the multi-tensor kernels

# (shape, dtype, row_sparse, gradient kind): every tensor of one call.  Row mode: uneven rows, rows
# without gradient, a single row, 0-wide rows (flags written, nothing moved); dense: empty tensors
# (1-D and 0-row 2-D: the sum launch alone gives their zeros), a single element, two dense blocks
# (DENSE_BLOCK = 4096), a dense 2-D, fp16 (a second dtype group); gradients: zero (skipped), NaN
# (skipped), inf (NaN written, as the torch path does).  Row widths in three row blocks (8, 4 and,
# 0 wide, 1); "mixed" adds a 40-wide row (block 64), a 2100-wide one (block 2048: two column
# iterations) and a 1-wide one (block 1).  Groups are (dtype, mode, row block), so every tensor's
# norm and update are bitwise those of the unsharded fgm_attack_.
MULTI = [((7, 5), torch.float32, True, "rows"), ((3, 7), torch.float32, True, "rows"),
         ((1, 6), torch.float32, True, "randn"), ((4, 5), torch.float32, True, "nan"),
         ((0,), torch.float32, True, "randn"), ((0, 4), torch.float32, True, "randn"),
         ((3, 0), torch.float32, True, "randn"), ((1,), torch.float32, True, "randn"),
         ((5000,), torch.float32, True, "randn"), ((9, 5), torch.float32, False, "zero"),
         ((6, 3), torch.float32, True, "inf"), ((33,), torch.float16, True, "randn"),
         ((2, 8), torch.float16, True, "rows")]
MIXED = MULTI + [((6, 40), torch.float32, True, "rows"), ((2, 2100), torch.float32, True, "randn"),
                 ((3, 1), torch.float32, True, "randn")]


def _kernel_backend(name):
    """A kernel backend as a test parameter: skipped where it cannot run (cuda: marked gpu)."""
    why = _backend.why_not(name, DEVICE)
    marks = [pytest.mark.skipif(why is not None, reason=f"{name} backend unavailable: {why}")]
    return pytest.param(name, marks=marks + ([pytest.mark.gpu] if name == "cuda" else []))


KERNEL_BACKENDS = [_kernel_backend("triton"), _kernel_backend("cuda")]  # each against torch and itself per tensor


def _multi_grads(tensors):
    gen = torch.Generator().manual_seed(100)
    out = []
    for shape, dtype, _, kind in tensors:
        g = torch.randn(shape, generator=gen)
        if kind == "rows" and g.numel():
            g[::2] = 0
        if kind == "zero":
            g.zero_()
        if kind == "nan":
            g[-1, 0] = float("nan")
        if kind == "inf":
            g[1, 1] = float("inf")
        out.append(g.to(dtype).to(DEVICE))
    return out


def _multi_attack(tensors, weights, backend):
    """One shard attack of all tensors in one call (one rank: the reduce is the identity)."""
    import fastadv.kernels as kernels
    ws, gs = [w.clone() for w in weights], _multi_grads(tensors)
    names = [backend] * len(ws)
    rows = [ops._shard_rows(w, rs, backend) for w, (_, _, rs, _) in zip(ws, tensors)]
    backups = [torch.empty_like(w) for w in ws]
    before = dict(kernels.LAUNCHES)
    sq = torch.empty(len(ws), dtype=torch.float32, device=DEVICE)
    planned = ops._shard_square_norms_all(ws, gs, rows, backups, names, sq)
    ops._shard_update_all(planned, ws, gs, backups, names, ops._sqrt_rn(sq), EPS)
    states = [ops.FGMBackup(w, b, r, backend) for w, b, r in zip(ws, backups, rows)]
    return ws, states, _launched(before, backend)


def _launched(before: dict, backend: str) -> int:
    """The launches since ``before`` of the backend's multi-tensor kernels (``<backend>.fgm`` /
    ``.pgd``), asserting that no other kernel launched (no per-tensor fallback)."""
    import fastadv.kernels as kernels
    delta = {k: n - before.get(k, 0) for k, n in kernels.LAUNCHES.items() if n != before.get(k, 0)}
    assert all(k in (f"{backend}.fgm", f"{backend}.pgd") for k in delta), delta
    return sum(delta.values())


def _row_block(cols: int) -> int:
    """The per-tensor row kernels' column block: the power of two >= cols (>= 1), at most 2048."""
    return min(1 << max(cols - 1, 0).bit_length(), 2048)


def _groups(tensors, backend: str = "triton") -> int:
    """The groups of non-empty tensors, each one partials and one update (PGD: apply) launch:
    (dtype, mode, row block) on triton, (dtype, mode) on cuda (its row kernels take any width)."""
    keys = set()
    for sh, dt, rs, _ in tensors:
        rows = rs and len(sh) == 2 and sh[0] > 0
        if rows or torch.Size(sh).numel():
            keys.add((dt, rows, _row_block(sh[1]) if rows and backend == "triton" else 0))
    return len(keys)


# groups of MULTI and MIXED: triton: fp32 rows in blocks 8, 4, 1 (+ 64, 2048 in MIXED), fp32
# dense, fp16 rows, fp16 dense; cuda: fp32 rows, fp32 dense, fp16 rows, fp16 dense
GROUPS = {"triton": (6, 8), "cuda": (4, 4)}


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("tensors", [MULTI, MIXED], ids=["equal", "mixed"])
def test_multi_tensor_attack_equals_per_tensor_and_torch(tensors, name):
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(sh, generator=gen).to(dt).to(DEVICE) for sh, dt, _, _ in tensors]
    got, states, launches = _multi_attack(tensors, weights, name)
    # the multi-tensor path ran, in 2 launches per group + 1 whatever the number of tensors
    assert _groups(tensors, name) == GROUPS[name][tensors is MIXED], _groups(tensors, name)
    assert launches == 2 * _groups(tensors, name) + 1, launches
    assert any(s.rows is not None for s in states) and any(s.rows is None for s in states)
    torch_ws, _, _ = _multi_attack(tensors, weights, "torch")
    for i, ((sh, dt, _, kind), w, ref) in enumerate(zip(tensors, got, torch_ws)):
        tol = FP32 if dt == torch.float32 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(w, ref, equal_nan=True, **tol, msg=f"tensor {i} {sh} {kind}")
        # the cases happened: inf wrote NaN, NaN and zero skipped the attack, the others moved
        assert w.isnan().any() == (kind == "inf"), (i, kind)
        if w.numel() and kind not in ("inf",):
            assert torch.equal(w, weights[i]) == (kind in ("nan", "zero")), (i, kind)
    for i, (w0, w, (sh, _, rs, kind)) in enumerate(zip(weights, got, tensors)):  # bitwise per tensor
        alone = w0.clone()
        fgm_attack_(alone, _multi_grads(tensors)[i], EPS, row_sparse=rs, backend=name)
        torch.testing.assert_close(w, alone, rtol=0, atol=0, equal_nan=True, msg=f"tensor {i} {sh} {kind}")
    for i, (state, w, w0) in enumerate(zip(states, got, weights)):  # restore: the weights bit for bit
        ops.fgm_restore_(state, w)
        assert torch.equal(w, w0), i
