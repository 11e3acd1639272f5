"""The benchmark harness: counting, results file, table, plot, and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastadv
from fastadv import kernels
from fastadv.bench import core

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "fastadv", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------
# core.count on known torch snippets


@pytest.fixture
def x():
    return torch.randn(1000, 64)


def test_clone_is_one_launch_two_passes(x):
    c = core.count(lambda: x.clone())
    assert (c["launches"], c["syncs"], c["bytes"]) == (1, 0, 2 * x.nbytes)
    assert c["ops"] == {"clone": 1}


def test_item_is_a_sync(x):
    c = core.count(lambda: float(x.sum()))
    assert c["syncs"] == 1
    assert c["launches"] == 1  # the sum; reading the scalar back launches nothing
    assert c["bytes"] == x.nbytes + 4


def test_bool_of_tensor_is_a_sync(x):
    c = core.count(lambda: bool(x.norm() != 0))
    assert (c["launches"], c["syncs"]) == (2, 1)


def test_views_cost_nothing(x):
    def views():
        x.view(-1)
        x.t()
        x[1:, :3]
        x.detach()
        x.unsqueeze(0).expand(3, -1, -1)
        x.reshape(64, 1000)  # contiguous: a view

    assert core.count(views)["launches"] == 0
    assert core.count(views)["bytes"] == 0


def test_inplace_reads_and_writes_self_once(x):
    y = torch.randn_like(x)
    assert core.count(lambda: x.add_(y))["bytes"] == 3 * x.nbytes
    assert core.count(lambda: x.copy_(y))["bytes"] == 2 * x.nbytes  # copy_ does not read self
    c = core.count(lambda: x.zero_())
    assert (c["launches"], c["bytes"]) == (1, x.nbytes)


def test_out_of_place_binary(x):
    y = torch.randn_like(x)
    c = core.count(lambda: x * y)
    assert (c["launches"], c["bytes"]) == (1, 3 * x.nbytes)
    # a Python scalar operand is no tensor traffic; a broadcast row is read once
    assert core.count(lambda: x * 2.0)["bytes"] == 2 * x.nbytes
    row = torch.randn(64)
    assert core.count(lambda: x + row)["bytes"] == 2 * x.nbytes + row.nbytes


def test_gather_and_scatter_count_the_indexed_rows(x):
    idx = torch.tensor([3, 7, 7, 100])
    c = core.count(lambda: x.index_select(0, idx))
    row_bytes = 64 * 4
    assert c["bytes"] == 4 * row_bytes + idx.nbytes + 4 * row_bytes
    src = torch.randn(4, 64)
    c = core.count(lambda: x.index_add_(0, idx, src))
    assert c["bytes"] == src.nbytes + idx.nbytes + 2 * src.nbytes
    c = core.count(lambda: x.index_copy_(0, torch.tensor([1, 2, 5, 9]), src))
    assert c["bytes"] == src.nbytes + 4 * 8 + src.nbytes


def test_data_dependent_shapes_are_syncs(x):
    mask = x[:, 0] > 0
    assert core.count(lambda: x[mask])["syncs"] == 1
    assert core.count(lambda: x.nonzero())["syncs"] == 1
    assert core.count(lambda: x[torch.tensor([0, 1])])["syncs"] == 0  # integer index: no sync
    assert core.count(lambda: x.__setitem__(mask, 0.0))["syncs"] == 1


def test_reference_fgm_matches_the_design_notes():
    """DESIGN.md: the seed FGM attack + restore is 7 kernels, 2 host syncs and
    10 passes over the matrix (938 MB at 30522x768 fp32)."""
    from fastadv.reference.fgm import FGM

    model = torch.nn.Module()
    model.word_embeddings = torch.nn.Embedding(1000, 64)
    model.word_embeddings.weight.grad = torch.randn(1000, 64)
    f = FGM(model)

    def step():
        f.attack()
        f.restore()

    c = core.count(step)
    n = 1000 * 64
    assert (c["launches"], c["syncs"]) == (7, 2)
    assert 40 * n <= c["bytes"] <= 40 * n + 64  # + the 0-d norm and its tests


def test_fastadv_launches_use_the_design_bytes():
    y = torch.randn(10)

    def fn():
        kernels.count_launch("test.fake_kernel", 2)
        y.mul_(2)  # an aten op the op issues besides its kernels

    c = core.count(fn, design_bytes=1234)
    assert c["launches"] == 3 and c["kernel_launches"] == 2 and c["aten_launches"] == 1
    assert c["bytes"] == 1234 and c["aten_bytes"] == 2 * y.nbytes  # mul_ by a scalar: read + write
    assert c["kernels"] == {"test.fake_kernel": 2}
    assert core.count(fn)["bytes"] is None  # kernels ran, nobody said what they move
    assert core.count(fn, design_bytes=lambda k: 100 * k["test.fake_kernel"])["bytes"] == 200
    assert core.count(lambda: y.mul_(2), design_bytes=1234)["bytes"] == 2 * y.nbytes  # no kernel ran


def test_triton_interpreter_staging_is_not_counted():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from fastadv import _backend

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _backend.why_not("triton", dev) is not None:
        pytest.skip(_backend.why_not("triton", dev))

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    a = torch.randn(300, device=dev)
    b = torch.empty_like(a)
    c = core.count(lambda: _copy[(3,)](a, b, 300, BLOCK=128))
    assert torch.equal(a, b)
    assert c["launches"] == 0 and c["bytes"] == 0 and c["syncs"] == 0


# --------------------------------------------------------------------------
# timing, derived columns, results file, table, plot


def test_time_ms_and_copy_bandwidth():
    calls = []
    ms = core.time_ms(lambda: calls.append(1), "cpu", warmup=2, iters=3)
    assert len(calls) == 5 and ms >= 0
    assert core.measure_copy_bandwidth("cpu", nbytes=2**20, iters=2) > 0


def _rows():
    return [
        {"op": "fgm", "case": "c1", "impl": "reference", "ms": 4.0, "gbps": None, "bytes": 8e9},
        {"op": "fgm", "case": "c1", "impl": "triton", "ms": 1.0, "gbps": None, "bytes": 4e9,
         "launches": 3, "syncs": 0, "check": "ok"},
        {"op": "fgm", "case": "c1", "impl": "compiled", "ms": None, "gbps": None, "skipped": "no"},
    ]


def test_derived_columns():
    rows = core.add_derived(_rows(), copy_gbps=5000.0)
    ref, tri, comp = rows
    assert ref["speedup"] == 1.0 and tri["speedup"] == 4.0 and comp["speedup"] is None
    assert ref["gbps"] == 2000.0 and tri["gbps"] == 4000.0
    assert tri["pct_copy_bw"] == 80.0
    table = core.format_table(rows)
    for col in ("op", "case", "impl", "ms", "speedup", "GB/s", "%copy", "launches", "syncs", "MB"):
        assert col in table.splitlines()[0]
    assert "4.00x" in table and "skipped" in table


def test_results_file_shape_and_merge(tmp_path):
    rows = core.add_derived(_rows(), 5000.0)
    path = core.write_results(rows, tmp_path, "cpu", 5000.0)
    assert path == tmp_path / "cpu.json"
    doc = json.loads(path.read_text())
    assert list(doc)[:6] == ["device", "date", "commit", "versions", "copy_gbps", "rows"]
    assert set(doc["versions"]) == {"torch", "triton", "cuda"}
    assert doc["versions"]["torch"] == torch.__version__
    assert isinstance(doc["copy_gbps"], float) and len(doc["date"]) == 10
    for r in doc["rows"]:
        assert all(k in r for k in core.REQUIRED_ROW)

    # a later run replaces (op, case, impl) rows in place and appends new ones
    new = [{"op": "fgm", "case": "c1", "impl": "triton", "ms": 0.5, "gbps": 8000.0},
           {"op": "pgd", "case": "c9", "impl": "reference", "ms": 2.0, "gbps": 1.0}]
    core.write_results(new, tmp_path, "cpu", 4000.0)
    doc = json.loads(path.read_text())
    keys = [(r["op"], r["case"], r["impl"]) for r in doc["rows"]]
    assert keys == [("fgm", "c1", "reference"), ("fgm", "c1", "triton"), ("fgm", "c1", "compiled"),
                    ("pgd", "c9", "reference")]
    assert doc["rows"][1]["ms"] == 0.5 and doc["copy_gbps"] == 4000.0


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = core.write_results(core.add_derived(_rows(), 5000.0), tmp_path, "cpu", 5000.0)
    png = core.plot(path, tmp_path / "cpu.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_slug():
    from fastadv import _env

    assert _env.device_slug("cpu") == "cpu"
    assert _env.git_commit() != ""


# --------------------------------------------------------------------------
# the command line


def test_cli_env():
    out = _run_cli("env", timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for word in ("torch", "triton", "numpy", "cuda", "nvcc", "FASTADV_BACKEND", "TRITON_INTERPRET",
                 "cpu:", "torch   usable"):
        assert word in text, f"{word!r} missing from `python -m fastadv env`:\n{text}"


def test_cli_rejects_unknown_op(tmp_path):
    out = _run_cli("bench", "--ops", "nope", "--out", str(tmp_path), timeout=120)
    assert out.returncode != 0
    assert "unknown op" in out.stderr


@pytest.mark.skipif(not hasattr(fastadv, "FGM"), reason="fastadv.FGM does not exist yet")
def test_cli_bench_fgm_on_this_device(tmp_path):
    out = _run_cli("bench", "--ops", "fgm", "--quick", "--no-plot", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    rows = doc["rows"]
    impls = {r["impl"] for r in rows}
    assert {"reference", "compiled", "torch"} <= impls
    for r in rows:
        assert r["op"] == "fgm"
        if r.get("skipped"):
            continue
        assert "error" not in r, r
        assert r["check"] == "ok", r
        assert r["launches"] is not None and r["syncs"] is not None
        if r["impl"] == "reference":
            assert (r["launches"], r["syncs"]) == (7, 2)
            assert r["speedup"] == 1.0
        if r["impl"] in fastadv._backend.BACKENDS:
            assert r["syncs"] == 0, r  # no host sync on the fastadv path
            assert r["bytes"] and r["bytes"] > 0
    assert "op" in out.stdout and "speedup" in out.stdout
