"""The CUDA PGD kernels (csrc/pgd.cu, fastadv/kernels/cuda/pgd.py).

Without a GPU: the built library exports the PGD symbols, sizes its workspace
and rejects bad arguments before any launch.  With a GPU (``-m gpu``):

- the launchers against a PyTorch model of the contract, step by step over K
  steps: coefficients against float64, then every element bit for bit given
  the coefficients the kernel wrote, the mask / saved flags and the backup;
- ``pgd_attack_`` with the cuda backend against the torch and triton backends
  (dense and row-sparse, fp32 / fp16 / bf16, projection active and inactive,
  a zero or NaN gradient step), and the bit-exact in-place restore.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest
import torch

import fastadv.kernels as kernels
import fastadv.kernels.cuda as fcuda
from fastadv.kernels.cuda import pgd as cuda_pgd
from fastadv.ops.pgd import pgd_attack_, pgd_restore_

KERNELS = cuda_pgd  # the module under test
BACKEND = "cuda"
K = 3
ALPHA = 0.3
PGD_SYMBOLS = ("fastadv_pgd_workspace_floats", "fastadv_pgd_step", "fastadv_pgd_restore_rows")


@pytest.fixture(autouse=True)
def _fresh_binding(monkeypatch):
    monkeypatch.delenv("FASTADV_CUDA_LIB", raising=False)
    fcuda._reset_for_tests()
    yield
    fcuda._reset_for_tests()


# ---- no GPU needed ----------------------------------------------------------------------------

@pytest.fixture
def built_lib():
    """The installed library; skipped when it was not built (no nvcc)."""
    if not os.path.exists(fcuda.DEFAULT_PATH):
        pytest.skip(f"{fcuda.DEFAULT_PATH} not built: {fcuda.BUILD_HINT}")
    assert fcuda.load_error() is None, fcuda.load_error()
    return fcuda.lib()


def test_library_exports_pgd_symbols(built_lib):
    for name in PGD_SYMBOLS:
        assert name in fcuda._SIGNATURES, name  # declared by fastadv.kernels.cuda.pgd
        assert hasattr(built_lib, name), name


def test_workspace_sizes(built_lib):
    ws = built_lib.fastadv_pgd_workspace_floats
    assert ws(1, 0, 0) == 0 and ws(0, 5, 0) == 0 and ws(0, 5, 1) == 0
    assert ws(1, 1, 0) == 3
    assert ws(1, 8192, 0) == 3 and ws(1, 8193, 0) == 6
    assert ws(1, 10**10, 0) == 3 * 1024  # capped, whatever the device
    assert ws(37, 33, 1) == 3 * 37 and ws(37, 0, 1) == 3 * 37
    assert cuda_pgd.pgd_workspace_floats(37, 33, True) == 3 * 37


def test_argument_errors_need_no_gpu(built_lib):
    lib = built_lib
    coef = (ctypes.c_float * 4)()
    flags = (ctypes.c_uint8 * 4)()
    c, f = ctypes.addressof(coef), ctypes.addressof(flags)
    step = lib.fastadv_pgd_step
    assert step(None, None, None, 7, 1, 1, None, None, 1, None, c, 0.3, 1.0, None) == 1
    assert b"unsupported dtype code 7" in lib.fastadv_last_error()
    assert step(None, None, None, 0, -1, 3, None, None, 1, None, c, 0.3, 1.0, None) == 1
    assert b"negative size" in lib.fastadv_last_error()
    assert step(None, None, None, 0, 1, 3, None, None, 1, None, None, 0.3, 1.0, None) == 1
    assert b"coef is NULL" in lib.fastadv_last_error()
    assert step(None, None, None, 0, 4, 3, f, None, 0, None, c, 0.3, 1.0, None) == 1
    assert b"mask and saved" in lib.fastadv_last_error()
    assert step(None, None, None, 1, 1, 5, None, None, 1, None, c, 0.3, 1.0, None) == 1
    assert b"workspace is NULL" in lib.fastadv_last_error()
    assert step(None, None, None, 2, 4, 3, f, f, 0, None, c, 0.3, 1.0, None) == 1
    assert b"workspace is NULL" in lib.fastadv_last_error()
    restore = lib.fastadv_pgd_restore_rows
    assert restore(None, None, 0, 4, 3, None, None) == 1
    assert b"saved is NULL" in lib.fastadv_last_error()
    assert restore(None, None, 3, 4, 3, f, None) == 1
    assert b"dtype" in lib.fastadv_last_error()
    assert restore(None, None, 0, -4, 3, f, None) == 1
    assert b"negative size" in lib.fastadv_last_error()
    assert restore(None, None, 1, 0, 3, f, None) == 0  # no rows: success without a launch


def _no_cuda_driver() -> bool:
    return not os.path.exists("/dev/nvidiactl") and ctypes.util.find_library("cuda") is None


@pytest.mark.skipif(not _no_cuda_driver(), reason="a CUDA driver is present: this checks the driverless failure")
def test_launch_without_driver_fails_cleanly(built_lib):
    coef = (ctypes.c_float * 4)()
    rc = built_lib.fastadv_pgd_step(None, None, None, 0, 1, 0, None, None, 1, None,
                                    ctypes.addressof(coef), 0.3, 1.0, None)  # finalize only
    assert rc in (35, 100)  # cudaErrorInsufficientDriver, cudaErrorNoDevice
    assert b"fastadv_pgd_step" in built_lib.fastadv_last_error()


def test_launchers_reject_cpu_tensors():
    w = torch.zeros(4, 3)
    flags = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_pgd.pgd_step(w.view(-1), w.view(-1), w.view(-1), torch.zeros(4), 0.3, 1.0, True)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_pgd.pgd_step(w, w, w, torch.zeros(4), 0.3, 1.0, True, flags, flags)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_pgd.pgd_restore_rows(w, w.clone(), flags)


# ---- GPU: helpers -----------------------------------------------------------------------------

def _gpu_ready() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return fcuda.load_error()


@pytest.fixture
def dev():
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)
    return torch.device("cuda")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# Backends against each other: fp32 as fastadv/bench/check.py's TOLERANCES; fp16 / bf16
# two ulps (each step rounds once; the norms differ in their last fp32 bits).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2 * 2.0**-10, atol=1e-5),
       torch.bfloat16: dict(rtol=2 * 2.0**-7, atol=1e-5)}


def _bits(t):
    return t.view(BITS[t.dtype])


def _offset(t, offset):
    """A copy of t whose storage starts `offset` elements in (misaligned for offset > 0)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    out = buf[offset:].view(t.shape)
    _bits(out).copy_(_bits(t))  # as integers: NaN payloads survive
    return out


def _assert_bits(a, b, msg=""):
    assert a.dtype == b.dtype and a.shape == b.shape
    same = _bits(a) == _bits(b)
    assert bool(same.all()), f"{msg}: {int((~same).sum())} of {a.numel()} elements differ"


# ---- GPU: the launchers against a model of the contract ---------------------------------------

def _model_step(w, g, backup, alpha, eps, first, mask, saved):
    """What one step must do, in PyTorch (float64 for the sums).  Returns the
    expected (coef in float64 plus the scale of ||r'||^2, mask, saved, backup,
    and a function giving w from the coef the kernel wrote)."""
    w, backup = w.clone(), backup.clone()  # the kernel updates them in place
    w32, g32 = w.float(), g.float()
    if mask is None:
        w0 = w if first else backup
        r = torch.zeros_like(w32) if first else w32 - w0.float()
        g_used = g32
        new_mask = new_saved = None
        visit = None
    else:
        was_saved = saved.bool()
        g_used = g32  # every row is read; the mask is written from g (NaN counts as non-zero)
        new_mask = (g_used != 0).any(dim=1).to(torch.uint8)
        w0 = torch.where(was_saved[:, None], backup, w)
        r = torch.where(was_saved[:, None], w32 - w0.float(), torch.zeros_like(w32))
        visit = new_mask.bool() | was_saved
    gg = (g_used.double() ** 2).sum()
    rr = (r.double() ** 2).sum()
    rg = (r.double() * g_used.double()).sum()
    norm_g = gg.sqrt()
    s = alpha / norm_g
    norm_r = (rr + 2 * s * rg + s * s * gg).clamp_min(0).sqrt()
    step = bool(norm_g != 0) and not bool(torch.isnan(norm_g))
    # ||r'||^2 may cancel (r' ~ 0): its error is relative to the sum of |terms|
    scale = (rr + (2 * s * rg).abs() + s * s * gg).item()
    coef = (norm_g.item(), norm_r.item(), step, step and norm_r.item() > eps, scale)

    def new_w(kcoef):
        ng, nr, st, pj = kcoef[0], kcoef[1], kcoef[2] != 0, kcoef[3] != 0
        d = (w32 + (g_used * alpha) / ng) - w0.float()
        d = torch.where(pj, (d * eps) / nr, d)
        out = (w0.float() + d).to(w.dtype)
        take = st if visit is None else st & visit[:, None]
        return torch.where(take, out, w)

    if mask is None:
        new_backup = w.clone() if first else backup.clone()
    else:
        new_saved = (was_saved | (visit & step)).to(torch.uint8)
        first_time = (visit & step & ~was_saved)[:, None]
        new_backup = torch.where(first_time, w, backup)
    return coef, new_mask, new_saved, new_backup, new_w


def _steps_case(dev, dtype, rows, cols, sparse, bad_step, bad_kind, seed=0):
    gen = torch.Generator().manual_seed(seed * 7919 + rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=gen)
    grads, masks = [], []
    for t in range(K):
        g = torch.randn(rows, cols, generator=gen)
        m = torch.rand(rows, generator=gen) < 0.4
        zero = (torch.rand(rows, generator=gen) < 0.2) & m
        g[zero] = 0  # rows without gradient: not flagged by the step
        if sparse:
            g[~m] = 0  # rows of an embedding gradient that no lookup touched
        if t == bad_step:
            if bad_kind == "zero":
                g.zero_()
            elif g.numel():
                g[m.nonzero()[:1, 0] if m.any() else slice(0, 1), 0] = float("nan")
        grads.append(g.to(dtype).to(dev))
        masks.append(m.to(torch.uint8).to(dev))
    return w.to(dtype).to(dev), grads, masks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "rows"])
@pytest.mark.parametrize("rows,cols,offset", [(1, 1, 0), (7, 3, 0), (37, 33, 1), (64, 64, 0), (64, 64, 1),
                                              (3, 4100, 0), (129, 768, 0), (0, 4, 0), (5, 0, 0)])
@pytest.mark.parametrize("eps", [0.05, 100.0], ids=["ball-active", "ball-inactive"])
@pytest.mark.parametrize("bad", [None, (0, "zero"), (1, "zero"), (1, "nan")],
                         ids=["normal", "zero-first", "zero-step2", "nan-step2"])
def test_step_against_model(dev, dtype, sparse, rows, cols, offset, eps, bad):
    _check_steps(dev, dtype, sparse, rows, cols, offset, eps, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("sparse,rows,cols,offset", [(False, 1, (1 << 20) + 3, 0), (False, 1, 9_000_001, 1),
                                                     (False, 3000, 3000, 0), (True, 600_001, 1, 0),
                                                     (True, 4099, 1024, 0)])
def test_step_against_model_large(dev, sparse, rows, cols, offset):
    _check_steps(dev, torch.float32, sparse, rows, cols, offset, 0.05, None)


def _check_steps(dev, dtype, sparse, rows, cols, offset, eps, bad):
    bad_step, bad_kind = bad or (None, None)
    w, grads, masks = _steps_case(dev, dtype, rows, cols, sparse, bad_step, bad_kind)
    w = _offset(w, offset)
    w_orig = w.clone()
    backup = _offset(torch.full_like(w, 7.0), offset)  # sentinel: rows never backed up keep it
    saved = torch.zeros(rows, dtype=torch.uint8, device=dev) if sparse else None
    coef = torch.full((4,), -1.0, device=dev)
    for t, (g, m) in enumerate(zip(grads, masks)):
        g = _offset(g, offset)
        first = t == 0
        mask = m.clone() if sparse else None
        want_coef, want_mask, want_saved, want_backup, new_w = _model_step(
            w, g, backup, ALPHA, eps, first, mask, saved)
        if sparse:
            KERNELS.pgd_step(w, g, backup, coef, ALPHA, eps, first, mask, saved)
        else:
            KERNELS.pgd_step(w.view(-1), g.view(-1), backup.view(-1), coef, ALPHA, eps, first)
        got = coef.tolist()
        where = f"step {t}"
        # the coefficients: the finalize formula against float64, flags consistent
        assert got[2] == float(want_coef[2]), where
        if want_coef[2]:
            assert got[0] == pytest.approx(want_coef[0], rel=1e-5), where
            assert got[1] ** 2 == pytest.approx(want_coef[1] ** 2, rel=2e-5, abs=2e-6 * want_coef[4]), where
            assert got[3] == float(want_coef[3]), where
        else:
            assert got[3] == 0.0, where
        norm_g = coef[0].item()
        assert got[2] == float(norm_g != 0 and norm_g == norm_g), where
        assert got[3] == float(got[2] == 1.0 and got[1] > torch.tensor(eps).float().item()), where
        # every element, bit for bit, given the kernel's coefficients
        _assert_bits(w, new_w(coef), f"{where}: w")
        _assert_bits(backup, want_backup, f"{where}: backup")
        if sparse:
            assert torch.equal(mask, want_mask), where
            assert torch.equal(saved, want_saved), where
    if sparse:
        KERNELS.pgd_restore_rows(w, backup, saved)
        assert not bool(saved.any())
    else:
        w.copy_(backup)
    _assert_bits(w, w_orig, "restored")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols,offset", [(0, 0), (1, 0), (2, 0), (3, 1), (4, 0), (8, 0), (8, 1), (768, 0)])
def test_restore_rows_is_bit_exact(dev, dtype, cols, offset):
    rows = 97
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    backup = torch.randint(info.min, info.max, (rows, cols), dtype=bits, device=dev).view(dtype)
    backup = _offset(backup, offset)  # NaN payloads, -0, subnormals
    saved = (torch.rand(rows, device=dev) < 0.5).to(torch.uint8)
    w0 = _offset(torch.randn(rows, cols, device=dev).to(dtype), offset)
    w = w0.clone()
    ptr = w.data_ptr()
    want = torch.where(saved.bool()[:, None], _bits(backup), _bits(w0))
    KERNELS.pgd_restore_rows(w, backup, saved)
    assert torch.equal(_bits(w), want) and w.data_ptr() == ptr
    assert not bool(saved.any())


# ---- GPU: pgd_attack_ on the cuda backend against torch and triton ---------------------------

def _attack_case(dev, dtype, rows, cols, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    grads, masks = [], []
    for _ in range(K):
        g = torch.randn(rows, cols, generator=gen)
        m = torch.rand(rows, generator=gen) < 0.4
        g[~m] = 0  # the row-sparse contract: unmarked rows have no gradient
        g[(torch.rand(rows, generator=gen) < 0.2)] = 0
        grads.append(g.to(dtype).to(dev))
        masks.append(m.to(torch.uint8).to(dev))
    return w.to(dtype).to(dev), grads, masks


def _attack(backend, w, grads, masks, eps, sparse):
    w = w.clone()
    state, steps, used = None, [], []
    for g, m in zip(grads, masks):
        state = pgd_attack_(w, g, ALPHA, eps, state, row_sparse=sparse, backend=backend)
        steps.append(w.clone())
        used.append(None if state.mask is None else state.mask.clone())
    return w, state, steps, used


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "rows"])
@pytest.mark.parametrize("eps", [0.05, 100.0], ids=["ball-active", "ball-inactive"])
@pytest.mark.parametrize("bad", [None, "zero", "nan"])
def test_attack_matches_torch_and_triton(dev, dtype, sparse, eps, bad):
    w, grads, masks = _attack_case(dev, dtype, 257, 96)
    if bad == "zero":
        grads[1].zero_()
    elif bad == "nan":
        grads[1][masks[1].bool().nonzero()[0, 0], 3] = float("nan")
    fast, state, steps, used = _attack(BACKEND, w, grads, masks, eps, sparse)
    _, _, ref_steps, _ = _attack("torch", w, grads, masks, eps, sparse)
    for t, (a, b) in enumerate(zip(steps, ref_steps)):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"step {t} vs torch: {m}")
    if bad is not None:  # the skipped step leaves w as it was, bit for bit
        _assert_bits(steps[1], steps[0], "skipped step")
    if _gpu_triton_ok():
        _, tstate, tsteps, tused = _attack("triton", w, grads, masks, eps, sparse)
        for t, (a, b) in enumerate(zip(steps, tsteps)):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"step {t} vs triton: {m}")
        if sparse:
            assert all(torch.equal(a, b) for a, b in zip(used, tused))  # masks cleared alike
            assert torch.equal(state.saved, tstate.saved)
    ptr = fast.data_ptr()
    if sparse:
        assert bool(state.saved.any())
    pgd_restore_(state)
    _assert_bits(fast, w, "restored")
    assert fast.data_ptr() == ptr
    if sparse:
        assert not bool(state.saved.any())


def _gpu_triton_ok() -> bool:
    from fastadv import _backend
    return _backend.why_not("triton", torch.device("cuda")) is None


@pytest.mark.gpu
def test_launch_counts_stream_and_no_host_sync(dev, no_host_sync):
    w = torch.randn(6, 40, device=dev)
    g = torch.randn(6, 40, device=dev)
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    before = dict(kernels.LAUNCHES)
    with torch.cuda.stream(side):
        wd, ws = w.clone(), w.clone()
        with no_host_sync():
            dense = pgd_attack_(wd, g, ALPHA, 0.05, backend=BACKEND)
            pgd_attack_(wd, g, ALPHA, 0.05, dense)
            rows = pgd_attack_(ws, g * mask[:, None], ALPHA, 0.05, backend=BACKEND)
            pgd_attack_(ws, g * mask[:, None], ALPHA, 0.05, rows)
            pgd_restore_(rows)
            pgd_restore_(dense)
        empty = torch.empty(0, 5, device=dev)
        pgd_attack_(empty, empty, ALPHA, 0.05, backend=BACKEND)  # finalize only
    side.synchronize()
    assert torch.equal(wd, w) and torch.equal(ws, w)
    delta = {k: kernels.LAUNCHES[k] - before.get(k, 0) for k in kernels.LAUNCHES}
    assert delta.get(f"{BACKEND}.pgd") == 4 * 3 + 1
    assert delta.get(f"{BACKEND}.pgd_restore") == 1
