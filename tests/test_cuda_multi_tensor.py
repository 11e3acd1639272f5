"""The cuda backend's multi-tensor FGM and PGD calls (``kernels/cuda/fgm.py``
``fgm_sq_many`` / ``fgm_update_many``, ``kernels/cuda/pgd.py`` ``pgd_sums_many`` /
``pgd_apply_many``; ``csrc/fgm.cu`` / ``csrc/pgd.cu``): one call over many tensors,
in ``2 x groups + 1`` launches whatever their number, bitwise what the per-tensor
cuda launchers (``fgm_norm`` / ``fgm_update``, ``pgd_sums`` / ``pgd_step``) give each
tensor -- also at addresses that are not 16-byte aligned and row widths that the
vector width does not divide (the per-tensor launchers then take the scalar
loop, whose summation order differs: the multi-tensor kernels make the same
choice per tensor) and for a dense tensor past the per-tensor launch's 1024
blocks (grid-stride) -- and, through the ops (``fgm_attack_many_`` /
``pgd_attack_many_``), the torch backend within tolerance.  With ``-m gpu``;
the routing rule (which tensors go together) runs everywhere.
tests/test_fgm_shards.py / test_pgd_shards.py run the shared multi-tensor cases
on every kernel backend."""
import collections

import pytest
import torch

import fastadv.kernels as kernels
import fastadv.kernels.cuda as fcuda
from fastadv.ops.fgm import _sqrt_rn, fgm_attack_, fgm_attack_many_, fgm_restore_, kernel_backends, multi_tensor_ok
from fastadv.ops.pgd import pgd_attack_, pgd_attack_many_, pgd_restore_

EPS, ALPHA, RADIUS = 0.7, 0.3, 0.5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def test_multi_tensor_ok_takes_every_kernel_backend():
    a, b, c = (torch.zeros(3) for _ in range(3))
    assert kernel_backends(["torch", "cuda", "triton", "cuda"]) == ["cuda", "triton"]
    assert multi_tensor_ok([a, b, c], ["cuda", "torch", "cuda"]) == [0, 2]
    assert multi_tensor_ok([a, b, c], ["cuda", "triton", "torch"]) == [0, 1]  # one call per backend
    assert multi_tensor_ok([a, b], ["cuda", "torch"]) == []  # a single one: its per-tensor call
    assert multi_tensor_ok([a, a], ["cuda", "cuda"]) == []  # one storage: the per-tensor calls


@pytest.fixture
def dev():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if fcuda.load_error():
        pytest.skip(fcuda.load_error())
    return torch.device("cuda")


def _bits(t):
    return t.view(BITS[t.dtype])


def _same(a, b) -> bool:
    """Bitwise equal, NaN matching NaN (its payload may come from another instruction)."""
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(_bits(a)[~nan_a], _bits(b)[~nan_b])


def _placed(t, offset):
    """A copy of ``t`` whose storage starts ``offset`` elements into a buffer (not 16-byte
    aligned for an odd offset); the bits copied as integers (NaN payloads kept)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    out = buf[offset:].view(t.shape)
    _bits(out).copy_(_bits(t))
    return out


def _launches(fn):
    before = collections.Counter(kernels.LAUNCHES)
    out = fn()
    delta = {k: n - before[k] for k, n in kernels.LAUNCHES.items() if n != before[k]}
    return out, delta


# (shape, row mode, offset, gradient kind): rows without gradient, a single row, 0-wide rows, rows
# the vector width does not divide (5, 3), an unaligned row table, empty tensors, a single element,
# several dense blocks (8192 elements each), unaligned dense, NaN / inf / zero gradients.
CASES = [((7, 5), True, 0, "rows"), ((3, 8), True, 0, "rows"), ((1, 6), True, 0, "randn"),
         ((3, 0), True, 0, "randn"), ((33, 768), True, 1, "rows"), ((16, 64), True, 0, "nan"),
         ((0, 4), True, 0, "randn"), ((0,), False, 0, "randn"), ((1,), False, 0, "randn"),
         ((20_000,), False, 0, "randn"), ((8195,), False, 1, "randn"), ((9, 5), False, 0, "zero"),
         ((6, 3), True, 0, "inf"), ((4, 7), False, 0, "inf")]


def _case(shape, kind, dtype, dev, gen):
    g = torch.randn(shape, generator=gen)
    if kind == "rows" and g.numel():
        g[::2] = 0
    if kind == "zero":
        g.zero_()
    if kind == "nan" and g.numel():
        g[-1, 0] = float("nan")
    if kind == "inf" and g.numel():
        g.view(-1)[3] = float("inf")
    return torch.randn(shape, generator=gen).to(dtype).to(dev), g.to(dtype).to(dev)


def _groups(cases, dtypes) -> int:
    """(dtype, mode) groups of the non-empty tensors."""
    return len({(dt, rows and sh[0] > 0) for (sh, rows, _, _), dt in zip(cases, dtypes)
                if (rows and sh[0] > 0) or torch.Size(sh).numel()})


def _tensors(cases, dtypes, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for (sh, rows, offset, kind), dt in zip(cases, dtypes):
        w, g = _case(sh, kind, dt, dev, gen)
        out.append((_placed(w, offset), _placed(g, offset), rows and sh[0] > 0, offset))
    return out


def _fgm_many(tensors, slots):
    """One multi-tensor FGM call; returns (w, backup, flags) per tensor, the squares and the launches."""
    from fastadv.kernels.cuda import fgm as k
    ws = [_placed(w, off) for w, _, _, off in tensors]
    backups = [_placed(torch.zeros_like(w), off) for w, _, _, off in tensors]
    flags = [torch.full((w.shape[0],), 7, dtype=torch.uint8, device=w.device) if rows else None
             for w, _, rows, _ in tensors]
    items = [k.ShardNorm(s, w, g, b, f) if f is not None else k.ShardNorm(s, w.view(-1), g.view(-1), b.view(-1))
             for s, w, (_, g, _, _), b, f in zip(slots, ws, tensors, backups, flags)]
    sq = torch.full((max(slots) + 1,), -1.0, device=ws[0].device)

    def call():
        planned = k.fgm_sq_many(items, sq)
        k.fgm_update_many(planned, _sqrt_rn(sq), EPS)  # as fgm_attack_many_ takes the sqrt
    _, delta = _launches(call)
    return list(zip(ws, backups, flags)), sq, delta


def _fgm_alone(w0, g, rows, offset):
    """The per-tensor cuda launchers on one tensor (the same placement)."""
    w = _placed(w0, offset)
    backup = _placed(torch.zeros_like(w0), offset)
    norm = torch.empty(1, dtype=torch.float32, device=w.device)
    if rows:
        flags = torch.empty(w.shape[0], dtype=torch.uint8, device=w.device)
        fcuda.fgm_norm(g, flags, norm)
        fcuda.fgm_update(w, g, backup, flags, norm, EPS)
        return w, backup, flags, norm
    fcuda.fgm_norm(g.view(1, -1), None, norm)
    fcuda.fgm_update(w.view(1, -1), g.view(1, -1), backup, None, norm, EPS)
    return w, backup, None, norm


def _check_fgm(tensors, slots):
    got, sq, delta = _fgm_many(tensors, slots)
    for i, ((w0, g, rows, off), (w, b, f), slot) in enumerate(zip(tensors, got, slots)):
        want_w, want_b, want_f, norm = _fgm_alone(w0, g, rows, off)
        assert _same(_sqrt_rn(sq)[slot:slot + 1], norm), i  # the norm, bitwise
        assert _same(w, want_w), i
        if rows:
            assert torch.equal(f, want_f), i
            assert torch.equal(_bits(b[f.bool()]), _bits(want_b[f.bool()])), i  # only flagged rows written
        else:
            assert torch.equal(_bits(b), _bits(want_b)), i
    return delta


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_fgm_many_is_bitwise_per_tensor(dev, dtype):
    dtypes = [dtype] * len(CASES)
    tensors = _tensors(CASES, dtypes, dev)
    delta = _check_fgm(tensors, list(range(len(CASES)))[::-1])  # slots in any order
    assert delta == {"cuda.fgm": 2 * _groups(CASES, dtypes) + 1} == {"cuda.fgm": 5}, delta


@pytest.mark.gpu
def test_fgm_many_launches_do_not_grow_with_the_tensors(dev):
    for n in (2, 40):
        cases = [CASES[i % len(CASES)] for i in range(n)]
        dtypes = [DTYPES[i % 3] for i in range(n)]
        delta = _check_fgm(_tensors(cases, dtypes, dev, seed=n), list(range(n)))
        assert delta == {"cuda.fgm": 2 * _groups(cases, dtypes) + 1}, (n, delta)
        assert _groups(cases, dtypes) == (2 if n == 2 else 6)


@pytest.mark.gpu
def test_fgm_many_large_tensors(dev):
    """A dense tensor past 1024 x 8192 elements (the per-tensor launch's 1024 blocks stride over
    it), one at an odd address, and a table of 600_001 one-wide rows."""
    cases = [(((1 << 23) + 4097,), False, 0, "randn"), (((1 << 23) + 3,), False, 1, "randn"),
             ((600_001, 1), True, 0, "rows")]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    assert _check_fgm(_tensors(cases, dtypes, dev), [0, 1, 2]) == {"cuda.fgm": 7}


def _pgd_state(w, rows):
    backup = torch.empty_like(w)
    if not rows:
        return backup, None, None
    return (backup, torch.empty(w.shape[0], dtype=torch.uint8, device=w.device),
            torch.zeros(w.shape[0], dtype=torch.uint8, device=w.device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_pgd_many_is_bitwise_per_tensor(dev, dtype):
    """Three steps: one multi-tensor call each against pgd_sums (the sums) and pgd_step (the step)
    on every tensor; step 2 zeroes one gradient (skipped) and puts a NaN in another."""
    from fastadv.kernels.cuda import pgd as k
    cases = [c for c in CASES if c[3] not in ("nan", "inf")]
    tensors = _tensors(cases, [dtype] * len(cases), dev)
    ws = [_placed(w, off) for w, _, _, off in tensors]
    alone = [_placed(w, off) for w, _, _, off in tensors]
    states = [_pgd_state(w, rows) for w, (_, _, rows, _) in zip(ws, tensors)]
    states_alone = [_pgd_state(w, rows) for w, (_, _, rows, _) in zip(alone, tensors)]
    groups = _groups(cases, [dtype] * len(cases))
    for step in range(3):
        gen = torch.Generator().manual_seed(10 + step)
        gs = [_placed(torch.randn(w.shape, generator=gen).to(dtype).to(dev), off) for w, (_, _, _, off) in
              zip(ws, tensors)]
        if step == 2:
            gs[0].zero_()
            gs[2].view(-1)[0] = float("nan")
        steps = [k.ShardStep(i, w, g, b, step == 0, m, s) if m is not None else
                 k.ShardStep(i, w.view(-1), g.view(-1), b.view(-1), step == 0)
                 for i, (w, g, (b, m, s)) in enumerate(zip(ws, gs, states))]
        sums = torch.empty(3 * len(ws), device=dev)

        def call():
            planned = k.pgd_sums_many(steps, sums)
            got = sums.clone()
            k.pgd_apply_many(planned, sums, ALPHA, RADIUS)
            return got
        got_sums, delta = _launches(call)
        # dense first steps and later steps are groups of their own; row tensors one group
        assert delta == {"cuda.pgd": 2 * groups + 1}, delta
        for i, (w, g, (b, m, s)) in enumerate(zip(alone, gs, states_alone)):
            want = torch.empty(3, device=dev)
            flat = m is None
            if flat:
                k.pgd_sums(w.view(-1), g.view(-1), b.view(-1), want, step == 0)
            else:
                k.pgd_sums(w, g, b, want, step == 0, m, s)
            assert _same(got_sums[3 * i:3 * i + 3], want), (step, i)
            coef = torch.empty(4, device=dev)
            if flat:
                k.pgd_step(w.view(-1), g.view(-1), b.view(-1), coef, ALPHA, RADIUS, step == 0)
            else:
                k.pgd_step(w, g, b, coef, ALPHA, RADIUS, step == 0, m, s)
            assert _same(ws[i], w), (step, i)
            if not flat:
                assert torch.equal(states[i][1], m) and torch.equal(states[i][2], s), (step, i)
                assert torch.equal(_bits(states[i][0][s.bool()]), _bits(b[s.bool()])), (step, i)
            elif w.numel():
                assert torch.equal(_bits(states[i][0]), _bits(b)), (step, i)
    assert not torch.equal(ws[4], tensors[4][0])  # it moved


class _Tables(torch.nn.Module):
    """Several tables and dense weights of mixed dtypes (the ops' row mode on the 2-D ones)."""

    def __init__(self, dev):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        shapes = [((50, 16), torch.float32), ((7, 5), torch.float32), ((33,), torch.float32),
                  ((9, 768), torch.bfloat16), ((0, 4), torch.float32), ((4099,), torch.float16)]
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(sh, generator=gen).to(dt).to(dev))
                                         for sh, dt in shapes)

    def grads(self, seed):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for p in self.ps:
            g = torch.randn(p.shape, generator=gen)
            if p.dim() == 2 and p.shape[0]:
                g[::3] = 0
            out.append(g.to(p.dtype).to(p.device))
        return out


@pytest.mark.gpu
def test_fgm_attack_many_runs_one_cuda_call(dev):
    model = _Tables(dev)
    params, w0 = list(model.ps), [p.detach().clone() for p in model.ps]
    grads = model.grads(0)
    states, delta = _launches(lambda: fgm_attack_many_(params, grads, EPS, backend="cuda"))
    # groups: fp32 rows, fp32 dense, bf16 rows, fp16 dense (the 0-row table: the sum alone)
    assert delta == {"cuda.fgm": 2 * 4 + 1}, delta
    for p, g, w, state in zip(params, grads, w0, states):
        alone = w.clone()
        fgm_attack_(alone, g, EPS, backend="cuda")
        assert torch.equal(_bits(p.detach()), _bits(alone))
        ref = w.clone()
        fgm_attack_(ref, g, EPS, backend="torch")
        tol = dict(rtol=1e-5, atol=1e-6) if p.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(p.detach(), ref, **tol)
        fgm_restore_(state)
        assert torch.equal(_bits(p.detach()), _bits(w))


@pytest.mark.gpu
def test_pgd_attack_many_runs_one_cuda_call_per_step(dev):
    model = _Tables(dev)
    params, w0 = list(model.ps), [p.detach().clone() for p in model.ps]
    states = [None] * len(params)
    alone = [w.clone() for w in w0]
    alone_states = [None] * len(params)
    for step in range(3):
        grads = model.grads(step)
        states, delta = _launches(lambda: pgd_attack_many_(params, grads, ALPHA, RADIUS, states, backend="cuda"))
        assert delta == {"cuda.pgd": 2 * 4 + 1}, (step, delta)
        for i, g in enumerate(grads):
            alone_states[i] = pgd_attack_(alone[i], g, ALPHA, RADIUS, alone_states[i], backend="cuda")
            assert torch.equal(_bits(params[i].detach()), _bits(alone[i])), (step, i)
    ref = [w.clone() for w in w0]
    ref_states = [None] * len(params)
    for step in range(3):
        for i, g in enumerate(model.grads(step)):
            ref_states[i] = pgd_attack_(ref[i], g, ALPHA, RADIUS, ref_states[i], backend="torch")
    for p, r in zip(params, ref):
        tol = dict(rtol=1e-5, atol=1e-6) if p.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(p.detach(), r, **tol)
    for p, w, state in zip(params, w0, states):
        pgd_restore_(state)
        assert torch.equal(_bits(p.detach()), _bits(w))
