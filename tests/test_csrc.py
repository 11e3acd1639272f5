"""The CUDA library (csrc/ -> fastadv/_lib/libfastadv_cuda.so) and its ctypes binding.

Without a GPU: it compiles, loads (cudart is static, so no driver is needed to
load it), exports the C ABI and nothing else, validates its arguments, and the
binding reports a missing library with the way to build it.  With a GPU
(``-m gpu``): every launcher against plain PyTorch math.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import fastadv._backend as backend
import fastadv.kernels as kernels
import fastadv.kernels.cuda as fcuda

ROOT = Path(__file__).resolve().parents[1]


def _setup_py():
    """setup.py as a module (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("_fastadv_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SETUP = _setup_py()
NVCC = SETUP.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH): "
                                                     "cannot compile csrc/")


@pytest.fixture(autouse=True)
def _fresh_binding(monkeypatch):
    monkeypatch.delenv("FASTADV_CUDA_LIB", raising=False)
    fcuda._reset_for_tests()
    yield
    fcuda._reset_for_tests()


def _bind(path):
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in fcuda._SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _no_cuda_driver() -> bool:
    return not os.path.exists("/dev/nvidiactl") and ctypes.util.find_library("cuda") is None


# ---- (a) build and load, no GPU needed ------------------------------------------------------

def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _installed_library_is_stale():
    """Why the installed library cannot stand for csrc/ (None when it can): it is
    missing, or a file it is built from (csrc/*, setup.py's build rules) changed
    after it was linked.  An edit, a checkout or a pull of a source sets that
    file's mtime to now, so it reads as newer than the library."""
    lib = Path(fcuda.DEFAULT_PATH)
    if not lib.exists():
        return f"{lib} is not built"
    built = lib.stat().st_mtime
    newer = sorted(p.name for p in [*(ROOT / "csrc").iterdir(), ROOT / "setup.py"] if p.stat().st_mtime >= built)
    return f"{lib} is older than {newer}" if newer else None


@pytest.fixture(scope="module")
def fresh_lib(tmp_path_factory):
    """The library the ABI tests load, built from the csrc/ checked out here.

    The one the install built (the README's `pip install -e .` compiles it just
    before pytest) when it is newer than all of its sources: compiling csrc/ a
    second time takes minutes on 2 cores and tests the same code.  csrc/
    compiled here by setup.py's own ninja build, for one architecture, in CI
    (CI=true: the build itself is tested there) and when the installed one is
    missing or older than a source."""
    stale = _installed_library_is_stale()
    if stale is None and not _in_ci():
        return Path(fcuda.DEFAULT_PATH)
    if NVCC is None:
        pytest.skip(f"nvcc not found: cannot compile csrc/ ({stale or 'CI=true builds it fresh'})")
    tmp = tmp_path_factory.mktemp("csrc")
    out = tmp / "libfastadv_cuda.so"
    SETUP.compile_cuda(str(out), str(tmp / "build"), NVCC, archs="80")
    assert out.exists()
    return out


def test_compiled_library_exports_the_abi(fresh_lib):
    lib = _bind(fresh_lib)  # loads without a GPU or driver: cudart is linked statically
    for name in fcuda.EXPORTS:
        assert hasattr(lib, name), name
    assert lib.fastadv_abi_version() == fcuda.ABI_VERSION == 4
    # cudart's own symbols stay inside (--exclude-libs): no clash with PyTorch's cudart
    for private in ("cudaMalloc", "cudaLaunchKernel", "__cudaRegisterFatBinary"):
        assert not hasattr(lib, private), private


def test_workspace_sizes(fresh_lib):
    lib = _bind(fresh_lib)
    ws = lib.fastadv_fgm_workspace_floats
    assert ws(1, 0, 0) == 0 and ws(0, 5, 0) == 0 and ws(0, 5, 1) == 0
    assert ws(1, 1, 0) == 1
    assert ws(1, 8192, 0) == 1 and ws(1, 8193, 0) == 2
    assert ws(1, 10**10, 0) == 1024  # capped, whatever the device
    assert ws(1000, 1, 0) == 1
    assert ws(37, 33, 1) == 37 and ws(37, 0, 1) == 37


def test_argument_errors_need_no_gpu(fresh_lib):
    lib = _bind(fresh_lib)
    out = ctypes.c_float()
    rc = lib.fastadv_fgm_norm(None, 7, 1, 1, None, None, ctypes.addressof(out), None)
    assert rc == 1  # cudaErrorInvalidValue
    assert b"unsupported dtype code 7" in lib.fastadv_last_error()
    assert lib.fastadv_fgm_update(None, None, None, 0, -1, 3, None, None, 1.0, None) == 1
    assert b"negative size" in lib.fastadv_last_error()
    assert lib.fastadv_fgm_update(None, None, None, 0, 1, 3, None, None, 1.0, None) == 1
    assert b"norm is NULL" in lib.fastadv_last_error()
    assert lib.fastadv_fgm_restore_rows(None, None, 3, 1, 1, ctypes.addressof(out), None) == 1
    assert b"dtype" in lib.fastadv_last_error()
    # nothing to do: success without any launch
    assert lib.fastadv_fgm_update(None, None, None, 2, 0, 5, None, ctypes.addressof(out), 1.0, None) == 0
    assert lib.fastadv_fgm_restore_rows(None, None, 1, 4, 0, ctypes.addressof(out), None) == 0


MT_FUNCTIONS = ("fastadv_fgm_mt_partials", "fastadv_fgm_mt_sum", "fastadv_fgm_mt_update",
                "fastadv_pgd_mt_partials", "fastadv_pgd_mt_sum", "fastadv_pgd_mt_apply")


def test_multi_tensor_fgm_pgd_are_exported(fresh_lib):
    lib = _bind(fresh_lib)
    for name in MT_FUNCTIONS:
        assert name in fcuda.EXPORTS and hasattr(lib, name), name


def test_multi_tensor_argument_errors_need_no_gpu(fresh_lib):
    """The multi-tensor FGM / PGD entry points check their arguments before any launch (the
    addresses below are never dereferenced: every call fails or has nothing to launch)."""
    lib = _bind(fresh_lib)
    fake = ctypes.c_int64()
    tb = pl = buf = ctypes.addressof(fake)

    def err(rc, text):
        assert rc == 1, rc  # cudaErrorInvalidValue
        assert text in lib.fastadv_last_error(), lib.fastadv_last_error()

    # table, lists of the mode, chunk, plan, buffer, dtype, sizes
    err(lib.fastadv_fgm_mt_partials(tb, 4, 1, 1, 16, 0, 0, pl, 1, buf, None), b"this mode takes 3 lists, got 4")
    err(lib.fastadv_fgm_mt_partials(tb, 3, 1, 1, 16, 0, 1, pl, 1, buf, None), b"this mode takes 4 lists, got 3")
    err(lib.fastadv_fgm_mt_partials(tb, 3, 1, 1, 24, 0, 0, pl, 1, buf, None), b"positive multiple of 16")
    err(lib.fastadv_fgm_mt_partials(None, 3, 1, 1, 16, 0, 0, pl, 1, buf, None), b"table is NULL")
    err(lib.fastadv_fgm_mt_partials(tb, 3, 1, 1, 16, 0, 0, None, 1, buf, None), b"plan is NULL")
    err(lib.fastadv_fgm_mt_partials(tb, 3, 1, 1, 16, 0, 0, pl, 1, None, None), b"partials is NULL")
    err(lib.fastadv_fgm_mt_partials(tb, 3, 1, 1, 16, 0, 0, pl, -1, buf, None), b"negative block count")
    err(lib.fastadv_fgm_mt_partials(tb, 3, 1, 1, 16, 7, 0, pl, 1, buf, None), b"unsupported dtype code 7")
    err(lib.fastadv_fgm_mt_partials(tb, 3, -1, 1, 16, 0, 0, pl, 1, buf, None), b"bad sizes")
    err(lib.fastadv_fgm_mt_update(tb, 4, 1, 1, 16, 0, 1, pl, None, 1.0, None), b"norms is NULL")
    err(lib.fastadv_fgm_mt_update(tb, 4, 1, 1, 16, 5, 1, pl, buf, 1.0, None), b"unsupported dtype code 5")
    err(lib.fastadv_fgm_mt_sum(pl, -1, buf, buf, None), b"negative tensor count")
    err(lib.fastadv_fgm_mt_sum(None, 2, buf, buf, None), b"plan or out is NULL")
    err(lib.fastadv_pgd_mt_partials(tb, 4, 1, 1, 16, 0, 1, 0, pl, 0, 1, buf, None), b"this mode takes 5 lists, got 4")
    err(lib.fastadv_pgd_mt_partials(tb, 3, 1, 1, 16, 0, 0, 1, pl, 1, -1, buf, None), b"negative size")
    err(lib.fastadv_pgd_mt_partials(tb, 3, 1, 1, 16, 9, 0, 1, pl, 1, 1, buf, None), b"unsupported dtype code 9")
    err(lib.fastadv_pgd_mt_apply(tb, 5, 1, 1, 16, 0, 1, 0, pl, None, 0.3, 0.5, None), b"sums is NULL")
    err(lib.fastadv_pgd_mt_apply(tb, 5, 1, 1, 16, 0, 1, 0, None, buf, 0.3, 0.5, None), b"plan is NULL")
    err(lib.fastadv_pgd_mt_sum(pl, 1, buf, -3, buf, None), b"negative n_parts")
    err(lib.fastadv_pgd_mt_sum(pl, 1, buf, 3, None, None), b"plan or out is NULL")
    # nothing to do: success without any launch (no driver needed)
    assert lib.fastadv_fgm_mt_partials(None, 3, 0, 0, 16, 0, 0, None, 0, None, None) == 0
    assert lib.fastadv_fgm_mt_partials(tb, 3, 2, 4, 16, 0, 0, pl, 0, buf, None) == 0  # dense: no block
    assert lib.fastadv_fgm_mt_partials(tb, 4, 2, 0, 16, 0, 1, pl, 5, buf, None) == 0  # rows: no chunk
    assert lib.fastadv_fgm_mt_update(tb, 3, 2, 0, 16, 0, 0, pl, buf, 1.0, None) == 0
    assert lib.fastadv_fgm_mt_sum(None, 0, None, None, None) == 0
    assert lib.fastadv_pgd_mt_partials(tb, 5, 1, 0, 16, 2, 1, 0, pl, 0, 0, buf, None) == 0
    assert lib.fastadv_pgd_mt_apply(tb, 3, 1, 0, 16, 1, 0, 1, pl, buf, 0.3, 0.5, None) == 0
    assert lib.fastadv_pgd_mt_sum(None, 0, None, 0, None, None) == 0


@pytest.mark.skipif(not _no_cuda_driver(), reason="a CUDA driver is present: this checks the driverless failure")
def test_launch_without_driver_fails_cleanly(fresh_lib):
    lib = _bind(fresh_lib)
    out = ctypes.c_float()
    rc = lib.fastadv_fgm_norm(None, 0, 0, 0, None, None, ctypes.addressof(out), None)  # finalize only
    assert rc in (35, 100)  # cudaErrorInsufficientDriver, cudaErrorNoDevice
    assert b"fastadv_fgm_norm" in lib.fastadv_last_error()
    fake = ctypes.addressof(ctypes.c_int64())
    assert lib.fastadv_pgd_mt_sum(fake, 1, fake, 1, fake, None) in (35, 100)  # valid arguments: the launch fails
    assert b"fastadv_pgd_mt_sum" in lib.fastadv_last_error()


@needs_nvcc
def test_installed_library_is_built():
    if os.environ.get("FASTADV_BUILD_CUDA") == "0":
        pytest.skip("FASTADV_BUILD_CUDA=0: the CUDA library was not meant to be built")
    assert os.path.exists(fcuda.DEFAULT_PATH), (
        f"nvcc is here but {fcuda.DEFAULT_PATH} is missing: {fcuda.BUILD_HINT}")
    assert fcuda.load_error() is None
    lib = fcuda.lib()
    assert all(hasattr(lib, name) for name in fcuda.EXPORTS)


def test_installed_library_staleness(monkeypatch, tmp_path):
    """The rule by which fresh_lib reuses the installed library: present and
    newer than every source, else rebuilt."""
    lib = tmp_path / "libfastadv_cuda.so"
    monkeypatch.setattr(fcuda, "DEFAULT_PATH", str(lib))
    assert "is not built" in _installed_library_is_stale()
    lib.write_bytes(b"")
    newest = max([*(ROOT / "csrc").iterdir(), ROOT / "setup.py"], key=lambda p: p.stat().st_mtime)
    t = newest.stat().st_mtime
    os.utime(lib, (t - 60, t - 60))
    assert newest.name in _installed_library_is_stale()
    os.utime(lib, (t + 60, t + 60))
    assert _installed_library_is_stale() is None


def test_gencode_flags():
    assert SETUP.gencode_flags("80;90") == [
        "-gencode arch=compute_80,code=sm_80", "-gencode arch=compute_90,code=sm_90",
        "-gencode arch=compute_90,code=compute_90"]
    assert SETUP.gencode_flags("9.0") == ["-gencode arch=compute_90,code=sm_90",
                                          "-gencode arch=compute_90,code=compute_90"]


def test_build_switch(monkeypatch):
    monkeypatch.setattr(SETUP, "find_nvcc", lambda: None)
    monkeypatch.delenv("FASTADV_BUILD_CUDA", raising=False)
    assert SETUP.cuda_mode() == "skip"  # unset and no nvcc: skipped with a note
    monkeypatch.setenv("FASTADV_BUILD_CUDA", "0")
    assert SETUP.cuda_mode() == "skip"
    monkeypatch.setenv("FASTADV_BUILD_CUDA", "1")
    assert SETUP.cuda_mode() == "force"
    with pytest.raises(RuntimeError, match="nvcc was not found"):
        SETUP.build_cuda(SETUP.CudaDistribution()).run()
    monkeypatch.setenv("FASTADV_BUILD_CUDA", "yes please")
    with pytest.raises(ValueError, match="FASTADV_BUILD_CUDA"):
        SETUP.cuda_mode()
    monkeypatch.setattr(SETUP, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.delenv("FASTADV_BUILD_CUDA")
    assert SETUP.cuda_mode() == "auto"


# ---- (b) backend and binding errors --------------------------------------------------------

def test_cuda_backend_needs_cuda_tensors():
    reason = backend.why_not("cuda", torch.device("cpu"))
    assert reason is not None and "needs CUDA tensors" in reason


def test_missing_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTADV_CUDA_LIB", str(tmp_path / "missing.so"))
    fcuda._reset_for_tests()
    err = fcuda.load_error()
    assert err is not None and "missing.so" in err and "not found" in err
    assert "FASTADV_BUILD_CUDA=1 pip install" in err
    with pytest.raises(RuntimeError, match="FASTADV_BUILD_CUDA=1"):
        fcuda.lib()


def test_broken_library_says_how_to_rebuild(monkeypatch, tmp_path):
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setenv("FASTADV_CUDA_LIB", str(bad))
    fcuda._reset_for_tests()
    err = fcuda.load_error()
    assert err is not None and "cannot be loaded" in err and "FASTADV_BUILD_CUDA=1" in err


def test_dtype_codes():
    assert [fcuda.dtype_code(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == [0, 1, 2]
    with pytest.raises(TypeError, match="float64"):
        fcuda.dtype_code(torch.float64)


def test_launchers_reject_cpu_tensors():
    w = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="CUDA tensors"):
        fcuda.fgm_update(w, w.clone(), w.clone(), None, torch.ones(1), 1.0)
    with pytest.raises(ValueError, match="CUDA tensors"):
        fcuda.fgm_norm(w, None, torch.zeros(1))


def test_multi_tensor_launchers_reject_cpu_tensors():
    from fastadv.kernels.cuda import fgm as cfgm, pgd as cpgd
    w = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cfgm.fgm_sq_many([cfgm.ShardNorm(0, w, w.clone(), w.clone())], torch.zeros(1))
    with pytest.raises(ValueError, match="CUDA tensors"):
        cpgd.pgd_sums_many([cpgd.ShardStep(0, w, w.clone(), w.clone(), True)], torch.zeros(3))
    assert cfgm.fgm_sq_many([], torch.zeros(1)).groups == []  # nothing to do, nothing checked


def test_multi_tensor_plan_layout():
    """The device plan of one multi-tensor call (csrc/multi_tensor.cuh's layout), built on the host:
    the sum launch's [P | slot], a row group's [first partial | slot | cols] and a dense group's
    rows plus [first block | owner]: each dense tensor takes the stage-1 blocks of its per-tensor
    launch (fgm_workspace_floats: 8192 elements a block, at most 1024), empty tensors none."""
    from fastadv.kernels.cuda import fgm as cfgm, multi_tensor as cmt, pgd as cpgd

    def item(slot, shape, rows=False, dtype=torch.float32):
        w = torch.zeros(shape, dtype=dtype)
        return cfgm.ShardNorm(slot, w, w, w, torch.zeros(shape[0], dtype=torch.uint8) if rows else None)

    items = [item(2, (3, 5), rows=True), item(0, (9000,)), item(1, (0,)), item(4, (5,)),
             item(3, (8192 * 1024 + 1,)), item(5, (7,), dtype=torch.float16), item(6, (2, 4), rows=True)]
    call = cmt.plan_call(items, cfgm._parts, cfgm._key, cfgm._cols, "cpu")
    counts = [3, 2, 0, 1, 1024, 1, 2]
    prefix = [sum(counts[:i]) for i in range(len(counts) + 1)]
    slots = [2, 0, 1, 4, 3, 5, 6]
    assert call.n_parts == prefix[-1]
    assert call.plan[:2 * len(items) + 1].tolist() == prefix + slots
    groups = {p.key: (p.idx, p.plan.tolist(), p.blocks) for p in call.groups}
    assert list(groups) == [(torch.float32, True), (torch.float32, False), (torch.float16, False)]
    assert groups[(torch.float32, True)] == ([0, 6], [0, 1031, 2, 6, 5, 4], 0)
    owners = [0, 0, 1] + [2] * 1024
    assert groups[(torch.float32, False)] == (
        [1, 3, 4], [3, 5, 6, 0, 4, 3, 0, 0, 0, 0, 2, 3, 1027] + owners, 1027)
    assert groups[(torch.float16, False)] == ([5], [1030, 5, 0, 0, 1, 0], 1)
    # PGD: the same partial counts (3 floats each), dense first steps in their own groups
    steps = [cpgd.ShardStep(i, s.w.view(-1), s.g.view(-1), s.backup.view(-1), first=i % 2 == 0)
             for i, s in enumerate(items) if s.rows is None]
    call = cmt.plan_call(steps, cpgd._parts, cpgd._key, cpgd._cols, "cpu")
    assert call.n_parts == 2 + 0 + 1 + 1024 + 1
    assert [(p.key, p.idx) for p in call.groups] == [
        ((torch.float32, False, False), [0, 2]), ((torch.float32, False, True), [3]),
        ((torch.float16, False, False), [4])]


# ---- (c) GPU: the launchers against PyTorch --------------------------------------------------

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


def _bits(t):
    return t.view(BITS[t.dtype])


def _offset(t, offset):
    """A copy of t whose storage starts `offset` elements in (misaligned for offset > 0)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    out = buf[offset:].view(t.shape)
    _bits(out).copy_(_bits(t))  # as integers: NaN payloads survive
    return out


def _expected_update(w, g, norm, eps):
    """The reference's w + (eps * g) / norm, in fp32 (PyTorch's own ops), rounded once."""
    r = (eps * g.float()) / norm.reshape(())
    return (w.float() + r).to(w.dtype)


def _norm(g2d, mask=None):
    out = torch.empty(1, dtype=torch.float32, device=g2d.device)
    fcuda.fgm_norm(g2d, mask, out)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [0, 1, 7, 4097, 8193, (1 << 20) + 3])
@pytest.mark.parametrize("offset", [0, 1])
def test_dense_norm(dev, dtype, numel, offset):
    g = _offset(torch.randn(numel, device=dev).to(dtype), offset)
    got = _norm(g.view(1, -1))
    want = torch.linalg.vector_norm(g.double()).float()
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=0)
    assert torch.equal(_bits(_norm(g.view(1, -1))), _bits(got))  # deterministic


@pytest.mark.gpu
def test_dense_norm_large_is_deterministic(dev):
    g = torch.randn(50_000_003, device=dev)
    a, b = _norm(g.view(1, -1)), _norm(g.view(1, -1))
    assert torch.equal(_bits(a), _bits(b))
    torch.testing.assert_close(a[0], torch.linalg.vector_norm(g.double()).float(), rtol=2e-5, atol=0)


def _sparse_case(dev, dtype, rows, cols, offset=0):
    """A gradient with all-zero rows, NaN / inf rows and rows whose only
    non-zero entry is tiny (its square underflows)."""
    gen = torch.Generator(device="cpu").manual_seed(rows * 1000 + cols)
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    zero_rows = torch.rand(rows, generator=gen) < 0.5
    g[zero_rows] = 0
    if rows > 3 and cols:
        g[1, 0], g[2, cols - 1] = float("nan"), float("inf")
        g[3] = 0
        g[3, 0] = torch.finfo(dtype).tiny
    return _offset(g.to(dev), offset)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,offset", [(1, 1, 0), (37, 33, 0), (64, 64, 0), (64, 64, 1),
                                              (5, 0, 0), (0, 8, 0), (600_001, 1, 0)])
def test_sparse_norm(dev, dtype, rows, cols, offset):
    g = _sparse_case(dev, dtype, rows, cols, offset)
    flags = torch.full((rows,), 7, dtype=torch.uint8, device=dev)  # overwritten
    got = _norm(g, flags)
    want = torch.linalg.vector_norm(g.double()).float()
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=0, equal_nan=True)
    assert torch.equal(flags, (g != 0).any(dim=1).to(torch.uint8))  # rows found from g itself


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 7, 4096, 4099, (1 << 20) + 5])
@pytest.mark.parametrize("offset", [0, 1])
def test_dense_update(dev, dtype, numel, offset):
    w0 = _offset(torch.randn(numel, device=dev).to(dtype), offset)
    g = _offset(torch.randn(numel, device=dev).to(dtype), offset)
    norm = _norm(g.view(1, -1))
    w, backup = w0.clone(), torch.full_like(w0, 123.0)
    fcuda.fgm_update(w.view(1, -1), g.view(1, -1), backup, None, norm, 0.37)
    assert torch.equal(_bits(backup), _bits(w0))
    assert torch.equal(_bits(w), _bits(_expected_update(w0, g, norm, 0.37)))
    if dtype == torch.float32:  # bit-equal to the reference's own expression
        ref = w0.clone()
        ref.add_(0.37 * g / norm.reshape(()))
        assert torch.equal(_bits(w), _bits(ref))


@pytest.mark.gpu
def test_dense_update_grid_stride(dev):
    n = 17_000_003  # unaligned: scalar path, more elements than one grid covers
    w0 = _offset(torch.randn(n, device=dev), 1)
    g = _offset(torch.randn(n, device=dev), 1)
    norm = torch.tensor([3.5], device=dev)
    w, backup = w0.clone(), torch.empty_like(w0)
    fcuda.fgm_update(w.view(1, -1), g.view(1, -1), backup, None, norm, 2.0)
    assert torch.equal(backup, w0)
    assert torch.equal(_bits(w), _bits(_expected_update(w0, g, norm, 2.0)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_update_skipped_for_zero_or_nan_norm(dev, dtype, bad):
    w0 = torch.randn(33, 17, device=dev).to(dtype)
    g = torch.randn(33, 17, device=dev).to(dtype)
    norm = torch.tensor([bad], device=dev)
    w, backup = w0.clone(), torch.empty_like(w0)
    fcuda.fgm_update(w, g, backup, None, norm, 1.0)
    assert torch.equal(_bits(w), _bits(w0)) and torch.equal(_bits(backup), _bits(w0))
    flags = torch.ones(33, dtype=torch.uint8, device=dev)
    backup_rows = torch.empty_like(w0)
    fcuda.fgm_update(w, g, backup_rows, flags, norm, 1.0)
    assert torch.equal(_bits(w), _bits(w0)) and torch.equal(_bits(backup_rows), _bits(w0))


@pytest.mark.gpu
def test_update_with_inf_norm_is_applied(dev):
    w0 = torch.randn(1000, device=dev)
    g = torch.randn(1000, device=dev)
    norm = torch.tensor([float("inf")], device=dev)
    w, backup = w0.clone(), torch.empty_like(w0)
    fcuda.fgm_update(w.view(1, -1), g.view(1, -1), backup, None, norm, 1.0)
    assert torch.equal(_bits(w), _bits(_expected_update(w0, g, norm, 1.0)))  # + (+-0): w kept


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,offset", [(1, 1, 0), (37, 33, 0), (64, 64, 0), (64, 64, 1),
                                              (129, 768, 0), (600_001, 1, 0)])
def test_sparse_update_and_restore(dev, dtype, rows, cols, offset):
    g = _sparse_case(dev, dtype, rows, cols, offset).nan_to_num(nan=0.0, posinf=0.0)
    flags = torch.empty(rows, dtype=torch.uint8, device=dev)
    norm = _norm(g, flags)
    touched = flags.bool()
    w0 = _offset(torch.randn(rows, cols, device=dev).to(dtype), offset)
    w = w0.clone()
    backup = _offset(torch.full((rows, cols), 7.0, device=dev).to(dtype), offset)
    fcuda.fgm_update(w, g, backup, flags, norm, 0.5)
    assert torch.equal(_bits(backup[touched]), _bits(w0[touched]))
    assert (backup[~touched] == 7.0).all()  # rows without gradient: not written
    want = w0.clone()
    want[touched] = _expected_update(w0[touched], g[touched], norm, 0.5)
    assert torch.equal(_bits(w), _bits(want))  # rows without gradient kept as they were
    fcuda.fgm_restore_rows(w, backup, flags)
    assert torch.equal(_bits(w), _bits(w0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols,offset", [(1, 0), (2, 0), (3, 1), (4, 0), (8, 0), (8, 1), (768, 0)])
def test_restore_rows_is_bit_exact(dev, dtype, cols, offset):
    rows = 97
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    backup_all = torch.randint(info.min, info.max, (rows, cols), dtype=bits, device=dev).view(dtype)
    flags = (torch.rand(rows, device=dev) < 0.5).to(torch.uint8)
    touched = flags.bool()
    backup = _offset(backup_all.contiguous(), offset)  # NaN payloads, -0, subnormals
    w0 = _offset(torch.randn(rows, cols, device=dev).to(dtype), offset)
    w = w0.clone()
    fcuda.fgm_restore_rows(w, backup, flags)
    want = _bits(w0).clone()
    want[touched] = _bits(backup_all)[touched]
    assert torch.equal(_bits(w), want)


@pytest.mark.gpu
def test_launch_counts_and_stream(dev):
    g = torch.randn(4, 5, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    before = dict(kernels.LAUNCHES)
    with torch.cuda.stream(side):
        norm = _norm(g)
        w, backup = g.clone(), torch.empty_like(g)
        fcuda.fgm_update(w, g, backup, None, norm, 1.0)
        flags = torch.ones(4, dtype=torch.uint8, device=dev)
        fcuda.fgm_restore_rows(w, backup, flags)
        _norm(torch.empty(0, 3, device=dev))  # finalize only
    side.synchronize()
    assert torch.equal(w, g)
    delta = {k: kernels.LAUNCHES[k] - before.get(k, 0) for k in kernels.LAUNCHES}
    assert delta["cuda.fgm_norm"] == 3
    assert delta["cuda.fgm_update"] == 1 and delta["cuda.fgm_restore_rows"] == 1
