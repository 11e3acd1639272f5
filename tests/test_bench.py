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
from fastadv.bench import case, report, run, timing
from fastadv.bench.count import count

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "fastadv", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------
# count on known torch snippets


@pytest.fixture
def x():
    return torch.randn(1000, 64)


def test_clone_is_one_launch_two_passes(x):
    c = count(lambda: x.clone())
    assert (c["launches"], c["syncs"], c["bytes"]) == (1, 0, 2 * x.nbytes)
    assert c["ops"] == {"clone": 1}


def test_item_is_a_sync(x):
    c = count(lambda: float(x.sum()))
    assert c["syncs"] == 1
    assert c["launches"] == 1  # the sum; reading the scalar back launches nothing
    assert c["bytes"] == x.nbytes + 4


def test_bool_of_tensor_is_a_sync(x):
    c = count(lambda: bool(x.norm() != 0))
    assert (c["launches"], c["syncs"]) == (2, 1)


def test_views_cost_nothing(x):
    def views():
        x.view(-1)
        x.t()
        x[1:, :3]
        x.detach()
        x.unsqueeze(0).expand(3, -1, -1)
        x.reshape(64, 1000)  # contiguous: a view

    assert count(views)["launches"] == 0
    assert count(views)["bytes"] == 0


def test_inplace_reads_and_writes_self_once(x):
    y = torch.randn_like(x)
    assert count(lambda: x.add_(y))["bytes"] == 3 * x.nbytes
    assert count(lambda: x.copy_(y))["bytes"] == 2 * x.nbytes  # copy_ does not read self
    c = count(lambda: x.zero_())
    assert (c["launches"], c["bytes"]) == (1, x.nbytes)


def test_out_of_place_binary(x):
    y = torch.randn_like(x)
    c = count(lambda: x * y)
    assert (c["launches"], c["bytes"]) == (1, 3 * x.nbytes)
    # a Python scalar operand is no tensor traffic; a broadcast row is read once
    assert count(lambda: x * 2.0)["bytes"] == 2 * x.nbytes
    row = torch.randn(64)
    assert count(lambda: x + row)["bytes"] == 2 * x.nbytes + row.nbytes


def test_gather_and_scatter_count_the_indexed_rows(x):
    idx = torch.tensor([3, 7, 7, 100])
    c = count(lambda: x.index_select(0, idx))
    row_bytes = 64 * 4
    assert c["bytes"] == 4 * row_bytes + idx.nbytes + 4 * row_bytes
    src = torch.randn(4, 64)
    c = count(lambda: x.index_add_(0, idx, src))
    assert c["bytes"] == src.nbytes + idx.nbytes + 2 * src.nbytes
    c = count(lambda: x.index_copy_(0, torch.tensor([1, 2, 5, 9]), src))
    assert c["bytes"] == src.nbytes + 4 * 8 + src.nbytes


def test_data_dependent_shapes_are_syncs(x):
    mask = x[:, 0] > 0
    assert count(lambda: x[mask])["syncs"] == 1
    assert count(lambda: x.nonzero())["syncs"] == 1
    assert count(lambda: x[torch.tensor([0, 1])])["syncs"] == 0  # integer index: no sync
    assert count(lambda: x.__setitem__(mask, 0.0))["syncs"] == 1


def test_reference_fgm_matches_the_design_notes():
    """benchmarks/README.md ("Counting without a GPU") and docs/ARCHITECTURE.md
    ("FGM kernels"): the seed FGM attack + restore is 7 kernels, 2 host syncs
    and 10 passes over the matrix (938 MB at 30522x768 fp32)."""
    from fastadv.reference.fgm import FGM

    model = torch.nn.Module()
    model.word_embeddings = torch.nn.Embedding(1000, 64)
    model.word_embeddings.weight.grad = torch.randn(1000, 64)
    f = FGM(model)

    def step():
        f.attack()
        f.restore()

    c = count(step)
    n = 1000 * 64
    assert (c["launches"], c["syncs"]) == (7, 2)
    assert 40 * n <= c["bytes"] <= 40 * n + 64  # + the 0-d norm and its tests


def test_fastadv_launches_use_the_design_bytes():
    y = torch.randn(10)

    def fn():
        kernels.count_launch("test.fake_kernel", 2)
        y.mul_(2)  # an aten op the op issues besides its kernels

    c = count(fn, design_bytes=1234)
    assert c["launches"] == 3 and c["kernel_launches"] == 2 and c["aten_launches"] == 1
    assert c["bytes"] == 1234 and c["aten_bytes"] == 2 * y.nbytes  # mul_ by a scalar: read + write
    assert c["kernels"] == {"test.fake_kernel": 2}
    assert count(fn)["bytes"] is None  # kernels ran, nobody said what they move
    assert count(fn, design_bytes=lambda k: 100 * k["test.fake_kernel"])["bytes"] == 200
    assert count(lambda: y.mul_(2), design_bytes=1234)["bytes"] == 2 * y.nbytes  # no kernel ran


def test_a_registered_op_through_the_dispatcher_counts_what_it_runs():
    """torch.ops.fastadv.<op> (the compile / autograd path) is counted by the
    aten ops and kernels its implementation runs, as the direct eager call is,
    not as one opaque op."""
    @torch.library.custom_op("fastadv::_bench_count_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return (x * 2).sin()

    x = torch.randn(100)
    through = count(lambda: torch.ops.fastadv._bench_count_probe(x))
    direct = count(lambda: (x * 2).sin())
    assert through["ops"] == direct["ops"] == {"mul": 1, "sin": 1}
    assert (through["launches"], through["bytes"]) == (direct["launches"], direct["bytes"]) == (2, 4 * x.nbytes)


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
    c = count(lambda: _copy[(3,)](a, b, 300, BLOCK=128))
    assert torch.equal(a, b)
    assert c["launches"] == 0 and c["bytes"] == 0 and c["syncs"] == 0


# --------------------------------------------------------------------------
# timing, derived columns, results file, table, plot


def test_time_ms_and_copy_bandwidth():
    calls = []
    ms = timing.time_ms(lambda: calls.append(1), "cpu", warmup=2, iters=3)
    assert len(calls) == 5 and ms >= 0
    assert timing.measure_copy_bandwidth("cpu", nbytes=2**20, iters=2) > 0


def _rows():
    return [
        {"op": "fgm", "case": "c1", "impl": "reference", "ms": 4.0, "gbps": None, "bytes": 8e9},
        {"op": "fgm", "case": "c1", "impl": "triton", "ms": 1.0, "gbps": None, "bytes": 4e9,
         "launches": 3, "syncs": 0, "check": "ok"},
        {"op": "fgm", "case": "c1", "impl": "compiled", "ms": None, "gbps": None, "skipped": "no"},
    ]


def test_derived_columns():
    rows = report.add_derived(_rows(), copy_gbps=5000.0)
    ref, tri, comp = rows
    assert ref["speedup"] == 1.0 and tri["speedup"] == 4.0 and comp["speedup"] is None
    assert ref["gbps"] == 2000.0 and tri["gbps"] == 4000.0
    assert tri["pct_copy_bw"] == 80.0
    table = report.format_table(rows)
    for col in ("op", "case", "impl", "ms", "speedup", "GB/s", "%copy", "launches", "syncs", "MB"):
        assert col in table.splitlines()[0]
    assert "4.00x" in table and "skipped" in table


def test_results_file_shape_and_merge(tmp_path):
    rows = report.add_derived(_rows(), 5000.0)
    path = report.write_results(rows, tmp_path, "cpu", 5000.0)
    assert path == tmp_path / "cpu.json"
    doc = json.loads(path.read_text())
    assert list(doc)[:6] == ["device", "date", "commit", "versions", "copy_gbps", "rows"]
    assert set(doc["versions"]) == {"torch", "triton", "cuda"}
    assert doc["versions"]["torch"] == torch.__version__
    assert isinstance(doc["copy_gbps"], float) and len(doc["date"]) == 10
    for r in doc["rows"]:
        assert all(k in r for k in report.REQUIRED_ROW)

    # a later run replaces (op, case, impl) rows in place and appends new ones
    new = [{"op": "fgm", "case": "c1", "impl": "triton", "ms": 0.5, "gbps": 8000.0},
           {"op": "pgd", "case": "c9", "impl": "reference", "ms": 2.0, "gbps": 1.0}]
    report.write_results(new, tmp_path, "cpu", 4000.0)
    doc = json.loads(path.read_text())
    keys = [(r["op"], r["case"], r["impl"]) for r in doc["rows"]]
    assert keys == [("fgm", "c1", "reference"), ("fgm", "c1", "triton"), ("fgm", "c1", "compiled"),
                    ("pgd", "c9", "reference")]
    assert doc["rows"][1]["ms"] == 0.5 and doc["copy_gbps"] == 4000.0


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.write_results(report.add_derived(_rows(), 5000.0), tmp_path, "cpu", 5000.0)
    png = report.plot(path, tmp_path / "cpu.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_slug():
    from fastadv import _env

    assert _env.device_slug("cpu") == "cpu"
    assert _env.git_commit() != ""


# --------------------------------------------------------------------------
# the command line


def test_cli_env(capsys):
    from fastadv.__main__ import main

    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for word in ("torch", "triton", "numpy", "cuda", "nvcc", "FASTADV_BACKEND", "TRITON_INTERPRET",
                 "cpu:", "torch   usable"):
        assert word in text, f"{word!r} missing from `python -m fastadv env`:\n{text}"
    # which package and which CUDA library this Python loads (or why none)
    assert f"package    {ROOT / 'fastadv'}" in text
    assert "cuda lib   " in text and "libfastadv_cuda.so" in text


def test_cli_rejects_unknown_op(tmp_path, capsys):
    from fastadv.__main__ import main

    assert main(["bench", "--ops", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_cli_bench_into_the_default_folder(tmp_path):
    """The bench command in a fresh process, from another directory, on the
    op with the fewest rows (embedding FGSM; FGM's counts are checked
    in-process above): its results go to ./fastadv-bench (printed as an
    absolute path), the rows are checked and counted, CPU runs time nothing."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "fastadv", "bench", "--ops", "fgsm", "--quick", "--no-plot"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    cpu = not torch.cuda.is_available()
    files = list((tmp_path / "fastadv-bench").glob("*.json"))
    assert len(files) == 1 and f"results  {files[0]}" in out.stdout, files
    rows = json.loads(files[0].read_text())["rows"]
    impls = {r["impl"] for r in rows}
    # on CPU the default leaves torch.compile out (a GPU timing baseline) and times nothing
    assert {"reference", "torch"} <= impls and (cpu or "compiled" in impls)
    for r in rows:
        assert r["op"] == "fgsm"
        if r.get("skipped"):
            continue
        assert "error" not in r, r
        assert r["check"] == "ok", r
        assert r["launches"] is not None and r["syncs"] is not None
        if r["impl"] == "reference":  # the seed's line: sign, scale, add
            assert (r["launches"], r["syncs"]) == (3, 0)
            assert r["speedup"] == (None if cpu else 1.0)
        if cpu:  # CPU timings are not GPU speed: no ms, no speedup
            assert r["ms"] is None and r["speedup"] is None and r["gbps"] is None
        if r["impl"] in fastadv._backend.BACKENDS:
            assert r["syncs"] == 0, r  # no host sync on the fastadv path
            assert r["bytes"] and r["bytes"] > 0
    assert "op" in out.stdout and "speedup" in out.stdout
    if cpu:
        assert "CPU timings are not GPU speed" in out.stdout
    assert "rows to run" in out.stdout and "[" in out.stdout  # the progress line
    assert "Traceback" not in out.stdout + out.stderr
    assert "fastadv-bench/" in (ROOT / ".gitignore").read_text()


# --------------------------------------------------------------------------
# budget, progress, missing dependencies, CPU runs (issue 9)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_budget_refuses_what_would_overrun_it():
    clock = FakeClock()
    b = run.Budget(100, reserve=10, clock=clock)
    assert b.left() == 90 and b.refuse(("fgm", "triton")) is None  # nothing known yet: it may start
    clock.t = 30
    b.record(("fgm", "triton"), 30)
    assert b.refuse(("fgm", "triton")) is None  # 30 s expected, 60 s left
    clock.t = 70
    why = b.refuse(("fgm", "triton"))  # 30 s expected, 20 s left
    assert why and "would take about 30 s" in why and "20 s" in why
    assert b.refuse(("fgm", "torch")) is None  # unknown: may start
    clock.t = 95
    assert b.refuse(("fgm", "torch")) == "the 100 s budget was spent"
    assert b.refused == 2
    assert run.Budget(None).refuse(("x", "y")) is None and run.Budget(None).left() == float("inf")
    assert run.Budget(100, clock=FakeClock()).timing_cap(5.0) == 5.0
    assert run.Budget(8, clock=FakeClock()).timing_cap(5.0) == 2.0  # a quarter of what is left


def _fake_impl(name, clock, seconds, exc=None):
    def setup():
        if exc is not None:
            raise exc
        clock.t += seconds
        return case.Prepared(step=lambda: None, check=lambda: None, timed=False)
    return case.Impl(name, setup)


class _Case:
    def __init__(self, name):
        self.name = name


def test_run_plan_under_a_budget_and_missing_dependencies():
    clock = FakeClock()
    module = type("M", (), {"release": staticmethod(lambda: None)})
    units = [case.Unit("op", module, _Case(f"c{i}"), _fake_impl("slow", clock, 40), i) for i in range(3)]
    units.append(case.Unit("op", module, _Case("c3"), _fake_impl(
        "needs", clock, 0, ModuleNotFoundError("No module named 'opacus'", name="opacus")), 3))
    budget = run.Budget(100, clock=clock)
    lines = []
    rows = run.run_plan(units, "cpu", timed=False, log=lines.append, budget=budget)
    assert [r.get("budget", False) for r in rows] == [False, False, True, False]
    assert rows[0]["check"] == "ok" and "would take about 40 s" in rows[2]["skipped"]
    # a missing optional dependency: one line of reason, no error, no traceback
    assert rows[3]["skipped"].startswith("needs opacus, not installed here")
    assert "error" not in rows[3] and "traceback" not in rows[3] and lines == []
    table = report.format_table(rows)
    assert "not run, 1 row: over the budget" in table and table.count("needs opacus") == 1


def test_a_real_error_is_one_line_and_keeps_its_traceback():
    clock = FakeClock()
    impl = _fake_impl("broken", clock, 0, ImportError("cannot import name 'X' from 'fastadv.ops'"))
    lines, traces = [], []
    row = run.run_unit("op", "c", impl, "cpu", warmup=0, iters=1, log=lines.append, trace=traces.append)
    assert row["error"].startswith("ImportError") and "Traceback" in row["traceback"]
    assert len(lines) == 1 and "ERROR" in lines[0] and len(traces) == 1
    missing = ModuleNotFoundError("No module named 'fastadv.ops.nope'", name="fastadv.ops.nope")
    assert case.missing_dependency(missing) is None  # a missing fastadv module is a bug


def test_progress_line_without_a_terminal():
    import io

    clock = FakeClock()
    out = io.StringIO()
    keys = [("fgm", "reference"), ("fgm", "triton"), ("fgm", "reference"), ("fgm", "triton")]
    p = run.Progress(keys, stream=out, interval=10, tty=False, clock=clock)
    p.start(keys[0], "fgm c0: reference")
    clock.t = 2
    p.finish(keys[0], 2.0)
    assert out.getvalue().startswith("[1/4  25%] 0:02 elapsed")  # a first line at once
    clock.t = 12
    p.start(keys[1], "fgm c0: triton")
    p.finish(keys[1], 10.0)
    assert p.eta() == 12.0  # one reference (2 s) + one triton (10 s) left
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("[2/4  50%] 0:12 elapsed, ETA 0:12") and "\r" not in out.getvalue()
    clock.t = 14
    p.finish(keys[2], 2.0)
    assert len(out.getvalue().splitlines()) == 2  # then at most one line per `interval`
    p.finish(keys[3], 10.0)
    assert out.getvalue().splitlines()[-1].startswith("[4/4 100%]") and "done" in out.getvalue()


def test_progress_line_on_a_terminal_rewrites_itself():
    import io

    out = io.StringIO()
    p = run.Progress([("a", "x")], stream=out, tty=True, clock=FakeClock())
    p.start(("a", "x"), "a case: x")
    p.message("a note")
    p.finish(("a", "x"), 1.0)
    p.close()
    text = out.getvalue()
    assert text.startswith("\r[0/1") and "a note\n" in text and text.endswith("\n")


def test_cpu_rows_have_no_speedup_and_no_plot(tmp_path):
    rows = report.add_derived(_rows(), 5000.0, speedups=False)
    assert all(r["speedup"] is None and r["gbps"] is None and r["pct_copy_bw"] is None for r in rows)
    path = report.write_results(rows, tmp_path, "cpu", 5000.0)
    with pytest.raises(report.NothingToPlot):
        report.plot(path, tmp_path / "cpu.png")


def test_plot_has_a_panel_per_op_and_bars_per_impl(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"op": op, "case": "c", "impl": impl, "ms": ms, "gbps": None}
            for op in ("fgm", "dp") for impl, ms in (("reference", 4.0), ("triton", 1.0), ("cuda", 2.0))]
    path = report.write_results(report.add_derived(rows, 100.0), tmp_path, "cpu", 100.0)
    png = report.plot(path, tmp_path / "gpu.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shadow_warning(tmp_path):
    from fastadv import _env

    tree = tmp_path / "checkout"
    (tree / "fastadv").mkdir(parents=True)
    (tree / "csrc").mkdir()
    (tree / "pyproject.toml").write_text("")
    site = tmp_path / "site" / "fastadv"
    (site / "_lib").mkdir(parents=True)
    (site / "_lib" / "libfastadv_cuda.so").write_bytes(b"")
    installed = [{"package": site, "editable": False}]
    warn = _env.shadow_warning(tree / "fastadv", installed)
    assert warn and str(tree / "fastadv") in warn and str(site) in warn and "CUDA library" in warn
    assert _env.shadow_warning(site, installed) is None  # the installed copy itself
    assert _env.shadow_warning(tree / "fastadv", []) is None  # nothing installed
    assert _env.shadow_warning(tree / "fastadv", [{"package": tree / "fastadv", "editable": True}]) is None


def test_sift_bench_cases_check_and_count():
    """The SiFT cases (moved out of the noise ones): every row checks, the
    fastadv rows make no host sync, DeBERTa's update reads the norm on the host."""
    from fastadv.bench import sift

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run.run_op("sift", sift, dev, quick=True, impls=["reference", "torch"], warmup=0, iters=1,
                      log=lambda s: None)
    sift.release()
    assert {r["case"].split()[0] for r in rows} == {"init", "update"}
    for r in rows:
        assert r.get("check") == "ok", r
        assert r["syncs"] == (2 if r["impl"] == "reference" and r["case"].startswith("update") else 0), r


def test_ema_and_neftune_bench_cases_check_and_count():
    """EMA and NEFTune are ops of their own in the bench (moved out of the
    AWP and noise modules): every row checks, the fastadv rows make no host
    sync, EMA's torch path is one launch per dtype pair (fp32: one), and the
    old modules no longer list them."""
    from fastadv import bench
    from fastadv.bench import awp, ema, neftune, noise

    assert {"ema", "neftune"} <= set(bench.OPS) and bench.load("ema") is ema
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name, module in (("ema", ema), ("neftune", neftune)):
        rows = run.run_op(name, module, dev, quick=True, impls=["reference", "torch"], warmup=0, iters=1,
                          log=lambda s: None)
        module.release()
        assert {r["case"] for r in rows} == {c.name for c in case.select_cases(module, dev, quick=True)}
        for r in rows:
            assert r.get("check") == "ok" or r.get("skipped"), r
            if r.get("check") == "ok" and r["impl"] != "reference":
                assert r["syncs"] == 0, r
        if name == "ema":
            fp32 = {r["impl"]: r for r in rows if "fp32" in r["case"]}
            assert fp32["torch"]["launches"] == 1 and fp32["reference"]["launches"] > 100, fp32
    assert not any("ema" in c.name for c in awp.cases("cpu", False))
    assert not any(c.op == "neftune" for c in noise.cases("cpu", False))


def test_smoke_units_cover_every_dtype():
    from fastadv.bench import gpucheck

    units = gpucheck.smoke_units(["fgm", "noise"], "cpu", backends=("torch",))
    names = {u.case.name for u in units}
    for dt in ("fp32", "fp16", "bf16"):
        assert any(dt in n and n.startswith("128x64") for n in names), names
    assert sum(n.startswith("token_ids") for n in names) == 1  # int ids: one dtype
    assert {u.impl.name for u in units} == {"torch"}
    assert all(not n.startswith("4000x128") for n in names)  # the smallest size only


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU rehearsal")
def test_gpucheck_dry_run_survives_a_crashed_worker(tmp_path):
    """The CPU rehearsal of the GPU check on the smallest plan that still has
    every part (the op with the fewest rows: embedding FGSM, 6 smoke rows and
    6 bench rows; the budget logic has its own tests, the ops theirs), with a
    worker made to die on one smoke row, as a CUDA fault would kill it: that
    row is an error, a fresh worker runs the others, the bench still runs."""
    crashed = "smoke:fgsm:torch:embeds 4x64x64 fp16"
    env_before = os.environ.get("FASTADV_GPUCHECK_CRASH_AT")
    os.environ["FASTADV_GPUCHECK_CRASH_AT"] = crashed
    try:
        out = _run_cli("gpucheck", "--dry-run", "--out", str(tmp_path), "--ops", "fgsm",
                       "--budget", "150", timeout=240)
    finally:
        if env_before is None:
            del os.environ["FASTADV_GPUCHECK_CRASH_AT"]
        else:
            os.environ["FASTADV_GPUCHECK_CRASH_AT"] = env_before
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-4000:]  # the crash fails the check
    for name in ("gpucheck.log", "smoke.json", "smoke.jsonl", "bench.jsonl", "summary.json", "cpu.json"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and summary["pytest"]["status"] == "dry-run"
    assert "-m gpu" in summary["pytest"]["command"]
    assert summary["smoke"]["workers"] == 2 and len(summary["smoke"]["failed"]) == 1
    assert "died" in summary["smoke"]["failed"][0] and "embeds 4x64x64 fp16 torch" in summary["smoke"]["failed"][0]
    smoke = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert len(smoke) == 6  # fp32 / fp16 / bf16 x torch / triton
    done = [r for r in smoke if r["status"] == "ok"]
    assert len(done) + 1 + sum(r["status"] == "skipped" for r in smoke) == len(smoke)  # nothing left out
    # the rows after the crashed one ran in the fresh worker
    assert {("torch", "bf16"), ("torch", "fp32"), ("triton", "fp32")} <= {
        (r["impl"], r["case"].split()[-1]) for r in done}
    assert all(r["sync"] == "none" and r["impl"] in r["launched"] for r in done)
    bench = summary["bench"]
    assert bench["complete"] and bench["rows"] == 6 and not bench["failed"] and bench["checked_ok"] == 5
    assert summary["seconds"] <= 150 + 30  # the budget holds (plus the files)
    assert "Traceback" not in out.stdout


# --------------------------------------------------------------------------
# dist_step: the distributed path on a 1-rank process group (issue 12)

def test_dist_step_counts_one_all_reduce_per_call(tmp_path):
    """``python -m fastadv bench --ops dist_step`` on the torch backend, in a
    fresh process: every row checks against the reference; the plain rows
    all-reduce nothing, the FSDP2 rows (1-rank gloo group) exactly once per
    call, what fastadv/ops sends: FGM one fp32 ||g||^2 per table, AWP ||g||
    and ||w|| per perturbed tensor, SAM one squared norm; the collective is
    one of the counted launches, neither path syncs the host."""
    from fastadv import bench
    from fastadv.bench import awp, dist

    assert bench.load("dist_step") is dist
    out = _run_cli("bench", "--ops", "dist_step", "--impls", "torch,torch fsdp1", "--out", str(tmp_path),
                   "--no-plot", timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    by = {(r["case"], r["impl"]): r for r in rows}
    cases = {c.name: c for c in dist.cases("cuda" if torch.cuda.is_available() else "cpu", None)}
    assert {c for c, _ in by} == set(cases) and len(rows) == 2 * len(cases)
    for (case_name, impl), r in by.items():
        assert r["check"] == "ok" and r["syncs"] == 0, r
        c = cases[case_name]
        shapes = awp.model_shapes(*dist._model(c.big)[1:])
        tensors = {"fgm": 1, "awp": sum("weight" in n for n in shapes), "sam": len(shapes)}[c.op]
        assert r["tensors"] == tensors and r["plain"] == "torch", r
        if impl == "torch":
            assert (r["all_reduces"], r["all_reduce_bytes"]) == (0, 0), r
            continue
        plain = by[case_name, "torch"]
        sent = {"fgm": 4 * tensors, "awp": 8 * tensors, "sam": 4}[c.op]
        assert (r["all_reduces"], r["all_reduce_bytes"]) == (1, sent), r
        assert r["launches"] >= plain["launches"] + 1, (r, plain)
    assert "torch fsdp1: 1 all_reduce per call, 4 bytes; +" in out.stdout  # the table's collective lines
    assert "Traceback" not in out.stdout + out.stderr


def test_dist_step_skips_without_a_usable_process_group(monkeypatch):
    """No torch.distributed, or a process group already there: the FSDP2 row
    is skipped with the reason, the plain row still runs, and no process
    group is left behind."""
    import torch.distributed
    from fastadv.bench import dist

    c = dist.Case("sam", torch.float32, False)
    impls = {i.name: i for i in dist.impls(c, "cpu")}
    for patch, why in ((("is_available", lambda: False), "torch.distributed is not available"),
                       (("is_initialized", lambda: True), "already initialised")):
        with monkeypatch.context() as m:
            m.setattr(torch.distributed, *patch)
            row = run.run_unit("dist_step", c.name, impls["torch fsdp1"], "cpu", warmup=0, iters=1,
                               timed=False, log=lambda s: None)
        assert why in row.get("skipped", ""), row
    row = run.run_unit("dist_step", c.name, impls["torch"], "cpu", warmup=0, iters=1, timed=False,
                       log=lambda s: None)
    dist.release()
    assert row["check"] == "ok" and row["all_reduces"] == 0
    assert not torch.distributed.is_initialized()


def test_vs_plain_is_the_ratio_to_the_plain_row():
    rows = [{"op": "dist_step", "case": "c", "impl": "torch", "ms": 2.0, "plain": "torch", "all_reduces": 0,
             "all_reduce_bytes": 0, "launches": 3},
            {"op": "dist_step", "case": "c", "impl": "torch fsdp1", "ms": 3.0, "plain": "torch",
             "all_reduces": 1, "all_reduce_bytes": 4, "launches": 6}]
    report.add_derived(rows, None)
    assert rows[0].get("vs_plain") is None and rows[1]["vs_plain"] == 1.5
    table = report.format_table(rows)
    assert "c torch fsdp1: 1 all_reduce per call, 4 bytes; +3 launches vs torch, 1.50x its ms" in table
    report.add_derived(rows, None, speedups=False)
    assert rows[1]["vs_plain"] is None
