"""The fused DP-ghost kernels (fastadv.ops.dp_ghost) against the reference math
(fastadv.reference.dp_ghost), and ghost / book-keeping DP with them against
Opacus 1.6's vanilla per-sample mode.

* ``dp_ghost_clip_factors``: per-parameter squared-norm rows ``[n_rows, B]`` ->
  norms, Opacus's clip factors, finite flags;
* ``dp_ghost_clipped_linear_grad``: ``out += sum_b f_b P_b^T Q_b``, dropped
  samples (``f_b = 0``) never read;
* ``dp_ghost_embedding_sq_norms``: an embedding lookup's per-sample squared
  norm from its ids and output gradients;
* ``dp_ghost_vector_sq_norms``: the bias / norm-layer terms of one backward
  added into their rows of the ``[n_params, B]`` buffer;
* ``dp_ghost_clipped_vector_grads``: bk's clipped bias / norm-layer gradients,
  ``sum_b f_b v[b]`` each, in one launch;
* ``dp_ghost_clipped_embedding_grad``: bk's clipped gradient of one embedding
  lookup, deterministic (sorted ids, one owner per table row);
* ``dp_ghost_linear_sq_norms_ps``: the same norm the per-sample way, each
  sample's gradient built tile by tile and never stored;
* ``dp_ghost_cross_gram``: a tied parameter's cross term ``<G^u_b, G^v_b>``
  between two uses (Linear / lookup / a precomputed ``P^u P^v^T``);
* ``dp_ghost_pair_sq_norms_ps``: two uses' ``||G^u_b + G^v_b||^2`` the
  per-sample way, never stored;
* ``dp_ghost_uses_sq_norms_ps``: the same for any number of uses (a layer
  shared three times), the uses from a device table;
* ``dp_ghost_norm_layer_grads`` / ``dp_ghost_group_norm_grads``: a
  LayerNorm's / RMSNorm's / GroupNorm's per-sample weight and bias
  gradients, ``xhat`` recomputed in registers;
* ``dp_ghost_linear_sq_norms`` (the older norm op) is in the opcheck test here.

The triton backend runs under the interpreter on CPU (tests/conftest.py).
"""
import collections
import copy

import pytest
import torch
from torch import nn

import fastadv.kernels as kernels
from fastadv import _backend
from fastadv.dp import ghost
from fastadv.ops import dp_ghost as ops
from fastadv.reference import dp_ghost as ref
from test_dp_ghost import MODELS, _assert_same, _data, fast_grads, opacus_grads

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _launched(name: str, before: collections.Counter) -> int:
    return sum(n - before[k] for k, n in kernels.LAUNCHES.items() if k.split(".", 1)[1] == name)


def _rows(n_rows, batch, *, nonfinite=True):
    rows = torch.rand(n_rows, batch) * 4
    if nonfinite and n_rows and batch > 2:
        rows[0, 1] = float("nan")
        rows[n_rows - 1, 2] = float("inf")
    if batch:
        rows[:, 0] = 0.0  # a zero norm: factor 1
    return rows


# ---------------------------------------------------------------- clip factors

@pytest.mark.parametrize("n_rows,batch", [(1, 1), (3, 7), (5, 300), (0, 4)])
def test_clip_factors_op(backend, n_rows, batch):
    """Against the reference (fp64 sum of the same rows, tolerance: the kernel
    sums in row order) and bitwise between two runs; one launch per call."""
    rows = _rows(n_rows, batch)
    before = collections.Counter(kernels.LAUNCHES)
    f, ok, norms = ops.clip_factors(rows, 0.7, backend=backend)
    assert _launched("dp_ghost_clip_factors", before) == 1
    wf, wok = ref.clip_factors_from_rows(rows.double(), 0.7)
    assert f.dtype == norms.dtype == torch.float32 and ok.dtype == torch.bool and f.shape == (batch,)
    assert torch.equal(ok, wok)
    torch.testing.assert_close(f.double(), wf, rtol=1e-6, atol=0)
    torch.testing.assert_close(norms.double(), rows.double().sum(0).sqrt(), rtol=1e-6, atol=0,
                               equal_nan=True)
    assert (f[~ok] == 0).all() and (f <= 1).all() and (f[ok] > 0).all()
    again = ops.clip_factors(rows, 0.7, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip((f, ok), again[:2]))
    assert torch.equal(norms.nan_to_num(), again[2].nan_to_num())


def test_clip_factors_fp32_equals_opacus_formula(backend):
    """Factors from one row are Opacus's ``(C / (norm + 1e-6)).clamp(max=1)``
    of the fp32 norm, to the last bit (sqrt and division correctly rounded).
    The kernels' sqrt is IEEE (as CUDA's torch.sqrt); torch 2.13's CPU fp32
    sqrt can be 1 ulp off it (seen on this build), so the kernel is compared
    with the fp64 sqrt rounded once to fp32 (exact: 53 >= 2 * 24 + 2 bits),
    the torch backend with torch's own sqrt."""
    rows = _rows(1, 50, nonfinite=False)
    f, ok, norms = ops.clip_factors(rows, 0.7, backend=backend)
    norm = rows[0].sqrt() if backend == "torch" else rows[0].double().sqrt().float()
    assert torch.equal(norms, norm) and ok.all()
    assert torch.equal(f, (0.7 / (norm + 1e-6)).clamp(max=1.0))


@pytest.mark.launch_free
def test_clip_factors_empty_batch(backend):
    f, ok, norms = ops.clip_factors(torch.zeros(3, 0), 1.0, backend=backend)
    assert f.shape == ok.shape == norms.shape == (0,)


# ---------------------------------------------------------------- clipped gradient

# T < 16 with an fp32 operand runs the flattened (b, t) kernel, T >= 16 (or fp16 / bf16 only) the tiled one
SHAPES = [(1, 1, 5, 7), (3, 20, 33, 17), (2, 17, 40, 3), (4, 1, 1, 1), (17, 7, 40, 3), (3, 15, 9, 37),
          (2, 16, 5, 5)]


def _operands(shape, dtype, factors):
    b, t, o, i = shape
    p, q = torch.randn(b, t, o).to(dtype), torch.randn(b, t, i).to(dtype)
    dropped = (factors == 0).nonzero().flatten().tolist()
    for k, s in enumerate(dropped):  # NaN / inf in a dropped sample's operands: never read
        (p if k % 2 == 0 else q)[s, 0, 0] = float("nan")
        q[s, -1, -1] = float("inf")
    return p, q


def _want(out0, p, q, factors):
    """The reference in fp64 from the same (rounded) operands."""
    return ref.add_clipped_use(out0.double().clone(), ref.MatUse(p=p, q=q), factors.double())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_linear_grad_op(backend, shape, dtype):
    b, _, o, i = shape
    factors = torch.rand(b) * 0.9 + 0.05
    factors[1::2] = 0.0  # every other sample dropped (B=1: none)
    p, q = _operands(shape, dtype, factors)
    out0 = torch.randn(o, i)
    out = out0.clone()
    before = collections.Counter(kernels.LAUNCHES)
    assert ops.clipped_linear_grad_(out, p, q, factors, backend=backend) is out
    assert _launched("dp_ghost_clipped_linear_grad", before) == 1
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _want(out0, p, q, factors), rtol=1e-5, atol=1e-5)
    again = out0.clone()
    ops.clipped_linear_grad_(again, p, q, factors, backend=backend)
    assert torch.equal(out, again)  # deterministic
    # accumulate=False: written, the old values (NaN here: uninitialised memory) never read
    fresh = torch.full((o, i), float("nan"))
    ops.clipped_linear_grad_(fresh, p, q, factors, accumulate=False, backend=backend)
    torch.testing.assert_close(fresh.double(), _want(torch.zeros(o, i), p, q, factors), rtol=1e-5, atol=1e-5)


class _Spy:
    """Counts the launches of one Triton kernel (``kernel[grid](...)``)."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.fn[grid]


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float16)])
@pytest.mark.parametrize("steps", [1, 5, 15, 16])
def test_clipped_linear_grad_paths(backend, monkeypatch, dtypes, steps):
    """Which triton kernel runs (the flattened (b, t) one for T < 16 with an
    fp32 operand, else the per-sample tiled one), and both against the
    reference on the same operands (the tiled one forced for T < 16 too)."""
    if backend != "triton":
        pytest.skip("the triton kernels' paths")
    from fastadv.kernels.triton import dp_ghost as tk
    factors = torch.tensor([0.5, 0.0, 1.0, 0.25, 0.7])
    p = torch.randn(5, steps, 21).to(dtypes[0])
    q = torch.randn(5, steps, 34).to(dtypes[1])
    p[1, 0, 0] = float("nan")  # dropped: never read
    want = _want(torch.zeros(21, 34), p, q, factors)
    flat = torch.float32 in dtypes and steps < 16
    for force_tiled in ((False, True) if flat else (False,)):
        spy = _Spy(tk._clipped_linear_grad_flat)
        monkeypatch.setattr(tk, "_clipped_linear_grad_flat", spy)
        if force_tiled:
            monkeypatch.setattr(tk, "flat", lambda *a: False)
        out = torch.zeros(21, 34)
        ops.clipped_linear_grad_(out, p, q, factors, backend=backend)
        assert spy.n == (1 if flat and not force_tiled else 0)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()


@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_linear_grad_all_dropped(backend, dtype):
    """All factors zero: ``out`` is unchanged to the bit, NaN everywhere in p / q."""
    p = torch.full((3, 5, 4), float("nan")).to(dtype)
    q = torch.full((3, 5, 6), float("inf")).to(dtype)
    out0 = torch.randn(4, 6)
    out = out0.clone()
    ops.clipped_linear_grad_(out, p, q, torch.zeros(3), backend=backend)
    assert torch.equal(out, out0)


def test_clipped_linear_grad_strided_and_mixed(backend):
    """Transposed (strided) operands, as a convolution's unfolded patches are,
    and mixed dtypes (autocast: bf16 output gradients, fp32 first-layer input)."""
    factors = torch.tensor([0.3, 0.0, 1.0])
    p = torch.randn(3, 9, 18).transpose(1, 2)                       # [3, 18, 9] strided
    q = torch.randn(3, 5, 18).transpose(1, 2)                       # [3, 18, 5]
    for pp, qq in ((p, q), (p.to(torch.bfloat16), q), (p.to(torch.float16), q.to(torch.bfloat16))):
        out = torch.zeros(9, 5)
        ops.clipped_linear_grad_(out, pp, qq, factors, backend=backend)
        torch.testing.assert_close(out.double(), _want(torch.zeros(9, 5), pp, qq, factors), rtol=1e-5, atol=1e-5)


@pytest.mark.launch_free
def test_clipped_linear_grad_empty(backend):
    """An empty sum: ``out`` unchanged, or zeros with ``accumulate=False``."""
    out0 = torch.randn(4, 3)
    for b, t in ((0, 5), (2, 0)):
        out = out0.clone()
        ops.clipped_linear_grad_(out, torch.randn(b, t, 4), torch.randn(b, t, 3), torch.ones(b), backend=backend)
        assert torch.equal(out, out0)
        out = torch.full((4, 3), float("nan"))
        ops.clipped_linear_grad_(out, torch.randn(b, t, 4), torch.randn(b, t, 3), torch.ones(b), accumulate=False,
                                 backend=backend)
        assert torch.equal(out, torch.zeros(4, 3))


# ---------------------------------------------------------------- embedding norms

EMB_SHAPES = [(1, 1, 5), (3, 20, 33), (2, 17, 3), (4, 1, 1), (2, 40, 9)]


def _ids(kind, b, t):
    if kind == "repeated":  # a small vocabulary: many (t, s) pairs share an id
        return torch.randint(0, 3, (b, t))
    if kind == "equal":     # one id everywhere: the norm is ||sum_t g_t||^2
        return torch.full((b, t), 5)
    return torch.randperm(b * t).reshape(b, t)  # all distinct: sum_t ||g_t||^2


def _emb_want(ids, g):
    """fp64 norms of the materialised per-sample table gradient (index_add of
    the same rounded g): another form than the kernel's Gram walk."""
    rows = int(ids.max()) + 1 if ids.numel() else 1
    return ref.per_sample_grads([ref.MatUse(ids=ids, q=g.double())], rows).flatten(1).square().sum(1)


@pytest.mark.parametrize("kind", ["repeated", "equal", "distinct"])
@pytest.mark.parametrize("shape", EMB_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_sq_norms_op(backend, shape, dtype, kind):
    """Against fp64 per-sample gradients of the same rounded g, over dtypes,
    odd shapes, T = 1, repeated / all-equal / distinct ids; one launch per
    call; bitwise equal between two runs."""
    b, t, d = shape
    ids, g = _ids(kind, b, t), torch.randn(b, t, d).to(dtype)
    before = collections.Counter(kernels.LAUNCHES)
    got = ops.embedding_sq_norms(ids, g, backend=backend)
    assert _launched("dp_ghost_embedding_sq_norms", before) == 1
    assert got.dtype == torch.float32 and got.shape == (b,)
    torch.testing.assert_close(got.double(), _emb_want(ids, g), rtol=1e-5, atol=1e-6)
    if kind == "equal":
        torch.testing.assert_close(got.double(), g.double().sum(1).square().sum(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(got, ops.embedding_sq_norms(ids, g, backend=backend))


def test_embedding_sq_norms_int32_strided_and_out(backend):
    """int32 ids, a non-contiguous g (the kernels copy it), written into a row
    of a [n_params, B] buffer (the other rows untouched)."""
    ids = torch.randint(0, 4, (5, 18), dtype=torch.int32)
    g = torch.randn(5, 7, 18).transpose(1, 2)  # [5, 18, 7] strided
    rows = torch.full((3, 5), 7.0)
    assert ops.embedding_sq_norms(ids, g, backend=backend, out=rows[1]).data_ptr() == rows[1].data_ptr()
    torch.testing.assert_close(rows[1].double(), _emb_want(ids.long(), g), rtol=1e-5, atol=1e-6)
    assert (rows[0] == 7).all() and (rows[2] == 7).all()


def test_embedding_sq_norms_nonfinite(backend):
    """A NaN / an inf in one sample's g makes that sample's norm non-finite
    (as in the reference), the other samples are unaffected."""
    ids = torch.randint(0, 3, (4, 21))
    g = torch.randn(4, 21, 6)
    g[1, 4, 2] = float("nan")
    g[2, 20, 5] = float("inf")
    got = ops.embedding_sq_norms(ids, g, backend=backend)
    want = ref.gram_sq_norms([ref.MatUse(ids=ids, q=g)])
    assert torch.equal(torch.isfinite(got), torch.tensor([True, False, False, True]))
    assert torch.equal(torch.isfinite(want), torch.isfinite(got))
    keep = torch.tensor([0, 3])
    torch.testing.assert_close(got[keep].double(), _emb_want(ids[keep], g[keep]), rtol=1e-5, atol=1e-6)


@pytest.mark.launch_free
def test_embedding_sq_norms_empty_batch(backend):
    out = ops.embedding_sq_norms(torch.zeros(0, 4, dtype=torch.long), torch.randn(0, 4, 3), backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.launch_free
def test_embedding_sq_norms_refusals():
    g = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.embedding_sq_norms(torch.zeros(2, 3), g)
    with pytest.raises(ValueError, match="ids must be \\[B, T\\]"):
        ops.embedding_sq_norms(torch.zeros(2, 4, dtype=torch.long), g)
    with pytest.raises(ValueError, match="out must be"):
        ops.embedding_sq_norms(torch.zeros(2, 3, dtype=torch.long), g, out=torch.empty(3))
    if _backend.why_not("triton", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="float64"):
            ops.embedding_sq_norms(torch.zeros(2, 3, dtype=torch.long), g.double(), backend="triton")


# ---------------------------------------------------------------- vector terms

def _vectors(batch, dtype):
    """Per-sample vectors of odd sizes (a LayerNorm's [B, d], a bias, a
    GroupNorm over [B, 3, 4]-shaped terms, an empty parameter, one wider than
    a 128-element step)."""
    shapes = [(5,), (300,), (3, 4), (0,), (1,), (129,)]
    return [torch.randn(batch, *s).to(dtype) for s in shapes]


def _vec_want(out0, vecs, rows):
    want = out0.double().clone()
    for v, r in zip(vecs, rows):
        want[r] += v.double().flatten(1).square().sum(1)
    return want


VEC_ROWS = [4, 0, 7, 2, 5, 1]  # distinct, unordered; rows 3 and 6 hold other terms


@pytest.mark.parametrize("batch", [1, 5, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_sq_norms_op(backend, dtype, batch):
    """Added into their rows (the other rows untouched, bit for bit) against
    fp64; one launch for all; bitwise equal between two runs."""
    vecs = _vectors(batch, dtype)
    out0 = torch.rand(8, batch)
    out = out0.clone()
    before = collections.Counter(kernels.LAUNCHES)
    assert ops.vector_sq_norms_(out, vecs, VEC_ROWS, backend=backend) is out
    assert _launched("dp_ghost_vector_sq_norms", before) == 1
    torch.testing.assert_close(out.double(), _vec_want(out0, vecs, VEC_ROWS), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[3], out0[3]) and torch.equal(out[6], out0[6])
    again = out0.clone()
    ops.vector_sq_norms_(again, vecs, VEC_ROWS, backend=backend)
    assert torch.equal(out, again)


def test_vector_sq_norms_nonfinite_and_strided(backend):
    """A NaN / an inf in one sample's vector poisons only that sample's cell;
    a non-contiguous vector (the kernels copy it) is read as its values."""
    vecs = _vectors(6, torch.float32)
    vecs[1][2, 17] = float("nan")
    vecs[2][4, 1, 3] = float("inf")
    vecs[0] = torch.randn(5, 6).t()  # [6, 5] strided
    out = torch.zeros(8, 6)
    ops.vector_sq_norms_(out, vecs, VEC_ROWS, backend=backend)
    bad = torch.zeros(8, 6, dtype=torch.bool)
    bad[VEC_ROWS[1], 2] = bad[VEC_ROWS[2], 4] = True
    assert torch.equal(~torch.isfinite(out), bad)
    assert torch.isnan(out[VEC_ROWS[1], 2]) and out[VEC_ROWS[2], 4] == float("inf")
    torch.testing.assert_close(out.double()[~bad], _vec_want(torch.zeros(8, 6), vecs, VEC_ROWS)[~bad],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.launch_free
def test_vector_sq_norms_empty(backend):
    """No vector, or an empty batch: nothing launched, out unchanged."""
    out = torch.rand(3, 4)
    ops.vector_sq_norms_(out.clone(), [], [], backend=backend)
    before = collections.Counter(kernels.LAUNCHES)
    empty = torch.zeros(3, 0)
    ops.vector_sq_norms_(empty, [torch.randn(0, 5)], [1], backend=backend)
    assert _launched("dp_ghost_vector_sq_norms", before) == (0 if backend != "torch" else 1)


@pytest.mark.launch_free
def test_vector_sq_norms_refusals():
    out = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="distinct rows"):
        ops.vector_sq_norms_(out, [torch.randn(4, 2)] * 2, [1, 1])
    with pytest.raises(ValueError, match="distinct rows"):
        ops.vector_sq_norms_(out, [torch.randn(4, 2)], [3])
    with pytest.raises(ValueError, match="B = 4"):
        ops.vector_sq_norms_(out, [torch.randn(5, 2)], [0])
    with pytest.raises(ValueError, match="same length"):
        ops.vector_sq_norms_(out, [torch.randn(4, 2)], [0, 1])
    if _backend.why_not("triton", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="dtype"):
            ops.vector_sq_norms_(out, [torch.randn(4, 2), torch.randn(4, 2).half()], [0, 1], backend="triton")
        with pytest.raises(TypeError, match="float32"):
            ops.vector_sq_norms_(out.half(), [torch.randn(4, 2)], [0], backend="triton")


# ---------------------------------------------------------------- bk's clipped vector gradients

@pytest.mark.parametrize("batch", [0, 1, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_vector_grads_op(backend, dtype, batch):
    """``sum_b f_b v[b]`` per vector against fp64 (B = 0: zeros), a dropped
    sample's NaN / inf never read; one launch for all; bitwise equal between
    two runs."""
    vecs = _vectors(batch, dtype)
    factors = torch.rand(batch) * 0.9 + 0.05
    factors[1::3] = 0.0
    if batch > 4:
        vecs[1][1, 7] = float("nan")
        vecs[2][4, 2, 1] = float("inf")
    before = collections.Counter(kernels.LAUNCHES)
    got = ops.clipped_vector_grads(vecs, factors, backend=backend)
    assert _launched("dp_ghost_clipped_vector_grads", before) == 1
    for g, v in zip(got, vecs):
        assert g.dtype == torch.float32 and g.shape == v.shape[1:]
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), ref.clipped_vector_grad([v.double()], factors.double()),
                                   rtol=1e-5, atol=1e-6)
    again = ops.clipped_vector_grads(vecs, factors, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(got, again))


def test_clipped_vector_grads_all_dropped_and_strided(backend):
    """All factors zero: exact zeros whatever the vectors hold; a
    non-contiguous vector is read as its values."""
    vecs = [torch.full((3, 4), float("nan")), torch.randn(5, 3).t()]
    got = ops.clipped_vector_grads(vecs, torch.zeros(3), backend=backend)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got)
    f = torch.tensor([0.5, 1.0, 0.2])
    got = ops.clipped_vector_grads(vecs[1:], f, backend=backend)
    torch.testing.assert_close(got[0], torch.einsum("b,bd->d", f, vecs[1]), rtol=1e-6, atol=1e-6)


@pytest.mark.launch_free
def test_clipped_vector_grads_refusals():
    with pytest.raises(ValueError, match="B = 3"):
        ops.clipped_vector_grads([torch.randn(4, 2)], torch.ones(3))
    with pytest.raises(ValueError, match="factors must be"):
        ops.clipped_vector_grads([torch.randn(3, 2)], torch.ones(3, 1))
    assert ops.clipped_vector_grads([], torch.ones(3)) == []
    if _backend.why_not("triton", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="float32"):
            ops.clipped_vector_grads([torch.randn(3, 2)], torch.ones(3, dtype=torch.float64), backend="triton")
        with pytest.raises(TypeError, match="dtype"):
            ops.clipped_vector_grads([torch.randn(3, 2), torch.randn(3, 2).half()], torch.ones(3),
                                     backend="triton")


# ---------------------------------------------------------------- bk's clipped embedding gradient

def _emb_grad_want(out0, ids, g, factors):
    return ref.add_clipped_use(out0.double().clone(), ref.MatUse(ids=ids, q=g.double()), factors.double())


@pytest.mark.parametrize("kind", ["repeated", "equal", "distinct"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 20, 33), (2, 17, 130), (4, 1, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_embedding_grad_op(backend, shape, dtype, kind):
    """``out[v] += sum f_b g[b, t]`` over the positions holding id v against
    fp64, dropped samples' NaN / inf never read; one launch; bitwise equal
    between two runs (the rows are summed in a fixed order, no atomics)."""
    b, t, d = shape
    ids, g = _ids(kind, b, t), torch.randn(b, t, d).to(dtype)
    factors = torch.rand(b) * 0.9 + 0.05
    factors[1::2] = 0.0
    if b > 1:
        g[1, 0, 0] = float("nan")
        g[1, -1, -1] = float("inf")
    out0 = torch.randn(int(ids.max()) + 3, d)  # rows no id hits: unchanged
    out = out0.clone()
    before = collections.Counter(kernels.LAUNCHES)
    assert ops.clipped_embedding_grad_(out, ids, g, factors, backend=backend) is out
    assert _launched("dp_ghost_clipped_embedding_grad", before) == 1
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _emb_grad_want(out0, ids, g, factors), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[-2:], out0[-2:])
    again = out0.clone()
    ops.clipped_embedding_grad_(again, ids, g, factors, backend=backend)
    assert torch.equal(out, again)


def test_clipped_embedding_grad_int32_and_strided(backend):
    ids = torch.randint(0, 4, (3, 18), dtype=torch.int32)
    g = torch.randn(3, 7, 18).transpose(1, 2)  # [3, 18, 7] strided
    factors = torch.tensor([0.3, 0.0, 1.0])
    out = torch.zeros(4, 7)
    ops.clipped_embedding_grad_(out, ids, g, factors, backend=backend)
    torch.testing.assert_close(out.double(), _emb_grad_want(torch.zeros(4, 7), ids.long(), g, factors),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.launch_free
def test_clipped_embedding_grad_empty_and_refusals(backend):
    out = torch.randn(4, 3)
    for b, t in ((0, 5), (2, 0)):
        ops.clipped_embedding_grad_(out, torch.zeros(b, t, dtype=torch.long), torch.randn(b, t, 3), torch.ones(b),
                                    backend=backend)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="out \\[V, D\\]"):
        ops.clipped_embedding_grad_(torch.zeros(4, 2), torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 3),
                                    torch.ones(2), backend=backend)


# ---------------------------------------------------------------- the norm op in low precision

@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("shape", [(3, 1, 5, 7), (2, 20, 33, 17)])
def test_linear_sq_norms_low_and_mixed_precision(backend, dtypes, shape):
    """bf16 and mixed dtypes (autocast: fp32 first-layer input, bf16 output
    gradients) against fp64 per-sample gradients of the same rounded inputs
    (tests/test_dp_ghost.py covers fp32 / fp16); one launch per call."""
    b, t, i, o = shape
    a, g = torch.randn(b, t, i).to(dtypes[0]), torch.randn(b, t, o).to(dtypes[1])
    before = collections.Counter(kernels.LAUNCHES)
    got = ops.linear_sq_norms(a, g, backend=backend)
    assert _launched("dp_ghost_linear_sq_norms", before) == 1
    want = torch.bmm(g.double().transpose(1, 2), a.double()).flatten(1).square().sum(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bk_under_low_precision_autocast(backend, dtype):
    """bk under CPU bf16 / fp16 autocast (low-precision output gradients, an
    fp32 then low-precision layer input): norms and the clipped gradient
    against fp64 from the same ``a`` and ``g``."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, _ = _data("mlp", 6)
    m = ghost.GhostClippingModule(model, mode="bk", backend=backend)
    with torch.autocast("cpu", dtype=dtype):
        out = m(x)
    factors, _, mats, vecs = m.dp_backward(out.float().square().sum(1), 0.3)
    assert {u.p.dtype for us in mats.values() for u in us} == {dtype}
    sq = torch.zeros(6, dtype=torch.float64)
    for us in mats.values():
        sq += torch.bmm(us[0].p.double().transpose(1, 2), us[0].q.double()).flatten(1).square().sum(1)
    for vs in vecs.values():
        sq += vs[0].double().square().sum(1)
    torch.testing.assert_close(m.per_sample_gradient_norms.double(), sq.sqrt(), rtol=1e-5, atol=1e-7)
    assert (factors < 1).any()
    want = {p: torch.einsum("b,boi->oi", factors.double(),
                            torch.bmm(us[0].p.double().transpose(1, 2), us[0].q.double())) for p, us in mats.items()}
    m.write_clipped(factors, mats, vecs)
    for p, w in want.items():
        torch.testing.assert_close(p.grad.double(), w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the per-sample-strategy norm

def _ps_want(a, g):
    """fp64 norms of the materialised per-sample gradients (the reference's way)."""
    return ref.per_sample_grads([ref.MatUse(p=g.double(), q=a.double())], g.shape[2]).flatten(1).square().sum(1)


# (B, T, I, O): O, I not multiples of the 32 x 32 tile, T = 1, T over several 16-step tiles
PS_SHAPES = [(3, 5, 37, 45), (2, 1, 1, 1), (4, 1, 33, 70), (2, 50, 33, 31), (1, 17, 64, 32)]


@pytest.mark.parametrize("dtypes", [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16),
                                                                 (torch.float16, torch.float32)])
@pytest.mark.parametrize("shape", PS_SHAPES)
def test_linear_sq_norms_ps_op(backend, shape, dtypes):
    """Against fp64 per-sample gradients of the same rounded inputs (fp32
    accumulation: fp32 tolerance), two launches per call on a kernel backend,
    bitwise equal between two runs, written into ``out``."""
    b, t, i, o = shape
    a, g = torch.randn(b, t, i).to(dtypes[0]), torch.randn(b, t, o).to(dtypes[1])
    before = collections.Counter(kernels.LAUNCHES)
    got = ops.linear_sq_norms_ps(a, g, backend=backend)
    assert _launched("dp_ghost_linear_sq_norms_ps", before) == (1 if backend == "torch" else 2)
    torch.testing.assert_close(got.double(), _ps_want(a, g), rtol=1e-5, atol=1e-6)
    row = torch.full((2, b), 7.0)
    assert ops.linear_sq_norms_ps(a, g, backend=backend, out=row[1]) is not None
    assert torch.equal(row[1], got) and (row[0] == 7.0).all()


def test_linear_sq_norms_ps_strided_conv_patches(backend):
    """A conv's unfolded patches (a transposed view, not contiguous) and a
    transposed output gradient are read through their strides: no copy made
    by the op, same norms as the contiguous inputs."""
    x = torch.randn(3, 2, 7, 7)
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2)  # [B, 49, 18], strided
    g = torch.randn(3, 5, 49).transpose(1, 2)  # [B, 49, 5], strided
    assert not patches.is_contiguous() and not g.is_contiguous()
    got = ops.linear_sq_norms_ps(patches, g, backend=backend)
    torch.testing.assert_close(got.double(), _ps_want(patches, g), rtol=1e-5, atol=1e-6)
    assert torch.equal(got, ops.linear_sq_norms_ps(patches.contiguous(), g.contiguous(), backend=backend))


def test_linear_sq_norms_ps_nonfinite(backend):
    """A NaN / inf sample gets the reference's non-finite norm and does not leak
    into the others (an inf row times a tile's zero padding would be NaN)."""
    a, g = torch.randn(4, 3, 37), torch.randn(4, 3, 45)
    a[1, 2, 5] = float("nan")
    a[2, 0, 36] = float("inf")  # the last column: its tile is padded
    g[3, 1, 44] = float("-inf")
    got = ops.linear_sq_norms_ps(a, g, backend=backend)
    want = _ps_want(a, g)
    assert torch.isfinite(got[0]) and not torch.isfinite(got[1:]).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)


def test_linear_sq_norms_ps_empty(backend):
    """B = 0 launches nothing; an empty gradient (O = 0, or T = 0) has norm 0."""
    assert ops.linear_sq_norms_ps(torch.randn(0, 3, 4), torch.randn(0, 3, 5), backend=backend).shape == (0,)
    assert torch.equal(ops.linear_sq_norms_ps(torch.randn(2, 3, 4), torch.randn(2, 3, 0), backend=backend),
                       torch.zeros(2))
    assert torch.equal(ops.linear_sq_norms_ps(torch.randn(2, 0, 4), torch.randn(2, 0, 5), backend=backend),
                       torch.zeros(2))
    ops.linear_sq_norms_ps(torch.randn(1, 2, 3), torch.randn(1, 2, 3), backend=backend)  # launches something


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_make_private_per_sample_strategy_equals_opacus_vanilla(backend, mode, kind):
    """``strategy="per_sample"``: every single-use Linear / Conv norm runs
    ``dp_ghost_linear_sq_norms_ps`` on a kernel backend (two launches each per
    backward), the torch backend keeps the reference's materialised gradients
    (the op not launched); both equal Opacus vanilla."""
    torch.manual_seed(1)
    model = MODELS[kind]()
    batches = [_data(kind, 4), _data(kind, 4)]
    want = opacus_grads(copy.deepcopy(model), batches, C=0.3)
    before = collections.Counter(kernels.LAUNCHES)
    got, _ = fast_grads(model, batches, C=0.3, mode=mode, backend=backend, strategy="per_sample")
    _assert_same(got, want)
    kernel = backend != "torch"
    assert _launched("dp_ghost_linear_sq_norms_ps", before) == (2 * 2 * LINEAR_USES[kind] if kernel else 0)
    assert _launched("dp_ghost_linear_sq_norms", before) == 0


# ---------------------------------------------------------------- cross terms of a tied parameter

PAD = 0  # a padding id: the lookup's rows of q at it are zeroed (as ghost.py's _embedding does)
# (B, T_u, T_v, I, O): T_u != T_v (either way), I and O not powers of two, T over several 16-step tiles
CROSS_SHAPES = [(1, 1, 1, 1, 1), (3, 20, 17, 9, 13), (2, 5, 33, 37, 6), (1, 40, 3, 5, 70)]
CROSS_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                (torch.float32, torch.bfloat16)]
CROSS_KINDS = ["dense", "gather", "swapped", "ids", "pp"]


def _lookup(b, t, i, vocab, dtype):
    """A lookup with repeated ids (a vocabulary smaller than T) and padding ids, its pad rows of q zeroed."""
    ids = torch.randint(0, max(1, min(vocab, 4)), (b, t))
    ids[:, ::3] = torch.randint(0, vocab, (b, len(range(0, t, 3))))
    q = torch.randn(b, t, i) * (ids != PAD)[:, :, None]
    return ref.MatUse(ids=ids, q=q.to(dtype))


def _cross_case(kind, shape, dtypes):
    """``(u, v, pp, rows, full)``: the two uses of one ``[rows, I]`` matrix the op
    gets, and the same two uses with all their operands (for the fp64 want)."""
    b, t_u, t_v, i, o = shape
    du, dv = dtypes
    u = ref.MatUse(p=torch.randn(b, t_u, o).to(du), q=torch.randn(b, t_u, i).to(du))
    if kind == "dense":
        v = ref.MatUse(p=torch.randn(b, t_v, o).to(dv), q=torch.randn(b, t_v, i).to(dv))
        return u, v, None, o, (u, v)
    v = _lookup(b, t_v, i, o, dv)
    if kind == "ids":
        u = _lookup(b, t_u, i, o, du)
    if kind == "swapped":  # a lookup first, a Linear second: the op swaps them
        u, v = v, u
    if kind == "pp":  # ghost mode's tied head: P^u gathered at the ids, P^u and the ids not passed
        return ref.MatUse(q=u.q), ref.MatUse(q=v.q), ref.gather_pp(u, v.ids), o, (u, v)
    return u, v, None, o, (u, v)


def _grad64(w: ref.MatUse, rows: int) -> torch.Tensor:
    p = w.p.double() if w.p is not None else None
    return ref.per_sample_grads([ref.MatUse(q=w.q.double(), p=p, ids=w.ids)], rows)


def _cross_want(u, v, rows):
    """fp64 ``<G^u_b, G^v_b>`` of the materialised per-sample gradients of the
    same rounded operands, and ``||G^u_b|| ||G^v_b||`` (the scale of the
    rounding error: a cross term may cancel to about 0)."""
    gu, gv = _grad64(u, rows), _grad64(v, rows)
    return (gu * gv).sum((1, 2)), gu.flatten(1).norm(dim=1) * gv.flatten(1).norm(dim=1)


def _assert_cross(got, want, bound):
    err = (got.double() - want).abs()
    assert (err <= 1e-5 * (want.abs() + bound) + 1e-6).all(), f"{got} vs {want} (bound {bound})"


@pytest.mark.parametrize("kind", CROSS_KINDS)
@pytest.mark.parametrize("shape", CROSS_SHAPES)
@pytest.mark.parametrize("dtypes", CROSS_DTYPES)
def test_cross_gram_op(backend, kind, shape, dtypes):
    """``<G^u_b, G^v_b>`` of two uses of one matrix (Linear x Linear, Linear x
    lookup either way, lookup x lookup, a precomputed ``P^u P^v^T``) against
    fp64 per-sample gradients of the same rounded operands, over dtypes (mixed
    included), T_u != T_v, B = 1, repeated and padding ids; two launches per
    call on a kernel backend; bitwise equal between two runs."""
    u, v, pp, rows, full = _cross_case(kind, shape, dtypes)
    before = collections.Counter(kernels.LAUNCHES)
    got = ops.cross_gram(u, v, pp, backend=backend)
    assert _launched("dp_ghost_cross_gram", before) == (1 if backend == "torch" else 2)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    want, bound = _cross_want(*full, rows)
    _assert_cross(got, want, bound)
    assert torch.equal(got, ops.cross_gram(u, v, pp, backend=backend))


def test_cross_gram_self_term_is_the_norm(backend):
    """``u is v``: the use's own squared norm, as the single-use norm ops
    (another kernel: fp32 rounding apart)."""
    u, v, _, _, _ = _cross_case("gather", (3, 20, 17, 9, 13), (torch.float32, torch.float32))
    for w, norm in ((u, lambda w: ops.linear_sq_norms(w.q, w.p, backend=backend)),
                    (v, lambda w: ops.embedding_sq_norms(w.ids, w.q, backend=backend))):
        torch.testing.assert_close(ops.cross_gram(w, w, backend=backend), norm(w), rtol=1e-5, atol=1e-6)


def test_cross_gram_out_row_scale_and_accumulate(backend):
    """Written (``accumulate=False``) or added (``accumulate=True``) into a row of
    a ``[n_params, B]`` buffer, scaled; the other rows untouched."""
    u, v, _, _, _ = _cross_case("dense", (4, 5, 7, 6, 3), (torch.float32, torch.float32))
    c = ops.cross_gram(u, v, backend=backend)
    rows = torch.full((3, 4), 7.0)
    assert ops.cross_gram(u, v, scale=2.0, out=rows[1], backend=backend).data_ptr() == rows[1].data_ptr()
    assert torch.equal(rows[1], 2 * c)
    ops.cross_gram(u, v, scale=2.0, out=rows[1], accumulate=True, backend=backend)
    assert torch.equal(rows[1], 2 * c + 2 * c)
    ops.cross_gram(u, v, out=rows[2], accumulate=True, backend=backend)
    assert torch.equal(rows[2], 7.0 + c) and (rows[0] == 7.0).all()


def test_cross_gram_strided_and_int32(backend):
    """Transposed (non-contiguous) operands and int32 ids are read through their
    strides, no copy: on a kernel backend bitwise the contiguous operands' result
    (torch's bmm may order a strided product differently)."""
    b, t_u, t_v, i, o = 2, 18, 5, 7, 11
    pu, qu = torch.randn(b, o, t_u).transpose(1, 2), torch.randn(b, i, t_u).transpose(1, 2)
    pv, qv = torch.randn(b, t_v, 2 * o)[:, :, ::2], torch.randn(b, t_v, 3 * i)[:, :, 1::3]  # other strides than u's
    ids = torch.randint(0, o, (b, 2 * t_v), dtype=torch.int32)[:, ::2]
    assert not any(t.is_contiguous() for t in (pu, qu, pv, qv, ids))
    pairs = [(ref.MatUse(p=pu, q=qu), ref.MatUse(p=pv, q=qv)), (ref.MatUse(p=pu, q=qu), ref.MatUse(ids=ids, q=qv)),
             (ref.MatUse(ids=ids, q=qv), ref.MatUse(ids=ids.flip(1), q=qv))]
    dense = lambda w: ref.MatUse(q=w.q.contiguous(), p=None if w.p is None else w.p.contiguous(),  # noqa: E731
                                 ids=None if w.ids is None else w.ids.long().contiguous())
    for u, v in pairs:
        got = ops.cross_gram(u, v, backend=backend)
        if backend != "torch":
            assert torch.equal(got, ops.cross_gram(dense(u), dense(v), backend=backend))
        want, bound = _cross_want(dense(u), dense(v), o)
        _assert_cross(got, want, bound)


def test_cross_gram_nonfinite(backend):
    """A NaN in one sample's q, an inf in another's (gathered) P: those samples
    get the reference's NaN / inf, the others are unaffected."""
    u, v, _, rows, _ = _cross_case("gather", (4, 20, 17, 9, 13), (torch.float32, torch.float32))
    u.q[1, 2, 3] = float("nan")
    u.p[2, 19, v.ids[2, 16]] = float("inf")
    v.q[2, 16] = 1.0  # the inf meets a non-zero Q Gram entry
    got = ops.cross_gram(u, v, backend=backend)
    want = ref.cross_gram(u, v)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(torch.isfinite(got), torch.tensor([True, False, False, True]))
    keep = torch.tensor([0, 3])
    sub = lambda w: ref.MatUse(q=w.q[keep], p=None if w.p is None else w.p[keep],  # noqa: E731
                               ids=None if w.ids is None else w.ids[keep])
    _assert_cross(got[keep], *_cross_want(sub(u), sub(v), rows))


def test_cross_gram_empty(backend):
    """B = 0: nothing; T_u = 0 or T_v = 0: an empty sum, 0 written (accumulate: left)."""
    assert ops.cross_gram(ref.MatUse(p=torch.randn(0, 3, 4), q=torch.randn(0, 3, 5)),
                          ref.MatUse(p=torch.randn(0, 2, 4), q=torch.randn(0, 2, 5)), backend=backend).shape == (0,)
    u, v = ref.MatUse(p=torch.randn(2, 0, 4), q=torch.randn(2, 0, 5)), ref.MatUse(ids=torch.zeros(2, 3).long(),
                                                                                   q=torch.randn(2, 3, 5))
    row = torch.full((2,), 7.0)
    assert torch.equal(ops.cross_gram(u, v, out=row, accumulate=True, backend=backend), torch.full((2,), 7.0))
    assert torch.equal(ops.cross_gram(v, u, backend=backend), torch.zeros(2))
    ops.cross_gram(v, v, backend=backend)  # launches something


@pytest.mark.launch_free
def test_cross_gram_refusals():
    q = torch.randn(2, 3, 4)
    lin, emb = ref.MatUse(p=torch.randn(2, 3, 5), q=q), ref.MatUse(ids=torch.zeros(2, 3).long(), q=q)
    with pytest.raises(ValueError, match="same B and I"):
        ops.cross_gram(lin, ref.MatUse(p=torch.randn(2, 3, 5), q=torch.randn(2, 3, 6)))
    with pytest.raises(ValueError, match="same O"):
        ops.cross_gram(lin, ref.MatUse(p=torch.randn(2, 3, 6), q=q))
    with pytest.raises(ValueError, match="exactly one of p"):
        ops.cross_gram(lin, ref.MatUse(q=q))
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.cross_gram(lin, ref.MatUse(ids=torch.zeros(2, 3), q=q))
    with pytest.raises(ValueError, match="pp must be"):
        ops.cross_gram(lin, emb, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="out must be"):
        ops.cross_gram(lin, emb, out=torch.empty(3))
    if _backend.why_not("triton", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="float64"):
            ops.cross_gram(lin, ref.MatUse(ids=emb.ids, q=q.double()), backend="triton")


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_per_sample_strategy_embedding_runs_the_gram_kernel(backend, mode):
    """``strategy="per_sample"`` on the tied-head LM: on a kernel backend the
    single-use position embedding's norm is ``dp_ghost_embedding_sq_norms``
    (the per-sample table gradient's norm equals the Gram form's: no ``[B, V,
    d]``); bk's tied table runs ``dp_ghost_pair_sq_norms_ps`` (its two uses
    tile by tile), while ghost mode's tied terms are Gram terms whatever the
    strategy (cross-Gram calls); the torch backend launches none of them;
    all equal Opacus vanilla."""
    torch.manual_seed(1)
    model = MODELS["lm"]()
    batches = [_data("lm", 4), _data("lm", 4)]
    want = opacus_grads(copy.deepcopy(model), batches, C=0.3)
    before = collections.Counter(kernels.LAUNCHES)
    got, _ = fast_grads(model, batches, C=0.3, mode=mode, backend=backend, strategy="per_sample")
    _assert_same(got, want)
    kernel = backend != "torch"
    assert _launched("dp_ghost_embedding_sq_norms", before) == (2 * EMBEDDING_USES["lm"] if kernel else 0)
    assert _launched("dp_ghost_cross_gram", before) == (2 * 2 * TIED_TERMS["lm"] if kernel and mode == "ghost"
                                                        else 0)
    assert _launched("dp_ghost_linear_sq_norms_ps", before) == (2 * 2 * 2 if kernel else 0)  # qkv, proj
    assert _launched("dp_ghost_pair_sq_norms_ps", before) == (2 * 2 if kernel and mode == "bk" else 0)


def test_per_sample_embedding_norm_equals_materialised():
    """On the triton backend the module's per-sample-strategy norm of a single
    embedding (repeated and padding ids) is one Gram-kernel launch and equals
    the torch backend's materialised table gradient (the reference's
    per-sample way, nothing launched: so no backend fixture here)."""
    if _backend.why_not("triton", torch.device("cpu")) is not None:
        pytest.skip("triton backend unavailable")
    torch.manual_seed(6)
    emb = nn.Embedding(7, 5, padding_idx=0)
    ids = torch.randint(0, 3, (4, 9))
    norms = {}
    for be in ("torch", "triton"):
        m = ghost.GhostClippingModule(copy.deepcopy(emb), mode="bk", strategy="per_sample", backend=be)
        before = collections.Counter(kernels.LAUNCHES)
        m.dp_backward(m(ids).sin().sum((1, 2)), 1.0)
        assert _launched("dp_ghost_embedding_sq_norms", before) == (be == "triton")
        norms[be] = m.per_sample_gradient_norms
    assert (ids == 0).any() and norms["torch"].min() > 0
    torch.testing.assert_close(norms["triton"], norms["torch"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- two uses, the per-sample way

def _pair_want(u, v, rows):
    """fp64 ``||G^u_b + G^v_b||^2`` of the materialised per-sample gradients."""
    return (_grad64(u, rows) + _grad64(v, rows)).flatten(1).square().sum(1)


# (B, T_u, T_v, I, O): rows / columns not multiples of the 32 x 32 tile, T over several 16-step chunks
PAIR_SHAPES = [(1, 1, 1, 1, 1), (3, 20, 17, 9, 45), (2, 5, 33, 37, 6), (1, 3, 40, 33, 70)]


@pytest.mark.parametrize("kind", ["dense", "gather", "swapped", "ids"])
@pytest.mark.parametrize("shape", PAIR_SHAPES)
@pytest.mark.parametrize("dtypes", CROSS_DTYPES)
def test_pair_sq_norms_ps_op(backend, kind, shape, dtypes):
    """Two uses of one matrix (Linear x Linear, Linear x lookup either way,
    lookup x lookup: repeated and padding ids) the per-sample way against
    fp64 per-sample gradients of the same rounded operands, over dtypes,
    T_u != T_v, B = 1; two launches per call on a kernel backend; bitwise
    equal between two runs; written into ``out``."""
    u, v, _, rows, _ = _cross_case(kind, shape, dtypes)
    before = collections.Counter(kernels.LAUNCHES)
    got = ops.pair_sq_norms_ps(u, v, rows, backend=backend)
    assert _launched("dp_ghost_pair_sq_norms_ps", before) == (1 if backend == "torch" else 2)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), _pair_want(u, v, rows), rtol=1e-5, atol=1e-6)
    row = torch.full((2, shape[0]), 7.0)
    ops.pair_sq_norms_ps(u, v, rows, backend=backend, out=row[1])
    assert torch.equal(row[1], got) and (row[0] == 7.0).all()


def test_pair_sq_norms_ps_strided_and_nonfinite(backend):
    """Strided operands and int32 ids (bitwise the contiguous result on a
    kernel backend); a NaN in one sample's lookup, an inf in another's: the
    reference's NaN / inf (the lookup's inf stays in its row: inf, not NaN),
    the other samples unaffected."""
    b, t_u, t_v, i, o = 5, 18, 21, 7, 40
    u = ref.MatUse(p=torch.randn(b, o, t_u).transpose(1, 2), q=torch.randn(b, i, t_u).transpose(1, 2))
    v = ref.MatUse(ids=torch.randint(0, o, (b, 2 * t_v), dtype=torch.int32)[:, ::2],
                   q=torch.randn(b, t_v, 3 * i)[:, :, 1::3])
    dense = lambda w: ref.MatUse(q=w.q.contiguous(), p=None if w.p is None else w.p.contiguous(),  # noqa: E731
                                 ids=None if w.ids is None else w.ids.long().contiguous())
    got = ops.pair_sq_norms_ps(u, v, o, backend=backend)
    if backend != "torch":
        assert torch.equal(got, ops.pair_sq_norms_ps(dense(u), dense(v), o, backend=backend))
    torch.testing.assert_close(got.double(), _pair_want(dense(u), dense(v), o), rtol=1e-5, atol=1e-6)
    u, v = dense(u), dense(v)
    v.q[1, 3, 2] = float("nan")
    v.q[2, 20, 6] = float("inf")
    u.q[4, 5, 6] = float("inf")  # times the zero padding rows of P's last tile (O = 40): must not be NaN
    got = ops.pair_sq_norms_ps(u, v, o, backend=backend)
    want = ref.matrix_sq_norms([u, v], o, "per_sample")
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.isnan(got[1]) and torch.isinf(got[[2, 4]]).all() and torch.isfinite(got[[0, 3]]).all()
    keep = torch.tensor([0, 3])
    sub = lambda w: ref.MatUse(q=w.q[keep], p=None if w.p is None else w.p[keep],  # noqa: E731
                               ids=None if w.ids is None else w.ids[keep])
    torch.testing.assert_close(got[keep].double(), _pair_want(sub(u), sub(v), o), rtol=1e-5, atol=1e-6)


def test_pair_sq_norms_ps_empty_and_refusals(backend):
    """B = 0 launches nothing; T = 0 for both uses, or I = 0: norm 0; a
    Linear's P must have ``rows`` columns."""
    lin = lambda b, t, i: ref.MatUse(p=torch.randn(b, t, 5), q=torch.randn(b, t, i))  # noqa: E731
    emb = lambda b, t, i: ref.MatUse(ids=torch.zeros(b, t).long(), q=torch.randn(b, t, i))  # noqa: E731
    assert ops.pair_sq_norms_ps(lin(0, 3, 4), emb(0, 2, 4), 5, backend=backend).shape == (0,)
    assert torch.equal(ops.pair_sq_norms_ps(lin(2, 0, 4), emb(2, 0, 4), 5, backend=backend), torch.zeros(2))
    assert torch.equal(ops.pair_sq_norms_ps(lin(2, 3, 0), emb(2, 1, 0), 5, backend=backend), torch.zeros(2))
    with pytest.raises(ValueError, match="rows = 6 columns"):
        ops.pair_sq_norms_ps(lin(2, 3, 4), emb(2, 1, 4), 6, backend=backend)
    ops.pair_sq_norms_ps(lin(1, 2, 3), emb(1, 2, 3), 5, backend=backend)  # launches something


# ---------------------------------------------------------------- any number of uses, the per-sample way

def _uses_want(uses, rows):
    """fp64 ``||sum_u G^u_b||^2`` of the materialised per-sample gradients."""
    return sum(_grad64(w, rows) for w in uses).flatten(1).square().sum(1)


def _uses_case(kind, b, i, o, dtypes):
    """Uses of one ``[o, i]`` matrix: ``"linear"`` three Linear uses (T 20, 3, 17:
    ALBERT's shared layer), ``"mixed"`` Linear, lookup, Linear, ``"lookups"``
    a Linear among three lookups (repeated and padding ids), ``"ids"`` three
    lookups.  ``dtypes``: the Linear uses' (p, q) dtypes and the lookups' q."""
    dp, dq, dl = dtypes
    lin = lambda t: ref.MatUse(p=torch.randn(b, t, o).to(dp), q=torch.randn(b, t, i).to(dq))  # noqa: E731
    look = lambda t: _lookup(b, t, i, o, dl)  # noqa: E731
    return {"linear": lambda: [lin(20), lin(3), lin(17)], "mixed": lambda: [lin(5), look(18), lin(33)],
            "lookups": lambda: [look(4), look(33), lin(9), look(1)], "ids": lambda: [look(3), look(17), look(2)]}[kind]()


USES_DTYPES = [(torch.float32,) * 3, (torch.float16,) * 3, (torch.bfloat16,) * 3,
               (torch.bfloat16, torch.float32, torch.float32)]  # autocast: bf16 output gradients, fp32 inputs


@pytest.mark.parametrize("kind", ["linear", "mixed", "lookups", "ids"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 9, 45), (2, 37, 6)])
@pytest.mark.parametrize("dtypes", USES_DTYPES)
def test_uses_sq_norms_ps_op(backend, kind, shape, dtypes):
    """Three or four uses of one matrix the per-sample way against fp64
    per-sample gradients of the same rounded operands, over dtypes (mixed
    as autocast makes them), odd shapes, B = 1; two launches per call on a
    kernel backend (the table copy is not a launch); written into ``out``."""
    b, i, o = shape
    uses = _uses_case(kind, b, i, o, dtypes)
    before = collections.Counter(kernels.LAUNCHES)
    got = ops.uses_sq_norms_ps(uses, o, backend=backend)
    assert _launched("dp_ghost_uses_sq_norms_ps", before) == (1 if backend == "torch" else 2)
    assert got.dtype == torch.float32 and got.shape == (b,)
    torch.testing.assert_close(got.double(), _uses_want(uses, o), rtol=1e-5, atol=1e-6)
    row = torch.full((2, b), 7.0)
    ops.uses_sq_norms_ps(uses, o, backend=backend, out=row[1])
    assert torch.equal(row[1], got) and (row[0] == 7.0).all()


def test_uses_sq_norms_ps_strided_and_nonfinite(backend):
    """Strided operands and int32 ids (bitwise the contiguous result on a
    kernel backend); a NaN in one sample's lookup, an inf in another's
    Linear input: the reference's NaN / inf, the other samples unaffected."""
    b, i, o = 5, 7, 40
    lin = ref.MatUse(p=torch.randn(b, o, 18).transpose(1, 2), q=torch.randn(b, i, 18).transpose(1, 2))
    lin2 = ref.MatUse(p=torch.randn(b, 6, 2 * o)[:, :, ::2], q=torch.randn(b, 6, i))
    look = ref.MatUse(ids=torch.randint(0, o, (b, 42), dtype=torch.int32)[:, ::2],
                      q=torch.randn(b, 21, 3 * i)[:, :, 1::3])
    dense = lambda w: ref.MatUse(q=w.q.contiguous(), p=None if w.p is None else w.p.contiguous(),  # noqa: E731
                                 ids=None if w.ids is None else w.ids.long().contiguous())
    uses = [lin, look, lin2]
    got = ops.uses_sq_norms_ps(uses, o, backend=backend)
    if backend != "torch":
        assert torch.equal(got, ops.uses_sq_norms_ps([dense(w) for w in uses], o, backend=backend))
    torch.testing.assert_close(got.double(), _uses_want([dense(w) for w in uses], o), rtol=1e-5, atol=1e-6)
    uses = [dense(w) for w in uses]
    uses[1].q[1, 3, 2] = float("nan")
    uses[0].q[2, 5, 6] = float("inf")
    got = ops.uses_sq_norms_ps(uses, o, backend=backend)
    want = ref.matrix_sq_norms(uses, o, "per_sample")
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 3, 4]]).all()
    keep = torch.tensor([0, 3, 4])
    sub = lambda w: ref.MatUse(q=w.q[keep], p=None if w.p is None else w.p[keep],  # noqa: E731
                               ids=None if w.ids is None else w.ids[keep])
    torch.testing.assert_close(got[keep].double(), _uses_want([sub(w) for w in uses], o), rtol=1e-5, atol=1e-6)


def test_uses_sq_norms_ps_empty_and_refusals(backend):
    """B = 0 launches nothing; every T = 0, or I = 0: norm 0; a Linear's P
    must have ``rows`` columns, uses must agree on B and I (the message names
    the use)."""
    lin = lambda b, t, i, dt=torch.float32: ref.MatUse(p=torch.randn(b, t, 5, dtype=dt),  # noqa: E731
                                                      q=torch.randn(b, t, i, dtype=dt))
    emb = lambda b, t, i: ref.MatUse(ids=torch.zeros(b, t).long(), q=torch.randn(b, t, i))  # noqa: E731
    assert ops.uses_sq_norms_ps([lin(0, 3, 4), emb(0, 2, 4), lin(0, 1, 4)], 5, backend=backend).shape == (0,)
    assert torch.equal(ops.uses_sq_norms_ps([lin(2, 0, 4)] * 3, 5, backend=backend), torch.zeros(2))
    assert torch.equal(ops.uses_sq_norms_ps([lin(2, 3, 0), emb(2, 1, 0), lin(2, 2, 0)], 5, backend=backend),
                       torch.zeros(2))
    with pytest.raises(ValueError, match="rows = 6 columns"):
        ops.uses_sq_norms_ps([lin(2, 3, 4), emb(2, 1, 4), lin(2, 1, 4)], 6, backend=backend)
    with pytest.raises(ValueError, match=r"uses\[2\].*same B and I"):
        ops.uses_sq_norms_ps([lin(2, 3, 4), emb(2, 1, 4), lin(2, 1, 3)], 5, backend=backend)
    with pytest.raises(ValueError, match="non-empty list"):
        ops.uses_sq_norms_ps([], 5, backend=backend)
    ops.uses_sq_norms_ps([lin(1, 2, 3), emb(1, 2, 3), lin(1, 1, 3)], 5, backend=backend)  # launches something


def test_uses_sq_norms_ps_mixed_dtypes(backend):
    """Uses whose operands of one kind come in two dtypes (a shared layer under
    autocast: an fp32 input first, bf16 after; int32 and int64 ids): the
    kernel widens that kind to fp32 (int64) first and equals fp64; the
    backend under test runs (the fixture checks), nothing raises."""
    torch.manual_seed(8)
    lin = lambda t, dp, dq: ref.MatUse(p=torch.randn(2, t, 5).to(dp), q=torch.randn(2, t, 4).to(dq))  # noqa: E731
    uses = [lin(3, torch.bfloat16, torch.float32), lin(2, torch.bfloat16, torch.bfloat16),
            lin(4, torch.float16, torch.bfloat16),
            ref.MatUse(ids=torch.randint(0, 5, (2, 6), dtype=torch.int32), q=torch.randn(2, 6, 4)),
            ref.MatUse(ids=torch.randint(0, 5, (2, 3)), q=torch.randn(2, 3, 4).bfloat16())]
    before = collections.Counter(kernels.LAUNCHES)
    got = ops.uses_sq_norms_ps(uses, 5, backend=backend)
    assert _launched("dp_ghost_uses_sq_norms_ps", before) == (1 if backend == "torch" else 2)
    torch.testing.assert_close(got.double(), _uses_want(uses, 5), rtol=1e-5, atol=1e-6)


class SharedLayer(nn.Module):
    """ALBERT's parameter sharing: one Linear (and one LayerNorm) applied three
    times, after an embedding."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb, self.layer, self.ln = nn.Embedding(vocab, d), nn.Linear(d, d), nn.LayerNorm(d)
        self.out = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids)
        for _ in range(3):
            h = h + torch.tanh(self.layer(self.ln(h)))
        return self.out(h.mean(1))


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_shared_layer_per_sample_strategy(backend, mode):
    """A layer shared three times, ``strategy="per_sample"``, two
    micro-batches: equal to Opacus vanilla; bk's shared matrix takes
    ``dp_ghost_uses_sq_norms_ps`` on a kernel backend (two launches per
    backward), ghost's takes cross-Gram terms whatever the strategy (none of
    it); the torch backend launches no kernel."""
    torch.manual_seed(3)
    model = SharedLayer()
    batches = [(torch.randint(0, 11, (4, 9)), torch.randint(0, 3, (4,))) for _ in range(2)]
    want = opacus_grads(copy.deepcopy(model), batches, C=0.2)
    before = collections.Counter(kernels.LAUNCHES)
    got, _ = fast_grads(model, batches, C=0.2, mode=mode, backend=backend, strategy="per_sample")
    _assert_same(got, want)
    uses = _launched("dp_ghost_uses_sq_norms_ps", before)
    assert uses == (2 * 2 if backend != "torch" and mode == "bk" else 0)


class AlbertLogits(nn.Module):
    """An HF ALBERT classifier built from a config (embedding 8 -> hidden 16,
    one layer group shared by 3 layers, dropout off), fed position and
    token-type ids of shape [B, T]."""

    def __init__(self):
        super().__init__()
        from transformers import AlbertConfig, AlbertForSequenceClassification
        cfg = AlbertConfig(vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                           num_attention_heads=2, intermediate_size=24, max_position_embeddings=16, num_labels=3,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
        self.model = AlbertForSequenceClassification(cfg)

    def forward(self, ids):
        b, t = ids.shape
        pos = torch.arange(t).expand(b, t).contiguous()
        return self.model(input_ids=ids, position_ids=pos, token_type_ids=torch.zeros_like(ids)).logits


# ALBERT's shared layer: 6 weight matrices (q, k, v, attention dense, ffn, ffn_output), 3 uses each
ALBERT_SHARED = 6


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_albert_shared_layers(backend, mode):
    """HF ALBERT (one layer's weights used by all 3 layers), ``strategy=
    "per_sample"``, two micro-batches: equal to Opacus vanilla (ids from 1:
    its padding row is the documented difference); on a kernel backend bk's
    shared matrices take ``dp_ghost_uses_sq_norms_ps`` (2 launches each per
    backward), ghost's their 3 own and 3 cross Gram terms (``dp_ghost_cross_gram``,
    2 launches each)."""
    torch.manual_seed(0)
    model = AlbertLogits()
    batches = [(torch.randint(1, 30, (4, 9)), torch.randint(0, 3, (4,))) for _ in range(2)]
    want = opacus_grads(copy.deepcopy(model), batches, C=0.3)
    before = collections.Counter(kernels.LAUNCHES)
    got, _ = fast_grads(model, batches, C=0.3, mode=mode, backend=backend, strategy="per_sample")
    _assert_same(got, want)
    kernel = backend != "torch"
    assert _launched("dp_ghost_uses_sq_norms_ps", before) == (2 * 2 * ALBERT_SHARED if kernel and mode == "bk"
                                                              else 0)
    assert _launched("dp_ghost_cross_gram", before) == (2 * 2 * 6 * ALBERT_SHARED if kernel and mode == "ghost"
                                                        else 0)


# ---------------------------------------------------------------- norm layers' per-sample gradients

def _norm_want(a, g, eps, rms):
    return ref.norm_layer_grads(a.double(), g.double(), eps, rms)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 1, 64), (1, 19, 33), (4, 0, 5), (0, 3, 4), (2, 3, 0)])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.float16,) * 2, (torch.bfloat16,) * 2,
                                    (torch.float32, torch.bfloat16)])
def test_norm_layer_grads_op(backend, rms, shape, dtypes):
    """LayerNorm / RMSNorm per-sample weight and bias gradients against fp64
    (``xhat`` of the same rounded input), over dtypes (autocast's fp32 input
    with bf16 output gradients), ``B = 0 / 1``, ``T = 0 / 1``, ``D = 0 / 1``,
    odd ``D``; one launch (a kernel: none for an empty result); each
    output alone; bitwise equal between runs."""
    torch.manual_seed(2)
    a, g = torch.randn(shape).to(dtypes[0]) * 3 + 1, torch.randn(shape).to(dtypes[1])
    before = collections.Counter(kernels.LAUNCHES)
    w, b = ops.norm_layer_grads(a, g, 1e-5, rms=rms, backend=backend)
    assert _launched("dp_ghost_norm_layer_grads", before) == (1 if backend == "torch" or shape[0] * shape[2] else 0)
    assert w.dtype == b.dtype == torch.float32 and w.shape == b.shape == (shape[0], shape[2])
    w64, b64 = _norm_want(a, g, 1e-5, rms)
    torch.testing.assert_close(w.double(), w64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.double(), b64, rtol=1e-5, atol=1e-5)
    w_only, none = ops.norm_layer_grads(a, g, 1e-5, rms=rms, bias=False, backend=backend)
    none2, b_only = ops.norm_layer_grads(a, g, 1e-5, rms=rms, weight=False, backend=backend)
    assert none is None and none2 is None and torch.equal(w_only, w) and torch.equal(b_only, b)
    ops.norm_layer_grads(torch.randn(1, 1, 2), torch.randn(1, 1, 2), 1e-5, backend=backend)  # launches something


def test_norm_layer_grads_strided_and_nonfinite(backend):
    """Strided input and gradient (bitwise the contiguous result on a kernel
    backend); a NaN in one sample's input, an inf in another's gradient: the
    reference's NaN / inf in those samples' rows only."""
    torch.manual_seed(4)
    a = torch.randn(4, 2 * 9, 11)[:, ::2]
    g = torch.randn(4, 11, 9).transpose(1, 2)
    w, b = ops.norm_layer_grads(a, g, 1e-6, backend=backend)
    if backend != "torch":
        wc, bc = ops.norm_layer_grads(a.contiguous(), g.contiguous(), 1e-6, backend=backend)
        assert torch.equal(w, wc) and torch.equal(b, bc)
    w64, b64 = _norm_want(a, g, 1e-6, False)
    torch.testing.assert_close(w.double(), w64, rtol=1e-5, atol=1e-5)
    a, g = a.contiguous(), g.contiguous()
    a[1, 3, 2] = float("nan")
    g[2, 0, 5] = float("inf")
    w, b = ops.norm_layer_grads(a, g, 1e-6, backend=backend)
    w64, b64 = _norm_want(a, g, 1e-6, False)
    for got, want in ((w, w64), (b, b64)):
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.isfinite(got[[0, 3]]).all()
        torch.testing.assert_close(got[[0, 3]].double(), want[[0, 3]], rtol=1e-5, atol=1e-5)
    assert torch.isnan(w[1]).all() and torch.isfinite(b[1]).all() and torch.isinf(b[2, 5])


def test_norm_layer_grads_refusals(monkeypatch):
    """Shapes must match and be ``[B, T, D]``; fp64 runs on the torch backend in
    fp64 (a forced triton refuses it); a ``D`` over the kernel's limit: auto
    runs torch, forced triton raises."""
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="both be"):
        ops.norm_layer_grads(a, torch.randn(2, 3, 5), 1e-5)
    with pytest.raises(ValueError, match=r"\[B, T, I\]"):
        ops.norm_layer_grads(a[0], a[0], 1e-5)
    w, _ = ops.norm_layer_grads(a.double(), a.double(), 1e-5)
    assert w.dtype == torch.float64
    if _backend.why_not("triton", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="float64"):
            ops.norm_layer_grads(a.double(), a.double(), 1e-5, backend="triton")
        monkeypatch.setattr(ops, "NORM_MAX_D", 3)
        with pytest.raises(ValueError, match="at most 3"):
            ops.norm_layer_grads(a, a, 1e-5, backend="triton")
        # auto picks triton on a CUDA tensor: here on the CPU, as if it did, then finds D too large
        resolve = _backend.resolve
        monkeypatch.setattr(_backend, "resolve", lambda b, d: "triton" if b in (None, "auto") else resolve(b, d))
        before = collections.Counter(kernels.LAUNCHES)
        ops.norm_layer_grads(a, a, 1e-5, backend="auto")
        assert kernels.LAUNCHES["torch.dp_ghost_norm_layer_grads"] == before["torch.dp_ghost_norm_layer_grads"] + 1
        monkeypatch.setattr(ops, "NORM_MAX_D", 16384)
        ops.norm_layer_grads(a, a, 1e-5, backend="auto")  # within the limit: the kernel
        assert kernels.LAUNCHES["triton.dp_ghost_norm_layer_grads"] == before["triton.dp_ghost_norm_layer_grads"] + 1


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (3, 4, 7, 2), (2, 6, 300, 3), (2, 5, 9, 5), (2, 8, 0, 4),
                                   (0, 4, 3, 2)])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.float16,) * 2, (torch.bfloat16,) * 2,
                                    (torch.float32, torch.bfloat16)])
def test_group_norm_grads_op(backend, shape, dtypes):
    """GroupNorm per-sample weight and bias gradients against fp64, over
    dtypes, one channel per group and one group, more positions than one
    load (300 > 256), ``N = 0``, ``B = 0``; one launch (a kernel: none for an
    empty result); each output alone."""
    b, c, n, groups = shape
    torch.manual_seed(3)
    a, g = (torch.randn(b, c, n) * 3 + 2).to(dtypes[0]), torch.randn(b, c, n).to(dtypes[1])
    before = collections.Counter(kernels.LAUNCHES)
    w, bias = ops.group_norm_grads(a, g, groups, 1e-5, backend=backend)
    assert _launched("dp_ghost_group_norm_grads", before) == (1 if backend == "torch" or b * c else 0)
    assert w.dtype == bias.dtype == torch.float32 and w.shape == bias.shape == (b, c)
    w64, b64 = ref.group_norm_grads(a.double(), g.double(), groups, 1e-5)
    torch.testing.assert_close(w.double(), w64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.double(), b64, rtol=1e-5, atol=1e-5)
    w_only, none = ops.group_norm_grads(a, g, groups, 1e-5, bias=False, backend=backend)
    none2, b_only = ops.group_norm_grads(a, g, groups, 1e-5, weight=False, backend=backend)  # no statistics
    assert none is None and none2 is None and torch.equal(w_only, w) and torch.equal(b_only, bias)
    ops.group_norm_grads(torch.randn(1, 2, 3), torch.randn(1, 2, 3), 1, 1e-5, backend=backend)  # launches something


def test_group_norm_grads_strided_nonfinite_and_refusals(backend):
    """A channels_last input (bitwise the contiguous result on a kernel
    backend); a NaN in one sample's input stays in its group's weight
    gradients; channels that do not split into the groups are refused."""
    torch.manual_seed(5)
    a4 = torch.randn(3, 6, 4, 5).to(memory_format=torch.channels_last)
    a, g = a4.reshape(3, 6, 20), torch.randn(3, 6, 20)
    assert not a.is_contiguous()
    w, b = ops.group_norm_grads(a, g, 3, 1e-5, backend=backend)
    if backend != "torch":
        wc, bc = ops.group_norm_grads(a.contiguous(), g, 3, 1e-5, backend=backend)
        assert torch.equal(w, wc) and torch.equal(b, bc)
    torch.testing.assert_close(w.double(), ref.group_norm_grads(a.double(), g.double(), 3, 1e-5)[0],
                               rtol=1e-5, atol=1e-5)
    a = a.contiguous()
    a[1, 2, 7] = float("nan")  # channel 2: group 1 (channels 2, 3) of sample 1
    w, b = ops.group_norm_grads(a, g, 3, 1e-5, backend=backend)
    assert torch.isnan(w[1, 2:4]).all() and torch.isfinite(w[1, [0, 1, 4, 5]]).all()
    assert torch.isfinite(w[[0, 2]]).all() and torch.isfinite(b).all()
    with pytest.raises(ValueError, match="groups=4"):
        ops.group_norm_grads(a, g, 4, 1e-5, backend=backend)
    with pytest.raises(ValueError, match=r"\[B, C, N\]"):
        ops.group_norm_grads(a[0], g[0], 3, 1e-5, backend=backend)


# ---------------------------------------------------------------- registration and refusals

def test_opcheck(backend):
    """torch.library.opcheck (schema and declared mutation, fake tensors, autograd
    registration, AOT dispatch) on the DP-ghost ops; the triton backend
    runs its kernels under the interpreter inside the checks."""
    a, g = torch.randn(3, 5, 7), torch.randn(3, 5, 4)
    factors = torch.tensor([0.5, 0.0, 1.0])
    cases = [
        (ops.linear_sq_norms_op, (a, g, torch.empty(3), backend)),
        (ops.linear_sq_norms_ps_op, (a, g, torch.empty(3), backend)),
        (ops.linear_sq_norms_ps_op, (a.transpose(1, 2).contiguous().transpose(1, 2), g, torch.empty(3), backend)),
        (ops.embedding_sq_norms_op, (torch.tensor([[1, 2, 1, 1, 0]] * 3), a, torch.empty(3), backend)),
        (ops.vector_sq_norms_op, ([torch.randn(3, 4), torch.randn(3, 2, 2)], [2, 0], torch.rand(3, 3), backend)),
        (ops.clipped_embedding_grad_op, (torch.tensor([[1, 2, 1, 1, 0]] * 3), a, factors, torch.randn(3, 7),
                                         backend)),
        (ops.clipped_vector_grads_op, ([torch.randn(3, 4), torch.randn(3, 2, 2)], factors,
                                       [torch.empty(4), torch.empty(2, 2)], backend)),
        (ops.clip_factors_op, (_rows(2, 5), 0.7, torch.empty(5), torch.empty(5, dtype=torch.bool),
                               torch.empty(5), backend)),
        (ops.clipped_linear_grad_op, (g, a, factors, torch.randn(4, 7), True, backend)),
        (ops.clipped_linear_grad_op, (g, a, factors, torch.randn(4, 7), False, backend)),
        (ops.norm_layer_grads_op, (a, a + 1, 1e-5, False, torch.empty(3, 7), torch.empty(3, 7), backend)),
        (ops.norm_layer_grads_op, (a, a + 1, 1e-5, True, torch.empty(3, 7), None, backend)),
        (ops.group_norm_grads_op, (a, a + 1, 5, 1e-5, torch.empty(3, 5), torch.empty(3, 5), backend)),
    ]
    ids, ids2 = torch.tensor([[1, 2, 1, 1, 0]] * 3), torch.tensor([[3, 1, 1]] * 3)
    a2, g2 = torch.randn(3, 3, 7), torch.randn(3, 3, 4)
    for pu, pv, iu, iv, pp in ((g, g2, None, None, None), (g, None, None, ids2, None),
                               (None, None, ids, ids2, None), (None, None, None, None, torch.randn(3, 5, 3))):
        cases += [(ops.cross_gram_op, (a, a2, pu, pv, iu, iv, pp, 2.0, torch.randn(3), acc, backend))
                  for acc in (False, True)]
        if pp is None:
            cases.append((ops.pair_sq_norms_ps_op, (a, a2, pu, pv, iu, iv, 4, torch.randn(3), backend)))
            cases.append((ops.uses_sq_norms_ps_op, ([a, a2, a], [pu, pv, g], [iu, iv, None], 4, torch.randn(3),
                                                    backend)))
    for op, args in cases:
        try:
            torch.library.opcheck(op.overload, args)
        except Exception as exc:
            raise AssertionError(f"opcheck of {op.name} failed") from exc


def test_no_cuda_kernel(monkeypatch):
    """No CUDA twin: where the rule picks cuda, a forced backend="cuda" raises
    BackendUnavailable and auto runs torch (pick patched: no GPU here)."""
    monkeypatch.setattr(ops._registry, "pick", lambda *a, **k: "cuda")
    monkeypatch.delenv("FASTADV_BACKEND", raising=False)
    rows, p, q, f = torch.rand(2, 3), torch.randn(3, 2, 4), torch.randn(3, 2, 5), torch.ones(3)
    for call in (lambda be: ops.clip_factors(rows, 1.0, backend=be),
                 lambda be: ops.clipped_linear_grad_(torch.zeros(4, 5), p, q, f, backend=be),
                 lambda be: ops.linear_sq_norms(q, p, backend=be),
                 lambda be: ops.embedding_sq_norms(torch.zeros(3, 2, dtype=torch.long), q, backend=be),
                 lambda be: ops.vector_sq_norms_(torch.zeros(2, 3), [q], [1], backend=be),
                 lambda be: ops.clipped_vector_grads([q], f, backend=be),
                 lambda be: ops.clipped_embedding_grad_(torch.zeros(4, 5), torch.zeros(3, 2, dtype=torch.long), q, f,
                                                        backend=be),
                 lambda be: ops.cross_gram(ref.MatUse(p=p, q=q), ref.MatUse(ids=torch.zeros(3, 2).long(), q=q),
                                           backend=be),
                 lambda be: ops.pair_sq_norms_ps(ref.MatUse(p=p, q=q), ref.MatUse(ids=torch.zeros(3, 2).long(), q=q),
                                                 4, backend=be),
                 lambda be: ops.uses_sq_norms_ps([ref.MatUse(p=p, q=q)] * 3, 4, backend=be),
                 lambda be: ops.norm_layer_grads(q, q, 1e-5, backend=be),
                 lambda be: ops.group_norm_grads(q, q, 1, 1e-5, backend=be)):
        with pytest.raises(_backend.BackendUnavailable, match="no CUDA kernel"):
            call("cuda")
        before = collections.Counter(kernels.LAUNCHES)
        call(None)
        assert {k.split(".")[0] for k, n in kernels.LAUNCHES.items() if n > before[k]} == {"torch"}


@pytest.mark.launch_free
def test_refusals():
    if _backend.why_not("triton", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="float32"):
            ops.clip_factors(torch.rand(2, 3).half(), 1.0, backend="triton")
        with pytest.raises(TypeError, match="float32"):
            ops.clipped_linear_grad_(torch.zeros(4, 5, dtype=torch.float64), torch.randn(3, 2, 4),
                                     torch.randn(3, 2, 5), torch.ones(3), backend="triton")
    with pytest.raises(ValueError, match="out \\[O, I\\]"):
        ops.clipped_linear_grad_(torch.zeros(5, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 5), torch.ones(3))
    with pytest.raises(ValueError, match="n_rows, B"):
        ops.clip_factors(torch.rand(3), 1.0)


# ---------------------------------------------------------------- end to end

# weight uses that are not embedding lookups (one clipped-gradient launch each in bk):
# mlp fc1, fc2; cnn c1, c2, fc; lm qkv, proj, the tied head; gpt2 (one block) c_attn,
# attn c_proj, c_fc, mlp c_proj, the tied lm_head
LINEAR_USES = {"mlp": 2, "cnn": 3, "lm": 3, "gpt2": 5}
# single-use embeddings (one embedding-norm launch each per backward): lm's pos, gpt2's wpe (the
# token tables are tied to the heads: see TIED_TERMS)
EMBEDDING_USES = {"mlp": 0, "cnn": 0, "lm": 1, "gpt2": 1}
# dp_ghost_cross_gram calls per backward (two launches each on a kernel backend): the token table
# tied to the head, (emb, emb), (emb, head), (head, head) (ghost: the head's own term as it
# arrives, then the lookup's own and its cross term with the head's P gathered at the ids)
TIED_TERMS = {"mlp": 0, "cnn": 0, "lm": 3, "gpt2": 3}
# bk: the tied table's norm in Gram form only where "auto" picks it: lm's goes the per-sample way
# (T^2 (V + d) > V d (1 + 2T) at V = 11, d = 8, T = 5: the reference's materialised gradient)
TIED_TERMS_BK = dict(TIED_TERMS, lm=0)
# bk, per backward: dp_ghost_pair_sq_norms_ps calls (two launches each) for a tied table the per-sample way
PAIR_PS_BK = {"mlp": 0, "cnn": 0, "lm": 1, "gpt2": 0}
# embedding lookups (bk: one clipped-gradient launch each): lm's emb and pos, gpt2's wte and wpe
LOOKUPS = {"mlp": 0, "cnn": 0, "lm": 2, "gpt2": 2}
# LayerNorm calls (one dp_ghost_norm_layer_grads launch each per backward, every backend): mlp's ln,
# lm's ln1 and ln2, gpt2's ln_1, ln_2 and ln_f (cnn's GroupNorm has its own rule)
NORM_LAYERS = {"mlp": 1, "cnn": 0, "lm": 2, "gpt2": 3}
GROUP_NORMS = {"mlp": 0, "cnn": 1, "lm": 0, "gpt2": 0}  # one dp_ghost_group_norm_grads launch each


@pytest.mark.parametrize("kind", list(LINEAR_USES))
@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_make_private_equals_opacus_vanilla(backend, mode, kind):
    """``make_private(grad_sample_mode=mode)`` on each backend equals Opacus
    vanilla; on the triton backend one clip-factor launch and one vector-term
    launch per backward, one embedding-norm launch per single-use embedding
    and backward, and (bk)
    one clipped-gradient launch per Linear / Conv use and one for all the
    vector parameters' clipped gradients and one per embedding lookup; a tied
    head's terms (its own, the table's, their cross term) three cross-Gram
    calls per backward; the torch backend keeps
    the plain-PyTorch path (the fused ops not launched, the tied terms the
    reference's math; the embedding norm is its registered op's torch math)."""
    torch.manual_seed(1)
    model = MODELS[kind]()
    batches = [_data(kind, 4), _data(kind, 4)]  # two micro-batches: two DP backwards
    want = opacus_grads(copy.deepcopy(model), batches, C=0.3)
    before = collections.Counter(kernels.LAUNCHES)
    got, m = fast_grads(model, batches, C=0.3, mode=mode, backend=backend)
    _assert_same(got, want)
    kernel = backend != "torch"
    assert _launched("dp_ghost_clip_factors", before) == (2 if kernel else 0)
    assert _launched("dp_ghost_clipped_linear_grad", before) == (2 * LINEAR_USES[kind] if kernel and mode == "bk"
                                                                 else 0)
    assert _launched("dp_ghost_embedding_sq_norms", before) == 2 * EMBEDDING_USES[kind]
    tied = (TIED_TERMS_BK if mode == "bk" else TIED_TERMS)[kind]
    assert _launched("dp_ghost_cross_gram", before) == (2 * 2 * tied if kernel else 0)
    assert _launched("dp_ghost_pair_sq_norms_ps", before) == (2 * 2 * PAIR_PS_BK[kind] if kernel and mode == "bk"
                                                              else 0)
    # every model has biases / norm layers: their terms are one launch per backward
    assert _launched("dp_ghost_vector_sq_norms", before) == (2 if kernel else 0)
    # bk: every bias / norm-layer gradient of a backward in one call (the torch backend: its torch math)
    assert _launched("dp_ghost_clipped_vector_grads", before) == (2 if mode == "bk" else 0)
    assert _launched("dp_ghost_clipped_embedding_grad", before) == (2 * LOOKUPS[kind] if kernel and mode == "bk"
                                                                    else 0)
    assert _launched("dp_ghost_norm_layer_grads", before) == 2 * NORM_LAYERS[kind]
    assert _launched("dp_ghost_group_norm_grads", before) == 2 * GROUP_NORMS[kind]


def test_nonfinite_sample_dropped(backend):
    """bk: a NaN input in one sample gives it factor 0, and its NaN inputs and
    output gradients never enter the GEMM: the update equals the batch without
    it.  (Ghost mode's second backward is a plain backward: 0 * NaN poisons it,
    as in Opacus; tests/test_dp_ghost.py.)"""
    torch.manual_seed(11)
    model = MODELS["mlp"]()
    x, y = _data("mlp", 5)
    x[2, 0] = float("nan")
    keep = torch.tensor([0, 1, 3, 4])
    got, m = fast_grads(copy.deepcopy(model), [(x, y)], C=0.3, mode="bk", reduction="sum", backend=backend)
    assert not torch.isfinite(m.per_sample_gradient_norms[2])
    want, _ = fast_grads(copy.deepcopy(model), [(x[keep], y[keep])], C=0.3, mode="bk", reduction="sum",
                         backend=backend)
    _assert_same(got, want)


def _lm_bk_norms(strategy, backend):
    """(factors, finite, norms) of one bk backward of the tied-head LM (norms 13..21)."""
    torch.manual_seed(5)
    model = MODELS["lm"]()
    ids, _ = _data("lm", 6)
    m = ghost.GhostClippingModule(model, mode="bk", strategy=strategy, backend=backend)
    f, ok, _, _ = m.dp_backward(m(ids).square().mean((1, 2)), 17.0)
    return f, ok, m.per_sample_gradient_norms


@pytest.fixture
def lm_torch_norms():
    """The torch path's (materialised per-sample gradients, reference clip
    factors), computed before the ``backend`` fixture starts counting launches."""
    return _lm_bk_norms("per_sample", "torch")


def test_fused_norms_equal_torch_path_and_are_deterministic(lm_torch_norms, backend):
    """The module's norms and factors on a backend equal the plain-PyTorch
    path's (fp32 rounding apart) and are bitwise equal between two runs."""
    (tf, tok, tn), res = lm_torch_norms, [_lm_bk_norms("auto", backend) for _ in range(2)]
    assert (tf < 1).any() and (tf == 1).any(), "some samples clipped, some not"
    for f, ok, n in res:
        assert torch.equal(ok, tok) and ok.all()
        torch.testing.assert_close(n, tn, rtol=1e-5, atol=0)
        torch.testing.assert_close(f, tf, rtol=1e-5, atol=0)
    assert all(torch.equal(x, y) for x, y in zip(res[0], res[1]))


def test_registered():
    from fastadv.ops import _registry
    assert {"dp_ghost_linear_sq_norms", "dp_ghost_embedding_sq_norms", "dp_ghost_vector_sq_norms",
            "dp_ghost_clip_factors", "dp_ghost_clipped_vector_grads", "dp_ghost_clipped_embedding_grad",
            "dp_ghost_clipped_linear_grad", "dp_ghost_linear_sq_norms_ps", "dp_ghost_cross_gram",
            "dp_ghost_pair_sq_norms_ps", "dp_ghost_uses_sq_norms_ps", "dp_ghost_norm_layer_grads",
            "dp_ghost_group_norm_grads"} \
        <= set(_registry.registered())


def test_bk_backward_makes_no_host_sync(backend, no_host_sync):
    """The norms, the clip factors and bk's clipped gradient issue no host sync."""
    torch.manual_seed(3)
    model = MODELS["lm"]()
    ids, _ = _data("lm", 4)
    m = ghost.GhostClippingModule(model, mode="bk", backend=backend)
    loss = m(ids).square().mean((1, 2))
    with no_host_sync():
        factors, _, mats, vecs = m.dp_backward(loss, 1.0)
        m.write_clipped(factors, mats, vecs)
    assert all(p.grad is not None for p in model.parameters())
